//! netd's control API: [`Request`] (`{"cmd": "port_add", ...}`), [`Response`]
//! (`{"ok": true, "data": ...}`), and the config types a request carries: a port
//! ([`PortConfig`], the same table as `[[network.port]]` in netd's TOML file) and a
//! port forward ([`Forward`], as `[[network.forward]]`).
//!
//! These are the raw, serde-shaped values (`deny_unknown_fields`); netd validates a
//! `PortConfig` into its checked port spec before acting on it, with errors that
//! name the key. A forward's addresses are parsed here, at the edge, into socket
//! addresses.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::client::{Call, Reply};

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// List networks.
    NetList,
    /// List the ports of a network, with counters.
    PortList {
        /// Network.
        net: String,
    },
    /// Add a port at runtime.
    PortAdd {
        /// Network.
        net: String,
        /// The port, as in the config file.
        port: PortConfig,
    },
    /// Remove a port at runtime.
    PortDel {
        /// Network.
        net: String,
        /// Port name.
        name: String,
    },
    /// The learned MAC table.
    Mac {
        /// Network.
        net: String,
    },
    /// DHCP leases.
    Leases {
        /// Network.
        net: String,
    },
    /// Add a port forward to a NAT network.
    ForwardAdd {
        /// Network.
        net: String,
        /// The forward, as in the config file.
        forward: Forward,
    },
    /// Remove a port forward.
    ForwardDel {
        /// Network.
        net: String,
        /// Protocol.
        proto: Proto,
        /// Host address ("ADDR:PORT" or "PORT").
        host: String,
    },
    /// List the port forwards of a NAT network.
    ForwardList {
        /// Network.
        net: String,
    },
    /// List the NAT flows of a network.
    Flows {
        /// Network.
        net: String,
    },
    /// The NAT router's counters.
    NatStats {
        /// Network.
        net: String,
    },
    /// The DHCP server's counters.
    DhcpStats {
        /// Network.
        net: String,
    },
    /// The control server's own counters ([`ControlStats`]).
    ControlStats,
    /// The names a network's DNS answers itself (static entries and DHCP
    /// hostnames).
    DnsNames {
        /// Network.
        net: String,
    },
    /// A network's DNS counters ([`DnsStats`]).
    DnsStats {
        /// Network.
        net: String,
    },
    /// A NAT network's outbound policy: `host_loopback` and the allow / deny lists.
    OutboundList {
        /// Network.
        net: String,
    },
    /// Add a CIDR to a NAT network's outbound allow or deny list (until restart).
    OutboundAdd {
        /// Network.
        net: String,
        /// Which list.
        list: PolicyList,
        /// "A.B.C.D/LEN" (or an address alone, /32).
        cidr: String,
    },
    /// Remove a CIDR from a NAT network's outbound allow or deny list.
    OutboundDel {
        /// Network.
        net: String,
        /// Which list.
        list: PolicyList,
        /// "A.B.C.D/LEN" (or an address alone, /32).
        cidr: String,
    },
    /// Add a remote VTEP to a `vxlan` port's flood list (until restart).
    VxlanRemoteAdd {
        /// Network.
        net: String,
        /// The vxlan port's name.
        port: String,
        /// The remote's underlay address.
        remote: Ipv4Addr,
    },
    /// Remove a remote VTEP from a `vxlan` port's flood list; the MACs learned
    /// behind it are forgotten.
    VxlanRemoteDel {
        /// Network.
        net: String,
        /// The vxlan port's name.
        port: String,
        /// The remote's underlay address.
        remote: Ipv4Addr,
    },
    /// A `vxlan` port's settings, flood list and tunnel counters.
    VxlanShow {
        /// Network.
        net: String,
        /// The vxlan port's name.
        port: String,
    },
    /// Capture a network's frames (`netd capture`): answered like any request,
    /// then, on success, the connection carries the capture as a pcapng byte
    /// stream until it ends (the client closes or shuts down its side, or `count`
    /// frames were written), and no more requests.
    Capture {
        /// Network.
        net: String,
        /// Ports to capture (both directions); empty: every port, inbound.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ports: Vec<String>,
        /// End after this many frames.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
        /// Bytes kept of each frame (default and most: 262144).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snaplen: Option<u32>,
        /// The client hands over the file to write the capture to: after the
        /// answer (which then says `"pass_fd": true`) it sends one byte carrying
        /// the file's descriptor (SCM_RIGHTS); the daemon writes the pcapng there
        /// itself, and the connection carries only one last JSON line, the
        /// capture's summary (`frames`, `ports`, `stats`, `error`). Without it
        /// the pcapng comes on the connection.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pass_fd: bool,
    },
    /// Test only: make a NAT network's router panic in its next step, to exercise
    /// its supervisor. Refused unless netd runs with `NETD_FAULT_INJECTION=1`.
    NatFault {
        /// Network.
        net: String,
    },
    /// Add a network at runtime (kept in netd's `state_dir` across restarts).
    NetAdd {
        /// One `[[network]]` table, keys as in the config file (see [`NetworkTable`]).
        network: NetworkTable,
    },
    /// Remove a network added at runtime. Refused while guest ports are attached,
    /// unless `force`.
    NetDel {
        /// Network.
        name: String,
        /// Remove it even with guest ports attached (they are stopped).
        #[serde(default)]
        force: bool,
    },
    /// Add (or replace, by MAC) a DHCP reservation of a network.
    ReservationAdd {
        /// Network.
        net: String,
        /// The reservation, as `[[network.reservation]]`.
        reservation: Reservation,
    },
    /// Remove the DHCP reservation of a MAC.
    ReservationDel {
        /// Network.
        net: String,
        /// The client MAC.
        mac: String,
    },
    /// A network's DHCP reservations ([`ReservationInfo`]).
    ReservationList {
        /// Network.
        net: String,
    },
}

