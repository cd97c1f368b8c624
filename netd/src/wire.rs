//! Checked views of the few headers netd's own services read and write:
//! Ethernet II, ARP (IPv4 over Ethernet), IPv4 and UDP.
//!
//! Untrusted bytes are parsed once, at the edge, into small `Copy` structs plus a
//! payload slice; nothing after the parser indexes a raw buffer. Every parser
//! returns `None` for anything truncated, inconsistent or unsupported (IPv4 options
//! are skipped by IHL, fragments are refused), so a malformed frame is simply not
//! for us. Emitters build a whole frame at once, checksums included.

use std::net::Ipv4Addr;

/// EtherType IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Broadcast MAC.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

fn arr6(s: &[u8]) -> Option<[u8; 6]> {
    s.get(..6)?.try_into().ok()
}
fn be16(s: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(s.get(at..at + 2)?.try_into().ok()?))
}
fn ip4(s: &[u8], at: usize) -> Option<Ipv4Addr> {
    let b: [u8; 4] = s.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

/// An Ethernet II header and its payload.
#[derive(Debug, Clone, Copy)]
pub struct Ethernet<'a> {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType.
    pub ethertype: u16,
    /// Payload.
    pub payload: &'a [u8],
}

impl<'a> Ethernet<'a> {
    /// Parses a frame (no VLAN tag support: tagged frames are not for netd's services).
    pub fn parse(frame: &'a [u8]) -> Option<Self> {
        Some(Ethernet {
            dst: arr6(frame.get(0..6)?)?,
            src: arr6(frame.get(6..12)?)?,
            ethertype: be16(frame, 12)?,
            payload: frame.get(14..)?,
        })
    }
}

/// Appends an Ethernet header to `out`.
pub fn emit_ethernet(out: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender MAC.
    pub sha: [u8; 6],
    /// Sender IP.
    pub spa: Ipv4Addr,
    /// Target MAC.
    pub tha: [u8; 6],
    /// Target IP.
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// Parses an ARP payload (Ethernet/IPv4 only).
    pub fn parse(p: &[u8]) -> Option<Self> {
        if be16(p, 0)? != 1 || be16(p, 2)? != ETHERTYPE_IPV4 || *p.get(4)? != 6 || *p.get(5)? != 4 {
            return None;
        }
        Some(Arp {
            op: be16(p, 6)?,
            sha: arr6(p.get(8..)?)?,
            spa: ip4(p, 14)?,
            tha: arr6(p.get(18..)?)?,
            tpa: ip4(p, 24)?,
        })
    }

    /// Appends the 28-byte ARP packet.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
        out.extend_from_slice(&self.op.to_be_bytes());
        out.extend_from_slice(&self.sha);
        out.extend_from_slice(&self.spa.octets());
        out.extend_from_slice(&self.tha);
        out.extend_from_slice(&self.tpa.octets());
    }
}

/// The ARP reply a service owning `ip` at `mac` sends to the ARP packet `p` (a
/// request for `ip`; anything else gets None), as a whole minimum-size frame.
pub fn arp_answer(p: &[u8], mac: [u8; 6], ip: Ipv4Addr) -> Option<Vec<u8>> {
    let a = Arp::parse(p)?;
    if a.op != 1 || a.tpa != ip {
        return None;
    }
    let mut out = Vec::with_capacity(60);
    emit_ethernet(&mut out, a.sha, mac, ETHERTYPE_ARP);
    Arp {
        op: 2,
        sha: mac,
        spa: ip,
        tha: a.sha,
        tpa: a.spa,
    }
    .emit(&mut out);
    out.resize(60, 0);
    Some(out)
}

/// An IPv4 header (fields netd uses) and its payload.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4<'a> {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Protocol.
    pub protocol: u8,
    /// Payload (bounded by the header's total length).
    pub payload: &'a [u8],
}

