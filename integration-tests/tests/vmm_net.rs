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

/// Guest: sets the NIC up with no receive buffers, prints READY, waits for a console
/// byte, then posts four buffers and waits for a frame (the one parked meanwhile).
const DEFERRED_GUEST: &str = r#"
    .set RX, 0x200000
    .set TX, 0x210000
    .set BUFS, 0x220000
_start:
    mov $MMIO0, %rbx
    xor %r8d, %r8d
    call dev_init
    xor %edi, %edi
    mov $RX, %esi
    call setup_queue
    mov $1, %edi
    mov $TX, %esi
    call setup_queue
    call driver_ok
    PRINT ready
    mov $0x3fd, %dx
2:  in %dx, %al
    test $1, %al
    jz 2b
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
5:  PRINT okmsg
    jmp reboot
ready: .asciz "READY\n"
okmsg: .asciz "RX OK\n"
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
    use std::io::{BufRead, BufReader, Read, Write};
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "defer", DEFERRED_GUEST).unwrap();
    let ns = Netns::new("vmd").unwrap();
    let tap = unique_name("vd");
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && \
         sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 && \
         ip addr add 10.0.0.1/24 dev {tap} && ip link set {tap} up"
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
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = integration_tests::ChildGuard::new(child);
    let mut out = BufReader::new(g.child().stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "READY\n");
    // The namespace's kernel ARPs for the guest: frames with nowhere to go yet.
    let _ = ns.sh("ping -c 3 -i 0.2 -W 1 10.0.0.2 >/dev/null 2>&1");
    // While a frame is parked, the receive thread sleeps instead of polling the TAP.
    let pid = g.pid();
    let before = thread_ticks(pid, "net0-rx").expect("net0-rx thread");
    std::thread::sleep(Duration::from_secs(1));
    let after = thread_ticks(pid, "net0-rx").expect("net0-rx thread");
    assert!(
        after - before <= 5,
        "RX thread used {} ticks in 1 s while parked",
        after - before
    );
    g.child().stdin.as_mut().unwrap().write_all(b"go").unwrap();
    let st = g.wait_timeout(Duration::from_secs(60));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    g.child()
        .stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(rest, "RX OK\n", "stderr: {err}");
    assert_eq!(st.and_then(|s| s.code()), Some(0), "stderr: {err}");
}

#[test]
fn a_deleted_tap_does_not_spin_the_receive_thread() {
    use std::io::{BufRead, BufReader};
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "gone", &offload_guest(0)).unwrap();
    let ns = Netns::new("vmg").unwrap();
    let tap = unique_name("vg");
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
    // Deleting the interface leaves the VMM's queue fd polling POLLERR and reading
    // EBADFD for ever: the receive thread must back off, not spin on it.
    ns.sh(&format!("ip link del {tap}")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = g.pid();
    let before = thread_ticks(pid, "net0-rx").expect("net0-rx thread");
    std::thread::sleep(Duration::from_secs(1));
    let after = thread_ticks(pid, "net0-rx").expect("net0-rx thread");
    assert!(
        after - before <= 5,
        "RX thread used {} ticks in 1 s on a deleted TAP",
        after - before
    );
    g.signal(libc::SIGTERM);
    assert_eq!(
        g.wait_timeout(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}
