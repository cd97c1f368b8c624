//! IPv6 in the NAT router: the router's IPv6 service, the IPv6 ingress path and
//! where an IPv6 flow goes on the host.
//!
//! # Theory of operation
//!
//! A NAT network with IPv6 (`fd00::/64`, gateway `fd00::2`, DNS `fd00::3` by
//! default, as slirp4netns `--enable-ipv6` lays it out) is routed by the same router
//! as its IPv4, with the same flow tables, limits, quotas and policy:
//!
//! - Address configuration: the router runs the network's
//!   [`crate::ipv6::Ipv6Service`] itself ([`Ipv6Service::set_router`]), from the
//!   router's MAC and its EUI-64 link-local address: Router Advertisements (prefix
//!   for SLAAC, MTU, RDNSS with the DNS address, a router lifetime of
//!   [`crate::ipv6::ROUTER_LIFETIME`]), answers to Router and Neighbor
//!   Solicitations for the router's addresses, echo replies for them and stateless
//!   DHCPv6 (the DNS server). Unsolicited RAs go out from the router's housekeeping
//!   (about every second): three a few seconds apart, then every
//!   [`crate::ipv6::RA_INTERVAL`].
//! - Flows: TCP through the router's smoltcp interface (any-IP, the gateway and DNS
//!   addresses, a default IPv6 route through the gateway), UDP and ICMPv6 echo
//!   through host sockets, exactly as IPv4 (`tcp.rs`, `udp.rs`, `icmp.rs` key their
//!   tables by `SocketAddr`). smoltcp learns a guest's MAC from a Neighbor
//!   Advertisement the router feeds it when the guest opens its first TCP flow from
//!   an address ([`super::frame6::guest_advert`]), so the SYN-ACK needs no
//!   solicitation; a later solicitation of smoltcp's is answered by the guest to
//!   the router's MAC and goes back to smoltcp.
//! - Destinations ([`Router::map_dst6`]): the gateway stands for the host's `::1`
//!   only with `host_loopback` (its port 53 goes to the host's resolver either way);
//!   the DNS address, port 53, goes to the host's resolver; `::1` directly, the
//!   host's own addresses (without `host_loopback`) and link-local are refused and
//!   counted as for IPv4; the rest passes the outbound lists
//!   ([`super::config::outbound_allows6`]: the IPv6 entries of `outbound_allow` and
//!   `outbound_deny`, `fe80::/10` and the daemon's other networks' prefixes). A
//!   host without IPv6 connectivity refuses the connect at once (ENETUNREACH,
//!   EHOSTUNREACH): the guest gets an ICMPv6 unreachable ([`no_route`]), quoting
//!   its SYN for TCP so its own connect fails with the same error.
//! - Port forwards to IPv6 guests: their sessions come from the gateway
//!   ([`Router::forward_gateway`]), TCP through smoltcp (which asks for the
//!   guest's MAC with a Neighbor Solicitation if it does not know it), UDP as
//!   frames built here.
//! - TCP offload: as for IPv4, the guest's SYN has its MSS raised (the guest's
//!   own is kept), smoltcp builds segments up to 64 KiB, and they leave with a
//!   virtio-net header asking for the checksum and, past the network's MTU, for
//!   segmentation at the guest's MSS (GSO_TCPV6, [`tcp6_offload_header`]).
//!
//! The port guard holds for IPv6 on the switch before any of this (see
//! [`crate::switch::guard6`]): a guest sends only from its own addresses, sends no
//! RA or DHCPv6 server message and claims no router address in NDP.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use smoltcp::wire::EthernetAddress;

use super::frame::{DropReason, ETH_HDR};
use super::frame6::{classify6, guest_advert, Classified6, IPV6_HDR};
use super::router::Denied;
use super::{NatError, Router, RouterConfig, Stats};
use crate::ipv6::{Ipv6Service, SharedService, INITIAL_RAS, RA_INTERVAL};

/// Time between the first unsolicited RAs.
const INITIAL_RA_GAP: Duration = Duration::from_secs(4);

/// The router's IPv6 state.
pub(super) struct V6State {
    /// The IPv6 service (shared with the daemon for its counters).
    svc: SharedService,
    /// The router's link-local address (the RAs' source).
    ll: Ipv6Addr,
    /// When the next unsolicited RA is due, and how many went out.
    next_ra: Instant,
    sent: u32,
    /// Guest addresses smoltcp's neighbor cache was told about, with their MAC.
    known: HashMap<Ipv6Addr, EthernetAddress>,
}

