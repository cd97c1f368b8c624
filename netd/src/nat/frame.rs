//! Frames the router looks at before smoltcp does, and frames it builds itself.
//!
//! # Theory of operation
//!
//! Every frame from the switch is parsed once, here, into a [`Classified`] value made of
//! checked smoltcp `Repr`s; nothing past this module touches raw guest bytes. The router
//! handles some traffic itself rather than through the smoltcp interface:
//!
//! - ARP: smoltcp in any-IP mode answers ARP for *every* address, which would steal the
//!   addresses of other guests on a NAT network. Only ARP requests for the router's own
//!   addresses (gateway, DNS) and ARP replies to the router reach smoltcp.
//! - TCP SYNs to a destination without a flow: held back while the host connect runs
//!   (see `tcp.rs`), so a refused connect becomes a RST rather than an accepted-then-reset
//!   connection.
//! - UDP and ICMP echo: flows of host sockets (`udp.rs`, `icmp.rs`); smoltcp has no socket
//!   for them.
//!
//! Everything else addressed to the router's MAC (TCP segments of existing flows, ICMP
//! to the router's own addresses) goes to smoltcp. Frames not addressed to the router
//! (guest-to-guest unicast flooded by the switch) are ignored.
//!
//! # Validation
//!
//! The guest is hostile, and smoltcp asserts on some inputs (a SYN from 0.0.0.0 hits
//! `assert!(!dst.is_unspecified())` when it answers, in release builds too), so no
//! IPv4 packet reaches smoltcp or the flow tables unless:
//!
//! - its source is a unicast address of the subnet: not 0.0.0.0, not the subnet's
//!   network or broadcast address, not one of the router's own addresses;
//! - its destination is not a martian: not 0.0.0.0, broadcast (all-ones or the
//!   subnet's), multicast or 240.0.0.0/4; a destination in 127.0.0.0/8 is refused
//!   too (a guest never talks to the host's loopback directly: only through the
//!   gateway address, with `host_loopback`);
//! - its TCP or UDP ports are not 0 (a SYN from port 0 used to leave a socket
//!   listening that adopted the next guest's connection).
//!
//! Each refusal is a [`Classified::Dropped`] with its [`DropReason`], counted by the
//! router.

use std::net::Ipv4Addr;

use bytes::Bytes;
use smoltcp::phy::ChecksumCapabilities;

use super::RouterConfig;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// Size of an Ethernet header (no VLAN tag: the switch hands untagged frames).
pub const ETH_HDR: usize = 14;
/// Size of an IPv4 header without options (all frames the router builds).
pub const IPV4_HDR: usize = 20;
/// Size of a UDP header.
pub const UDP_HDR: usize = 8;

/// Why a well-formed guest packet was refused (see "Validation" above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The source is not a unicast address of the subnet (or is the router's).
    BadSource,
    /// The destination is unspecified, broadcast, multicast or reserved.
    MartianDst,
    /// The destination is in 127.0.0.0/8.
    Loopback,
    /// A TCP or UDP port is 0.
    PortZero,
}

/// What the router does with one frame from the switch.
#[derive(Debug)]
pub enum Classified<'a> {
    /// Not addressed to the router, or a protocol the router ignores.
    Ignore,
    /// Malformed: counted and dropped.
    Malformed,
    /// Well-formed but refused: counted by reason and dropped.
    Dropped(DropReason),
    /// An ARP request for one of the router's addresses: answer it.
    ArpRequest {
        /// Requester MAC.
        src_mac: EthernetAddress,
        /// Requester IP.
        src_ip: Ipv4Addr,
        /// The address asked for.
        target_ip: Ipv4Addr,
    },
    /// Hand the frame to smoltcp (ARP reply, TCP, ICMP to the router itself).
    Smoltcp,
    /// A TCP SYN (no ACK) from a guest.
    TcpSyn {
        /// Guest MAC.
        src_mac: EthernetAddress,
        /// Guest address.
        src: (Ipv4Addr, u16),
        /// Destination the guest asked for.
        dst: (Ipv4Addr, u16),
        /// The guest's initial sequence number.
        seq: TcpSeqNumber,
    },
    /// A UDP datagram from a guest.
    Udp {
        /// Guest MAC.
        src_mac: EthernetAddress,
        /// Guest address.
        src: (Ipv4Addr, u16),
        /// Destination.
        dst: (Ipv4Addr, u16),
        /// The payload.
        payload: &'a [u8],
    },
    /// An ICMP echo request to an address other than the router's.
    IcmpEcho(GuestEcho<'a, Ipv4Addr>),
}

