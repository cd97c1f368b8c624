//! `netd capture` (issue 17): captures taken inside the switch, read back by
//! tshark, a peer nobody here wrote.
//!
//! - On a NAT network: a busybox udhcpc guest's DHCP exchange with netd's DHCP
//!   service, its ICMP echo through the router, and a frame it spoofs (scapy) that
//!   the port guard drops, marked `dropped: spoofed_mac` in the packet comment,
//!   inbound; the capture is ended with Ctrl-C (SIGINT) and reports its counts.
//! - A stream port (a QEMU-style stream socket peer writing length-prefixed
//!   frames), captured live through `netd capture -w - | tshark -r -`, with
//!   `--count` and `--snaplen` honoured (the capture ends by itself).
//! - A reader that does not read while iperf3 runs: the capture loses frames,
//!   counted in the report (and the pcapng statistics), while the guests' ping and
//!   iperf3 keep working.
//! - Two captures at once, to files, of an iperf3 transfer between TAP ports: tshark
//!   reads every frame the reports count, super-frames whole in one and cut at the
//!   snaplen in the other.
//! - The control protocol as another client speaks it (python3 on the socket):
//!   without `pass_fd` the pcapng comes on the connection (what the CLI falls back
//!   to with an older daemon); with `pass_fd` and a client that sends no file, or a
//!   byte without one, the capture is refused with an error line and the network
//!   and later captures are unaffected.
//!
//! Namespace prefixes `cp`.

mod netd_common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::{bin, wait_until, ChildGuard};
use netd_common::*;

/// Starts `netd capture NET ARGS...` against `netd`, stdout piped, stderr to a
/// file under the test's directory; returns it and the stderr file.
fn start_capture(netd: &Netd, args: &[&str]) -> Result<(ChildGuard, std::path::PathBuf)> {
    let err = netd.dir.join(format!(
        "capture-{}.err",
        integration_tests::unique_name("c")
    ));
    let child = Command::new(bin("netd"))
        .arg("--control")
        .arg(&netd.control)
        .arg("capture")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .context("netd capture")?;
    let guard = ChildGuard::new(child);
    // The CLI says so once the daemon has started the capture.
    let started = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&err).is_ok_and(|s| s.contains("capturing on"))
    });
    anyhow::ensure!(
        started,
        "capture did not start: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    Ok((guard, err))
}

/// Ends a capture with SIGINT, as Ctrl-C does; collects what it wrote to stdout
/// into `file`; returns its stderr.
fn stop_capture(mut cap: ChildGuard, err: &Path, file: &Path) -> Result<String> {
    cap.signal(libc::SIGINT);
    let mut out = Vec::new();
    cap.child()
        .stdout
        .take()
        .context("stdout")?
        .read_to_end(&mut out)?;
    let st = cap
        .wait_timeout(Duration::from_secs(10))
        .context("capture did not exit after SIGINT")?;
    let stderr = std::fs::read_to_string(err)?;
    anyhow::ensure!(st.success(), "capture failed ({st}): {stderr}");
    std::fs::write(file, out)?;
    Ok(stderr)
}

