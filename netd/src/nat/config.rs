//! The router's settings: what a NAT network is made of (subnet, gateway and DNS
//! addresses, MTU, resolver file), its port forwards and the bounds of its flow
//! table, with the checks that they hang together.
//!
//! Everything here is plain data read once at start (from the daemon's config, or a
//! test): [`RouterConfig::validate`] runs before the router binds anything, and a
//! forward added later through the control API goes through the same
//! `check_forward`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use super::NatError;

pub use fabric_api::netd::{parse_host_addr, Forward, Proto};

/// The router's errors about one forward.
pub(super) trait ForwardErrors {
    /// The error for a second forward on this forward's protocol and host address.
    fn exists(&self) -> NatError;
    /// The error for a host address that cannot be bound.
    fn bind_failed(&self, source: std::io::Error) -> NatError;
}

impl ForwardErrors for Forward {
    fn exists(&self) -> NatError {
        NatError::ForwardExists {
            proto: self.proto,
            host: self.host,
        }
    }

    fn bind_failed(&self, source: std::io::Error) -> NatError {
        NatError::Bind {
            proto: self.proto,
            host: self.host,
            source,
        }
    }
}

/// Bounds and timeouts of the flow table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most flows (TCP + UDP + ICMP) at once.
    pub max_flows: usize,
    /// Most bytes of flow buffers at once (each TCP flow counts its two buffers).
    pub max_flow_memory: usize,
    /// Size of each of a TCP flow's two smoltcp buffers (sets the window).
    pub tcp_buffer: usize,
    /// Idle time after which a UDP flow is removed.
    pub udp_timeout: Duration,
    /// Idle time after which an ICMP echo flow is removed.
    pub icmp_timeout: Duration,
    /// Idle time after which an established TCP flow is reset.
    pub tcp_idle_timeout: Duration,
    /// How long a host connect may take before the guest gets a RST.
    pub connect_timeout: Duration,
    /// Most flows (TCP, UDP, ICMP; port forwards not counted) one guest address may
    /// hold at once, so that one guest cannot take the whole table.
    pub max_flows_per_guest: usize,
    /// Most TCP connects one guest address may have in progress at once (a guest
    /// SYNing a black hole holds each for `connect_timeout`).
    pub max_pending_per_guest: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: 4096,
            max_flow_memory: 512 << 20,
            tcp_buffer: 512 << 10,
            udp_timeout: Duration::from_secs(60),
            icmp_timeout: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(2 * 3600),
            connect_timeout: Duration::from_secs(10),
            max_flows_per_guest: 256,
            max_pending_per_guest: 64,
        }
    }
}

/// Everything the router needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// The network's subnet: address and prefix length.
    pub subnet: (Ipv4Addr, u8),
    /// The router's address; it stands for the host's loopback.
    pub gateway: Ipv4Addr,
    /// The DNS forwarder's address.
    pub dns: Ipv4Addr,
    /// The router's MAC.
    pub mac: [u8; 6],
    /// IP MTU of the network (up to 65520).
    pub mtu: usize,
    /// Where the host resolvers are listed.
    pub resolv_conf: PathBuf,
    /// Port forwards at start.
    pub forwards: Vec<Forward>,
    /// Flow table bounds.
    pub limits: Limits,
    /// Whether the gateway address stands for the host's loopback (127.0.0.1) and
    /// the host's own addresses may be reached. Off by default (as in VirtualBox
    /// since 6.1.28): the gateway then answers only ping, DNS and DHCP.
    pub host_loopback: bool,
    /// Destinations flows may go to, as (address, prefix) pairs: see
    /// [`Outbound`] for how they combine with `outbound_deny`.
    pub outbound_allow: Vec<(Ipv4Addr, u8)>,
    /// Destinations flows may not go to (default: [`DEFAULT_DENY`], plus the
    /// daemon adds the subnets of its other networks).
    pub outbound_deny: Vec<(Ipv4Addr, u8)>,
    /// The network's own names, answered at the DNS address before anything is
    /// forwarded (the daemon plugs the table in; see [`crate::dns`]).
    pub names: Option<crate::dns::SharedNames>,
    /// The network's IPv6 (prefix, gateway, DNS address), if the router serves it
    /// (see `frame6.rs`).
    pub ipv6: Option<crate::config::Ipv6Spec>,
    /// The IPv6 service (RAs, NDP, DHCPv6) the router runs for `ipv6`; the daemon
    /// shares it for its counters, else the router makes its own.
    pub ipv6_service: Option<crate::ipv6::SharedService>,
    /// IPv6 destinations flows may go to (the IPv6 entries of `outbound_allow`):
    /// see [`outbound_allows6`].
    pub outbound_allow6: Vec<(Ipv6Addr, u8)>,
    /// IPv6 destinations flows may not go to, as (prefix, length) pairs (default
    /// [`DEFAULT_DENY6`], the IPv6 entries of `outbound_deny`, and the daemon puts
    /// the prefixes of its other networks here); the host's own addresses and
    /// `::1` are refused before the lists are asked.
    pub outbound_deny6: Vec<(Ipv6Addr, u8)>,
}

