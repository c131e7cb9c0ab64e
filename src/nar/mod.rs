//! nar
