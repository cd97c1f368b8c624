//! vmm-shim's live migration under the real KVM, between two vmm-shims on loopback:
//! a guest counts on its serial port, dirtying a working set of its memory and
//! writing each number to its disk on stord; `vmm-shim ctl migrate tcp:...` moves it
//! to a `vmm-shim --incoming` (which opens its own NBD connection, over stord's unix
//! socket): the count goes on with no gap and no repeat (both vmm-shims append to
//! one console file), the disk holds every number, the source exits 0. A migration
//! whose destination is killed half-way leaves the source running (and it migrates
//! later); a corrupt stream, or garbage, sent to `--incoming` is refused and fails
//! only the incoming VM, while the source goes on.
//!
//! A guest that rewrites a working set without pause, which takes longer to send than
//! the downtime goal and is all dirty again each round, never converges by itself: auto-converge throttles its
//! vCPUs until it does (the answer's `throttle_pct`, `converged`), and the count
//! goes on at the destination.
//!
//! With a NIC (a TAP in a kernel bridge on each side, in one namespace): the
//! guest's count frames go on from the destination's TAP with no gap and no
//! repeat, the first frame there is vmm-shim's RARP announce (five in all, then the
//! guest's own announce), and the bridge has the MAC on the new TAP. A destination
//! that fails the state (another MAC) is reported by the source with its reason;
//! one whose source dies before handing the VM over (`GO`) never runs it.

mod stord_common;
mod vmm_guest;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use integration_tests::{free_port, wait_until};
use serde_json::Value;
use vmm_guest::capture::{BridgedTaps, Capture};
use vmm_guest::counter::{
    assert_consecutive, assert_disk_counts, assert_moved_and_announced, counter_busy_program,
    counter_net_program, counter_program, counts, ctl, curl, device, wait_count,
};
use vmm_guest::{setup, LiveVm};

/// `vmm-shim --incoming tcp:127.0.0.1:PORT` with 64 MiB, the console file and
/// `extra`; returns once it listens.
fn incoming(port: u16, console: &Path, extra: &[&str]) -> LiveVm {
    incoming_in(&[], port, console, extra)
}

/// [`incoming`] run under `prefix` (`ip netns exec NS`: it listens there).
fn incoming_in(prefix: &[&str], port: u16, console: &Path, extra: &[&str]) -> LiveVm {
    let to = format!("tcp:127.0.0.1:{port}");
    let c = console.to_str().unwrap();
    let args = [
        &["--incoming", to.as_str(), "--mem", "64M", "--console", c],
        extra,
    ]
    .concat();
    let vm = LiveVm::spawn(vmm_guest::vmm_command(prefix, &args)).unwrap();
    let listening = wait_until(Duration::from_secs(10), || {
        let ss = std::process::Command::new("env")
            .args(prefix)
            .args(["ss", "-Hltn", &format!("sport = :{port}")])
            .output()
            .unwrap();
        !ss.stdout.is_empty()
    });
    assert!(listening, "vmm-shim --incoming did not listen on {port}");
    vm
}

/// `ctl migrate` to `port`: exit status and output.
fn migrate(sock: &Path, port: u16) -> (Option<i32>, String) {
    ctl(sock, &["migrate", &format!("tcp:127.0.0.1:{port}")])
}

/// What a proxy between source and destination does to the stream.
#[derive(Clone, Copy)]
enum Cut {
    /// After this many bytes towards the destination, SIGKILL it (this pid).
    KillAfter(u64, u32),
    /// Flip a bit of the byte at this offset of the stream.
    FlipAt(u64),
    /// SIGKILL the source (this pid) as the destination's second answer (*ready*,
    /// after the state) reaches it, before it can send `GO`.
    KillSourceOnReady(u32),
}

/// A one-connection TCP proxy on a free port to `target`, applying `cut`.
fn proxy(target: u16, cut: Cut) -> (u16, JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut src, _) = l.accept().unwrap();
        let mut dst = TcpStream::connect(("127.0.0.1", target)).unwrap();
        let (mut src2, mut dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        std::thread::spawn(move || {
            if let Cut::KillSourceOnReady(pid) = cut {
                let mut b = [0u8; 1];
                let mut answers = 0;
                while dst2.read_exact(&mut b).is_ok() {
                    answers += 1;
                    if answers == 2 {
                        // SAFETY: kill(2) on the source's pid, which the test owns.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        break;
                    }
                    if src2.write_all(&b).is_err() {
                        break;
                    }
                }
            } else {
                let _ = std::io::copy(&mut dst2, &mut src2);
            }
            let _ = src2.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match cut {
                Cut::KillAfter(limit, pid) if at + n as u64 >= limit => {
                    // SAFETY: kill(2) on the destination's pid, which the test owns.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = dst.shutdown(std::net::Shutdown::Both);
                    let _ = src.shutdown(std::net::Shutdown::Both);
                    return at;
                }
                Cut::FlipAt(off) if (at..at + n as u64).contains(&off) => {
                    buf[(off - at) as usize] ^= 0x10;
                }
                _ => {}
            }
            if dst.write_all(&buf[..n]).is_err() {
                break;
            }
            at += n as u64;
        }
        let _ = dst.shutdown(std::net::Shutdown::Write);
        at
    });
    (port, h)
}

