//! IPv6 frames the router looks at before smoltcp does, and IPv6 frames it builds.
//!
//! # Theory of operation
//!
//! A NAT network with IPv6 (`fd00::/64` by default) has the router as its IPv6
//! router too. Every IPv6 frame from the switch is parsed once, here, with the
//! bounded parser of [`crate::ipv6::wire`], into a [`Classified6`]:
//!
//! - Control: Router and Neighbor Solicitations, DHCPv6 (to port 547) and echo
//!   requests to the router's own addresses (its link-local, the gateway, the DNS
//!   address), and IPv6 multicast in general, go to the router's
//!   [`crate::ipv6::Ipv6Service`], the same logic that serves hostonly and internal
//!   networks (it checks hop limits, checksums and options, and counts what fails).
//! - Neighbor Advertisements to the router's MAC go to smoltcp, whose neighbor cache
//!   they fill (smoltcp asks for a guest's address when its entry expired).
//! - Flows: TCP (SYNs held for the host connect, the rest to smoltcp), UDP and ICMPv6
//!   echo requests to other addresses, as for IPv4 (`frame.rs`).
//!
//! # Validation
//!
//! As for IPv4, nothing reaches smoltcp or a flow table unless: its source is an
//! address of the prefix other than the prefix's `::0` and the router's own
//! addresses (link-local sources never leave the link); its destination is not
//! unspecified, multicast (handled above), link-local, IPv4-mapped or IPv4-compatible
//! (`::ffff:0:0/96`, `::/96`: the host's stack would turn those into IPv4, the
//! loopback included) or `::1` (`Loopback`: the host's loopback is reached only
//! through the gateway address with `host_loopback`); the packet has no extension
//! headers and is no fragment (the router does not reassemble: `Malformed`); its
//! TCP, UDP or ICMPv6 checksum is right; its ports are not 0.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use bytes::Bytes;
use smoltcp::wire::{EthernetAddress, TcpSeqNumber};

use super::frame::{DropReason, GuestEcho, UDP_HDR};
use super::RouterConfig;
use crate::ipv6::wire::{self, icmp, Ipv6, ETHERTYPE_IPV6, IPPROTO_ICMPV6, IPPROTO_UDP};

/// Size of an IPv6 header.
pub const IPV6_HDR: usize = 40;
/// IPv6 next-header value of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// The DHCPv6 server port (RFC 8415).
const DHCP6_SERVER_PORT: u16 = 547;

/// What the router does with one IPv6 frame from the switch.
#[derive(Debug)]
pub enum Classified6<'a> {
    /// Not for the router, or a protocol the router ignores.
    Ignore,
    /// Malformed (or a fragment, or extension headers): counted and dropped.
    Malformed,
    /// Well-formed but refused: counted by reason and dropped.
    Dropped(DropReason),
    /// NDP, RS, DHCPv6, echo to the router's own addresses, multicast: the IPv6
    /// service answers.
    Control,
    /// A Neighbor Advertisement to the router, or TCP of a flow: to smoltcp.
    Smoltcp,
    /// A TCP SYN (no ACK) from a guest.
    TcpSyn {
        /// Guest MAC.
        src_mac: EthernetAddress,
        /// Guest address.
        src: SocketAddr,
        /// Destination the guest asked for.
        dst: SocketAddr,
        /// The guest's initial sequence number.
        seq: TcpSeqNumber,
    },
    /// A UDP datagram from a guest.
    Udp {
        /// Guest MAC.
        src_mac: EthernetAddress,
        /// Guest address.
        src: SocketAddr,
        /// Destination.
        dst: SocketAddr,
        /// The payload.
        payload: &'a [u8],
    },
    /// An ICMPv6 echo request to an address other than the router's.
    Echo(GuestEcho<'a, Ipv6Addr>),
}

