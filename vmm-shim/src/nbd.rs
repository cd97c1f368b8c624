//! A blocking NBD client: fixed newstyle handshake, `OPT_STRUCTURED_REPLY`, `OPT_GO`,
//! and pipelined transmission (several requests in flight per batch).
//!
//! Theory of operation: the virtio-blk device hands a batch of requests to
//! [`NbdClient::submit`]; they are all written to the socket (each with a unique cookie)
//! and then replies are read until every cookie is answered, in whatever order the server
//! answers. Replies may be simple or structured (`OFFSET_DATA`, `OFFSET_HOLE`, `ERROR`,
//! `ERROR_OFFSET`, `NONE`), and a read's data is assembled from its chunks, which must
//! cover every byte of the request exactly once: overlapping chunks are a protocol
//! violation, and a successful reply that leaves bytes out is an I/O error for that
//! request (counted in [`NbdClient::short_reads`]), never zeros. To rule out a
//! deadlock (both sides blocked writing large payloads), a batch never mixes requests
//! that carry data (writes) with requests whose replies carry data (reads): a batch is
//! all-writes-and-small, or all-reads-and-small. Every length the server sends is bounded
//! ([`MAX_PAYLOAD`]) and checked against the request it answers; a protocol violation
//! fails the connection ([`NbdError::Protocol`]), which the device reports to the guest as
//! I/O errors. A per-request NBD error (EIO, ENOSPC, EPERM...) fails only that request.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nbd_proto::{
    err, info, opt, rep, ChunkHeader, ChunkPayload, ClientFlags, Command, ErrorChunk, Hello, Info,
    OffsetHole, OptionReplyHeader, OptionRequest, ParseError, ReplyKind, SimpleReply,
    CHUNK_HEADER_LEN, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, HELLO_LEN, MAX_OPTION_DATA,
    OPTION_REPLY_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};

use openssl::ssl::SslStream;

use crate::config::{DiskSpec, NbdAddr};

/// Transmission flags the block device looks at.
pub use nbd_proto::tflag::{
    READ_ONLY as TFLAG_READ_ONLY, SEND_FLUSH as TFLAG_SEND_FLUSH, SEND_TRIM as TFLAG_SEND_TRIM,
    SEND_WRITE_ZEROES as TFLAG_SEND_WRITE_ZEROES,
};
/// Largest payload of one request or reply chunk (requests are split to fit).
pub use nbd_proto::MAX_PAYLOAD;

/// How long one read or write on the connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one TCP connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest number of requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// Most chunks without read content (NONE, errors, unknown types) per request.
const MAX_OTHER_CHUNKS: u32 = 16;
/// Most replies accepted to one NBD_OPT_GO (a handful of NBD_REP_INFO, then the ACK).
const MAX_GO_REPLIES: u32 = 64;

/// An NBD client error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// could not connect to the NBD server
    #[error("could not connect to NBD server {addr}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// the connection failed
    #[error("NBD connection I/O failed")]
    Io(#[from] io::Error),
    /// the server broke the protocol
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// the server refused the export
    #[error("NBD server refused export {export:?}: {message}")]
    Refused {
        /// Export name.
        export: String,
        /// The server's reason.
        message: String,
    },
    /// TLS could not be set up (refused STARTTLS, failed handshake or verification)
    #[error("NBD TLS: {0}")]
    Tls(String),
    /// the connection is already failed
    #[error("NBD connection is down after an earlier error")]
    Down,
}

/// One block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload.
        data: Vec<u8>,
    },
    /// Flush.
    Flush,
    /// Discard a range.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write zeroes to a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Whether the server may punch a hole.
        may_trim: bool,
    },
}

impl Request {
    fn carries_data(&self) -> bool {
        matches!(self, Request::Write { .. })
    }
    fn returns_data(&self) -> bool {
        matches!(self, Request::Read { .. })
    }
}