/// One `[[network]]` table of netd's config file as a JSON object (the body of
/// `net_add`). Its keys are those of the file; netd checks it with the same code
/// as the file (unknown keys refused, errors naming the key), so the control API
/// takes every key the daemon knows without a second list of them here.
pub type NetworkTable = serde_json::Map<String, serde_json::Value>;

/// One `[[network.reservation]]` table (also the body of `reservation_add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// Client MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Address to give it.
    pub ip: Ipv4Addr,
    /// The client's host name (a DNS name; kept with the reservation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Where a network or a reservation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file.
    Config,
    /// The control API (kept in `state_dir`).
    Api,
}

/// A DHCP reservation, as `reservation_list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationInfo {
    /// Client MAC.
    pub mac: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Host name, if given.
    pub hostname: Option<String>,
    /// Config file or control API.
    pub source: Source,
}

/// One of a NAT network's outbound lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyList {
    /// `outbound_allow`.
    Allow,
    /// `outbound_deny`.
    Deny,
}

impl std::str::FromStr for PolicyList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(PolicyList::Allow),
            "deny" => Ok(PolicyList::Deny),
            other => Err(format!("expected \"allow\" or \"deny\", got {other:?}")),
        }
    }
}

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Success.
    pub ok: bool,
    /// Result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Message (with its cause chain) on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// Success with a result (`null` for requests that only change state).
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    /// Failure, with the message the client shows.
    pub fn fail(error: String) -> Self {
        Response {
            ok: false,
            data: None,
            error: Some(error),
        }
    }
}

impl Call for Request {
    type Reply = Response;
    const DAEMON: &'static str = "netd";
}

impl Reply for Response {
    type Data = serde_json::Value;
    fn into_result(self) -> Result<serde_json::Value, String> {
        if self.ok {
            Ok(self.data.unwrap_or(serde_json::Value::Null))
        } else {
            Err(self.error.unwrap_or_else(|| "no reason given".into()))
        }
    }
}

