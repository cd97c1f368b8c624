//! The TCP wire details of the NAT router: offload (see `tcp.rs`, "Offload": the
//! raised MSS of guest SYNs, the virtio-net header of the frames smoltcp builds,
//! IPv6 ones through [`super::v6::tcp6_offload_header`]), and the few header fields
//! the router reads itself to give a segment to its flow's socket (see `ring.rs`),
//! for IPv4 and IPv6 alike.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use bytes::Bytes;
use smoltcp::wire::TcpSeqNumber;

use super::frame::ETH_HDR;
use super::frame6::IPV6_HDR;
use super::tcp::Key;
use super::Router;
use crate::ipv6::wire::{icmp, Ipv6, ETHERTYPE_IPV6, IPPROTO_ICMPV6};

/// What the router reads of a guest's TCP segment before smoltcp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    /// (guest address and port, destination address and port): its flow's key.
    pub key: Key,
    /// One past its last sequence number (SYN and FIN count one each).
    pub end: TcpSeqNumber,
}

/// The source and destination addresses and the TCP header plus payload of an
/// untagged Ethernet frame (IPv4, or IPv6 without extension headers: the only
/// IPv6 TCP frames the router hands smoltcp, see `frame6.rs`).
fn ip_tcp(frame: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    let (src, dst, tcp) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ip = frame.get(ETH_HDR..)?;
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != 6 || ihl < 20 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let tcp = ip.get(ihl..total)?;
            let addr = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            (addr(&ip[12..16]), addr(&ip[16..20]), tcp)
        }
        t if t == ETHERTYPE_IPV6.to_be_bytes() => {
            let ip = Ipv6::parse(frame.get(ETH_HDR..)?)?;
            if ip.extended || ip.proto != Some(super::frame6::IPPROTO_TCP) {
                return None;
            }
            (IpAddr::V6(ip.src), IpAddr::V6(ip.dst), ip.payload)
        }
        _ => return None,
    };
    if tcp.len() < 20 {
        return None;
    }
    Some((src, dst, tcp))
}

/// A flow key's half: IPv6 ones as `frame6.rs` builds them (no flow label, no scope).
fn sock_addr(ip: IpAddr, port: u16) -> SocketAddr {
    match ip {
        IpAddr::V4(a) => SocketAddr::V4(SocketAddrV4::new(a, port)),
        IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, port, 0, 0)),
    }
}

/// The flow key and sequence span of a TCP segment from a guest; `None` for other
/// frames (or a segment too short to be one).
pub(super) fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let (src_ip, dst_ip, tcp) = ip_tcp(frame)?;
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let src = sock_addr(src_ip, port(&tcp[0..2]));
    let dst = sock_addr(dst_ip, port(&tcp[2..4]));
    let seq = i32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let doff = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    let payload = tcp.len().checked_sub(doff)?;
    let ctl = usize::from(flags & 0x02 != 0) + usize::from(flags & 0x01 != 0);
    Some(Segment {
        key: (src, dst),
        end: TcpSeqNumber(seq) + (payload + ctl),
    })
}

/// The acknowledgment number of a TCP frame with ACK set.
pub(super) fn tcp_ack(frame: &[u8]) -> Option<TcpSeqNumber> {
    let (_, _, tcp) = ip_tcp(frame)?;
    (tcp[13] & 0x10 != 0)
        .then(|| TcpSeqNumber(i32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]])))
}

/// The address whose MAC a frame tells smoltcp: the sender of an ARP frame, the
/// target of an IPv6 Neighbor Advertisement.
pub(super) fn neighbor_sender(frame: &[u8]) -> Option<IpAddr> {
    match frame.get(12..14)? {
        [0x08, 0x06] => {
            let b = frame.get(ETH_HDR + 14..ETH_HDR + 18)?;
            Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        }
        t if t == ETHERTYPE_IPV6.to_be_bytes() => {
            let ip = Ipv6::parse(frame.get(ETH_HDR..)?)?;
            if ip.proto != Some(IPPROTO_ICMPV6) || ip.payload.first() != Some(&icmp::NA) {
                return None;
            }
            let t: [u8; 16] = ip.payload.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(t)))
        }
        _ => None,
    }
}

/// Guest MSS from which a flow's ACKs are delayed (jumbo MTUs only).
pub(super) const DELAYED_ACK_MIN_MSS: u16 = 16 * 1024;

