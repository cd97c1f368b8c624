//! The fixed newstyle handshake: greeting, flags, options and option replies.
//!
//! Theory of operation: the server greets with [`Hello`], the client answers
//! with [`ClientFlags`], then sends options one at a time, each an
//! [`OptionHeader`] followed by `len` bytes of data that
//! [`OptionRequest::parse`] turns into a typed option; the server answers each
//! with one or more option replies ([`OptionReplyHeader`] and data, emitted from
//! a typed [`OptionReply`]) until the client picks an export (GO, or
//! EXPORT_NAME whose answer is the bare [`ExportNameReply`]) or aborts.
//!
//! Every string is checked once here (at most [`MAX_STRING`] bytes, UTF-8, no
//! NUL) and every count against the bytes that are really there, so a hostile
//! count cannot make a parser allocate or loop. Option data itself is bounded
//! by the reader ([`MAX_OPTION_DATA`]) before it reaches a parser.

use bytes::BufMut;

use crate::consts::*;
use crate::{fixed, ParseError, Reader};

fn to_str(b: &[u8]) -> Result<&str, ParseError> {
    if b.len() > MAX_STRING {
        return Err(ParseError::BadString("longer than 4096 bytes"));
    }
    if b.contains(&0) {
        return Err(ParseError::BadString("contains NUL"));
    }
    std::str::from_utf8(b).map_err(|_| ParseError::BadString("not UTF-8"))
}

/// A string whose length is a u32 prefix.
fn string32<'a>(r: &mut Reader<'a>) -> Result<&'a str, ParseError> {
    let len = r.u32()? as usize;
    if len > MAX_STRING {
        return Err(ParseError::BadString("longer than 4096 bytes"));
    }
    if len > r.remaining() {
        return Err(ParseError::Length("string length past end of option"));
    }
    to_str(r.take(len)?)
}

fn put_string32<B: BufMut>(out: &mut B, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// The server's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE`, `FLAG_NO_ZEROES`).
    pub flags: u16,
}

impl Hello {
    /// Parses the 18-byte greeting. The magics are checked as they come, so
    /// the first 8 bytes alone are enough to tell a peer that is no NBD server
    /// ([`ParseError::NotNbd`]) without waiting for more.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(buf);
        if r.u64()? != NBDMAGIC {
            return Err(ParseError::NotNbd);
        }
        if r.u64()? != IHAVEOPT {
            return Err(ParseError::Oldstyle);
        }
        Ok(Hello { flags: r.u16()? })
    }

    /// Emits the greeting ([`HELLO_LEN`] bytes).
    pub fn emit<B: BufMut>(&self, out: &mut B) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(self.flags);
    }
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The server may omit the 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Size on the wire.
    pub const LEN: usize = 4;

    /// Parses the 4 flag bytes; a flag this crate does not know is an error
    /// (the spec has the server close the connection then).
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        let flags = Reader::new(buf).u32()?;
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ParseError::UnknownFlags(flags));
        }
        Ok(ClientFlags {
            fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        })
    }

    /// Emits the 4 flag bytes.
    pub fn emit<B: BufMut>(&self, out: &mut B) {
        let mut f = 0;
        if self.fixed_newstyle {
            f |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            f |= FLAG_C_NO_ZEROES;
        }
        out.put_u32(f);
    }
}

fixed_header! {
    /// The fixed part of a client option: which option and how much data
    /// follows. The magic is `IHAVEOPT`.
    pub struct OptionHeader: OPTION_HEADER_LEN, magic IHAVEOPT;
    /// Option code.
    pub option: u32,
    /// Length of the data that follows (not bounded here: the server discards
    /// oversized data and answers NBD_REP_ERR_TOO_BIG).
    pub len: u32,
}