/// Network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// VMs only.
    Internal,
    /// VMs and the host, through a host TAP port with the gateway address.
    Hostonly,
    /// Userspace NAT router.
    Nat,
    /// Uplink on a host NIC.
    Bridged,
}

/// A network, as `net_list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInfo {
    /// Name.
    pub name: String,
    /// Mode.
    pub mode: Mode,
    /// Subnet, CIDR.
    pub subnet: Option<String>,
    /// Gateway.
    pub gateway: Option<String>,
    /// DHCP served.
    pub dhcp: bool,
    /// MTU.
    pub mtu: u32,
    /// Number of ports (services included).
    pub ports: usize,
    /// Host TAP of a hostonly network.
    pub host_ifname: Option<String>,
    /// Config file or control API (absent from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Where the config file and the runtime state disagree about this network,
    /// and what netd did about it (also logged as a warning at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

/// The DHCP server's counters, as `dhcp_stats` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpStats {
    /// Leases held.
    pub leases: usize,
    /// Datagrams dropped as malformed.
    pub malformed: u64,
    /// Clients refused because the tables were at their bound.
    pub refused_full: u64,
    /// Messages whose `chaddr` was not the frame's source MAC (ignored).
    #[serde(default)]
    pub spoofed_chaddr: u64,
    /// RELEASEs and DECLINEs for an address that was not the sender's (ignored).
    #[serde(default)]
    pub foreign_release: u64,
    /// REQUESTs for an address never offered or leased to that client (NAKed).
    #[serde(default)]
    pub nak_unoffered: u64,
    /// ACKs withheld because the lease file could not be written.
    #[serde(default)]
    pub save_failed: u64,
    /// Frames the NAT router could not hand to the server (its queue was full).
    #[serde(default)]
    pub dropped_busy: u64,
    /// Lease file writes (each commits every lease change queued before it).
    #[serde(default)]
    pub commits: u64,
}

/// A network's DNS counters, as `dns_stats` reports them (`netd dns NET --stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStats {
    /// Names published now (static entries and live leases).
    pub names: usize,
    /// Queries read.
    pub queries: u64,
    /// Queries answered from the network's names (NXDOMAIN included).
    pub answered: u64,
    /// Of those, NXDOMAIN.
    pub nxdomain: u64,
    /// Queries forwarded to the host's resolver.
    pub forwarded: u64,
    /// Datagrams that were not one readable question (dropped).
    pub malformed: u64,
    /// Guest hostnames not published (not a DNS label, or a static entry's name).
    pub hostname_refused: u64,
    /// Forwarded queries dropped (no resolver, too many waiting).
    pub forward_dropped: u64,
    /// DNS-over-TCP connections accepted.
    #[serde(default)]
    pub tcp_connections: u64,
    /// DNS-over-TCP connections refused (too many open).
    #[serde(default)]
    pub tcp_refused: u64,
    /// DNS-over-TCP connections closed idle, too slow, or not reading answers.
    #[serde(default)]
    pub tcp_timeouts: u64,
}

/// The control server's counters, as `control_stats` reports them (`netd control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStats {
    /// Connections open now (this one included).
    pub connections: usize,
    /// The bound on open connections (`control_max_connections`).
    pub max_connections: usize,
    /// Connections refused because that many were open.
    pub refused_full: u64,
    /// Connections closed after `control_idle_timeout` seconds without a request.
    pub closed_idle: u64,
}

/// Port kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// netd holds the TAP queue.
    Tap,
    /// A VMM holds the TAP queue; netd uses AF_PACKET on its kernel side.
    Vm,
    /// QEMU `-netdev stream` framing on a unix socket.
    Stream,
    /// A VXLAN tunnel (RFC 7348) to remote VTEPs over a UDP socket.
    Vxlan,
}

named_enum! {
    PortKind {
        Tap => "tap",
        Vm => "vm",
        Stream => "stream",
        Vxlan => "vxlan",
    } else |other| format!("expected tap, vm, stream or vxlan, got {other:?}")
}

