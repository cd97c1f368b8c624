//! Bounded work, ports, the control socket and config (issue 11, items 9, 10, 12,
//! 13, 14), end to end against a real netd: each attack is refused or bounded, the
//! counter that says so is read through the CLI, and an honest peer keeps working in
//! the same test.
//!
//! - a TCP super-frame with segment size 1 from a `vm` port (the test plays the VMM:
//!   it opens the TAP with IFF_VNET_HDR and writes the frame) is dropped on ingress
//!   (`drop_gso`) instead of becoming 60,000 frames, while two guests keep pinging;
//! - a stream peer that never reads, while two guests run iperf3 and ping through a
//!   flood that reaches it: they keep working, its drops count as `drop_full`, and
//!   it stays connected;
//! - the control socket: mode 0660 and `control_group`, a connection cap, an idle
//!   timeout, counted in `netd control`;
//! - `port add --kind vm` on a veth is refused; a stream port on a regular file or
//!   on a socket another program listens on is refused and the file is kept;
//! - the hostonly host TAP has forwarding off: on a host with `ip_forward = 1` its
//!   guest still reaches nothing beyond the host;
//! - configs with overflowing subnets or an uplink naming another network's TAP are
//!   refused with errors naming the key.
//!
//! Names (namespaces, interfaces) start with `ab`, unique to this file. The two
//! traffic tests take a lock so they do not share the CPUs with each other.

mod netd_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::{bin, run_failing, unique_name, wait_until, ChildGuard, Netns};
use netd_common::*;

static TRAFFIC: Mutex<()> = Mutex::new(());

fn traffic_lock() -> std::sync::MutexGuard<'static, ()> {
    TRAFFIC.lock().unwrap_or_else(|e| e.into_inner())
}

/// Plays a VMM on TAP argv[1]: opens it with IFF_VNET_HDR (creating it), says
/// READY, then for each stdin line `N MSS PAYLOAD` writes N broadcast TCP/IPv4
/// super-frames of PAYLOAD bytes with segment size MSS, and says DONE.
const VMM_PY: &str = r#"
import fcntl, os, struct, sys, time
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, TUNSETIFF = 0x0002, 0x1000, 0x4000, 0x400454ca
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", sys.argv[1].encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
print("READY", flush=True)

def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff

def frame(mss, plen):
    eth = b"\xff" * 6 + bytes([2, 0, 0, 0, 0xab, 1]) + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + plen, 1, 0, 64, 6, 0,
                     bytes([10, 171, 0, 9]), bytes([10, 171, 0, 10]))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1000, 0, 5 << 4, 0x10, 65535, 0, 0)
    # flags NEEDS_CSUM, gso TCPV4, hdr_len, gso_size, csum_start, csum_offset
    vnet = struct.pack("<BBHHHH", 1, 1, 54, mss, 34, 16)
    return vnet + eth + ip + tcp + bytes(plen)

for line in sys.stdin:
    n, mss, plen = (int(x) for x in line.split())
    f = frame(mss, plen)
    for _ in range(n):
        os.write(fd, f)
        # Paced, so that the kernel's socket buffer in front of netd keeps them.
        time.sleep(0.003)
    print("DONE", flush=True)
"#;

/// Connects to the unix socket argv[1] with a tiny receive buffer, says CONNECTED
/// and never reads.
const SLOW_PEER_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(sys.argv[1])
print("CONNECTED", flush=True)
time.sleep(120)
"#;

/// Sends 1400-byte UDP datagrams to argv[1] port 9 for argv[2] seconds, about
/// 100 Mbit/s: far more than a peer that never reads can take, and leaving the CPU
/// to the honest traffic.
const FLOOD_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, d = time.time() + float(sys.argv[2]), b"x" * 1400
while time.time() < end:
    for _ in range(20):
        try:
            s.sendto(d, (sys.argv[1], 9))
        except OSError:
            pass
    time.sleep(0.002)
"#;