/// An echo request from a guest to an address other than the router's, ICMP
/// (`A` is [`Ipv4Addr`]) or ICMPv6 ([`Ipv6Addr`](std::net::Ipv6Addr)): what
/// `icmp_input` needs of it.
#[derive(Debug)]
pub struct GuestEcho<'a, A> {
    /// Guest MAC.
    pub src_mac: EthernetAddress,
    /// Guest address.
    pub src: A,
    /// Destination.
    pub dst: A,
    /// Echo identifier.
    pub ident: u16,
    /// The whole ICMP or ICMPv6 message (header and data).
    pub icmp: &'a [u8],
}

/// Classifies one frame from a guest of the network `cfg` describes.
pub fn classify<'a>(
    frame: &'a [u8],
    router_mac: EthernetAddress,
    cfg: &RouterConfig,
) -> Classified<'a> {
    classify_with(frame, router_mac, cfg, false)
}

/// Like [`classify`]; with `tcp_csum_partial`, a TCP checksum is not verified (an
/// offloaded frame from a local kernel: the field holds only the pseudo-header sum).
pub fn classify_with<'a>(
    frame: &'a [u8],
    router_mac: EthernetAddress,
    cfg: &RouterConfig,
    tcp_csum_partial: bool,
) -> Classified<'a> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Classified::Malformed;
    };
    let dst_mac = eth.dst_addr();
    let src_mac = eth.src_addr();
    if dst_mac != router_mac && !dst_mac.is_broadcast() {
        return Classified::Ignore;
    }
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let Ok(pkt) = ArpPacket::new_checked(eth.payload()) else {
                return Classified::Malformed;
            };
            let Ok(repr) = ArpRepr::parse(&pkt) else {
                return Classified::Malformed;
            };
            match repr {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                } if cfg.own4(target_protocol_addr)
                    && cfg.valid_guest_src(source_protocol_addr) =>
                {
                    Classified::ArpRequest {
                        src_mac: source_hardware_addr,
                        src_ip: source_protocol_addr,
                        target_ip: target_protocol_addr,
                    }
                }
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    ..
                } if dst_mac == router_mac => Classified::Smoltcp,
                _ => Classified::Ignore,
            }
        }
        EthernetProtocol::Ipv4 if dst_mac == router_mac => {
            classify_ipv4(eth.payload(), src_mac, cfg, tcp_csum_partial)
        }
        _ => Classified::Ignore,
    }
}

/// Whether `a` is a destination no packet may have: unspecified, broadcast (the
/// all-ones address or the subnet's own), multicast or reserved (240.0.0.0/4).
fn martian_dst(cfg: &RouterConfig, a: Ipv4Addr) -> bool {
    let subnet_bcast = cfg.in_subnet(a) && {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(cfg.subnet.1))
            .unwrap_or(0);
        u32::from(a) & !mask == !mask
    };
    a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.octets()[0] >= 240
        || subnet_bcast
}

