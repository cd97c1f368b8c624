//! The pcapng file format (the IETF draft `draft-ietf-opsawg-pcapng`), as much of it
//! as `netd capture` writes and reads: a Section Header Block, one Interface
//! Description Block per captured port, Enhanced Packet Blocks and, at the end,
//! one Interface Statistics Block per interface.
//!
//! Theory of operation. The writer side is a set of `emit_*` functions that
//! append one whole block to a buffer; nothing is written that the caller did not
//! pass, and every block is padded to 32 bits with its total length at both ends,
//! as the format requires. Everything is little-endian (the Section Header's
//! byte-order magic says so to the reader). Timestamps are nanoseconds since the
//! Unix epoch (`if_tsresol` = 9 on every interface).
//!
//! The reader side ([`read_block`], [`Block`]) is what the CLI needs to follow a
//! stream it relays: it reads one block at a time from the daemon, checks its
//! lengths (at least 12 bytes, a multiple of 4, at most [`MAX_BLOCK`], the trailing
//! length equal to the leading one) before it holds the block, and parses the
//! fields of the blocks it looks into (EPB, ISB) only through bounds-checked views.

use std::io::Read;

/// Section Header Block type.
pub const SHB: u32 = 0x0A0D_0D0A;
/// Interface Description Block type.
pub const IDB: u32 = 0x0000_0001;
/// Interface Statistics Block type.
pub const ISB: u32 = 0x0000_0005;
/// Enhanced Packet Block type.
pub const EPB: u32 = 0x0000_0006;
/// The Section Header's byte-order magic.
pub const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u16 = 1;
/// The largest block [`read_block`] accepts (an EPB of the largest snaplen, with
/// room for its options).
pub const MAX_BLOCK: usize = 1 << 20;
/// The largest snaplen: the length tcpdump and Wireshark default to.
pub const MAX_SNAPLEN: u32 = 262_144;

/// `opt_comment`, valid in every block.
pub const OPT_COMMENT: u16 = 1;
const OPT_END: u16 = 0;
const SHB_USERAPPL: u16 = 4;
/// `if_name`: the interface (here: the port) name.
pub const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_TSRESOL: u16 = 9;
/// `epb_flags`: direction and reception type.
pub const EPB_FLAGS: u16 = 2;
const ISB_STARTTIME: u16 = 2;
const ISB_ENDTIME: u16 = 3;
/// `isb_ifrecv`: frames the interface saw.
pub const ISB_IFRECV: u16 = 4;
/// `isb_ifdrop`: frames lost for lack of resources (here: a slow reader).
pub const ISB_IFDROP: u16 = 5;

/// `epb_flags` direction: inbound (the port delivered the frame to the switch).
pub const FLAG_INBOUND: u32 = 0b01;
/// `epb_flags` direction: outbound (the switch sent the frame out of the port).
pub const FLAG_OUTBOUND: u32 = 0b10;
/// `epb_flags` reception type: unicast.
pub const FLAG_UNICAST: u32 = 1 << 2;
/// `epb_flags` reception type: multicast.
pub const FLAG_MULTICAST: u32 = 2 << 2;
/// `epb_flags` reception type: broadcast.
pub const FLAG_BROADCAST: u32 = 3 << 2;

/// Appends a block of type `kind` whose body `body` writes (after the type and
/// length words), padded, with the total length patched in at both ends.
fn block(out: &mut Vec<u8>, kind: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    body(out);
    pad(out, start);
    let total = (out.len() - start + 4) as u32;
    out.extend_from_slice(&total.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&total.to_le_bytes());
}

/// Pads `out` with zeros to a multiple of 4 bytes counted from `start`.
fn pad(out: &mut Vec<u8>, start: usize) {
    let n = (4 - (out.len() - start) % 4) % 4;
    out.extend(std::iter::repeat_n(0u8, n));
}

/// Appends one option (its value cut at 65535 bytes: the field's width).
fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    let value = &value[..value.len().min(u16::MAX as usize)];
    let start = out.len();
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    pad(out, start);
}

fn end_options(out: &mut Vec<u8>) {
    out.extend_from_slice(&OPT_END.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
}

/// A timestamp in nanoseconds as the format's two words, high first.
fn ts_words(ns: u64) -> [u8; 8] {
    let mut w = [0u8; 8];
    w[..4].copy_from_slice(&((ns >> 32) as u32).to_le_bytes());
    w[4..].copy_from_slice(&(ns as u32).to_le_bytes());
    w
}

/// Appends a Section Header Block (section length unknown, as for a stream) naming
/// `app` as the writing application.
pub fn emit_shb(out: &mut Vec<u8>, app: &str) {
    block(out, SHB, |b| {
        b.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(-1i64).to_le_bytes());
        option(b, SHB_USERAPPL, app.as_bytes());
        end_options(b);
    });
}

