//! stord's qcow2 disks with QEMU's tools as the judge: imports, linked clones,
//! snapshots, revert and flatten, written through stord's NBD export by
//! qemu-io, then `qemu-img check` (no errors, no leaks), `qemu-img info
//! --backing-chain` and `qemu-img compare` against the same qemu-io commands
//! applied by QEMU itself to a local qcow2 on the same base. Hostile images
//! (a cluster past the end of the file, an L2 entry on the header's tables, a
//! backing chain that loops or leaves its directory, a huge size) are
//! refused at import with a clear error or answered with EIO, and stord keeps
//! serving. SIGKILL during flushed writes to a clone loses no acknowledged
//! write and leaves an image `qemu-img check` finds clean once stord has
//! opened it again (its leak repair).

mod stord_common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::require_root;
use stord_common::qcow2::*;
use stord_common::{crash_rounds, ok, qemu_io, Stord};

/// The commands of one test, applied to stord's export and to the reference:
/// full and partial clusters, over base data and not, FUA, zeroes
/// (cluster-aligned and not), discards, flushes.
const WRITES: &[&str] = &[
    "write -P 0x31 0 64k",
    "write -P 0x32 100k 3k",
    "write -P 0x33 1M 1M",
    "write -f -P 0x34 2047k 4k",
    "write -P 0x35 33M 512",
    "write -P 0x36 40M 200k",
    "flush",
    "write -z 1M 128k",
    "write -z 33M 1k",
    "write -P 0x37 60M 4k",
    "discard 40M 128k",
    "write -P 0x38 40M 512",
    "write -z 5M 64k",
    "flush",
];

#[test]
fn linked_clones_are_judged_by_qemu_img() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let base = base_file(work.path());
    let base_sum = sha(&base);
    let mut s = Stord::start(&[]).unwrap();
    disk(
        &s,
        &[
            "import",
            "golden",
            "--from",
            base.to_str().unwrap(),
            "--format",
            "raw",
        ],
    )
    .unwrap();
    let t = std::time::Instant::now();
    for c in ["vm1", "vm2"] {
        disk(&s, &["clone", "golden", c]).unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "two clones took {:?}",
        t.elapsed()
    );
    let list = disk(&s, &["list"]).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("vm1 ") && l.contains("qcow2") && l.contains("golden")),
        "{list}"
    );
    let vm1 = s.disk_entry("vm1");
    assert_eq!(vm1["format"], "qcow2");
    assert_eq!(vm1["chain"], serde_json::json!(["golden"]));
    assert!(refused(&s, &["clone", "vm1", "x"]).contains("read-only"));

    qemu_io(&s.uri("vm1"), WRITES).unwrap();
    let r = reference(work.path(), "ref.qcow2", &base, "raw");
    qemu_io_local(&r, WRITES);
    // Through stord's export while it runs, and the file after a flush.
    same(&s.uri("vm1"), "raw", &r);
    let state = s.state().join("disks");
    check_clean(&state.join("vm1.img"), true);
    // The other clone reads the base everywhere; so does the base.
    same(
        &s.uri("vm2"),
        "raw",
        &reference(work.path(), "plain.qcow2", &base, "raw"),
    );
    qemu_io(&s.uri("vm2"), &["write -P 0x77 0 1M", "flush"]).unwrap();
    qemu_io(&s.uri("vm1"), &["read -P 0x31 0 64k"]).unwrap();
    // BLOCK_STATUS through the chain: base data, a zeroed range, a hole.
    let map = ok(Command::new("nbdinfo").args(["--map", &s.uri("vm1")])).unwrap();
    assert!(map.lines().any(|l| l.contains("hole,zero")), "{map}");
    assert!(map.lines().any(|l| l.trim_end().ends_with("data")), "{map}");
    assert!(refused(&s, &["delete", "golden"]).contains("vm1"));

    stop(&mut s);
    let vm1 = state.join("vm1.img");
    check_clean(&vm1, false);
    check_clean(&state.join("vm2.img"), false);
    same(vm1.to_str().unwrap(), "qcow2", &r);
    let chain = info_chain(&vm1);
    assert!(chain.contains("backing file: golden.img"), "{chain}");
    assert!(chain.contains("file format: raw"), "{chain}");
    assert_eq!(sha(&state.join("golden.img")), base_sum, "the base changed");
    // nbdcopy reads a clone end to end as QEMU does.
    s.restart().unwrap();
    let copy = work.path().join("vm1.copy");
    ok(Command::new("nbdcopy").arg(s.uri("vm1")).arg(&copy)).unwrap();
    same(copy.to_str().unwrap(), "raw", &r);
}

