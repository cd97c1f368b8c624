//! One NBD connection: fixed newstyle option haggling, then the transmission
//! phase.
//!
//! Theory of operation. The handshake runs on tokio, sequentially on the raw
//! stream (small messages, one option at a time, with an overall timeout so an
//! idle peer cannot hold a connection slot forever).
//!
//! Once an export is chosen, the socket is turned into a blocking std socket and
//! served by [`WORKERS`] threads, the way nbdkit does it: each worker takes the
//! read lock, reads one whole request (header and WRITE payload, at most
//! [`wire::MAX_PAYLOAD`]), releases the lock, validates and executes the request
//! (pread / pwrite / fdatasync / fallocate on the disk file) and writes the reply
//! under the write lock with one vectored write. So requests run concurrently,
//! replies go out in completion order, and at queue depth 1 the thread woken by
//! the request is the one that answers it: no hand-off between threads on the
//! hot path.
//!
//! Bounds: at most [`WORKERS`] requests in flight per connection, and a global
//! [`Budget`] of payload bytes across all connections. An invalid request gets
//! an NBD error reply, never a dropped connection (an oversized WRITE payload is
//! read and discarded); only broken framing (bad magic) ends the connection, as
//! the spec allows.
//!
//! Durability: FLUSH and FUA call `fdatasync` on the disk file shared by all
//! connections, so they cover every write any connection had completed.
//!
//! Shutdown: the reader polls the server's shutdown flag while idle (read
//! timeout). Once it is set, requests arriving during a short grace period are
//! answered `ESHUTDOWN` (the client learns why and disconnects cleanly),
//! requests already executing complete and are answered, the disk is flushed,
//! then the connection closes.

use std::io::{BufReader, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::Alloc;
use crate::disk::{Attachment, Disk};
use crate::wire::{
    self, cflag, cmd, err, info, opt, rep, tflag, OptionHeader, OptionRequest, Request,
};

/// Longest a client may take to finish option haggling.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Options accepted on one connection before it is treated as abuse.
const MAX_OPTIONS: usize = 1024;
/// Payload bytes all requests in flight may hold together (WRITE payloads
/// read, READ data produced), across all connections.
pub const PAYLOAD_BUDGET: u64 = 512 * 1024 * 1024;
/// How long a connection keeps answering ESHUTDOWN after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;
/// Most content chunks in one structured READ reply.
const MAX_READ_CHUNKS: usize = 64;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
const PREFERRED_BLOCK: u32 = 4096;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// socket I/O failed
    #[error("socket I/O failed")]
    Io(#[from] std::io::Error),
    /// the peer broke the protocol
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    /// the handshake took too long
    #[error("the handshake took longer than {0:?}")]
    HandshakeTimeout(Duration),
    /// the client asked for export `{0}`, which does not exist
    #[error("the client asked for export `{0}` with NBD_OPT_EXPORT_NAME, which does not exist")]
    UnknownExport(String),
}

/// Counters shared by all connections (reported by the control API).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused over the limit.
    pub refused: AtomicU64,
    /// Requests answered with an error because they were invalid.
    pub invalid_requests: AtomicU64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
}

/// What every connection needs from the server.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The disks.
    pub catalog: Arc<Catalog>,
    /// What the empty export name means.
    pub default_export: Option<String>,
    /// Fires (true) when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Bound on payload bytes in flight, all connections together.
    pub budget: Arc<Budget>,
}

impl Ctx {
    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Maps the requested export name to a disk name: the empty name means the
    /// configured default export, or the only disk if there is just one.
    fn resolve(&self, name: &str) -> Option<String> {
        if !name.is_empty() {
            return self.catalog.get(name).map(|d| d.name().to_string());
        }
        if let Some(d) = &self.default_export {
            return self.catalog.get(d).map(|d| d.name().to_string());
        }
        let disks = self.catalog.disks();
        match disks.as_slice() {
            [only] => Some(only.name().to_string()),
            _ => None,
        }
    }
}

/// The transmission flags of an export.
fn export_flags(disk: &Disk, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN | tflag::SEND_CACHE;
    if disk.read_only() {
        f |= tflag::READ_ONLY;
    } else {
        f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}

/// What the handshake agreed on.
struct Session {
    att: Attachment,
    size: u64,
    structured: bool,
    base_allocation: bool,
}

impl Session {
    fn disk(&self) -> &Disk {
        self.att.disk()
    }
}

async fn send_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(20 + data.len());
    wire::emit_option_reply(&mut out, option, reply, data);
    wr.write_all(&out).await?;
    wr.flush().await
}