/// RFC 1071 ones' complement sum. Eight bytes per step (two 32-bit halves into a
/// 64-bit sum, folded at the end: 2^16 = 1 modulo 2^16 - 1, so the folded sum of
/// 32-bit words is the sum of the 16-bit words): the software segmentation of a
/// 64 KiB super-frame checksums every byte, and byte by byte that was its cost.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for c in chunks {
        let mut c: &[u8] = c;
        if let Some(hi) = odd.take() {
            match c.split_first() {
                Some((&lo, rest)) => {
                    sum += u64::from(u16::from_be_bytes([hi, lo]));
                    c = rest;
                }
                None => {
                    odd = Some(hi);
                    continue;
                }
            }
        }
        let mut words = c.chunks_exact(8);
        for w in &mut words {
            sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
            sum += u64::from(u32::from_be_bytes([w[4], w[5], w[6], w[7]]));
        }
        let mut pairs = words.remainder().chunks_exact(2);
        for p in &mut pairs {
            sum += u64::from(u16::from_be_bytes([p[0], p[1]]));
        }
        odd = pairs.remainder().first().copied();
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod checksum_tests {
    use super::checksum;

    /// The byte-at-a-time RFC 1071 sum the fast one must equal.
    fn slow(chunks: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = chunks.concat();
        let mut sum: u32 = 0;
        for p in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn fast_sum_equals_the_byte_sum_for_any_split() {
        let data: Vec<u8> = (0..3000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for len in [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 1500, 2999, 3000] {
            let d = &data[..len];
            assert_eq!(checksum(&[d]), slow(&[d]), "len {len}");
            for cut in [0, 1, 3, len / 2, len.saturating_sub(1)] {
                let (a, b) = d.split_at(cut.min(len));
                assert_eq!(checksum(&[a, b]), slow(&[a, b]), "len {len} cut {cut}");
                assert_eq!(checksum(&[a, &[], b]), slow(&[a, b]));
            }
        }
        assert_eq!(checksum(&[&[0xff; 4096]]), slow(&[&[0xff; 4096]]));
    }
}

impl<'a> Ipv4<'a> {
    /// Parses an IPv4 packet; refuses fragments, bad lengths and bad checksums.
    pub fn parse(p: &'a [u8]) -> Option<Self> {
        let vihl = *p.first()?;
        if vihl >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(vihl & 0xf) * 4;
        let total = usize::from(be16(p, 2)?);
        if ihl < 20 || total < ihl || total > p.len() {
            return None;
        }
        let frag = be16(p, 6)?;
        if frag & 0x3fff != 0 {
            return None; // more-fragments set or non-zero offset
        }
        let header = p.get(..ihl)?;
        if checksum(&[header]) != 0 {
            return None;
        }
        Some(Ipv4 {
            src: ip4(p, 12)?,
            dst: ip4(p, 16)?,
            protocol: *p.get(9)?,
            payload: p.get(ihl..total)?,
        })
    }
}

/// A UDP datagram (over IPv4).
#[derive(Debug, Clone, Copy)]
pub struct Udp<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload (bounded by the UDP length).
    pub payload: &'a [u8],
}

impl<'a> Udp<'a> {
    /// Parses a UDP datagram; the checksum is not verified (it is optional in IPv4
    /// and the Ethernet CRC already covered the frame).
    pub fn parse(p: &'a [u8]) -> Option<Self> {
        let len = usize::from(be16(p, 4)?);
        if len < 8 || len > p.len() {
            return None;
        }
        Some(Udp {
            src_port: be16(p, 0)?,
            dst_port: be16(p, 2)?,
            payload: p.get(8..len)?,
        })
    }
}

/// Builds a whole Ethernet + IPv4 + UDP frame around `payload`.
pub fn emit_udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut out = Vec::with_capacity(14 + ip_len);
    emit_ethernet(&mut out, dst_mac, src_mac, ETHERTYPE_IPV4);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&ip);
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = IPPROTO_UDP;
    pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let mut c = checksum(&[&pseudo, &udp, payload]);
    if c == 0 {
        c = 0xffff;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&udp);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frame_roundtrip_and_checksums() {
        let f = emit_udp_frame(
            BROADCAST_MAC,
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            67,
            68,
            b"hello",
        );
        let e = Ethernet::parse(&f).unwrap();
        assert_eq!(e.ethertype, ETHERTYPE_IPV4);
        let ip = Ipv4::parse(e.payload).unwrap();
        assert_eq!(ip.dst, Ipv4Addr::new(10, 0, 0, 2));
        let mut pseudo = vec![];
        pseudo.extend_from_slice(&ip.src.octets());
        pseudo.extend_from_slice(&ip.dst.octets());
        pseudo.extend_from_slice(&[0, 17, 0, 13]);
        assert_eq!(checksum(&[&pseudo, ip.payload]), 0, "UDP checksum verifies");
        let u = Udp::parse(ip.payload).unwrap();
        assert_eq!((u.src_port, u.dst_port, u.payload), (67, 68, &b"hello"[..]));
        // Truncations never panic and never parse.
        for n in 0..f.len() {
            if let Some(e) = Ethernet::parse(&f[..n]) {
                assert!(Ipv4::parse(e.payload).is_none());
            }
        }
    }

    #[test]
    fn arp_roundtrip() {
        let a = Arp {
            op: 1,
            sha: [2, 0, 0, 0, 0, 1],
            spa: Ipv4Addr::new(10, 0, 0, 1),
            tha: [0; 6],
            tpa: Ipv4Addr::new(10, 0, 0, 2),
        };
        let mut v = vec![0xa5; 0];
        a.emit(&mut v);
        assert_eq!(v.len(), 28);
        assert_eq!(Arp::parse(&v), Some(a));
        assert!(Arp::parse(&v[..27]).is_none());
    }
}