/// A client option, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// NBD_OPT_EXPORT_NAME.
    ExportName(String),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO or NBD_OPT_GO (`go` tells which).
    Info {
        /// True for GO.
        go: bool,
        /// Export name.
        name: String,
        /// Information types asked for.
        requests: Vec<u16>,
    },
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT.
    MetaContext {
        /// True for SET.
        set: bool,
        /// Export name.
        name: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// NBD_OPT_EXTENDED_HEADERS.
    ExtendedHeaders,
    /// Anything else (a server answers ERR_UNSUP); emitted without data.
    Unknown(u32),
}

impl OptionRequest {
    /// Parses an option's data. `Err` means the option is known but its data is
    /// malformed (a server answers NBD_REP_ERR_INVALID and carries on).
    pub fn parse(option: u32, data: &[u8]) -> Result<Self, ParseError> {
        let empty = |req: OptionRequest| {
            if data.is_empty() {
                Ok(req)
            } else {
                Err(ParseError::Length("option takes no data"))
            }
        };
        match option {
            opt::EXPORT_NAME => Ok(OptionRequest::ExportName(to_str(data)?.to_string())),
            // ABORT with data is still an abort: the client is leaving either way.
            opt::ABORT => Ok(OptionRequest::Abort),
            opt::LIST => empty(OptionRequest::List),
            opt::STARTTLS => empty(OptionRequest::StartTls),
            opt::STRUCTURED_REPLY => empty(OptionRequest::StructuredReply),
            opt::EXTENDED_HEADERS => empty(OptionRequest::ExtendedHeaders),
            opt::INFO | opt::GO => {
                let mut r = Reader::new(data);
                let name = string32(&mut r)?.to_string();
                let n = r.u16()? as usize;
                if r.remaining() != n * 2 {
                    return Err(ParseError::Length("info request count"));
                }
                let mut requests = Vec::with_capacity(n);
                for _ in 0..n {
                    requests.push(r.u16()?);
                }
                Ok(OptionRequest::Info {
                    go: option == opt::GO,
                    name,
                    requests,
                })
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let mut r = Reader::new(data);
                let name = string32(&mut r)?.to_string();
                let n = r.u32()? as usize;
                // Each query needs at least its 4-byte length: bounds the count.
                if n > r.remaining() / 4 {
                    return Err(ParseError::Length("query count"));
                }
                let mut queries = Vec::with_capacity(n);
                for _ in 0..n {
                    queries.push(string32(&mut r)?.to_string());
                }
                if r.remaining() != 0 {
                    return Err(ParseError::Length("trailing bytes after queries"));
                }
                Ok(OptionRequest::MetaContext {
                    set: option == opt::SET_META_CONTEXT,
                    name,
                    queries,
                })
            }
            other => Ok(OptionRequest::Unknown(other)),
        }
    }

    /// The option code.
    pub fn option(&self) -> u32 {
        match self {
            OptionRequest::ExportName(_) => opt::EXPORT_NAME,
            OptionRequest::Abort => opt::ABORT,
            OptionRequest::List => opt::LIST,
            OptionRequest::StartTls => opt::STARTTLS,
            OptionRequest::Info { go: true, .. } => opt::GO,
            OptionRequest::Info { go: false, .. } => opt::INFO,
            OptionRequest::StructuredReply => opt::STRUCTURED_REPLY,
            OptionRequest::MetaContext { set: true, .. } => opt::SET_META_CONTEXT,
            OptionRequest::MetaContext { set: false, .. } => opt::LIST_META_CONTEXT,
            OptionRequest::ExtendedHeaders => opt::EXTENDED_HEADERS,
            OptionRequest::Unknown(o) => *o,
        }
    }

    /// Length of the option's data.
    pub fn data_len(&self) -> usize {
        match self {
            OptionRequest::ExportName(name) => name.len(),
            OptionRequest::Info { name, requests, .. } => 4 + name.len() + 2 + 2 * requests.len(),
            OptionRequest::MetaContext { name, queries, .. } => {
                4 + name.len() + 4 + queries.iter().map(|q| 4 + q.len()).sum::<usize>()
            }
            _ => 0,
        }
    }

