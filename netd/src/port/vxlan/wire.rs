//! The VXLAN header (RFC 7348 section 5) and the hash of an inner flow that picks
//! the outer UDP source port.
//!
//! A datagram's payload is parsed once, here, into a [`VxlanHeader`] and the inner
//! frame after it; nothing past this indexes the raw datagram. The header is 8
//! bytes: flags (only the I bit, 0x08, has a meaning: "the VNI is valid"), 24
//! reserved bits, the 24-bit VNI, 8 reserved bits. Reserved bits are sent as zero
//! and ignored on receipt, as the RFC says; a header without the I bit is not a
//! VXLAN frame we can place and is refused (the Linux driver does the same).

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;

/// The "VNI valid" flag.
const FLAG_I: u8 = 0x08;

/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// Why a datagram is not a VXLAN frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// shorter than a VXLAN header
    #[error("shorter than a VXLAN header")]
    Short,
    /// the I flag (VNI valid) is clear
    #[error("the I flag (VNI valid) is clear")]
    NoVni,
}

/// A parsed VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanHeader {
    /// The VXLAN network identifier (24 bits).
    pub vni: u32,
}

impl VxlanHeader {
    /// Parses the header at the start of `datagram`; returns it and the inner frame
    /// (not checked here: the switch checks it like any port's frame).
    pub fn parse(datagram: &[u8]) -> Result<(VxlanHeader, &[u8]), WireError> {
        let (Some(h), Some(inner)) = (datagram.get(..HEADER_LEN), datagram.get(HEADER_LEN..))
        else {
            return Err(WireError::Short);
        };
        if h[0] & FLAG_I == 0 {
            return Err(WireError::NoVni);
        }
        let vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
        Ok((VxlanHeader { vni }, inner))
    }

    /// The header's bytes (reserved fields zero). `vni` above 24 bits is cut.
    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let v = (self.vni & MAX_VNI).to_be_bytes();
        [FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]
    }
}

/// FNV-1a over `bytes`, continuing from `h`.
fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

/// A hash of the inner frame's flow (RFC 7348 section 5: "a hash of fields from the
/// inner packet"), so an ECMP underlay spreads flows while every packet of one flow
/// takes one path (no reordering). IPv4 and IPv6: addresses, protocol and, for TCP
/// and UDP (not a later IPv4 fragment), the ports; anything else: the MACs and the
/// EtherType. Missing bytes hash as absent: any input gives a value, never a panic.
pub fn flow_hash(frame: &[u8]) -> u32 {
    let mut h = 0x811c_9dc5;
    let mut off = 12;
    let mut ethertype = frame.get(off..off + 2);
    if ethertype == Some(&[0x81, 0x00]) {
        off += 4;
        ethertype = frame.get(off..off + 2);
    }
    let l3 = off + 2;
    let ports = |h: u32, proto: u8, at: usize| match proto {
        6 | 17 => fnv(h, frame.get(at..at + 4).unwrap_or_default()),
        _ => h,
    };
    match ethertype {
        Some([0x08, 0x00]) => {
            let ihl = frame
                .get(l3)
                .map(|b| usize::from(b & 0x0f) * 4)
                .unwrap_or(0);
            let proto = frame.get(l3 + 9).copied().unwrap_or(0);
            // Every fragment (the first too) is hashed by addresses alone: later
            // ones carry no ports, and all pieces of a packet should take one path.
            let frag = frame
                .get(l3 + 6..l3 + 8)
                .map(|f| (u16::from_be_bytes([f[0], f[1]]) & 0x3fff) != 0)
                .unwrap_or(true);
            h = fnv(h, &[4, proto]);
            h = fnv(h, frame.get(l3 + 12..l3 + 20).unwrap_or_default());
            if !frag && ihl >= 20 {
                h = ports(h, proto, l3 + ihl);
            }
        }
        Some([0x86, 0xdd]) => {
            let proto = frame.get(l3 + 6).copied().unwrap_or(0);
            h = fnv(h, &[6, proto]);
            h = fnv(h, frame.get(l3 + 8..l3 + 40).unwrap_or_default());
            h = ports(h, proto, l3 + 40);
        }
        _ => {
            h = fnv(h, frame.get(..12).unwrap_or_default());
            h = fnv(h, ethertype.unwrap_or_default());
        }
    }
    // Final avalanche, so that the low bits (which pick a socket) depend on all.
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_over_a_prefilled_buffer() {
        for vni in [1, 42, 0x12_3456, MAX_VNI] {
            let mut buf = [0xa5u8; HEADER_LEN + 3];
            buf[..HEADER_LEN].copy_from_slice(&VxlanHeader { vni }.emit());
            let (h, inner) = VxlanHeader::parse(&buf).unwrap();
            assert_eq!(h.vni, vni);
            assert_eq!(inner, &[0xa5; 3]);
            // Reserved bytes are written as zero.
            assert_eq!(&buf[1..4], &[0, 0, 0]);
            assert_eq!(buf[7], 0);
        }
    }

    #[test]
    fn short_and_flagless_headers_are_refused_reserved_bits_ignored() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                VxlanHeader::parse(&[0x08; HEADER_LEN][..n]),
                Err(WireError::Short)
            );
        }
        assert_eq!(
            VxlanHeader::parse(&[0, 0, 0, 0, 0, 0, 1, 0]),
            Err(WireError::NoVni)
        );
        // Reserved bits set: ignored on receipt.
        let (h, inner) = VxlanHeader::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0, 7, 0xff]).unwrap();
        assert_eq!(h.vni, 7);
        assert!(inner.is_empty());
    }

    fn tcp_frame(sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn flows_hash_apart_and_a_flow_hashes_the_same() {
        let a = flow_hash(&tcp_frame(40000, 5201));
        assert_eq!(a, flow_hash(&tcp_frame(40000, 5201)));
        // Payload bytes beyond the headers do not matter.
        let mut longer = tcp_frame(40000, 5201);
        longer.extend_from_slice(&[1, 2, 3]);
        assert_eq!(a, flow_hash(&longer));
        let distinct: std::collections::HashSet<u32> = (0..64u16)
            .map(|p| flow_hash(&tcp_frame(40000 + p, 5201)) % 16)
            .collect();
        assert!(distinct.len() > 8, "{distinct:?}");
    }

    #[test]
    fn any_bytes_hash_without_panicking() {
        for n in 0..80 {
            let f: Vec<u8> = (0..n as u8).collect();
            let _ = flow_hash(&f);
            let mut v4 = f.clone();
            if v4.len() >= 14 {
                v4[12..14].copy_from_slice(&[0x08, 0x00]);
                let _ = flow_hash(&v4);
                v4[12..14].copy_from_slice(&[0x86, 0xdd]);
                let _ = flow_hash(&v4);
                v4[12..14].copy_from_slice(&[0x81, 0x00]);
                let _ = flow_hash(&v4);
            }
        }
    }
}
