//! pathinfo
