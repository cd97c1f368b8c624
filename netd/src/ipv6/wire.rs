//! IPv6, ICMPv6 and NDP wire formats, as far as netd's IPv6 service and the port
//! guard read and write them. Parsing is strict and bounded: the IPv6 payload
//! length must fit the frame, extension headers are walked at most
//! [`MAX_EXT_HEADERS`] deep, NDP options must have a non-zero length that fits, and
//! anything else is `None` (the caller drops and counts it).

use std::net::Ipv6Addr;

use crate::wire::checksum;

/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// ICMPv6's next-header value.
pub const IPPROTO_ICMPV6: u8 = 58;
/// UDP's next-header value.
pub const IPPROTO_UDP: u8 = 17;
/// Most extension headers walked before the upper layer.
pub const MAX_EXT_HEADERS: usize = 8;

/// ICMPv6 types netd reads or writes.
pub mod icmp {
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Router Solicitation.
    pub const RS: u8 = 133;
    /// Router Advertisement.
    pub const RA: u8 = 134;
    /// Neighbor Solicitation.
    pub const NS: u8 = 135;
    /// Neighbor Advertisement.
    pub const NA: u8 = 136;
    /// Redirect.
    pub const REDIRECT: u8 = 137;
}

/// NDP option types (RFC 4861 4.6, RFC 8106).
pub mod opt {
    /// Source link-layer address.
    pub const SLLA: u8 = 1;
    /// Target link-layer address.
    pub const TLLA: u8 = 2;
    /// Prefix information.
    pub const PREFIX: u8 = 3;
    /// MTU.
    pub const MTU: u8 = 5;
    /// Recursive DNS servers.
    pub const RDNSS: u8 = 25;
}

/// A parsed IPv6 packet: its addresses, hop limit and the upper layer reached
/// through the extension headers.
#[derive(Debug, Clone, Copy)]
pub struct Ipv6<'a> {
    /// Source.
    pub src: Ipv6Addr,
    /// Destination.
    pub dst: Ipv6Addr,
    /// Hop limit.
    pub hop_limit: u8,
    /// The upper-layer protocol (after any extension headers), None when it was
    /// not reached (a later fragment).
    pub proto: Option<u8>,
    /// Whether an extension header was crossed (ND and DHCPv6 from netd carry none).
    pub extended: bool,
    /// The upper-layer payload (empty when `proto` is None).
    pub payload: &'a [u8],
}

fn addr(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let a: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(a))
}

impl<'a> Ipv6<'a> {
    /// Parses an IPv6 packet (the Ethernet payload).
    pub fn parse(p: &'a [u8]) -> Option<Self> {
        let h = p.get(..40)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
        let body = p.get(40..40 + len)?;
        let (src, dst) = (addr(h, 8)?, addr(h, 24)?);
        let mut next = h[6];
        let mut rest = body;
        let mut extended = false;
        for _ in 0..MAX_EXT_HEADERS {
            match next {
                // Hop-by-hop, routing, destination options: (next, len in 8 octets - 1).
                0 | 43 | 60 => {
                    let l = (usize::from(*rest.get(1)?) + 1) * 8;
                    next = *rest.first()?;
                    rest = rest.get(l..)?;
                    extended = true;
                }
                // Fragment: only the first fragment shows the upper layer.
                44 => {
                    let f = rest.get(..8)?;
                    extended = true;
                    if u16::from_be_bytes([f[2], f[3]]) & 0xfff8 != 0 {
                        return Some(Ipv6 {
                            src,
                            dst,
                            hop_limit: h[7],
                            proto: None,
                            extended,
                            payload: &[],
                        });
                    }
                    next = f[0];
                    rest = &rest[8..];
                }
                _ => {
                    return Some(Ipv6 {
                        src,
                        dst,
                        hop_limit: h[7],
                        proto: Some(next),
                        extended,
                        payload: rest,
                    })
                }
            }
        }
        None
    }

    /// Whether the upper-layer checksum (ICMPv6 or UDP) of this packet is right.
    pub fn checksum_ok(&self) -> bool {
        match self.proto {
            Some(p) => upper_checksum(self.src, self.dst, p, &[self.payload]) == 0,
            None => false,
        }
    }
}