/// `tshark -r FILE [-Y FILTER] -T fields -e F...`: one line per frame.
fn tshark(file: &Path, filter: &str, fields: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(file).args(["-T", "fields"]);
    if !filter.is_empty() {
        cmd.args(["-Y", filter]);
    }
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = integration_tests::run(&mut cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn dhcp_icmp_through_the_router_and_a_guard_drop_read_back_by_tshark() -> Result<()> {
    let dir = root_tempdir();
    let [g] = TapHost::each(["cpg"])?;
    let keys = loopback_resolv_key(dir.path())? + "host_loopback = true\n";
    let net = network("cpnat", "nat", &keys) + &g.port("g1");
    let (_host, netd) = start_netd(dir.path(), "cph", &net)?;
    let (cap, err) = start_capture(&netd, &["cpnat"])?;

    let ip = dhcp(&g, &g.tap, dir.path())?;
    assert!(ping_retry(&g, "10.0.2.2", 3), "guest pings the gateway");
    // A frame from a MAC that is not the guest's: the guard drops it.
    g.sh(&format!(
        "/usr/bin/python3 -c \"from scapy.all import *; sendp(Ether(src='02:66:66:66:66:66', \
         dst='ff:ff:ff:ff:ff:ff') / IP(src='{ip}', dst='10.0.2.255') / UDP(dport=9), \
         iface='{}', count=3, verbose=0)\"",
        g.tap
    ))?;
    assert!(wait_until(Duration::from_secs(5), || {
        netd.counters("cpnat", "g1")
            .is_ok_and(|c| c["drop_spoofed_mac"].as_u64() >= Some(3))
    }));
    let file = dir.path().join("nat.pcapng");
    let stderr = stop_capture(cap, &err, &file)?;
    assert!(
        stderr.contains("frames written, 0 lost"),
        "the report: {stderr}"
    );

    // The DHCP exchange: DISCOVER, OFFER, REQUEST, ACK, between the guest's port
    // and the DHCP service's.
    let dhcp = tshark(&file, "dhcp", &["frame.interface_name", "dhcp.option.dhcp"])?;
    for (port, kind) in [("g1", "1"), ("dhcp", "2"), ("g1", "3"), ("dhcp", "5")] {
        assert!(
            dhcp.contains(&format!("{port}\t{kind}")),
            "DHCP type {kind} from {port}: {dhcp:?}"
        );
    }
    // ICMP through the router: the guest's requests in on its port, the replies
    // in on the router's.
    let icmp = tshark(
        &file,
        "icmp",
        &["frame.interface_name", "icmp.type", "ip.src", "ip.dst"],
    )?;
    assert!(
        icmp.contains(&format!("g1\t8\t{ip}\t10.0.2.2")),
        "echo request: {icmp:?}"
    );
    assert!(
        icmp.contains(&format!("nat\t0\t10.0.2.2\t{ip}")),
        "echo reply: {icmp:?}"
    );
    // The spoofed frames: marked as dropped by the guard, inbound on g1.
    let spoofed = tshark(
        &file,
        "eth.src == 02:66:66:66:66:66",
        &[
            "frame.interface_name",
            "frame.comment",
            "frame.packet_flags_direction",
        ],
    )?;
    assert_eq!(
        spoofed,
        vec!["g1\tdropped: spoofed_mac\t0x00000001".to_string(); 3],
        "spoofed frames"
    );
    // Nothing else is marked: every other frame passed.
    let marked = tshark(&file, "frame.comment", &["frame.comment"])?;
    assert_eq!(marked.len(), 3, "{marked:?}");
    assert!(netd.stop(), "netd exits cleanly after the capture");
    Ok(())
}

#[test]
fn a_stream_port_captured_live_with_count_and_snaplen() -> Result<()> {
    let dir = root_tempdir();
    let sock = dir.path().join("s.sock");
    let net = network("cplan", "internal", "") + &stream_port("s", &sock);
    let (_host, netd) = start_netd(dir.path(), "cps", &net)?;
    let out = dir.path().join("live.txt");
    // Live: the CLI writes to a pipe that tshark reads as it comes.
    let pipeline = format!(
        "{} --control {} capture cplan --port s --count 3 --snaplen 64 -w - 2>{}/live.err \
         | tshark -r - -T fields -e frame.interface_name -e eth.src -e frame.len \
         -e frame.cap_len -e frame.packet_flags_direction > {} 2>/dev/null",
        bin("netd").display(),
        netd.control.display(),
        dir.path().display(),
        out.display()
    );
    let mut live = ChildGuard::new(Command::new("sh").arg("-c").arg(&pipeline).spawn()?);
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            dir.path().join("live.err")
        )
        .is_ok_and(|s| s.contains("capturing on"))),
        "capture started"
    );
    // A QEMU-style stream peer: 4-byte big-endian length, then the frame.
    integration_tests::run(Command::new("/usr/bin/python3").arg("-c").arg(format!(
        "import socket, struct, time\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect('{}')\n\
         for i in range(5):\n    \
             f = b'\\xff' * 6 + bytes.fromhex('02000000c501') + b'\\x88\\xb5' + bytes([i]) * 186\n    \
             s.sendall(struct.pack('>I', len(f)) + f)\n\
         time.sleep(1)\n",
        sock.display()
    )))?;
    let st = live
        .wait_timeout(Duration::from_secs(10))
        .context("--count 3 did not end the capture")?;
    assert!(st.success(), "pipeline: {st}");
    let lines: Vec<String> = std::fs::read_to_string(&out)?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        vec!["s\t02:00:00:00:c5:01\t200\t64\t0x00000001".to_string(); 3],
        "three frames, cut at 64 bytes"
    );
    let err = std::fs::read_to_string(dir.path().join("live.err"))?;
    assert!(err.contains("3 frames written, 0 lost"), "{err}");
    // All five frames went through the switch all the same.
    assert_eq!(netd.counters("cplan", "s")?["rx_frames"], 5);
    Ok(())
}