/// Reads and throws away `n` bytes (an oversized option's data).
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Option haggling. `Ok(None)`: the client aborted (or the server is shutting
/// down while the client idles in negotiation).
async fn handshake<R, W>(ctx: &Ctx, rd: &mut R, wr: &mut W) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(wire::NBDMAGIC);
    hello.put_u64(wire::IHAVEOPT);
    hello.put_u16(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
    wr.write_all(&hello).await?;
    wr.flush().await?;

    let cflags = rd.read_u32().await?;
    if cflags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let no_zeroes = cflags & wire::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // SET_META_CONTEXT's outcome: (export name, base:allocation selected).
    let mut meta: Option<(String, bool)> = None;
    let mut shutdown = ctx.shutdown.clone();

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; wire::OPTION_HEADER_LEN];
        tokio::select! {
            r = rd.read_exact(&mut hdr) => { r?; }
            _ = crate::until_shutdown(&mut shutdown) => return Ok(None),
        }
        let h = OptionHeader::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if h.len > wire::MAX_OPTION_DATA {
            if h.option == opt::EXPORT_NAME {
                return Err(ConnError::Protocol(
                    "EXPORT_NAME longer than any export name".into(),
                ));
            }
            discard(rd, h.len as u64).await?;
            send_reply(wr, h.option, rep::ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        rd.read_exact(&mut data).await?;

        if ctx.shutting_down() && h.option != opt::ABORT {
            if h.option == opt::EXPORT_NAME {
                return Ok(None);
            }
            send_reply(wr, h.option, rep::ERR_SHUTDOWN, b"server is shutting down").await?;
            continue;
        }

        let req = match OptionRequest::parse(h.option, &data) {
            Ok(r) => r,
            Err(e) => {
                if h.option == opt::EXPORT_NAME {
                    return Err(ConnError::Protocol(format!("bad EXPORT_NAME: {e}")));
                }
                send_reply(wr, h.option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                continue;
            }
        };

        match req {
            OptionRequest::Abort => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_reply(wr, h.option, rep::ACK, &[]).await;
                return Ok(None);
            }
            OptionRequest::List => {
                let mut out = BytesMut::new();
                for d in ctx.catalog.disks() {
                    let data = wire::server_reply_data(d.name(), &d.description());
                    wire::emit_option_reply(&mut out, h.option, rep::SERVER, &data);
                }
                wire::emit_option_reply(&mut out, h.option, rep::ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
            }
            OptionRequest::StartTls => {
                send_reply(
                    wr,
                    h.option,
                    rep::ERR_UNSUP,
                    b"TLS is not supported by this server",
                )
                .await?;
            }
            OptionRequest::ExtendedHeaders => {
                send_reply(
                    wr,
                    h.option,
                    rep::ERR_UNSUP,
                    b"extended headers are not supported",
                )
                .await?;
            }
            OptionRequest::Unknown(o) => {
                let msg = format!("option {o} is not supported");
                send_reply(wr, h.option, rep::ERR_UNSUP, msg.as_bytes()).await?;
            }
            OptionRequest::StructuredReply => {
                structured = true;
                send_reply(wr, h.option, rep::ACK, &[]).await?;
            }
            OptionRequest::MetaContext { set, name, queries } => {
                if !structured {
                    send_reply(
                        wr,
                        h.option,
                        rep::ERR_INVALID,
                        b"negotiate structured replies before metadata contexts",
                    )
                    .await?;
                    continue;
                }
                let Some(export) = ctx.resolve(&name) else {
                    let msg = format!("no export named `{name}`");
                    send_reply(wr, h.option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let matched = if set {
                    queries.iter().any(|q| q == wire::BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == wire::BASE_ALLOCATION || q == "base:")
                };
                let mut out = BytesMut::new();
                if matched {
                    let id = if set { wire::BASE_ALLOCATION_ID } else { 0 };
                    let data = wire::meta_context_data(id, wire::BASE_ALLOCATION);
                    wire::emit_option_reply(&mut out, h.option, rep::META_CONTEXT, &data);
                }
                wire::emit_option_reply(&mut out, h.option, rep::ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
                if set {
                    meta = Some((export, matched));
                }
            }
            OptionRequest::Info { go, name, requests } => {
                let Some(export) = ctx.resolve(&name) else {
                    let msg = format!("no export named `{name}`");
                    send_reply(wr, h.option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let Some(att) = ctx.catalog.attach(&export) else {
                    send_reply(wr, h.option, rep::ERR_UNKNOWN, b"export vanished").await?;
                    continue;
                };
                let disk = att.disk().clone();
                let size = disk.size();
                let flags = export_flags(&disk, structured);
                let mut out = BytesMut::new();
                wire::emit_option_reply(
                    &mut out,
                    h.option,
                    rep::INFO,
                    &wire::info_export_data(size, flags),
                );
                for r in requests {
                    let data = match r {
                        info::NAME => wire::info_string_data(info::NAME, disk.name()),
                        info::DESCRIPTION => {
                            wire::info_string_data(info::DESCRIPTION, &disk.description())
                        }
                        _ => continue,
                    };
                    wire::emit_option_reply(&mut out, h.option, rep::INFO, &data);
                }
                // Sent unasked too: the constraints hold for every client.
                let bs = wire::info_block_size_data(1, PREFERRED_BLOCK, wire::MAX_PAYLOAD);
                wire::emit_option_reply(&mut out, h.option, rep::INFO, &bs);
                wire::emit_option_reply(&mut out, h.option, rep::ACK, &[]);
                wr.write_all(&out).await?;
                wr.flush().await?;
                if go {
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == export);
                    return Ok(Some(Session {
                        att,
                        size,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OptionRequest::ExportName(name) => {
                let att = ctx
                    .resolve(&name)
                    .and_then(|e| ctx.catalog.attach(&e))
                    .ok_or_else(|| ConnError::UnknownExport(name.clone()))?;
                let disk = att.disk().clone();
                let size = disk.size();
                let mut out = BytesMut::with_capacity(134);
                out.put_u64(size);
                out.put_u16(export_flags(&disk, structured));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                let base_allocation = matches!(&meta, Some((n, true)) if *n == disk.name());
                return Ok(Some(Session {
                    att,
                    size,
                    structured,
                    base_allocation,
                }));
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

/// A finished reply: segments to write back to back.
type Reply = Vec<Bytes>;

fn simple(handle: u64, error: u32) -> Reply {
    let mut b = BytesMut::with_capacity(16);
    wire::emit_simple_reply(&mut b, error, handle);
    vec![b.freeze()]
}

fn error_reply(sess: &Session, handle: u64, error: u32, msg: &str) -> Reply {
    if sess.structured {
        let mut b = BytesMut::with_capacity(32 + msg.len());
        wire::emit_error_chunk(&mut b, handle, error, msg);
        vec![b.freeze()]
    } else {
        simple(handle, error)
    }
}

/// Checks a request against the export and the negotiation; `Err` is the NBD
/// error value and a message for the client.
fn validate(sess: &Session, req: &Request) -> Result<(), (u32, String)> {
    let einval = |m: &str| Err((err::EINVAL, m.to_string()));
    let allowed = match req.kind {
        cmd::READ if sess.structured => cflag::FUA | cflag::DF,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        cmd::DISC => 0,
        k => return Err((err::EINVAL, format!("unknown command {k}"))),
    };
    if req.flags & !allowed != 0 {
        return Err((
            err::EINVAL,
            format!(
                "flags {:#x} not valid for command {}",
                req.flags & !allowed,
                req.kind
            ),
        ));
    }
    if req.kind == cmd::FLUSH {
        return if req.offset == 0 && req.len == 0 {
            Ok(())
        } else {
            einval("FLUSH offset and length must be zero")
        };
    }
    let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && sess.disk().read_only() {
        return Err((err::EPERM, "the export is read-only".into()));
    }
    if matches!(req.kind, cmd::READ | cmd::WRITE) && req.len > wire::MAX_PAYLOAD {
        let e = if req.kind == cmd::READ && req.flags & cflag::DF != 0 {
            err::EOVERFLOW
        } else {
            err::EINVAL
        };
        return Err((
            e,
            format!(
                "length {} exceeds the maximum {}",
                req.len,
                wire::MAX_PAYLOAD
            ),
        ));
    }
    let end = req.offset.checked_add(req.len as u64);
    if !matches!(end, Some(e) if e <= sess.size) {
        let e = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            err::ENOSPC
        } else {
            err::EINVAL
        };
        return Err((
            e,
            format!(
                "offset {} + length {} is beyond the end of the export ({} bytes)",
                req.offset, req.len, sess.size
            ),
        ));
    }
    if req.kind == cmd::BLOCK_STATUS {
        if !sess.base_allocation {
            return einval("no metadata context was negotiated");
        }
        if req.len == 0 {
            return einval("BLOCK_STATUS length must not be zero");
        }
    }
    Ok(())
}

/// Runs a validated request on the blocking pool; returns its reply.
fn execute(sess: &Session, req: Request, payload: Bytes) -> Reply {
    let disk = sess.disk();
    let fua = req.flags & cflag::FUA != 0;
    let res = match req.kind {
        cmd::READ => return read(sess, req),
        cmd::WRITE => disk.write(req.offset, &payload, fua),
        cmd::FLUSH => disk.flush(),
        cmd::TRIM => disk.trim(req.offset, req.len as u64, fua),
        cmd::CACHE => disk.cache(req.offset, req.len as u64),
        cmd::WRITE_ZEROES => disk.write_zeroes(
            req.offset,
            req.len as u64,
            req.flags & cflag::NO_HOLE != 0,
            req.flags & cflag::FAST_ZERO != 0,
            fua,
        ),
        cmd::BLOCK_STATUS => {
            let max = if req.flags & cflag::REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            match disk.extents(req.offset, req.len as u64, max) {
                Ok(ext) if !ext.is_empty() => {
                    let mut b = BytesMut::with_capacity(24 + 8 * ext.len());
                    wire::emit_block_status(&mut b, req.handle, wire::BASE_ALLOCATION_ID, &ext);
                    return vec![b.freeze()];
                }
                Ok(_) => {
                    // Cannot happen for len > 0; "allocated" is always a safe answer.
                    let e = [wire::Extent {
                        len: req.len,
                        flags: 0,
                    }];
                    let mut b = BytesMut::with_capacity(32);
                    wire::emit_block_status(&mut b, req.handle, wire::BASE_ALLOCATION_ID, &e);
                    return vec![b.freeze()];
                }
                Err(e) => Err(e),
            }
        }
        _ => return error_reply(sess, req.handle, err::EINVAL, "unknown command"),
    };
    match res {
        Ok(()) => simple(req.handle, 0),
        Err(e) => {
            if !matches!(e, crate::disk::DiskError::NotFast) {
                tracing::warn!(export = disk.name(), kind = req.kind, error = %crate::error_chain(&e), "request failed");
            }
            error_reply(sess, req.handle, e.nbd_errno(), &crate::error_chain(&e))
        }
    }
}

fn read(sess: &Session, req: Request) -> Reply {
    let disk = sess.disk();
    let handle = req.handle;
    let len = req.len as u64;
    if !sess.structured {
        return match disk.read(req.offset, req.len as usize) {
            Ok(data) => {
                let mut v = simple(handle, 0);
                v.push(Bytes::from(data));
                v
            }
            Err(e) => simple(handle, e.nbd_errno()),
        };
    }
    if len == 0 {
        let mut b = BytesMut::with_capacity(20);
        wire::emit_none(&mut b, handle);
        return vec![b.freeze()];
    }
    let fail = |e: crate::disk::DiskError| {
        error_reply(sess, handle, e.nbd_errno(), &crate::error_chain(&e))
    };
    // DF forbids fragments; fixed disks have no holes worth skipping.
    let segments = if req.flags & cflag::DF != 0 || disk.alloc() == Alloc::Fixed {
        vec![(len, false)]
    } else {
        match disk.segments(req.offset, len, MAX_READ_CHUNKS) {
            Ok(mut s) => {
                let covered: u64 = s.iter().map(|(l, _)| l).sum();
                if covered < len {
                    s.push((len - covered, false));
                }
                s
            }
            Err(e) => return fail(e),
        }
    };
    let mut out = Vec::with_capacity(segments.len() * 2);
    let mut pos = req.offset;
    let n = segments.len();
    for (i, (seg, hole)) in segments.into_iter().enumerate() {
        let done = i + 1 == n;
        let mut hdr = BytesMut::with_capacity(32);
        if hole {
            wire::emit_offset_hole(&mut hdr, done, handle, pos, seg as u32);
            out.push(hdr.freeze());
        } else {
            let data = match disk.read(pos, seg as usize) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            wire::emit_offset_data_header(&mut hdr, done, handle, pos, seg as u32);
            out.push(hdr.freeze());
            out.push(Bytes::from(data));
        }
        pos += seg;
    }
    out
}

/// A connection after the handshake, as blocking std objects: the transmission
/// phase runs on plain threads (see the module docs).
pub enum Conn {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix socket.
    Unix(tokio::net::UnixStream),
    /// stdin / stdout (`--stdin`).
    Stdio,
}

/// The read side of a connection, shared by the workers under a mutex.
trait SockRead: Read + Send + AsRawFd {
    /// Bounds a blocking read so the reader can notice shutdown.
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Whether more bytes (the next request) already wait to be read.
    fn has_pending(&self) -> bool {
        crate::sys::bytes_pending(self.as_raw_fd()).map_or(true, |n| n > 0)
    }
}

impl SockRead for std::net::TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl SockRead for std::os::unix::net::UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl SockRead for std::fs::File {
    fn set_timeout(&self, _t: Option<Duration>) -> std::io::Result<()> {
        // stdin cannot time out; --stdin mode has no shutdown signal to notice.
        Ok(())
    }
}

type Halves = (Box<dyn SockRead>, Box<dyn Write + Send>);

fn blocking_halves(conn: Conn) -> std::io::Result<Halves> {
    match conn {
        Conn::Tcp(s) => {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok((Box::new(s.try_clone()?), Box::new(s)))
        }
        Conn::Unix(s) => {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok((Box::new(s.try_clone()?), Box::new(s)))
        }
        Conn::Stdio => {
            use std::os::fd::AsFd;
            let r = std::io::stdin().as_fd().try_clone_to_owned()?;
            let w = std::io::stdout().as_fd().try_clone_to_owned()?;
            Ok((
                Box::new(std::fs::File::from(r)),
                Box::new(std::fs::File::from(w)),
            ))
        }
    }
}

/// Serves one connection from handshake to close.
pub async fn serve(ctx: Ctx, conn: Conn) -> Result<(), ConnError> {
    let hs = match conn {
        Conn::Tcp(mut s) => {
            let (mut r, mut w) = s.split();
            let h = handshake_timed(&ctx, &mut r, &mut w).await;
            (h, Conn::Tcp(s))
        }
        Conn::Unix(mut s) => {
            let (mut r, mut w) = s.split();
            let h = handshake_timed(&ctx, &mut r, &mut w).await;
            (h, Conn::Unix(s))
        }
        Conn::Stdio => {
            let (mut r, mut w) = (tokio::io::stdin(), tokio::io::stdout());
            let h = handshake_timed(&ctx, &mut r, &mut w).await;
            (h, Conn::Stdio)
        }
    };
    let sess = match hs.0 {
        Err(e) => {
            if matches!(e, ConnError::Protocol(_)) {
                ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        Ok(None) => return Ok(()),
        Ok(Some(s)) => s,
    };
    tracing::debug!(
        export = sess.disk().name(),
        structured = sess.structured,
        "entering transmission"
    );
    let (rd, wr) = blocking_halves(hs.1)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ctx2 = ctx.clone();
    std::thread::Builder::new()
        .name("stord-conn".into())
        .spawn(move || {
            let _ = tx.send(transmission(&ctx2, sess, rd, wr));
        })?;
    let r = rx
        .await
        .unwrap_or_else(|_| Err(ConnError::Protocol("connection thread died".into())));
    if matches!(r, Err(ConnError::Protocol(_))) {
        ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
    r
}

async fn handshake_timed<R, W>(
    ctx: &Ctx,
    rd: &mut R,
    wr: &mut W,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(ctx, rd, wr)).await {
        Err(_) => Err(ConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT)),
        Ok(r) => r,
    }
}

/// A global bound on payload bytes held by requests in flight (WRITE payloads
/// read, READ data being produced), across all connections.
///
/// The fast path is one atomic compare-and-swap to take and one atomic add to
/// give back; the mutex and condition variable are touched only when the budget
/// runs out (a waiter registers itself, and givers notify only if one exists).
#[derive(Debug)]
pub struct Budget {
    left: AtomicU64,
    waiters: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Budget {
            left: AtomicU64::new(bytes),
            waiters: AtomicU64::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    fn try_take(&self, n: u64) -> bool {
        let mut cur = self.left.load(Ordering::Acquire);
        while cur >= n {
            match self
                .left
                .compare_exchange_weak(cur, cur - n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
        false
    }

    fn take(&self, n: u64) -> BudgetGuard<'_> {
        if !self.try_take(n) {
            let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.waiters.fetch_add(1, Ordering::AcqRel);
            while !self.try_take(n) {
                // The timeout covers a give that raced with our registration.
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            self.waiters.fetch_sub(1, Ordering::AcqRel);
        }
        BudgetGuard { budget: self, n }
    }

    fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::AcqRel);
        if self.waiters.load(Ordering::Acquire) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }
}

struct BudgetGuard<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        self.budget.give(self.n);
    }
}

/// How often a reader blocked on an idle socket looks at the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(200);
/// Worker threads per connection: requests in flight at once.
const WORKERS: usize = 16;

struct ReadState {
    /// Buffered: one recv can bring several pipelined request headers (large
    /// payloads bypass the buffer, as BufReader does).
    rd: BufReader<Box<dyn SockRead>>,
    grace_end: Option<Instant>,
    done: bool,
    result: Result<(), ConnError>,
}

struct Shared<'a> {
    ctx: &'a Ctx,
    sess: &'a Session,
    rd: Mutex<ReadState>,
    wr: Mutex<Box<dyn Write + Send>>,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Fills `buf` completely. At a message boundary (`boundary`), an idle socket
/// lets `idle()` decide to stop (returns `Ok(false)`); EOF there is a clean end
/// (also `Ok(false)`). Inside a message, timeouts are waited out and EOF is an
/// error.
fn read_full(
    rd: &mut dyn Read,
    buf: &mut [u8],
    boundary: bool,
    mut idle: impl FnMut() -> bool,
) -> Result<bool, ConnError> {
    let mut got = 0;
    while got < buf.len() {
        match rd.read(&mut buf[got..]) {
            Ok(0) if got == 0 && boundary => return Ok(false),
            Ok(0) => {
                return Err(ConnError::Protocol(
                    "connection closed in the middle of a request".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if got == 0 && boundary && idle() {
                    return Ok(false);
                }
            }
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
    Ok(true)
}

/// Reads and drops `n` payload bytes.
fn skip(rd: &mut dyn Read, mut n: u64) -> Result<(), ConnError> {
    let mut sink = vec![0u8; 256 * 1024];
    while n > 0 {
        let k = n.min(sink.len() as u64) as usize;
        read_full(rd, &mut sink[..k], false, || false)?;
        n -= k as u64;
    }
    Ok(())
}

/// What the reader got for a worker.
enum Next<'a> {
    /// A request to execute (payload read, its budget held), or to answer
    /// ESHUTDOWN (the flag).
    Run(Request, Bytes, Option<BudgetGuard<'a>>, bool),
    /// An answer that needs no execution (invalid request).
    Answer(Reply),
    /// The connection is over.
    Stop,
}

/// Reads the next request (header and payload). Called with the read lock held.
fn next<'a>(sh: &Shared<'a>, st: &mut ReadState) -> Result<Next<'a>, ConnError> {
    // A client that keeps sending after the grace period is not waited for.
    if matches!(st.grace_end, Some(end) if Instant::now() >= end) {
        return Ok(Next::Stop);
    }
    let mut hdr = [0u8; wire::REQUEST_LEN];
    let shutdown = &sh.ctx.shutdown;
    let grace = &mut st.grace_end;
    let got = read_full(&mut st.rd, &mut hdr, true, || {
        if grace.is_none() && *shutdown.borrow() {
            *grace = Some(Instant::now() + SHUTDOWN_GRACE);
        }
        matches!(grace, Some(end) if Instant::now() >= *end)
    })?;
    if !got {
        return Ok(Next::Stop);
    }
    if st.grace_end.is_none() && *shutdown.borrow() {
        st.grace_end = Some(Instant::now() + SHUTDOWN_GRACE);
    }
    let req = Request::parse(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
    if req.kind == cmd::DISC {
        return Ok(Next::Stop);
    }
    let plen = req.payload_len();
    if plen > wire::MAX_PAYLOAD {
        // Too big to buffer: skip the payload as it streams past, then answer.
        skip(&mut st.rd, plen as u64)?;
        sh.ctx
            .stats
            .invalid_requests
            .fetch_add(1, Ordering::Relaxed);
        let msg = format!(
            "write of {plen} bytes exceeds the maximum {}",
            wire::MAX_PAYLOAD
        );
        return Ok(Next::Answer(error_reply(
            sh.sess,
            req.handle,
            err::EINVAL,
            &msg,
        )));
    }
    let (payload, mem) = if plen > 0 {
        let mem = sh.ctx.budget.take(plen as u64);
        let mut v = vec![0u8; plen as usize];
        read_full(&mut st.rd, &mut v, false, || false)?;
        (Bytes::from(v), Some(mem))
    } else {
        (Bytes::new(), None)
    };
    Ok(Next::Run(req, payload, mem, st.grace_end.is_some()))
}

fn write_reply(sh: &Shared<'_>, reply: &Reply) -> std::io::Result<()> {
    let mut wr = sh.wr.lock().unwrap_or_else(|p| p.into_inner());
    let mut idx = 0;
    let mut off = 0;
    while idx < reply.len() {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(reply.len() - idx);
        slices.push(IoSlice::new(&reply[idx][off..]));
        for b in &reply[idx + 1..] {
            slices.push(IoSlice::new(b));
        }
        let mut n = match wr.write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 && idx < reply.len() {
            let left = reply[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while idx < reply.len() && reply[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    wr.flush()
}

/// Largest READ / WRITE a worker executes while still holding the read lock.
const INLINE_MAX: u32 = 256 * 1024;

/// Whether a request is cheap enough (page-cache work, no fdatasync) to run
/// without handing the socket to another worker.
fn cheap(req: &Request) -> bool {
    match req.kind {
        cmd::READ => req.len <= INLINE_MAX,
        cmd::WRITE => req.len <= INLINE_MAX && req.flags & cflag::FUA == 0,
        cmd::BLOCK_STATUS => true,
        _ => false,
    }
}

/// Produces the reply to what the reader got (`None`: the connection is over).
fn answer(sh: &Shared<'_>, next: Next<'_>) -> Option<Reply> {
    Some(match next {
        Next::Stop => return None,
        Next::Answer(r) => r,
        Next::Run(req, _, _, true) => error_reply(
            sh.sess,
            req.handle,
            err::ESHUTDOWN,
            "server is shutting down",
        ),
        Next::Run(req, payload, _mem, false) => match validate(sh.sess, &req) {
            Err((e, msg)) => {
                sh.ctx
                    .stats
                    .invalid_requests
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(handle = req.handle, kind = req.kind, error = e, %msg, "invalid request");
                error_reply(sh.sess, req.handle, e, &msg)
            }
            Ok(()) => {
                sh.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
                let _mem = if req.kind == cmd::READ {
                    Some(sh.ctx.budget.take(req.len as u64))
                } else {
                    None
                };
                execute(sh.sess, req, payload)
            }
        },
    })
}

fn fail(st: &mut ReadState, e: ConnError) {
    if !st.done {
        st.done = true;
        st.result = Err(e);
    }
}

/// One worker: read a request under the read lock, run it, reply. When the
/// request is cheap and nothing else is waiting on the socket (queue depth 1),
/// the worker keeps the read lock and runs it at once: handing the socket to
/// another worker would cost a thread wake-up per request for nothing. Otherwise
/// it lets go of the socket first, so the next request is read while this one
/// runs.
fn worker(sh: &Shared<'_>) {
    let mut st = sh.rd.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if st.done {
            return;
        }
        let next = match next(sh, &mut st) {
            Ok(n) => n,
            Err(e) => return fail(&mut st, e),
        };
        let inline = match &next {
            Next::Stop => {
                st.done = true;
                return;
            }
            Next::Answer(_) | Next::Run(_, _, _, true) => true,
            Next::Run(req, ..) => {
                cheap(req) && st.rd.buffer().is_empty() && !st.rd.get_ref().has_pending()
            }
        };
        let res = if inline {
            answer(sh, next).map(|r| write_reply(sh, &r))
        } else {
            drop(st);
            let res = answer(sh, next).map(|r| write_reply(sh, &r));
            st = sh.rd.lock().unwrap_or_else(|p| p.into_inner());
            res
        };
        if let Some(Err(e)) = res {
            return fail(&mut st, ConnError::Io(e));
        }
    }
}

/// The transmission phase on `WORKERS` threads: each takes the read lock,
/// reads one request, releases the lock, executes it and writes its reply under
/// the write lock, so requests overlap and replies go out as they finish.
fn transmission(
    ctx: &Ctx,
    sess: Session,
    rd: Box<dyn SockRead>,
    wr: Box<dyn Write + Send>,
) -> Result<(), ConnError> {
    rd.set_timeout(Some(SHUTDOWN_POLL))?;
    let sh = Shared {
        ctx,
        sess: &sess,
        rd: Mutex::new(ReadState {
            rd: BufReader::with_capacity(64 * 1024, rd),
            grace_end: None,
            done: false,
            result: Ok(()),
        }),
        wr: Mutex::new(wr),
    };
    std::thread::scope(|s| {
        for _ in 1..WORKERS {
            let sh = &sh;
            let spawned = std::thread::Builder::new()
                .name("stord-worker".into())
                .stack_size(512 * 1024)
                .spawn_scoped(s, move || worker(sh));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a worker thread; serving with fewer");
                break;
            }
        }
        worker(&sh);
    });
    if *ctx.shutdown.borrow() {
        let _ = sess.disk().flush();
    }
    let st = sh.rd.into_inner().unwrap_or_else(|p| p.into_inner());
    st.result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(structured: bool, ro: bool) -> (tempfile::TempDir, Session) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(
            dir.path(),
            &[crate::config::DiskConfig {
                name: "d".into(),
                size: crate::config::Size(1 << 20),
                alloc: Alloc::Dynamic,
                read_only: ro,
            }],
        )
        .unwrap();
        let att = cat.attach("d").unwrap();
        (
            dir,
            Session {
                att,
                size: 1 << 20,
                structured,
                base_allocation: structured,
            },
        )
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn budget_blocks_until_given_back() {
        let b = Arc::new(Budget::new(100));
        let g = b.take(80);
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let _g = b2.take(50);
            b2.left.load(Ordering::Acquire)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "took more than the budget");
        drop(g);
        assert_eq!(t.join().unwrap(), 50);
        assert_eq!(b.left.load(Ordering::Acquire), 100);
    }

    #[test]
    fn validation_error_codes() {
        let (_d, s) = session(true, false);
        assert!(validate(&s, &req(cmd::READ, 0, 0, 4096)).is_ok());
        assert_eq!(
            validate(&s, &req(cmd::READ, 0, 1 << 20, 1)).unwrap_err().0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(cmd::WRITE, 0, 1 << 20, 1)).unwrap_err().0,
            err::ENOSPC
        );
        assert_eq!(
            validate(&s, &req(cmd::WRITE_ZEROES, 0, u64::MAX, 1))
                .unwrap_err()
                .0,
            err::ENOSPC
        );
        assert_eq!(validate(&s, &req(99, 0, 0, 0)).unwrap_err().0, err::EINVAL);
        assert_eq!(
            validate(&s, &req(cmd::WRITE, cflag::DF, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(cmd::FLUSH, 0, 1, 0)).unwrap_err().0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(cmd::READ, cflag::DF, 0, wire::MAX_PAYLOAD + 1))
                .unwrap_err()
                .0,
            err::EOVERFLOW
        );
        assert_eq!(
            validate(&s, &req(cmd::BLOCK_STATUS, 0, 0, 0))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        let (_d, ro) = session(false, true);
        assert_eq!(
            validate(&ro, &req(cmd::WRITE, 0, 0, 1)).unwrap_err().0,
            err::EPERM
        );
        assert_eq!(
            validate(&ro, &req(cmd::TRIM, 0, 0, 1)).unwrap_err().0,
            err::EPERM
        );
        assert_eq!(
            validate(&ro, &req(cmd::READ, cflag::DF, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&ro, &req(cmd::BLOCK_STATUS, 0, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
    }

    #[test]
    fn structured_read_of_sparse_disk_is_holes() {
        let (_d, s) = session(true, false);
        s.disk().write(8192, &[7u8; 4096], false).unwrap();
        let r = read(&s, req(cmd::READ, 0, 0, 65536));
        // hole [0,8192), data [8192,12288), hole [12288,65536)
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!(&r[0][6..8], &wire::chunk::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&r[1][6..8], &wire::chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(r[2], Bytes::from(vec![7u8; 4096]));
        assert_eq!(&r[3][4..6], &wire::chunk::FLAG_DONE.to_be_bytes());
        let df = read(&s, req(cmd::READ, cflag::DF, 0, 65536));
        assert_eq!(df.len(), 2);
        assert_eq!(df[1].len(), 65536);
    }
}
