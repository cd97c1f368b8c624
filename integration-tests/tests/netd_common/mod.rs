//! Helpers shared by the `netd_*` end-to-end tests: a netd daemon running in its
//! own "host" namespace with a temporary config, state and control socket, its
//! CLI, and test hosts (namespaces) that get addresses with busybox udhcpc.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration_tests::{bin, run, wait_until, ChildGuard, Netns};

/// A running `netd serve`, inside the namespace `host`.
pub struct Netd {
    pub child: ChildGuard,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub config: PathBuf,
}

/// A per-test temporary directory (kept in a TempDir owned by the caller).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("netd-test")
        .tempdir()
        .expect("tempdir")
}

/// Writes `networks` (TOML `[[network]]` tables) into a config under `dir`.
pub fn write_config(dir: &Path, networks: &str) -> PathBuf {
    let control = dir.join("control.sock");
    let state = dir.join("state");
    let text = format!(
        "control = \"{}\"\nstate_dir = \"{}\"\n\n{}",
        control.display(),
        state.display(),
        networks
    );
    let path = dir.join("netd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

impl Netd {
    /// Starts netd in `host` with the config at `config` (from [`write_config`]);
    /// waits until the control socket answers.
    pub fn start(host: &Netns, dir: &Path, config: &Path) -> Result<Self> {
        let control = dir.join("control.sock");
        let _ = std::fs::remove_file(&control);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("netd.log"))?;
        let child = host
            .command(&[
                bin("netd").to_str().unwrap(),
                "serve",
                "--config",
                config.to_str().unwrap(),
            ])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn netd")?;
        let mut d = Netd {
            child: ChildGuard::new(child),
            dir: dir.to_path_buf(),
            control: control.clone(),
            config: config.to_path_buf(),
        };
        let ok = wait_until(Duration::from_secs(10), || {
            control.exists() && d.cli(&["net", "list"]).is_ok()
        });
        if !ok {
            let status = d.child.wait_timeout(Duration::from_millis(10));
            bail!("netd did not come up (exit: {status:?}); log:\n{}", d.log());
        }
        Ok(d)
    }

    /// netd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("netd.log")).unwrap_or_default()
    }

    /// Runs the CLI with `--control`; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new(bin("netd"))
            .arg("--control")
            .arg(&self.control)
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the CLI and parses its JSON output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let s = self.cli(args)?;
        serde_json::from_str(&s).with_context(|| format!("CLI output is not JSON: {s}"))
    }

    /// The counters of port `port` of `net`.
    pub fn counters(&self, net: &str, port: &str) -> Result<serde_json::Value> {
        let v = self.cli_json(&["port", "list", net])?;
        v.as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == port))
            .map(|p| p["counters"].clone())
            .with_context(|| format!("no port {port} in {v}"))
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        self.child.signal(libc::SIGTERM);
        matches!(self.child.wait_timeout(Duration::from_secs(10)), Some(s) if s.success())
    }
}

/// Writes a udhcpc event script that configures the interface and records the
/// address in `<dir>/lease-<iface>`.
pub fn udhcpc_script(dir: &Path) -> PathBuf {
    let path = dir.join("udhcpc.sh");
    let text = format!(
        "#!/bin/sh\ncase \"$1\" in\n  bound|renew)\n    ip addr flush dev \"$interface\"\n    ip addr add \"$ip/$mask\" dev \"$interface\"\n    echo \"$ip $mask $router $dns\" > {}/lease-\"$interface\"\n    ;;\nesac\nexit 0\n",
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs busybox udhcpc once on `iface` in `ns`; returns the leased address.
pub fn dhcp(ns: &Netns, iface: &str, dir: &Path) -> Result<String> {
    let script = udhcpc_script(dir);
    let _ = std::fs::remove_file(dir.join(format!("lease-{iface}")));
    ns.exec(&[
        "busybox",
        "udhcpc",
        "-i",
        iface,
        "-s",
        script.to_str().unwrap(),
        "-q",
        "-n",
        "-f",
        "-t",
        "5",
        "-T",
        "1",
    ])
    .context("udhcpc")?;
    let lease = std::fs::read_to_string(dir.join(format!("lease-{iface}")))
        .context("udhcpc wrote no lease")?;
    Ok(lease
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Whether `ns` can ping `addr` (a few tries, short timeout).
pub fn ping(ns: &Netns, addr: &str) -> bool {
    ns.command(&["ping", "-c", "1", "-W", "1", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pings until one answer or `tries` failures.
pub fn ping_retry(ns: &Netns, addr: &str, tries: u32) -> bool {
    (0..tries).any(|_| ping(ns, addr))
}

/// A /24 unique to this test process and call: 10.<a>.<b>.0.
pub fn unique_subnet() -> (u8, u8) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    (
        100 + (pid % 100) as u8,
        ((pid / 100) as u8).wrapping_add(n as u8 * 37),
    )
}
