//! The transmission phase: requests, simple replies, structured reply chunks.
//!
//! Theory of operation: a client sends a fixed 28-byte [`Request`] header per
//! request (a WRITE's payload follows it); the server answers each with either
//! a [`SimpleReply`] (16 bytes, a READ's data after it) or, once structured
//! replies were negotiated, one or more chunks, each a [`ChunkHeader`] and a
//! payload, the last one flagged done. A reader tells the two apart by the
//! first four bytes ([`ReplyKind`]).
//!
//! The request's command stays a raw number in [`Request`], because an unknown
//! command is not broken framing: the server answers it EINVAL and carries on.
//! [`Request::command`] is the one conversion to the typed [`Command`].
//!
//! A chunk header is checked against its own type before any payload byte is
//! read ([`ChunkHeader::payload`]): lengths a type fixes, non-empty data, and
//! the [`MAX_PAYLOAD`] bound, so a reader allocates or reads nothing on a
//! length a server made up. READ data is never copied by this module: the
//! server writes it after an emitted header (from its own buffer or mapping),
//! and a client reads it straight into its destination after
//! [`parse_offset`].

use bytes::BufMut;

use crate::consts::*;
use crate::{fixed, ParseError, Reader};

/// A transmission command, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// NBD_CMD_READ.
    Read = 0,
    /// NBD_CMD_WRITE (payload follows the header).
    Write = 1,
    /// NBD_CMD_DISC: disconnect.
    Disc = 2,
    /// NBD_CMD_FLUSH: flush to stable storage.
    Flush = 3,
    /// NBD_CMD_TRIM: discard.
    Trim = 4,
    /// NBD_CMD_CACHE: prefetch.
    Cache = 5,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes = 6,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus = 7,
}

/// A command number this crate does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown command {0}")]
pub struct UnknownCommand(pub u16);

impl TryFrom<u16> for Command {
    type Error = UnknownCommand;

    fn try_from(v: u16) -> Result<Self, UnknownCommand> {
        Ok(match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => return Err(UnknownCommand(other)),
        })
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        c as u16
    }
}

fixed_header! {
    /// A transmission request header (a WRITE payload is read separately).
    /// Parsing checks the magic only; everything else is checked later
    /// against the export and the negotiated features.
    pub struct Request: REQUEST_LEN, magic REQUEST_MAGIC;
    /// Command flags (`cflag::*`).
    pub flags: u16,
    /// Command number, raw (see [`Request::command`]).
    pub kind: u16,
    /// Client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// A request for `command`.
    pub fn new(command: Command, flags: u16, handle: u64, offset: u64, len: u32) -> Self {
        Request {
            flags,
            kind: command.into(),
            handle,
            offset,
            len,
        }
    }

    /// The typed command.
    pub fn command(&self) -> Result<Command, UnknownCommand> {
        Command::try_from(self.kind)
    }

    /// Whether the command flag `flag` (`cflag::*`) is set.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command() == Ok(Command::Write) {
            self.len
        } else {
            0
        }
    }
}

/// What a reply is, from its first four bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A [`SimpleReply`].
    Simple,
    /// A structured reply chunk ([`ChunkHeader`]).
    Structured,
}

impl ReplyKind {
    /// Reads the magic at the start of `buf` (4 bytes are enough).
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        match Reader::new(buf).u32()? {
            SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
            m => Err(ParseError::BadMagic(m.into())),
        }
    }

    /// Size of the whole header, magic included.
    pub fn header_len(self) -> usize {
        match self {
            ReplyKind::Simple => SIMPLE_REPLY_LEN,
            ReplyKind::Structured => CHUNK_HEADER_LEN,
        }
    }
}

fixed_header! {
    /// A simple reply header (a successful READ's data follows it).
    pub struct SimpleReply: SIMPLE_REPLY_LEN, magic SIMPLE_REPLY_MAGIC;
    /// NBD error value (`err::*`), 0 for success.
    pub error: u32,
    /// The request's cookie.
    pub handle: u64,
}

/// Whether a chunk is the last of its reply (NBD_REPLY_FLAG_DONE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    /// More chunks of this reply follow.
    No,
    /// The reply ends with this chunk.
    Yes,
}

impl Final {
    fn flags(self) -> u16 {
        match self {
            Final::No => 0,
            Final::Yes => chunk::FLAG_DONE,
        }
    }
}

fixed_header! {
    /// A structured reply chunk header; `len` payload bytes follow it.
    pub struct ChunkHeader: CHUNK_HEADER_LEN, magic STRUCTURED_REPLY_MAGIC;
    /// Chunk flags (`chunk::FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`chunk::*`).
    pub kind: u16,
    /// The request's cookie.
    pub handle: u64,
    /// Payload length.
    pub len: u32,
}

/// What a chunk's payload holds, checked against the chunk's type and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPayload {
    /// NONE: nothing.
    None,
    /// OFFSET_DATA: an 8-byte offset ([`parse_offset`]), then `data_len`
    /// (non-zero) bytes of data.
    OffsetData {
        /// Bytes of data after the offset.
        data_len: u32,
    },
    /// OFFSET_HOLE: 12 bytes ([`OffsetHole::parse`]).
    OffsetHole,
    /// ERROR or ERROR_OFFSET: at least 6 bytes ([`ErrorChunk::parse`]).
    Error,
    /// BLOCK_STATUS ([`BlockStatus::parse`]).
    BlockStatus,
    /// Any other type, or a NONE that carries bytes: skipped by its length;
    /// `error` says whether the type has the error bit.
    Other {
        /// The type is an error type.
        error: bool,
    },
}

impl ChunkHeader {
    /// Whether this chunk ends its reply.
    pub fn is_final(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }

