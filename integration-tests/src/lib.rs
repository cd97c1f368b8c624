//! Shared helpers for the fabric's end-to-end tests.
//!
//! The tests drive the real daemons (`netd`, `stord`, `vmm-shim`, built into the
//! same target directory as the test binary) against real peers: clients from Debian
//! packages, TAP devices, network namespaces, QEMU. They need root (CI runs them as
//! root) and the guest assets that `scripts/guest-assets.sh` prepares.
//!
//! Every helper that creates a host resource (a namespace, a process) removes it on
//! drop, so a failing test leaves the host as it found it. Names are unique per
//! process and per call so tests can run in parallel.

pub mod metrics;
pub mod netd;

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits inside the workspace")
        .to_path_buf()
}

/// Path of a binary of the workspace, built in the same profile as this test.
///
/// The test binary lives in `target/<profile>/deps/`; the daemons in
/// `target/<profile>/`. Panics with a clear message if the binary was not built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test binary has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins, same profile)",
        path.display()
    );
    path
}

/// Fails the test unless it runs as root: these tests create TAPs and namespaces.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this end-to-end test needs root (CI runs as root)");
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, usable as an interface or
/// namespace name (at most 15 bytes): `prefix` must be at most 5 bytes.
pub fn unique_name(prefix: &str) -> String {
    assert!(prefix.len() <= 5, "prefix too long for an interface name");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() & 0xffff)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Runs a command, returns its output; errors name the command and show stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Spawns `cmd` with its stdin from /dev/null and its stdout and stderr appended to
/// the file `log` (a daemon's log, a console), guarded: killed on drop.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<ChildGuard> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    Ok(ChildGuard::new(child))
}

/// Runs `cmd` (its stdin from /dev/null), which must fail with exit status `code`
/// (a clear error, not a crash); returns its stderr.
pub fn run_failing(cmd: &mut Command, code: i32) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{cmd:?}: {err}");
    err
}

/// Runs a shell command line with `sh -c`; errors show its output.
pub fn sh(line: &str) -> Result<String> {
    let out = run(Command::new("sh").arg("-c").arg(line))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The elements of the JSON array `v` (a CLI's `--json` list); panics, naming `v`,
/// if it is not an array.
pub fn items(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {v}"))
}

/// Whether an element of the JSON array `v` (see [`items`]) satisfies `pred`.
pub fn has_item(v: &serde_json::Value, pred: impl FnMut(&serde_json::Value) -> bool) -> bool {
    items(v).iter().any(pred)
}

/// A network namespace created for one test, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up.
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command line that runs what follows it inside the namespace.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// A `Command` that runs `argv` inside the namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let [ip, rest @ ..] = self.exec_prefix();
        let mut c = Command::new(ip);
        c.args(rest).args(argv);
        c
    }

    /// Runs `argv` in the namespace; fails if it exits non-zero.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        run(&mut self.command(argv))
    }

    /// Makes a veth pair: `local` here, `peer` in the namespace named `peer_ns`
    /// (both down, no addresses).
    pub fn veth_to(&self, local: &str, peer: &str, peer_ns: &str) -> Result<Output> {
        self.exec(&[
            "ip", "link", "add", local, "type", "veth", "peer", "name", peer, "netns", peer_ns,
        ])
    }

    /// Runs a shell line in the namespace; returns stdout.
    pub fn sh(&self, line: &str) -> Result<String> {
        let out = self.exec(&["sh", "-c", line])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running process in the namespace, killed on drop of the guard.
    pub fn spawn(&self, argv: &[&str]) -> Result<ChildGuard> {
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {argv:?} in {}", self.name))?;
        Ok(ChildGuard::new(child))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then delete the namespace.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Wraps a spawned child.
    pub fn new(child: Child) -> Self {
        ChildGuard { child: Some(child) }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Mutable access to the child (to wait on it, read its pipes).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with a pid we own; a stale pid only yields ESRCH.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Waits up to `timeout` for the child to exit; returns its status if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child().try_wait() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The guest-asset directory, ready or not: `FABRIC_ASSETS`, else
/// `<workspace>/target/guest-assets`.
fn guest_assets_dir() -> PathBuf {
    std::env::var_os("FABRIC_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest-assets"))
}

/// Where `scripts/guest-assets.sh` put QEMU, the Debian kernel and busybox.
///
/// `FABRIC_ASSETS` overrides the default `<workspace>/target/guest-assets`.
pub fn guest_assets() -> PathBuf {
    let dir = guest_assets_dir();
    assert!(
        dir.join("READY").exists(),
        "guest assets missing in {}: run scripts/guest-assets.sh first",
        dir.display()
    );
    dir
}

/// Why the guest assets cannot be had on this machine, where `scripts/test.sh` found
/// that Debian's archive did not answer and wrote the reason to `UNAVAILABLE` in the
/// asset directory; `None` when they are ready (or were never asked for: then
/// [`guest_assets`] fails the test, as a missing set-up must).
pub fn guest_assets_unavailable() -> Option<String> {
    let dir = guest_assets_dir();
    if dir.join("READY").exists() {
        return None;
    }
    std::fs::read_to_string(dir.join("UNAVAILABLE"))
        .ok()
        .map(|r| r.trim().to_string())
}

/// One guest test: its name and its body.
pub type GuestTest<'a> = (&'a str, fn() -> Result<()>);

/// The `main` of a test file that boots a Linux guest under QEMU (`harness = false`
/// in Cargo.toml): runs each test in turn and prints `BIN: NAME ... ok`, or
/// `BIN: NAME ... NOT RUN: REASON` for all of them where the guest assets could not
/// be fetched, so a guest test that did not run is never counted as passed. A
/// failing test panics with its error, which fails the binary. The last line is the
/// harness's own summary form, which `scripts/test.sh` adds up.
pub fn run_guest_tests(bin: &str, tests: &[GuestTest]) {
    if let Some(reason) = guest_assets_unavailable() {
        for (name, _) in tests {
            println!("{bin}: {name} ... NOT RUN: guest assets unavailable: {reason}");
        }
        println!("test result: ok. 0 passed; 0 failed; 0 ignored");
        return;
    }
    for (name, test) in tests {
        if let Err(e) = test() {
            panic!("{bin}: {name} failed: {e:?}");
        }
        println!("{bin}: {name} ... ok");
    }
    println!(
        "test result: ok. {} passed; 0 failed; 0 ignored",
        tests.len()
    );
}

/// `fn main` of a guest test file (see [`run_guest_tests`]):
/// `guest_tests_main!("BIN", test_a, test_b)` runs the functions named, each test
/// named after its function.
#[macro_export]
macro_rules! guest_tests_main {
    ($bin:literal, $($test:ident),+ $(,)?) => {
        fn main() {
            let tests: &[$crate::GuestTest] = &[$((stringify!($test), $test)),+];
            $crate::run_guest_tests($bin, tests);
        }
    };
}