/// One `[[network.port]]` table (also the body of the control API's port add).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Port name, unique in its network (default: the ifname or path).
    pub name: Option<String>,
    /// Kind.
    pub kind: PortKind,
    /// TAP name (tap, vm).
    pub ifname: Option<String>,
    /// MAC: for `tap`, set on the kernel side; for `vm`, the VM's MAC (informational).
    pub mac: Option<String>,
    /// For `tap`: an existing namespace to create the kernel side in.
    pub netns: Option<String>,
    /// For `stream`: the unix socket path netd listens on.
    pub path: Option<PathBuf>,
    /// Keep a TAP netd created when netd exits.
    #[serde(default)]
    pub persistent: bool,
    /// The port guard (default: the network's `guard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    /// The `vxlan` keys (`vni`, `local`, `remotes`, `group`, `port`, `ttl`,
    /// `learning`, `accept_any`), in the same table; absent for other kinds.
    #[serde(flatten)]
    pub vxlan: VxlanKeys,
}

/// The keys of a `kind = "vxlan"` port (RFC 7348), part of its `[[network.port]]`
/// table. netd validates them (and refuses them on other kinds) with errors that
/// name the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VxlanKeys {
    /// VXLAN network identifier, 1..16777215.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// Underlay address to send from (default: the kernel's choice per route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<Ipv4Addr>,
    /// Remote VTEPs: broadcast, unknown unicast and multicast go to each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<Ipv4Addr>,
    /// An IPv4 multicast group, instead of or besides `remotes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Ipv4Addr>,
    /// UDP port (default 4789).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// TTL of the outer IP header (default 64; 1 towards a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u8>,
    /// Learn which remote a MAC lives behind (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning: Option<bool>,
    /// Accept datagrams from any sender, not only the listed remotes (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_any: Option<bool>,
}

/// The port guard of a guest port (`guard` on a network or a port): `clean` locks
/// the port to its MAC and, on a network with DHCP or NAT, to its addresses; `off`
/// lets the port send from any MAC and address (up to a cap of learned MACs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Guard {
    /// Locked to its MAC and addresses (libvirt's `clean-traffic`).
    #[default]
    Clean,
    /// No lock.
    Off,
}

named_enum! {
    Guard {
        Clean => "clean",
        Off => "off",
    } else |other| format!("expected clean or off, got {other:?}")
}

impl PortConfig {
    /// The name netd gives the port: its `name`, else its ifname, else its path.
    pub fn shown_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.ifname.clone())
            .or_else(|| self.path.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_default()
    }
}

/// Transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

named_enum! {
    Proto {
        Tcp => "tcp",
        Udp => "udp",
    } else |other| format!("expected \"tcp\" or \"udp\", got {other:?}")
}

/// Parses a forward's host address: "ADDR:PORT", or "PORT" alone for 127.0.0.1:PORT
/// (loopback by default: a forward is open to the world only if the user says so).
pub fn parse_host_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("expected \"ADDR:PORT\" or \"PORT\", got {s:?}"))
}

fn de_host<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_host_addr(&s).map_err(serde::de::Error::custom)
}

