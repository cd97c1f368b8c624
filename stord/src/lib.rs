//! stord library.
