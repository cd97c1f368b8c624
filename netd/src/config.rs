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

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use fabric_util::toml_file::{self, InvalidKey};
use fabric_util::MacAddr;
use serde::{Deserialize, Serialize};

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
    /// nat: the DNS forwarder's address (default: the gateway's next address).
    pub dns: Option<Ipv4Addr>,
    /// nat: where the host resolvers are listed (default /etc/resolv.conf).
    pub resolv_conf: Option<PathBuf>,
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
}

/// A DHCP reservation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// Client MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Address to give it.
    pub ip: Ipv4Addr,
}

/// A validated port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Unique name in the network.
    pub name: String,
    /// Kind.
    pub kind: PortKind,
    /// TAP name for tap and vm.
    pub ifname: Option<String>,
    /// MAC.
    pub mac: Option<[u8; 6]>,
    /// Namespace for tap.
    pub netns: Option<String>,
    /// Socket path for stream.
    pub path: Option<PathBuf>,
    /// Keep the TAP on exit.
    pub persistent: bool,
    /// The port's own guard setting (else the network's).
    pub guard: Option<Guard>,
    /// The tunnel of a `vxlan` port.
    pub vxlan: Option<crate::port::vxlan::VxlanSpec>,
}

/// Validated IPv4 settings of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Spec {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// The fabric's own address.
    pub gateway: Ipv4Addr,
}

impl Ipv4Spec {
    /// The netmask.
    pub fn mask(&self) -> Ipv4Addr {
        prefix_mask(self.prefix)
    }
    /// Whether `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network)
    }
    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }
}

/// Validated DHCP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSpec {
    /// The server's own address (its identifier and source address).
    pub server: Ipv4Addr,
    /// First address handed out.
    pub start: Ipv4Addr,
    /// Last address handed out.
    pub end: Ipv4Addr,
    /// Lease time.
    pub lease_time: u32,
    /// DNS servers announced.
    pub dns: Vec<Ipv4Addr>,
    /// Router announced (None on internal networks).
    pub router: Option<Ipv4Addr>,
    /// Fixed addresses.
    pub reservations: Vec<([u8; 6], Ipv4Addr)>,
}

/// A validated network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: Mode,
    /// Addresses, if any.
    pub ipv4: Option<Ipv4Spec>,
    /// DHCP, if served.
    pub dhcp: Option<DhcpSpec>,
    /// MTU.
    pub mtu: u32,
    /// MAC table bound.
    pub max_macs: usize,
    /// MAC ageing, seconds.
    pub mac_ageing: u64,
    /// The guard of guest ports without their own setting.
    pub guard: Guard,
    /// Most MACs learned on one unguarded port.
    pub max_macs_per_port: usize,
    /// Host TAP name (hostonly).
    pub host_ifname: Option<String>,
    /// Ports.
    pub ports: Vec<PortSpec>,
    /// The NAT router's settings (mode nat).
    pub nat: Option<crate::nat::RouterConfig>,
    /// The uplink NIC (mode bridged).
    pub uplink: Option<String>,
    /// Every port its own segment (with the network's services).
    pub isolated: bool,
    /// Whether this host runs the network's services (`services`, default true).
    pub services: bool,
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
        ConfigError::Invalid(InvalidKey {
            path: self.path.to_string(),
            key: key.into(),
            expected: expected.into(),
        })
    }
}

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

