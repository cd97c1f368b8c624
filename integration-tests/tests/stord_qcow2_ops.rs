//! stord's qcow2 disks, the operations beyond clones and snapshots, with
//! QEMU's tools as the judge: images `qemu-img convert -c` compressed are
//! served as QEMU reads them, and written as QEMU writes them (a write to a
//! compressed cluster allocates a normal one; `qemu-img check` clean after);
//! corrupt compressed data answers EIO for that cluster only; a qcow2 disk
//! grows (`disk resize`, while a client is attached) as `qemu-img resize`
//! grows one, and one of 512-byte clusters grows its refcount table past
//! what `qemu-img create` gave it; `disk flatten` of a disk a client writes to meanwhile loses no
//! acknowledged write; and a crash (SIGKILL at stord's `STORD_CRASH_AT`
//! points) between a change of the files and the catalog update leaves a
//! catalog that matches the files at the next start.

mod stord_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::require_root;
use stord_common::qcow2::*;
use stord_common::{ok, python, qemu_io, spawn_python, Stord, VERIFY, WRITER};

/// Full and partial clusters, zeroes and discards, over compressed data.
const WRITES: &[&str] = &[
    "write -P 0x31 0 64k",
    "write -P 0x32 100k 3k",
    "write -f -P 0x34 2047k 4k",
    "write -P 0x35 33M 512",
    "write -z 1M 128k",
    "write -z 33M 1k",
    "discard 40M 128k",
    "write -P 0x38 5M 700k",
    "flush",
];

/// A `disk list --json` entry without a chain (the key is left out).
fn no_chain(e: &serde_json::Value) -> bool {
    e["chain"].as_array().is_none_or(|a| a.is_empty())
}

/// A raw base imported as `golden`, and `vm`, a flattened (self-contained,
/// writable) qcow2 disk of its size.
fn golden_and_flat_vm(s: &Stord, work: &Path) -> std::path::PathBuf {
    let base = golden_and_clone(s, work);
    disk(s, &["flatten", "vm"]).unwrap();
    base
}

/// Puts `img` in place of disk `name`'s file (stord stopped).
fn place(s: &Stord, name: &str, img: &Path) {
    let dst = s.state().join(format!("disks/{name}.img"));
    std::fs::copy(img, &dst).unwrap();
}

#[test]
fn compressed_images_are_served_and_written_as_qemu_does() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mut s = Stord::start(&[]).unwrap();
    let base = golden_and_flat_vm(&s, work.path());
    let comp = work.path().join("comp.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-O", "qcow2"])
        .arg(&base)
        .arg(&comp))
    .unwrap();
    let map = ok(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&comp))
    .unwrap();
    assert!(map.contains("\"compressed\": true"), "{map}");
    // An import of a compressed image reads it through.
    disk(&s, &["import", "zgold", "--from", comp.to_str().unwrap()]).unwrap();
    same(&s.uri("zgold"), "raw", &comp);

    // A served disk whose file holds compressed clusters.
    stop(&mut s);
    place(&s, "vm", &comp);
    let mut bad = comp.clone();
    bad.set_file_name("bad.qcow2");
    std::fs::copy(&comp, &bad).unwrap();
    let e0 = {
        let b = std::fs::read(&bad).unwrap();
        let l2 = l2_of(&bad) as usize;
        u64::from_be_bytes(b[l2..l2 + 8].try_into().unwrap())
    };
    assert!(e0 & 1 << 62 != 0, "cluster 0 is compressed: {e0:#x}");
    patch(&bad, e0 & ((1 << 54) - 1), &[0xff; 16]);
    s.restart().unwrap();
    disk(&s, &["clone", "golden", "bad"]).unwrap();
    disk(&s, &["flatten", "bad"]).unwrap();
    stop(&mut s);
    place(&s, "bad", &bad);
    s.restart().unwrap();
    same(&s.uri("vm"), "raw", &comp);
    let m = ok(Command::new("nbdinfo").args(["--map", &s.uri("vm")])).unwrap();
    assert!(m.lines().any(|l| l.trim_end().ends_with("data")), "{m}");

    // Writes over compressed clusters, by stord and by QEMU on a copy.
    let r = work.path().join("ref.qcow2");
    std::fs::copy(&comp, &r).unwrap();
    qemu_io(&s.uri("vm"), WRITES).unwrap();
    qemu_io_local(&r, WRITES);
    same(&s.uri("vm"), "raw", &r);
    check_clean(&s.state().join("disks/vm.img"), true);

    // Corrupt compressed data: EIO on that cluster; the next reads; stord
    // serves on.
    let t = qemu_io_ro(&s.uri("bad"), "read 0 64k");
    assert!(t.contains("Input/output error"), "{t}");
    let t = qemu_io_ro(&s.uri("bad"), "read -P 0x11 64k 64k");
    assert!(t.contains("read 65536/65536") && !t.contains("fail"), "{t}");
    let t = qemu_io(&s.uri("vm"), &["read -P 0x31 0 64k"]).unwrap();
    assert!(t.contains("read 65536/65536"), "{t}");
    stop(&mut s);
    check_clean(&s.state().join("disks/vm.img"), false);
    same(
        s.state().join("disks/vm.img").to_str().unwrap(),
        "qcow2",
        &r,
    );
}

