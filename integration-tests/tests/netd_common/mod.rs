//! Helpers shared by the `netd_*` end-to-end tests: a netd daemon running in its
//! own "host" namespace with a temporary config, state and control socket, its
//! CLI, test hosts (namespaces, see [`TapHost`]) that get addresses with busybox
//! udhcpc, and QEMU guests booted from a busybox initramfs.

// Each test file uses a different subset, re-exports included.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
pub use integration_tests::netd::{network, port_add, stream_port, tap_port, TapHost};
use integration_tests::{bin, run, spawn_logged, wait_until, ChildGuard, Netns};

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

/// What a netd test that needs root starts with (all but the config checks do):
/// checks that it runs as root, and makes its temporary directory.
pub fn root_tempdir() -> tempfile::TempDir {
    integration_tests::require_root();
    tempdir()
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
        Self::start_env(host, dir, config, &[])
    }

    /// Writes the config `networks` (see [`write_config`]) in `dir` and starts netd
    /// with it in `host`.
    pub fn start_with(host: &Netns, dir: &Path, networks: &str) -> Result<Self> {
        Self::start(host, dir, &write_config(dir, networks))
    }

    /// [`Netd::start`] with extra environment variables for netd.
    pub fn start_env(
        host: &Netns,
        dir: &Path,
        config: &Path,
        env: &[(&str, &Path)],
    ) -> Result<Self> {
        let control = dir.join("control.sock");
        let _ = std::fs::remove_file(&control);
        let child = spawn_logged(
            host.command(&[
                bin("netd").to_str().unwrap(),
                "serve",
                "--config",
                config.to_str().unwrap(),
            ])
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied()),
            &dir.join("netd.log"),
        )?;
        let mut d = Netd {
            child,
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

    /// Runs the CLI with `--json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut argv = args.to_vec();
        argv.push("--json");
        let s = self.cli(&argv)?;
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

    /// Stops netd (it must exit successfully) and starts it again in `host` with
    /// the same directory and config.
    pub fn restart(self, host: &Netns) -> Result<Self> {
        let (dir, config) = (self.dir.clone(), self.config.clone());
        anyhow::ensure!(self.stop(), "netd did not exit cleanly");
        Self::start(host, &dir, &config)
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        self.child.signal(libc::SIGTERM);
        matches!(self.child.wait_timeout(Duration::from_secs(10)), Some(s) if s.success())
    }
}

/// Runs netd's CLI against `netd`, which must fail (exit status 1, a clear error);
/// returns its stderr.
pub fn cli_fails(netd: &Netd, args: &[&str]) -> String {
    integration_tests::run_failing(
        Command::new(bin("netd"))
            .arg("--control")
            .arg(&netd.control)
            .args(args),
        1,
    )
}

