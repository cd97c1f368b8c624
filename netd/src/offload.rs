//! virtio-net headers (`struct virtio_net_hdr`, as TAP devices with IFF_VNET_HDR
//! and AF_PACKET sockets with PACKET_VNET_HDR speak it) and the software fallback
//! for ports that cannot take offloaded frames.
//!
//! Theory of operation. TAP ports are opened with a vnet header and told
//! (TUNSETOFFLOAD) that netd accepts partial checksums and TCP segmentation
//! offload. The namespace's kernel then hands netd whole 64 KiB TCP super-frames
//! with a header describing how to finish them, instead of 1500-byte segments: one
//! read and one write move up to 44 segments. Between two such ports the header
//! travels with the frame and the receiving kernel (or the VMM's guest) does the
//! rest. A port without vnet support (stream sockets, in-process services) gets
//! the finished frames: [`finish`] completes a partial checksum or cuts a TCP
//! super-frame into MSS-sized segments with correct lengths, sequence numbers,
//! flags and checksums. Anything it cannot understand is refused (the caller drops
//! and counts it), never guessed at.
//!
//! Bounded work. The header comes from a guest or a peer, so a super-frame is a
//! request for work: 64 KiB with a segment size of 1 would be 65,000 frames for
//! every port without vnet support (and as many for a kernel that forwards it).
//! [`check_gso`] refuses, on ingress, a segment size below [`MIN_GSO_SIZE`] (the
//! smallest MSS Linux itself sends, `tcp_min_snd_mss`) and a frame that would make
//! more than [`MAX_GSO_SEGS`] segments; the port counts it (`drop_gso`). [`finish`]
//! enforces the same bounds again, so no caller can get past them.

use crate::wire::checksum;

/// Length of the virtio-net header netd uses (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN` (a flag bit on `gso_type`).
pub const GSO_ECN: u8 = 0x80;

/// Smallest GSO segment size (TCP payload bytes per segment) netd takes: Linux's
/// own floor for the MSS it sends (`net.ipv4.tcp_min_snd_mss`, default 48).
pub const MIN_GSO_SIZE: u16 = 48;
/// Most segments one super-frame may become. A 64 KiB frame at MSS 536 (the
/// smallest default MSS) is 123 segments, so no honest frame is refused.
pub const MAX_GSO_SEGS: usize = 128;

