//! netd's side of the end-to-end tests, shared by the common modules of the switch
//! tests (`netd_common`) and the NAT and bridged lab (`nat_common`): the TOML tables of
//! a netd config, and test hosts (a namespace and the TAP a `tap` port puts in it).
//!
//! The tables are built as text, one function per table kind, so a test's config
//! reads as the list of its networks and ports: `network("lan", "internal", "")`
//! then `host.port("a")`. Each table starts on a new line and ends with a newline;
//! keys of a table may follow it directly (`host.port("a") + "mac = ...\n"`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{unique_name, Netns};

/// A `[[network]]` table for the network `name` in `mode` (`internal`, `hostonly`,
/// `nat`, `bridged`), with `keys` (more TOML lines of the network, or nothing) after
/// its name and mode. Its ports, reservations and forwards follow it.
pub fn network(name: &str, mode: &str, keys: &str) -> String {
    format!("\n[[network]]\nname = \"{name}\"\nmode = \"{mode}\"\n{keys}")
}

/// A `[[network.port]]` table for a `tap` port whose TAP `ifname` netd creates in the
/// namespace `ns`; named `name`, or left for netd to name when `name` is `None`.
pub fn tap_port(name: Option<&str>, ifname: &str, ns: &Netns) -> String {
    let name = name
        .map(|n| format!("name = \"{n}\"\n"))
        .unwrap_or_default();
    format!(
        "\n[[network.port]]\n{name}kind = \"tap\"\nifname = \"{ifname}\"\nnetns = \"{}\"\n",
        ns.name()
    )
}

/// A `[[network.port]]` table for a `stream` port named `name` listening on the unix
/// socket `path`.
pub fn stream_port(name: &str, path: &Path) -> String {
    format!(
        "\n[[network.port]]\nname = \"{name}\"\nkind = \"stream\"\npath = \"{}\"\n",
        path.display()
    )
}

/// The arguments of `netd-cli port add NET --kind KIND --ifname IFNAME`, `extra`
/// (more flags) after them.
pub fn port_add<'a>(
    net: &'a str,
    kind: &'a str,
    ifname: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut argv = vec!["port", "add", net, "--kind", kind, "--ifname", ifname];
    argv.extend_from_slice(extra);
    argv
}

/// The command line of a dnsmasq that listens on `listen` (port 53) and knows only
/// `name`, at `addr` (no upstream, no hosts file, no config file), writing its pid
/// to `pid_file`: the "internet's" resolver of the NAT lab, the host's resolver of
/// the DNS tests.
pub fn dnsmasq_argv(listen: &str, pid_file: &Path, name: &str, addr: &str) -> Vec<String> {
    [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--bind-interfaces",
        &format!("--listen-address={listen}"),
        "--user=root",
        &format!("--pid-file={}", pid_file.display()),
        &format!("--address=/{name}/{addr}"),
    ]
    .map(String::from)
    .to_vec()
}

/// A udhcpc script that configures the interface and its default route and records
/// what it got as `ip=... router=... dns=...` in `$LEASE_FILE`.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
      ip route replace default via "${router%% *}" dev "$interface"
    fi
    echo "ip=$ip router=$router dns=$dns" > "$LEASE_FILE"
    ;;
esac
exit 0
"#;

/// A test host: a fresh namespace, and the name of the TAP a netd `tap` port puts
/// into it. Derefs to its namespace.
pub struct TapHost {
    pub ns: Netns,
    pub tap: String,
}

impl TapHost {
    /// A new namespace (named after `prefix`) and a unique TAP name for it.
    pub fn new(prefix: &str) -> Result<Self> {
        Ok(TapHost {
            ns: Netns::new(prefix)?,
            tap: unique_name("tap"),
        })
    }

    /// One host per prefix, in order: `let [a, b] = TapHost::each(["na", "nb"])?;`.
    pub fn each<const N: usize>(prefixes: [&str; N]) -> Result<[TapHost; N]> {
        let hosts = prefixes
            .iter()
            .map(|p| TapHost::new(p))
            .collect::<Result<Vec<_>>>()?;
        // One host was made per prefix, so the lengths agree.
        hosts
            .try_into()
            .map_err(|_| anyhow::anyhow!("one host per prefix"))
    }