fn classify_ipv4<'a>(
    packet: &'a [u8],
    src_mac: EthernetAddress,
    cfg: &RouterConfig,
    tcp_csum_partial: bool,
) -> Classified<'a> {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Classified::Malformed;
    };
    let Ok(repr) = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()) else {
        // Bad checksum, bad version, or a fragment (smoltcp refuses those without
        // reassembly): the router does not reassemble.
        return Classified::Malformed;
    };
    let payload = ip.payload();
    let (src_ip, dst_ip) = (repr.src_addr, repr.dst_addr);
    let caps = ChecksumCapabilities::default();
    if !cfg.valid_guest_src(src_ip) {
        return Classified::Dropped(DropReason::BadSource);
    }
    if martian_dst(cfg, dst_ip) {
        return Classified::Dropped(DropReason::MartianDst);
    }
    if dst_ip.is_loopback() {
        return Classified::Dropped(DropReason::Loopback);
    }
    match repr.next_header {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(payload) else {
                return Classified::Malformed;
            };
            if !tcp_csum_partial
                && !tcp.verify_checksum(&IpAddress::Ipv4(src_ip), &IpAddress::Ipv4(dst_ip))
            {
                return Classified::Malformed;
            }
            if tcp.src_port() == 0 || tcp.dst_port() == 0 {
                return Classified::Dropped(DropReason::PortZero);
            }
            // SYNs to the gateway / DNS addresses are flows too (to the host's loopback
            // and to the resolver), so `own` does not matter here.
            if tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin() {
                return Classified::TcpSyn {
                    src_mac,
                    src: (src_ip, tcp.src_port()),
                    dst: (dst_ip, tcp.dst_port()),
                    seq: tcp.seq_number(),
                };
            }
            Classified::Smoltcp
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(payload) else {
                return Classified::Malformed;
            };
            let Ok(urepr) = UdpRepr::parse(
                &udp,
                &IpAddress::Ipv4(src_ip),
                &IpAddress::Ipv4(dst_ip),
                &caps,
            ) else {
                return Classified::Malformed;
            };
            if urepr.src_port == 0 || urepr.dst_port == 0 {
                return Classified::Dropped(DropReason::PortZero);
            }
            Classified::Udp {
                src_mac,
                src: (src_ip, urepr.src_port),
                dst: (dst_ip, urepr.dst_port),
                payload: udp.payload(),
            }
        }
        IpProtocol::Icmp => {
            let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
                return Classified::Malformed;
            };
            if !icmp.verify_checksum() {
                return Classified::Malformed;
            }
            if cfg.own4(dst_ip) {
                // smoltcp answers echo requests to the router's own addresses.
                return Classified::Smoltcp;
            }
            if icmp.msg_type() == smoltcp::wire::Icmpv4Message::EchoRequest && icmp.msg_code() == 0
            {
                Classified::IcmpEcho(GuestEcho {
                    src_mac,
                    src: src_ip,
                    dst: dst_ip,
                    ident: icmp.echo_ident(),
                    icmp: payload,
                })
            } else {
                Classified::Ignore
            }
        }
        _ => Classified::Ignore,
    }
}

fn emit_eth(buf: &mut [u8], src: EthernetAddress, dst: EthernetAddress, proto: EthernetProtocol) {
    let mut eth = EthernetFrame::new_unchecked(buf);
    EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: proto,
    }
    .emit(&mut eth);
}

/// A frame of `l4_len` bytes of IPv4 payload from the router to a guest, with its
/// Ethernet and IPv4 headers written and the payload left for the caller (at
/// `ETH_HDR + IPV4_HDR`).
fn ipv4_frame(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    l4_len: usize,
) -> Vec<u8> {
    let mut buf = vec![0u8; ETH_HDR + IPV4_HDR + l4_len];
    emit_eth(&mut buf, router_mac, guest_mac, EthernetProtocol::Ipv4);
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4_len,
        hop_limit: 64,
    };
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH_HDR..]);
    repr.emit(&mut ip, &ChecksumCapabilities::default());
    buf
}

