//! One NBD connection: fixed newstyle option haggling, then the transmission
//! phase.
//!
//! Theory of operation. The handshake runs sequentially on the raw stream (small
//! messages, one option at a time, with an overall timeout so an idle peer cannot
//! hold a connection slot forever). Once an export is chosen, the connection
//! splits in two:
//!
//! - the *reader* (this task) parses request headers from its own buffer, reads
//!   WRITE payloads whole (at most [`wire::MAX_PAYLOAD`]), validates each request
//!   against the export and the negotiated features, and hands valid ones to
//!   tokio's blocking pool, so requests run concurrently and finish in any order;
//! - the *writer* task receives finished replies over a channel and writes them,
//!   batching whatever is ready into one vectored write.
//!
//! A semaphore bounds what a peer can have in flight (request count and payload
//! bytes), so a fast client cannot make the server buffer without limit. An
//! invalid request gets an NBD error reply, never a dropped connection; only a
//! broken framing (bad magic) ends the connection, as the spec allows.
//!
//! Durability: FLUSH and FUA call `fdatasync` on the disk file shared by all
//! connections, so they cover every write any connection had completed.
//!
//! Shutdown: when the server's shutdown signal fires, the reader stops taking
//! work: requests that arrive during a short grace period are answered
//! `ESHUTDOWN` (so a client learns why and disconnects cleanly), in-flight ones
//! complete and are answered, the disk is flushed, then the connection closes.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

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
/// In-flight budget per connection, in units of 64 KiB of payload (plus one
/// unit per request): 2048 units = at most 2048 requests or ~128 MiB.
const INFLIGHT_UNITS: u32 = 2048;
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

/// Serves one connection from handshake to close.
pub async fn serve<R, W>(ctx: Ctx, mut rd: R, mut wr: W) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let sess =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&ctx, &mut rd, &mut wr)).await {
            Err(_) => return Err(ConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT)),
            Ok(Err(e)) => {
                if matches!(e, ConnError::Protocol(_)) {
                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(s))) => s,
        };
    tracing::debug!(
        export = sess.disk().name(),
        structured = sess.structured,
        "entering transmission"
    );
    let r = transmission(&ctx, sess, rd, wr).await;
    if matches!(r, Err(ConnError::Protocol(_))) {
        ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }
    r
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

/// Reads until `buf` holds at least `n` bytes. `Ok(false)`: clean EOF before
/// anything of the next message arrived.
async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> Result<bool, ConnError> {
    if buf.capacity() - buf.len() < n.saturating_sub(buf.len()) {
        buf.reserve(n - buf.len());
    }
    while buf.len() < n {
        if buf.capacity() == buf.len() {
            buf.reserve(64 * 1024);
        }
        let k = rd.read_buf(buf).await?;
        if k == 0 {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(ConnError::Protocol(
                "connection closed in the middle of a request".into(),
            ));
        }
    }
    Ok(true)
}

async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    while let Some(r) = rx.recv().await {
        queue.extend(r);
        while queue.len() < 256 {
            match rx.try_recv() {
                Ok(r) => queue.extend(r),
                Err(_) => break,
            }
        }
        while !queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = queue.iter().take(64).map(|b| IoSlice::new(b)).collect();
            let mut n = wr.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let Some(front) = queue.front_mut() else {
                    break;
                };
                if n >= front.len() {
                    n -= front.len();
                    queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        wr.flush().await?;
    }
    wr.flush().await?;
    let _ = wr.shutdown().await;
    Ok(())
}

async fn transmission<R, W>(ctx: &Ctx, sess: Session, mut rd: R, wr: W) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let sess = Arc::new(sess);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(writer(wr, rx));
    let sem = Arc::new(Semaphore::new(INFLIGHT_UNITS as usize));
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut shutdown = ctx.shutdown.clone();
    let mut grace_end: Option<tokio::time::Instant> = None;

    let result: Result<(), ConnError> = loop {
        if grace_end.is_none() && *shutdown.borrow() {
            grace_end = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
        }
        // Wait for a whole header, or shutdown, or the end of the grace period.
        let got = if buf.len() >= wire::REQUEST_LEN {
            Ok(true)
        } else if let Some(end) = grace_end {
            match tokio::time::timeout_at(end, fill(&mut rd, &mut buf, wire::REQUEST_LEN)).await {
                Ok(r) => r,
                Err(_) => break Ok(()),
            }
        } else {
            tokio::select! {
                r = fill(&mut rd, &mut buf, wire::REQUEST_LEN) => r,
                _ = crate::until_shutdown(&mut shutdown) => {
                    grace_end = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    continue;
                }
            }
        };
        match got {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        let req = match Request::parse(&buf[..wire::REQUEST_LEN]) {
            Ok(r) => r,
            Err(e) => break Err(ConnError::Protocol(e.to_string())),
        };
        buf.advance(wire::REQUEST_LEN);
        if req.kind == cmd::DISC {
            break Ok(());
        }

        let plen = req.payload_len();
        if plen > wire::MAX_PAYLOAD {
            // Too big to buffer: skip the payload as it streams past, then answer.
            let mut left = plen as usize;
            let skip = left.min(buf.len());
            buf.advance(skip);
            left -= skip;
            let mut ok = true;
            while left > 0 {
                buf.clear();
                match fill(&mut rd, &mut buf, 1).await {
                    Ok(true) => {
                        let k = left.min(buf.len());
                        buf.advance(k);
                        left -= k;
                    }
                    Ok(false) | Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                break Err(ConnError::Protocol(
                    "connection closed inside a write payload".into(),
                ));
            }
            ctx.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
            let msg = format!(
                "write of {plen} bytes exceeds the maximum {}",
                wire::MAX_PAYLOAD
            );
            let _ = tx.send(error_reply(&sess, req.handle, err::EINVAL, &msg));
            continue;
        }

        let units =
            (1 + plen.max(req.len.min(wire::MAX_PAYLOAD)) / (64 * 1024)).min(INFLIGHT_UNITS);
        let permit = match sem.clone().acquire_many_owned(units).await {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        let payload = if plen > 0 {
            match fill(&mut rd, &mut buf, plen as usize).await {
                Ok(true) => buf.split_to(plen as usize).freeze(),
                Ok(false) | Err(_) => {
                    break Err(ConnError::Protocol(
                        "connection closed inside a write payload".into(),
                    ))
                }
            }
        } else {
            Bytes::new()
        };

        if grace_end.is_some() {
            let _ = tx.send(error_reply(
                &sess,
                req.handle,
                err::ESHUTDOWN,
                "server is shutting down",
            ));
            continue;
        }
        if let Err((e, msg)) = validate(&sess, &req) {
            ctx.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(handle = req.handle, kind = req.kind, error = e, %msg, "invalid request");
            let _ = tx.send(error_reply(&sess, req.handle, e, &msg));
            continue;
        }
        ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let sess2 = sess.clone();
        let tx2 = tx.clone();
        tokio::task::spawn_blocking(move || {
            let reply = execute(&sess2, req, payload);
            let _ = tx2.send(reply);
            drop(permit);
        });
    };

    // Wait for every in-flight request: each holds permits until it replied.
    let _ = sem.acquire_many(INFLIGHT_UNITS).await;
    drop(tx);
    let wres = writer.await;
    if *shutdown.borrow() {
        let s2 = sess.clone();
        let _ = tokio::task::spawn_blocking(move || s2.disk().flush()).await;
    }
    match wres {
        Ok(Err(e)) if result.is_ok() => Err(ConnError::Io(e)),
        _ => result,
    }
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
