//! The fabric under QEMU's own live migration (issue 14). A Linux guest (QEMU TCG,
//! the Debian kernel, a busybox initramfs) has its disk on stord over NBD and its
//! NIC on a `vm` port of host A's netd; it moves to host B (another namespace with
//! its own netd, the two joined by VXLAN) with QEMU's migration (`-incoming tcp:`
//! on B, `migrate` through QMP on A), while it streams a counter over TCP to a
//! client namespace on host A. Each value is written to its own sector of the disk
//! (and flushed) before it is sent.
//!
//! After the move: the stream goes on in the same TCP session (no reset, no gap,
//! no repeat); every value the client got, from before and after the move, is on
//! the disk (read back with qemu-img over NBD); netd on A shows the MAC behind B's
//! VTEP and netd on B on its new port (`netd mac`). B's port has no configured
//! MAC and B had learned the MAC behind A before the move: QEMU's RARP announce
//! is what locks it to the new port. A hostile guest on host B that then sends
//! from the VM's MAC is refused and counted, and the stream does not notice.
//!
//! ```text
//!  client ns --TAP-- [netd A] ==vxlan== [netd B]
//!   QEMU (source) --vm port--'              '--vm port-- QEMU (-incoming)
//!          \____________ stord (NBD, unix socket) ____________/
//! ```

mod stord_common;
mod vxlan_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integration_tests::{has_item, spawn_logged, unique_name, wait_until, ChildGuard, Netns};
use stord_common::{dynamic, Stord};
use vxlan_common::netd_common::{add_tap_port, add_vm_port, initramfs};
use vxlan_common::{mac_of, vxlan_port, Lab, Netd, TapHost};

const VNI: u32 = 1414;
const MAC: &str = "52:54:00:14:00:01";
const GUEST_IP: &str = "10.91.0.10";
const CLIENT_IP: &str = "10.91.0.2";
const MIGRATION_PORT: u16 = 4444;

/// The guest's init after the common head: a static address, then a counter
/// streamed to the client, each value on its own disk sector (flushed) first.
fn guest_body() -> String {
    format!(
        r#"ip addr add {GUEST_IP}/24 dev eth0
echo GUEST-UP
i=0
while [ $i -lt 16000 ]; do
  echo "$i" | dd of=/dev/vda bs=512 seek=$i conv=fsync 2>/dev/null || echo "DISK-FAIL $i"
  echo "$i"
  i=$((i+1))
  usleep 100000
done | nc {CLIENT_IP} 7000
echo STREAM-ENDED
sleep 600
"#
    )
}

/// A QMP connection to a QEMU's `-qmp unix:` socket, capabilities negotiated.
struct Qmp {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let mut s = None;
        wait_until(Duration::from_secs(20), || {
            s = UnixStream::connect(path).ok();
            s.is_some()
        });
        let wr = s.with_context(|| format!("no QMP socket at {}", path.display()))?;
        wr.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            rd: BufReader::new(wr.try_clone()?),
            wr,
        };
        q.line()?; // the greeting
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value> {
        let mut l = String::new();
        if self.rd.read_line(&mut l)? == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&l).with_context(|| format!("QMP sent {l:?}"))
    }

    /// Runs `cmd`; returns its `return` (events in between are skipped).
    fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        writeln!(self.wr, "{msg}")?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    }
}