/// A virtio-net header (little-endian on the wire for TAP and AF_PACKET on the
/// hosts netd supports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// Flags (`F_NEEDS_CSUM`).
    pub flags: u8,
    /// GSO type.
    pub gso_type: u8,
    /// Length of the headers (Ethernet + IP + TCP), a hint.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut o = [0u8; VNET_HDR_LEN];
        o[0] = self.flags;
        o[1] = self.gso_type;
        o[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        o[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        o[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        o[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        o
    }

    /// Whether the frame is complete as it is (nothing left to do).
    pub fn is_plain(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type & !GSO_ECN == GSO_NONE
    }

    /// Whether this is a TCP segmentation job.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Why an offloaded frame could not be finished in software.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// checksum offsets outside the frame
    #[error("checksum offsets outside the frame")]
    CsumRange,
    /// unsupported GSO type {0}
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    /// GSO frame headers are not Ethernet + IPv4/IPv6 + TCP
    #[error("GSO frame headers are not Ethernet + IPv4/IPv6 + TCP")]
    Headers,
    /// GSO segment size is zero
    #[error("GSO segment size is zero")]
    GsoSize,
    /// GSO segment size {0} is below the minimum
    #[error("GSO segment size {0} is below the minimum of {MIN_GSO_SIZE}")]
    GsoTooSmall(u16),
    /// GSO frame would make {0} segments
    #[error("GSO frame would make {0} segments, more than {MAX_GSO_SEGS}")]
    GsoTooManySegs(usize),
}

/// Checks the work a super-frame asks for (see the module doc): its segment size
/// is at least [`MIN_GSO_SIZE`] and it makes at most [`MAX_GSO_SEGS`] segments.
/// A frame that is not GSO passes. The segment count is computed from the frame
/// length alone (headers count as payload), an upper bound that needs no parsing.
pub fn check_gso(hdr: &VnetHdr, frame: &[u8]) -> Result<(), OffloadError> {
    if !hdr.is_gso() {
        return Ok(());
    }
    if hdr.gso_size < MIN_GSO_SIZE {
        return Err(if hdr.gso_size == 0 {
            OffloadError::GsoSize
        } else {
            OffloadError::GsoTooSmall(hdr.gso_size)
        });
    }
    let segs = frame.len().div_ceil(usize::from(hdr.gso_size));
    if segs > MAX_GSO_SEGS {
        return Err(OffloadError::GsoTooManySegs(segs));
    }
    Ok(())
}

/// Size of the largest segment (IP packet) a GSO frame becomes, or the frame's own
/// payload size when it is not GSO. Used for MTU checks.
pub fn segment_payload_len(hdr: &VnetHdr, frame: &[u8]) -> usize {
    if hdr.is_gso() {
        match parse_headers(frame, hdr) {
            Ok(h) => {
                let payload = frame.len().saturating_sub(h.total);
                h.total - 14 + payload.min(usize::from(hdr.gso_size))
            }
            Err(_) => frame.len().saturating_sub(14),
        }
    } else {
        frame.len().saturating_sub(14)
    }
}

struct Headers {
    v4: bool,
    ip_off: usize,
    tcp_off: usize,
    /// Ethernet + IP + TCP header bytes.
    total: usize,
}

fn parse_headers(frame: &[u8], hdr: &VnetHdr) -> Result<Headers, OffloadError> {
    let e = OffloadError::Headers;
    let ethertype = frame.get(12..14).ok_or(e.clone())?;
    let ip_off = 14;
    let (v4, tcp_off) = match (ethertype, hdr.gso_type & !GSO_ECN) {
        ([0x08, 0x00], GSO_TCPV4) => {
            let vihl = *frame.get(ip_off).ok_or(e.clone())?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 || *frame.get(ip_off + 9).ok_or(e.clone())? != 6 {
                return Err(e);
            }
            (true, ip_off + ihl)
        }
        ([0x86, 0xdd], GSO_TCPV6) => {
            if frame.get(ip_off).ok_or(e.clone())? >> 4 != 6
                || *frame.get(ip_off + 6).ok_or(e.clone())? != 6
            {
                return Err(e);
            }
            (false, ip_off + 40)
        }
        (_, GSO_TCPV4 | GSO_TCPV6) => return Err(e),
        (_, t) => return Err(OffloadError::GsoType(t)),
    };
    let doff = usize::from(frame.get(tcp_off + 12).ok_or(e.clone())? >> 4) * 4;
    if doff < 20 || frame.len() < tcp_off + doff {
        return Err(e);
    }
    Ok(Headers {
        v4,
        ip_off,
        tcp_off,
        total: tcp_off + doff,
    })
}

/// Finishes an offloaded frame for a port that takes only complete frames:
/// calls `out` with each resulting frame, built in `scratch`.
pub fn finish(
    hdr: &VnetHdr,
    frame: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut dyn FnMut(&[u8]),
) -> Result<(), OffloadError> {
    if hdr.is_plain() {
        out(frame);
        return Ok(());
    }
    if !hdr.is_gso() {
        // Partial checksum: the field holds the pseudo-header sum; fold the rest in.
        let start = usize::from(hdr.csum_start);
        let at = start + usize::from(hdr.csum_offset);
        if start > frame.len() || at + 2 > frame.len() {
            return Err(OffloadError::CsumRange);
        }
        scratch.clear();
        scratch.extend_from_slice(frame);
        let c = checksum(&[scratch.get(start..).unwrap_or_default()]);
        if let Some(f) = scratch.get_mut(at..at + 2) {
            f.copy_from_slice(&c.to_be_bytes());
        }
        out(scratch);
        return Ok(());
    }
    check_gso(hdr, frame)?;
    let mss = usize::from(hdr.gso_size);
    let h = parse_headers(frame, hdr)?;
    let headers = frame.get(..h.total).ok_or(OffloadError::Headers)?;
    let payload = frame.get(h.total..).unwrap_or_default();
    let tcp_hlen = h.total - h.tcp_off;
    let seq0 = u32::from_be_bytes(
        frame
            .get(h.tcp_off + 4..h.tcp_off + 8)
            .and_then(|s| s.try_into().ok())
            .ok_or(OffloadError::Headers)?,
    );
    let ip_id0 = if h.v4 {
        u16::from_be_bytes([
            frame.get(h.ip_off + 4).copied().unwrap_or(0),
            frame.get(h.ip_off + 5).copied().unwrap_or(0),
        ])
    } else {
        0
    };
    let n = payload.len().div_ceil(mss).max(1);
    for i in 0..n {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or_default();
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let s = scratch.as_mut_slice();
        let ip_len = (h.total - h.ip_off + chunk.len()) as u16;
        if h.v4 {
            s[h.ip_off + 2..h.ip_off + 4].copy_from_slice(&ip_len.to_be_bytes());
            s[h.ip_off + 4..h.ip_off + 6]
                .copy_from_slice(&ip_id0.wrapping_add(i as u16).to_be_bytes());
            s[h.ip_off + 10..h.ip_off + 12].copy_from_slice(&[0, 0]);
            let c = checksum(&[&s[h.ip_off..h.tcp_off]]);
            s[h.ip_off + 10..h.ip_off + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            let pl = (tcp_hlen + chunk.len()) as u16;
            s[h.ip_off + 4..h.ip_off + 6].copy_from_slice(&pl.to_be_bytes());
        }
        let t = h.tcp_off;
        let seq = seq0.wrapping_add((i * mss) as u32);
        s[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = s[t + 13];
        if i + 1 < n {
            flags &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if i > 0 {
            flags &= !0x80; // CWR only on the first
        }
        s[t + 13] = flags;
        s[t + 16..t + 18].copy_from_slice(&[0, 0]);
        let tcp_len = (tcp_hlen + chunk.len()) as u32;
        let mut pseudo = [0u8; 40];
        let plen = if h.v4 {
            pseudo[0..8].copy_from_slice(&s[h.ip_off + 12..h.ip_off + 20]);
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
            12
        } else {
            pseudo[0..32].copy_from_slice(&s[h.ip_off + 8..h.ip_off + 40]);
            pseudo[32..36].copy_from_slice(&tcp_len.to_be_bytes());
            pseudo[39] = 6;
            40
        };
        let c = checksum(&[&pseudo[..plen], &s[t..]]);
        s[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        out(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Ethernet, Ipv4};

    fn tcp_v4_frame(payload_len: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload_len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        let tl = (40 + payload_len) as u16;
        ip[2..4].copy_from_slice(&tl.to_be_bytes());
        ip[4..6].copy_from_slice(&100u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let tcp = &mut f[34..54];
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    #[test]
    fn header_roundtrip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert!(VnetHdr::parse(&[0; 9]).is_none());
    }

    #[test]
    fn tso_splits_into_valid_segments() {
        let f = tcp_v4_frame(3000, 0x18 | 0x01); // PSH|ACK|FIN
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(segment_payload_len(&h, &f), 20 + 20 + 1448);
        let mut segs = vec![];
        let mut scratch = vec![];
        finish(&h, &f, &mut scratch, &mut |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(segs.len(), 3);
        let mut total = 0;
        for (i, s) in segs.iter().enumerate() {
            let e = Ethernet::parse(s).unwrap();
            let ip = Ipv4::parse(e.payload).expect("valid IPv4 header and checksum");
            let mut pseudo = vec![];
            pseudo.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 6]);
            pseudo.extend_from_slice(&(ip.payload.len() as u16).to_be_bytes());
            assert_eq!(
                checksum(&[&pseudo, ip.payload]),
                0,
                "TCP checksum of segment {i}"
            );
            let seq = u32::from_be_bytes(ip.payload[4..8].try_into().unwrap());
            assert_eq!(seq, 1000 + total as u32);
            let last = i == 2;
            assert_eq!(ip.payload[13] & 0x01 != 0, last, "FIN only last");
            total += ip.payload.len() - 20;
        }
        assert_eq!(total, 3000);
        // Payload bytes preserved in order.
        let joined: Vec<u8> = segs.iter().flat_map(|s| s[54..].to_vec()).collect();
        assert_eq!(joined, f[54..].to_vec());
    }

    #[test]
    fn partial_checksum_is_completed_and_junk_refused() {
        let mut f = tcp_v4_frame(100, 0x10);
        // Seed the field with the pseudo-header sum, as the kernel does.
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6];
        pseudo.extend_from_slice(&120u16.to_be_bytes());
        let seed = !checksum(&[&pseudo]);
        f[50..52].copy_from_slice(&seed.to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = vec![];
        finish(&h, &f, &mut vec![], &mut |s| out = s.to_vec()).unwrap();
        assert_eq!(checksum(&[&pseudo, &out[34..]]), 0);
        let bad = VnetHdr {
            csum_start: 5000,
            ..h
        };
        assert_eq!(
            finish(&bad, &f, &mut vec![], &mut |_| {}),
            Err(OffloadError::CsumRange)
        );
        let bad = VnetHdr {
            gso_type: 3,
            gso_size: 100,
            ..h
        };
        assert!(finish(&bad, &f, &mut vec![], &mut |_| {}).is_err());
        let bad = VnetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 100,
            ..h
        };
        assert_eq!(
            finish(&bad, &f, &mut vec![], &mut |_| {}),
            Err(OffloadError::Headers)
        );
        for n in 0..f.len() {
            let h = VnetHdr {
                gso_type: GSO_TCPV4,
                gso_size: MIN_GSO_SIZE,
                ..Default::default()
            };
            let _ = finish(&h, &f[..n], &mut vec![], &mut |_| {});
        }
    }

    /// Regression (issue 11, item 9): a 64 KiB super-frame with segment size 1 was
    /// cut into 65,000 frames for every port without vnet support.
    #[test]
    fn tiny_segments_and_too_many_segments_are_refused() {
        let f = tcp_v4_frame(65_000, 0x10);
        let h = |gso_size| VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut n = 0;
        let r = finish(&h(1), &f, &mut vec![], &mut |_| n += 1);
        assert_eq!(r, Err(OffloadError::GsoTooSmall(1)));
        assert_eq!(n, 0, "nothing sent for a refused frame");
        assert_eq!(check_gso(&h(0), &f), Err(OffloadError::GsoSize));
        assert_eq!(
            check_gso(&h(MIN_GSO_SIZE - 1), &f),
            Err(OffloadError::GsoTooSmall(47))
        );
        // At the minimum size a 64 KiB frame is too many segments.
        assert!(matches!(
            check_gso(&h(MIN_GSO_SIZE), &f),
            Err(OffloadError::GsoTooManySegs(_))
        ));
        // Honest sizes pass: 1448 (MTU 1500) and 536 (the smallest default MSS).
        for mss in [536, 1448, 8948] {
            assert_eq!(check_gso(&h(mss), &f), Ok(()), "mss {mss}");
            let mut segs = 0;
            finish(&h(mss), &f, &mut vec![], &mut |_| segs += 1).unwrap();
            assert_eq!(segs, 65_000usize.div_ceil(usize::from(mss)));
            assert!(segs <= MAX_GSO_SEGS);
        }
        // A plain frame or a partial checksum is no GSO job.
        assert_eq!(check_gso(&VnetHdr::default(), &f), Ok(()));
    }
}