    /// The `[[network.port]]` table of a `tap` port `name` for this host.
    pub fn port(&self, name: &str) -> String {
        tap_port(Some(name), &self.tap, &self.ns)
    }

    /// The `[[network.port]]` table of a `tap` port for this host that netd names.
    pub fn unnamed_port(&self) -> String {
        tap_port(None, &self.tap, &self.ns)
    }

    /// Gives the host's TAP the address `cidr` (netd brings its TAPs up).
    pub fn addr(&self, cidr: &str) -> Result<()> {
        self.ns
            .exec(&["ip", "addr", "add", cidr, "dev", &self.tap])?;
        Ok(())
    }

    /// Whether the host's TAP exists (in its namespace, as it is now).
    pub fn tap_exists(&self) -> bool {
        self.ns.exec(&["ip", "link", "show", &self.tap]).is_ok()
    }
}

impl std::ops::Deref for TapHost {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

/// A counter of port `port` in a `port list NET --drops --json` answer, 0 if absent.
pub fn port_counter(ports: &serde_json::Value, port: &str, key: &str) -> u64 {
    ports
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == port))
        .and_then(|p| p.get("counters")?.get(key)?.as_u64())
        .unwrap_or(0)
}

/// The global address of `iface` in `ns` inside `prefix` (e.g. "fd42:16:"), once
/// DAD is done; waits up to 20 s.
pub fn global6(ns: &Netns, iface: &str, prefix: &str) -> Result<String> {
    let found = ready_addr6(ns, iface, "global", prefix, Duration::from_secs(20));
    found.with_context(|| {
        format!(
            "no address in {prefix} on {iface}: {}",
            ns.sh("ip -6 addr").unwrap_or_default()
        )
    })
}

/// Waits until the link-local address of `iface` is out of DAD; the address
/// (empty if it never is, within 10 s).
pub fn link_local_ready(ns: &Netns, iface: &str) -> String {
    ready_addr6(ns, iface, "link", "fe80", Duration::from_secs(10)).unwrap_or_default()
}

/// The first address of `iface` in `ns` of `scope` (`global`, `link`) that starts
/// with `prefix`, once no address of that scope is tentative (DAD is done); waits
/// up to `within`.
fn ready_addr6(
    ns: &Netns,
    iface: &str,
    scope: &str,
    prefix: &str,
    within: Duration,
) -> Option<String> {
    let mut found = None;
    crate::wait_until(within, || {
        let out = ns
            .sh(&format!("ip -6 -o addr show dev {iface} scope {scope}"))
            .unwrap_or_default();
        found = out
            .split_whitespace()
            .find(|w| w.starts_with(prefix))
            .filter(|_| !out.contains("tentative"))
            .map(|w| w.split('/').next().unwrap_or(w).to_string());
        found.is_some()
    });
    found
}

/// Whether `ns` pings `addr` over IPv6 (five tries of 2 s).
pub fn ping6(ns: &Netns, addr: &str) -> bool {
    (0..5).any(|_| ns.sh(&format!("ping -6 -c 1 -W 2 {addr}")).is_ok())
}

/// Runs the scapy program `body` in `ns` (written to a file under `dir`, after the
/// imports, with scapy quiet); returns its stdout. Debian's python3-scapy is for the
/// system interpreter.
pub fn run_scapy(ns: &Netns, dir: &Path, body: &str) -> Result<String> {
    let path = dir.join(format!("{}.py", unique_name("scapy")));
    std::fs::write(
        &path,
        format!(
            "import logging\nlogging.getLogger('scapy.runtime').setLevel(logging.ERROR)\n\
             from scapy.all import *\nconf.verb = 0\n{body}"
        ),
    )?;
    ns.sh(&format!("/usr/bin/python3 {}", path.display()))
}