#[test]
fn a_reader_that_does_not_read_loses_capture_frames_not_traffic() -> Result<()> {
    let dir = root_tempdir();
    let (_host, netd, [a, b]) = lan_of_two(dir.path(), ["cpr", "cpa", "cpb"], "10.97.0")?;
    assert!(ping_retry(&a, "10.97.0.2", 5));
    // Nobody reads the capture's stdout until the end.
    let (cap, err) = start_capture(&netd, &["lan", "--snaplen", "262144"])?;
    let bps = iperf3_bps(&a, &b, "10.97.0.2")?;
    let pings = a.sh("ping -c 5 -i 0.2 -W 1 10.97.0.2 | grep -c 'bytes from' || true")?;
    let file = dir.path().join("slow.pcapng");
    let stderr = stop_capture(cap, &err, &file)?;
    eprintln!("iperf3 with a stuck capture: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 1e8, "iperf3 a -> b: {bps} bit/s");
    assert_eq!(pings.trim(), "5", "ping during the stuck capture");
    // The report counts the lost frames; tshark reads what was written.
    let lost: u64 = stderr
        .split("frames written, ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no lost count in {stderr}"))?;
    assert!(lost > 1000, "frames lost: {stderr}");
    assert!(stderr.contains("port a:"), "per-port losses: {stderr}");
    let frames = tshark(&file, "", &["frame.number"])?;
    assert!(!frames.is_empty(), "what was written is readable");
    Ok(())
}

/// Two captures at once of a bulk transfer between TAP ports (whose frames the
/// capture keeps in the ports' receive buffers instead of copying them), to a file
/// (`-w FILE`): tshark reads every frame the report counts, the TCP super-frames
/// whole in one capture and cut at the snaplen in the other.
#[test]
fn a_bulk_transfer_captured_twice_to_files_is_read_back_whole_and_cut() -> Result<()> {
    let dir = root_tempdir();
    let (_host, netd, [a, b]) = lan_of_two(dir.path(), ["cpw", "cpu", "cpv"], "10.95.0")?;
    assert!(ping_retry(&a, "10.95.0.2", 5));
    let whole = dir.path().join("whole.pcapng");
    let cut = dir.path().join("cut.pcapng");
    let w = whole.display().to_string();
    let c = cut.display().to_string();
    let (cap_w, err_w) = start_capture(&netd, &["lan", "-w", &w, "--snaplen", "262144"])?;
    let (cap_c, err_c) = start_capture(&netd, &["lan", "-w", &c, "--snaplen", "200"])?;
    let bps = iperf3_bps(&a, &b, "10.95.0.2")?;
    assert!(bps > 1e8, "iperf3 a -> b with two captures: {bps} bit/s");
    let stdout = dir.path().join("stdout.unused");
    let mut seen = Vec::new();
    for (cap, err, file, snaplen) in [(cap_w, err_w, &whole, 262_144), (cap_c, err_c, &cut, 200)] {
        let stderr = stop_capture(cap, &err, &stdout)?;
        let written: usize = stderr
            .split("capture of lan: ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no frame count in {stderr}"))?;
        // Every frame parses; lengths as written (frame.len: on the wire).
        let rows = tshark(file, "", &["frame.len", "frame.cap_len", "_ws.malformed"])?;
        assert_eq!(
            rows.len(),
            written,
            "tshark reads what was written: {stderr}"
        );
        let lens: Vec<(usize, usize)> = rows
            .iter()
            .map(|r| {
                let f: Vec<&str> = r.split('\t').collect();
                assert!(f.get(2).is_none_or(|m| m.is_empty()), "malformed: {r}");
                (
                    f[0].parse().unwrap_or(0),
                    f[1].parse().unwrap_or(usize::MAX),
                )
            })
            .collect();
        assert!(
            lens.iter().all(|&(len, cap)| cap == len.min(snaplen)),
            "captured lengths against the snaplen {snaplen}"
        );
        let big = lens.iter().filter(|&&(len, _)| len > 32 << 10).count();
        seen.push(big);
        // The transfer's frames are there: TCP to the iperf3 server.
        let data = tshark(
            file,
            "tcp.dstport == 5201 && frame.len > 1000",
            &["frame.len"],
        )?;
        assert!(
            data.len() > 100,
            "{} data frames in {}",
            data.len(),
            file.display()
        );
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "super-frames captured: {seen:?}"
    );
    Ok(())
}