/// A port forward: connections (TCP) or datagrams (UDP) to `host` go to `guest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// `tcp` or `udp`.
    pub proto: Proto,
    /// Host address to listen on ("127.0.0.1:2222", or "2222" for loopback).
    #[serde(deserialize_with = "de_host")]
    pub host: SocketAddr,
    /// Guest address: IPv4 ("10.0.2.15:22") or, on a network with IPv6, IPv6
    /// ("[fd00::15]:22").
    pub guest: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_cmd_snake_case() {
        let r = Request::PortDel {
            net: "lab".into(),
            name: "p".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"port_del","net":"lab","name":"p"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::NetList).unwrap(),
            r#"{"cmd":"net_list"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"port_del","net":"a","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"net_list"}"#).is_err());
    }

    #[test]
    fn a_vm_port_request_is_what_vmm_shim_sends() {
        let r = Request::PortAdd {
            net: "lab".into(),
            port: PortConfig {
                name: None,
                kind: PortKind::Vm,
                ifname: Some("vs1n0".into()),
                mac: Some("52:54:00:00:00:01".into()),
                netns: None,
                path: None,
                persistent: false,
                guard: None,
                vxlan: VxlanKeys::default(),
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["cmd"], "port_add");
        assert_eq!(v["port"]["kind"], "vm");
        assert_eq!(v["port"]["ifname"], "vs1n0");
        let back: Request = serde_json::from_value(v).unwrap();
        assert!(matches!(back, Request::PortAdd { port, .. } if port.shown_name() == "vs1n0"));
    }

    #[test]
    fn forwards_parse_their_addresses() {
        let f: Forward =
            serde_json::from_str(r#"{"proto":"tcp","host":"2222","guest":"10.0.2.15:22"}"#)
                .unwrap();
        assert_eq!(f.host, "127.0.0.1:2222".parse().unwrap());
        assert_eq!(f.proto, Proto::Tcp);
        assert!(serde_json::from_str::<Forward>(
            r#"{"proto":"sctp","host":"2222","guest":"10.0.2.15:22"}"#
        )
        .is_err());
        assert!(parse_host_addr("nowhere").is_err());
        let f: Forward =
            serde_json::from_str(r#"{"proto":"udp","host":"[::1]:2222","guest":"[fd00::15]:22"}"#)
                .unwrap();
        assert_eq!(f.host, "[::1]:2222".parse().unwrap());
        assert_eq!(f.guest, "[fd00::15]:22".parse().unwrap());
        assert_eq!(
            serde_json::to_value(&f).unwrap()["guest"],
            "[fd00::15]:22",
            "written as it is read"
        );
        assert_eq!("udp".parse::<Proto>(), Ok(Proto::Udp));
        assert_eq!("vm".parse::<PortKind>(), Ok(PortKind::Vm));
        assert!("bridge".parse::<PortKind>().is_err());
    }

    #[test]
    fn vxlan_keys_sit_in_the_port_table_and_unknown_keys_still_fail() {
        let p: PortConfig = serde_json::from_str(
            r#"{"kind":"vxlan","name":"vx","vni":42,"remotes":["192.0.2.1"],"port":4790}"#,
        )
        .unwrap();
        assert_eq!(p.kind, PortKind::Vxlan);
        assert_eq!(p.vxlan.vni, Some(42));
        assert_eq!(p.vxlan.remotes, vec![Ipv4Addr::new(192, 0, 2, 1)]);
        assert_eq!(p.vxlan.port, Some(4790));
        assert!(serde_json::from_str::<PortConfig>(r#"{"kind":"vxlan","vnii":42}"#).is_err());
        assert!(serde_json::from_str::<PortConfig>(r#"{"kind":"tap","bogus":1}"#).is_err());
        // A port without vxlan keys serializes as before.
        let tap: PortConfig = serde_json::from_str(r#"{"kind":"tap","ifname":"t0"}"#).unwrap();
        let v = serde_json::to_value(&tap).unwrap();
        assert!(v.get("vni").is_none() && v.get("remotes").is_none(), "{v}");
    }

    #[test]
    fn answers_become_results() {
        let ok: Response = serde_json::from_str(r#"{"ok":true,"data":[1]}"#).unwrap();
        assert_eq!(ok.into_result(), Ok(serde_json::json!([1])));
        let bad: Response = serde_json::from_str(r#"{"ok":false,"error":"no"}"#).unwrap();
        assert_eq!(bad.into_result(), Err("no".into()));
        let bare: Response = serde_json::from_str(r#"{"ok":false}"#).unwrap();
        assert_eq!(bare.into_result(), Err("no reason given".into()));
    }
}
