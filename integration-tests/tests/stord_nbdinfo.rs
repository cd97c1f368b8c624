//! stord with libnbd's nbdinfo: export list, allocation map, every `--can` and
//! `--is` property, over TCP and the unix socket.

mod stord_common;

use std::process::Command;

use integration_tests::require_root;
use stord_common::{dynamic, fixed, ok, qemu_io, read_only, Stord};

fn code(args: &[&str], uri: &str) -> i32 {
    let out = Command::new("nbdinfo")
        .args(args)
        .arg(uri)
        .output()
        .unwrap();
    out.status.code().unwrap_or(-1)
}

#[test]
fn list_shows_every_disk_with_description() {
    require_root();
    let s = Stord::start(&[dynamic("alpha", "1MiB"), fixed("beta", "2MiB")]).unwrap();
    let out = ok(Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(s.uri("")))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"], "{out}");
    assert_eq!(exports[0]["export-size"].as_u64(), Some(1 << 20));
    assert_eq!(exports[1]["export-size"].as_u64(), Some(2 << 20));
    assert!(
        exports[1]["description"]
            .as_str()
            .unwrap()
            .contains("fixed"),
        "{out}"
    );
    assert_eq!(v["protocol"].as_str(), Some("newstyle-fixed"), "{out}");
    // Same over the unix socket.
    let out = ok(Command::new("nbdinfo").arg("--list").arg(s.unix_uri(""))).unwrap();
    assert!(out.contains("alpha") && out.contains("beta"), "{out}");
}

#[test]
fn map_reports_holes_and_data() {
    require_root();
    let s = Stord::start(&[dynamic("d", "16MiB")]).unwrap();
    let uri = s.uri("d");
    let map = ok(Command::new("nbdinfo").args(["--map", "--json"]).arg(&uri)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 1, "{map}");
    assert_eq!(
        a[0]["type"].as_u64(),
        Some(3),
        "fresh dynamic disk is hole+zero: {map}"
    );

    qemu_io(&uri, &["write -P 1 4M 1M"]).unwrap();
    let map = ok(Command::new("nbdinfo").args(["--map", "--json"]).arg(&uri)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let ext: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ext,
        vec![
            (0, 4 << 20, 3),
            (4 << 20, 1 << 20, 0),
            (5 << 20, 11 << 20, 3)
        ],
        "{map}"
    );

    // Discard punches the hole back.
    qemu_io(&uri, &["discard 4M 1M"]).unwrap();
    let map = ok(Command::new("nbdinfo").args(["--map", "--json"]).arg(&uri)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{map}");
    // --totals agrees: 100% sparse.
    let t = ok(Command::new("nbdinfo")
        .args(["--map", "--totals"])
        .arg(&uri))
    .unwrap();
    assert!(t.contains("100.0%") && t.contains("hole"), "{t}");
}

#[test]
fn can_and_is_flags() {
    require_root();
    let s = Stord::start(&[dynamic("rw", "1MiB"), read_only("ro", "1MiB")]).unwrap();
    let rw = s.uri("rw");
    let ro = s.uri("ro");
    for flag in [
        "connect",
        "read",
        "write",
        "cache",
        "df",
        "fast-zero",
        "flush",
        "fua",
        "multi-conn",
        "structured-reply",
        "trim",
        "zero",
    ] {
        assert_eq!(code(&["--can", flag], &rw), 0, "--can {flag} on a rw disk");
    }
    assert_eq!(code(&["--is", "read-only"], &rw), 2);
    assert_eq!(code(&["--is", "rotational"], &rw), 2);
    assert_eq!(code(&["--is", "tls"], &rw), 2);

    assert_eq!(code(&["--is", "read-only"], &ro), 0);
    for flag in ["write", "trim", "zero", "fast-zero", "fua"] {
        assert_eq!(code(&["--can", flag], &ro), 2, "--can {flag} on a ro disk");
    }
    for flag in ["read", "flush", "multi-conn", "cache", "df"] {
        assert_eq!(code(&["--can", flag], &ro), 0, "--can {flag} on a ro disk");
    }
    // An export that does not exist cannot be connected to (and is reported).
    assert_ne!(code(&["--can", "connect"], &s.uri("nope")), 0);
    // Size and block-size information.
    let out = ok(Command::new("nbdinfo").arg("--json").arg(&rw)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(1 << 20));
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{out}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{out}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20), "{out}");
    let out = ok(Command::new("nbdinfo").arg("--size").arg(&ro)).unwrap();
    assert_eq!(out.trim(), "1048576");
}