/// Destinations denied by default: link-local (cloud metadata services live there).
pub const DEFAULT_DENY: &[(Ipv4Addr, u8)] = &[(Ipv4Addr::new(169, 254, 0, 0), 16)];

/// IPv6 destinations denied by default: link-local (never routed anyway).
pub const DEFAULT_DENY6: &[(Ipv6Addr, u8)] = &[(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10)];

/// The outbound policy of a router, as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outbound {
    /// Whether the gateway stands for the host's loopback.
    pub host_loopback: bool,
    /// The allow list, as CIDRs.
    pub allow: Vec<String>,
    /// The deny list, as CIDRs.
    pub deny: Vec<String>,
}

/// Whether the outbound lists let a flow go to `ip`: the most specific entry that
/// contains `ip` decides (a deny wins a tie); with no entry containing it, `ip` is
/// allowed when the allow list is empty. So `outbound_allow = ["0.0.0.0/0"]` and
/// `outbound_deny = ["198.51.100.0/24"]` allow everything but that subnet, and an
/// allow entry of a single host punches a hole in a denied subnet.
pub fn outbound_allows(allow: &[(Ipv4Addr, u8)], deny: &[(Ipv4Addr, u8)], ip: Ipv4Addr) -> bool {
    most_specific(allow, deny, |n, len| prefix_match(ip, n, len)).unwrap_or(allow.is_empty())
}

/// [`outbound_allows`] for IPv6 destinations: the IPv6 entries decide the same way;
/// an address no entry contains is allowed only if neither allow list (`allow6`,
/// nor the IPv4 `allow4`) has an entry, so an allow list meant to restrict the
/// guests does not leave IPv6 open.
pub fn outbound_allows6(
    allow6: &[(Ipv6Addr, u8)],
    deny6: &[(Ipv6Addr, u8)],
    allow4: &[(Ipv4Addr, u8)],
    ip: Ipv6Addr,
) -> bool {
    most_specific(allow6, deny6, |n, len| super::v6::prefix6_match(ip, n, len))
        .unwrap_or(allow6.is_empty() && allow4.is_empty())
}

/// Whether the most specific entry of `allow` and `deny` that contains the address
/// (`contains(net, len)`) allows it (a deny wins a tie); `None` if none contains it.
fn most_specific<A: Copy>(
    allow: &[(A, u8)],
    deny: &[(A, u8)],
    contains: impl Fn(A, u8) -> bool,
) -> Option<bool> {
    let best = |l: &[(A, u8)]| {
        l.iter()
            .filter(|(n, len)| contains(*n, *len))
            .map(|(_, len)| i16::from(*len))
            .max()
            .unwrap_or(-1)
    };
    let (a, d) = (best(allow), best(deny));
    (a >= 0 || d >= 0).then_some(a > d)
}

