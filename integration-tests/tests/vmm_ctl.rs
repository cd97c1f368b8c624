//! vmm-shim's control API (`--api-sock`) under the real KVM, driven by curl
//! (`--unix-socket`, a client nobody here wrote) and by `vmm-shim ctl`: a guest that
//! counts on its serial port stops counting while paused and goes on from the next
//! number when resumed, with no gap and no repeat; `GET /vm` shows the state, the
//! vCPUs, the memory and the device counters (virtio-blk reads and writes,
//! virtio-net packets and bytes each way); malformed, oversized and slow requests
//! are refused with a JSON error and counted, and the guest keeps counting.

mod vmm_guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use integration_tests::{unique_name, Netns};
use serde_json::Value;
use vmm_guest::counter::{self, assert_consecutive, counts, curl, wait_count};
use vmm_guest::{arp_guest, setup, setup_with_disk, LiveVm};

/// Sends raw bytes on the API socket, returns the whole answer.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `vmm-shim ctl --api-sock SOCK VERB`.
fn ctl(sock: &Path, verb: &str) -> (Option<i32>, String) {
    counter::ctl(sock, &[verb])
}

#[test]
fn pause_stops_the_count_resume_goes_on_and_bad_requests_leave_the_guest_alone() {
    let (dir, elf) = setup("ctl", &counter::counter());
    let sock = dir.path().join("api.sock");
    let console = dir.path().join("console");
    let (s, c) = (sock.to_str().unwrap(), console.to_str().unwrap());
    let vm = LiveVm::guest(&[], &elf, &["--api-sock", s, "--console", c]);
    wait_count(&console, 5);

    let (code, v) = curl(&sock, "GET", "/vm", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpus"], 1);
    assert_eq!(v["memory_bytes"], 64 << 20);

    let (code, v) = curl(&sock, "PATCH", "/vm", Some(r#"{"state":"paused"}"#));
    assert_eq!((code, &v["state"]), (200, &Value::from("paused")), "{v}");
    // A line being written at the pause may still end; after that nothing moves.
    std::thread::sleep(Duration::from_millis(100));
    let at_pause = counts(&console);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(counts(&console), at_pause, "the guest counted while paused");
    let (code, out) = ctl(&sock, "status");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"paused\""), "{out}");

    let (code, out) = ctl(&sock, "resume");
    assert_eq!(code, Some(0), "{out}");
    let after = wait_count(&console, at_pause.len() + 5);
    assert_consecutive(&after);

    // Hostile clients: garbage, an oversized body, a head that never ends, a body
    // that never comes, a bad state; each gets a JSON error.
    assert!(raw(&sock, b"\x01\x02 garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    let big = format!(r#"{{"state":"{}"}}"#, "x".repeat(64 * 1024));
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(&big)).0, 413);
    assert!(raw(&sock, b"GET /vm HTTP/1.1\r\nX: slow").starts_with("HTTP/1.1 408"));
    let slow_body = b"PATCH /vm HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"st";
    assert!(raw(&sock, slow_body).starts_with("HTTP/1.1 408"));
    let (code, v) = curl(&sock, "PATCH", "/vm", Some(r#"{"state":"frozen"}"#));
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("frozen"), "{v}");
    assert_eq!(curl(&sock, "DELETE", "/vm", None).0, 405);
    assert_eq!(curl(&sock, "GET", "/nothing", None).0, 404);

    let (_, v) = curl(&sock, "GET", "/vm", None);
    assert_eq!(v["state"], "running", "{v}");
    let r = &v["api"]["refused"];
    assert_eq!(r["bad_request"], 2, "{v}");
    assert_eq!(r["body_too_large"], 1, "{v}");
    assert_eq!(r["timeout"], 2, "{v}");
    assert_eq!(r["bad_method"], 1, "{v}");
    assert_eq!(r["not_found"], 1, "{v}");
    let n = counts(&console).len();
    let last = wait_count(&console, n + 5);
    assert_consecutive(&last);

    let r = vm.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!sock.exists(), "the API socket is removed at exit");
}

/// Writes sector 2 and reads it back, says so, waits for a console byte.
const DISK_GUEST: &str = r#"
_start:
    DISK0_UP
    BLK_HDR 1, $2
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_STATUS STATUS, 0, 'w'
    READ1 RING, HDR, RDATA, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_STATUS STATUS, 0, 'r'
    PRINT rw
    WAIT_CONSOLE
    PASS "bye\n"
rw: .asciz "written, read\n"
"#;

fn device<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

#[test]
fn get_vm_shows_disk_and_nic_counters() {
    let (dir, elf, nbd) = setup_with_disk("ctlblk", DISK_GUEST);
    let sock = dir.path().join("api.sock");
    let s = sock.to_str().unwrap();
    let mut vm = LiveVm::guest(&[], &elf, &["--disk", &nbd.uri("d"), "--api-sock", s]);
    vm.expect_line("written, read\n");
    let (_, v) = curl(&sock, "GET", "/vm", None);
    let blk = device(&v, "blk0");
    assert_eq!(blk["type"], "virtio-blk");
    assert_eq!(
        (&blk["reads"], &blk["writes"]),
        (&1.into(), &1.into()),
        "{v}"
    );
    vm.send(b"x");
    vm.finish(Duration::from_secs(30))
        .assert_clean_exit("bye\n");

    // A NIC: the ARP guest's request goes out, the kernel's reply comes in.
    let src = arp_guest([10, 0, 0, 2], [10, 0, 0, 1]).replace(
        "PASS \"NET OK\\n\"",
        "PRINT netok\n    WAIT_CONSOLE\n    PASS \"done\\n\"\nnetok: .asciz \"NET OK\\n\"",
    );
    let (dir, elf) = setup("ctlnet", &src);
    let sock = dir.path().join("api.sock");
    let ns = Netns::new("vctl").unwrap();
    let tap = unique_name("vc");
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && \
         sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 && \
         ip addr add 10.0.0.1/24 dev {tap} && ip link set {tap} up"
    ))
    .unwrap();
    let net = format!("tap={tap},mac=52:54:00:12:34:56");
    let s = sock.to_str().unwrap();
    let mut vm = LiveVm::guest(&ns.exec_prefix(), &elf, &["--net", &net, "--api-sock", s]);
    vm.expect_line("NET OK\n");
    let (_, v) = curl(&sock, "GET", "/vm", None);
    let n = device(&v, "net0");
    assert_eq!(n["type"], "virtio-net");
    let (txp, txb) = (
        n["tx_packets"].as_u64().unwrap(),
        n["tx_bytes"].as_u64().unwrap(),
    );
    let (rxp, rxb) = (
        n["rx_packets"].as_u64().unwrap(),
        n["rx_bytes"].as_u64().unwrap(),
    );
    assert!(
        txp >= 1 && txb == 42 * txp,
        "ARP requests are 42 bytes: {n}"
    );
    assert!(rxp >= 1 && rxb >= 42 * rxp, "the ARP reply came in: {n}");
    vm.send(b"x");
    vm.finish(Duration::from_secs(30))
        .assert_clean_exit("done\n");
}

#[test]
fn ctl_without_a_vm_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = ctl(&dir.path().join("none.sock"), "status");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("none.sock"), "{out}");
}
