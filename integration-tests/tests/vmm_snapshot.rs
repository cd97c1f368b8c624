//! vmm-shim's snapshot and restore under the real KVM: a guest counts on its serial
//! port (dirtying a working set of its memory, and in one test writing each number
//! to its NBD disk); `vmm-shim ctl snapshot DIR` pauses it and writes its memory and
//! state; vmm-shim is killed; `vmm-shim --restore DIR` goes on from the next number,
//! with no gap and no repeat, on the serial port and on the disk. A snapshot of
//! another machine shape (memory, vCPUs, devices), of another version, or a corrupt
//! or truncated state or memory file is refused with a clear error, never a panic.
//! A guest that also sends each number in a frame through its NIC, restored on
//! another TAP, goes on sending there with no gap and no repeat, after the RARP
//! announces vmm-shim sends for it and the guest's own announce.

mod vmm_guest;

use std::path::Path;
use std::time::Duration;

use vmm_guest::capture::{BridgedTaps, Capture};
use vmm_guest::counter::{
    assert_announced_and_counting, assert_consecutive, assert_disk_counts, counter_net_program,
    counter_program, counts, ctl, curl, device, wait_count, ANNOUNCE_ETHERTYPE,
};
use vmm_guest::{run_vmm, setup, LiveVm, TcpDisk};

/// vmm-shim `--restore DIR` with 64 MiB, the console file and `extra` arguments.
fn restore_args<'a>(dir: &'a str, console: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    [
        &["--restore", dir, "--mem", "64M", "--console", console],
        extra,
    ]
    .concat()
}

/// Snapshots the VM behind `sock` into `snap` (stays paused), checks the answer
/// and that the count stopped.
fn snapshot(sock: &Path, snap: &Path, console: &Path) -> Vec<u64> {
    let (code, out) = ctl(sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"paused\""), "{out}");
    let (_, v) = curl(sock, "GET", "/vm", None);
    assert_eq!(v["state"], "paused", "{v}");
    std::thread::sleep(Duration::from_millis(300));
    let at = counts(console);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counts(console), at, "the guest counted while paused");
    assert_eq!(
        std::fs::metadata(snap.join("memory")).unwrap().len(),
        64 << 20
    );
    at
}

#[test]
fn count_goes_on_after_snapshot_kill_and_restore_on_serial_and_disk() {
    let (dir, elf) = setup("snap", &counter_program(512, true));
    let disk = TcpDisk::new(dir.path(), "d");
    let sock = dir.path().join("api.sock");
    let console = dir.path().join("console");
    let snap = dir.path().join("snap");
    let (s, c) = (sock.to_str().unwrap(), console.to_str().unwrap());
    let uri = disk.uri("d");
    let vm = LiveVm::guest(
        &[],
        &elf,
        &["--disk", &uri, "--api-sock", s, "--console", c],
    );
    wait_count(&console, 20);
    let before = snapshot(&sock, &snap, &console);
    vm.kill();
    assert_consecutive(&before);

    // Restored, with a new API socket: the count goes on from the next number.
    let sock2 = dir.path().join("api2.sock");
    let args = restore_args(
        snap.to_str().unwrap(),
        c,
        &["--disk", &uri, "--api-sock", sock2.to_str().unwrap()],
    );
    let vm = LiveVm::spawn(vmm_guest::vmm_command(&[], &args)).unwrap();
    let after = wait_count(&console, before.len() + 30);
    assert_consecutive(&after);
    let (_, v) = curl(&sock2, "GET", "/vm", None);
    assert_eq!(v["state"], "running", "{v}");
    // The disk has every number the guest printed, before and after.
    let r = vm.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    let printed = counts(&console);
    assert_consecutive(&printed);
    assert_disk_counts(&std::fs::read(&disk.img).unwrap(), &printed);

    // A second snapshot of the restored VM, resumed at once (`--resume`), also works.
    let vm = LiveVm::spawn(vmm_guest::vmm_command(&[], &args)).unwrap();
    wait_count(&console, printed.len() + 5);
    let snap2 = dir.path().join("snap2");
    let (code, out) = ctl(&sock2, &["snapshot", snap2.to_str().unwrap(), "--resume"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"running\""), "{out}");
    let n = counts(&console).len();
    wait_count(&console, n + 5);
    let r = vm.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
}

/// Runs `vmm-shim --restore` with `args`; asserts it exits 1 (not a panic, not a
/// running guest) with `needle` in its error.
fn refused(args: &[&str], needle: &str) {
    let r = run_vmm(&[], args, Duration::from_secs(30)).unwrap();
    assert!(!r.stderr.contains("panicked"), "{r}");
    r.assert_exit(1, needle);
    assert!(r.serial.is_empty(), "a refused restore ran the guest: {r}");
}