impl V6State {
    /// The IPv6 state of a router for `cfg`, sending from `mac`; `None` without
    /// IPv6. Uses the daemon's service if it gave one, else makes its own.
    pub(super) fn new(cfg: &RouterConfig, mac: EthernetAddress) -> Result<Option<Self>, NatError> {
        let Some(spec) = &cfg.ipv6 else {
            return Ok(None);
        };
        let svc = match &cfg.ipv6_service {
            Some(s) => s.clone(),
            None => {
                let db =
                    crate::ipv6::dhcp6::Lease6Db::load(None).map_err(|e| NatError::Invalid {
                        key: "subnet6",
                        reason: e.to_string(),
                    })?;
                let mtu = u32::try_from(cfg.mtu).unwrap_or(1500);
                let mut s = Ipv6Service::new(spec.clone(), mac.0, mtu, true, db);
                s.set_router();
                SharedService(Arc::new(Mutex::new(s)))
            }
        };
        Ok(Some(V6State {
            svc,
            ll: crate::ipv6::wire::link_local(mac.0),
            next_ra: Instant::now(),
            sent: 0,
            known: HashMap::new(),
        }))
    }

    /// Forgets what smoltcp was told (a new interface after a restart, or a full
    /// table).
    pub(super) fn forget_neighbors(&mut self) {
        self.known.clear();
    }

    /// Housekeeping: bounds the table of known neighbors.
    pub(super) fn expire(&mut self) {
        if self.known.len() > 4096 {
            self.known.clear();
        }
    }
}

impl Stats {
    /// Counts a refused packet by its reason.
    pub(super) fn count_drop(&mut self, r: DropReason) {
        let c = match r {
            DropReason::BadSource => &mut self.bad_source,
            DropReason::MartianDst => &mut self.martian_dst,
            DropReason::Loopback => &mut self.denied_loopback,
            DropReason::PortZero => &mut self.port_zero,
        };
        *c += 1;
    }
}

impl Router {
    /// One IPv6 frame from the switch (see `frame6.rs`).
    pub(super) fn ingest6(&mut self, frame: Bytes) {
        let Some(v6) = &self.v6 else {
            return;
        };
        let (Some(dst_mac), Some(src_mac), Some(payload)) =
            (frame.get(0..6), frame.get(6..12), frame.get(ETH_HDR..))
        else {
            self.stats.malformed += 1;
            return;
        };
        let dst_mac = EthernetAddress::from_bytes(dst_mac);
        let src_mac = EthernetAddress::from_bytes(src_mac);
        let to_router = dst_mac == self.mac;
        if (!to_router && !dst_mac.is_multicast()) || !src_mac.is_unicast() {
            return;
        }
        self.stats.frames_in6 += 1;
        let ll = v6.ll;
        let cfg = &self.cfg;
        match classify6(payload, src_mac, to_router, cfg, |a| a == ll || cfg.own6(a)) {
            Classified6::Ignore => {}
            Classified6::Malformed => self.stats.malformed += 1,
            Classified6::Dropped(r) => self.stats.count_drop(r),
            Classified6::Control => {
                let out = {
                    let mut s = v6.svc.0.lock().unwrap_or_else(|e| e.into_inner());
                    s.handle_frame(&frame, Instant::now(), crate::dhcp::unix_now())
                };
                for f in out {
                    self.dev.tx.push_back(Bytes::from(f).into());
                }
            }
            Classified6::Smoltcp => self.dev.rx.push_back(frame.clone()),
            Classified6::TcpSyn {
                src_mac,
                src,
                dst,
                seq,
            } => {
                self.learn6(src_mac, src.ip());
                self.tcp_syn(frame.clone(), src_mac, src, dst, seq);
            }
            Classified6::Udp {
                src_mac,
                src,
                dst,
                payload,
            } => {
                self.guest_macs.insert(src.ip(), src_mac);
                self.udp_input(src_mac, src, dst, payload);
            }
            Classified6::Echo(echo) => self.icmp_input(echo, &frame),
        }
    }

    /// Remembers a guest's MAC and tells smoltcp about it if it does not know it.
    fn learn6(&mut self, mac: EthernetAddress, ip: IpAddr) {
        self.guest_macs.insert(ip, mac);
        let (IpAddr::V6(ip), Some(v6), Some(spec)) = (ip, &mut self.v6, &self.cfg.ipv6) else {
            return;
        };
        if v6.known.insert(ip, mac) != Some(mac) {
            self.dev
                .rx
                .push_back(guest_advert((mac, ip), self.mac, spec.gateway));
        }
    }

    /// An ICMPv6 unreachable (`code`) to the guest at `mac` for its IPv6 packet in
    /// `frame` (Ethernet), from the gateway; `None` without IPv6 or for a frame too
    /// short to be IPv6.
    pub(super) fn unreachable6(
        &self,
        mac: EthernetAddress,
        frame: &[u8],
        code: u8,
    ) -> Option<Bytes> {
        let gw = self.cfg.ipv6.as_ref()?.gateway;
        let ip = frame.get(ETH_HDR..)?;
        let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
        Some(super::frame6::icmp6_unreachable_quoting(
            self.mac,
            mac,
            gw,
            Ipv6Addr::from(src),
            code,
            ip,
        ))
    }

    /// The router address of `guest`'s family, that port forward sessions to it
    /// come from: the gateway, or the IPv6 gateway (`None` without IPv6).
    pub(super) fn forward_gateway(&self, guest: SocketAddr) -> Option<IpAddr> {
        match guest {
            SocketAddr::V4(_) => Some(self.cfg.gateway.into()),
            SocketAddr::V6(_) => self.cfg.ipv6.as_ref().map(|v| v.gateway.into()),
        }
    }

