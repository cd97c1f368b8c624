//! Unit tests of the daemon's test-only fault injection: off unless the
//! environment turns it on.

use super::*;

/// The test-only fault frame does nothing unless NETD_FAULT_INJECTION=1 was in
/// the environment (never set in unit tests).
#[test]
fn fault_frame_needs_the_variable() {
    let mut f = vec![0xffu8; 12];
    f.extend_from_slice(&FAULT_FRAME.0.to_be_bytes());
    f.extend_from_slice(FAULT_FRAME.1);
    assert!(std::env::var_os(FAULT_INJECTION_ENV).is_none());
    assert!(!fault_injection());
    assert!(!is_fault_frame(&f));
}