#[test]
fn a_qcow2_disk_grows_as_qemu_img_resize_grows_one() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mut s = Stord::start(&[]).unwrap();
    let base = golden_and_clone(&s, work.path());
    let a = ["write -P 0x51 0 128k", "write -P 0x52 33M 4k", "flush"];
    qemu_io(&s.uri("vm"), &a).unwrap();
    let r = reference(work.path(), "ref.qcow2", &base, "raw");
    qemu_io_local(&r, &a);
    // Grown while a client is attached, past what its L1 table covers.
    let held = attached(&s.uri("vm"));
    disk(&s, &["resize", "vm", "--size", "3GiB"]).unwrap();
    drop(held);
    assert!(!refused(&s, &["resize", "vm", "--size", "32MiB"]).is_empty());
    ok(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&r)
        .arg("3G"))
    .unwrap();
    let b = ["write -P 0x53 2560M 64k", "write -P 0x54 3071M 1M", "flush"];
    qemu_io(&s.uri("vm"), &b).unwrap();
    qemu_io_local(&r, &b);
    assert_eq!(s.disk_entry("vm")["size"], 3u64 << 30);
    same(&s.uri("vm"), "raw", &r);
    stop(&mut s);
    let vm = s.state().join("disks/vm.img");
    check_clean(&vm, false);
    let info = ok(Command::new("qemu-img").args(["info", "-U"]).arg(&vm)).unwrap();
    assert!(info.contains("virtual size: 3 GiB"), "{info}");
    same(vm.to_str().unwrap(), "qcow2", &r);
    s.restart().unwrap();
    assert_eq!(s.disk_entry("vm")["size"], 3u64 << 30);
}