/// A counting source VM: `wset` pages dirtied per number, optionally a disk.
fn source(dir: &Path, elf: &Path, disk: Option<&str>) -> (LiveVm, std::path::PathBuf) {
    let sock = dir.join("src.sock");
    let console = dir.join("console");
    let mut args = vec![
        "--api-sock",
        sock.to_str().unwrap(),
        "--console",
        console.to_str().unwrap(),
    ];
    if let Some(d) = disk {
        args.extend(["--disk", d]);
    }
    let vm = LiveVm::guest(&[], elf, &args);
    wait_count(&console, 20);
    (vm, sock)
}

/// Asserts the source goes on counting (no gap, no repeat) and says it runs.
fn source_goes_on(sock: &Path, console: &Path) {
    let n = counts(console).len();
    let c = wait_count(console, n + 10);
    assert_consecutive(&c);
    let (_, v) = curl(sock, "GET", "/vm", None);
    assert_eq!(v["state"], "running", "{v}");
}

#[test]
fn count_memory_and_disk_go_on_at_the_destination() {
    let (dir, elf) = setup("mig", &counter_program(2048, true));
    let stord = stord_common::Stord::start(&[stord_common::dynamic("vm0", "1M")]).unwrap();
    let console = dir.path().join("console");
    let (src, sock) = source(dir.path(), &elf, Some(&stord.uri("vm0")));
    let port = free_port();
    let dsock = dir.path().join("dst.sock");
    let unix = stord.unix_uri("vm0");
    let dst = incoming(
        port,
        &console,
        &["--disk", &unix, "--api-sock", dsock.to_str().unwrap()],
    );
    let (code, out) = migrate(&sock, port);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("migration: {v}");
    assert_eq!(v["mode"], "pre-copy", "{v}");
    assert!(v["rounds"].as_u64().unwrap() >= 2, "{v}");
    // KVM's dirty log saw the guest's writes to its working set (2048 pages a count).
    assert!(v["dirty_logged_pages"].as_u64().unwrap() >= 2048, "{v}");
    assert!(
        v["bytes"].as_u64().unwrap() > 8 << 20,
        "the working set went: {v}"
    );
    let downtime = v["downtime_ms"].as_f64().unwrap();
    assert!(
        downtime > 0.0 && downtime <= v["total_ms"].as_f64().unwrap(),
        "{v}"
    );
    let r = src.finish(Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "the source exits 0 after a migration: {r}");

    let n = counts(&console).len();
    let after = wait_count(&console, n + 30);
    assert_consecutive(&after);
    let (_, v) = curl(&dsock, "GET", "/vm", None);
    assert_eq!(v["state"], "running", "{v}");
    let r = dst.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    let printed = counts(&console);
    assert_consecutive(&printed);
    let img = std::fs::read(stord.state().join("disks/vm0.img")).unwrap();
    assert_disk_counts(&img, &printed);
}

#[test]
fn a_destination_killed_half_way_leaves_the_source_running() {
    let (dir, elf) = setup("migkill", &counter_program(4096, false));
    let console = dir.path().join("console");
    let (src, sock) = source(dir.path(), &elf, None);
    let port = free_port();
    let dst = incoming(port, &console, &[]);
    let (via, proxy) = proxy(port, Cut::KillAfter(4 << 20, dst.pid()));
    let (code, out) = migrate(&sock, via);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the VM runs on here"), "{out}");
    assert!(proxy.join().unwrap() < 4 << 20);
    let r = dst.finish(Duration::from_secs(10));
    assert_eq!(r.code, None, "the destination was killed: {r}");
    source_goes_on(&sock, &console);

    // Later, a destination that lives takes it.
    let port = free_port();
    let dst = incoming(port, &console, &[]);
    let (code, out) = migrate(&sock, port);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(src.finish(Duration::from_secs(20)).code, Some(0));
    let n = counts(&console).len();
    assert_consecutive(&wait_count(&console, n + 10));
    assert_eq!(dst.stop(Duration::from_secs(30)).code, Some(0));
}