/// A RST answering a guest SYN (`seq` its sequence number) from `from` to `to`.
pub fn tcp_rst(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    seq: TcpSeqNumber,
) -> Bytes {
    let repr = TcpRepr {
        src_port: from.1,
        dst_port: to.1,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(seq + 1),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let len = repr.buffer_len();
    let mut buf = ipv4_frame(router_mac, guest_mac, from.0, to.0, IpProtocol::Tcp, len);
    let mut tcp = TcpPacket::new_unchecked(&mut buf[ETH_HDR + IPV4_HDR..]);
    repr.emit(
        &mut tcp,
        &IpAddress::Ipv4(from.0),
        &IpAddress::Ipv4(to.0),
        &ChecksumCapabilities::default(),
    );
    Bytes::from(buf)
}

/// An ICMP "destination unreachable, communication administratively prohibited"
/// (type 3, code 13) from the router's address `from` to the guest, answering the
/// guest's UDP datagram from `guest` to `dst` with `payload_len` bytes: the quoted
/// IPv4 and UDP headers are rebuilt from those (what the guest's kernel matches to
/// its socket; a quoted checksum is not checked), so the guest's connected socket
/// gets an error at once instead of waiting for an answer that never comes.
pub fn icmp_unreachable(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: Ipv4Addr,
    guest: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload_len: usize,
) -> Bytes {
    let udp_len = UDP_HDR + payload_len;
    let mut quoted = [0u8; IPV4_HDR + UDP_HDR];
    Ipv4Repr {
        src_addr: guest.0,
        dst_addr: dst.0,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    }
    .emit(
        &mut Ipv4Packet::new_unchecked(&mut quoted[..]),
        &ChecksumCapabilities::default(),
    );
    quoted[IPV4_HDR..IPV4_HDR + 2].copy_from_slice(&guest.1.to_be_bytes());
    quoted[IPV4_HDR + 2..IPV4_HDR + 4].copy_from_slice(&dst.1.to_be_bytes());
    // A datagram longer than 64 KiB cannot have come in; saturate anyway.
    let len16 = u16::try_from(udp_len).unwrap_or(u16::MAX);
    quoted[IPV4_HDR + 4..IPV4_HDR + 6].copy_from_slice(&len16.to_be_bytes());
    let icmp_len = 8 + quoted.len();
    let mut buf = ipv4_frame(
        router_mac,
        guest_mac,
        from,
        guest.0,
        IpProtocol::Icmp,
        icmp_len,
    );
    let body = &mut buf[ETH_HDR + IPV4_HDR..];
    body[0] = 3; // destination unreachable
    body[1] = 13; // communication administratively prohibited
    body[8..].copy_from_slice(&quoted);
    Icmpv4Packet::new_unchecked(body).fill_checksum();
    Bytes::from(buf)
}

/// A broadcast ARP request from `src` (MAC, address) for `target`: fed to the
/// router's own smoltcp interface after a restart, so that it knows the guests it
/// knew before (the guests' caches still hold the router's MAC, so they would not
/// ask, and smoltcp drops a reply it has no neighbor for).
pub fn arp_request(src: (EthernetAddress, Ipv4Addr), target: Ipv4Addr) -> Bytes {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: src.0,
        source_protocol_addr: src.1,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0u8; ETH_HDR + repr.buffer_len()];
    emit_eth(
        &mut buf,
        src.0,
        EthernetAddress::BROADCAST,
        EthernetProtocol::Arp,
    );
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETH_HDR..]));
    Bytes::from(buf)
}