/// A client of the control socket written in python3: sends `request`, prints
/// the answer line, then does `then` (python statements, `s` the socket).
fn raw_client(control: &Path, request: &str, then: &str) -> Result<String> {
    let out = integration_tests::run(Command::new("/usr/bin/python3").arg("-c").arg(format!(
        "import socket, sys, time\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect('{}')\n\
         s.sendall(b'{}\\n')\n\
         f = s.makefile('rb')\n\
         print(f.readline().decode().strip(), flush=True)\n\
         {}\n",
        control.display(),
        request,
        then
    )))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn other_clients_get_the_stream_on_the_connection_or_a_clear_refusal() -> Result<()> {
    let dir = root_tempdir();
    let (_host, netd, [a, _b]) = lan_of_two(dir.path(), ["cpk", "cpx", "cpy"], "10.96.0")?;
    assert!(ping_retry(&a, "10.96.0.2", 5));
    // No pass_fd: the pcapng follows the answer on the connection.
    let file = dir.path().join("conn.pcapng");
    let pinger = ChildGuard::new(
        a.command(&["ping", "-i", "0.1", "-c", "30", "10.96.0.2"])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let answer = raw_client(
        &netd.control,
        r#"{"cmd":"capture","net":"lan","count":4}"#,
        &format!("open('{}', 'wb').write(f.read())", file.display()),
    )?;
    drop(pinger);
    assert!(answer.contains(r#""ok":true"#), "{answer}");
    assert!(!answer.contains("pass_fd"), "{answer}");
    // Four frames (the ping's, and any ARP between), read back by tshark.
    let frames = tshark(&file, "", &["frame.number"])?;
    assert_eq!(frames.len(), 4, "four frames on the connection: {frames:?}");
    let icmp = tshark(&file, "icmp", &["frame.number"])?;
    assert!(!icmp.is_empty(), "the ping is among them: {frames:?}");
    // pass_fd, but no file ever comes: refused after the wait, with a reason.
    let out = raw_client(
        &netd.control,
        r#"{"cmd":"capture","net":"lan","pass_fd":true}"#,
        "print(f.readline().decode().strip())",
    )?;
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .is_some_and(|l| l.contains(r#""pass_fd":true"#)),
        "{out}"
    );
    let refusal = lines.next().unwrap_or_default();
    assert!(
        refusal.contains(r#""ok":false"#) && refusal.contains("no file descriptor sent"),
        "{out}"
    );
    // A byte without a descriptor: refused at once.
    let out = raw_client(
        &netd.control,
        r#"{"cmd":"capture","net":"lan","pass_fd":true}"#,
        "s.sendall(b'x'); print(f.readline().decode().strip())",
    )?;
    assert!(out.contains("expected one file descriptor, got 0"), "{out}");
    // The network and the next capture are unaffected.
    assert!(ping_retry(&a, "10.96.0.2", 3));
    let (cap, err) = start_capture(&netd, &["lan"])?;
    assert!(ping_retry(&a, "10.96.0.2", 3));
    let file = dir.path().join("after.pcapng");
    let stderr = stop_capture(cap, &err, &file)?;
    assert!(stderr.contains("0 lost"), "{stderr}");
    assert!(!tshark(&file, "icmp", &["frame.number"])?.is_empty());
    Ok(())
}
