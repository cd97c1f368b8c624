//! vmm-shim's virtio-net on a real TAP, under the real KVM: a guest program sends an
//! ARP request through the device and waits for the kernel's ARP reply, which comes
//! back from the TAP's kernel side in a network namespace the test creates.

mod vmm_guest;

use std::time::Duration;

use integration_tests::{require_root, unique_name, Netns};
use vmm_guest::{arp_guest, assemble, run_guest, run_kernel, setup, LiveVm};

#[test]
fn guest_arp_exchange_through_a_tap() {
    let (_dir, elf) = setup("net", &arp_guest([10, 0, 0, 2], [10, 0, 0, 1]));
    let (ns, tap) = tap_host("vmn", "vt");
    let net = format!("tap={tap},mac=52:54:00:12:34:56");
    run_guest(
        &ns.exec_prefix(),
        &elf,
        &["--net", &net],
        Duration::from_secs(60),
    )
    .assert_clean_exit("NET OK\n");
}

/// A fresh namespace with a vnet_hdr TAP in it, up, at 10.0.0.1/24 and without IPv6
/// (no chatter for the guest).
fn tap_host(ns_prefix: &str, tap_prefix: &str) -> (Netns, String) {
    let ns = Netns::new(ns_prefix).unwrap();
    let tap = unique_name(tap_prefix);
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && \
         sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 && \
         ip addr add 10.0.0.1/24 dev {tap} && ip link set {tap} up"
    ))
    .unwrap();
    (ns, tap)
}

/// A fresh namespace with a bare vnet_hdr TAP in it, up.
fn bare_tap(ns_prefix: &str, tap_prefix: &str) -> (Netns, String) {
    let ns = Netns::new(ns_prefix).unwrap();
    let tap = unique_name(tap_prefix);
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && ip link set {tap} up"
    ))
    .unwrap();
    (ns, tap)
}

/// Starts `elf` on the TAP `tap` in `ns` and waits for it to print READY.
fn start_ready(ns: &Netns, tap: &str, elf: &std::path::Path) -> LiveVm {
    let mut vm = LiveVm::guest(&ns.exec_prefix(), elf, &["--net", &format!("tap={tap}")]);
    vm.expect_line("READY\n");
    vm
}

/// Asserts that vmm-shim's `net0-rx` thread uses (almost) no CPU for a second.
fn assert_rx_thread_idle(vm: &LiveVm, why: &str) {
    let pid = vm.pid();
    let before = thread_ticks(pid, "net0-rx").expect("net0-rx thread");
    std::thread::sleep(Duration::from_secs(1));
    let after = thread_ticks(pid, "net0-rx").expect("net0-rx thread");
    assert!(
        after - before <= 5,
        "RX thread used {} ticks in 1 s {why}",
        after - before
    );
}

#[test]
fn missing_tap_permission_or_bad_name_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "x", "_start: jmp reboot\n").unwrap();
    run_kernel(
        &[],
        &elf,
        &["--net", "tap=waytoolongname0123"],
        Duration::from_secs(30),
    )
    .assert_exit(2, "net[0]");
}

/// A guest that acks the low feature bits in `features`, sets DRIVER_OK, prints READY
/// and spins (the test stops it with SIGTERM).
fn offload_guest(features: u32) -> String {
    format!(
        r#"
_start:
    mov $MMIO0, %rbx
    NET_UP {features}, 0x200000, 0x210000
    PRINT ready
1:  pause
    jmp 1b
ready: .asciz "READY\n"
"#
    )
}

/// Boots an offload guest on a fresh TAP in a namespace and returns what
/// `ethtool -k` says about the TAP while the guest runs.
fn tap_offloads_with(features: u32) -> String {
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "offl", &offload_guest(features)).unwrap();
    let (ns, tap) = bare_tap("vmo", "vo");
    let vm = start_ready(&ns, &tap, &elf);
    let k = ns.sh(&format!("ethtool -k {tap}")).unwrap();
    vm.stop(Duration::from_secs(10)).assert_clean_exit("");
    k
}

