//! Bounds a peer cannot exceed: the connection limit (extra clients are closed
//! at once and counted, the slot frees when a client leaves) and the empty
//! export name (the default export, or an error when it is ambiguous).

mod stord_common;

use std::time::Duration;

use integration_tests::{require_root, wait_until};
use stord_common::{dynamic, holder, nbd_size, Stord};

fn connections(s: &Stord) -> u64 {
    let out = s.cli(&["disk", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["connections"].as_u64().unwrap()
}

#[test]
fn connection_limit_is_enforced() {
    let s = Stord::limited("max_connections = 2\n", &[dynamic("d", "1MiB")]);
    let uri = s.uri("d");
    let _a = holder(&uri);
    let mut b = holder(&uri);
    assert!(wait_until(Duration::from_secs(10), || connections(&s) == 2));
    let third = nbd_size(&uri);
    assert!(third.is_err(), "a third connection was served: {third:?}");
    let status = s.cli(&["status"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(v["refused"].as_u64().unwrap() >= 1, "{v}");
    // A slot frees when a client goes away.
    b.signal(libc::SIGKILL);
    b.wait_timeout(Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(10), || connections(&s) == 1));
    assert_eq!(nbd_size(&uri).unwrap(), "1048576");
}

#[test]
fn empty_export_name() {
    require_root();
    // One disk: the empty name means it.
    let s = Stord::start(&[dynamic("only", "1MiB")]).unwrap();
    assert_eq!(nbd_size(&s.uri("")).unwrap(), "1048576");
    // Several disks and no default_export: ambiguous, refused.
    let s = Stord::start(&[dynamic("a", "1MiB"), dynamic("b", "2MiB")]).unwrap();
    let out = nbd_size(&s.uri(""));
    assert!(out.is_err(), "{out:?}");
    // default_export picks one.
    let s = Stord::limited(
        "default_export = \"b\"\n",
        &[dynamic("a", "1MiB"), dynamic("b", "2MiB")],
    );
    assert_eq!(nbd_size(&s.uri("")).unwrap(), "2097152");
}
