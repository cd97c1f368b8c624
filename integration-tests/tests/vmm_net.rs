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
