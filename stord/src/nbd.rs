//! One NBD connection: fixed newstyle option haggling, then the transmission
//! phase.
//!
//! Theory of operation. The handshake runs on tokio, sequentially on the raw
//! stream (small messages, one option at a time, with an overall timeout so an
//! idle peer cannot hold a connection slot forever).
//!
//! TLS: when a client sends NBD_OPT_STARTTLS (and `tls` is on), the handshake
//! ACKs it and the connection moves to a thread of its own (`starttls`): the
//! TLS handshake, option haggling again over TLS, and the transmission phase
//! below with a single worker that owns the TLS stream. Everything in the rest
//! of this description is the plain path, which TLS leaves as it is.
//!
//! Once an export is chosen, the socket is turned into a blocking std socket and
//! served by `WORKERS` (16) threads, the way nbdkit does it: each worker takes
//! the read lock, reads one whole request (header and WRITE payload, at most
//! [`MAX_PAYLOAD`]) and validates it into its typed command, releases the
//! lock, executes the request
//! (pread / pwrite / fdatasync / fallocate on the disk file) and writes the reply
//! under the write lock with one vectored write. A READ of 64 KiB or more whose
//! reply is one header and the data (simple replies, DF, fixed disks, or too
//! short to look for holes) is not read into memory at all: its pages are made
//! resident in a read-only mapping of the disk file (madvise, outside the write
//! lock) and the header and the data go out in one writev from that mapping,
//! one copy from the page cache to the socket (see `sys::FileMap`). A
//! WRITE payload lands in the worker's reusable buffer (no allocation or zeroing
//! per request). So requests run concurrently,
//! replies go out in completion order, and at queue depth 1 the thread woken by
//! the request is the one that answers it: no hand-off between threads on the
//! hot path. Under a deep queue, page-cache work (WRITEs without FUA up to 256
//! KiB, small READs whose data is cached, found with RWF_NOWAIT) stays on the
//! reading thread too, and its replies are written together once the input runs
//! dry.
//!
//! Bounds: at most `WORKERS` requests in flight per connection, and a
//! [`Budget`] of payload bytes ([`CONN_BUDGET`]) for each connection of its
//! own: a connection only ever waits for its own requests, never for another
//! client's, so one client cannot stall another by holding memory. Memory for
//! payloads is at most `max_connections` times `CONN_BUDGET`.
//!
//! Deadlines ([`Limits`]): the handshake must finish within
//! `handshake_timeout`; once a request's header has started, its header and
//! payload must arrive within `request_timeout`, and each reply must be taken
//! by the client within `request_timeout` (SO_SNDTIMEO, checked against a
//! deadline per reply, so a client that reads a byte now and then gains
//! nothing); past either the connection is closed and counted (`timeouts`).
//! With `idle_timeout`, a connection with nothing in flight that sends nothing
//! for that long is closed and counted (`idle_closed`). An invalid request gets
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::Alloc;
use crate::disk::{Attachment, Disk};
use nbd_proto::{
    cflag, err, info, opt, rep, tflag, ClientFlags, Command, ExportNameReply, Extent, Final, Hello,
    Info, OptionHeader, OptionReply, OptionRequest, Request, SimpleReply, BASE_ALLOCATION,
    BASE_ALLOCATION_ID, CHUNK_HEADER_LEN, MAX_OPTION_DATA, MAX_PAYLOAD, OPTION_HEADER_LEN,
    REQUEST_LEN, SIMPLE_REPLY_LEN,
};

/// Longest a client may take to finish option haggling, by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request's payload or a reply may take on the wire, by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Options accepted on one connection before it is treated as abuse.
const MAX_OPTIONS: usize = 1024;
/// Payload bytes the requests in flight on one connection may hold together
/// (WRITE payloads read, READ data produced): one request of the largest size.
pub const CONN_BUDGET: u64 = MAX_PAYLOAD as u64;
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
    /// a request's payload or a reply took too long
    #[error("{0} took longer than {1:?}")]
    Timeout(&'static str, Duration),
    /// the client asked for export `{0}`, which does not exist
    #[error("the client asked for export `{0}` with NBD_OPT_EXPORT_NAME, which does not exist")]
    UnknownExport(String),
    /// the client may not open export `{0}` (TLS required, or not on its `allow` list)
    #[error("the client may not open export `{0}` with NBD_OPT_EXPORT_NAME (TLS required, or not on its `allow` list)")]
    NotAllowed(String),
    /// the TLS handshake failed
    #[error("the TLS handshake failed: {0}")]
    TlsHandshake(String),
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
    /// Connections closed because a request's payload or a reply missed
    /// `request_timeout`.
    pub timeouts: AtomicU64,
    /// Connections closed because the handshake missed `handshake_timeout`.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed after `idle_timeout` with nothing in flight.
    pub idle_closed: AtomicU64,
    /// Connections refused over `max_connections_per_client`.
    pub refused_per_client: AtomicU64,
    /// TLS handshakes completed (STARTTLS).
    pub tls_handshakes_ok: AtomicU64,
    /// TLS handshakes that failed (wrong key, untrusted or missing client
    /// certificate, not TLS at all, timeout).
    pub tls_handshakes_failed: AtomicU64,
    /// Refusals by a disk's `allow` list (a TLS peer not on it).
    pub tls_allow_refused: AtomicU64,
    /// Plain connections refused for not using TLS (`tls = "require"`, or a
    /// disk with an `allow` list), counted once per connection.
    pub tls_plain_refused: AtomicU64,
}

