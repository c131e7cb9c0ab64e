//! The `nixpush` subcommands: one module and one `run` per subcommand.

pub mod dump_nar;
pub mod verify;