/// An entry of an outbound list, either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cidr {
    /// An IPv4 network and prefix length.
    V4((Ipv4Addr, u8)),
    /// An IPv6 network and prefix length.
    V6((Ipv6Addr, u8)),
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cidr::V4((a, l)) => write!(f, "{a}/{l}"),
            Cidr::V6((a, l)) => write!(f, "{a}/{l}"),
        }
    }
}

/// Parses an outbound entry: an IPv4 CIDR as [`parse_cidr`] does, or an IPv6 one
/// ("2001:db8::/32", or a bare address, /128) whose host bits are zero.
pub fn parse_cidr_any(s: &str) -> Result<Cidr, String> {
    if !s.contains(':') {
        return parse_cidr(s).map(Cidr::V4);
    }
    let (a, len) = split_prefix_len(s, 128)?;
    let ip: Ipv6Addr = a.parse().map_err(|_| {
        format!("expected a CIDR such as \"192.0.2.0/24\" or \"2001:db8::/32\", got {s:?}")
    })?;
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    if u128::from(ip) & !mask != 0 {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}/{len}?)",
            Ipv6Addr::from(u128::from(ip) & mask)
        ));
    }
    Ok(Cidr::V6((ip, len)))
}

/// Splits "ADDR/LEN" into the address text and a length of at most `max` (a bare
/// address is a /`max`).
fn split_prefix_len(s: &str, max: u8) -> Result<(&str, u8), String> {
    let Some((a, l)) = s.split_once('/') else {
        return Ok((s, max));
    };
    let len = l.parse::<u8>().ok().filter(|l| *l <= max);
    len.map(|len| (a, len))
        .ok_or_else(|| format!("expected a prefix length 0..={max} in {s:?}"))
}

/// Parses "A.B.C.D/LEN" (or a bare address, /32) into a network and prefix length;
/// the host bits must be zero.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, len) = split_prefix_len(s, 32)?;
    let ip: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("expected an IPv4 CIDR such as \"192.0.2.0/24\", got {s:?}"))?;
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    if u32::from(ip) & !mask != 0 {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}/{len}?)",
            Ipv4Addr::from(u32::from(ip) & mask)
        ));
    }
    Ok((ip, len))
}

/// A CIDR as text.
pub fn show_cidr(c: &(Ipv4Addr, u8)) -> String {
    format!("{}/{}", c.0, c.1)
}

impl RouterConfig {
    /// VirtualBox's defaults: 10.0.2.0/24, gateway .2, DNS .3, MTU 1500.
    pub fn defaults() -> Self {
        RouterConfig {
            subnet: (Ipv4Addr::new(10, 0, 2, 0), 24),
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            mac: [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02],
            mtu: 1500,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            forwards: Vec::new(),
            limits: Limits::default(),
            host_loopback: false,
            outbound_allow: Vec::new(),
            outbound_deny: DEFAULT_DENY.to_vec(),
            names: None,
            ipv6: None,
            ipv6_service: None,
            outbound_allow6: Vec::new(),
            outbound_deny6: DEFAULT_DENY6.to_vec(),
        }
    }

    /// Checks the settings hang together.
    pub fn validate(&self) -> Result<(), NatError> {
        if !(576..=65520).contains(&self.mtu) {
            return Err(NatError::Invalid {
                key: "mtu",
                reason: format!("expected 576..=65520, got {}", self.mtu),
            });
        }
        if self.subnet.1 > 30 {
            return Err(NatError::Invalid {
                key: "subnet",
                reason: "prefix must be /30 or shorter".into(),
            });
        }
        for (key, a) in [("gateway", self.gateway), ("dns", self.dns)] {
            if !self.in_subnet(a) {
                return Err(NatError::Invalid {
                    key,
                    reason: format!("{a} is not in the subnet"),
                });
            }
        }
        if self.limits.tcp_buffer < 4096 {
            return Err(NatError::Invalid {
                key: "tcp_buffer",
                reason: "at least 4096 bytes".into(),
            });
        }
        if self.limits.max_flows_per_guest == 0 || self.limits.max_pending_per_guest == 0 {
            return Err(NatError::Invalid {
                key: "max_flows_per_guest",
                reason: "at least 1".into(),
            });
        }
        for f in &self.forwards {
            self.check_forward(f)?;
        }
        Ok(())
    }