/// Appends an Interface Description Block: Ethernet, `snaplen`, nanosecond
/// timestamps, `name` in `if_name` and `description` in `if_description`.
pub fn emit_idb(out: &mut Vec<u8>, snaplen: u32, name: &str, description: &str) {
    block(out, IDB, |b| {
        b.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&snaplen.to_le_bytes());
        option(b, IF_NAME, name.as_bytes());
        option(b, IF_DESCRIPTION, description.as_bytes());
        option(b, IF_TSRESOL, &[9]);
        end_options(b);
    });
}

/// One captured frame, as an Enhanced Packet Block carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Interface index (the order of the IDBs).
    pub interface: u32,
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// The frame's length on the wire (`data` may be cut at the snaplen).
    pub orig_len: u32,
    /// `epb_flags` (direction, reception type), 0 for none.
    pub flags: u32,
    /// A packet comment (`opt_comment`), e.g. why the switch dropped it.
    pub comment: Option<&'a str>,
    /// The captured bytes.
    pub data: &'a [u8],
}

/// Appends an Enhanced Packet Block.
pub fn emit_epb(out: &mut Vec<u8>, p: &Packet<'_>) {
    emit_epb_head(out, p);
    out.extend_from_slice(p.data);
    emit_epb_tail(out, p);
}

/// The padding after `len` bytes to a multiple of 4.
fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// An option's length in a block: code, length, value (cut at 65535), padding.
fn option_len(value: usize) -> usize {
    let v = value.min(u16::MAX as usize);
    4 + v + pad_len(v)
}

/// The total length of `p`'s Enhanced Packet Block.
fn epb_len(p: &Packet<'_>) -> usize {
    let mut opts = 0;
    if let Some(c) = p.comment {
        opts += option_len(c.len());
    }
    if p.flags != 0 {
        opts += option_len(4);
    }
    if opts != 0 {
        opts += 4;
    }
    28 + p.data.len() + pad_len(p.data.len()) + opts + 4
}

/// Appends what comes before the packet data in `p`'s Enhanced Packet Block:
/// with `p.data` itself and then [`emit_epb_tail`], the same bytes as
/// [`emit_epb`], so that a writer can hand the data to `writev` as it is.
pub fn emit_epb_head(out: &mut Vec<u8>, p: &Packet<'_>) {
    let total = (epb_len(p) as u32).to_le_bytes();
    out.extend_from_slice(&EPB.to_le_bytes());
    out.extend_from_slice(&total);
    out.extend_from_slice(&p.interface.to_le_bytes());
    out.extend_from_slice(&ts_words(p.ts_ns));
    out.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&p.orig_len.to_le_bytes());
}

/// Appends what comes after the packet data in `p`'s Enhanced Packet Block (see
/// [`emit_epb_head`]): its padding, options and trailing length.
pub fn emit_epb_tail(out: &mut Vec<u8>, p: &Packet<'_>) {
    out.extend(std::iter::repeat_n(0u8, pad_len(p.data.len())));
    if let Some(c) = p.comment {
        option(out, OPT_COMMENT, c.as_bytes());
    }
    if p.flags != 0 {
        option(out, EPB_FLAGS, &p.flags.to_le_bytes());
    }
    if p.comment.is_some() || p.flags != 0 {
        end_options(out);
    }
    out.extend_from_slice(&(epb_len(p) as u32).to_le_bytes());
}

/// An interface's statistics at the end of a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Interface index.
    pub interface: u32,
    /// When the capture started and ended (ns since the Unix epoch).
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// Frames the capture saw on the interface (written or lost).
    pub received: u64,
    /// Frames lost because the reader was too slow.
    pub dropped: u64,
}

/// Appends an Interface Statistics Block.
pub fn emit_isb(out: &mut Vec<u8>, s: &Stats) {
    block(out, ISB, |b| {
        b.extend_from_slice(&s.interface.to_le_bytes());
        b.extend_from_slice(&ts_words(s.end_ns));
        option(b, ISB_STARTTIME, &ts_words(s.start_ns));
        option(b, ISB_ENDTIME, &ts_words(s.end_ns));
        option(b, ISB_IFRECV, &s.received.to_le_bytes());
        option(b, ISB_IFDROP, &s.dropped.to_le_bytes());
        end_options(b);
    });
}

