//! vmm-shim's virtio-net on a real TAP, under the real KVM: a guest program sends an
//! ARP request through the device and waits for the kernel's ARP reply, which comes
//! back from the TAP's kernel side in a network namespace the test creates.

mod vmm_guest;

use std::time::Duration;

use integration_tests::{require_root, unique_name, Netns};
use vmm_guest::{arp_guest, assemble, run_vmm};

#[test]
fn guest_arp_exchange_through_a_tap() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "net", &arp_guest([10, 0, 0, 2], [10, 0, 0, 1])).unwrap();
    let ns = Netns::new("vmn").unwrap();
    let tap = unique_name("vt");
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && \
         sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 && \
         ip addr add 10.0.0.1/24 dev {tap} && ip link set {tap} up"
    ))
    .unwrap();
    let net = format!("tap={tap},mac=52:54:00:12:34:56");
    let r = run_vmm(
        &["ip", "netns", "exec", ns.name()],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64M",
            "--net",
            &net,
        ],
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(r.serial, "NET OK\n", "stderr: {}", r.stderr);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
}

#[test]
fn missing_tap_permission_or_bad_name_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "x", "_start: jmp reboot\n").unwrap();
    let r = run_vmm(
        &[],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--net",
            "tap=waytoolongname0123",
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("net[0]"), "{}", r.stderr);
}

/// A guest that acks the low feature bits in `features`, sets DRIVER_OK, prints READY
/// and spins (the test stops it with SIGTERM).
fn offload_guest(features: u32) -> String {
    format!(
        r#"
_start:
    mov $MMIO0, %rbx
    mov ${features}, %r8d
    call dev_init
    xor %edi, %edi
    mov $0x200000, %esi
    call setup_queue
    mov $1, %edi
    mov $0x210000, %esi
    call setup_queue
    call driver_ok
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
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "offl", &offload_guest(features)).unwrap();
    let ns = Netns::new("vmo").unwrap();
    let tap = unique_name("vo");
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && ip link set {tap} up"
    ))
    .unwrap();
    let child = ns
        .command(&[
            integration_tests::bin("vmm-shim").to_str().unwrap(),
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64M",
            "--net",
            &format!("tap={tap}"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = integration_tests::ChildGuard::new(child);
    let mut line = String::new();
    BufReader::new(g.child().stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "READY\n");
    let k = ns.sh(&format!("ethtool -k {tap}")).unwrap();
    g.signal(libc::SIGTERM);
    assert_eq!(
        g.wait_timeout(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
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
