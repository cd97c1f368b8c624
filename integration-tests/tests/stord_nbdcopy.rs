//! stord with nbdcopy (multi-connection, parallel copies in both directions) and
//! fio's nbd engine (random I/O with verification).

mod stord_common;

use std::process::Command;

use integration_tests::require_root;
use stord_common::{dynamic, fixed, ok, Stord};

#[test]
fn nbdcopy_in_and_out_with_multi_conn() {
    require_root();
    let s = Stord::start(&[dynamic("d", "48MiB"), fixed("f", "48MiB")]).unwrap();
    let dir = s.dir.path();
    let src = dir.join("src.bin");
    // 48 MiB of pseudo-random data with a sparse gap in the middle.
    ok(Command::new("sh").arg("-c").arg(format!(
        "head -c 16M /dev/urandom > {p} && truncate -s 32M {p} && head -c 16M /dev/urandom >> {p}",
        p = src.display()
    )))
    .unwrap();
    for name in ["d", "f"] {
        ok(Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16", "--flush"])
            .arg(&src)
            .arg(s.uri(name)))
        .unwrap();
        let back = dir.join(format!("back-{name}.bin"));
        ok(Command::new("nbdcopy")
            .args(["--connections=4"])
            .arg(s.uri(name))
            .arg(&back))
        .unwrap();
        ok(Command::new("cmp").arg(&src).arg(&back)).unwrap();
    }
    // The dynamic copy stayed sparse on the host (nbdcopy zeroes holes with
    // WRITE_ZEROES, which punches them).
    let d = s.disk_entry("d");
    let allocated = d["allocated"].as_u64().unwrap();
    assert!(
        allocated <= 34 << 20,
        "dynamic disk allocated {allocated} bytes for 32 MiB of data"
    );
}

#[test]
fn fio_nbd_engine_verifies() {
    require_root();
    let s = Stord::start(&[dynamic("d", "64MiB")]).unwrap();
    let out = ok(Command::new("fio")
        .current_dir(s.dir.path())
        .args([
            "--verify_state_save=0",
            "--name=stord",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=16",
            "--numjobs=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--fsync=64",
            "--output-format=json",
        ])
        .arg(format!("--uri={}", s.uri("d"))))
    .unwrap();
    let start = out.find('{').unwrap();
    let v: serde_json::Value = serde_json::from_str(&out[start..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_u64(), Some(0), "{out}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
        "{out}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 16 << 20,
        "verify read everything back: {out}"
    );
}
