//! The netd configuration file (TOML), shared by the file, the control API and the
//! CLI.
//!
//! Parsing is two steps: serde reads the file into the raw structs below (unknown
//! keys are errors: `deny_unknown_fields`), then [`Config::validate`] checks every
//! value and fills in the defaults of the network's mode, producing a
//! [`NetworkSpec`] per network. Every error names the file, the key (as a dotted
//! path such as `network[1].port[0].ifname`) and what was expected.
//!
//! Defaults follow VirtualBox: a `hostonly` network is 192.168.56.0/24, the host
//! at .1 and DHCP handing out .101 to .254; an `internal` network has no addresses
//! unless given and DHCP only when asked for.
//!
//! This file holds the raw structs of the file and the checks of the file as a
//! whole (names and interface names used once, the control socket); the rest:
//! - `config/spec.rs`: the validated types the rest of netd runs on ([`NetworkSpec`],
//!   [`PortSpec`], [`ControlSpec`]);
//! - `config/network.rs`: the checks and mode defaults of one network
//!   ([`NetworkConfig::validate_at`], also the control API's entry) and of one port
//!   ([`validate_port`]);
//! - `config/ipv6.rs`: the IPv6 keys of a network (`subnet6`, `gateway6`, `dns6`,
//!   `dhcp6_range`).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use fabric_util::toml_file;
use fabric_util::MacAddr;
use serde::{Deserialize, Serialize};

mod ipv6;
mod network;
mod spec;

pub use self::network::validate_port;
pub use self::spec::{
    ControlSpec, DhcpReservation, DhcpSpec, DnsSpec, Ipv4Spec, Ipv6Spec, NetworkSpec, PortSpec,
};

pub use fabric_api::netd::{Guard, Mode, PortConfig, PortKind};

/// A config problem, naming the file, the key and what was expected.
pub use fabric_util::toml_file::ConfigError;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the control socket.
    pub control: PathBuf,
    /// Where state (DHCP leases) is kept.
    pub state_dir: PathBuf,
    /// The group that may use the control socket (mode 0660, owner root): a group
    /// name or a numeric gid. Default `root` (gid 0; netd's own group when netd does
    /// not run as root).
    pub control_group: Option<String>,
    /// Most control connections open at once; more are refused. Default 64.
    pub control_max_connections: Option<usize>,
    /// Seconds a control connection may wait between requests before it is
    /// closed. Default 60.
    pub control_idle_timeout: Option<u64>,
    /// `ADDR:PORT` to serve Prometheus metrics on (`GET /metrics`); off when absent.
    pub metrics: Option<String>,
    /// The networks.
    #[serde(default)]
    pub network: Vec<NetworkConfig>,
}