    /// Sends an unsolicited RA when one is due (called from the housekeeping).
    pub(super) fn router_adverts(&mut self) {
        let Some(v6) = &mut self.v6 else {
            return;
        };
        let now = Instant::now();
        if now < v6.next_ra {
            return;
        }
        v6.sent = v6.sent.saturating_add(1);
        v6.next_ra = now
            + if v6.sent < INITIAL_RAS {
                INITIAL_RA_GAP
            } else {
                RA_INTERVAL
            };
        let ra = v6
            .svc
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .router_advert();
        self.dev.tx.push_back(Bytes::from(ra).into());
    }

    /// Where a guest's IPv6 flow to `dst` goes on the host, or why nowhere (see
    /// the module doc).
    pub(super) fn map_dst6(&mut self, dst: SocketAddrV6) -> Result<SocketAddr, Denied> {
        let Some(spec) = &self.cfg.ipv6 else {
            return Err(Denied::Nowhere);
        };
        let ip = *dst.ip();
        let port = dst.port();
        if ip == spec.gateway {
            if self.cfg.host_loopback {
                return Ok(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port));
            }
            if port == 53 {
                return self.resolvers.current().ok_or(Denied::Nowhere);
            }
            return Err(Denied::Host);
        }
        if Some(ip) == spec.dns {
            return if port == 53 {
                self.resolvers.current().ok_or(Denied::Nowhere)
            } else {
                Err(Denied::Nowhere)
            };
        }
        let o = ip.octets();
        let link_local = o[0] == 0xfe && o[1] & 0xc0 == 0x80;
        if spec.contains(ip) || ip.is_multicast() || ip.is_unspecified() || link_local {
            return Err(Denied::Nowhere);
        }
        if ip.is_loopback() {
            return Err(Denied::Loopback);
        }
        if !self.cfg.host_loopback && self.is_host_addr(ip) {
            return Err(Denied::Host);
        }
        let c = &self.cfg;
        if !super::config::outbound_allows6(
            &c.outbound_allow6,
            &c.outbound_deny6,
            &c.outbound_allow,
            ip,
        ) {
            return Err(Denied::Policy);
        }
        Ok(SocketAddr::V6(dst))
    }
}

/// The ICMPv6 unreachable code for a host socket's connect error that says the
/// host has no route there (ENETUNREACH: 0, no route; EHOSTUNREACH: 3, address
/// unreachable); `None` for other errors.
pub(super) fn no_route(e: &std::io::Error) -> Option<u8> {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => Some(0),
        Some(libc::EHOSTUNREACH) => Some(3),
        _ => None,
    }
}

/// Whether `a` is inside `net/len`.
pub fn prefix6_match(a: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0);
    u128::from(a) & mask == u128::from(net) & mask
}

/// The virtio-net header of an outgoing IPv6 TCP frame in offload mode: the
/// checksum is left to the receiver (NEEDS_CSUM, the pseudo-header sum in the
/// field), and a frame larger than the network's `mtu` is a super-frame to be cut
/// at the guest's MSS (`guest_mss` of the flow's key, guest side first). Returns
/// the header, where the checksum field is and what goes in it; `None` to send the
/// frame as is.
pub(super) fn tcp6_offload_header(
    frame: &[u8],
    mtu: usize,
    guest_mss: impl Fn(&super::tcp::Key) -> u16,
) -> Option<(crate::offload::VnetHdr, usize, u16)> {
    use crate::offload::{VnetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV6};
    let ip = frame.get(ETH_HDR..)?;
    if *ip.get(6)? != super::frame6::IPPROTO_TCP {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
    let tcp = ip.get(IPV6_HDR..IPV6_HDR + plen)?;
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    if doff < 20 || tcp.len() < doff {
        return None;
    }
    let mut sum: u32 = ip
        .get(8..IPV6_HDR)?
        .chunks(2)
        .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
        .sum();
    sum += 6 + plen as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let start = ETH_HDR + IPV6_HDR;
    let mut hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_NONE,
        hdr_len: (start + doff) as u16,
        gso_size: 0,
        csum_start: start as u16,
        csum_offset: 16,
    };
    if IPV6_HDR + plen > mtu {
        let addr = |at: usize| -> Option<Ipv6Addr> {
            let b: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
            Some(Ipv6Addr::from(b))
        };
        let (src, dst) = (addr(8)?, addr(24)?);
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let key = (
            SocketAddrV6::new(dst, dport, 0, 0).into(),
            SocketAddrV6::new(src, sport, 0, 0).into(),
        );
        let mss = super::tcp_wire::guest_segment(guest_mss(&key), mtu, IPV6_HDR + doff)?;
        if tcp.len() == doff {
            return None;
        }
        hdr.gso_type = GSO_TCPV6;
        hdr.gso_size = mss;
    }
    Some((hdr, start + 16, sum as u16))
}