/// A UDP datagram from `from` to the guest at `to`.
pub fn udp_frame(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    payload: &[u8],
) -> Bytes {
    let repr = UdpRepr {
        src_port: from.1,
        dst_port: to.1,
    };
    let udp_len = UDP_HDR + payload.len();
    let mut buf = ipv4_frame(
        router_mac,
        guest_mac,
        from.0,
        to.0,
        IpProtocol::Udp,
        udp_len,
    );
    let mut udp = UdpPacket::new_unchecked(&mut buf[ETH_HDR + IPV4_HDR..]);
    repr.emit(
        &mut udp,
        &IpAddress::Ipv4(from.0),
        &IpAddress::Ipv4(to.0),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    Bytes::from(buf)
}

/// An ICMP message (`icmp`: header and data, as a host ICMP socket returns it) from
/// `from` to the guest, with the echo identifier set to `ident` and the checksum
/// recomputed. `None` if `icmp` is not a well-formed ICMP message.
pub fn icmp_frame(
    router_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    from: Ipv4Addr,
    to: Ipv4Addr,
    icmp: &[u8],
    ident: u16,
) -> Option<Bytes> {
    Icmpv4Packet::new_checked(icmp).ok()?;
    let mut buf = ipv4_frame(
        router_mac,
        guest_mac,
        from,
        to,
        IpProtocol::Icmp,
        icmp.len(),
    );
    let body = buf.get_mut(ETH_HDR + IPV4_HDR..)?;
    body.copy_from_slice(icmp);
    let mut pkt = Icmpv4Packet::new_checked(body).ok()?;
    pkt.set_echo_ident(ident);
    pkt.fill_checksum();
    Some(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);
    const GUEST: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn cfg() -> RouterConfig {
        RouterConfig::defaults()
    }

    /// A guest SYN from `src` to `dst`, valid in every other respect.
    fn syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: src.1,
            dst_port: dst.1,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(7),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let mut buf = ipv4_frame(
            GUEST,
            ROUTER,
            src.0,
            dst.0,
            IpProtocol::Tcp,
            repr.buffer_len(),
        );
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut buf[ETH_HDR + IPV4_HDR..]),
            &IpAddress::Ipv4(src.0),
            &IpAddress::Ipv4(dst.0),
            &ChecksumCapabilities::default(),
        );
        buf
    }

    /// Regression (issue 11, finding 1 and 11): sources and destinations smoltcp
    /// must never see are dropped with their reason; an honest SYN still passes.
    #[test]
    fn hostile_sources_destinations_and_ports_are_dropped_by_reason() {
        let g = Ipv4Addr::new(10, 0, 2, 15);
        let far = Ipv4Addr::new(198, 51, 100, 7);
        let c = cfg();
        let reason = |f: &[u8]| match classify(f, ROUTER, &c) {
            Classified::Dropped(r) => Some(r),
            _ => None,
        };
        use DropReason::*;
        for (src, dst, want) in [
            // The SYN that killed the router: from 0.0.0.0 to the DNS address.
            (
                (Ipv4Addr::UNSPECIFIED, 1234),
                (Ipv4Addr::new(10, 0, 2, 3), 53),
                BadSource,
            ),
            ((Ipv4Addr::UNSPECIFIED, 1234), (far, 80), BadSource),
            // Outside the subnet, the subnet's own network/broadcast, the router's.
            ((Ipv4Addr::new(192, 0, 2, 1), 1234), (far, 80), BadSource),
            ((Ipv4Addr::new(10, 0, 2, 0), 1234), (far, 80), BadSource),
            ((Ipv4Addr::new(10, 0, 2, 255), 1234), (far, 80), BadSource),
            ((Ipv4Addr::new(10, 0, 2, 2), 1234), (far, 80), BadSource),
            ((Ipv4Addr::new(10, 0, 2, 3), 1234), (far, 80), BadSource),
            ((Ipv4Addr::BROADCAST, 1234), (far, 80), BadSource),
            // Martian destinations.
            ((g, 1234), (Ipv4Addr::UNSPECIFIED, 80), MartianDst),
            ((g, 1234), (Ipv4Addr::BROADCAST, 80), MartianDst),
            ((g, 1234), (Ipv4Addr::new(10, 0, 2, 255), 80), MartianDst),
            ((g, 1234), (Ipv4Addr::new(224, 0, 0, 1), 80), MartianDst),
            ((g, 1234), (Ipv4Addr::new(240, 0, 0, 1), 80), MartianDst),
            // The host's loopback, directly.
            ((g, 1234), (Ipv4Addr::LOCALHOST, 10809), Loopback),
            ((g, 1234), (Ipv4Addr::new(127, 1, 2, 3), 22), Loopback),
            // Port 0 either side.
            ((g, 0), (far, 80), PortZero),
            ((g, 1234), (far, 0), PortZero),
        ] {
            assert_eq!(reason(&syn(src, dst)), Some(want), "{src:?} -> {dst:?}");
        }
        // UDP from port 0 too.
        let f = udp_frame(GUEST, ROUTER, (g, 0), (far, 53), b"q");
        assert_eq!(reason(&f), Some(PortZero));
        let f = udp_frame(GUEST, ROUTER, (Ipv4Addr::UNSPECIFIED, 68), (far, 53), b"q");
        assert_eq!(reason(&f), Some(BadSource));
        // The unreachable answer is a valid ICMP message quoting the datagram.
        let u = icmp_unreachable(
            ROUTER,
            GUEST,
            Ipv4Addr::new(10, 0, 2, 2),
            (g, 5000),
            (far, 53),
            3,
        );
        let ip = Ipv4Packet::new_checked(&u[ETH_HDR..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(
            (icmp.msg_type(), icmp.msg_code()),
            (smoltcp::wire::Icmpv4Message::DstUnreachable, 13)
        );
        let quoted = Ipv4Packet::new_unchecked(icmp.data());
        assert_eq!((quoted.src_addr(), quoted.dst_addr()), (g, far));
        // The honest SYN.
        assert!(matches!(
            classify(&syn((g, 1234), (far, 80)), ROUTER, &c),
            Classified::TcpSyn { .. }
        ));
    }

    fn guest_udp(payload: &[u8]) -> Bytes {
        // Built as the router would build one, then addresses swapped by building
        // "from" the guest.
        udp_frame(
            GUEST,
            ROUTER,
            (Ipv4Addr::new(10, 0, 2, 15), 5000),
            (Ipv4Addr::new(198, 18, 0, 2), 53),
            payload,
        )
    }

    #[test]
    fn udp_round_trip() {
        let f = guest_udp(b"hello");
        match classify(&f, ROUTER, &cfg()) {
            Classified::Udp {
                src_mac,
                src,
                dst,
                payload,
            } => {
                assert_eq!(src_mac, GUEST);
                assert_eq!(src, (Ipv4Addr::new(10, 0, 2, 15), 5000));
                assert_eq!(dst, (Ipv4Addr::new(198, 18, 0, 2), 53));
                assert_eq!(payload, b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn corrupted_checksum_is_malformed() {
        let mut f = guest_udp(b"hello").to_vec();
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(matches!(
            classify(&f, ROUTER, &cfg()),
            Classified::Malformed
        ));
    }

    #[test]
    fn frames_for_other_macs_are_ignored() {
        let f = udp_frame(
            GUEST,
            EthernetAddress([0x52, 0x54, 0, 0, 0, 9]),
            (Ipv4Addr::new(10, 0, 2, 15), 1),
            (Ipv4Addr::new(10, 0, 2, 16), 2),
            b"x",
        );
        assert!(matches!(classify(&f, ROUTER, &cfg()), Classified::Ignore));
    }

    #[test]
    fn arp_only_for_own_addresses() {
        let ask = |target: Ipv4Addr| {
            let repr = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: GUEST,
                source_protocol_addr: Ipv4Addr::new(10, 0, 2, 15),
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: target,
            };
            let mut buf = vec![0xa5u8; ETH_HDR + repr.buffer_len()];
            emit_eth(
                &mut buf,
                GUEST,
                EthernetAddress::BROADCAST,
                EthernetProtocol::Arp,
            );
            repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETH_HDR..]));
            buf
        };
        assert!(matches!(
            classify(&ask(Ipv4Addr::new(10, 0, 2, 2)), ROUTER, &cfg()),
            Classified::ArpRequest { .. }
        ));
        assert!(matches!(
            classify(&ask(Ipv4Addr::new(10, 0, 2, 16)), ROUTER, &cfg()),
            Classified::Ignore
        ));
    }

    #[test]
    fn rst_answers_syn_plus_one() {
        let f = tcp_rst(
            ROUTER,
            GUEST,
            (Ipv4Addr::new(198, 18, 0, 2), 80),
            (Ipv4Addr::new(10, 0, 2, 15), 40000),
            TcpSeqNumber(1000),
        );
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.rst());
        assert_eq!(tcp.ack_number(), TcpSeqNumber(1001));
        assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    }

    #[test]
    fn truncated_frames_never_panic() {
        let f = guest_udp(b"some payload");
        for n in 0..f.len() {
            let _ = classify(&f[..n], ROUTER, &cfg());
        }
    }
}