/// One `[[network]]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Unique name.
    pub name: String,
    /// Mode.
    pub mode: Mode,
    /// IPv4 subnet in CIDR notation.
    pub subnet: Option<String>,
    /// The fabric's own address on the network.
    pub gateway: Option<Ipv4Addr>,
    /// Serve DHCP.
    pub dhcp: Option<bool>,
    /// "A-B", inclusive.
    pub dhcp_range: Option<String>,
    /// The DHCP server's own address (default: the gateway on internal networks;
    /// .100 on hostonly networks, as VirtualBox, since the host owns the gateway; the
    /// gateway on nat networks, as VirtualBox and QEMU, where the router owns it and
    /// hands the server the unicast datagrams to port 67).
    pub dhcp_server: Option<Ipv4Addr>,
    /// Lease time in seconds (default 86400... VirtualBox uses 10 minutes; we use 1 day).
    pub lease_time: Option<u32>,
    /// DNS servers announced by DHCP (default: none on internal/hostonly).
    #[serde(default)]
    pub dhcp_dns: Vec<Ipv4Addr>,
    /// Fixed addresses.
    #[serde(default)]
    pub reservation: Vec<Reservation>,
    /// MTU of every port (payload bytes, as `ip link` shows it). Default 1500.
    pub mtu: Option<u32>,
    /// Bound on learned MAC addresses. Default 4096.
    pub max_macs: Option<usize>,
    /// Seconds after which an unused learned MAC is forgotten. Default 300.
    pub mac_ageing: Option<u64>,
    /// The port guard of the network's guest ports (default `clean`; a port's own
    /// `guard` overrides it). See [`crate::switch::guard`].
    pub guard: Option<Guard>,
    /// Most MACs learned on one port whose guard is off (default 256).
    pub max_macs_per_port: Option<usize>,
    /// Name of the host TAP of a hostonly network (default `vhost-<name>` cut to 15).
    pub host_ifname: Option<String>,
    /// The ports.
    #[serde(default)]
    pub port: Vec<PortConfig>,
    /// nat: port forwards (`[[network.forward]]`).
    #[serde(default)]
    pub forward: Vec<crate::nat::Forward>,
    /// nat: every port its own segment (VirtualBox "NAT" rather than "NAT Network").
    pub isolated: Option<bool>,
    /// bridged: the host NIC the uplink port is on.
    pub uplink: Option<String>,
    /// false: no DHCP, router, DNS or host TAP here; a pure switch (a network that
    /// spans hosts over VXLAN is served by one host). Default true.
    pub services: Option<bool>,
    /// nat: the DNS forwarder's address (default: the gateway's next address);
    /// hostonly, internal: the address netd serves DNS on (default: none), e.g. the
    /// gateway. See [`crate::dns`].
    pub dns: Option<Ipv4Addr>,
    /// Where the host resolvers are listed (default /etc/resolv.conf); with DNS.
    pub resolv_conf: Option<PathBuf>,
    /// The domain the network's DNS answers guest names under (default `NAME.lab`);
    /// with DNS.
    pub domain: Option<String>,
    /// Static names (`[[network.host]]`); with DNS.
    #[serde(default)]
    pub host: Vec<HostEntry>,
    /// nat: most flows at once (default 4096).
    pub max_flows: Option<usize>,
    /// nat: most bytes of flow buffers at once (default 512 MiB).
    pub max_flow_memory: Option<usize>,
    /// nat: most flows one guest address may hold (default 256).
    pub max_flows_per_guest: Option<usize>,
    /// nat: most TCP connects one guest address may have in progress (default 64).
    pub max_pending_per_guest: Option<usize>,
    /// nat: the gateway address stands for the host's loopback, and the host's own
    /// addresses may be reached (default false).
    pub host_loopback: Option<bool>,
    /// nat: CIDRs flows may go to (default: anywhere not denied).
    pub outbound_allow: Option<Vec<String>>,
    /// nat: CIDRs flows may not go to, in addition to 169.254.0.0/16 and the
    /// subnets of netd's other networks.
    pub outbound_deny: Option<Vec<String>>,
    /// hostonly, internal: the network's IPv6 prefix, a /64 such as "fd42::/64"
    /// (default: none, no IPv6 services). See [`crate::ipv6`].
    pub subnet6: Option<String>,
    /// The IPv6 gateway address inside `subnet6` (default: the prefix's `::1`): the
    /// host TAP's on hostonly, netd's own on internal.
    pub gateway6: Option<std::net::Ipv6Addr>,
    /// The DNS server announced to IPv6 guests (RA RDNSS and DHCPv6 option 23).
    pub dns6: Option<std::net::Ipv6Addr>,
    /// "A-B", inclusive: the addresses DHCPv6 leases (IA_NA); without it DHCPv6 is
    /// stateless (DNS only) and guests use SLAAC.
    pub dhcp6_range: Option<String>,
    /// nat: whether the router serves IPv6 (default true: `fd00::/64` unless
    /// `subnet6` says otherwise). See [`crate::nat`].
    pub ipv6: Option<bool>,
}

/// A DHCP reservation (`[[network.reservation]]`: `mac`, `ip`, `hostname`).
pub use fabric_api::netd::Reservation;

/// A static name of a network's DNS (`[[network.host]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// One DNS label (`files`): answered as `files.DOMAIN` and `files`.
    pub name: String,
    /// Its address, inside the subnet.
    pub ip: Ipv4Addr,
}

