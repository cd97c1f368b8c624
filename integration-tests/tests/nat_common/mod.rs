//! The lab the NAT and bridged tests share: a "host" namespace where netd runs, an
//! "internet" namespace routed from it, and guest namespaces on netd's networks.
//!
//! ```text
//!  guest ns --TAP-- [netd in host ns] --veth 198.18.0.1/24 -- 198.18.0.2 [inet ns]
//!                    127.0.0.1: httpd                          198.19.0.10 (lo):
//!                                                              httpd, dnsmasq, UDP echo
//! ```
//!
//! netd runs in its own namespace, so the "host loopback" the gateway address stands
//! for, the host's route to the "internet" and the resolv.conf it reads all belong to
//! the test: nothing touches the real host's networking, and tests run in parallel
//! with the same addresses. Only test addresses (198.18.0.0/15, the benchmarking
//! range) and loopback are used.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use integration_tests::netd::{dnsmasq_argv, network, port_counter, TapHost, UDHCPC_SCRIPT};
use integration_tests::{bin, spawn_logged, wait_until, ChildGuard, Netns};

/// The "internet" server address (on the internet namespace's loopback).
pub const INET_SERVER: &str = "198.19.0.10";
/// The "internet" server's IPv6 address (on the internet namespace's loopback, once
/// [`Lab::ipv6`] ran).
pub const INET_SERVER6: &str = "2001:db8:19::10";
/// The name dnsmasq answers with `INET_SERVER` (and `INET_SERVER6` for AAAA).
pub const INET_NAME: &str = "www.fabric.test";
/// The page both web servers serve.
pub const PAGE: &str = "hello from the fabric lab";

/// The host namespace, the internet namespace, and netd.
pub struct Lab {
    /// Where netd runs; its loopback is "the host's loopback".
    pub host: Netns,
    /// The "internet".
    pub inet: Netns,
    /// Scratch directory (config, state, web roots, resolv.conf).
    pub dir: tempfile::TempDir,
    /// The control socket.
    pub control: PathBuf,
    netd: Option<ChildGuard>,
    servers: Vec<ChildGuard>,
}