/// A qcow2 disk of 512-byte clusters as `qemu-img create` makes one (a
/// refcount table of one cluster, which counts 8 MiB of file) takes writes
/// past that, and a grow whose L1 table (16 MiB) lies past the grown table
/// again: stord grows its refcount table each time, and QEMU finds the
/// image clean and equal to its own under the same commands.
#[test]
fn small_clusters_outgrow_the_refcount_table_and_it_grows() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let small = |name: &str| {
        let p = work.path().join(name);
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
            .arg(&p)
            .arg("64M"))
        .unwrap();
        p
    };
    let (img, r) = (small("small.qcow2"), small("ref.qcow2"));
    let mut s = Stord::start(&[]).unwrap();
    golden_and_flat_vm(&s, work.path());
    stop(&mut s);
    let vm = s.state().join("disks/vm.img");
    place(&s, "vm", &img);
    let reftable_clusters = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u32::from_be_bytes(b[56..60].try_into().unwrap())
    };
    assert_eq!(reftable_clusters(&vm), 1);
    s.restart().unwrap();
    let a = ["write -P 0x61 0 12M", "write -P 0x62 20M 1M", "flush"];
    qemu_io(&s.uri("vm"), &a).unwrap();
    qemu_io_local(&r, &a);
    disk(&s, &["resize", "vm", "--size", "64GiB"]).unwrap();
    ok(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&r)
        .arg("64G"))
    .unwrap();
    let b = [
        "write -P 0x63 40G 64k",
        "write -P 0x64 65535M 1M",
        "write -P 0x65 30M 8M",
        "flush",
    ];
    qemu_io(&s.uri("vm"), &b).unwrap();
    qemu_io_local(&r, &b);
    assert_eq!(s.disk_entry("vm")["size"], 64u64 << 30);
    // Through the export against the reference in 64 KiB clusters (QEMU
    // asks an NBD server for block status once per 32 KiB the 512-byte
    // reference maps: two million round trips).
    let r64 = work.path().join("ref64.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&r)
        .arg(&r64))
    .unwrap();
    same(&s.uri("vm"), "raw", &r64);
    check_clean(&vm, true);
    stop(&mut s);
    assert!(reftable_clusters(&vm) > 2, "the refcount table grew");
    check_clean(&vm, false);
    same(vm.to_str().unwrap(), "qcow2", &r);
    s.restart().unwrap();
    let t = qemu_io(&s.uri("vm"), &["read -P 0x64 65535M 1M"]).unwrap();
    assert!(t.contains("read 1048576/1048576"), "{t}");
}

#[test]
fn online_flatten_loses_no_acknowledged_write() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mut s = Stord::start(&[]).unwrap();
    golden_and_clone(&s, work.path());
    // The durability writer (FUA writes and flushes on two connections),
    // 4096 blocks 17 apart, while the disk is flattened under it.
    let args = ["0", "0", "4096", "17"].map(String::from);
    let args = [&[s.uri("vm")], &args[..]].concat();
    let mut w = spawn_python(s.dir.path(), WRITER, &args, Stdio::null()).unwrap();
    let stdout = w.child().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufRead::lines(std::io::BufReader::new(stdout))
            .map_while(Result::ok)
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    disk(&s, &["flatten", "vm"]).unwrap();
    let during = w.child().try_wait().unwrap().is_none();
    let st = w
        .wait_timeout(Duration::from_secs(120))
        .expect("writer ends");
    assert!(st.success(), "the writer failed");
    assert!(during, "the writer was done before the flatten was");
    let blocks = reader.join().unwrap();
    assert_eq!(blocks.len(), 4096);
    let acked = s.dir.path().join("acked.txt");
    let list: String = blocks.iter().map(|b| format!("0 {b}\n")).collect();
    std::fs::write(&acked, list).unwrap();
    verify_acked(&s, &acked);
    let e = s.disk_entry("vm");
    assert!(no_chain(&e), "{e}");
    let vm = s.state().join("disks/vm.img");
    assert!(!info_chain(&vm).contains("backing file"));
    check_clean(&vm, true);
    // Self-contained: the base goes, the disk reads the same.
    let before = work.path().join("before.raw");
    ok(Command::new("nbdcopy").arg(s.uri("vm")).arg(&before)).unwrap();
    disk(&s, &["delete", "golden"]).unwrap();
    stop(&mut s);
    check_clean(&vm, false);
    s.restart().unwrap();
    out_same_after_restart(&s, &before, &acked);
}

/// The disk `vm` reads as `before` and holds every block of `acked`.
fn out_same_after_restart(s: &Stord, before: &Path, acked: &Path) {
    same(&s.uri("vm"), "raw", &{
        let q = before.with_extension("qcow2");
        ok(Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(before)
            .arg(&q))
        .unwrap();
        q
    });
    verify_acked(s, acked);
}

/// Every block of `acked` (the writer's acknowledged blocks) reads back on
/// disk `vm`.
fn verify_acked(s: &Stord, acked: &Path) {
    let out = python(
        s.dir.path(),
        VERIFY,
        &[&s.uri("vm"), acked.to_str().unwrap()],
    )
    .unwrap();
    assert!(out.contains("bad []"), "{out}");
}