    /// Emits the whole option: its [`OptionHeader`] and its data.
    pub fn emit<B: BufMut>(&self, out: &mut B) {
        OptionHeader {
            option: self.option(),
            len: self.data_len() as u32,
        }
        .emit(out);
        match self {
            OptionRequest::ExportName(name) => out.put_slice(name.as_bytes()),
            OptionRequest::Info { name, requests, .. } => {
                put_string32(out, name);
                out.put_u16(requests.len() as u16);
                for r in requests {
                    out.put_u16(*r);
                }
            }
            OptionRequest::MetaContext { name, queries, .. } => {
                put_string32(out, name);
                out.put_u32(queries.len() as u32);
                for q in queries {
                    put_string32(out, q);
                }
            }
            _ => {}
        }
    }
}

fixed_header! {
    /// The fixed part of an option reply. The magic is `REPLY_MAGIC`.
    pub struct OptionReplyHeader: OPTION_REPLY_HEADER_LEN, magic REPLY_MAGIC;
    /// The option answered.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply: u32,
    /// Length of the data that follows (the client bounds it by
    /// [`MAX_OPTION_DATA`] before reading it).
    pub len: u32,
}

/// An option reply, typed; borrows its strings from the data it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// NBD_REP_ACK: success, or the end of a list.
    Ack,
    /// NBD_REP_SERVER: one export of a LIST.
    Server {
        /// Export name.
        name: &'a str,
        /// Free-form description.
        description: &'a str,
    },
    /// NBD_REP_INFO: one information item.
    Info(Info<'a>),
    /// NBD_REP_META_CONTEXT: one metadata context.
    MetaContext {
        /// The id the server gives it (0 in a LIST reply).
        id: u32,
        /// Its name.
        name: &'a str,
    },
    /// An error reply (`rep::ERR_*`) and its message, kept as bytes: a message
    /// is for people, and a bad one must not hide the error itself.
    Error {
        /// Reply type; has the [`rep::ERR`] bit.
        reply: u32,
        /// Human-readable message.
        message: &'a [u8],
    },
}

impl<'a> OptionReply<'a> {
    /// The reply type on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => rep::ACK,
            OptionReply::Server { .. } => rep::SERVER,
            OptionReply::Info(_) => rep::INFO,
            OptionReply::MetaContext { .. } => rep::META_CONTEXT,
            OptionReply::Error { reply, .. } => *reply,
        }
    }

    /// Length of the reply's data.
    pub fn data_len(&self) -> usize {
        match self {
            OptionReply::Ack => 0,
            OptionReply::Server { name, description } => 4 + name.len() + description.len(),
            OptionReply::Info(i) => i.data_len(),
            OptionReply::MetaContext { name, .. } => 4 + name.len(),
            OptionReply::Error { message, .. } => message.len(),
        }
    }

    /// Emits the whole reply to `option`: header and data.
    pub fn emit<B: BufMut>(&self, option: u32, out: &mut B) {
        OptionReplyHeader {
            option,
            reply: self.reply_type(),
            len: self.data_len() as u32,
        }
        .emit(out);
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                put_string32(out, name);
                out.put_slice(description.as_bytes());
            }
            OptionReply::Info(i) => i.emit(out),
            OptionReply::MetaContext { id, name } => {
                out.put_u32(*id);
                out.put_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => out.put_slice(message),
        }
    }

    /// Parses a reply's data, given its type.
    pub fn parse(reply: u32, data: &'a [u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(data);
        match reply {
            rep::ACK if data.is_empty() => Ok(OptionReply::Ack),
            rep::ACK => Err(ParseError::Length("ACK takes no data")),
            rep::SERVER => {
                let name = string32(&mut r)?;
                let description = to_str(r.rest())?;
                Ok(OptionReply::Server { name, description })
            }
            rep::INFO => Ok(OptionReply::Info(Info::parse(data)?)),
            rep::META_CONTEXT => {
                let id = r.u32()?;
                let name = to_str(r.rest())?;
                Ok(OptionReply::MetaContext { id, name })
            }
            e if rep::is_error(e) => Ok(OptionReply::Error {
                reply: e,
                message: data,
            }),
            other => Err(ParseError::UnknownType(other)),
        }
    }
}