/// Why a stream is not pcapng as netd writes it.
#[derive(Debug, thiserror::Error)]
pub enum PcapngError {
    /// reading the stream failed
    #[error("reading the capture stream failed")]
    Io(#[source] std::io::Error),
    /// a block whose length is not a multiple of 4 between 12 and MAX_BLOCK
    #[error("pcapng block of type {kind:#x} has a bad length {len}")]
    BadLength {
        /// The block type.
        kind: u32,
        /// Its length field.
        len: u32,
    },
    /// the trailing length differs from the leading one
    #[error("pcapng block of type {0:#x}: trailing length differs")]
    Trailer(u32),
    /// the stream ended inside a block
    #[error("the capture stream ended inside a block")]
    Truncated,
    /// the first block is not a little-endian Section Header
    #[error("the capture stream does not start with a little-endian pcapng section header")]
    NotPcapng,
}

/// One block, whole (type, length, body, length), as read.
#[derive(Debug, Clone, Copy)]
pub struct Block<'a> {
    /// The block type.
    pub kind: u32,
    /// Everything between the leading length and the trailing one.
    pub body: &'a [u8],
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let w = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

fn le64(b: &[u8]) -> Option<u64> {
    let w: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

impl<'a> Block<'a> {
    /// A block from its whole bytes (as [`read_block`] leaves them); None if the
    /// lengths do not hold.
    pub fn parse(whole: &'a [u8]) -> Option<Self> {
        let kind = le32(whole, 0)?;
        let len = le32(whole, 4)? as usize;
        if len != whole.len()
            || len < 12
            || !len.is_multiple_of(4)
            || le32(whole, len - 4)? as usize != len
        {
            return None;
        }
        Some(Block {
            kind,
            body: whole.get(8..len - 4)?,
        })
    }

    /// The options of the block, as (code, value), after `fixed` bytes of fixed
    /// fields; stops at the end option or at the first one that does not fit.
    pub fn options(&self, fixed: usize) -> Vec<(u16, &'a [u8])> {
        let mut out = Vec::new();
        let mut rest = self.body.get(fixed..).unwrap_or(&[]);
        while let Some(h) = rest.get(..4) {
            let code = u16::from_le_bytes([h[0], h[1]]);
            let len = u16::from_le_bytes([h[2], h[3]]) as usize;
            if code == OPT_END {
                break;
            }
            let Some(v) = rest.get(4..4 + len) else {
                break;
            };
            out.push((code, v));
            rest = rest.get(4 + len.div_ceil(4) * 4..).unwrap_or(&[]);
        }
        out
    }

    /// An EPB's packet: None if this is not an EPB or its fields do not fit.
    pub fn packet(&self) -> Option<Packet<'a>> {
        if self.kind != EPB {
            return None;
        }
        let b = self.body;
        let caplen = le32(b, 12)? as usize;
        let data = b.get(20..20usize.checked_add(caplen)?)?;
        let mut p = Packet {
            interface: le32(b, 0)?,
            ts_ns: (u64::from(le32(b, 4)?) << 32) | u64::from(le32(b, 8)?),
            orig_len: le32(b, 16)?,
            flags: 0,
            comment: None,
            data,
        };
        for (code, v) in self.options(20 + caplen.div_ceil(4) * 4) {
            match code {
                OPT_COMMENT => p.comment = std::str::from_utf8(v).ok(),
                EPB_FLAGS => p.flags = le32(v, 0).unwrap_or(0),
                _ => {}
            }
        }
        Some(p)
    }

    /// An ISB's interface and (received, dropped) counts: None if this is not an
    /// ISB or its interface field does not fit.
    pub fn stats(&self) -> Option<(u32, u64, u64)> {
        if self.kind != ISB {
            return None;
        }
        let iface = le32(self.body, 0)?;
        let (mut recv, mut drop) = (0, 0);
        for (code, v) in self.options(12) {
            match code {
                ISB_IFRECV => recv = le64(v).unwrap_or(0),
                ISB_IFDROP => drop = le64(v).unwrap_or(0),
                _ => {}
            }
        }
        Some((iface, recv, drop))
    }
}

/// Reads the next whole block of `r` into `buf` (replacing what it held); Ok(false)
/// at a clean end of the stream (between blocks). The lengths are checked before
/// the body is read: a bad one is an error, never an allocation of its size.
pub fn read_block(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<bool, PcapngError> {
    buf.clear();
    buf.resize(8, 0);
    let mut got = 0;
    while got < 8 {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(PcapngError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PcapngError::Io(e)),
        }
    }
    let kind = le32(buf, 0).unwrap_or(0);
    let len = le32(buf, 4).unwrap_or(0);
    if len < 12 || !len.is_multiple_of(4) || len as usize > MAX_BLOCK {
        return Err(PcapngError::BadLength { kind, len });
    }
    buf.resize(len as usize, 0);
    r.read_exact(&mut buf[8..]).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => PcapngError::Truncated,
        _ => PcapngError::Io(e),
    })?;
    if le32(buf, len as usize - 4) != Some(len) {
        return Err(PcapngError::Trailer(kind));
    }
    Ok(true)
}

/// Whether `whole` is a little-endian Section Header Block.
pub fn is_shb(whole: &[u8]) -> bool {
    Block::parse(whole).is_some_and(|b| b.kind == SHB && le32(b.body, 0) == Some(BYTE_ORDER_MAGIC))
}

#[cfg(test)]
mod tests;