#[test]
fn snapshot_revert_flatten_and_qcow2_imports() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let base = base_file(work.path());
    // A qcow2 chain made by QEMU: imported flattened.
    let low = reference(work.path(), "low.qcow2", &base, "raw");
    qemu_io_local(&low, &["write -P 0x41 4M 1M"]);
    let top = reference(work.path(), "top.qcow2", &low, "qcow2");
    qemu_io_local(&top, &["write -P 0x42 4M 64k", "write -z 0 64k"]);
    let mut s = Stord::start(&[]).unwrap();
    disk(&s, &["import", "gold", "--from", top.to_str().unwrap()]).unwrap();
    let state = s.state().join("disks");
    let gold = state.join("gold.img");
    let chain = info_chain(&gold);
    assert!(!chain.contains("backing file"), "{chain}");
    check_clean(&gold, true);
    same(gold.to_str().unwrap(), "qcow2", &top);

    disk(&s, &["clone", "gold", "vm"]).unwrap();
    let a = ["write -P 0x51 0 128k", "write -P 0x52 4M 4k", "flush"];
    qemu_io(&s.uri("vm"), &a).unwrap();
    disk_idle(&s, &["snapshot", "vm", "vm-s1"]);
    let snaps = disk(&s, &["snapshots", "vm"]).unwrap();
    assert!(snaps.contains("vm-s1"), "{snaps}");
    qemu_io(
        &s.uri("vm"),
        &["write -P 0x53 0 1M", "discard 4M 1M", "flush"],
    )
    .unwrap();
    let r1 = qemu_io_ro(&s.uri("vm-s1"), "read -P 0x51 0 128k");
    assert!(
        r1.contains("read 131072/131072") && !r1.contains("fail"),
        "{r1}"
    );
    let after = info_chain(&state.join("vm.img"));
    assert!(
        after.contains("vm-s1.img") && after.contains("gold.img"),
        "{after}"
    );
    check_clean(&state.join("vm.img"), true);

    // Revert: only what was written before the snapshot stays.
    disk_idle(&s, &["revert", "vm", "vm-s1"]);
    let r = reference(work.path(), "ref.qcow2", &top, "qcow2");
    qemu_io_local(&r, &a);
    same(&s.uri("vm"), "raw", &r);
    let held = attached(&s.uri("vm"));
    assert!(refused(&s, &["revert", "vm", "vm-s1"]).contains("connection"));
    drop(held);
    disk_idle(&s, &["flatten", "vm"]);
    let flat = info_chain(&state.join("vm.img"));
    assert!(!flat.contains("backing file"), "{flat}");
    same(&s.uri("vm"), "raw", &r);
    stop(&mut s);
    for f in ["vm.img", "vm-s1.img", "gold.img"] {
        check_clean(&state.join(f), false);
    }
    same(state.join("vm.img").to_str().unwrap(), "qcow2", &r);
}

#[test]
fn hostile_images_are_refused_or_answered_with_eio() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let s = Stord::start(&[]).unwrap();
    let import =
        |name: &str, p: &Path| refused(&s, &["import", name, "--from", p.to_str().unwrap()]);

    // A cluster past the end of the file.
    let past = qcow2_with_data(w, "past.qcow2");
    patch(
        &past,
        l2_of(&past) + 8,
        &(1u64 << 63 | 1 << 40).to_be_bytes(),
    );
    let e = import("past", &past);
    assert!(e.contains("past the end"), "{e}");
    // An L2 entry on the image's own L1 table.
    let meta = qcow2_with_data(w, "meta.qcow2");
    let l1 = u64::from_be_bytes(std::fs::read(&meta).unwrap()[40..48].try_into().unwrap());
    patch(&meta, l2_of(&meta), &(1u64 << 63 | l1).to_be_bytes());
    let e = import("meta", &meta);
    assert!(e.contains("on metadata"), "{e}");
    // A huge virtual size.
    let huge = qcow2_with_data(w, "huge.qcow2");
    patch(&huge, 24, &(1u64 << 62).to_be_bytes());
    let e = import("huge", &huge);
    assert!(e.contains("invalid qcow2 header"), "{e}");
    // A backing chain that loops, and one that leaves its directory.
    let a = qcow2_with_data(w, "a.qcow2");
    let b = qcow2_with_data(w, "b.qcow2");
    for (x, y) in [(&a, "b.qcow2"), (&b, "a.qcow2")] {
        ok(Command::new("qemu-img")
            .args(["rebase", "-u", "-F", "qcow2", "-b", y])
            .arg(x))
        .unwrap();
    }
    let e = import("loop", &a);
    assert!(e.contains("loops"), "{e}");
    std::fs::create_dir(w.join("sub")).unwrap();
    std::fs::write(w.join("secret.raw"), vec![0x99u8; 8 << 20]).unwrap();
    let esc = qcow2_with_data(&w.join("sub"), "esc.qcow2");
    ok(Command::new("qemu-img")
        .args(["rebase", "-u", "-F", "raw", "-b", "../secret.raw"])
        .arg(&esc))
    .unwrap();
    let e = import("esc", &esc);
    assert!(e.contains("backing file refused"), "{e}");
    assert!(!disk(&s, &["list"]).unwrap().contains("esc"));

    // A served image whose L2 table is corrupted before it is read: EIO for
    // that cluster, the rest reads, and stord serves on.
    let good = qcow2_with_data(w, "good.qcow2");
    disk(&s, &["import", "g", "--from", good.to_str().unwrap()]).unwrap();
    let mut s = s;
    stop(&mut s);
    let g = s.state().join("disks/g.img");
    patch(&g, l2_of(&g) + 8, &(1u64 << 63 | 1 << 40).to_be_bytes());
    s.restart().unwrap();
    for range in ["0 64k", "128k 64k"] {
        let t = qemu_io_ro(&s.uri("g"), &format!("read -P 0x61 {range}"));
        assert!(t.contains("read 65536/65536") && !t.contains("fail"), "{t}");
    }
    let text = qemu_io_ro(&s.uri("g"), "read 64k 64k");
    assert!(text.contains("Input/output error"), "{text}");
    let t = qemu_io_ro(&s.uri("g"), "read -P 0x61 0 64k");
    assert!(t.contains("read 65536/65536"), "{t}");
    assert!(disk(&s, &["list"]).unwrap().contains("g "));
}

