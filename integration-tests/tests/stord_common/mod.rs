//! Helpers shared by the `stord_*` end-to-end tests: a stord instance with its own
//! state directory, port and sockets, and small runners for the real NBD clients.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use integration_tests::{bin, free_port, spawn_logged, wait_until, ChildGuard};

pub mod qcow2;

/// One disk of a test config.
pub struct DiskSpec<'a> {
    pub name: &'a str,
    pub size: &'a str,
    pub alloc: &'a str,
    pub read_only: bool,
}

/// A dynamic read-write disk.
pub fn dynamic<'a>(name: &'a str, size: &'a str) -> DiskSpec<'a> {
    DiskSpec {
        name,
        size,
        alloc: "dynamic",
        read_only: false,
    }
}

/// A fixed read-write disk.
pub fn fixed<'a>(name: &'a str, size: &'a str) -> DiskSpec<'a> {
    DiskSpec {
        name,
        size,
        alloc: "fixed",
        read_only: false,
    }
}

/// A dynamic read-only disk.
pub fn read_only<'a>(name: &'a str, size: &'a str) -> DiskSpec<'a> {
    DiskSpec {
        read_only: true,
        ..dynamic(name, size)
    }
}

/// A running stord with everything in its own temp dir.
pub struct Stord {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<ChildGuard>,
    /// Environment of the next (re)start, e.g. `STORD_CRASH_AT`.
    pub env: Vec<(String, String)>,
}