    fn mask(&self) -> u32 {
        if self.subnet.1 == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.subnet.1))
        }
    }

    /// Whether `a` is inside the network's subnet.
    pub fn in_subnet(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.subnet.0) & self.mask()
    }

    /// Whether `a` may be the source of a guest's packet: a unicast address of the
    /// subnet that is neither its network nor its broadcast address nor one of the
    /// router's own.
    pub fn valid_guest_src(&self, a: Ipv4Addr) -> bool {
        let host = u32::from(a) & !self.mask();
        self.in_subnet(a)
            && host != 0
            && host != !self.mask()
            && a != self.gateway
            && a != self.dns
            && !a.is_unspecified()
            && !a.is_broadcast()
    }

    /// Whether `a` is inside the network's IPv6 prefix.
    pub fn in_prefix6(&self, a: Ipv6Addr) -> bool {
        self.ipv6.as_ref().is_some_and(|v| v.contains(a))
    }

    /// Whether `a` is one of the router's own IPv4 addresses (gateway, DNS).
    pub fn own4(&self, a: Ipv4Addr) -> bool {
        a == self.gateway || a == self.dns
    }

    /// Whether `a` is one of the router's own IPv6 addresses (gateway, DNS).
    pub fn own6(&self, a: Ipv6Addr) -> bool {
        self.ipv6
            .as_ref()
            .is_some_and(|v| a == v.gateway || Some(a) == v.dns)
    }

    /// Whether `a` may be the IPv6 source of a guest's flow: an address of the
    /// prefix that is neither its subnet-router anycast address (`::0`) nor one
    /// of the router's own (the port guard binds it to the guest's MAC).
    pub fn valid_guest_src6(&self, a: Ipv6Addr) -> bool {
        self.ipv6
            .as_ref()
            .is_some_and(|v| v.contains(a) && a != v.prefix && !self.own6(a))
    }

    /// Adds `cidr` to (`add`) or removes it from the outbound list `list` of its
    /// family; adding an entry already there changes nothing.
    pub fn outbound_edit(&mut self, list: fabric_api::netd::PolicyList, cidr: Cidr, add: bool) {
        use fabric_api::netd::PolicyList::{Allow, Deny};
        fn edit<A: PartialEq>(v: &mut Vec<A>, c: A, add: bool) {
            v.retain(|x| *x != c);
            if add {
                v.push(c);
            }
        }
        match (cidr, list) {
            (Cidr::V4(c), Allow) => edit(&mut self.outbound_allow, c, add),
            (Cidr::V4(c), Deny) => edit(&mut self.outbound_deny, c, add),
            (Cidr::V6(c), Allow) => edit(&mut self.outbound_allow6, c, add),
            (Cidr::V6(c), Deny) => edit(&mut self.outbound_deny6, c, add),
        }
    }

    /// Checks a forward against the network: ports not 0, the guest address
    /// inside the subnet (IPv4) or the prefix (IPv6, not the router's own).
    pub(crate) fn check_forward(&self, f: &Forward) -> Result<(), NatError> {
        if f.guest.port() == 0 || f.host.port() == 0 {
            return Err(NatError::Invalid {
                key: "forward",
                reason: format!("ports must not be 0 ({} -> {})", f.host, f.guest),
            });
        }
        let (inside, subnet) = match f.guest.ip() {
            IpAddr::V4(a) => (
                self.in_subnet(a),
                format!("{}/{}", self.subnet.0, self.subnet.1),
            ),
            IpAddr::V6(a) => (
                self.valid_guest_src6(a),
                self.ipv6
                    .as_ref()
                    .map_or("(no IPv6)".into(), |v| format!("{}/64", v.prefix)),
            ),
        };
        if !inside {
            return Err(NatError::GuestOutsideSubnet {
                guest: f.guest,
                subnet,
            });
        }
        Ok(())
    }
}

/// Whether `a` is inside `net/len`.
pub fn prefix_match(a: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(a) & mask == u32::from(net) & mask
}