/// MSS written into guest SYNs in offload mode: the largest segment that fits a
/// 64 KiB IPv4 packet with TCP options (smoltcp cuts IPv6 segments to the
/// device's 64 KiB IP MTU itself).
const OFFLOAD_MSS: u16 = 65535 - 20 - 60;

/// Copies a SYN frame (IPv4 or IPv6) with its MSS option raised to
/// [`OFFLOAD_MSS`] and the TCP checksum recomputed; returns it with the guest's
/// MSS. `None` when the SYN has no MSS option (the flow then goes without
/// super-frames), carries IPv6 extension headers, or is malformed.
pub(super) fn raise_syn_mss(frame: &[u8]) -> Option<(Bytes, u16)> {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};
    use smoltcp::wire::{IpAddress, TcpPacket};
    let mut buf = frame.to_vec();
    let mut eth = EthernetFrame::new_checked(&mut buf[..]).ok()?;
    let (src, dst, mut tcp): (IpAddress, IpAddress, _) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload_mut()).ok()?;
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let hl = usize::from(ip.header_len());
            let total = usize::from(ip.total_len());
            let bytes = ip.into_inner();
            let tcp = TcpPacket::new_checked(bytes.get_mut(hl..total)?).ok()?;
            (src.into(), dst.into(), tcp)
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload_mut()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let len = usize::from(ip.payload_len());
            let bytes = ip.into_inner();
            let tcp = TcpPacket::new_checked(bytes.get_mut(IPV6_HDR..IPV6_HDR + len)?).ok()?;
            (src.into(), dst.into(), tcp)
        }
        _ => return None,
    };
    let opts = tcp.options_mut();
    let mut i = 0;
    let mut mss = None;
    while i < opts.len() {
        match opts.get(i).copied()? {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let v = opts.get_mut(i + 2..i + 4)?;
                    mss = Some(u16::from_be_bytes([v[0], v[1]]));
                    v.copy_from_slice(&OFFLOAD_MSS.to_be_bytes());
                }
                i += len;
            }
        }
    }
    let mss = mss.filter(|m| *m >= 64)?;
    tcp.fill_checksum(&src, &dst);
    Some((Bytes::from(buf), mss))
}

/// The segment size of a super-frame to a guest: its MSS (0: unknown), within
/// what fits the network's MTU after `headers` (IP and TCP) bytes.
pub(super) fn guest_segment(guest_mss: u16, mtu: usize, headers: usize) -> Option<u16> {
    let fit = u16::try_from(mtu.checked_sub(headers)?).unwrap_or(u16::MAX);
    let mss = if guest_mss == 0 {
        fit
    } else {
        guest_mss.min(fit)
    };
    (mss > 0).then_some(mss)
}