impl Stord {
    /// Writes a config for `disks` and starts stord on it.
    pub fn start(disks: &[DiskSpec<'_>]) -> Result<Stord> {
        Self::start_in(&std::env::temp_dir(), disks)
    }

    /// Like `start`, with the state (and sockets) under `base`, e.g. a tmpfs.
    pub fn start_in(base: &Path, disks: &[DiskSpec<'_>]) -> Result<Stord> {
        Self::start_with(base, "", disks)
    }

    /// What the attack and limit tests start with: root checked, then stord under
    /// the temporary directory with the `extra` top-level TOML lines (the limits
    /// under test) and `disks`.
    pub fn limited(extra: &str, disks: &[DiskSpec<'_>]) -> Stord {
        integration_tests::require_root();
        Self::start_with(&std::env::temp_dir(), extra, disks).expect("start stord")
    }

    /// Like `start_in`, with `extra` top-level TOML lines added to the config.
    pub fn start_with(base: &Path, extra: &str, disks: &[DiskSpec<'_>]) -> Result<Stord> {
        let dir = tempfile::tempdir_in(base)?;
        let port = free_port();
        let mut cfg = format!(
            "listen = \"127.0.0.1:{port}\"\nunix = \"{}\"\ncontrol = \"{}\"\nstate_dir = \"{}\"\n",
            dir.path().join("nbd.sock").display(),
            dir.path().join("control.sock").display(),
            dir.path().join("state").display()
        );
        cfg.push_str(extra);
        for d in disks {
            cfg.push_str(&format!(
                "[[disk]]\nname = \"{}\"\nsize = \"{}\"\nalloc = \"{}\"\nread_only = {}\n",
                d.name, d.size, d.alloc, d.read_only
            ));
        }
        std::fs::write(dir.path().join("stord.toml"), cfg)?;
        let mut s = Stord {
            dir,
            port,
            child: None,
            env: Vec::new(),
        };
        s.restart()?;
        Ok(s)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("stord.toml")
    }
    pub fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }
    pub fn unix(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("stord.log")
    }
    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }
    /// `nbd+unix:///NAME?socket=PATH`
    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{}?socket={}", name, self.unix().display())
    }

    /// (Re)starts stord on the same config and state, waits until it serves.
    pub fn restart(&mut self) -> Result<()> {
        self.child = None;
        let mut guard = spawn_logged(
            Command::new(bin("stord"))
                .args(["serve", "--config"])
                .arg(self.config())
                .env("STORD_LOG", "debug")
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            &self.log(),
        )?;
        let port = self.port;
        let control = self.control();
        let up = wait_until(Duration::from_secs(10), || {
            control.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !up {
            let st = guard.child().try_wait()?;
            bail!(
                "stord did not come up (status {st:?}); log:\n{}",
                self.log_text()
            );
        }
        self.child = Some(guard);
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Runs `stord disk ARGS --control SOCK`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("stord"))
            .args(args)
            .arg("--control")
            .arg(self.control())
            .stdin(Stdio::null())
            .output()
            .expect("run stord CLI")
    }

    /// The `disk list --json` entry of disk `name` (the test fails without one).
    pub fn disk_entry(&self, name: &str) -> serde_json::Value {
        let out = self.cli(&["disk", "list", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no disk {name} in {v}"))
    }

    /// SIGKILLs the daemon.
    pub fn kill(&mut self) {
        if let Some(mut g) = self.child.take() {
            g.signal(libc::SIGKILL);
            g.wait_timeout(Duration::from_secs(5));
        }
    }
}

/// Runs a command, fails with its output unless it succeeds; returns stdout.
pub fn ok(cmd: &mut Command) -> Result<String> {
    let out = integration_tests::run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nbdinfo --size URI`: the export's size as nbdinfo prints it, or nbdinfo's
/// whole output where it failed (the server refused the connection or the export).
pub fn nbd_size(uri: &str) -> std::result::Result<String, std::process::Output> {
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .output()
        .expect("run nbdinfo");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(out)
    }
}

/// A python3 command (with libnbd's `nbd` module) that runs `script`, written to a
/// file of its own in `dir`, with `args`.
/// Goes before every script [`python`] and [`spawn_python`] run: the raw-socket
/// clients' one reader, `recv_exact(sock, n)` (EOFError when the peer closes first).
const PY_PRELUDE: &str = r#"
def recv_exact(sock, n):
    b = b''
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise EOFError('closed')
        b += c
    return b
"#;

fn python_command(dir: &Path, script: &str, args: &[impl AsRef<OsStr>]) -> Result<Command> {
    let path = dir.join(format!("{}.py", integration_tests::unique_name("py")));
    std::fs::write(&path, [PY_PRELUDE, script].concat())?;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(&path).args(args);
    Ok(cmd)
}

/// Runs a python3 script (with libnbd's `nbd` module) with `args`; returns stdout.
pub fn python(dir: &Path, script: &str, args: &[impl AsRef<OsStr>]) -> Result<String> {
    ok(&mut python_command(dir, script, args)?)
}

/// Starts a python3 script (see [`python`]) the test talks to: its stdin and stdout
/// piped, its stderr to `stderr`; killed on drop.
pub fn spawn_python(
    dir: &Path,
    script: &str,
    args: &[impl AsRef<OsStr>],
    stderr: Stdio,
) -> Result<ChildGuard> {
    let child = python_command(dir, script, args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("spawn python3")?;
    Ok(ChildGuard::new(child))
}

/// A client that connects to the export `uri`, prints `up` (on its piped stdout) and
/// holds the connection open for a minute; killed on drop.
pub fn holder(uri: &str) -> ChildGuard {
    ChildGuard::new(
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import nbd, sys, time; h = nbd.NBD(); h.connect_uri(sys.argv[1]); print('up', flush=True); time.sleep(60)",
                uri,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3"),
    )
}

/// qemu-io on an NBD URI with the given `-c` commands; returns stdout, fails if
/// any command reported a failure (qemu-io prints "Pattern verification failed"
/// or "... failed:" but may still exit 0).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let out = ok(&mut c)?;
    if out.contains("verification failed") || out.contains("failed:") {
        bail!("qemu-io reported a failure:\n{out}");
    }
    Ok(out)
}

/// A tiny deterministic random source (xorshift64): seeded from the clock or
/// a variable and printed by the tests, so a failing run can be repeated.
/// The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Blocks the crash writer writes in one round.
const PER_ROUND: u64 = 4096;
/// 4 KiB blocks of the 64 MiB export the crash writer writes in.
const CRASH_BLOCKS: u64 = 16384;

pub const WRITER: &str = r#"
import struct, sys, nbd
uri, rnd, first, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn() and a.can_fua()
for i in range(int(sys.argv[4])):
    block = (first + i) * stride % 16384  # CRASH_BLOCKS
    data = struct.pack(">QQQ", 0xC0FFEE, rnd, block) * (4096 // 24) + b"\0" * (4096 % 24)
    if i % 2 == 0:
        b.pwrite(data, block * 4096, nbd.CMD_FLAG_FUA)   # FUA write
    else:
        a.pwrite(data, block * 4096)                     # plain write on one connection
        b.flush()                                        # flush on the other covers it
    print(block, flush=True)
"#;

pub const VERIFY: &str = r#"
import struct, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
bad = []
for line in open(sys.argv[2]):
    rnd, block = map(int, line.split())
    want = struct.pack(">QQQ", 0xC0FFEE, rnd, block) * (4096 // 24) + b"\0" * (4096 % 24)
    if h.pread(4096, block * 4096) != want:
        bad.append((rnd, block))
print("checked", sum(1 for _ in open(sys.argv[2])), "bad", bad[:10])
assert not bad
"#;

/// The durability promise under crashes, on export `export` (64 MiB at
/// least) of `s`: for each of `rounds`, a writer (libnbd, two connections of
/// one multi-conn client) gets FUA writes and flushes acknowledged, 4 KiB
/// blocks `stride` blocks apart (an odd stride: all distinct), while stord is
/// SIGKILLed at a random moment; after each restart every acknowledged block
/// reads back exactly, and `after_restart(s, round)` checks what else the
/// test wants. Limit of what this proves: SIGKILL keeps the host's page
/// cache, so it checks that stord acknowledges only what it has written (and
/// orders flushes across connections), not the platter.
pub fn crash_rounds(
    s: &mut Stord,
    export: &str,
    rounds: u64,
    stride: u64,
    mut after_restart: impl FnMut(&Stord, u64),
) {
    assert!(rounds * PER_ROUND <= CRASH_BLOCKS);
    let acked_file = s.dir.path().join("acked.txt");
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut rand = move || rng.next();
    let mut killed_mid_write = 0;
    for round in 0..rounds {
        let first = round * PER_ROUND;
        let args = [
            s.uri(export),
            round.to_string(),
            first.to_string(),
            PER_ROUND.to_string(),
            stride.to_string(),
        ];
        let mut w = spawn_python(s.dir.path(), WRITER, &args, Stdio::null()).unwrap();
        let stdout = w.child().stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut blocks = Vec::new();
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(b) = l.trim().parse::<u64>() {
                    if blocks.is_empty() {
                        let _ = first_tx.send(());
                    }
                    blocks.push(b);
                }
            }
            blocks
        });
        // Once the writer is going (first acknowledgement), kill at a random
        // point while it is busy.
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the writer got its first acknowledgement");
        std::thread::sleep(Duration::from_millis(rand() % 300));
        s.kill();
        let st = w
            .wait_timeout(Duration::from_secs(20))
            .expect("writer ends once stord is gone");
        if !st.success() {
            killed_mid_write += 1;
        }
        let blocks = reader.join().unwrap();
        for b in &blocks {
            acked.insert(*b, round);
        }
        let list: String = acked.iter().map(|(b, r)| format!("{r} {b}\n")).collect();
        std::fs::write(&acked_file, list).unwrap();

        s.restart().unwrap();
        let out = python(
            s.dir.path(),
            VERIFY,
            &[&s.uri(export), acked_file.to_str().unwrap()],
        )
        .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        assert!(out.contains("bad []"), "round {round}: {out}");
        after_restart(s, round);
        eprintln!(
            "round {round}: {} acknowledged blocks in this round, all {} verified",
            blocks.len(),
            acked.len()
        );
    }
    assert!(!acked.is_empty(), "the writer never got an acknowledgement");
    assert!(
        killed_mid_write >= 1,
        "stord was never killed while the writer was busy"
    );
}
