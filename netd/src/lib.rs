//! netd library.

pub mod nat;