/// Writes a udhcpc event script that configures the interface and records the
/// address (and the options netd sent, `domain=` and `hostname=` last) in
/// `<dir>/lease-<iface>`.
pub fn udhcpc_script(dir: &Path) -> PathBuf {
    let path = dir.join("udhcpc.sh");
    let text = format!(
        "#!/bin/sh\ncase \"$1\" in\n  bound|renew)\n    ip addr flush dev \"$interface\"\n    ip addr add \"$ip/$mask\" dev \"$interface\"\n    echo \"$ip $mask $serverid $router $dns domain=$domain hostname=$hostname\" > {}/lease-\"$interface\"\n    ;;\nesac\nexit 0\n",
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs busybox udhcpc once on `iface` in `ns`; returns the leased address.
pub fn dhcp(ns: &Netns, iface: &str, dir: &Path) -> Result<String> {
    dhcp_with(ns, iface, dir, &[])
}

/// [`dhcp`] with `extra` udhcpc arguments (e.g. `-x hostname:NAME`).
pub fn dhcp_with(ns: &Netns, iface: &str, dir: &Path, extra: &[&str]) -> Result<String> {
    let script = udhcpc_script(dir);
    let _ = std::fs::remove_file(dir.join(format!("lease-{iface}")));
    let mut argv = vec![
        "busybox",
        "udhcpc",
        "-i",
        iface,
        "-s",
        script.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    argv.extend_from_slice(&["-q", "-n", "-f", "-t", "5", "-T", "1"]);
    ns.exec(&argv).context("udhcpc")?;
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

/// The start of every guest's init: the kernel's file systems, the virtio modules
/// (mk-initramfs puts `/load-modules` in), loopback and eth0 up.
const INIT_HEAD: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
/load-modules
ip link set lo up
ip link set eth0 up
";

/// Builds a busybox initramfs (with the lead's `scripts/mk-initramfs.sh`) in `dir`
/// whose init runs the shell lines `body` after [`INIT_HEAD`]; returns its path.
pub fn initramfs(dir: &Path, body: &str) -> Result<PathBuf> {
    let init = dir.join("init.sh");
    std::fs::write(&init, format!("{INIT_HEAD}{body}"))?;
    let out = dir.join("initramfs.cpio.gz");
    let script = integration_tests::workspace_root().join("scripts/mk-initramfs.sh");
    let assets = integration_tests::guest_assets();
    run(Command::new(script)
        .arg(&out)
        .arg(&init)
        .env("FABRIC_ASSETS", &assets))?;
    Ok(out)
}

/// Builds a busybox initramfs (see [`initramfs`]) whose init gets an address by
/// DHCP on eth0, pings `target` and reports on the serial console; returns its path.
pub fn guest_initramfs(dir: &Path, target: &str) -> Result<PathBuf> {
    guest_initramfs_with(dir, target, "")
}

/// [`guest_initramfs`] with extra shell lines run after the ping.
pub fn guest_initramfs_with(dir: &Path, target: &str, extra: &str) -> Result<PathBuf> {
    initramfs(
        dir,
        &format!(
            r#"# Debian busybox looks for /etc/udhcpc/default.script; mk-initramfs puts it here.
if udhcpc -i eth0 -q -n -t 15 -T 1 -s /usr/share/udhcpc/default.script; then
  echo "DHCP-OK $(ip -4 -o addr show dev eth0 | awk '{{print $4}}')"
else
  echo DHCP-FAIL
fi
if ping -c 3 -W 2 {target}; then echo PING-OK; else echo PING-FAIL; fi
{extra}
echo GUEST-DONE
sleep 600
"#
        ),
    )
}

/// QEMU's command line up to the devices: TCG, microvm, one vCPU and `mem_mib` MiB,
/// the Debian kernel with the initramfs `initrd`, the serial console on stdout;
/// a test adds its `-netdev`, `-device` and other options.
pub fn microvm_argv(initrd: &Path, mem_mib: u32) -> Vec<String> {
    let assets = integration_tests::guest_assets();
    let path = |p: PathBuf| p.display().to_string();
    let mut argv = vec![path(assets.join("bin/qemu-system-x86_64"))];
    argv.extend(
        [
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-no-reboot",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-append",
            "console=ttyS0 tsc_early_khz=2000000 panic=-1 quiet",
        ]
        .map(String::from),
    );
    argv.extend([
        "-m".into(),
        mem_mib.to_string(),
        "-kernel".into(),
        path(assets.join("vmlinux")),
        "-initrd".into(),
        path(initrd.to_path_buf()),
    ]);
    argv
}

/// Boots QEMU (TCG, microvm, the Debian kernel) in `ns` with the virtio-net
/// backend `netdev` (a `-netdev` argument with id `n0`) and MAC `mac`; waits until
/// the guest prints GUEST-DONE (or `timeout`); returns the serial console output.
pub fn boot_guest(
    ns: &Netns,
    dir: &Path,
    initrd: &Path,
    netdev: &str,
    mac: &str,
    timeout: Duration,
) -> Result<String> {
    let console = dir.join(format!(
        "console-{}.log",
        integration_tests::unique_name("c")
    ));
    let mut argv = microvm_argv(initrd, 256);
    argv.extend([
        "-netdev".into(),
        netdev.into(),
        "-device".into(),
        format!("virtio-net-device,netdev=n0,mac={mac}"),
    ]);
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut guard = spawn_logged(&mut ns.command(&args), &console)?;
    let done = wait_until(timeout, || {
        std::fs::read_to_string(&console)
            .map(|s| s.contains("GUEST-DONE"))
            .unwrap_or(false)
            || matches!(guard.child().try_wait(), Ok(Some(_)))
    });
    drop(guard);
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    if !done {
        bail!("guest did not finish in {timeout:?}; console:\n{out}");
    }
    Ok(out)
}

/// Asks netd (through the CLI) for a `tap` port `name` on `net`, its TAP `ifname` in
/// `ns`; returns the CLI's output.
pub fn add_tap_port(
    netd: &Netd,
    net: &str,
    ifname: &str,
    ns: &Netns,
    name: &str,
) -> Result<String> {
    netd.cli(&[
        "port",
        "add",
        net,
        "--kind",
        "tap",
        "--ifname",
        ifname,
        "--netns",
        ns.name(),
        "--name",
        name,
    ])
}

/// Another network linked to `host`: a fresh namespace (named after `prefix`) and a
/// veth pair to it on `{net}.0/24`, `{net}.1` the host's side and `{net}.2` the
/// namespace's, both up. Returns the namespace.
pub fn link_beyond(host: &Netns, prefix: &str, net: &str) -> Result<Netns> {
    let beyond = Netns::new(prefix)?;
    let (vh, vb) = (
        integration_tests::unique_name("vh"),
        integration_tests::unique_name("vb"),
    );
    host.veth_to(&vh, &vb, beyond.name())?;
    host.exec(&["ip", "addr", "add", &format!("{net}.1/24"), "dev", &vh])?;
    host.exec(&["ip", "link", "set", &vh, "up"])?;
    beyond.exec(&["ip", "addr", "add", &format!("{net}.2/24"), "dev", &vb])?;
    beyond.exec(&["ip", "link", "set", &vb, "up"])?;
    Ok(beyond)
}

/// Asks netd (through the CLI) for a `vm` port on `net` with the TAP `ifname`, and
/// `extra` options (`--mac M`, `--persistent`); returns the CLI's output.
pub fn add_vm_port(netd: &Netd, net: &str, ifname: &str, extra: &[&str]) -> Result<String> {
    netd.cli(&port_add(net, "vm", ifname, extra))
}

/// Runs a 2-second iperf3 TCP test from `client` to an iperf3 server started in
/// `server` on `addr`; returns the received bits per second.
pub fn iperf3_bps(client: &Netns, server: &Netns, addr: &str) -> Result<f64> {
    let _server = server.spawn(&["iperf3", "-s", "-1", "-B", addr])?;
    let listening = format!("{addr}:5201");
    if !wait_until(Duration::from_secs(5), || {
        server
            .sh("ss -ltn")
            .map(|s| s.contains(&listening))
            .unwrap_or(false)
    }) {
        bail!("iperf3 server did not listen on {listening}");
    }
    let out = client.exec(&["iperf3", "-c", addr, "-t", "2", "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no throughput")
}

/// Asserts the guest console output `out` (from [`boot_guest`]) shows a lease of
/// `cidr` and a successful ping of the test host; `what` names the run.
pub fn assert_guest_leased_and_pinged(out: &str, cidr: &str, what: &str) {
    assert!(
        out.contains(&format!("DHCP-OK {cidr}")),
        "{what}: no lease of {cidr}:\n{out}"
    );
    assert!(
        out.contains("PING-OK"),
        "{what}: guest did not ping the test host:\n{out}"
    );
}

/// Writes a resolv.conf naming 127.0.0.1 (a resolver in netd's own namespace, or
/// none) into `dir`, for the DNS forwarder of a nat network; returns its path.
pub fn loopback_resolv_conf(dir: &Path) -> Result<PathBuf> {
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n")?;
    Ok(resolv)
}

/// The `resolv_conf` key (a line of a `[[network]]` table) naming a
/// [`loopback_resolv_conf`] written into `dir`.
pub fn loopback_resolv_key(dir: &Path) -> Result<String> {
    let resolv = loopback_resolv_conf(dir)?;
    Ok(format!("resolv_conf = \"{}\"\n", resolv.display()))
}

/// Starts netd in a fresh namespace (named after `prefix`) with the config
/// `networks` (see [`write_config`]) in `dir`; returns the namespace and netd.
pub fn start_netd(dir: &Path, prefix: &str, networks: &str) -> Result<(Netns, Netd)> {
    let host = Netns::new(prefix)?;
    let netd = Netd::start_with(&host, dir, networks)?;
    Ok((host, netd))
}

/// Starts netd (see [`start_netd`]) with one internal network `lan` whose ports `a`
/// and `b` are TAPs of two fresh test hosts, addressed `<subnet>.1/24` and
/// `<subnet>.2/24`; `prefixes` name the namespaces of netd, `a` and `b`.
pub fn lan_of_two(
    dir: &Path,
    prefixes: [&str; 3],
    subnet: &str,
) -> Result<(Netns, Netd, [TapHost; 2])> {
    lan_of_two_and(dir, prefixes, subnet, "")
}

/// [`lan_of_two`] with more ports on `lan`: `ports`, `[[network.port]]` tables
/// (e.g. from [`stream_port`]).
pub fn lan_of_two_and(
    dir: &Path,
    prefixes: [&str; 3],
    subnet: &str,
    ports: &str,
) -> Result<(Netns, Netd, [TapHost; 2])> {
    let [h, pa, pb] = prefixes;
    let [a, b] = TapHost::each([pa, pb])?;
    let lan = [
        network("lan", "internal", ""),
        a.port("a"),
        b.port("b"),
        ports.to_string(),
    ]
    .concat();
    let (host, netd) = start_netd(dir, h, &lan)?;
    a.addr(&format!("{subnet}.1/24"))?;
    b.addr(&format!("{subnet}.2/24"))?;
    Ok((host, netd, [a, b]))
}

/// A drop counter of port `port` (from `port list --drops --json`), 0 if absent.
pub fn drops(netd: &Netd, net: &str, port: &str, key: &str) -> u64 {
    netd.cli_json(&["port", "list", net, "--drops"])
        .ok()
        .map_or(0, |v| integration_tests::netd::port_counter(&v, port, key))
}
