//! The helpers the remote backend tests (Cachix, S3) import, by their historical names: a thin re-export of
//! [`crate::harness`].
// Not every name is used by today's files; files written against these names keep compiling.
#![allow(unused_imports)]

pub use crate::harness::cache::nix_copy_from;
pub use crate::harness::keys::nix_key;
pub use crate::harness::nix::{
    build_paths, prepare, prepare_all, Prepared, NIX_OPTIONS as BUILD_OPTS,
};
pub use crate::harness::servers::{CachixServer, PyServer};
