//! The validated configuration: what [`Config::validate`](super::Config::validate)
//! and the control API produce and the rest of netd runs on. Every value here has
//! been checked and every default of the network's mode filled in, so users of these
//! types never re-check them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::{prefix_mask, Guard, Mode, PortKind};

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

/// Validated IPv6 settings of a network (see [`crate::ipv6`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Spec {
    /// The /64 prefix (its host bits zero).
    pub prefix: Ipv6Addr,
    /// The gateway address, inside the prefix.
    pub gateway: Ipv6Addr,
    /// The DNS server announced, if any.
    pub dns: Option<Ipv6Addr>,
    /// The DHCPv6 range (stateful IA_NA leases), if any.
    pub range: Option<(Ipv6Addr, Ipv6Addr)>,
    /// Lease time of DHCPv6 leases, seconds (the network's `lease_time`).
    pub lease_time: u32,
}

impl Ipv6Spec {
    /// Whether `ip` is inside the /64.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        ip.octets()[..8] == self.prefix.octets()[..8]
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
    pub reservations: Vec<DhcpReservation>,
    /// The domain announced (option 15), on a network that serves DNS.
    pub domain: Option<String>,
}

/// A validated DHCP reservation (`[[network.reservation]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpReservation {
    /// The client's MAC.
    pub mac: [u8; 6],
    /// The address it always gets.
    pub ip: Ipv4Addr,
    /// Its host name: sent in option 12 and published in the network's DNS,
    /// instead of the name the client sent.
    pub hostname: Option<String>,
}

/// Validated DNS settings of a network that serves guest names (see [`crate::dns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSpec {
    /// The address DNS is served on (a NAT network's: the router's DNS address).
    pub addr: Ipv4Addr,
    /// The names: domain, static entries, subnet.
    pub zone: crate::dns::Zone,
    /// Where the host resolvers are listed.
    pub resolv_conf: PathBuf,
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
    /// The network's own DNS names, when it serves DNS.
    pub dns: Option<DnsSpec>,
    /// IPv6 (`subnet6`): RAs, NDP and DHCPv6 from netd, and the IPv6 guard.
    pub ipv6: Option<Ipv6Spec>,
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