/// One QEMU of the migration: `ns` holds its TAP `tap`; `incoming` makes it the
/// destination. The same machine on both sides, as migration requires.
fn qemu(
    ns: &Netns,
    dir: &Path,
    initrd: &Path,
    tap: &str,
    disk: &str,
    incoming: Option<&str>,
) -> Result<(ChildGuard, PathBuf, PathBuf)> {
    let assets = integration_tests::guest_assets();
    let qemu = assets.join("bin/qemu-system-x86_64");
    let kernel = assets.join("vmlinux");
    let tag = unique_name("q");
    let console = dir.join(format!("console-{tag}.log"));
    let qmp = dir.join(format!("qmp-{tag}.sock"));
    let mut argv: Vec<String> = [
        qemu.to_str().unwrap_or_default(),
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-m",
        "128",
        "-smp",
        "1",
        "-no-reboot",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        kernel.to_str().unwrap_or_default(),
        "-initrd",
        initrd.to_str().unwrap_or_default(),
        "-append",
        "console=ttyS0 tsc_early_khz=2000000 panic=-1 quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend([
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={MAC}"),
        "-drive".into(),
        format!("id=d0,file={disk},format=raw,if=none"),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    if let Some(uri) = incoming {
        argv.extend(["-incoming".into(), uri.to_string()]);
    }
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let guard = spawn_logged(&mut ns.command(&args), &console)?;
    Ok((guard, console, qmp))
}

/// The counter values the client received so far (whole lines only).
fn received(path: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .map(|l| l.trim().parse().unwrap_or(u64::MAX))
        .collect()
}

/// The entry of `mac` in `netd`'s table of `lan` (`netd mac lan --json`).
fn mac_entry(netd: &Netd, mac: &str) -> Option<serde_json::Value> {
    let t = netd.cli_json(&["mac", "lan"]).ok()?;
    t.as_array()?.iter().find(|e| e["mac"] == mac).cloned()
}

fn waits(secs: u64, f: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_secs(secs), f)
}