/// Whether `a` is a destination no routed IPv6 packet may have (multicast is
/// handled before): unspecified, link-local, IPv4-mapped or IPv4-compatible.
fn martian_dst6(a: Ipv6Addr) -> bool {
    let o = a.octets();
    let v4ish = o[..10] == [0; 10] && (o[10..12] == [0xff, 0xff] || o[10..12] == [0, 0]);
    a.is_unspecified() || (o[0] == 0xfe && o[1] & 0xc0 == 0x80) || (v4ish && !a.is_loopback())
}

/// Classifies one IPv6 frame (`eth_payload`: after the Ethernet header) from a
/// guest; `to_router`: the frame was sent to the router's MAC (not multicast).
pub fn classify6<'a>(
    eth_payload: &'a [u8],
    src_mac: EthernetAddress,
    to_router: bool,
    cfg: &RouterConfig,
    own: impl Fn(Ipv6Addr) -> bool,
) -> Classified6<'a> {
    let Some(ip) = Ipv6::parse(eth_payload) else {
        return Classified6::Malformed;
    };
    if ip.dst.is_multicast() {
        return Classified6::Control;
    }
    if !to_router {
        return Classified6::Ignore;
    }
    let p = ip.payload;
    if own(ip.dst) {
        match (ip.proto, p.first().copied()) {
            (Some(IPPROTO_ICMPV6), Some(icmp::NA)) => return Classified6::Smoltcp,
            (Some(IPPROTO_ICMPV6), _) => return Classified6::Control,
            (Some(IPPROTO_UDP), _) if p.get(2..4) == Some(&DHCP6_SERVER_PORT.to_be_bytes()[..]) => {
                return Classified6::Control
            }
            _ => {}
        }
    }
    if ip.proto == Some(IPPROTO_ICMPV6) && p.first() == Some(&icmp::NA) {
        // smoltcp's own solicitations are answered to whichever address it used.
        return Classified6::Smoltcp;
    }
    if ip.extended || ip.proto.is_none() {
        return Classified6::Malformed;
    }
    if !cfg.valid_guest_src6(ip.src) {
        return Classified6::Dropped(DropReason::BadSource);
    }
    if ip.dst.is_loopback() {
        return Classified6::Dropped(DropReason::Loopback);
    }
    if martian_dst6(ip.dst) {
        return Classified6::Dropped(DropReason::MartianDst);
    }
    let ports = || {
        let sp = u16::from_be_bytes([*p.first()?, *p.get(1)?]);
        let dp = u16::from_be_bytes([*p.get(2)?, *p.get(3)?]);
        Some((
            SocketAddr::V6(SocketAddrV6::new(ip.src, sp, 0, 0)),
            SocketAddr::V6(SocketAddrV6::new(ip.dst, dp, 0, 0)),
        ))
    };
    match ip.proto {
        Some(IPPROTO_TCP) => {
            if p.len() < 20 || usize::from(p[12] >> 4) * 4 < 20 || !ip.checksum_ok() {
                return Classified6::Malformed;
            }
            let Some((src, dst)) = ports() else {
                return Classified6::Malformed;
            };
            if src.port() == 0 || dst.port() == 0 {
                return Classified6::Dropped(DropReason::PortZero);
            }
            // SYN without ACK, RST or FIN.
            if p[13] & 0x17 == 0x02 {
                let seq = i32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                return Classified6::TcpSyn {
                    src_mac,
                    src,
                    dst,
                    seq: TcpSeqNumber(seq),
                };
            }
            Classified6::Smoltcp
        }
        Some(IPPROTO_UDP) => {
            let ulen = p
                .get(4..6)
                .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])));
            let Some(ulen) = ulen.filter(|l| *l >= UDP_HDR && *l == p.len()) else {
                return Classified6::Malformed;
            };
            // A zero checksum is not allowed in IPv6 (RFC 8200 8.1).
            if p.get(6..8) == Some(&[0, 0][..]) || !ip.checksum_ok() {
                return Classified6::Malformed;
            }
            let Some((src, dst)) = ports() else {
                return Classified6::Malformed;
            };
            if src.port() == 0 || dst.port() == 0 {
                return Classified6::Dropped(DropReason::PortZero);
            }
            Classified6::Udp {
                src_mac,
                src,
                dst,
                payload: &p[UDP_HDR..ulen],
            }
        }
        Some(IPPROTO_ICMPV6) => {
            if p.len() < 8 || !ip.checksum_ok() {
                return Classified6::Malformed;
            }
            if p[0] == icmp::ECHO_REQUEST && p[1] == 0 {
                Classified6::Echo(GuestEcho {
                    src_mac,
                    src: ip.src,
                    dst: ip.dst,
                    ident: u16::from_be_bytes([p[4], p[5]]),
                    icmp: p,
                })
            } else {
                Classified6::Ignore
            }
        }
        _ => Classified6::Ignore,
    }
}