/// The upper-layer checksum over the IPv6 pseudo-header and `chunks`.
pub fn upper_checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, chunks: &[&[u8]]) -> u16 {
    let len: usize = chunks.iter().map(|c| c.len()).sum();
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&(len as u32).to_be_bytes());
    pseudo[39] = proto;
    let mut all: Vec<&[u8]> = vec![&pseudo];
    all.extend_from_slice(chunks);
    checksum(&all)
}

/// The NDP options after the fixed part of an ND message: (type, body after the
/// 2-byte header). None when an option has length 0 or runs past the end.
pub fn nd_options(mut p: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !p.is_empty() {
        let t = *p.first()?;
        let l = usize::from(*p.get(1)?) * 8;
        if l == 0 || out.len() >= 64 {
            return None;
        }
        let o = p.get(..l)?;
        out.push((t, &o[2..]));
        p = &p[l..];
    }
    Some(out)
}

/// The link-layer address in an SLLA/TLLA option body, if the option is there.
pub fn lla(opts: &[(u8, &[u8])], kind: u8) -> Option<Option<[u8; 6]>> {
    match opts.iter().find(|(t, _)| *t == kind) {
        None => Some(None),
        Some((_, b)) => Some(Some(b.get(..6)?.try_into().ok()?)),
    }
}

/// The multicast MAC of an IPv6 multicast address (33:33 and its low 32 bits).
pub fn multicast_mac(a: Ipv6Addr) -> [u8; 6] {
    let o = a.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited-node multicast address of `a` (ff02::1:ffXX:XXXX).
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The EUI-64 link-local address of a MAC (fe80::/64, U/L bit flipped).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// Whether `a` is in fe80::/64.
pub fn is_link_local(a: Ipv6Addr) -> bool {
    a.octets()[..8] == [0xfe, 0x80, 0, 0, 0, 0, 0, 0]
}

/// Builds an Ethernet + IPv6 frame around the upper-layer message `body`, whose
/// checksum field (at `csum_at`) is filled in here.
#[allow(clippy::too_many_arguments)]
pub fn emit_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    hop_limit: u8,
    mut body: Vec<u8>,
    csum_at: usize,
) -> Vec<u8> {
    if let Some(c) = body.get_mut(csum_at..csum_at + 2) {
        c.fill(0);
    }
    let mut c = upper_checksum(src, dst, proto, &[&body]);
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    if let Some(f) = body.get_mut(csum_at..csum_at + 2) {
        f.copy_from_slice(&c.to_be_bytes());
    }
    let mut out = Vec::with_capacity(54 + body.len());
    crate::wire::emit_ethernet(&mut out, dst_mac, src_mac, ETHERTYPE_IPV6);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.push(proto);
    out.push(hop_limit);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let s = link_local([0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(s, "fe80::5054:ff:fe01:203".parse::<Ipv6Addr>().unwrap());
        let d: Ipv6Addr = "ff02::1".parse().unwrap();
        let body = vec![icmp::ECHO_REQUEST, 0, 0xa5, 0xa5, 1, 2, 3, 4];
        let f = emit_frame(multicast_mac(d), [2; 6], s, d, IPPROTO_ICMPV6, 64, body, 2);
        let p = Ipv6::parse(&f[14..]).unwrap();
        assert_eq!((p.src, p.dst, p.proto), (s, d, Some(IPPROTO_ICMPV6)));
        assert!(p.checksum_ok());
        let mut bad = f.clone();
        bad[14 + 5] += 1;
        assert!(Ipv6::parse(&bad[14..]).is_none(), "length past the frame");
        assert!(
            nd_options(&[1, 0, 0, 0, 0, 0, 0, 0]).is_none(),
            "zero length"
        );
        assert!(
            nd_options(&[1, 2, 0, 0, 0, 0, 0, 0]).is_none(),
            "past the end"
        );
        assert_eq!(nd_options(&[1, 1, 1, 2, 3, 4, 5, 6]).unwrap().len(), 1);
        assert_eq!(
            solicited_node("fd42::12:3456".parse().unwrap()),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u32 = 7;
        for n in 0..4000usize {
            let mut b = vec![0u8; n % 120];
            for v in b.iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *v = (x >> 16) as u8;
            }
            if let Some(first) = b.first_mut() {
                *first = 0x60;
            }
            let _ = Ipv6::parse(&b).map(|p| p.checksum_ok());
            let _ = nd_options(&b);
        }
    }
}