/// One information item of NBD_REP_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    /// NBD_INFO_EXPORT: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`tflag::*`).
        flags: u16,
    },
    /// NBD_INFO_NAME.
    Name(&'a str),
    /// NBD_INFO_DESCRIPTION.
    Description(&'a str),
    /// NBD_INFO_BLOCK_SIZE.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// A type this crate does not know (a client ignores it); emitted as the
    /// bare type.
    Unknown(u16),
}

impl<'a> Info<'a> {
    /// The information type on the wire.
    pub fn info_type(&self) -> u16 {
        match self {
            Info::Export { .. } => info::EXPORT,
            Info::Name(_) => info::NAME,
            Info::Description(_) => info::DESCRIPTION,
            Info::BlockSize { .. } => info::BLOCK_SIZE,
            Info::Unknown(t) => *t,
        }
    }

    /// Length of the item (the reply's data), type included.
    pub fn data_len(&self) -> usize {
        2 + match self {
            Info::Export { .. } => 10,
            Info::Name(s) | Info::Description(s) => s.len(),
            Info::BlockSize { .. } => 12,
            Info::Unknown(_) => 0,
        }
    }

    /// Emits the item (the data of an NBD_REP_INFO reply).
    pub fn emit<B: BufMut>(&self, out: &mut B) {
        out.put_u16(self.info_type());
        match self {
            Info::Export { size, flags } => {
                out.put_u64(*size);
                out.put_u16(*flags);
            }
            Info::Name(s) | Info::Description(s) => out.put_slice(s.as_bytes()),
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.put_u32(*min);
                out.put_u32(*preferred);
                out.put_u32(*max);
            }
            Info::Unknown(_) => {}
        }
    }

    /// Parses the data of an NBD_REP_INFO reply. Bytes past a fixed-size
    /// item are ignored: a later revision of the protocol may extend an item,
    /// and what this crate knows of it is still right.
    pub fn parse(data: &'a [u8]) -> Result<Self, ParseError> {
        let mut r = Reader::new(data);
        Ok(match r.u16()? {
            info::EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::NAME => Info::Name(to_str(r.rest())?),
            info::DESCRIPTION => Info::Description(to_str(r.rest())?),
            info::BLOCK_SIZE => Info::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            other => Info::Unknown(other),
        })
    }
}

/// The server's answer to NBD_OPT_EXPORT_NAME: size and transmission flags,
/// then 124 zero bytes unless the client said `no_zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Leave out the 124 zero bytes (the client set `FLAG_C_NO_ZEROES`).
    pub no_zeroes: bool,
}

impl ExportNameReply {
    /// Bytes on the wire.
    pub fn buffer_len(&self) -> usize {
        if self.no_zeroes {
            10
        } else {
            134
        }
    }

    /// Emits the reply.
    pub fn emit<B: BufMut>(&self, out: &mut B) {
        out.put_u64(self.size);
        out.put_u16(self.flags);
        if !self.no_zeroes {
            out.put_bytes(0, 124);
        }
    }

    /// Parses the reply; `no_zeroes` says whether the client asked for the
    /// short form, which decides how many bytes it must hold.
    pub fn parse(buf: &[u8], no_zeroes: bool) -> Result<Self, ParseError> {
        let need = if no_zeroes { 10 } else { 134 };
        let mut r = fixed(buf, need)?;
        Ok(ExportNameReply {
            size: r.u64()?,
            flags: r.u16()?,
            no_zeroes,
        })
    }
}

#[cfg(test)]
mod tests;