/// The netmask of a prefix length.
pub fn prefix_mask(prefix: u8) -> Ipv4Addr {
    if prefix == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix.min(32))))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (see [`MacAddr`]).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<MacAddr>().ok().map(MacAddr::octets)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff` (see [`MacAddr`]).
pub fn fmt_mac(m: &[u8; 6]) -> String {
    MacAddr(*m).to_string()
}

struct Ctx<'a> {
    path: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, expected: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.path, key, expected)
    }

    /// The two addresses of an `"A-B"` range `r`; else the error naming `key`
    /// and `expected`.
    fn range<A: std::str::FromStr>(
        &self,
        r: &str,
        key: impl Into<String>,
        expected: &str,
    ) -> Result<(A, A), ConfigError> {
        r.split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
            .ok_or_else(|| self.err(key, expected))
    }

    /// `value` (the bound's default when the key is absent) if `bound` allows it;
    /// else the error naming `key` and what the bound expects.
    fn bounded<T: PartialOrd + Copy>(
        &self,
        key: impl Into<String>,
        value: Option<T>,
        bound: &Bound<T>,
    ) -> Result<T, ConfigError> {
        let Bound(default, range, expected) = bound;
        let v = value.unwrap_or(*default);
        if range.contains(&v) {
            Ok(v)
        } else {
            Err(self.err(key, *expected))
        }
    }
}

/// Refuses the first of `keys` (each with whether the table sets it) that is set,
/// with `expected`: for keys that have no meaning where they stand (another mode,
/// another port kind). The error is `(key, expected)`.
pub fn refuse_set_keys(
    keys: &[(&'static str, bool)],
    expected: &str,
) -> Result<(), (&'static str, String)> {
    match keys.iter().find(|(_, set)| *set) {
        Some((k, _)) => Err((k, expected.to_string())),
        None => Ok(()),
    }
}

/// A numeric key's default, the values it takes, and the words for them in errors.
struct Bound<T>(T, std::ops::RangeInclusive<T>, &'static str);

/// `control_max_connections`.
const CONTROL_MAX_CONNECTIONS: Bound<usize> = Bound(64, 1..=4096, "between 1 and 4096");
/// `control_idle_timeout`, seconds.
const CONTROL_IDLE_TIMEOUT: Bound<u64> = Bound(60, 1..=86_400, "between 1 and 86400 seconds");

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// `base + n`, or None past 255.255.255.255.
pub fn offset(base: Ipv4Addr, n: u32) -> Option<Ipv4Addr> {
    u32::from(base).checked_add(n).map(Ipv4Addr::from)
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let a: Ipv4Addr = a.parse().ok()?;
    let p: u8 = p.parse().ok()?;
    if !(1..=30).contains(&p) {
        return None;
    }
    Some((a, p))
}

impl Config {
    /// Checks the control socket's settings; `path` names the file in errors.
    pub fn control_spec(&self, path: &Path) -> Result<ControlSpec, ConfigError> {
        let p = path.display().to_string();
        let ctx = Ctx { path: &p };
        let gid = match self.control_group.as_deref() {
            // root's group; a netd not run as root (which cannot give the socket to
            // root's group) keeps its own.
            None => match crate::sys::effective_ids() {
                (0, _) => 0,
                (_, gid) => gid,
            },
            Some(g) => crate::sys::group_gid(g).ok_or_else(|| {
                ctx.err(
                    "control_group",
                    format!("an existing group name or a numeric gid ({g:?} is neither)"),
                )
            })?,
        };
        let max_connections = ctx.bounded(
            "control_max_connections",
            self.control_max_connections,
            &CONTROL_MAX_CONNECTIONS,
        )?;
        let idle = ctx.bounded(
            "control_idle_timeout",
            self.control_idle_timeout,
            &CONTROL_IDLE_TIMEOUT,
        )?;
        Ok(ControlSpec {
            path: self.control.clone(),
            gid,
            max_connections,
            idle_timeout: std::time::Duration::from_secs(idle),
        })
    }

    /// The address of the metrics server, if the `metrics` key asks for one.
    pub fn metrics_addr(&self, path: &Path) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        Ok(fabric_util::metrics::config_addr(
            self.metrics.as_deref(),
            path,
        )?)
    }

    /// Reads and parses `path` (not yet validated).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(toml_file::read(path)?)
    }

    /// Parses TOML text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(toml_file::parse(text, path)?)
    }

    /// Checks every value, applies mode defaults; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<Vec<NetworkSpec>, ConfigError> {
        let p = path.display().to_string();
        let ctx = Ctx { path: &p };
        let mut names = HashSet::new();
        let mut ifnames = HashSet::new();
        let mut out = Vec::new();
        for (i, n) in self.network.iter().enumerate() {
            let spec = n.validate_at(&p, &format!("network[{i}]"))?;
            if !names.insert(spec.name.clone()) {
                return Err(ctx.err(
                    format!("network[{i}].name"),
                    format!("a unique network name ({:?} is used twice)", spec.name),
                ));
            }
            for (j, port) in spec.ports.iter().enumerate() {
                if let Some(ifn) = &port.ifname {
                    if !ifnames.insert(ifn.clone()) {
                        return Err(ctx.err(
                            format!("network[{i}].port[{j}].ifname"),
                            format!("an interface name used once ({ifn:?} is used twice)"),
                        ));
                    }
                }
            }
            if let Some(h) = &spec.host_ifname {
                if !ifnames.insert(h.clone()) {
                    return Err(ctx.err(
                        format!("network[{i}].host_ifname"),
                        format!("an interface name used once ({h:?} is used twice)"),
                    ));
                }
            }
            // A bridged network's uplink is an interface like any other: naming
            // another network's TAP would join the two networks.
            if let Some(u) = &spec.uplink {
                if !ifnames.insert(u.clone()) {
                    return Err(ctx.err(
                        format!("network[{i}].uplink"),
                        format!("an interface name used once ({u:?} is used twice)"),
                    ));
                }
            }
            out.push(spec);
        }
        // A NAT guest never reaches another network's guests through the host's
        // routes (a hostonly network's host TAP, say): every other subnet is denied.
        let subnets: Vec<(String, (Ipv4Addr, u8))> = out
            .iter()
            .filter_map(|s| {
                s.ipv4
                    .as_ref()
                    .map(|v| (s.name.clone(), (v.network, v.prefix)))
            })
            .collect();
        // The same for IPv6: the router serves the network's own prefix, and
        // every other network's prefix is denied.
        let prefixes: Vec<(String, std::net::Ipv6Addr)> = out
            .iter()
            .filter_map(|s| s.ipv6.as_ref().map(|v| (s.name.clone(), v.prefix)))
            .collect();
        for spec in &mut out {
            if let Some(nat) = spec.nat.as_mut() {
                for (name, sub) in &subnets {
                    if *name != spec.name && !nat.outbound_deny.contains(sub) {
                        nat.outbound_deny.push(*sub);
                    }
                }
                for (name, p) in &prefixes {
                    if *name != spec.name && !nat.outbound_deny6.contains(&(*p, 64)) {
                        nat.outbound_deny6.push((*p, 64));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