/// Per-connection deadlines (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest option haggling may take.
    pub handshake_timeout: Duration,
    /// Longest a started request (header and payload) may take to arrive, and
    /// a reply to be taken by the client.
    pub request_timeout: Duration,
    /// Close a connection with nothing in flight after this long (None: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            idle_timeout: None,
        }
    }
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
    /// Deadlines.
    pub limits: Limits,
    /// Busy polling of idle connections (queue-depth-1 latency).
    pub busy_poll: Arc<crate::poll::BusyPoll>,
    /// TLS policy, credentials and the disks' access lists.
    pub tls: Arc<crate::tls::Tls>,
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
    /// READ data may go from the disk file's mapping straight to the socket
    /// (not under TLS, where every byte goes through the TLS stream).
    mapped_reads: bool,
}

impl Session {
    fn disk(&self) -> &Disk {
        self.att.disk()
    }
}

mod handshake;
mod request;
mod sock;
mod starttls;
mod transmit;

pub use request::Budget;
use request::*;

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

/// Serves one connection from handshake to close.
pub async fn serve(ctx: Ctx, conn: Conn) -> Result<(), ConnError> {
    let started = Instant::now();
    let tls_on = ctx.tls.enabled();
    let required = ctx.tls.mode == crate::config::TlsMode::Require;
    // `tls = "require"` is for TCP; a unix socket is guarded by its
    // permissions (see `TlsMode::Require`).
    let link = match &conn {
        Conn::Tcp(_) => handshake::Link::Plain {
            upgradable: tls_on,
            required,
        },
        Conn::Unix(_) => handshake::Link::Plain {
            upgradable: tls_on,
            required: false,
        },
        Conn::Stdio => handshake::Link::Plain {
            upgradable: false,
            required: false,
        },
    };
    let hs = match conn {
        Conn::Tcp(mut s) => {
            let (mut r, mut w) = s.split();
            let h = handshake_timed(&ctx, &mut r, &mut w, &link).await;
            (h, Conn::Tcp(s))
        }
        Conn::Unix(mut s) => {
            let (mut r, mut w) = s.split();
            let h = handshake_timed(&ctx, &mut r, &mut w, &link).await;
            (h, Conn::Unix(s))
        }
        Conn::Stdio => {
            let (mut r, mut w) = (tokio::io::stdin(), tokio::io::stdout());
            let h = handshake_timed(&ctx, &mut r, &mut w, &link).await;
            (h, Conn::Stdio)
        }
    };
    let sess = match hs.0 {
        Err(e) => {
            match e {
                ConnError::Protocol(_) => {
                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                }
                ConnError::HandshakeTimeout(_) => {
                    ctx.stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            return Err(e);
        }
        Ok(handshake::Haggled::Abort) => return Ok(()),
        Ok(handshake::Haggled::StartTls { no_zeroes }) => {
            // The rest of this connection runs on a thread of its own.
            let deadline = started + ctx.limits.handshake_timeout;
            let sock = starttls::Sock::blocking(hs.1)?;
            let rt = tokio::runtime::Handle::current();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ctx2 = ctx.clone();
            std::thread::Builder::new()
                .name("stord-tls".into())
                .spawn(move || {
                    let _ = tx.send(starttls::serve(&ctx2, sock, no_zeroes, deadline, &rt));
                })?;
            let r = rx
                .await
                .unwrap_or_else(|_| Err(ConnError::Protocol("connection thread died".into())));
            if matches!(r, Err(ConnError::Protocol(_))) {
                ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            return r;
        }
        Ok(handshake::Haggled::Session(s)) => s,
    };
    tracing::debug!(
        export = sess.disk().name(),
        structured = sess.structured,
        "entering transmission"
    );
    let (rd, wr) = sock::blocking_halves(hs.1)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ctx2 = ctx.clone();
    std::thread::Builder::new()
        .name("stord-conn".into())
        .spawn(move || {
            let _ = tx.send(transmit::transmission(&ctx2, sess, rd, wr));
        })?;
    let r = rx
        .await
        .unwrap_or_else(|_| Err(ConnError::Protocol("connection thread died".into())));
    match r {
        Err(ConnError::Protocol(_)) => {
            ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(ConnError::Timeout(..)) => {
            ctx.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    r
}

async fn handshake_timed(
    ctx: &Ctx,
    rd: &mut (dyn AsyncRead + Unpin + Send),
    wr: &mut (dyn AsyncWrite + Unpin + Send),
    link: &handshake::Link,
) -> Result<handshake::Haggled, ConnError> {
    let limit = ctx.limits.handshake_timeout;
    match tokio::time::timeout(limit, handshake::handshake(ctx, rd, wr, link)).await {
        Err(_) => Err(ConnError::HandshakeTimeout(limit)),
        Ok(r) => r,
    }
}