#[test]
fn a_destination_the_vm_is_not_handed_to_never_runs_it() {
    let (dir, elf) = setup("miggo", &counter_program(256, false));
    let (src, sock) = source(dir.path(), &elf, None);
    let other = dir.path().join("other-console");
    let port = free_port();
    let dst = incoming(port, &other, &[]);
    // The source dies after the whole state went and the destination said it is
    // ready: no GO comes.
    let (via, proxy) = proxy(port, Cut::KillSourceOnReady(src.pid()));
    let (code, out) = migrate(&sock, via);
    assert_ne!(code, Some(0), "{out}");
    let _ = proxy.join();
    assert_eq!(src.finish(Duration::from_secs(10)).code, None, "killed");
    let r = dst.finish(Duration::from_secs(60));
    r.assert_exit(1, "did not hand the VM over");
    assert!(
        counts(&other).is_empty(),
        "the destination ran the guest: {r}"
    );
}

#[test]
fn a_corrupt_stream_or_garbage_is_refused_and_the_source_goes_on() {
    let (dir, elf) = setup("migbad", &counter_program(1024, false));
    let console = dir.path().join("console");
    let other = dir.path().join("other-console");

    // Garbage: the incoming VM fails, saying why.
    let port = free_port();
    let dst = incoming(port, &other, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[0x5a; 64]).unwrap();
    let r = dst.finish(Duration::from_secs(20));
    r.assert_exit(1, "bad magic");
    assert!(!r.stderr.contains("panicked"), "{r}");

    // Another shape (the destination has a disk the source lacks): refused at hello.
    let (src, sock) = source(dir.path(), &elf, None);
    let stord = stord_common::Stord::start(&[stord_common::dynamic("vm0", "1M")]).unwrap();
    let port = free_port();
    let dst = incoming(port, &other, &["--disk", &stord.uri("vm0")]);
    let (code, out) = migrate(&sock, port);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not this one"), "{out}");
    dst.finish(Duration::from_secs(20))
        .assert_exit(1, "is not this one");
    source_goes_on(&sock, &console);

    // One bit flipped 2 MiB into a real stream: refused, the source goes on.
    let port = free_port();
    let dst = incoming(port, &other, &[]);
    let (via, proxy) = proxy(port, Cut::FlipAt(2 << 20));
    let (code, out) = migrate(&sock, via);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the VM runs on here"), "{out}");
    let _ = proxy.join();
    let r = dst.finish(Duration::from_secs(20));
    r.assert_exit(1, "the stream is corrupt");
    assert!(!r.stderr.contains("panicked"), "{r}");
    source_goes_on(&sock, &console);
    assert!(
        counts(&other).is_empty(),
        "a refused destination never ran the guest"
    );
    let r = src.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
}

/// `ctl migrate` from `sock` to a new `--incoming` VM (API socket `api`) with a 1 ms
/// goal and `extra` options; checks the source exits 0 and the count goes on there.
/// Returns the answer and the new VM.
fn migrate_tight(
    src: LiveVm,
    sock: &Path,
    api: &Path,
    console: &Path,
    extra: &[&str],
) -> (Value, LiveVm) {
    let port = free_port();
    let dst = incoming(port, console, &["--api-sock", api.to_str().unwrap()]);
    let to = format!("tcp:127.0.0.1:{port}");
    let (code, out) = ctl(
        sock,
        &[&["migrate", &to, "--max-downtime-ms", "1"], extra].concat(),
    );
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("migration {extra:?}: {v}");
    assert_eq!(v["mode"], "pre-copy", "{v}");
    let r = src.finish(Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "{r}");
    let n = counts(console).len();
    assert_consecutive(&wait_count(console, n + 30));
    (v, dst)
}