impl Router {
    /// The virtio-net header of an outgoing TCP frame in offload mode (and the frame
    /// with the pseudo-header sum in its checksum field), or `None` to send it as is.
    /// Returns the header, where the checksum field is and what goes in it.
    pub(super) fn tcp_offload_header(
        &self,
        frame: &[u8],
    ) -> Option<(crate::offload::VnetHdr, usize, u16)> {
        use crate::offload::{VnetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4};
        if self.offload && super::frame6::is_ipv6(frame) {
            return super::v6::tcp6_offload_header(frame, self.cfg.mtu, |key| {
                self.tcp.guest_mss(key)
            });
        }
        if !self.offload || frame.get(12..14)? != [0x08, 0x00] {
            return None;
        }
        let ip = frame.get(super::frame::ETH_HDR..)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        if *ip.get(9)? != 6 || ihl < 20 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        let tcp = ip.get(ihl..total)?;
        let doff = usize::from(tcp.get(12)? >> 4) * 4;
        if doff < 20 || tcp.len() < doff {
            return None;
        }
        // Pseudo-header sum, folded, not complemented: what a NIC expects with
        // NEEDS_CSUM (the receiver folds in the TCP header and payload).
        let mut sum: u32 = 0;
        for pair in ip.get(12..20)?.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1)?]));
        }
        sum += 6 + tcp.len() as u32;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let csum_at = super::frame::ETH_HDR + ihl + 16;
        frame.get(csum_at..csum_at + 2)?;
        let payload = tcp.len() - doff;
        let mut hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            hdr_len: (super::frame::ETH_HDR + ihl + doff) as u16,
            gso_size: 0,
            csum_start: (super::frame::ETH_HDR + ihl) as u16,
            csum_offset: 16,
        };
        if ihl + tcp.len() > self.cfg.mtu {
            // A super-frame: cut at the guest's MSS, within the network's MTU.
            let dst_ip = std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let src_ip = std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            let key = (
                SocketAddrV4::new(dst_ip, dport).into(),
                SocketAddrV4::new(src_ip, sport).into(),
            );
            let mss = guest_segment(self.tcp.guest_mss(&key), self.cfg.mtu, ihl + doff)?;
            if payload == 0 {
                return None;
            }
            hdr.gso_type = GSO_TCPV4;
            hdr.gso_size = mss;
        }
        Some((hdr, csum_at, sum as u16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };
    use std::net::Ipv4Addr;

    fn syn(mss: Option<u16>) -> Vec<u8> {
        let (src, dst) = (Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2));
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: mss,
            sack_permitted: true,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        crate::nat::tests::tcp_frame(
            EthernetAddress([2, 0, 0, 0, 0, 1]),
            EthernetAddress([2, 0, 0, 0, 0, 2]),
            (src, dst),
            &repr,
            0xa5,
        )
    }

    #[test]
    fn segments_give_their_flow_and_span() {
        let f = syn(Some(1460));
        let seg = tcp_segment(&f).unwrap();
        assert_eq!(
            seg.key,
            (
                "10.0.2.15:40000".parse().unwrap(),
                "10.0.2.2:80".parse().unwrap()
            )
        );
        assert_eq!(seg.end, TcpSeqNumber(2), "a SYN counts one");
        assert_eq!(tcp_ack(&f), None, "no ACK flag");
        assert_eq!(neighbor_sender(&f), None);
        let arp = crate::nat::frame::arp_request(
            (
                EthernetAddress([2, 0, 0, 0, 0, 1]),
                Ipv4Addr::new(10, 0, 2, 15),
            ),
            Ipv4Addr::new(10, 0, 2, 2),
        );
        assert_eq!(
            neighbor_sender(&arp),
            Some(Ipv4Addr::new(10, 0, 2, 15).into())
        );
        assert_eq!(tcp_segment(&arp), None);
        // Truncated or lying headers never panic.
        for n in 0..f.len() {
            let _ = (
                tcp_segment(&f[..n]),
                tcp_ack(&f[..n]),
                neighbor_sender(&f[..n]),
            );
        }
        let mut bad = f.clone();
        bad[14 + 20 + 12] = 0xf0; // data offset 60 > segment
        assert_eq!(tcp_segment(&bad), None);
    }

    #[test]
    fn ipv6_segments_give_their_flow_and_ack() {
        let (guest, gw) = (
            "[fd00::15]:40000".parse::<SocketAddrV6>().unwrap(),
            "[fd00::2]:80".parse::<SocketAddrV6>().unwrap(),
        );
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        // A RST+ACK from the guest's address: the key is (guest, destination),
        // as `frame6.rs` builds it for the flow's SYN.
        let f = crate::nat::frame6::tcp6_rst(mac, mac, guest, gw, TcpSeqNumber(9));
        let seg = tcp_segment(&f).unwrap();
        assert_eq!(seg.key, (guest.into(), gw.into()));
        assert_eq!(tcp_ack(&f), Some(TcpSeqNumber(10)));
        assert_eq!(neighbor_sender(&f), None);
        let na = crate::nat::frame6::guest_advert((mac, *guest.ip()), mac, *gw.ip());
        assert_eq!(neighbor_sender(&na), Some(IpAddr::V6(*guest.ip())));
        assert_eq!(tcp_segment(&na), None);
        for n in 0..f.len() {
            let _ = (tcp_segment(&f[..n]), tcp_ack(&f[..n]));
        }
        for n in 0..na.len() {
            let _ = neighbor_sender(&na[..n]);
        }
    }

    #[test]
    fn syn_mss_is_raised_and_checksum_stays_valid() {
        let (out, mss) = raise_syn_mss(&syn(Some(1460))).unwrap();
        assert_eq!(mss, 1460);
        let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        let repr = TcpRepr::parse(
            &tcp,
            &ip.src_addr().into(),
            &ip.dst_addr().into(),
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(repr.max_seg_size, Some(OFFLOAD_MSS));
        assert_eq!(repr.window_scale, Some(7), "other options kept");
        // No MSS option: left alone.
        assert!(raise_syn_mss(&syn(None)).is_none());
        // Truncated frames never panic.
        let f = syn(Some(1460));
        for n in 0..f.len() {
            let _ = raise_syn_mss(&f[..n]);
        }
    }

    /// An IPv6 TCP frame from `src` to `dst` carrying `repr`.
    fn tcp6_frame(src: SocketAddrV6, dst: SocketAddrV6, repr: &TcpRepr) -> Vec<u8> {
        use smoltcp::wire::{IpProtocol, Ipv6Packet, Ipv6Repr};
        let caps = ChecksumCapabilities::default();
        let ip = Ipv6Repr {
            src_addr: *src.ip(),
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        };
        let mut f = vec![0u8; 14 + ip.buffer_len() + repr.buffer_len()];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut pkt = Ipv6Packet::new_unchecked(&mut f[14..]);
        ip.emit(&mut pkt);
        let mut tcp = TcpPacket::new_unchecked(pkt.payload_mut());
        repr.emit(&mut tcp, &(*src.ip()).into(), &(*dst.ip()).into(), &caps);
        f
    }

    #[test]
    fn ipv6_syn_mss_is_raised_and_super_frames_are_cut_at_the_guest_mss() {
        use smoltcp::wire::Ipv6Packet;
        let (guest, dst) = (
            "[fd00::15]:40000".parse::<SocketAddrV6>().unwrap(),
            "[2001:db8::10]:80".parse::<SocketAddrV6>().unwrap(),
        );
        let mut repr = TcpRepr {
            src_port: guest.port(),
            dst_port: dst.port(),
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 64800,
            window_scale: Some(7),
            max_seg_size: Some(1440),
            sack_permitted: true,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let f = tcp6_frame(guest, dst, &repr);
        let (out, mss) = raise_syn_mss(&f).unwrap();
        assert_eq!(mss, 1440);
        let ip = Ipv6Packet::new_checked(&out[14..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let (s, d) = (ip.src_addr().into(), ip.dst_addr().into());
        assert!(tcp.verify_checksum(&s, &d));
        let parsed = TcpRepr::parse(&tcp, &s, &d, &ChecksumCapabilities::default()).unwrap();
        assert_eq!(parsed.max_seg_size, Some(OFFLOAD_MSS));
        assert_eq!(parsed.window_scale, Some(7), "other options kept");
        for n in 0..f.len() {
            let _ = raise_syn_mss(&f[..n]);
        }
        // A 32 KiB segment from the destination to the guest: a super-frame, cut
        // at the guest's MSS within the MTU; a small one is only checksummed.
        let data = vec![0x5a; 32 * 1024];
        repr.control = TcpControl::None;
        repr.max_seg_size = None;
        repr.window_scale = None;
        repr.sack_permitted = false;
        repr.ack_number = Some(TcpSeqNumber(2));
        repr.src_port = dst.port();
        repr.dst_port = guest.port();
        repr.payload = &data;
        let big = tcp6_frame(dst, guest, &repr);
        let key_mss = |k: &Key| {
            if *k == (guest.into(), dst.into()) {
                1440
            } else {
                0
            }
        };
        let (hdr, at, _) = super::super::v6::tcp6_offload_header(&big, 1500, key_mss).unwrap();
        assert_eq!(hdr.gso_type, crate::offload::GSO_TCPV6);
        assert_eq!(hdr.gso_size, 1440);
        assert_eq!(at, 14 + 40 + 16, "checksum field");
        // Unknown flow: what fits the MTU.
        let (hdr, _, _) = super::super::v6::tcp6_offload_header(&big, 1500, |_| 0).unwrap();
        assert_eq!(hdr.gso_size, 1500 - 40 - 20);
        repr.payload = &data[..1000];
        let small = tcp6_frame(dst, guest, &repr);
        let (hdr, _, _) = super::super::v6::tcp6_offload_header(&small, 1500, key_mss).unwrap();
        assert_eq!(hdr.gso_type, crate::offload::GSO_NONE);
        for n in 0..big.len().min(200) {
            let _ = super::super::v6::tcp6_offload_header(&big[..n], 1500, key_mss);
        }
    }
}
