//! The NBD wire protocol, as pure parse / emit functions over byte slices, for
//! both sides of a connection: the server (stord) and the client (vmm-shim).
//!
//! Theory of operation: everything a peer sends is parsed here, once, into
//! checked types; nothing past this crate indexes a raw buffer. Each message
//! type has a `parse` that takes a slice holding at least its fixed-size part
//! (the caller reads exactly that many bytes from the socket first, so the
//! crate needs no I/O and no async runtime) and returns a [`ParseError`]
//! instead of panicking on anything short, oversized or inconsistent, and an
//! `emit` that appends the message to any [`bytes::BufMut`] (a `BytesMut`, a
//! `Vec<u8>`, or a fixed `&mut [u8]` in tests). Lengths a peer controls are
//! bounded by the constants in [`consts`] ([`MAX_PAYLOAD`], [`MAX_OPTION_DATA`],
//! [`MAX_STRING`]) before anything is allocated for them.
//!
//! - [`handshake`]: the fixed newstyle greeting and flags, client options
//!   (parsed by the server, emitted by the client), option replies (emitted by
//!   the server, parsed by the client), NBD_REP_INFO items.
//! - [`transmission`]: request headers and the typed [`Command`] (parsed by the
//!   server, emitted by the client), simple replies and structured reply chunks
//!   (emitted by the server, parsed by the client).
//!
//! Only the compact (non-extended) headers are spoken: a server answers
//! `NBD_OPT_EXTENDED_HEADERS` with `NBD_REP_ERR_UNSUP`. Semantics (which
//! request is valid for which export, what a reply means for a read buffer)
//! belong to the server and the client; this crate checks only what the wire
//! format itself says.

/// Defines a fixed-size header: a struct of big-endian fields that follow a
/// magic number on the wire, in the order given, with its `parse` (length
/// and magic checked first) and `emit`. One definition of each layout, read
/// and written by the same field list.
macro_rules! fixed_header {
    (
        $(#[$meta:meta])*
        pub struct $name:ident: $len:expr, magic $magic:expr;
        $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)*
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// Bytes on the wire, magic included.
            pub const LEN: usize = $len;

            /// Parses the header from the first [`Self::LEN`] bytes of `buf`.
            pub fn parse(buf: &[u8]) -> Result<Self, $crate::ParseError> {
                let mut r = $crate::with_magic(buf, $len, $magic)?;
                Ok($name {
                    $($field: $crate::Field::read(&mut r)?,)*
                })
            }

            /// Emits the header ([`Self::LEN`] bytes).
            pub fn emit<B: bytes::BufMut>(&self, out: &mut B) {
                $crate::Field::put($magic, out);
                $($crate::Field::put(self.$field, out);)*
            }
        }
    };
}

pub mod consts;
pub mod handshake;
pub mod transmission;

pub use consts::*;
pub use handshake::{
    ClientFlags, ExportNameReply, Hello, Info, OptionHeader, OptionReply, OptionReplyHeader,
    OptionRequest,
};
pub use transmission::{
    emit_block_status, emit_error_chunk, emit_none, emit_offset_data_header, emit_offset_hole,
    parse_offset, BlockStatus, ChunkHeader, ChunkPayload, Command, ErrorChunk, Extent, Final,
    OffsetHole, ReplyKind, Request, SimpleReply, UnknownCommand,
};

/// What a parser did not like; the caller maps it to an error reply or to
/// closing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// the buffer is shorter than the fixed-size part
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// bad magic number
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// the peer's greeting does not start with NBDMAGIC
    #[error("no NBDMAGIC: not an NBD server")]
    NotNbd,
    /// the server speaks the oldstyle handshake
    #[error("oldstyle server: only newstyle is supported")]
    Oldstyle,
    /// the client set flags this side does not know
    #[error("unknown client flags {0:#x}")]
    UnknownFlags(u32),
    /// a message type this side does not know where it must know them all
    #[error("unknown message type {0:#x}")]
    UnknownType(u32),
    /// a length field disagrees with the data or exceeds a bound
    #[error("inconsistent length: {0}")]
    Length(&'static str),
    /// a string is longer than 4096 bytes, not UTF-8, or contains NUL
    #[error("invalid string: {0}")]
    BadString(&'static str),
}

/// A cursor over a byte slice: every take is bounds-checked, nothing panics.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        match self.buf.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.buf = tail;
                Ok(*head)
            }
            None => Err(ParseError::Truncated {
                need: N,
                have: self.buf.len(),
            }),
        }
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ParseError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ParseError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ParseError> {
        self.array().map(u64::from_be_bytes)
    }

    /// Whatever is left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Checks that a buffer holds at least the `need` bytes of a fixed-size
/// message (so a parser of one fails with the size it wanted, not a field's).
pub(crate) fn fixed(buf: &[u8], need: usize) -> Result<Reader<'_>, ParseError> {
    if buf.len() < need {
        return Err(ParseError::Truncated {
            need,
            have: buf.len(),
        });
    }
    Ok(Reader::new(buf))
}

/// [`fixed`], for a message that opens with `magic`; the reader comes back
/// past it.
pub(crate) fn with_magic<M: Field + Into<u64>>(
    buf: &[u8],
    need: usize,
    magic: M,
) -> Result<Reader<'_>, ParseError> {
    let mut r = fixed(buf, need)?;
    let got: u64 = M::read(&mut r)?.into();
    if got != magic.into() {
        return Err(ParseError::BadMagic(got));
    }
    Ok(r)
}

/// A big-endian integer field of a fixed-size header.
pub(crate) trait Field: Sized + Copy {
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError>;
    fn put<B: bytes::BufMut>(self, out: &mut B);
}

impl Field for u16 {
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u16()
    }
    fn put<B: bytes::BufMut>(self, out: &mut B) {
        out.put_u16(self)
    }
}

impl Field for u32 {
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u32()
    }
    fn put<B: bytes::BufMut>(self, out: &mut B) {
        out.put_u32(self)
    }
}

impl Field for u64 {
    fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        r.u64()
    }
    fn put<B: bytes::BufMut>(self, out: &mut B) {
        out.put_u64(self)
    }
}

#[cfg(test)]
pub(crate) mod test_util;