/// Migrates the running QEMU behind `src` to the one waiting behind `dst` at `uri`;
/// checks both ends' states and returns how many values the client had then.
fn migrate(src: &mut Qmp, dst: &mut Qmp, uri: &str, stream: &Path) -> Result<usize> {
    let at_start = received(stream).len();
    src.execute("migrate", serde_json::json!({ "uri": uri }))?;
    let t0 = Instant::now();
    let info = loop {
        let info = src.execute("query-migrate", serde_json::json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("migration failed: {info}"),
            _ if t0.elapsed() > Duration::from_secs(180) => bail!("migration hangs: {info}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let at_end = received(stream).len();
    eprintln!(
        "migrated to {uri} in {:?}: downtime {} ms, total {} ms; the client had {at_start} values before, {at_end} at the end",
        t0.elapsed(),
        info["downtime"],
        info["total-time"],
    );
    let status = dst.execute("query-status", serde_json::json!({}))?;
    assert_eq!(status["status"], "running", "{status}");
    let status = src.execute("query-status", serde_json::json!({}))?;
    assert_eq!(status["status"], "postmigrate", "{status}");
    Ok(at_end)
}

/// Checks that the stream got `more` values past `from` in the same session, with
/// no gap and no repeat since the start; `why` says what to show if not.
fn stream_goes_on(
    client: &Netns,
    stream: &Path,
    from: usize,
    more: usize,
    why: impl Fn() -> String,
) {
    let moved_on = waits(60, || received(stream).len() >= from + more);
    let got = received(stream);
    assert!(
        moved_on,
        "the stream stopped at {} values (expected {}):\n{}",
        got.len(),
        from + more,
        why()
    );
    let expected: Vec<u64> = (0..got.len() as u64).collect();
    assert_eq!(got, expected, "a gap or a repeat in the stream");
    let est = client
        .sh("ss -Htn state established '( sport = :7000 )'")
        .unwrap_or_default();
    assert!(
        est.contains(GUEST_IP),
        "the client's session is gone: {est:?}"
    );
}

/// Whether `netd`'s table has the VM's MAC on port `port` behind `remote`.
fn mac_is(netd: &Netd, port: &str, remote: Option<&str>) -> bool {
    mac_entry(netd, MAC)
        .is_some_and(|e| e["port"] == port && e.get("remote").and_then(|r| r.as_str()) == remote)
}

/// A guest on host B (port `hostile` of `nb`) sends a RARP and a gratuitous ARP
/// from the VM's MAC; both must be refused and counted.
fn hostile_claims_the_mac(nb: &Netd, hostile: &TapHost) {
    let spoofed = || vxlan_common::netd_common::drops(nb, "lan", "hostile", "drop_spoofed_mac");
    let before = spoofed();
    let sent = hostile.sh(&format!(
        "/usr/bin/python3 -c \"from scapy.all import *; sendp([Ether(src='{MAC}',dst='ff:ff:ff:ff:ff:ff',type=0x8035)/Raw(b'\\x00'*46), Ether(src='{MAC}',dst='ff:ff:ff:ff:ff:ff')/ARP(op=2,hwsrc='{MAC}',psrc='{GUEST_IP}',pdst='{GUEST_IP}')],iface='{}',verbose=0)\"",
        hostile.tap
    ));
    assert!(sent.is_ok(), "scapy: {sent:?}");
    assert!(
        waits(5, || spoofed() >= before + 2),
        "hostile frames not refused: {} -> {}",
        before,
        spoofed()
    );
}

#[test]
fn qemu_live_migration_across_netd_hosts_keeps_the_stream_and_the_disk() -> Result<()> {
    let mut lab = Lab::new(2, 1600)?;
    let (a_ip, b_ip) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    let client = TapHost::new("mgc")?;
    let lan = integration_tests::netd::network("lan", "internal", "");
    let a_cfg = lan.clone() + &client.port("client") + &vxlan_port("vx", VNI, &a_ip, &[&b_ip], "");
    let b_cfg = lan + &vxlan_port("vx", VNI, &b_ip, &[&a_ip], "");
    lab.hosts[0].start_netd(&a_cfg)?;
    lab.hosts[1].start_netd(&b_cfg)?;
    client.addr(&format!("{CLIENT_IP}/24"))?;
    let (tap_a, tap_b, tap_a2) = (unique_name("mga"), unique_name("mgb"), unique_name("mgr"));
    // A's port knows the VM's MAC; B's learns it from the VM's first frame there.
    add_vm_port(lab.hosts[0].netd(), "lan", &tap_a, &["--mac", MAC])?;
    add_vm_port(lab.hosts[1].netd(), "lan", &tap_b, &[])?;
    let (na, nb) = (lab.hosts[0].netd(), lab.hosts[1].netd());

    let stord = Stord::start(&[dynamic("mig", "8MiB")])?;
    let disk = stord.unix_uri("mig");
    let dir = lab.dir.path().to_path_buf();
    let initrd = initramfs(&dir, &guest_body())?;
    let stream = dir.join("stream.txt");
    let _listener = client.spawn(&[
        "sh",
        "-c",
        &format!("sleep 600 | busybox nc -l -p 7000 > {}", stream.display()),
    ])?;

    let (mut qa, console_a, qmp_a) = qemu(&lab.hosts[0].ns, &dir, &initrd, &tap_a, &disk, None)?;
    let console = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    if !waits(120, || received(&stream).len() >= 20) {
        bail!(
            "the guest did not stream (got {:?}); console:\n{}",
            received(&stream),
            console(&console_a)
        );
    }
    // Before the move: A has the VM on its port, B behind A's VTEP (from the
    // guest's ARP broadcast).
    assert!(mac_is(na, &tap_a, None), "A: {:?}", mac_entry(na, MAC));
    assert!(
        waits(10, || mac_is(nb, "vx", Some(&a_ip))),
        "B did not learn the VM behind A: {:?}",
        mac_entry(nb, MAC)
    );

    // A to B.
    let to_b = format!("tcp:{b_ip}:{MIGRATION_PORT}");
    let (mut qb, console_b, qmp_b) =
        qemu(&lab.hosts[1].ns, &dir, &initrd, &tap_b, &disk, Some(&to_b))?;
    let mut q_b = Qmp::connect(&qmp_b)?;
    let mut q_a = Qmp::connect(&qmp_a)?;
    let at = migrate(&mut q_a, &mut q_b, &to_b, &stream)?;
    stream_goes_on(&client, &stream, at, 30, || {
        format!(
            "B's console:\n{}\nnetd B:\n{}",
            console(&console_b),
            tail(&nb.log())
        )
    });
    assert!(!console(&console_b).contains("STREAM-ENDED"));
    // Both netds show the MAC where it is now (A still has the source's port).
    eprintln!(
        "A:\n{}B:\n{}",
        na.cli(&["mac", "lan"])?,
        nb.cli(&["mac", "lan"])?
    );
    assert!(mac_is(na, "vx", Some(&b_ip)), "A: {:?}", mac_entry(na, MAC));
    assert!(mac_is(nb, &tap_b, None), "B: {:?}", mac_entry(nb, MAC));
    let table = na.cli(&["mac", "lan"])?;
    assert!(
        table.lines().any(|l| l.contains(MAC) && l.contains(&b_ip)),
        "{table}"
    );
    let ports = nb.cli_json(&["port", "list", "lan"])?;
    assert!(
        has_item(&ports, |p| p["name"] == tap_b.as_str()
            && p["locked_mac"] == MAC),
        "{ports}"
    );

    // A hostile guest on host B claims the VM's MAC: refused and counted; the VM
    // keeps its MAC and its stream.
    let hostile = TapHost::new("mgh")?;
    add_tap_port(nb, "lan", &hostile.tap, &hostile, "hostile")?;
    hostile_claims_the_mac(nb, &hostile);
    stream_goes_on(&client, &stream, received(&stream).len(), 10, String::new);
    assert!(mac_is(nb, &tap_b, None), "B: {:?}", mac_entry(nb, MAC));
    assert_ne!(mac_of(&hostile, &hostile.tap)?, MAC);

    // And back to A, onto a new port without a configured MAC (the source's port
    // is deleted once its QEMU is gone, as a launcher does): B learns the MAC
    // behind A again, A on the new port.
    let _ = q_a.execute("quit", serde_json::json!({}));
    qa.wait_timeout(Duration::from_secs(10));
    na.cli(&["port", "del", "lan", &tap_a])?;
    add_vm_port(na, "lan", &tap_a2, &[])?;
    let to_a = format!("tcp:{a_ip}:{MIGRATION_PORT}");
    let (mut qa2, console_a2, qmp_a2) =
        qemu(&lab.hosts[0].ns, &dir, &initrd, &tap_a2, &disk, Some(&to_a))?;
    let mut q_a2 = Qmp::connect(&qmp_a2)?;
    let at = migrate(&mut q_b, &mut q_a2, &to_a, &stream)?;
    stream_goes_on(&client, &stream, at, 30, || {
        format!(
            "A's console:\n{}\nnetd A:\n{}",
            console(&console_a2),
            tail(&na.log())
        )
    });
    eprintln!(
        "A:\n{}B:\n{}",
        na.cli(&["mac", "lan"])?,
        nb.cli(&["mac", "lan"])?
    );
    assert!(mac_is(na, &tap_a2, None), "A: {:?}", mac_entry(na, MAC));
    assert!(mac_is(nb, "vx", Some(&a_ip)), "B: {:?}", mac_entry(nb, MAC));
    // B's port keeps its learned lock after the VM left: the hostile guest there
    // still cannot take the MAC, though B's table has it behind A now.
    hostile_claims_the_mac(nb, &hostile);
    stream_goes_on(&client, &stream, received(&stream).len(), 10, String::new);
    assert!(mac_is(nb, "vx", Some(&a_ip)), "B: {:?}", mac_entry(nb, MAC));

    // Every value the client got, from before, between and after the moves, is
    // on the disk.
    let last = received(&stream).len() as u64;
    let _ = q_a2.execute("stop", serde_json::json!({}));
    let _ = q_a2.execute("quit", serde_json::json!({}));
    qa2.wait_timeout(Duration::from_secs(10));
    let _ = q_b.execute("quit", serde_json::json!({}));
    qb.wait_timeout(Duration::from_secs(10));
    let image = dir.join("disk.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &disk])
        .arg(&image)
        .output()?;
    assert!(out.status.success(), "qemu-img: {out:?}");
    let bytes = std::fs::read(&image)?;
    for i in 0..last {
        let at = i as usize * 512;
        let sector = bytes
            .get(at..at + 16)
            .with_context(|| format!("disk too short for value {i}"))?;
        let want = format!("{i}\n");
        assert!(
            sector.starts_with(want.as_bytes()),
            "sector {i} holds {:?}, not {want:?}",
            String::from_utf8_lossy(sector)
        );
    }
    eprintln!("the disk holds all {last} values");
    for c in [&console_a, &console_b, &console_a2] {
        assert!(!console(c).contains("DISK-FAIL"), "{}", console(c));
    }
    Ok(())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