/// Listens on the unix socket argv[1], says LISTENING, and keeps it.
const LISTENER_PY: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(8)
print("LISTENING", flush=True)
time.sleep(120)
"#;

/// A python script in `ns` with stdin and stdout piped; waits for its first line
/// to be `ready`.
struct Py {
    _guard: ChildGuard,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Py {
    fn start(ns: &Netns, dir: &Path, script: &str, args: &[&str], ready: &str) -> Result<Py> {
        let path = dir.join(format!("{}.py", unique_name("py")));
        std::fs::write(&path, script)?;
        let mut argv = vec!["python3", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut child = ns
            .command(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn python3")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut py = Py {
            _guard: ChildGuard::new(child),
            stdin,
            stdout,
        };
        py.expect(ready)?;
        Ok(py)
    }

    fn expect(&mut self, what: &str) -> Result<()> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        anyhow::ensure!(line.trim() == what, "python said {line:?}, not {what}");
        Ok(())
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }
}

fn count(c: &serde_json::Value, key: &str) -> u64 {
    c[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {key} in {c}"))
}

#[test]
fn a_gso_frame_with_segment_size_1_is_dropped_and_counted() -> Result<()> {
    let _l = traffic_lock();
    let dir = root_tempdir();
    let cable = stream_port("cable", &dir.path().join("cable.sock"));
    let (host, netd, [a, _b]) =
        lan_of_two_and(dir.path(), ["abh", "aba", "abb"], "10.171.0", &cable)?;
    assert!(ping_retry(&a, "10.171.0.2", 5), "a pings b before");

    // The test is the VMM: it holds the TAP (vnet headers on), netd attaches to it.
    let tap = unique_name("abv");
    let mut vmm = Py::start(&host, dir.path(), VMM_PY, &[&tap], "READY")?;
    add_vm_port(&netd, "lan", &tap, &["--name", "evil"])?;
    let cable0 = netd.counters("lan", "cable")?;
    let b0 = netd.counters("lan", "b")?;

    // 200 super-frames of 60,000 bytes with segment size 1: 12 million frames for
    // the stream port (no vnet: netd would segment them) if they were taken.
    let ping = a.spawn(&["ping", "-c", "20", "-i", "0.1", "-W", "1", "10.171.0.2"])?;
    vmm.send("200 1 60000")?;
    vmm.expect("DONE")?;
    drop(ping);
    // The kernel may drop a few before netd reads them (its socket buffer holds
    // only a few such frames); every one netd read is dropped and counted.
    std::thread::sleep(Duration::from_millis(300));
    let evil = netd.counters("lan", "evil")?;
    eprintln!("evil: {evil}");
    let refused = count(&evil, "drop_gso");
    assert!(refused >= 100, "dropped and counted: {evil}");
    assert_eq!(count(&evil, "rx_frames"), 0, "none switched: {evil}");
    let cable1 = netd.counters("lan", "cable")?;
    let b1 = netd.counters("lan", "b")?;
    let sent = |c0: &serde_json::Value, c1: &serde_json::Value| {
        ["tx_frames", "drop_down", "drop_full", "drop_offload"]
            .iter()
            .map(|k| count(c1, k) - count(c0, k))
            .sum::<u64>()
    };
    // Only the pings' ARP broadcasts (if any) reached the others.
    assert!(sent(&cable0, &cable1) < 100, "cable: {cable1}");
    assert!(
        count(&b1, "tx_bytes") - count(&b0, "tx_bytes") < 100_000,
        "b: {b1}"
    );
    assert!(ping_retry(&a, "10.171.0.2", 3), "a still pings b");

    // An honest super-frame (segment size 1448) from the same port goes through,
    // cut into 3 segments for the stream port.
    vmm.send("1 1448 3000")?;
    vmm.expect("DONE")?;
    assert!(
        wait_until(Duration::from_secs(5), || netd
            .counters("lan", "cable")
            .map(|c| sent(&cable1, &c) >= 3)
            .unwrap_or(false)),
        "honest GSO frame segmented for the stream port: {}",
        netd.counters("lan", "cable")?
    );
    let evil = netd.counters("lan", "evil")?;
    assert_eq!(count(&evil, "drop_gso"), refused, "{evil}");
    assert_eq!(count(&evil, "rx_frames"), 1, "{evil}");
    let table = netd.cli(&["port", "list", "lan", "--drops"])?;
    assert!(table.contains("GSO"), "the CLI shows the counter:\n{table}");
    assert!(netd.stop());
    Ok(())
}

#[test]
fn a_stream_peer_that_never_reads_loses_only_its_own_frames() -> Result<()> {
    let _l = traffic_lock();
    let dir = root_tempdir();
    let slow = dir.path().join("slow.sock");
    let (host, netd, [a, b]) = lan_of_two_and(
        dir.path(),
        ["abi", "abc", "abd"],
        "10.172.0",
        &stream_port("slow", &slow),
    )?;
    let _peer = Py::start(
        &host,
        dir.path(),
        SLOW_PEER_PY,
        &[slow.to_str().unwrap()],
        "CONNECTED",
    )?;
    assert!(ping_retry(&a, "10.172.0.2", 5), "a pings b");
    // Frames flooded before the peer connected counted as drop_down; from now on
    // it is connected.
    let s0 = netd.counters("lan", "slow")?;
    // A destination nobody has: its frames are flooded, to the slow peer too.
    a.exec(&[
        "ip",
        "neigh",
        "add",
        "10.172.0.99",
        "lladdr",
        "02:00:00:ab:00:99",
        "dev",
        &a.tap,
    ])?;
    let flood_path = dir.path().join("flood.py");
    std::fs::write(&flood_path, FLOOD_PY)?;
    let _flood = a.spawn(&["python3", flood_path.to_str().unwrap(), "10.172.0.99", "8"])?;
    assert!(
        wait_until(Duration::from_secs(5), || netd
            .counters("lan", "slow")
            .map(|c| count(&c, "drop_full") > 0)
            .unwrap_or(false)),
        "the slow peer's queue fills: {}",
        netd.counters("lan", "slow")?
    );
    // Meanwhile the others: TCP at full rate and pings.
    let bps = iperf3_bps(&a, &b, "10.172.0.2")?;
    eprintln!(
        "iperf3 a -> b beside a stuck stream peer: {:.2} Gbit/s",
        bps / 1e9
    );
    assert!(bps > 20e6, "TCP between the others works, got {bps}");
    let out = a.exec(&["ping", "-c", "10", "-i", "0.1", "-W", "1", "10.172.0.2"])?;
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains(" 0% packet loss"), "pings unaffected:\n{out}");
    let s = netd.counters("lan", "slow")?;
    eprintln!("slow: {s}");
    assert!(count(&s, "drop_full") > 1000, "{s}");
    // It was never disconnected (a send timeout would have dropped it: then
    // its frames would count as drop_down).
    assert_eq!(count(&s, "drop_down"), count(&s0, "drop_down"), "{s}");
    let log = netd.log();
    assert!(
        !log.contains("stream peer left"),
        "the slow peer stayed:\n{log}"
    );
    assert!(netd.stop());
    Ok(())
}

#[test]
fn the_control_socket_is_0660_capped_and_closes_idle_connections() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = root_tempdir();
    let keys =
        "control_group = \"daemon\"\ncontrol_max_connections = 3\ncontrol_idle_timeout = 10\n";
    let (_host, netd) = start_netd(
        dir.path(),
        "abj",
        &format!("{keys}{}", network("lan", "internal", "")),
    )?;
    let md = std::fs::symlink_metadata(&netd.control)?;
    assert_eq!(md.permissions().mode() & 0o777, 0o660, "mode");
    assert_eq!(md.gid(), 1, "group daemon");
    assert_eq!(md.uid(), 0, "owner root");