/// The outcome of one request: read data, or unit; `Err(errno)` for a server error.
pub type Outcome = Result<Vec<u8>, u32>;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsTcp(Box<SslStream<TcpStream>>),
    TlsUnix(Box<SslStream<UnixStream>>),
    /// Only while the plain socket is being upgraded to TLS.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::TlsTcp(s) => s.read(buf),
            Stream::TlsUnix(s) => s.read(buf),
            Stream::Gone => Err(gone()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::TlsTcp(s) => s.write(buf),
            Stream::TlsUnix(s) => s.write(buf),
            Stream::Gone => Err(gone()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::TlsTcp(s) => s.flush(),
            Stream::TlsUnix(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

impl Stream {
    /// The socket under any TLS.
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let (tcp, unix) = match self {
            Stream::Tcp(s) => (Some(s), None),
            Stream::TlsTcp(s) => (Some(s.get_ref()), None),
            Stream::Unix(s) => (None, Some(s)),
            Stream::TlsUnix(s) => (None, Some(s.get_ref())),
            Stream::Gone => return Err(gone()),
        };
        if let Some(s) = tcp {
            s.set_read_timeout(t)?;
            s.set_write_timeout(t)?;
        }
        if let Some(s) = unix {
            s.set_read_timeout(t)?;
            s.set_write_timeout(t)?;
        }
        Ok(())
    }

    /// Sends TLS close_notify if there is TLS, then shuts the socket down.
    fn shutdown(&mut self) -> io::Result<()> {
        use std::net::Shutdown::Both;
        match self {
            Stream::Tcp(s) => s.shutdown(Both),
            Stream::Unix(s) => s.shutdown(Both),
            Stream::TlsTcp(s) => {
                // GnuTLS servers (nbdkit, qemu-nbd) log an error without it.
                let _ = s.shutdown();
                s.get_ref().shutdown(Both)
            }
            Stream::TlsUnix(s) => {
                let _ = s.shutdown();
                s.get_ref().shutdown(Both)
            }
            Stream::Gone => Ok(()),
        }
    }
}

/// A connected, negotiated NBD client.
pub struct NbdClient {
    stream: io::BufReader<Stream>,
    size: u64,
    flags: u16,
    structured: bool,
    next_cookie: u64,
    down: bool,
    short_reads: u64,
}

fn rd<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}
fn rd_vec(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}
fn proto(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}
fn parse_err(e: ParseError) -> NbdError {
    NbdError::Protocol(e.to_string())
}

impl NbdClient {
    /// Connects and negotiates the export (no TLS).
    pub fn connect(addr: &NbdAddr, export: &str) -> Result<Self, NbdError> {
        Self::connect_tls(addr, export, None)
    }

    /// Connects, upgrades to TLS with `tls` (refusing a server that will not), and
    /// negotiates the export.
    pub fn connect_tls(
        addr: &NbdAddr,
        export: &str,
        tls: Option<&TlsCreds>,
    ) -> Result<Self, NbdError> {
        let stream = match addr {
            NbdAddr::Tcp(h, p) => {
                let s = connect_tcp(h, *p).map_err(|source| NbdError::Connect {
                    addr: format!("{h}:{p}"),
                    source,
                })?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            NbdAddr::Unix(p) => {
                Stream::Unix(UnixStream::connect(p).map_err(|source| NbdError::Connect {
                    addr: p.display().to_string(),
                    source,
                })?)
            }
        };
        let mut c = NbdClient {
            stream: io::BufReader::with_capacity(256 << 10, stream),
            size: 0,
            flags: 0,
            structured: false,
            next_cookie: 1,
            down: false,
            short_reads: 0,
        };
        c.set_timeout(Some(Duration::from_secs(30)))?;
        let host = match addr {
            NbdAddr::Tcp(h, _) => h.as_str(),
            NbdAddr::Unix(_) => "localhost",
        };
        c.handshake(export, tls.map(|t| (t, host)))?;
        Ok(c)
    }

    /// Connects to a disk's server and export, with TLS if the disk has credentials.
    pub fn connect_spec(spec: &DiskSpec) -> Result<Self, NbdError> {
        Self::connect_tls(&spec.addr, &spec.export, spec.tls.as_ref())
    }

    fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.stream.get_ref().set_timeout(t)
    }

    fn w(&mut self) -> &mut Stream {
        self.stream.get_mut()
    }

    fn handshake(&mut self, export: &str, tls: Option<(&TlsCreds, &str)>) -> Result<(), NbdError> {
        let mut hello = [0u8; HELLO_LEN];
        let (magic, rest) = hello.split_at_mut(8);
        self.stream.read_exact(magic)?;
        // The first magic alone tells a peer that is no NBD server: say so
        // without waiting for bytes it may never send.
        if let Err(e @ ParseError::NotNbd) = Hello::parse(magic) {
            return Err(parse_err(e));
        }
        self.stream.read_exact(rest)?;
        let sflags = Hello::parse(&hello).map_err(parse_err)?.flags;
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("server is not fixed-newstyle"));
        }
        let mut cflags = Vec::with_capacity(ClientFlags::LEN);
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: sflags & FLAG_NO_ZEROES != 0,
        }
        .emit(&mut cflags);
        self.w().write_all(&cflags)?;
        if let Some((creds, host)) = tls {
            self.start_tls(creds, host)?;
        }

        // Structured replies: optional; a refusal means simple replies.
        self.send_option(&OptionRequest::StructuredReply)?;
        let (ty, _) = self.read_option_reply(opt::STRUCTURED_REPLY)?;
        self.structured = ty == rep::ACK;
        if ty != rep::ACK && !rep::is_error(ty) {
            return Err(proto(format!("unexpected reply {ty} to STRUCTURED_REPLY")));
        }

        self.send_option(&OptionRequest::Info {
            go: true,
            name: export.to_string(),
            requests: Vec::new(),
        })?;
        let mut got_export = false;
        // A server may send several NBD_REP_INFO before the ACK, but not an endless
        // stream of them: that would keep the VMM in its handshake for ever.
        let mut replies = 0;
        loop {
            replies += 1;
            if replies > MAX_GO_REPLIES {
                return Err(proto(format!("more than {MAX_GO_REPLIES} replies to GO")));
            }
            let (ty, data) = self.read_option_reply(opt::GO)?;
            match ty {
                rep::ACK => break,
                // Only NBD_INFO_EXPORT matters here; other items are skipped,
                // whatever they hold.
                rep::INFO => match Info::parse(&data) {
                    Ok(Info::Export { size, flags }) => {
                        self.size = size;
                        self.flags = flags;
                        got_export = true;
                    }
                    Err(_) if data.starts_with(&info::EXPORT.to_be_bytes()) => {
                        return Err(proto("short NBD_INFO_EXPORT"))
                    }
                    _ => {}
                },
                t if rep::is_error(t) => {
                    return Err(NbdError::Refused {
                        export: export.to_string(),
                        message: format!(
                            "error {:#x}: {}",
                            t,
                            String::from_utf8_lossy(&data)
                                .chars()
                                .take(200)
                                .collect::<String>()
                        ),
                    })
                }
                t => return Err(proto(format!("unexpected reply {t} to GO"))),
            }
        }
        if !got_export {
            return Err(proto("GO acknowledged without NBD_INFO_EXPORT"));
        }
        // A server that stops answering fails the connection (the guest sees I/O
        // errors) instead of wedging the vCPU that waits for it.
        self.set_timeout(Some(IO_TIMEOUT))?;
        Ok(())
    }

    /// NBD_OPT_STARTTLS, then TLS on the socket: any reply but ACK fails the
    /// connection, so nothing after the flags ever goes out in clear.
    fn start_tls(&mut self, creds: &TlsCreds, host: &str) -> Result<(), NbdError> {
        self.send_option(&OptionRequest::StartTls)?;
        let (ty, data) = self.read_option_reply(opt::STARTTLS)?;
        if ty != rep::ACK {
            return Err(NbdError::Tls(format!(
                "server refused STARTTLS (reply {ty:#x}: {})",
                String::from_utf8_lossy(&data)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        }
        // The server sends nothing after the ACK before the client's hello; bytes
        // already buffered would be an injection in clear.
        if !self.stream.buffer().is_empty() {
            return Err(proto("data after the STARTTLS reply"));
        }
        let plain = std::mem::replace(
            &mut self.stream,
            io::BufReader::with_capacity(0, Stream::Gone),
        )
        .into_inner();
        let tls_err = |e: io::Error| NbdError::Tls(e.to_string());
        let upgraded = match plain {
            Stream::Tcp(s) => {
                Stream::TlsTcp(Box::new(tls::handshake(creds, host, s).map_err(tls_err)?))
            }
            Stream::Unix(s) => {
                Stream::TlsUnix(Box::new(tls::handshake(creds, host, s).map_err(tls_err)?))
            }
            _ => return Err(proto("STARTTLS on a TLS connection")),
        };
        self.stream = io::BufReader::with_capacity(256 << 10, upgraded);
        Ok(())
    }

    fn send_option(&mut self, o: &OptionRequest) -> io::Result<()> {
        let mut b = Vec::with_capacity(nbd_proto::OPTION_HEADER_LEN + o.data_len());
        o.emit(&mut b);
        self.w().write_all(&b)
    }

    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let r = &mut self.stream;
        let h = OptionReplyHeader::parse(&rd::<OPTION_REPLY_HEADER_LEN>(r)?)
            .map_err(|_| proto("bad option reply magic"))?;
        if h.option != option {
            return Err(proto("option reply for another option"));
        }
        if h.len > MAX_OPTION_DATA {
            return Err(proto(format!("option reply of {} bytes", h.len)));
        }
        Ok((h.reply, rd_vec(r, h.len)?))
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// READ replies that did not cover their request (answered as I/O errors).
    pub fn short_reads(&self) -> u64 {
        self.short_reads
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Runs requests, pipelined; one outcome per request, in order.
    ///
    /// An `Err` return means the connection failed (all requests are lost and every
    /// later call fails with [`NbdError::Down`]).
    pub fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        if self.down {
            return Err(NbdError::Down);
        }
        let res = self.submit_inner(reqs);
        if res.is_err() {
            self.down = true;
        }
        res
    }

    fn submit_inner(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        let mut out: Vec<Outcome> = Vec::with_capacity(reqs.len());
        let mut i = 0;
        while i < reqs.len() {
            // One batch: up to MAX_IN_FLIGHT requests, never mixing writes with reads;
            // a FLUSH goes alone, since it only covers writes already answered.
            let (mut has_w, mut has_r) = (false, false);
            let mut j = i;
            while j < reqs.len() && j - i < MAX_IN_FLIGHT {
                let r = &reqs[j];
                if (r.carries_data() && has_r)
                    || (r.returns_data() && has_w)
                    || (j > i && (*r == Request::Flush || reqs[i] == Request::Flush))
                {
                    break;
                }
                has_w |= r.carries_data();
                has_r |= r.returns_data();
                j += 1;
            }
            out.extend(self.batch(&reqs[i..j])?);
            i = j;
        }
        Ok(out)
    }

    fn batch(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        let base = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(reqs.len() as u64);
        let mut buf = Vec::new();
        for (k, r) in reqs.iter().enumerate() {
            let (cmd, flags, offset, len, data): (Command, u16, u64, u32, &[u8]) = match r {
                Request::Read { offset, len } => (Command::Read, 0, *offset, *len, &[]),
                Request::Write { offset, data } => (
                    Command::Write,
                    0,
                    *offset,
                    data.len() as u32,
                    data.as_slice(),
                ),
                Request::Flush => (Command::Flush, 0, 0, 0, &[]),
                Request::Trim { offset, len } => (Command::Trim, 0, *offset, *len, &[]),
                Request::WriteZeroes {
                    offset,
                    len,
                    may_trim,
                } => (
                    Command::WriteZeroes,
                    if *may_trim {
                        0
                    } else {
                        nbd_proto::cflag::NO_HOLE
                    },
                    *offset,
                    *len,
                    &[],
                ),
            };
            let cookie = base.wrapping_add(k as u64);
            nbd_proto::Request::new(cmd, flags, cookie, offset, len).emit(&mut buf);
            buf.extend_from_slice(data);
        }
        self.w().write_all(&buf)?;

        let mut out: Vec<Option<Outcome>> = vec![None; reqs.len()];
        // Read buffers for reads being assembled from structured chunks.
        let mut partial: Vec<Option<Vec<u8>>> = reqs
            .iter()
            .map(|r| match r {
                Request::Read { len, .. } => Some(vec![0u8; *len as usize]),
                _ => None,
            })
            .collect();
        let mut errs: Vec<Option<u32>> = vec![None; reqs.len()];
        // What a request's chunks have covered so far, and how many chunks without
        // content it got: a live server streaming chunks without end (overlapping
        // ones, empty ones, NONE or unknown ones, never DONE) must fail the
        // connection, not hold the vCPU for ever.
        let mut covered: Vec<u64> = vec![0; reqs.len()];
        let mut other_chunks: Vec<u32> = vec![0; reqs.len()];
        // The byte ranges (relative to the request) each read's chunks covered.
        let mut seen: Vec<BTreeMap<u64, u64>> = vec![BTreeMap::new(); reqs.len()];
        let mut pending = reqs.len();
        while pending > 0 {
            let r = &mut self.stream;
            let mut hdr = [0u8; CHUNK_HEADER_LEN];
            r.read_exact(&mut hdr[..4])?;
            let kind = match ReplyKind::parse(&hdr) {
                Ok(ReplyKind::Structured) if !self.structured => {
                    return Err(proto(format!(
                        "bad reply magic {STRUCTURED_REPLY_MAGIC:#x}"
                    )))
                }
                Ok(kind) => kind,
                Err(ParseError::BadMagic(m)) => {
                    return Err(proto(format!("bad reply magic {m:#x}")))
                }
                Err(e) => return Err(parse_err(e)),
            };
            // The header is at most CHUNK_HEADER_LEN long, whatever its kind.
            r.read_exact(&mut hdr[4..kind.header_len()])?;
            match kind {
                ReplyKind::Simple => {
                    let reply = SimpleReply::parse(&hdr).map_err(parse_err)?;
                    let k = slot(reply.handle, base, reqs.len())?;
                    if out[k].is_some() {
                        return Err(proto("second reply to one request"));
                    }
                    let res = match (&reqs[k], reply.error) {
                        (Request::Read { len, .. }, 0) => Ok(rd_vec(r, *len)?),
                        (_, 0) => Ok(Vec::new()),
                        (_, e) => Err(e),
                    };
                    out[k] = Some(res);
                    pending -= 1;
                }
                ReplyKind::Structured => {
                    let h = ChunkHeader::parse(&hdr).map_err(parse_err)?;
                    let len = h.len;
                    let k = slot(h.handle, base, reqs.len())?;
                    if out[k].is_some() {
                        return Err(proto("chunk after the final reply"));
                    }
                    // Checks the length against the type and MAX_PAYLOAD.
                    let payload = h.payload().map_err(parse_err)?;
                    if !matches!(
                        payload,
                        ChunkPayload::OffsetData { .. } | ChunkPayload::OffsetHole
                    ) {
                        other_chunks[k] += 1;
                        if other_chunks[k] > MAX_OTHER_CHUNKS {
                            return Err(proto("too many chunks for one request"));
                        }
                    }
                    match payload {
                        ChunkPayload::None => {}
                        ChunkPayload::OffsetData { .. } | ChunkPayload::OffsetHole => {
                            let Request::Read { offset, len: rlen } = reqs[k] else {
                                return Err(proto("data chunk for a non-read"));
                            };
                            let (off, n) = match payload {
                                ChunkPayload::OffsetData { data_len } => {
                                    let off =
                                        nbd_proto::parse_offset(&rd::<8>(r)?).map_err(parse_err)?;
                                    (off, data_len)
                                }
                                _ => {
                                    let hole =
                                        OffsetHole::parse(&rd::<12>(r)?).map_err(parse_err)?;
                                    (hole.offset, hole.len)
                                }
                            };
                            if n == 0 {
                                // Covers nothing, so nothing bounds how many come.
                                other_chunks[k] += 1;
                                if other_chunks[k] > MAX_OTHER_CHUNKS {
                                    return Err(proto("too many chunks for one request"));
                                }
                            }
                            covered[k] += u64::from(n);
                            if covered[k] > u64::from(rlen) {
                                return Err(proto("chunks cover more than the request"));
                            }
                            // Every sum is checked: a lying server can send any offset
                            // and length, and must get a protocol error, not an overflow.
                            let b = off
                                .checked_sub(offset)
                                .and_then(|s| Some((s, s.checked_add(u64::from(n))?)))
                                .filter(|&(_, e)| e <= u64::from(rlen))
                                .and_then(|(s, e)| {
                                    let (s, e) =
                                        (usize::try_from(s).ok()?, usize::try_from(e).ok()?);
                                    partial[k].as_mut()?.get_mut(s..e)
                                })
                                .ok_or_else(|| proto("chunk outside the request"))?;
                            // Every byte once: with the sum bounded by the request, no
                            // overlap and a sum equal to the length at DONE mean the
                            // chunks tile the request exactly.
                            let s = off - offset;
                            if n > 0 && !claim(&mut seen[k], s, s + u64::from(n)) {
                                return Err(proto("chunks overlap"));
                            }
                            if matches!(payload, ChunkPayload::OffsetData { .. }) {
                                r.read_exact(b)?;
                            } else {
                                b.fill(0);
                            }
                        }
                        ChunkPayload::Error => {
                            let body = rd_vec(r, len)?;
                            let e = ErrorChunk::parse(&body).map_err(parse_err)?.error;
                            errs[k] = Some(if e == 0 { err::EIO } else { e });
                        }
                        ChunkPayload::BlockStatus | ChunkPayload::Other { .. } => {
                            // Types this client does not use are skipped (their
                            // length is bounded); an unknown error type fails the
                            // request.
                            if let ChunkPayload::Other { error: true } = payload {
                                errs[k] = Some(err::EIO);
                            }
                            rd_vec(r, len)?;
                        }
                    }
                    if h.is_final() {
                        // A successful read whose chunks left bytes out would hand
                        // the guest zeros it never wrote: an I/O error instead.
                        if let (None, Request::Read { len: rlen, .. }) = (errs[k], &reqs[k]) {
                            if covered[k] != u64::from(*rlen) {
                                self.short_reads += 1;
                                tracing::warn!(
                                    want = rlen,
                                    got = covered[k],
                                    "NBD server answered a READ short"
                                );
                                errs[k] = Some(err::EIO);
                            }
                        }
                        out[k] = Some(match errs[k] {
                            Some(e) => Err(e),
                            None => Ok(partial[k].take().unwrap_or_default()),
                        });
                        pending -= 1;
                    }
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or(Err(err::EIO)))
            .collect())
    }

    /// Flushes (if the server supports it) and sends NBD_CMD_DISC.
    pub fn close(&mut self) -> Result<(), NbdError> {
        if self.down {
            return Err(NbdError::Down);
        }
        if self.flags & TFLAG_SEND_FLUSH != 0 && !self.read_only() {
            if let Some(Err(e)) = self.submit(&[Request::Flush])?.pop() {
                tracing::warn!(errno = e, "final NBD flush failed");
            }
        }
        let mut b = Vec::with_capacity(nbd_proto::REQUEST_LEN);
        nbd_proto::Request::new(Command::Disc, 0, self.next_cookie, 0, 0).emit(&mut b);
        self.w().write_all(&b)?;
        self.down = true;
        self.stream.get_mut().shutdown()?;
        Ok(())
    }
}

/// Connects to `host:port`, each resolved address in turn, giving each
/// [`CONNECT_TIMEOUT`] (a host that drops SYNs must not hold a reconnecting disk for
/// the kernel's two minutes).
fn connect_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
    for a in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Records `start..end` in `ranges` (disjoint, keyed by start) unless it overlaps one
/// already there; returns whether it was recorded.
fn claim(ranges: &mut BTreeMap<u64, u64>, start: u64, end: u64) -> bool {
    // The ranges are disjoint, so the one starting last before `end` also ends last
    // of those: it alone can overlap.
    if let Some((_, &e)) = ranges.range(..end).next_back() {
        if e > start {
            return false;
        }
    }
    ranges.insert(start, end);
    true
}

fn slot(cookie: u64, base: u64, n: usize) -> Result<usize, NbdError> {
    let k = cookie.wrapping_sub(base);
    if k < n as u64 {
        Ok(k as usize)
    } else {
        Err(proto(format!("reply for unknown cookie {cookie}")))
    }
}

mod session;
pub mod tls;
pub use session::{NbdSession, SessionStats};
pub use tls::TlsCreds;

#[cfg(test)]
mod tests;