/// Validated settings of the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSpec {
    /// Where it listens.
    pub path: PathBuf,
    /// Its group (mode 0660, owner root).
    pub gid: u32,
    /// Most connections at once.
    pub max_connections: usize,
    /// Longest wait for the next request.
    pub idle_timeout: std::time::Duration,
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
        let max_connections = self.control_max_connections.unwrap_or(64);
        if !(1..=4096).contains(&max_connections) {
            return Err(ctx.err("control_max_connections", "between 1 and 4096"));
        }
        let idle = self.control_idle_timeout.unwrap_or(60);
        if !(1..=86_400).contains(&idle) {
            return Err(ctx.err("control_idle_timeout", "between 1 and 86400 seconds"));
        }
        Ok(ControlSpec {
            path: self.control.clone(),
            gid,
            max_connections,
            idle_timeout: std::time::Duration::from_secs(idle),
        })
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
        for spec in &mut out {
            if let Some(nat) = spec.nat.as_mut() {
                for (name, sub) in &subnets {
                    if *name != spec.name && !nat.outbound_deny.contains(sub) {
                        nat.outbound_deny.push(*sub);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl NetworkConfig {
    /// Validates this network alone (the control API uses `<api>` as path).
    pub fn validate_at(&self, p: &str, at: &str) -> Result<NetworkSpec, ConfigError> {
        let ctx = Ctx { path: p };
        let key = |k: &str| format!("{at}.{k}");
        if !valid_name(&self.name) {
            return Err(ctx.err(key("name"), "1 to 64 characters of [A-Za-z0-9._-]"));
        }
        let hostonly = self.mode == Mode::Hostonly;
        let nat = self.mode == Mode::Nat;
        crate::modes::check_mode_keys(self).map_err(|(k, e)| ctx.err(key(k), e))?;
        let subnet = match (&self.subnet, hostonly) {
            (None, false) if nat => Some(crate::modes::NAT_SUBNET),
            (Some(s), _) => Some(parse_cidr(s).ok_or_else(|| {
                ctx.err(
                    key("subnet"),
                    "an IPv4 CIDR such as \"192.168.56.0/24\" (prefix 1..30)",
                )
            })?),
            (None, true) => Some((Ipv4Addr::new(192, 168, 56, 0), 24)),
            (None, false) => None,
        };
        let ipv4 = match subnet {
            Some((a, prefix)) => {
                let mask = prefix_mask(prefix);
                let network = Ipv4Addr::from(u32::from(a) & u32::from(mask));
                let first = if nat { 2 } else { 1 };
                let gateway = match self.gateway {
                    Some(g) => g,
                    None => offset(network, first).ok_or_else(|| {
                        ctx.err(key("subnet"), "a subnet with room for the gateway")
                    })?,
                };
                let spec = Ipv4Spec {
                    network,
                    prefix,
                    gateway,
                };
                if !spec.contains(gateway) || gateway == network || gateway == spec.broadcast() {
                    return Err(ctx.err(
                        key("gateway"),
                        format!("a host address inside {}/{}", network, prefix),
                    ));
                }
                Some(spec)
            }
            None => {
                if self.gateway.is_some() {
                    return Err(ctx.err(key("subnet"), "a subnet when `gateway` is set"));
                }
                None
            }
        };
        let dhcp_on = self.dhcp.unwrap_or(hostonly || nat);
        let dhcp = if dhcp_on {
            let Some(v4) = &ipv4 else {
                return Err(ctx.err(key("subnet"), "a subnet when `dhcp = true`"));
            };
            let (start, end) = match &self.dhcp_range {
                Some(r) => {
                    let (a, b) = r
                        .split_once('-')
                        .and_then(|(a, b)| {
                            Some((
                                a.trim().parse::<Ipv4Addr>().ok()?,
                                b.trim().parse::<Ipv4Addr>().ok()?,
                            ))
                        })
                        .ok_or_else(|| {
                            ctx.err(key("dhcp_range"), "\"A-B\" with two IPv4 addresses")
                        })?;
                    (a, b)
                }
                None => {
                    let net = u32::from(v4.network);
                    let bcast = u32::from(v4.broadcast());
                    // VirtualBox: .101 up to .254 on a /24; on smaller subnets the upper half.
                    // Checked arithmetic: a subnet at the top of the address space
                    // must not wrap (or panic) its way to a range.
                    let size = bcast.checked_sub(net);
                    let start = size.and_then(|size| {
                        if nat && size > 32 {
                            // VirtualBox NAT: guests from .15.
                            net.checked_add(15)
                        } else if size > 200 {
                            net.checked_add(101)
                        } else {
                            net.checked_add(size / 2)
                        }
                    });
                    match (start, bcast.checked_sub(1)) {
                        (Some(a), Some(b)) => (Ipv4Addr::from(a), Ipv4Addr::from(b)),
                        _ => {
                            return Err(ctx.err(
                                key("subnet"),
                                "a subnet with room for a DHCP range (give `dhcp_range`)",
                            ))
                        }
                    }
                }
            };
            if !v4.contains(start)
                || !v4.contains(end)
                || u32::from(start) > u32::from(end)
                || start == v4.network
                || end == v4.broadcast()
            {
                return Err(ctx.err(
                    key("dhcp_range"),
                    format!(
                        "an ascending range of host addresses inside {}/{}",
                        v4.network, v4.prefix
                    ),
                ));
            }
            let server = match self.dhcp_server {
                Some(s) => s,
                None if hostonly => match offset(v4.network, 100) {
                    Some(hundred)
                        if v4.prefix <= 24
                            && !(u32::from(start)..=u32::from(end))
                                .contains(&u32::from(hundred))
                            && hundred != v4.gateway =>
                    {
                        hundred
                    }
                    _ => v4.gateway,
                },
                None => v4.gateway,
            };
            if !v4.contains(server)
                || server == v4.network
                || server == v4.broadcast()
                || (u32::from(start)..=u32::from(end)).contains(&u32::from(server))
            {
                return Err(ctx.err(
                    key("dhcp_server"),
                    format!(
                        "a host address inside {}/{} outside dhcp_range",
                        v4.network, v4.prefix
                    ),
                ));
            }
            let mut reservations = Vec::new();
            for (k, r) in self.reservation.iter().enumerate() {
                let mac = parse_mac(&r.mac).ok_or_else(|| {
                    ctx.err(
                        format!("{at}.reservation[{k}].mac"),
                        "a MAC such as \"52:54:00:12:34:56\"",
                    )
                })?;
                if !v4.contains(r.ip)
                    || r.ip == v4.gateway
                    || r.ip == v4.network
                    || r.ip == v4.broadcast()
                {
                    return Err(ctx.err(
                        format!("{at}.reservation[{k}].ip"),
                        format!("a free host address inside {}/{}", v4.network, v4.prefix),
                    ));
                }
                reservations.push((mac, r.ip));
            }
            let lease_time = self.lease_time.unwrap_or(86_400);
            if lease_time < 60 {
                return Err(ctx.err(key("lease_time"), "at least 60 seconds"));
            }
            Some(DhcpSpec {
                server,
                start,
                end,
                lease_time,
                dns: crate::modes::dhcp_dns(self, v4),
                // Internal and host-only networks route nowhere: no router option;
                // a NAT network's router is the gateway.
                router: nat.then_some(v4.gateway),
                reservations,
            })
        } else {
            if self.dhcp_range.is_some()
                || self.dhcp_server.is_some()
                || !self.reservation.is_empty()
            {
                return Err(ctx.err(
                    key("dhcp"),
                    "true when `dhcp_range` or reservations are given",
                ));
            }
            None
        };
        let mtu = self.mtu.unwrap_or(1500);
        if !(68..=65521).contains(&mtu) {
            return Err(ctx.err(key("mtu"), "an MTU between 68 and 65521"));
        }
        let max_macs = self.max_macs.unwrap_or(4096);
        if !(1..=1_000_000).contains(&max_macs) {
            return Err(ctx.err(key("max_macs"), "between 1 and 1000000"));
        }
        let mac_ageing = self.mac_ageing.unwrap_or(300);
        if !(1..=86_400).contains(&mac_ageing) {
            return Err(ctx.err(key("mac_ageing"), "between 1 and 86400 seconds"));
        }
        let max_macs_per_port = self.max_macs_per_port.unwrap_or(256);
        if !(1..=1_000_000).contains(&max_macs_per_port) {
            return Err(ctx.err(key("max_macs_per_port"), "between 1 and 1000000"));
        }
        let host_ifname = if hostonly {
            let h = self.host_ifname.clone().unwrap_or_else(|| {
                let mut s = format!("vh-{}", self.name);
                s.truncate(15);
                s
            });
            crate::sys::check_ifname(&h)
                .map_err(|_| ctx.err(key("host_ifname"), "an interface name of 1 to 15 bytes"))?;
            Some(h)
        } else {
            if self.host_ifname.is_some() {
                return Err(ctx.err(
                    key("host_ifname"),
                    "no host_ifname outside mode \"hostonly\"",
                ));
            }
            None
        };
        let mut ports = Vec::new();
        let mut pnames = HashSet::new();
        for (j, pc) in self.port.iter().enumerate() {
            let ps = validate_port(pc, p, &format!("{at}.port[{j}]"))?;
            if !pnames.insert(ps.name.clone()) {
                return Err(ctx.err(
                    format!("{at}.port[{j}].name"),
                    format!(
                        "a port name unique in the network ({:?} is used twice)",
                        ps.name
                    ),
                ));
            }
            ports.push(ps);
        }
        let services = self.services.unwrap_or(true);
        if !services && self.dhcp == Some(true) {
            return Err(ctx.err(
                key("dhcp"),
                "false or absent when `services = false` (another host serves the network)",
            ));
        }
        let nat_spec = match (&ipv4, nat) {
            (Some(v4), true) => Some(
                crate::modes::router_config(self, v4, mtu).map_err(|(k, e)| ctx.err(key(&k), e))?,
            ),
            _ => None,
        };
        // A pure switch here: the services of a network that spans hosts run on one.
        let (dhcp, nat_spec, host_ifname) = if services {
            (dhcp, nat_spec, host_ifname)
        } else {
            (None, None, None)
        };
        Ok(NetworkSpec {
            services,
            nat: nat_spec,
            uplink: self.uplink.clone(),
            isolated: self.isolated.unwrap_or(false),
            name: self.name.clone(),
            mode: self.mode,
            ipv4,
            dhcp,
            mtu,
            max_macs,
            mac_ageing,
            guard: self.guard.unwrap_or_default(),
            max_macs_per_port,
            host_ifname,
            ports,
        })
    }
}

/// Validates one port; `path` names the source, `at` the key prefix.
pub fn validate_port(port: &PortConfig, path: &str, at: &str) -> Result<PortSpec, ConfigError> {
    let ctx = Ctx { path };
    let key = |k: &str| format!("{at}.{k}");
    let ifname = match (&port.ifname, port.kind) {
        (Some(i), PortKind::Tap | PortKind::Vm) => {
            crate::sys::check_ifname(i).map_err(|_| {
                ctx.err(
                    key("ifname"),
                    "an interface name of 1 to 15 bytes, no '/' or spaces",
                )
            })?;
            Some(i.clone())
        }
        (None, PortKind::Tap | PortKind::Vm) => {
            return Err(ctx.err(key("ifname"), "a TAP name for kind \"tap\" or \"vm\""))
        }
        (Some(_), PortKind::Stream) => {
            return Err(ctx.err(key("ifname"), "no ifname for kind \"stream\" (use `path`)"))
        }
        (None, PortKind::Stream | PortKind::Vxlan) => None,
        (Some(_), PortKind::Vxlan) => {
            return Err(ctx.err(key("ifname"), "no ifname for kind \"vxlan\""))
        }
    };
    let vxlan = crate::port::vxlan::validate(port.kind, &port.vxlan)
        .map_err(|(k, e)| ctx.err(key(k), e))?;
    let path_v = match (&port.path, port.kind) {
        (Some(p), PortKind::Stream) => {
            if !p.is_absolute() {
                return Err(ctx.err(key("path"), "an absolute unix socket path"));
            }
            Some(p.clone())
        }
        (None, PortKind::Stream) => {
            return Err(ctx.err(key("path"), "a unix socket path for kind \"stream\""))
        }
        (Some(_), _) => return Err(ctx.err(key("path"), "no path except for kind \"stream\"")),
        (None, _) => None,
    };
    if port.netns.is_some() && port.kind != PortKind::Tap {
        return Err(ctx.err(key("netns"), "no netns except for kind \"tap\""));
    }
    if let Some(ns) = &port.netns {
        if ns.is_empty() || ns.contains('/') || ns.len() > 255 {
            return Err(ctx.err(key("netns"), "the name of a namespace under /run/netns"));
        }
    }
    let mac = match &port.mac {
        Some(m) => {
            let mac = parse_mac(m)
                .ok_or_else(|| ctx.err(key("mac"), "a MAC such as \"52:54:00:12:34:56\""))?;
            if mac[0] & 1 == 1 {
                return Err(ctx.err(
                    key("mac"),
                    "a unicast MAC (lowest bit of the first byte clear)",
                ));
            }
            Some(mac)
        }
        None => None,
    };
    let name = match &port.name {
        Some(n) => n.clone(),
        None if vxlan.is_some() => format!("vxlan{}", vxlan.as_ref().map_or(0, |v| v.vni)),
        None => ifname
            .clone()
            .or_else(|| path_v.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_default(),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(ctx.err(key("name"), "a port name of 1 to 255 characters"));
    }
    Ok(PortSpec {
        name,
        kind: port.kind,
        ifname,
        mac,
        netns: port.netns.clone(),
        path: path_v,
        persistent: port.persistent,
        guard: port.guard,
        vxlan,
    })
}

#[cfg(test)]
mod tests;