#[test]
fn other_shapes_versions_and_corrupt_files_are_refused() {
    let (dir, elf) = setup("snapbad", &counter_program(64, false));
    let sock = dir.path().join("api.sock");
    let console = dir.path().join("console");
    let snap = dir.path().join("snap");
    let (s, c) = (sock.to_str().unwrap(), console.to_str().unwrap());
    let vm = LiveVm::guest(&[], &elf, &["--api-sock", s, "--console", c]);
    wait_count(&console, 5);
    snapshot(&sock, &snap, &console);
    vm.kill();
    let d = snap.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();

    // Another machine shape.
    let mut args = restore_args(d, o, &[]);
    args[3] = "128M";
    refused(&args, "its memory is 64 MiB, this VM's 128 MiB");
    refused(
        &restore_args(d, o, &["--cpus", "2"]),
        "it has 1 vCPUs, this VM 2",
    );
    refused(
        &restore_args(d, o, &["--disk", "nbd://127.0.0.1:1/x"]),
        "its devices are [], this VM's [disk]",
    );

    // Another version, a flipped byte, a cut: each refused, naming the file.
    let state = snap.join("state");
    let good = std::fs::read(&state).unwrap();
    let with = |bytes: &[u8], needle: &str| {
        std::fs::write(&state, bytes).unwrap();
        refused(&restore_args(d, o, &[]), needle);
    };
    let mut v2 = good.clone();
    v2[16] = 9;
    with(&v2, "state format version 9; this vmm-shim reads version 1");
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    with(&flipped, "checksum mismatch");
    with(&good[..good.len() - 100], "truncated");
    with(&good[..10], "truncated");
    with(b"", "truncated");
    with(&[0xffu8; 64], "bad magic");
    std::fs::write(&state, &good).unwrap();

    let memory = snap.join("memory");
    let mem = std::fs::read(&memory).unwrap();
    std::fs::write(&memory, &mem[..mem.len() - 4096]).unwrap();
    refused(&restore_args(d, o, &[]), "truncated or another VM's");
    let mut m2 = mem.clone();
    m2[0x100_0000 + 77] ^= 1;
    std::fs::write(&memory, &m2).unwrap();
    refused(&restore_args(d, o, &[]), "the memory file is corrupt");
    std::fs::remove_file(&memory).unwrap();
    refused(&restore_args(d, o, &[]), "memory");

    // The good files still restore.
    std::fs::write(&memory, &mem).unwrap();
    let vm = LiveVm::spawn(vmm_guest::vmm_command(&[], &restore_args(d, c, &[]))).unwrap();
    let n = counts(&console).len();
    let after = wait_count(&console, n + 5);
    assert_consecutive(&after);
    let r = vm.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn a_nic_goes_on_after_restore_on_another_tap_which_announces_it() {
    const MAC: &str = "52:54:00:14:00:0c";
    let (dir, elf) = setup(
        "snapnic",
        &counter_net_program(64, false, [0x52, 0x54, 0, 0x14, 0, 0x0c]),
    );
    let taps = BridgedTaps::new();
    let cap_a = Capture::start(&taps.ns, &taps.a, dir.path());
    let cap_b = Capture::start(&taps.ns, &taps.b, dir.path());
    let sock = dir.path().join("api.sock");
    let console = dir.path().join("console");
    let snap = dir.path().join("snap");
    let (s, c) = (sock.to_str().unwrap(), console.to_str().unwrap());
    let nic_a = format!("tap={},mac={MAC}", taps.a);
    let vm = LiveVm::guest(
        &taps.ns.exec_prefix(),
        &elf,
        &["--api-sock", s, "--console", c, "--net", &nic_a],
    );
    wait_count(&console, 20);
    let before = snapshot(&sock, &snap, &console);
    vm.kill();

    // Restored on the other TAP (another host's, as it were); the MAC comes from
    // the snapshot.
    let sock2 = dir.path().join("api2.sock");
    let nic_b = format!("tap={}", taps.b);
    let args = restore_args(
        snap.to_str().unwrap(),
        c,
        &["--net", &nic_b, "--api-sock", sock2.to_str().unwrap()],
    );
    let vm = LiveVm::spawn(vmm_guest::vmm_command(&taps.ns.exec_prefix(), &args)).unwrap();
    let after = wait_count(&console, before.len() + 100);
    assert_consecutive(&after);
    assert_eq!(taps.fdb_port(MAC).as_deref(), Some(taps.b.as_str()));
    let net0 = device(&sock2, "net0");
    assert_eq!(net0["announce_frames"], 5, "{net0}");
    let r = vm.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    let b = cap_b.up_to(MAC, *counts(&console).last().unwrap());
    assert_announced_and_counting(&cap_a.from(MAC), &b, 5);
    let asked = b
        .iter()
        .filter(|s| s.ethertype == ANNOUNCE_ETHERTYPE)
        .count();
    assert_eq!(asked, 1, "the guest announced itself once: {b:?}");
}
