//! Receive coalescing: consecutive inner TCP/IPv4 segments of one flow, as one
//! datagram batch from the tunnel holds them, become one TCP super-frame with a
//! virtio-net header (GSO TCPv4, partial checksum), so that a TAP or `vm` port
//! takes a batch in one write, as the kernel's GRO would hand it to a bridge.
//!
//! A segment joins the frame being built only when everything but its sequence
//! number and payload is what the first one had (Ethernet header, TOS, TTL,
//! addresses, ports, ACK, window, TCP options: the rules of Linux's tcp_gro), its
//! sequence number follows on, it carries only ACK (and PSH, which closes the
//! frame), and its payload is the first one's size (a shorter one closes the
//! frame). Anything else is passed on alone, unchanged. The result never exceeds
//! 65535 bytes of IP packet. Frames are checked with bounds-checked reads only;
//! a frame this module cannot read is simply not coalesced.

use crate::offload::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4};
use crate::wire::checksum;

const ETH: usize = 14;
const IP: usize = ETH;
const TCP: usize = ETH + 20;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// A coalescable segment: header length (Ethernet + IP + TCP) and payload length.
struct Seg {
    hdr_len: usize,
    payload: usize,
    seq: u32,
    flags: u8,
}

fn be16(f: &[u8], at: usize) -> Option<usize> {
    f.get(at..at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
}

fn be32(f: &[u8], at: usize) -> Option<u32> {
    f.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a frame as a coalescable TCP/IPv4 segment (no IP options, no fragment).
fn parse(f: &[u8]) -> Option<Seg> {
    if f.get(12..14)? != [0x08, 0x00] || *f.get(IP)? != 0x45 || *f.get(IP + 9)? != 6 {
        return None;
    }
    if be16(f, IP + 6)? & 0x3fff != 0 {
        return None;
    }
    let total = be16(f, IP + 2)?;
    let thl = usize::from(f.get(TCP + 12)? >> 4) * 4;
    if thl < 20 || 20 + thl >= total || ETH + total != f.len() {
        return None;
    }
    let flags = *f.get(TCP + 13)?;
    if flags & ACK == 0 || flags & !(ACK | PSH) != 0 {
        return None;
    }
    Some(Seg {
        hdr_len: TCP + thl,
        payload: total - 20 - thl,
        seq: be32(f, TCP + 4)?,
        flags,
    })
}

/// Byte ranges that must match between segments of one super-frame.
const SAME: [(usize, usize); 6] = [
    (0, ETH),             // Ethernet header
    (IP + 1, IP + 2),     // TOS
    (IP + 8, IP + 10),    // TTL, protocol
    (IP + 12, TCP + 4),   // addresses, ports
    (TCP + 8, TCP + 13),  // ACK number, data offset
    (TCP + 14, TCP + 16), // window
];

/// The super-frame being built.
#[derive(Default)]
pub struct Coalescer {
    buf: Vec<u8>,
    hdr_len: usize,
    mss: usize,
    segs: usize,
    next_seq: u32,
    closed: bool,
}

impl Coalescer {
    /// Adds `f` if it continues the pending frame (or starts one when none is
    /// pending); false: not taken, the caller flushes and passes `f` on (or
    /// offers it again on an empty coalescer).
    pub fn offer(&mut self, f: &[u8]) -> bool {
        let Some(s) = parse(f) else {
            return false;
        };
        if self.segs == 0 {
            self.buf.clear();
            self.buf.extend_from_slice(f);
            self.hdr_len = s.hdr_len;
            self.mss = s.payload;
            self.segs = 1;
            self.next_seq = s.seq.wrapping_add(s.payload as u32);
            self.closed = s.flags & PSH != 0;
            return true;
        }
        let fits = self.buf.len() - ETH + s.payload <= 65535;
        let same = !self.closed
            && fits
            && s.hdr_len == self.hdr_len
            && s.seq == self.next_seq
            && s.payload <= self.mss
            && SAME.iter().all(|&(a, b)| self.buf.get(a..b) == f.get(a..b))
            && self.buf.get(TCP + 20..self.hdr_len) == f.get(TCP + 20..s.hdr_len);
        if !same {
            return false;
        }
        self.buf
            .extend_from_slice(f.get(s.hdr_len..).unwrap_or_default());
        self.segs += 1;
        self.next_seq = s.seq.wrapping_add(s.payload as u32);
        if s.flags & PSH != 0 {
            if let Some(b) = self.buf.get_mut(TCP + 13) {
                *b |= PSH;
            }
            self.closed = true;
        }
        if s.payload < self.mss {
            self.closed = true;
        }
        true
    }

    /// Hands the pending frame to `emit` (with a GSO header when it holds more
    /// than one segment) and empties the coalescer.
    pub fn flush(&mut self, emit: &mut dyn FnMut(&[u8], Option<&VnetHdr>)) {
        if self.segs == 0 {
            return;
        }
        if self.segs == 1 {
            emit(&self.buf, None);
            self.segs = 0;
            return;
        }
        let ip_total = self.buf.len() - ETH;
        let tcp_len = ip_total - 20;
        let b = &mut self.buf;
        b[IP + 2..IP + 4].copy_from_slice(&(ip_total as u16).to_be_bytes());
        b[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
        let ipsum = checksum(&[&b[IP..IP + 20]]);
        b[IP + 10..IP + 12].copy_from_slice(&ipsum.to_be_bytes());
        // Partial checksum: the pseudo-header sum, not complemented; whoever
        // segments or delivers the frame adds the rest.
        let pseudo = [
            &b[IP + 12..IP + 20],
            &[0, 6],
            &(tcp_len as u16).to_be_bytes()[..],
        ];
        let partial = !checksum(&pseudo);
        b[TCP + 16..TCP + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: self.hdr_len as u16,
            gso_size: self.mss as u16,
            csum_start: TCP as u16,
            csum_offset: 16,
        };
        emit(&self.buf, Some(&hdr));
        self.segs = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::finish;

    fn seg(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; TCP + 32];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[IP] = 0x45;
        f[IP + 8] = 64;
        f[IP + 9] = 6;
        f[IP + 12..IP + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[IP + 16..IP + 20].copy_from_slice(&[10, 0, 0, 2]);
        f[TCP..TCP + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[TCP + 2..TCP + 4].copy_from_slice(&5201u16.to_be_bytes());
        f[TCP + 4..TCP + 8].copy_from_slice(&seq.to_be_bytes());
        f[TCP + 12] = 8 << 4; // 32-byte header: 12 bytes of options
        f[TCP + 13] = flags;
        f[TCP + 20..TCP + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        f.extend_from_slice(payload);
        let total = (f.len() - ETH) as u16;
        f[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
        f
    }

    #[test]
    fn a_run_of_segments_becomes_one_super_frame_that_segments_back() {
        let mut c = Coalescer::default();
        let segs: Vec<Vec<u8>> = (0..4u32)
            .map(|i| {
                let p = vec![i as u8; if i == 3 { 500 } else { 1000 }];
                seg(100 + i * 1000, &p, if i == 3 { ACK | PSH } else { ACK })
            })
            .collect();
        for s in &segs {
            assert!(c.offer(s));
        }
        // Closed by the short, PSH segment.
        assert!(!c.offer(&seg(3600, &[9; 1000], ACK)));
        let mut out = Vec::new();
        c.flush(&mut |f, h| out.push((f.to_vec(), h.copied())));
        assert_eq!(c.segs, 0);
        let (frame, hdr) = &out[0];
        let hdr = hdr.expect("a GSO header");
        assert_eq!(hdr.gso_size, 1000);
        assert_eq!(frame.len(), TCP + 32 + 3500);
        // Software segmentation gives back segments with the original payloads.
        let mut scratch = Vec::new();
        let mut back = Vec::new();
        finish(&hdr, frame, &mut scratch, &mut |s| back.push(s.to_vec())).unwrap();
        assert_eq!(back.len(), 4);
        for (b, s) in back.iter().zip(&segs) {
            assert_eq!(b[TCP + 32..], s[TCP + 32..]);
            assert_eq!(b[TCP + 4..TCP + 8], s[TCP + 4..TCP + 8]);
            assert!(crate::wire::Ipv4::parse(&b[IP..]).is_some(), "IP checksum");
        }
    }

    #[test]
    fn other_flows_gaps_and_non_tcp_are_not_coalesced() {
        let mut c = Coalescer::default();
        assert!(c.offer(&seg(0, &[1; 100], ACK)));
        assert!(!c.offer(&seg(50, &[1; 100], ACK)), "gap");
        let mut other = seg(100, &[1; 100], ACK);
        other[TCP + 2] ^= 1;
        assert!(!c.offer(&other), "other flow");
        assert!(!c.offer(&seg(100, &[1; 100], ACK | 0x01)), "FIN");
        let mut ts = seg(100, &[1; 100], ACK);
        ts[TCP + 31] ^= 1;
        assert!(!c.offer(&ts), "other options");
        let mut e = Coalescer::default();
        assert!(!e.offer(&[0u8; 20]));
        assert!(!e.offer(&seg(0, &[], ACK)), "no payload");
        let mut one = Vec::new();
        c.flush(&mut |f, h| one.push((f.to_vec(), h.is_some())));
        assert_eq!(one.len(), 1);
        assert!(!one[0].1, "a single segment goes as it is");
        for n in 0..80 {
            let f: Vec<u8> = (0..n as u8).collect();
            let _ = Coalescer::default().offer(&f);
        }
    }
}
