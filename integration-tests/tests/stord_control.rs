//! stord's control CLI: create / list / resize / delete through the control
//! socket, delete refused while a client is connected, the catalog surviving a
//! restart, and create failures reported.

mod stord_common;

use std::process::Command;
use std::time::Duration;

use integration_tests::{require_root, wait_until};
use stord_common::{dynamic, holder, nbd_size, qemu_io, Stord};

fn list(s: &Stord) -> serde_json::Value {
    let out = s.cli(&["disk", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    v.as_array().unwrap().iter().find(|d| d["name"] == name)
}

#[test]
fn create_list_resize_delete_and_restart() {
    require_root();
    let mut s = Stord::start(&[dynamic("boot", "8MiB")]).unwrap();

    let out = s.cli(&[
        "disk", "create", "vol1", "--size", "32MiB", "--alloc", "fixed",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&[
        "disk", "create", "vol2", "--size", "1GiB", "--alloc", "dynamic",
    ]);
    assert!(out.status.success(), "{out:?}");
    // Duplicate and bad names are refused with a message.
    let out = s.cli(&["disk", "create", "vol1", "--size", "1MiB"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    let out = s.cli(&["disk", "create", "../etc", "--size", "1MiB"]);
    assert!(!out.status.success());
    let out = s.cli(&["disk", "create", "x", "--size", "12 parsecs"]);
    assert!(!out.status.success());

    let v = list(&s);
    let vol1 = find(&v, "vol1").unwrap();
    assert_eq!(vol1["size"].as_u64(), Some(32 << 20));
    assert_eq!(vol1["alloc"], "fixed");
    assert!(
        vol1["allocated"].as_u64().unwrap() >= 32 << 20,
        "fixed is preallocated: {vol1}"
    );
    let vol2 = find(&v, "vol2").unwrap();
    assert!(
        vol2["allocated"].as_u64().unwrap() < 1 << 20,
        "dynamic is sparse: {vol2}"
    );
    // The table form names every disk too.
    let out = s.cli(&["disk", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("vol1") && table.contains("boot") && table.contains("ALLOCATED"),
        "{table}"
    );

    // The new disk is served at once.
    qemu_io(
        &s.uri("vol1"),
        &["write -P 0x61 0 64k", "read -P 0x61 0 64k"],
    )
    .unwrap();

    // Delete is refused while a client is connected; `list` shows the connection.
    let mut holder = holder(&s.uri("vol2"));
    assert!(wait_until(Duration::from_secs(10), || {
        find(&list(&s), "vol2").unwrap()["connections"].as_u64() == Some(1)
    }));
    let out = s.cli(&["disk", "delete", "vol2"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connection"),
        "{out:?}"
    );
    // Shrinking while connected is refused too; growing is fine.
    assert!(!s
        .cli(&["disk", "resize", "vol2", "--size", "1MiB"])
        .status
        .success());
    assert!(s
        .cli(&["disk", "resize", "vol2", "--size", "2GiB"])
        .status
        .success());
    holder.signal(libc::SIGKILL);
    holder.wait_timeout(Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(10), || {
        find(&list(&s), "vol2").unwrap()["connections"].as_u64() == Some(0)
    }));
    let out = s.cli(&["disk", "delete", "vol2"]);
    assert!(out.status.success(), "{out:?}");
    assert!(find(&list(&s), "vol2").is_none());
    assert!(!s.state().join("disks/vol2.img").exists());

    // Resize a fixed disk: the new size is served and preallocated.
    assert!(s
        .cli(&["disk", "resize", "vol1", "--size", "64MiB"])
        .status
        .success());
    assert_eq!(nbd_size(&s.uri("vol1")).unwrap(), (64u64 << 20).to_string());
    // Large reads are sent from a mapping of the disk file, made at the old
    // size by the read above: the grown part reads back right, old data too.
    qemu_io(
        &s.uri("vol1"),
        &[
            "write -P 0x62 48M 1M",
            "read -P 0x62 48M 1M",
            "read -P 0x61 0 64k",
        ],
    )
    .unwrap();

    // A disk the config names is kept as it is once it exists: resize it here,
    // and the restart below must not undo that.
    assert!(s
        .cli(&["disk", "resize", "boot", "--size", "16MiB"])
        .status
        .success());

    // The catalog survives a restart (SIGKILL: no chance to save on the way out).
    s.kill();
    s.restart().unwrap();
    let v = list(&s);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["boot", "vol1"], "{v}");
    assert_eq!(find(&v, "vol1").unwrap()["size"].as_u64(), Some(64 << 20));
    assert_eq!(
        find(&v, "boot").unwrap()["size"].as_u64(),
        Some(16 << 20),
        "config disk kept as it is"
    );
    assert!(find(&v, "vol1").unwrap()["allocated"].as_u64().unwrap() >= 64 << 20);
    qemu_io(&s.uri("vol1"), &["read -P 0x61 0 64k"]).unwrap();
    // The catalog file is well-formed JSON and no temp file is left behind.
    let cat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.state().join("catalog.json")).unwrap()).unwrap();
    assert_eq!(cat["disks"].as_array().unwrap().len(), 2);
    assert!(!s.state().join("catalog.json.tmp").exists());
}

#[test]
fn cli_reports_unreachable_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let err = integration_tests::run_failing(
        Command::new(integration_tests::bin("stord"))
            .args(["disk", "list", "--control"])
            .arg(dir.path().join("none.sock")),
        1,
    );
    assert!(
        err.contains("none.sock") && err.contains("is stord running"),
        "{err}"
    );
}
