//! IPv6 on a hostonly or internal network with `subnet6`: Router Advertisements
//! (RFC 4861) for SLAAC, with RDNSS (RFC 8106), Neighbor Discovery for netd's own
//! addresses, and DHCPv6 (RFC 8415, `dhcp6.rs`), as one in-process service port of
//! the switch.
//!
//! # Theory of operation
//!
//! The service has a MAC of its own (derived from the network name, like the DHCP
//! server's) and the EUI-64 link-local address of that MAC, from which it sends
//! every RA: hosts accept RAs only from a link-local source, and a host TAP's
//! link-local changes whenever the TAP is recreated, netd's does not. The gateway
//! address (`gateway6`) is the host TAP's on a hostonly network (the kernel answers
//! NDP and ping for it there) and the service's own on an internal network, where
//! the service answers Neighbor Solicitations and echo requests for it too.
//!
//! An RA carries: the MTU option (the network's MTU), the prefix (`subnet6`, on-link;
//! autonomous unless `dhcp6_range` is set, when addresses come from DHCPv6 leases
//! and the M flag is set), RDNSS with `dns6` when set (and the O flag: DHCPv6
//! answers Information-requests with it), and a router lifetime of 0: these
//! networks route nowhere (as their IPv4 DHCP announces no router), so no guest
//! takes netd, or anything else, as its default router from them. RAs go to all
//! nodes every [`RA_INTERVAL`] (the first [`INITIAL_RAS`] faster) and in answer to a
//! Router Solicitation, at most one answer per [`RS_ANSWER_GAP`].
//!
//! On a NAT network the same service runs inside the NAT router
//! ([`Ipv6Service::set_router`], see [`crate::nat`]): it sends from the router's MAC
//! and link-local address, owns the gateway and DNS addresses, and its RAs carry a
//! router lifetime of [`ROUTER_LIFETIME`], so the guests route IPv6 through netd.
//!
//! [`Ipv6Service::handle_frame`] is pure logic (a frame and a clock in, frames out),
//! so unit tests drive it without sockets; [`run`] wires it to a service port.
//! Every received frame is parsed by `wire.rs` (bounded, checked); a frame that
//! fails a check (hop limit not 255 on ND, bad checksum, bad options) is dropped
//! and counted in `malformed`, never a panic.

use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Ipv6Spec;
use crate::wire::Ethernet;

pub mod dhcp6;
pub mod wire;

use self::wire::{icmp, opt, Ipv6, ETHERTYPE_IPV6, IPPROTO_ICMPV6, IPPROTO_UDP};

/// Time between unsolicited RAs.
pub const RA_INTERVAL: Duration = Duration::from_secs(30);
/// RAs sent every few seconds after the service starts (RFC 4861 6.2.4).
pub const INITIAL_RAS: u32 = 3;
/// Least time between two RAs sent in answer to solicitations.
pub const RS_ANSWER_GAP: Duration = Duration::from_millis(500);
/// Valid lifetime of the prefix, seconds.
const PREFIX_VALID: u32 = 86_400;
/// Preferred lifetime of the prefix, seconds.
const PREFIX_PREFERRED: u32 = 14_400;
/// Lifetime of the RDNSS option, seconds (more than twice the RA interval).
const RDNSS_LIFETIME: u32 = 600;
/// Router lifetime in a NAT router's RAs, seconds (RFC 4861's default, 3 x 600).
pub const ROUTER_LIFETIME: u16 = 1800;
/// Largest echo request answered (bytes of ICMPv6 message).
const MAX_ECHO: usize = 1452;

/// The all-nodes multicast address.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Counters of the IPv6 service.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// RAs sent.
    pub ra_sent: u64,
    /// Router Solicitations heard.
    pub rs: u64,
    /// Solicitations not answered at once (an RA had just gone out).
    pub rs_limited: u64,
    /// Neighbor Solicitations for netd's addresses answered.
    pub na_sent: u64,
    /// Echo requests to netd's addresses answered.
    pub echo: u64,
    /// Frames for the service that failed a check (dropped).
    pub malformed: u64,
}

/// The IPv6 service of one network.
pub struct Ipv6Service {
    spec: Ipv6Spec,
    mac: [u8; 6],
    ll: Ipv6Addr,
    mtu: u32,
    /// Whether the gateway address is the service's (internal) or the host's.
    own_gateway: bool,
    /// A NAT network's router: it owns the DNS address too, and its RAs make it
    /// the default router (see [`Ipv6Service::set_router`]).
    router: bool,
    last_rs_answer: Option<Instant>,
    /// Counters.
    pub stats: Stats,
    /// DHCPv6.
    pub dhcp6: dhcp6::Dhcp6Server,
}

impl Ipv6Service {
    /// The service for `spec`, sending from `mac`; `own_gateway` when the gateway
    /// address is netd's (internal) rather than the host TAP's (hostonly).
    pub fn new(
        spec: Ipv6Spec,
        mac: [u8; 6],
        mtu: u32,
        own_gateway: bool,
        leases: dhcp6::Lease6Db,
    ) -> Self {
        let ll = wire::link_local(mac);
        Ipv6Service {
            dhcp6: dhcp6::Dhcp6Server::new(spec.clone(), mac, ll, leases),
            spec,
            mac,
            ll,
            mtu,
            own_gateway,
            router: false,
            last_rs_answer: None,
            stats: Stats::default(),
        }
    }