    // Three connections that send nothing fill the cap (once netd has taken them:
    // it logs each with its peer credentials).
    let accepted = || netd.log().matches("control connection").count();
    let before = accepted();
    let holders: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&netd.control))
        .collect::<std::io::Result<_>>()?;
    assert!(
        wait_until(Duration::from_secs(3), || accepted() >= before + 3),
        "holders accepted"
    );
    let err = cli_fails(&netd, &["net", "list"]);
    assert!(err.contains("too many control connections"), "{err}");
    // After the idle timeout netd has closed them, and told them why.
    for mut h in holders {
        h.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut s = String::new();
        h.read_to_string(&mut s)?;
        assert!(s.contains("no request for 10 s"), "{s}");
    }
    let stats = netd.cli_json(&["control"])?;
    eprintln!("control: {stats}");
    assert_eq!(count(&stats, "refused_full"), 1, "{stats}");
    assert_eq!(count(&stats, "closed_idle"), 3, "{stats}");
    assert_eq!(count(&stats, "max_connections"), 3, "{stats}");
    assert!(
        netd.cli(&["net", "list"])?.contains("lan"),
        "honest client served"
    );
    let log = netd.log();
    assert!(
        log.contains("control connection") && log.contains("uid"),
        "peer credentials logged"
    );
    assert!(netd.stop());
    assert!(!netd_control_exists(dir.path()), "socket removed on exit");
    Ok(())
}

