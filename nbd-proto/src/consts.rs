//! Every number of the NBD protocol this workspace speaks, in one place.
//!
//! The values follow `doc/proto.md` of the NetworkBlockDevice project. Command
//! numbers are not here: they are the discriminants of
//! [`Command`](crate::Command), so a command is always a checked value.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success / end of a list.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One information item of INFO / GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// The bit every error reply type has.
    pub const ERR: u32 = 1 << 31;
    /// Option not known.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically invalid.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// TLS first: the server requires STARTTLS before this option (or for
    /// this export).
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = ERR + 9;

    /// Whether a reply type is an error (the client's option failed).
    pub fn is_error(reply: u32) -> bool {
        reply & ERR != 0
    }
}

/// Information types of NBD_REP_INFO.
pub mod info {
    /// Size and transmission flags (always sent).
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF on READ supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Safe to use several connections: flush/FUA visible across all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO on WRITE_ZEROES supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail with ENOTSUP unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Flag: last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
    /// The bit every error chunk type has.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error.
    pub const ERROR: u16 = ERROR_BIT + 1;
    /// Error at an offset (the offset follows the message).
    pub const ERROR_OFFSET: u16 = ERROR_BIT + 2;
}

/// NBD error values (the wire numbers, not the host's errno).
pub mod err {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// The one metadata context this workspace knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id a server gives `base:allocation` in SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, query) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Largest READ / WRITE payload either side sends or accepts in one request or
/// reply chunk (the server also advertises it as its maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option data (client) or option reply data (server) either side
/// buffers: names are at most 4 KiB, plus a few queries or information items.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Size of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const HELLO_LEN: usize = 18;
/// Size of the client's option header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
