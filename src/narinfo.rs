//! narinfo