fn feature_on(ethtool: &str, name: &str) -> bool {
    ethtool
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{name}:")))
        .is_some_and(|l| l.contains(": on"))
}

#[test]
fn tap_offloads_follow_what_the_guest_acked() {
    require_root();
    // CSUM | GUEST_CSUM | MAC | GUEST_TSO4 | GUEST_TSO6 | HOST_TSO4 | HOST_TSO6
    let on = tap_offloads_with(0x19a3);
    assert!(feature_on(&on, "tx-checksumming"), "{on}");
    assert!(feature_on(&on, "tx-tcp-segmentation"), "{on}");
    assert!(feature_on(&on, "tx-tcp6-segmentation"), "{on}");
    // Nothing acked: the TAP hands the guest only complete, checksummed frames.
    let off = tap_offloads_with(0);
    assert!(!feature_on(&off, "tx-checksumming"), "{off}");
    assert!(!feature_on(&off, "tx-tcp-segmentation"), "{off}");
}

/// Guest: sets the NIC up with no receive buffers, prints READY, waits for a console
/// byte, then posts four buffers and waits for a frame (the one parked meanwhile).
const DEFERRED_GUEST: &str = r#"
    .set RX, 0x200000
    .set TX, 0x210000
    .set BUFS, 0x220000
_start:
    mov $MMIO0, %rbx
    NET_UP 0, RX, TX
    PRINT ready
    WAIT_CONSOLE
    DSET RX, 0, BUFS, 2048, F_WRITE, 0
    DSET RX, 1, BUFS+0x800, 2048, F_WRITE, 0
    movw $0, RX+0x1000+4
    movw $1, RX+0x1000+6
    movw $2, RX+0x1000+2
    movl $0, 0x50(%rbx)
    mov $2000000, %ecx
3:  cmpw $0, RX+0x2000+2
    jne 4f
    pause
    loop 3b
    FAIL 'r'
4:  cmpw $0x0608, BUFS+24           # an ARP request from the namespace
    je 5f
    cmpw $0x0608, BUFS+0x800+24
    je 5f
    FAIL 'a'
5:  PASS "RX OK\n"
ready: .asciz "READY\n"
"#;

/// CPU time (user + system, in clock ticks) of the vmm-shim thread named `name`.
fn thread_ticks(pid: u32, name: &str) -> Option<u64> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?.path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
        }
    }
    None
}

#[test]
fn frames_wait_for_guest_buffers_without_spinning() {
    let (_dir, elf) = setup("defer", DEFERRED_GUEST);
    let (ns, tap) = tap_host("vmd", "vd");
    let mut vm = start_ready(&ns, &tap, &elf);
    // The namespace's kernel ARPs for the guest: frames with nowhere to go yet.
    let _ = ns.sh("ping -c 3 -i 0.2 -W 1 10.0.0.2 >/dev/null 2>&1");
    // While a frame is parked, the receive thread sleeps instead of polling the TAP.
    assert_rx_thread_idle(&vm, "while parked");
    vm.send(b"go");
    vm.finish(Duration::from_secs(60))
        .assert_clean_exit("RX OK\n");
}

#[test]
fn a_deleted_tap_does_not_spin_the_receive_thread() {
    let (_dir, elf) = setup("gone", &offload_guest(0));
    let (ns, tap) = bare_tap("vmg", "vg");
    let vm = start_ready(&ns, &tap, &elf);
    // Deleting the interface leaves the VMM's queue fd polling POLLERR and reading
    // EBADFD for ever: the receive thread must back off, not spin on it.
    ns.sh(&format!("ip link del {tap}")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_rx_thread_idle(&vm, "on a deleted TAP");
    vm.stop(Duration::from_secs(10)).assert_clean_exit("");
}