    /// What the payload holds; an error where the length cannot be right for
    /// the type or exceeds [`MAX_PAYLOAD`] (plus the data chunk's offset).
    pub fn payload(&self) -> Result<ChunkPayload, ParseError> {
        let len = self.len;
        if len > MAX_PAYLOAD + 8 {
            return Err(ParseError::Length("chunk longer than the maximum payload"));
        }
        Ok(match self.kind {
            chunk::NONE if len == 0 => ChunkPayload::None,
            chunk::OFFSET_DATA if len < 8 => return Err(ParseError::Length("short data chunk")),
            chunk::OFFSET_DATA if len == 8 => return Err(ParseError::Length("empty data chunk")),
            chunk::OFFSET_DATA => ChunkPayload::OffsetData { data_len: len - 8 },
            chunk::OFFSET_HOLE if len != 12 => {
                return Err(ParseError::Length("hole chunk not 12 bytes"))
            }
            chunk::OFFSET_HOLE => ChunkPayload::OffsetHole,
            chunk::ERROR | chunk::ERROR_OFFSET if len < 6 => {
                return Err(ParseError::Length("short error chunk"))
            }
            chunk::ERROR | chunk::ERROR_OFFSET => ChunkPayload::Error,
            chunk::BLOCK_STATUS => ChunkPayload::BlockStatus,
            t => ChunkPayload::Other {
                error: t & chunk::ERROR_BIT != 0,
            },
        })
    }
}

/// Parses the offset that opens an OFFSET_DATA payload (8 bytes; the data
/// follows it).
pub fn parse_offset(buf: &[u8]) -> Result<u64, ParseError> {
    Reader::new(buf).u64()
}

/// The payload of an OFFSET_HOLE chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetHole {
    /// Where the zeroes start.
    pub offset: u64,
    /// How many (non-zero).
    pub len: u32,
}

impl OffsetHole {
    /// Parses the 12-byte payload.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let mut r = fixed(buf, 12)?;
        let hole = OffsetHole {
            offset: r.u64()?,
            len: r.u32()?,
        };
        if hole.len == 0 {
            return Err(ParseError::Length("empty hole chunk"));
        }
        Ok(hole)
    }
}

/// The payload of an ERROR or ERROR_OFFSET chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    /// NBD error value (`err::*`; a server must not send 0).
    pub error: u32,
    /// Human-readable message. A message length past the payload is cut to
    /// the payload: the error value is what a client acts on, and a bad message
    /// must not turn one failed request into a failed connection.
    pub message: &'a [u8],
}

impl<'a> ErrorChunk<'a> {
    /// Parses the payload (at least 6 bytes: error and message length).
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(buf);
        let error = r.u32()?;
        let n = r.u16()? as usize;
        let rest = r.rest();
        Ok(ErrorChunk {
            error,
            message: rest.get(..n).unwrap_or(rest),
        })
    }
}

/// One `base:allocation` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub len: u32,
    /// STATE_HOLE / STATE_ZERO.
    pub flags: u32,
}

/// The payload of a BLOCK_STATUS chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// The metadata context id.
    pub context: u32,
    /// The extents, in order from the request's offset.
    pub extents: Vec<Extent>,
}

impl BlockStatus {
    /// Parses the payload: a context id and whole 8-byte descriptors.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(buf);
        let context = r.u32()?;
        if r.remaining() % 8 != 0 {
            return Err(ParseError::Length("block status descriptors"));
        }
        let mut extents = Vec::with_capacity(r.remaining() / 8);
        while r.remaining() > 0 {
            extents.push(Extent {
                len: r.u32()?,
                flags: r.u32()?,
            });
        }
        Ok(BlockStatus { context, extents })
    }
}

/// Emits an OFFSET_DATA chunk header and its offset; `data_len` bytes of data
/// must follow.
pub fn emit_offset_data_header<B: BufMut>(
    out: &mut B,
    handle: u64,
    offset: u64,
    data_len: u32,
    fin: Final,
) {
    ChunkHeader {
        flags: fin.flags(),
        kind: chunk::OFFSET_DATA,
        handle,
        len: 8 + data_len,
    }
    .emit(out);
    out.put_u64(offset);
}

/// Emits a complete OFFSET_HOLE chunk.
pub fn emit_offset_hole<B: BufMut>(out: &mut B, handle: u64, offset: u64, len: u32, fin: Final) {
    ChunkHeader {
        flags: fin.flags(),
        kind: chunk::OFFSET_HOLE,
        handle,
        len: 12,
    }
    .emit(out);
    out.put_u64(offset);
    out.put_u32(len);
}

/// Emits a complete final NONE chunk.
pub fn emit_none<B: BufMut>(out: &mut B, handle: u64) {
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        kind: chunk::NONE,
        handle,
        len: 0,
    }
    .emit(out);
}

/// Longest error message sent in an ERROR chunk (longer ones are cut at a
/// character boundary).
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Emits a complete final ERROR chunk with a human-readable message.
pub fn emit_error_chunk<B: BufMut>(out: &mut B, handle: u64, error: u32, msg: &str) {
    let msg = truncate_utf8(msg, MAX_ERROR_MESSAGE);
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        kind: chunk::ERROR,
        handle,
        len: 6 + msg.len() as u32,
    }
    .emit(out);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// Emits a complete final BLOCK_STATUS chunk.
pub fn emit_block_status<B: BufMut>(out: &mut B, handle: u64, context: u32, extents: &[Extent]) {
    ChunkHeader {
        flags: chunk::FLAG_DONE,
        kind: chunk::BLOCK_STATUS,
        handle,
        len: 4 + 8 * extents.len() as u32,
    }
    .emit(out);
    out.put_u32(context);
    for e in extents {
        out.put_u32(e.len);
        out.put_u32(e.flags);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests;