/// A frame from the router to a guest around the upper-layer message `body`
/// (its checksum at `csum_at` filled in here).
pub fn frame6(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    body: Vec<u8>,
    csum_at: usize,
) -> Bytes {
    Bytes::from(wire::emit_frame(
        guest_mac.0,
        router_mac.0,
        src,
        dst,
        proto,
        64,
        body,
        csum_at,
    ))
}

/// A UDP datagram from `from` to the guest at `to`.
pub fn udp6_frame(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: SocketAddrV6,
    to: SocketAddrV6,
    payload: &[u8],
) -> Bytes {
    let len = u16::try_from(UDP_HDR + payload.len()).unwrap_or(u16::MAX);
    let mut b = Vec::with_capacity(UDP_HDR + payload.len());
    b.extend_from_slice(&from.port().to_be_bytes());
    b.extend_from_slice(&to.port().to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(payload);
    frame6(
        router_mac,
        guest_mac,
        *from.ip(),
        *to.ip(),
        IPPROTO_UDP,
        b,
        6,
    )
}

/// A RST answering a guest SYN (`seq` its sequence number) from `from` to `to`.
pub fn tcp6_rst(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: SocketAddrV6,
    to: SocketAddrV6,
    seq: TcpSeqNumber,
) -> Bytes {
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&from.port().to_be_bytes());
    b[2..4].copy_from_slice(&to.port().to_be_bytes());
    b[8..12].copy_from_slice(&(seq + 1).0.to_be_bytes());
    b[12] = 5 << 4;
    b[13] = 0x14; // RST, ACK
    frame6(
        router_mac,
        guest_mac,
        *from.ip(),
        *to.ip(),
        IPPROTO_TCP,
        b,
        16,
    )
}

