//! vmm-shim library.
