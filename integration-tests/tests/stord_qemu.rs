//! stord with QEMU's tools as the peer: qemu-io (patterns, write -z, discard,
//! flush, over TCP and the unix socket) and qemu-img (convert, compare, map).

mod stord_common;

use std::process::Command;

use integration_tests::require_root;
use stord_common::{dynamic, fixed, ok, qemu_io, Stord};

#[test]
fn qemu_io_patterns_zero_discard_flush() {
    require_root();
    let s = Stord::start(&[dynamic("dyn", "64MiB"), fixed("fix", "16MiB")]).unwrap();
    for name in ["dyn", "fix"] {
        let uri = s.uri(name);
        qemu_io(
            &uri,
            &[
                "write -P 0xa5 0 1M",
                "write -P 0x5a 1M 64k",
                "write -P 0x11 3M 4096",
                "write -f -P 0x22 5M 8k", // FUA
                "flush",
                "read -P 0xa5 0 1M",
                "read -P 0x5a 1M 64k",
                "read -P 0x11 3M 4096",
                "read -P 0x22 5M 8k",
                "read -P 0 2M 4096", // never written
                "write -z 0 64k",
                "read -P 0 0 64k",
                "read -P 0xa5 64k 64k",
                "write -z -u 128k 64k", // may unmap
                "read -P 0 128k 64k",
                "discard 1M 64k",
                "flush",
            ],
        )
        .unwrap();
        // A second connection (fresh process) sees the same data.
        qemu_io(&uri, &["read -P 0xa5 256k 256k", "read -P 0x22 5M 8k"]).unwrap();
        // And over the unix socket.
        qemu_io(&s.unix_uri(name), &["read -P 0x11 3M 4096"]).unwrap();
    }
    // Unaligned I/O: byte granularity is advertised (minimum block size 1).
    qemu_io(
        &s.uri("dyn"),
        &["write -P 0x33 7 1000", "read -P 0x33 7 1000"],
    )
    .unwrap();
}

#[test]
fn qemu_img_convert_compare_map() {
    require_root();
    let s = Stord::start(&[dynamic("dst", "32MiB")]).unwrap();
    let dir = s.dir.path();
    let src = dir.join("src.img");
    ok(Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&src)
        .arg("32M"))
    .unwrap();
    // Data at 0..1M and 8M..9M, the rest sparse.
    qemu_io(
        &src.display().to_string(),
        &["write -P 0x42 0 1M", "write -P 0x24 8M 1M"],
    )
    .unwrap();
    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(s.uri("dst")))
    .unwrap();
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri("dst")))
    .unwrap();
    // The copy stayed sparse: qemu-img map over NBD (block status) shows data
    // only where the source had data.
    let map = ok(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(s.uri("dst")))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut data_bytes = 0u64;
    for e in v.as_array().unwrap() {
        if e["data"].as_bool() == Some(true) {
            data_bytes += e["length"].as_u64().unwrap();
        }
    }
    assert!(
        (2 << 20..=4 << 20).contains(&data_bytes),
        "expected about 2 MiB of data extents, map: {map}"
    );
    // Convert back out of stord and compare again.
    let back = dir.join("back.img");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(s.uri("dst"))
        .arg(&back))
    .unwrap();
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&back))
    .unwrap();
    // A differing image is reported as different (the comparison can fail).
    qemu_io(&s.uri("dst"), &["write -P 0x99 20M 512"]).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(s.uri("dst"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