fn netd_control_exists(dir: &Path) -> bool {
    dir.join("control.sock").exists()
}

#[test]
fn a_vm_port_takes_a_tap_only_and_a_stream_port_never_takes_a_file() -> Result<()> {
    let dir = root_tempdir();
    let (host, netd) = start_netd(dir.path(), "abk", &network("lan", "internal", ""))?;
    // A veth in netd's namespace (a host link): refused, and left as it is.
    let (v0, v1) = (unique_name("abe"), unique_name("abf"));
    host.exec(&[
        "ip", "link", "add", &v0, "type", "veth", "peer", "name", &v1,
    ])?;
    let err = cli_fails(
        &netd,
        &["port", "add", "lan", "--kind", "vm", "--ifname", &v0],
    );
    assert!(err.contains("is not a TAP"), "{err}");
    assert!(host.sh(&format!("ip -o link show {v0}"))?.contains(&v0));
    // A vm port on a new TAP works.
    let tap = unique_name("abt");
    add_vm_port(&netd, "lan", &tap, &[])?;
    let ports = netd.cli_json(&["port", "list", "lan"])?;
    assert!(ports.to_string().contains(&tap), "{ports}");
    assert!(!ports.to_string().contains(&v0), "{ports}");

    // A regular file where a stream port's socket would go: refused, kept.
    let file = dir.path().join("precious");
    std::fs::write(&file, b"keep me")?;
    let f = file.to_str().unwrap();
    let err = cli_fails(
        &netd,
        &["port", "add", "lan", "--kind", "stream", "--path", f],
    );
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file)?, b"keep me");
    // A socket another program listens on: refused, and it still works.
    let other = dir.path().join("other.sock");
    let o = other.to_str().unwrap();
    let _listener = Py::start(&host, dir.path(), LISTENER_PY, &[o], "LISTENING")?;
    let err = cli_fails(
        &netd,
        &["port", "add", "lan", "--kind", "stream", "--path", o],
    );
    assert!(err.contains("listens on"), "{err}");
    assert!(
        UnixStream::connect(&other).is_ok(),
        "the other program's socket works"
    );
    // A free path works, and its socket goes with the port.
    let mine = dir.path().join("mine.sock");
    let m = mine.to_str().unwrap();
    netd.cli(&[
        "port", "add", "lan", "--kind", "stream", "--path", m, "--name", "s",
    ])?;
    assert!(UnixStream::connect(&mine).is_ok());
    netd.cli(&["port", "del", "lan", "s"])?;
    assert!(!mine.exists());
    assert!(netd.stop());
    assert!(other.exists() && file.exists());
    Ok(())
}