/// SIGKILL during flushed writes to a linked clone (each write a new cluster,
/// copied on write from the base): no acknowledged write is lost, and once
/// stord has reopened the clone (freeing what the crash leaked) `qemu-img
/// check` is clean. Rounds: `STORD_QCOW2_CRASH_ROUNDS` (default 4, at most 4).
#[test]
fn sigkill_during_flushed_writes_to_a_clone() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let base = base_file(work.path());
    let mut s = Stord::start(&[]).unwrap();
    disk(&s, &["import", "golden", "--from", base.to_str().unwrap()]).unwrap();
    disk(&s, &["clone", "golden", "vm"]).unwrap();
    let rounds = std::env::var("STORD_QCOW2_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let img = s.state().join("disks/vm.img");
    crash_rounds(&mut s, "vm", rounds, 17, |_, _| check_clean(&img, true));
    stop(&mut s);
    check_clean(&img, false);
}

/// Ten linked clones of one 4 GiB base, each written differently (partial
/// clusters over the base's data, and far out): each reads its own writes and
/// the base's data where the others wrote; the base file is unchanged.
#[test]
fn ten_clones_of_a_4gib_base() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("big.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(4 << 30).unwrap();
    f.write_all_at(&vec![0x11; 8 << 20], 0).unwrap();
    f.write_all_at(&vec![0x22; 4 << 20], 2 << 30).unwrap();
    drop(f);
    let mut s = Stord::start(&[]).unwrap();
    disk(
        &s,
        &[
            "import",
            "big",
            "--from",
            base.to_str().unwrap(),
            "--format",
            "raw",
        ],
    )
    .unwrap();
    let sum = sha(&s.state().join("disks/big.img"));
    let mine = |i: u64| {
        [
            format!("{} 3000", i * 512 * 1024 + 1000),
            format!("{} 4096", (2u64 << 30) + i * 4096 * 3),
            format!("{} 64k", (3u64 << 30) + i * (64 << 20)),
        ]
    };
    for i in 0..10u64 {
        let name = format!("c{i}");
        disk(&s, &["clone", "big", &name]).unwrap();
        let cmds: Vec<String> = mine(i)
            .iter()
            .map(|r| format!("write -P {} {r}", 0x40 + i))
            .chain(["flush".to_string()])
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&s.uri(&name), &cmds).unwrap();
    }
    for i in 0..10u64 {
        let mut cmds: Vec<String> = mine(i)
            .iter()
            .map(|r| format!("read -P {} {r}", 0x40 + i))
            .collect();
        let j = (i + 1) % 10;
        let [low, mid, far] = mine(j);
        cmds.push(format!("read -P 0x11 {low}"));
        cmds.push(format!("read -P 0x22 {mid}"));
        cmds.push(format!("read -P 0 {far}"));
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&s.uri(&format!("c{i}")), &cmds).unwrap();
    }
    stop(&mut s);
    for i in 0..10 {
        check_clean(&s.state().join(format!("disks/c{i}.img")), false);
    }
    assert_eq!(
        sha(&s.state().join("disks/big.img")),
        sum,
        "the base changed"
    );
}