impl Lab {
    /// Builds the namespaces and the internet's servers (web, DNS, UDP echo).
    pub fn new() -> Result<Lab> {
        integration_tests::require_root();
        let host = Netns::new("nh")?;
        let inet = Netns::new("ni")?;
        let dir = tempfile::tempdir()?;
        let control = dir.path().join("netd.sock");
        let mut lab = Lab {
            host,
            inet,
            dir,
            control,
            netd: None,
            servers: Vec::new(),
        };
        lab.host.veth_to("hv0", "iv0", lab.inet.name())?;
        lab.host.sh("ip addr add 198.18.0.1/24 dev hv0 && ip link set hv0 up && ip route add 198.19.0.0/16 via 198.18.0.2")?;
        lab.inet.sh(&format!(
            "ip addr add 198.18.0.2/24 dev iv0 && ip link set iv0 up && ip addr add {INET_SERVER}/32 dev lo && ip route add default via 198.18.0.1"
        ))?;
        // Web roots.
        for (name, text) in [
            ("www-host", format!("{PAGE} (host)\n")),
            ("www-inet", format!("{PAGE} (internet)\n")),
        ] {
            let d = lab.dir.path().join(name);
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("index.html"), text)?;
        }
        // A big file for download tests.
        let big: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(lab.dir.path().join("www-host/big.bin"), &big)?;
        // The servers: the internet's web server, the host's (on its loopback), the
        // internet's DNS server and its UDP echo.
        let inet_http = format!("{INET_SERVER}:80");
        let mut dns_argv = dnsmasq_argv(
            INET_SERVER,
            &lab.dir.path().join("dnsmasq.pid"),
            INET_NAME,
            INET_SERVER,
        );
        dns_argv.push(format!("--address=/{INET_NAME}/{INET_SERVER6}"));
        let echo = format!("UDP4-RECVFROM:7777,bind={INET_SERVER},fork");
        let (www_inet, www_host) = (lab.path("www-inet"), lab.path("www-host"));
        let servers: [(&Netns, Vec<&str>); 4] = [
            (
                &lab.inet,
                vec!["busybox", "httpd", "-f", "-p", &inet_http, "-h", &www_inet],
            ),
            (
                &lab.host,
                vec![
                    "busybox",
                    "httpd",
                    "-f",
                    "-p",
                    "127.0.0.1:8080",
                    "-h",
                    &www_host,
                ],
            ),
            (&lab.inet, dns_argv.iter().map(String::as_str).collect()),
            (&lab.inet, vec!["socat", &echo, "EXEC:/bin/cat"]),
        ];
        let guards = servers
            .iter()
            .map(|(ns, argv)| ns.spawn(argv))
            .collect::<Result<Vec<_>>>()?;
        lab.servers.extend(guards);
        std::fs::write(
            lab.dir.path().join("resolv.conf"),
            format!("# test resolver\nnameserver {INET_SERVER}\n"),
        )?;
        std::fs::write(lab.dir.path().join("udhcpc.sh"), UDHCPC_SCRIPT)?;
        Command::new("chmod")
            .args(["+x", &lab.path("udhcpc.sh")])
            .status()?;
        // Servers up?
        let ok = wait_until(Duration::from_secs(5), || {
            lab.inet
                .sh(&format!(
                    "busybox wget -q -O - http://{INET_SERVER}/ >/dev/null"
                ))
                .is_ok()
                && lab
                    .host
                    .sh("busybox wget -q -O - http://127.0.0.1:8080/ >/dev/null")
                    .is_ok()
        });
        if !ok {
            bail!("lab web servers did not come up");
        }
        Ok(lab)
    }

    /// IPv6 in the lab (documentation addresses, 2001:db8::/32): the veth gets
    /// 2001:db8:18::1 / ::2, the internet's loopback `INET_SERVER6` (routed from the
    /// host), and web servers answer on `[INET_SERVER6]:80` and the host's
    /// `[::1]:8080`.
    pub fn ipv6(&mut self) -> Result<()> {
        self.host.sh(
            "ip addr add 2001:db8:18::1/64 dev hv0 nodad && ip -6 route add 2001:db8:19::/64 via 2001:db8:18::2",
        )?;
        self.inet.sh(&format!(
            "ip addr add 2001:db8:18::2/64 dev iv0 nodad && ip addr add {INET_SERVER6}/128 dev lo && ip -6 route add default via 2001:db8:18::1"
        ))?;
        let inet_http = format!("[{INET_SERVER6}]:80");
        let (www_inet, www_host) = (self.path("www-inet"), self.path("www-host"));
        let g = self
            .inet
            .spawn(&["busybox", "httpd", "-f", "-p", &inet_http, "-h", &www_inet])?;
        self.keep(g);
        let g = self.host.spawn(&[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "[::1]:8080",
            "-h",
            &www_host,
        ])?;
        self.keep(g);
        let ok = wait_until(Duration::from_secs(5), || {
            self.host
                .sh(&format!(
                    "curl -sSf -6 --max-time 2 http://[{INET_SERVER6}]/ >/dev/null && curl -sSf --max-time 2 http://[::1]:8080/ >/dev/null"
                ))
                .is_ok()
        });
        if !ok {
            bail!("the lab's IPv6 web servers did not come up");
        }
        Ok(())
    }

    /// A counter of a port's drops (`port list NET --drops --json`), 0 if absent.
    pub fn port_drops(&self, net: &str, port: &str, key: &str) -> u64 {
        self.cli(&["port", "list", net, "--drops", "--json"])
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .map_or(0, |v| port_counter(&v, port, key))
    }

    /// A path in the scratch directory, as a string.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Writes the config (with control, state_dir, and `networks` appended) and
    /// starts netd in the host namespace; waits for its control socket.
    pub fn start_netd(&mut self, networks: &str) -> Result<()> {
        self.start_netd_env(networks, &[])
    }

    /// Like [`Lab::start_netd`], with more environment variables for netd.
    pub fn start_netd_env(&mut self, networks: &str, env: &[(&str, &str)]) -> Result<()> {
        let cfg = format!(
            "control = \"{}\"\nstate_dir = \"{}\"\n{networks}",
            self.control.display(),
            self.path("state")
        );
        let cfg_path = self.dir.path().join("netd.toml");
        std::fs::write(&cfg_path, cfg)?;
        let netd = bin("netd");
        let mut cmd = self.host.command(&[
            netd.to_str().context("path")?,
            "serve",
            "--config",
            cfg_path.to_str().context("path")?,
        ]);
        cmd.env("RUST_LOG", "netd=debug");
        cmd.envs(env.iter().copied());
        self.netd = Some(spawn_logged(&mut cmd, &self.dir.path().join("netd.log"))?);
        let control = self.control.clone();
        if !wait_until(Duration::from_secs(10), || control.exists()) {
            bail!("netd did not come up:\n{}", self.netd_log());
        }
        Ok(())
    }

    /// The `[[network]]` table of a NAT network `name` whose DNS forwarder reads the
    /// lab's resolv.conf, with the network keys `keys` (or nothing).
    pub fn nat_network(&self, name: &str, keys: &str) -> String {
        let resolv = self.path("resolv.conf");
        network(name, "nat", &format!("resolv_conf = \"{resolv}\"\n{keys}"))
    }

    /// Starts netd with one NAT network `net` (plus the network keys in `extra`,
    /// e.g. `mtu = 65520`) whose only port, `g`, is a TAP in a fresh guest
    /// namespace; returns that guest.
    pub fn start_one_guest_nat(&mut self, net: &str, extra: &str) -> Result<TapHost> {
        let guest = TapHost::new("ng")?;
        let config = self.nat_network(net, &format!("{extra}\n")) + &guest.port("g");
        self.start_netd(&config)?;
        Ok(guest)
    }

    /// Sends SIGTERM to netd and waits up to 5 s; its exit status if it exited.
    pub fn stop_netd(&mut self) -> Option<std::process::ExitStatus> {
        let mut n = self.netd.take()?;
        n.signal(libc::SIGTERM);
        n.wait_timeout(Duration::from_secs(5))
    }

    /// netd's process id, while it runs (`ip netns exec` execs netd itself).
    pub fn netd_pid(&self) -> Option<u32> {
        self.netd.as_ref().map(|n| n.pid())
    }

    /// netd's log so far.
    pub fn netd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("netd.log")).unwrap_or_default()
    }

    /// Runs the netd CLI against this lab's daemon, in the host namespace.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let netd = bin("netd");
        let mut argv = vec![
            netd.to_str().context("path")?,
            "--control",
            self.control.to_str().context("path")?,
        ];
        argv.extend_from_slice(args);
        let out = self.host.exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends `msg` from the host by UDP to socat's `addr` (e.g. `UDP4:127.0.0.1:2253`,
    /// a forward to a guest's echo server) until it comes back, for up to 10 s:
    /// whether it did, and the last answer.
    pub fn udp_round_trip(&self, addr: &str, msg: &str) -> (bool, String) {
        let mut echoed = String::new();
        let ok = wait_until(Duration::from_secs(10), || {
            echoed = self
                .host
                .sh(&format!("echo {msg} | socat -T 2 - {addr}"))
                .unwrap_or_default();
            echoed.trim() == msg
        });
        (ok, echoed)
    }

    /// Runs udhcpc on the guest's TAP; returns the lease line the script wrote.
    pub fn dhcp(&self, guest: &TapHost) -> Result<String> {
        self.dhcp_with(guest, &[])
    }

    /// Like [`Lab::dhcp`], with more udhcpc arguments (`-x hostname:NAME`).
    pub fn dhcp_with(&self, guest: &TapHost, extra: &[&str]) -> Result<String> {
        let (ns, ifname) = (&guest.ns, &guest.tap);
        let lease = self.dir.path().join(format!("lease-{}", ns.name()));
        let ok = wait_until(Duration::from_secs(10), || {
            ns.sh(&format!("ip link show {ifname} >/dev/null 2>&1"))
                .is_ok()
        });
        if !ok {
            bail!("{ifname} never appeared in {}", ns.name());
        }
        ns.sh(&format!("ip link set {ifname} up"))?;
        let mut cmd = ns.command(&[
            "busybox",
            "udhcpc",
            "-f",
            "-q",
            "-n",
            "-t",
            "8",
            "-T",
            "1",
            "-i",
            ifname,
            "-s",
            &self.path("udhcpc.sh"),
        ]);
        cmd.args(extra);
        cmd.env("LEASE_FILE", &lease);
        integration_tests::run(&mut cmd)
            .with_context(|| format!("udhcpc\nnetd log:\n{}", self.netd_log()))?;
        Ok(std::fs::read_to_string(&lease)?)
    }

    /// Keeps a server process alive for the lab's lifetime.
    pub fn keep(&mut self, g: ChildGuard) {
        self.servers.push(g);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut n) = self.netd.take() {
            n.signal(libc::SIGTERM);
            let _ = n.wait_timeout(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("---- netd log ----\n{}", self.netd_log());
        }
    }
}

/// Whether `path` exists (helper for readability in tests).
pub fn exists(path: &Path) -> bool {
    path.exists()
}