/// Runs `stord disk ARGS` with stord set to SIGKILL itself at `point`,
/// then starts it again as it was.
fn crash_at(s: &mut Stord, point: &str, args: &[&str]) {
    s.env = vec![("STORD_CRASH_AT".into(), point.into())];
    s.restart().unwrap();
    let mut a = vec!["disk"];
    a.extend_from_slice(args);
    let out = s.cli(&a);
    assert!(!out.status.success(), "{args:?} finished despite {point}");
    let st = s
        .child
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(10));
    assert!(st.is_some(), "stord did not die at {point}");
    assert!(s.log_text().contains("STORD_CRASH_AT"), "{}", s.log_text());
    s.env.clear();
    s.restart().unwrap();
    assert!(!s.state().join("change.json").exists());
    for f in std::fs::read_dir(s.state().join("disks")).unwrap() {
        let n = f.unwrap().file_name();
        assert!(!n.to_string_lossy().ends_with(".new"), "{n:?} left");
    }
}

/// What the catalog file says of disk `name`.
fn catalog_entry(s: &Stord, name: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.state().join("catalog.json")).unwrap()).unwrap();
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_crash_between_files_and_catalog_leaves_them_consistent() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mut s = Stord::start(&[]).unwrap();
    golden_and_clone(&s, work.path());
    let vm = s.state().join("disks/vm.img");
    let reads = |s: &Stord, p: &str| {
        qemu_io(&s.uri("vm"), &[&format!("read -P {p} 0 64k")]).unwrap();
    };
    qemu_io(&s.uri("vm"), &["write -P 0x51 0 64k", "flush"]).unwrap();

    // Before the first rename: undone.
    crash_at(&mut s, "snapshot-begun", &["snapshot", "vm", "s0"]);
    assert_eq!(s.disk_entry("vm")["chain"], serde_json::json!(["golden"]));
    assert!(catalog_entry(&s, "s0").is_null());
    assert!(!s.state().join("disks/s0.img").exists());
    reads(&s, "0x51");
    // Between the two renames, and after both: finished.
    crash_at(&mut s, "snapshot-renamed", &["snapshot", "vm", "s1"]);
    assert_eq!(
        s.disk_entry("vm")["chain"],
        serde_json::json!(["s1", "golden"])
    );
    assert_eq!(catalog_entry(&s, "s1")["snapshot_of"], "vm");
    reads(&s, "0x51");
    qemu_io(&s.uri("vm"), &["write -P 0x52 0 64k", "flush"]).unwrap();
    crash_at(&mut s, "snapshot", &["snapshot", "vm", "s2"]);
    let snaps = disk(&s, &["snapshots", "vm"]).unwrap();
    assert!(snaps.contains("s2") && snaps.contains("s1"), "{snaps}");
    assert_eq!(catalog_entry(&s, "vm")["base"], "s2");
    reads(&s, "0x52");
    check_clean(&vm, true);
    // Revert: the new file renamed over, the catalog not yet written.
    qemu_io(&s.uri("vm"), &["write -P 0x53 0 64k", "flush"]).unwrap();
    crash_at(&mut s, "replace", &["revert", "vm", "s1"]);
    assert_eq!(catalog_entry(&s, "vm")["base"], "s1");
    reads(&s, "0x51");
    // Online flatten: the header dropped the backing file.
    crash_at(&mut s, "flatten", &["flatten", "vm"]);
    assert!(catalog_entry(&s, "vm")["base"].is_null());
    assert!(no_chain(&s.disk_entry("vm")));
    assert!(!info_chain(&vm).contains("backing file"));
    reads(&s, "0x51");
    // Resize: the image grew, the catalog's size follows.
    crash_at(&mut s, "resize", &["resize", "vm", "--size", "1GiB"]);
    assert_eq!(catalog_entry(&s, "vm")["size"], 1u64 << 30);
    assert_eq!(s.disk_entry("vm")["size"], 1u64 << 30);
    reads(&s, "0x51");
    stop(&mut s);
    for f in ["vm.img", "s1.img", "s2.img"] {
        check_clean(&s.state().join("disks").join(f), false);
    }
}
