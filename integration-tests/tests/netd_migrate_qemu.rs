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
use vxlan_common::netd_common::{add_tap_port, add_vm_port, initramfs, microvm_argv};
use vxlan_common::{mac_of, vxlan_port, Host, Lab, Netd, TapHost};

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
/// destination. The same machine on both sides, as migration requires. Returns
/// the process, its console log and its QMP socket.
fn qemu(
    ns: &Netns,
    lab: &Guest,
    tap: &str,
    incoming: Option<&str>,
) -> Result<(ChildGuard, PathBuf, PathBuf)> {
    let tag = unique_name("q");
    let console = lab.dir.join(format!("console-{tag}.log"));
    let qmp = lab.dir.join(format!("qmp-{tag}.sock"));
    let mut argv = microvm_argv(&lab.initrd, 128);
    argv.extend([
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={MAC}"),
        "-drive".into(),
        format!("id=d0,file={},format=raw,if=none", lab.disk),
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

/// What every QEMU of the test shares: scratch directory, initramfs, the NBD URI
/// of the disk, the client and the file its stream goes to.
struct Guest {
    dir: PathBuf,
    initrd: PathBuf,
    disk: String,
    client: TapHost,
    stream: PathBuf,
}

/// A QEMU of the test, with its QMP connection.
struct Vm {
    proc: ChildGuard,
    console: PathBuf,
    qmp: Qmp,
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Quits QEMU and waits for it.
    fn quit(mut self) {
        let _ = self.qmp.execute("quit", serde_json::json!({}));
        self.proc.wait_timeout(Duration::from_secs(10));
    }
}

/// Moves the VM from `src` to a new QEMU on host `to` (its TAP `tap`, port
/// `MIGRATION_PORT` of `to`'s underlay address): the stream must go on for 30
/// more values. Returns the new VM (the source stays, in `postmigrate`).
fn move_vm(g: &Guest, src: &mut Vm, to: &Host, tap: &str) -> Result<Vm> {
    let uri = format!("tcp:{}:{MIGRATION_PORT}", to.ip);
    let (proc, console, qmp) = qemu(&to.ns, g, tap, Some(&uri))?;
    let mut dst = Vm {
        proc,
        console,
        qmp: Qmp::connect(&qmp)?,
    };
    let at = migrate(&mut src.qmp, &mut dst.qmp, &uri, &g.stream)?;
    stream_goes_on(&g.client, &g.stream, at, 30, || {
        format!(
            "destination console:\n{}\nits netd:\n{}",
            dst.console(),
            tail(&to.netd().log())
        )
    });
    assert!(!dst.console().contains("STREAM-ENDED"));
    Ok(dst)
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
    // The source says "completed" once it sent all; the destination runs once it
    // has loaded it.
    let mut status = serde_json::Value::Null;
    let running = waits(30, || {
        status = dst
            .execute("query-status", serde_json::json!({}))
            .unwrap_or_default();
        status["status"] == "running"
    });
    assert!(running, "the destination does not run: {status}");
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
/// from the VM's MAC; both must be refused and counted, and the stream go on.
fn hostile_claims_the_mac(g: &Guest, nb: &Netd, hostile: &TapHost) {
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
    let now = received(&g.stream).len();
    stream_goes_on(&g.client, &g.stream, now, 10, String::new);
}

// Its own `main` (`harness = false`): where the guest assets could not be fetched the
// move says NOT RUN instead of counting as passed.
integration_tests::guest_tests_main!(
    "netd_migrate_qemu",
    qemu_live_migration_across_netd_hosts_keeps_the_stream_and_the_disk
);

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
    let dir = lab.dir.path().to_path_buf();
    let g = Guest {
        initrd: initramfs(&dir, &guest_body())?,
        disk: stord.unix_uri("mig"),
        stream: dir.join("stream.txt"),
        client,
        dir,
    };
    let _listener = g.client.spawn(&[
        "sh",
        "-c",
        &format!("sleep 600 | busybox nc -l -p 7000 > {}", g.stream.display()),
    ])?;

    let (proc, console, qmp) = qemu(&lab.hosts[0].ns, &g, &tap_a, None)?;
    if !waits(120, || received(&g.stream).len() >= 20) {
        bail!(
            "the guest did not stream (got {:?}); console:\n{}",
            received(&g.stream),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
    }
    let mut vm_a = Vm {
        proc,
        console,
        qmp: Qmp::connect(&qmp)?,
    };
    // Before the move: A has the VM on its port, B behind A's VTEP (from the
    // guest's ARP broadcast).
    assert!(mac_is(na, &tap_a, None), "A: {:?}", mac_entry(na, MAC));
    assert!(
        waits(10, || mac_is(nb, "vx", Some(&a_ip))),
        "B did not learn the VM behind A: {:?}",
        mac_entry(nb, MAC)
    );

    // A to B. Both netds show the MAC where it is now (A still has the source's
    // port, its QEMU in `postmigrate`).
    let mut vm_b = move_vm(&g, &mut vm_a, &lab.hosts[1], &tap_b)?;
    let show = || -> Result<String> {
        Ok(format!(
            "A:\n{}B:\n{}",
            na.cli(&["mac", "lan"])?,
            nb.cli(&["mac", "lan"])?
        ))
    };
    eprintln!("{}", show()?);
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
    hostile_claims_the_mac(&g, nb, &hostile);
    assert!(mac_is(nb, &tap_b, None), "B: {:?}", mac_entry(nb, MAC));
    assert_ne!(mac_of(&hostile, &hostile.tap)?, MAC);

    // And back to A, onto a new port without a configured MAC (the source's port
    // is deleted once its QEMU is gone, as a launcher does): B learns the MAC
    // behind A again, A on the new port.
    let console_a = vm_a.console();
    vm_a.quit();
    na.cli(&["port", "del", "lan", &tap_a])?;
    add_vm_port(na, "lan", &tap_a2, &[])?;
    let vm_a2 = move_vm(&g, &mut vm_b, &lab.hosts[0], &tap_a2)?;
    eprintln!("{}", show()?);
    assert!(mac_is(na, &tap_a2, None), "A: {:?}", mac_entry(na, MAC));
    assert!(mac_is(nb, "vx", Some(&a_ip)), "B: {:?}", mac_entry(nb, MAC));
    // B's port keeps its learned lock after the VM left: the hostile guest there
    // still cannot take the MAC, though B's table has it behind A now.
    hostile_claims_the_mac(&g, nb, &hostile);
    assert!(mac_is(nb, "vx", Some(&a_ip)), "B: {:?}", mac_entry(nb, MAC));

    // Every value the client got, from before, between and after the moves, is
    // on the disk.
    let last = received(&g.stream).len() as u64;
    let consoles = [console_a, vm_b.console(), vm_a2.console()];
    vm_a2.quit();
    vm_b.quit();
    let image = g.dir.join("disk.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &g.disk])
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
    for c in consoles {
        assert!(!c.contains("DISK-FAIL"), "{c}");
    }
    Ok(())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