/// An ICMPv6 "destination unreachable" (type 1; `code` 1: administratively
/// prohibited, 0: no route) from the router's address `from` to the guest,
/// answering its UDP datagram from `guest` to `dst` with `payload_len` bytes: the
/// quoted IPv6 and UDP headers are rebuilt from those, so the guest's socket gets
/// an error at once.
pub fn icmp6_unreachable(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: Ipv6Addr,
    guest: SocketAddrV6,
    dst: SocketAddrV6,
    payload_len: usize,
    code: u8,
) -> Bytes {
    let udp_len = u16::try_from(UDP_HDR + payload_len).unwrap_or(u16::MAX);
    let mut b = vec![0x60, 0, 0, 0];
    b.extend_from_slice(&udp_len.to_be_bytes());
    b.extend_from_slice(&[IPPROTO_UDP, 64]);
    b.extend_from_slice(&guest.ip().octets());
    b.extend_from_slice(&dst.ip().octets());
    b.extend_from_slice(&guest.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b.extend_from_slice(&udp_len.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    icmp6_unreachable_quoting(router_mac, guest_mac, from, *guest.ip(), code, &b)
}

/// Most bytes of the offending packet an ICMPv6 error quotes: the error must fit
/// the IPv6 minimum MTU, 1280 (RFC 4443 2.4 (c)).
const MAX_QUOTE: usize = 1280 - IPV6_HDR - 8;

/// An ICMPv6 "destination unreachable" (`code` as for [`icmp6_unreachable`]) from
/// `from` to the guest at `guest`, quoting `packet` (the guest's IPv6 packet, its
/// header first; cut to fit 1280 bytes): the guest's stack matches the quote to
/// its socket (for TCP, the ports and the SYN's sequence number) and fails it at
/// once.
pub fn icmp6_unreachable_quoting(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: Ipv6Addr,
    guest: Ipv6Addr,
    code: u8,
    packet: &[u8],
) -> Bytes {
    let mut b = vec![1, code, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(packet.get(..MAX_QUOTE).unwrap_or(packet));
    frame6(router_mac, guest_mac, from, guest, IPPROTO_ICMPV6, b, 2)
}

/// An ICMPv6 echo reply (`msg`, as a host socket returns it) from `from` to the
/// guest, with the echo identifier set to `ident` and the checksum recomputed.
/// `None` unless `msg` is an echo reply.
pub fn echo6_reply(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: Ipv6Addr,
    to: Ipv6Addr,
    msg: &[u8],
    ident: u16,
) -> Option<Bytes> {
    if msg.len() < 8 || msg.first() != Some(&icmp::ECHO_REPLY) {
        return None;
    }
    let mut b = msg.to_vec();
    b[4..6].copy_from_slice(&ident.to_be_bytes());
    Some(frame6(
        router_mac,
        guest_mac,
        from,
        to,
        IPPROTO_ICMPV6,
        b,
        2,
    ))
}

/// A Neighbor Advertisement (override) from the guest `src` for itself, to the
/// router's address `to`: fed to the router's own smoltcp interface when a guest
/// opens a TCP flow from an address smoltcp may not know, so that its SYN-ACK
/// needs no Neighbor Solicitation first (smoltcp would drop it while asking).
pub fn guest_advert(
    src: (EthernetAddress, Ipv6Addr),
    router_mac: EthernetAddress,
    to: Ipv6Addr,
) -> Bytes {
    let mut b = vec![icmp::NA, 0, 0, 0, 0x20, 0, 0, 0];
    b.extend_from_slice(&src.1.octets());
    b.extend_from_slice(&[wire::opt::TLLA, 1]);
    b.extend_from_slice(&src.0 .0);
    Bytes::from(wire::emit_frame(
        router_mac.0,
        src.0 .0,
        src.1,
        to,
        IPPROTO_ICMPV6,
        255,
        b,
        2,
    ))
}

/// A RST answering a guest SYN, IPv4 or IPv6 (`None` when the families differ).
pub fn tcp_rst_any(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: SocketAddr,
    to: SocketAddr,
    seq: TcpSeqNumber,
) -> Option<Bytes> {
    by_family(
        from,
        to,
        |f, t| super::frame::tcp_rst(router_mac, guest_mac, f, t, seq),
        |f, t| tcp6_rst(router_mac, guest_mac, f, t, seq),
    )
}

/// A UDP datagram to a guest, IPv4 or IPv6 (`None` when the families differ).
pub fn udp_frame_any(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
) -> Option<Bytes> {
    by_family(
        from,
        to,
        |f, t| super::frame::udp_frame(router_mac, guest_mac, f, t, payload),
        |f, t| udp6_frame(router_mac, guest_mac, f, t, payload),
    )
}

/// The frame from `from` to `to` built by the IPv4 builder `v4` or the IPv6 one
/// `v6`, as their family is; `None` when the two differ.
fn by_family(
    from: SocketAddr,
    to: SocketAddr,
    v4: impl FnOnce((Ipv4Addr, u16), (Ipv4Addr, u16)) -> Bytes,
    v6: impl FnOnce(SocketAddrV6, SocketAddrV6) -> Bytes,
) -> Option<Bytes> {
    match (from, to) {
        (SocketAddr::V4(f), SocketAddr::V4(t)) => {
            Some(v4((*f.ip(), f.port()), (*t.ip(), t.port())))
        }
        (SocketAddr::V6(f), SocketAddr::V6(t)) => Some(v6(f, t)),
        _ => None,
    }
}

/// Whether `frame` (Ethernet) is IPv6.
pub fn is_ipv6(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE_IPV6.to_be_bytes()[..])
}

#[cfg(test)]
mod tests;