#[test]
fn hostonly_guests_reach_nothing_past_a_forwarding_host() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("abl")?;
    let vm = TapHost::new("abm")?;
    let beyond = link_beyond(&host, "abn", "172.16.171")?;
    beyond.exec(&[
        "ip",
        "route",
        "add",
        "192.168.171.0/24",
        "via",
        "172.16.171.1",
    ])?;
    // The host routes (a lab host often does).
    host.sh("echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    host.sh("echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")?;

    let hif = unique_name("abq");
    let keys = format!("subnet = \"192.168.171.0/24\"\nhost_ifname = \"{hif}\"\n");
    let netd = Netd::start_with(
        &host,
        dir.path(),
        &(network("ho", "hostonly", &keys) + &vm.port("vm")),
    )?;
    let v4 = host.sh(&format!("cat /proc/sys/net/ipv4/conf/{hif}/forwarding"))?;
    assert_eq!(v4.trim(), "0", "IPv4 forwarding off on the host TAP");
    let v6 = host.sh(&format!(
        "cat /proc/sys/net/ipv6/conf/{hif}/forwarding 2>/dev/null || echo 0"
    ))?;
    assert_eq!(v6.trim(), "0", "IPv6 forwarding off on the host TAP");
    assert_eq!(host.sh("cat /proc/sys/net/ipv4/ip_forward")?.trim(), "1");

    vm.addr("192.168.171.50/24")?;
    vm.exec(&["ip", "route", "add", "default", "via", "192.168.171.1"])?;
    assert!(
        ping_retry(&vm, "192.168.171.1", 3),
        "guest reaches the host"
    );
    assert!(ping(&vm, "172.16.171.1"), "and the host's other address");
    assert!(!ping(&vm, "172.16.171.2"), "but nothing past the host");
    // Turning forwarding on for the whole host again (which sets it on every
    // interface) does not last on the host TAP: netd turns it off again.
    host.sh("echo 0 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    let off = || {
        host.sh(&format!("cat /proc/sys/net/ipv4/conf/{hif}/forwarding"))
            .map(|s| s.trim() == "0")
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(5), off),
        "forwarding off again"
    );
    assert!(!ping(&vm, "172.16.171.2"), "still nothing past the host");
    assert!(
        netd.log().contains("turned it off again"),
        "and netd said so"
    );
    assert!(netd.stop());
    Ok(())
}

#[test]
fn configs_that_overflow_or_share_an_interface_are_refused_naming_the_key() -> Result<()> {
    let dir = tempdir();
    // Under `timeout`: a netd that took the config would serve on (and, as
    // root, bridge); it must exit with status 1 instead.
    let serve_fails = |networks: &str| -> String {
        let cfg = write_config(dir.path(), networks);
        run_failing(
            Command::new("timeout")
                .arg("10")
                .arg(bin("netd"))
                .args(["serve", "--config"])
                .arg(&cfg),
            1,
        )
    };
    let cases = [
        (
            network("top", "internal", "subnet = \"255.255.255.255/32\"\n"),
            "network[0].subnet",
        ),
        (
            network("top", "hostonly", "subnet = \"255.255.255.252/30\"\n"),
            "network[0].dhcp_server",
        ),
        (
            network("top", "nat", "subnet = \"255.255.255.252/30\"\n"),
            "network[0].dhcp_server",
        ),
        (
            format!(
                "{}\n[[network.port]]\nkind = \"tap\"\nifname = \"abtap0\"\n{}",
                network("a", "internal", ""),
                network("b", "bridged", "uplink = \"abtap0\"\n")
            ),
            "network[1].uplink",
        ),
        (
            format!(
                "{}{}",
                network("a", "hostonly", "host_ifname = \"abho0\"\n"),
                network("b", "bridged", "uplink = \"abho0\"\n")
            ),
            "network[1].uplink",
        ),
        (
            format!(
                "control_group = \"ab-no-such-group\"\n{}",
                network("a", "internal", "")
            ),
            "control_group",
        ),
    ];
    for (networks, key) in cases {
        let err = serve_fails(&networks);
        assert!(
            err.contains("netd.toml") && err.contains(key),
            "{key} named in: {err}\nconfig: {networks}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    Ok(())
}
