//! The lab of the VXLAN tests: "hosts" are network namespaces on one underlay
//! segment (a Linux bridge in its own namespace, a veth `ul0` into each host with
//! an address in 198.18.10.0/24, the benchmarking range), each host may run its own
//! netd (own config, state and control socket), and guests are namespaces on TAP
//! ports of a host's netd. Nothing leaves the test's namespaces.
//!
//! ```text
//!  guest ns --TAP-- [netd in host A] ul0 198.18.10.1 --+
//!  guest ns --TAP-- [netd in host B] ul0 198.18.10.2 --+-- bridge (underlay ns)
//!                   [kernel vxlan in host C] ...    --+
//! ```
#![allow(dead_code, unused_imports)]

#[path = "../netd_common/mod.rs"]
pub mod netd_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::netd::UDHCPC_SCRIPT;
use integration_tests::{unique_name, wait_until, Netns};
pub use netd_common::{iperf3_bps, ping, ping_retry, write_config, Netd, TapHost};

/// The underlay address of host `i` (0-based).
pub fn host_ip(i: usize) -> String {
    format!("198.18.10.{}", i + 1)
}

/// One host on the underlay.
pub struct Host {
    /// Its namespace (its netd, or its kernel vxlan device, run here).
    pub ns: Netns,
    /// Its underlay address.
    pub ip: String,
    /// Its scratch directory (config, state, log, control socket).
    pub dir: PathBuf,
    /// Its netd, once started.
    pub netd: Option<Netd>,
}

impl Host {
    /// Starts netd here with the `[[network]]` tables `networks`.
    pub fn start_netd(&mut self, networks: &str) -> Result<&Netd> {
        let cfg = write_config(&self.dir, networks);
        let d = Netd::start(&self.ns, &self.dir, &cfg)?;
        Ok(self.netd.insert(d))
    }

    /// Its netd (started before).
    pub fn netd(&self) -> &Netd {
        self.netd.as_ref().expect("netd started on this host")
    }
}

/// The underlay and its hosts.
pub struct Lab {
    /// The namespace of the underlay's bridge.
    pub underlay: Netns,
    /// The hosts, `host_ip(i)` each.
    pub hosts: Vec<Host>,
    /// Scratch directory.
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// `n` hosts on an underlay of MTU `mtu`.
    pub fn new(n: usize, mtu: u32) -> Result<Lab> {
        integration_tests::require_root();
        let dir = tempfile::Builder::new().prefix("netd-vxlan").tempdir()?;
        let underlay = Netns::new("vxu")?;
        underlay.sh(&format!(
            "ip link add ulbr type bridge && ip link set ulbr mtu {mtu} up"
        ))?;
        let mut hosts = Vec::new();
        for i in 0..n {
            let ns = Netns::new("vxh")?;
            let ip = host_ip(i);
            underlay.sh(&format!(
                "ip link add h{i} mtu {mtu} type veth peer name ul0 netns {h} && \
                 ip link set h{i} master ulbr up",
                h = ns.name()
            ))?;
            ns.sh(&format!(
                "ip link set ul0 mtu {mtu} up && ip addr add {ip}/24 dev ul0"
            ))?;
            let hdir = dir.path().join(format!("host{i}"));
            std::fs::create_dir_all(&hdir)?;
            hosts.push(Host {
                ns,
                ip,
                dir: hdir,
                netd: None,
            });
        }
        std::fs::write(dir.path().join("udhcpc.sh"), UDHCPC_SCRIPT)?;
        std::process::Command::new("chmod")
            .args(["+x", &dir.path().join("udhcpc.sh").display().to_string()])
            .status()?;
        Ok(Lab {
            underlay,
            hosts,
            dir,
        })
    }

    /// The hosts' underlay addresses, in order.
    pub fn ips(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.ip.clone()).collect()
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Runs busybox udhcpc on the guest's TAP; returns `ip=... router=... dns=...`.
    pub fn dhcp(&self, guest: &TapHost) -> Result<String> {
        let lease = self.path(&format!("lease-{}", guest.tap));
        let _ = std::fs::remove_file(&lease);
        guest
            .command(&[
                "busybox",
                "udhcpc",
                "-i",
                &guest.tap,
                "-s",
                &self.path("udhcpc.sh"),
                "-q",
                "-n",
                "-f",
                "-t",
                "5",
                "-T",
                "1",
            ])
            .env("LEASE_FILE", &lease)
            .output()
            .context("udhcpc")?;
        std::fs::read_to_string(&lease).context("udhcpc got no lease")
    }
}

/// A `[[network.port]]` table of a vxlan port `name` with `vni`, sending from
/// `local`, flooding to `remotes`, plus `extra` TOML lines.
pub fn vxlan_port(name: &str, vni: u32, local: &str, remotes: &[&str], extra: &str) -> String {
    let list: Vec<String> = remotes.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "\n[[network.port]]\nname = \"{name}\"\nkind = \"vxlan\"\nvni = {vni}\nlocal = \"{local}\"\nremotes = [{}]\n{extra}",
        list.join(", ")
    )
}

/// The tunnel counters of vxlan port `port` of `net` (`netd vxlan show`).
pub fn tunnel(netd: &Netd, net: &str, port: &str) -> Result<serde_json::Value> {
    Ok(netd.cli_json(&["vxlan", "show", net, port])?["counters"].clone())
}

/// Waits until `f` holds (up to 10 s).
pub fn eventually(f: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_secs(10), f)
}

/// The MAC of `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<String> {
    Ok(ns
        .sh(&format!("cat /sys/class/net/{dev}/address"))?
        .trim()
        .to_string())
}

/// A new guest namespace with a unique TAP name.
pub fn guest(prefix: &str) -> Result<TapHost> {
    TapHost::new(prefix)
}

/// A unique interface name.
pub fn ifname(prefix: &str) -> String {
    unique_name(prefix)
}

/// Whether `path` exists.
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// Makes host `ns`'s underlay veth behave like a real wire towards netd: what a
/// kernel VTEP sends leaves segmented and with every checksum filled in. (A veth
/// passes GSO tunnel super-frames and partial checksums to the peer namespace as
/// they are, and a UDP socket gets them that way: one 64 KiB datagram whose inner
/// TCP checksum was never computed. A NIC would have finished them.)
pub fn wire_offloads_off(ns: &Netns) -> Result<()> {
    ns.sh("ethtool -K ul0 tx off tso off gso off >/dev/null 2>&1 || ethtool -K ul0 tx off")?;
    Ok(())
}