#[test]
fn a_working_set_that_does_not_converge_is_throttled_until_it_does() {
    // 8 MiB rewritten for each number, without a pause but for 5000 TSC ticks after
    // each page (at most some 2 GB/s of dirty memory on a 2.5 GHz TSC, about 800
    // MB/s here where the test guest's instructions are emulated), and pre-copy
    // capped at 64 MiB/s: a round takes 125 ms, in which the guest dirties all of it
    // again, and a 1 ms goal fits 16 pages. Only a vCPU slowed down to about 1 % of
    // its time dirties less than a round sends.
    let (dir, elf) = setup("migthr", &counter_busy_program(2048, 5000));
    let console = dir.path().join("console");
    let (src, sock) = source(dir.path(), &elf, None);
    let (s1, s2) = (dir.path().join("one.sock"), dir.path().join("two.sock"));
    let cap = ["--max-bandwidth-mib", "64"];
    // Without auto-converge it never fits the goal: pre-copy stops at the round
    // limit (the migration still completes, over its goal).
    let t = std::time::Instant::now();
    let (v, one) = migrate_tight(
        src,
        &sock,
        &s1,
        &console,
        &[&cap[..], &["--no-auto-converge"]].concat(),
    );
    assert_eq!(v["converged"], false, "{v}");
    assert_eq!(v["throttle_pct"], 0, "{v}");
    assert_eq!(v["rounds"], 32, "{v}");
    // The cap holds: 30 rounds of about 8 MiB at 64 MiB/s take more than 3 s.
    let bytes = v["bytes"].as_f64().unwrap();
    let total = v["total_ms"].as_f64().unwrap();
    assert!(bytes > 30.0 * 7.0 * 1048576.0, "{v}");
    assert!(
        bytes / 1048576.0 / (total / 1e3) < 64.0 * 1.2,
        "{v} (over the 64 MiB/s cap)"
    );
    eprintln!("without auto-converge: {:?}", t.elapsed());
    // With it (the default), the same VM onwards: throttled (two rounds that do not
    // shrink the set start it), and converged before the round limit.
    let (v, two) = migrate_tight(one, &s1, &s2, &console, &cap);
    assert!(v["throttle_pct"].as_u64().unwrap() >= 20, "{v}");
    assert_eq!(v["converged"], true, "{v}");
    assert!(v["rounds"].as_u64().unwrap() < 32, "{v}");
    let r = two.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    assert_consecutive(&counts(&console));
}

const NIC_MAC: &str = "52:54:00:14:00:0e";
const NIC_MAC_BYTES: [u8; 6] = [0x52, 0x54, 0, 0x14, 0, 0x0e];

#[test]
fn the_nic_goes_on_at_the_destination_which_announces_it() {
    let (dir, elf) = setup("mignic", &counter_net_program(256, false, NIC_MAC_BYTES));
    let taps = BridgedTaps::new();
    // What each vmm-shim writes to its TAP.
    let cap_a = Capture::start(&taps.ns, &taps.a, dir.path());
    let cap_b = Capture::start(&taps.ns, &taps.b, dir.path());
    let console = dir.path().join("console");
    let sock = dir.path().join("src.sock");
    let (nic_a, nic_b) = (
        format!("tap={},mac={NIC_MAC}", taps.a),
        format!("tap={},mac={NIC_MAC}", taps.b),
    );
    let src = LiveVm::guest(
        &taps.ns.exec_prefix(),
        &elf,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--console",
            console.to_str().unwrap(),
            "--net",
            &nic_a,
        ],
    );
    wait_count(&console, 20);
    let on = |t: &str| {
        wait_until(Duration::from_secs(5), || {
            taps.fdb_port(NIC_MAC).as_deref() == Some(t)
        })
    };
    assert!(on(&taps.a), "{:?}", taps.fdb_port(NIC_MAC));

    // A destination whose NIC has another MAC takes the whole stream, then fails
    // the state: the source says why (the destination's own reason) and goes on;
    // the destination never ran the guest, nor announced anything.
    let port = free_port();
    let wrong = format!("tap={},mac=52:54:00:14:00:ff", taps.b);
    let other = dir.path().join("other-console");
    let bad = incoming_in(&taps.ns.exec_prefix(), port, &other, &["--net", &wrong]);
    let (code, out) = migrate(&sock, port);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("the destination refused") && out.contains("config space differs"),
        "{out}"
    );
    assert!(out.contains("the VM runs on here"), "{out}");
    bad.finish(Duration::from_secs(20))
        .assert_exit(1, "config space differs");
    source_goes_on(&sock, &console);
    assert!(
        counts(&other).is_empty(),
        "the failed destination ran the guest"
    );

    let port = free_port();
    let dsock = dir.path().join("dst.sock");
    let dst = incoming_in(
        &taps.ns.exec_prefix(),
        port,
        &console,
        &["--net", &nic_b, "--api-sock", dsock.to_str().unwrap()],
    );
    let (code, out) = migrate(&sock, port);
    assert_eq!(code, Some(0), "{out}");
    let r = src.finish(Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "the source exits 0 after a migration: {r}");
    // The kernel bridge has the MAC where the VM went.
    assert!(on(&taps.b), "{:?}", taps.fdb_port(NIC_MAC));
    // A second of counting: every RARP round (0.8 s) is done.
    let n = counts(&console).len();
    let printed = wait_count(&console, n + 100);
    assert_consecutive(&printed);
    let net0 = device(&dsock, "net0");
    assert_eq!(net0["announce_frames"], 5, "{net0}");
    assert!(net0["tx_packets"].as_u64().unwrap() >= 100, "{net0}");
    let r = dst.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    let printed = counts(&console);
    // tshark has seen the last frames.
    let b = cap_b.up_to(NIC_MAC, *printed.last().unwrap());
    assert_moved_and_announced(&cap_a.from(NIC_MAC), &b, &printed);
}