    /// The counters, as `netd leases NET --stats` adds them (flat `ipv6_*` and
    /// `dhcp6_*` keys beside the IPv4 server's).
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("ipv6_ra_sent", s.ra_sent),
            ("ipv6_rs", s.rs),
            ("ipv6_rs_limited", s.rs_limited),
            ("ipv6_na_sent", s.na_sent),
            ("ipv6_echo", s.echo),
            ("ipv6_malformed", s.malformed),
            ("dhcp6_malformed", self.dhcp6.malformed),
            ("dhcp6_refused_full", self.dhcp6.refused_full),
            ("dhcp6_leases", self.dhcp6.db.leases().len() as u64),
        ]
    }

    /// The service's link-local address (the RAs' source).
    pub fn link_local(&self) -> Ipv6Addr {
        self.ll
    }

    /// Makes the service a NAT network's router (run inside the router, with the
    /// router's MAC): its RAs carry a router lifetime of [`ROUTER_LIFETIME`], so
    /// guests take it as their default router, and it answers NDP and ping for the
    /// DNS address too (the router's DNS forwarder is there).
    pub fn set_router(&mut self) {
        self.router = true;
        self.own_gateway = true;
    }

    /// Whether `a` is one of the service's own addresses (its link-local, the
    /// gateway where it owns it, the DNS address on a NAT network).
    pub fn owns(&self, a: Ipv6Addr) -> bool {
        a == self.ll
            || (self.own_gateway && a == self.spec.gateway)
            || (self.router && Some(a) == self.spec.dns)
    }

    /// A Router Advertisement to all nodes.
    pub fn router_advert(&mut self) -> Vec<u8> {
        self.stats.ra_sent += 1;
        let stateful = self.spec.range.is_some();
        let other = stateful || self.spec.dns.is_some();
        let mut b = vec![icmp::RA, 0, 0, 0, 64];
        b.push(if stateful { 0x80 } else { 0 } | if other { 0x40 } else { 0 });
        // Router lifetime 0 (not a default router) but on a NAT network's router.
        // Reachable time, retrans timer: unspecified.
        let lifetime = if self.router { ROUTER_LIFETIME } else { 0 };
        b.extend_from_slice(&lifetime.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[opt::SLLA, 1]);
        b.extend_from_slice(&self.mac);
        b.extend_from_slice(&[opt::MTU, 1, 0, 0]);
        b.extend_from_slice(&self.mtu.to_be_bytes());
        b.extend_from_slice(&[opt::PREFIX, 4, 64, if stateful { 0x80 } else { 0xc0 }]);
        b.extend_from_slice(&PREFIX_VALID.to_be_bytes());
        b.extend_from_slice(&PREFIX_PREFERRED.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.spec.prefix.octets());
        if let Some(d) = self.spec.dns {
            b.extend_from_slice(&[opt::RDNSS, 3, 0, 0]);
            b.extend_from_slice(&RDNSS_LIFETIME.to_be_bytes());
            b.extend_from_slice(&d.octets());
        }
        wire::emit_frame(
            wire::multicast_mac(ALL_NODES),
            self.mac,
            self.ll,
            ALL_NODES,
            IPPROTO_ICMPV6,
            255,
            b,
            2,
        )
    }

    /// Answers one frame from the switch: RAs for solicitations, NAs for netd's
    /// addresses, echo replies, DHCPv6 replies. `unix` is the lease clock.
    pub fn handle_frame(&mut self, frame: &[u8], now: Instant, unix: u64) -> Vec<Vec<u8>> {
        let Some(eth) = Ethernet::parse(frame) else {
            return Vec::new();
        };
        if eth.ethertype != ETHERTYPE_IPV6 || eth.src[0] & 1 != 0 {
            return Vec::new();
        }
        let Some(ip) = Ipv6::parse(eth.payload) else {
            self.stats.malformed += 1;
            return Vec::new();
        };
        let for_us = ip.dst.is_multicast() || self.owns(ip.dst);
        if !for_us || ip.extended {
            return Vec::new();
        }
        match ip.proto {
            Some(IPPROTO_ICMPV6) => self.icmp(&eth, &ip, now),
            Some(IPPROTO_UDP) => {
                let r = self.dhcp6.handle(&eth, &ip, unix);
                r.into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    fn icmp(&mut self, eth: &Ethernet<'_>, ip: &Ipv6<'_>, now: Instant) -> Vec<Vec<u8>> {
        let t = ip.payload.first().copied();
        let nd = matches!(t, Some(icmp::RS | icmp::NS));
        if nd && (ip.hop_limit != 255 || ip.payload.get(1) != Some(&0)) {
            self.stats.malformed += 1;
            return Vec::new();
        }
        if t.is_some_and(|t| nd || (t == icmp::ECHO_REQUEST && self.owns(ip.dst)))
            && !ip.checksum_ok()
        {
            self.stats.malformed += 1;
            return Vec::new();
        }
        match t {
            Some(icmp::RS) => {
                let ok = ip
                    .payload
                    .get(8..)
                    .and_then(wire::nd_options)
                    .is_some_and(|o| !(ip.src.is_unspecified() && o.iter().any(|x| x.0 == 1)));
                if !ok {
                    self.stats.malformed += 1;
                    return Vec::new();
                }
                self.stats.rs += 1;
                if self
                    .last_rs_answer
                    .is_some_and(|l| now.saturating_duration_since(l) < RS_ANSWER_GAP)
                {
                    self.stats.rs_limited += 1;
                    return Vec::new();
                }
                self.last_rs_answer = Some(now);
                vec![self.router_advert()]
            }
            Some(icmp::NS) => self.neighbor_solicit(eth, ip).into_iter().collect(),
            Some(icmp::ECHO_REQUEST) if self.owns(ip.dst) && ip.payload.len() <= MAX_ECHO => {
                self.stats.echo += 1;
                let mut b = ip.payload.to_vec();
                b[0] = icmp::ECHO_REPLY;
                vec![wire::emit_frame(
                    eth.src,
                    self.mac,
                    ip.dst,
                    ip.src,
                    IPPROTO_ICMPV6,
                    64,
                    b,
                    2,
                )]
            }
            _ => Vec::new(),
        }
    }

    fn neighbor_solicit(&mut self, eth: &Ethernet<'_>, ip: &Ipv6<'_>) -> Option<Vec<u8>> {
        let p = ip.payload;
        let (Some(target), Some(opts)) = (
            p.get(8..24)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(Ipv6Addr::from),
            p.get(24..).and_then(wire::nd_options),
        ) else {
            self.stats.malformed += 1;
            return None;
        };
        let Some(slla) = wire::lla(&opts, opt::SLLA) else {
            self.stats.malformed += 1;
            return None;
        };
        if target.is_multicast() || !self.owns(target) {
            return None;
        }
        let dad = ip.src.is_unspecified();
        if dad && slla.is_some() {
            self.stats.malformed += 1;
            return None;
        }
        self.stats.na_sent += 1;
        // Solicited and override to the asker; to all nodes, unsolicited, for DAD.
        let (dst, dst_mac, flags) = if dad {
            (ALL_NODES, wire::multicast_mac(ALL_NODES), 0x20)
        } else {
            (ip.src, slla.unwrap_or(eth.src), 0x60)
        };
        let mut b = vec![icmp::NA, 0, 0, 0, flags, 0, 0, 0];
        b.extend_from_slice(&target.octets());
        b.extend_from_slice(&[opt::TLLA, 1]);
        b.extend_from_slice(&self.mac);
        Some(wire::emit_frame(
            dst_mac,
            self.mac,
            target,
            dst,
            IPPROTO_ICMPV6,
            255,
            b,
            2,
        ))
    }
}

/// An IPv6 service shared between the daemon (leases, counters) and the task or
/// router thread that runs it; equal when it is the same service.
#[derive(Clone)]
pub struct SharedService(pub Arc<Mutex<Ipv6Service>>);

impl PartialEq for SharedService {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedService {}

impl std::fmt::Debug for SharedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedService")
    }
}

/// Serves IPv6 on a service port until the switch side goes away: answers frames
/// as they come, sends unsolicited RAs on a timer, and saves DHCPv6 leases (written
/// atomically before the reply that announces them leaves).
///
/// With `guard` (the network's IPv6 port guard), every lease change is handed to it,
/// so a leased address is bound to the MAC that asked for it.
pub async fn run(
    svc: Arc<Mutex<Ipv6Service>>,
    port: crate::switch::ServicePort,
    guard: Option<Arc<crate::switch::guard6::Ip6Guard>>,
) {
    let crate::switch::ServicePort {
        to_switch,
        mut from_switch,
    } = port;
    let mut sent = 0u32;
    let mut next = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        let frames = tokio::select! {
            f = from_switch.recv() => match f {
                Some(f) => {
                    let mut s = svc.lock().unwrap_or_else(|e| e.into_inner());
                    let out = s.handle_frame(&f, Instant::now(), crate::dhcp::unix_now());
                    if let (true, Some(g)) = (s.dhcp6.db.is_changed(), &guard) {
                        g.set_leases(s.dhcp6.db.leases());
                    }
                    if let Err(e) = s.dhcp6.save_if_changed() {
                        tracing::error!(error = %crate::error_chain(&e), "DHCPv6 lease not saved; reply withheld");
                        Vec::new()
                    } else {
                        out
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next) => {
                sent = sent.saturating_add(1);
                next += if sent < INITIAL_RAS { Duration::from_secs(4) } else { RA_INTERVAL };
                vec![svc.lock().unwrap_or_else(|e| e.into_inner()).router_advert()]
            }
        };
        for f in frames {
            if to_switch.send(Bytes::from(f)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
