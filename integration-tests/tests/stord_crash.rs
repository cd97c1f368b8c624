//! The durability promise under crashes: a writer (libnbd, two connections of
//! one multi-conn client) gets FUA writes and flushes acknowledged while stord is
//! SIGKILLed at random moments; after each restart every acknowledged block
//! reads back exactly.
//!
//! Limit of what this proves: SIGKILL of the daemon keeps the host's page cache,
//! so it checks that stord acknowledges only what it has written (and orders
//! flushes correctly across connections), not the fdatasync itself reaching the
//! platter; a host power cut cannot be simulated here.

mod stord_common;

use integration_tests::require_root;
use stord_common::{crash_rounds, dynamic, Stord};

#[test]
fn acknowledged_writes_survive_sigkill() {
    require_root();
    let mut s = Stord::start(&[dynamic("d", "64MiB")]).unwrap();
    crash_rounds(&mut s, "d", 4, 1, |_, _| {});
}
