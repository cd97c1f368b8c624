//! A connection after NBD_OPT_STARTTLS: the socket upgraded in place to TLS,
//! option haggling again over TLS, then the transmission phase.
//!
//! Theory of operation. The handshake (`handshake::handshake`) ACKs STARTTLS
//! and returns; `nbd::serve` turns the socket into a blocking std socket and
//! hands it to a thread of its own, which runs [`serve`]: the TLS handshake
//! (OpenSSL, blocking, with a 200 ms receive timeout so the connection's
//! overall handshake deadline and the server's shutdown are noticed), then
//! the same option haggling as before STARTTLS, driven on this thread through
//! [`Blocking`], an `AsyncRead`/`AsyncWrite` over the TLS stream (a read that
//! times out returns `Pending` after waking itself, so the haggling's
//! timeout and shutdown checks run every 200 ms), then the transmission phase.
//!
//! One `SslStream` is one state machine: it cannot be read by one thread
//! while another writes, and its bytes on the socket are ciphertext, so the
//! plain path's tricks do not apply. Under TLS the stream sits behind a mutex
//! that only this thread takes ([`TlsRead`] and [`TlsWrite`] are its two
//! handles for the transmission code), the transmission phase runs with a
//! single worker (`SockRead::one_thread`: it reads a request, runs it, and
//! writes its reply, holding the replies of page-cache requests while more
//! requests are waiting, as the plain path does), and mapped READ replies are
//! written through TLS rather than from the mapping to the fd
//! (`SockWrite::raw_fd`). Replies are gathered in a 64 KiB buffer so that a
//! reply header and its data go out as one TLS record where they fit. Plain
//! connections never come here: their path is unchanged.
//!
//! A failed TLS handshake (wrong key, unknown identity, missing or untrusted
//! client certificate, not TLS at all) ends the connection and is counted in
//! `tls_handshakes_failed`; a send that makes no progress for
//! [`SEND_TIMEOUT`] ends it too, so a peer that stops reading cannot hold the
//! thread forever.

use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use openssl::ssl::{HandshakeError, SslStream};
use tokio::io::ReadBuf;

use super::transmit::{is_timeout, SockRead, SockWrite};
use super::*;
use crate::tls::{describe, peer_id};

/// How often a blocked TLS read looks at the deadline and the shutdown flag.
const POLL: Duration = Duration::from_millis(200);
/// Longest a send may make no progress (the peer stopped reading).
pub(super) const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Reply bytes gathered before a TLS write.
const WRITE_BUF: usize = 64 * 1024;
/// Largest TLS record payload (RFC 8446 5.1: 2^14 bytes).
const RECORD: usize = 16 * 1024;

/// Ciphertext gathered before a send: a whole 256 KiB READ reply as TLS
/// records (16 KiB each, plus their headers and tags).
const SOCK_BUF: usize = 320 * 1024;

/// The socket under TLS, blocking. OpenSSL writes one record at a time;
/// they are gathered in `wbuf` and sent on `flush` (OpenSSL flushes after each
/// handshake flight, [`TlsWrite`] after each batch of replies), or sooner when
/// full: one send per reply rather than one per 16 KiB record.
#[derive(Debug)]
pub(super) struct Sock {
    s: SockKind,
    wbuf: Vec<u8>,
}

#[derive(Debug)]
enum SockKind {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Sock {
    /// The tokio socket as a blocking std one.
    pub(super) fn blocking(conn: Conn) -> std::io::Result<Sock> {
        let s = match conn {
            Conn::Tcp(s) => SockKind::Tcp(s.into_std()?),
            Conn::Unix(s) => SockKind::Unix(s.into_std()?),
            Conn::Stdio => {
                return Err(std::io::Error::other(
                    "TLS on stdin/stdout is not supported",
                ))
            }
        };
        match &s {
            SockKind::Tcp(t) => {
                t.set_nonblocking(false)?;
                t.set_read_timeout(Some(POLL))?;
                t.set_write_timeout(Some(SEND_TIMEOUT))?;
            }
            SockKind::Unix(u) => {
                u.set_nonblocking(false)?;
                u.set_read_timeout(Some(POLL))?;
                u.set_write_timeout(Some(SEND_TIMEOUT))?;
            }
        }
        Ok(Sock {
            s,
            wbuf: Vec::new(),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match &self.s {
            SockKind::Tcp(s) => s.set_read_timeout(t),
            SockKind::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn raw_write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match &mut self.s {
            SockKind::Tcp(s) => s.write(b),
            SockKind::Unix(s) => s.write(b),
        }
    }

    fn send_wbuf(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        while done < self.wbuf.len() {
            let b = std::mem::take(&mut self.wbuf);
            let r = self.raw_write(&b[done..]);
            self.wbuf = b;
            match r {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        Ok(())
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.s {
            SockKind::Tcp(s) => s.read(b),
            SockKind::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.wbuf.len() + b.len() > SOCK_BUF {
            self.send_wbuf()?;
        }
        if b.len() >= SOCK_BUF {
            return self.raw_write(b);
        }
        self.wbuf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send_wbuf()
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match &self.s {
            SockKind::Tcp(s) => s.as_raw_fd(),
            SockKind::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// The TLS stream, used by one thread only (see the module docs).
type Shared = Arc<Mutex<SslStream<Sock>>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, SslStream<Sock>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The TLS server handshake on `sock`, until `deadline` or shutdown.
fn accept(ctx: &Ctx, sock: Sock, deadline: Instant) -> Result<SslStream<Sock>, String> {
    let ssl = match ctx.tls.ssl() {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Err(format!("cannot start TLS: {e}")),
        None => return Err("TLS is off".into()),
    };
    let mut r = ssl.accept(sock);
    loop {
        match r {
            Ok(s) => return Ok(s),
            Err(HandshakeError::WouldBlock(mid)) => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "not finished within the handshake time ({HANDSHAKE_TIMEOUT:?})"
                    ));
                }
                if ctx.shutting_down() {
                    return Err("the server is shutting down".into());
                }
                r = mid.handshake();
            }
            Err(HandshakeError::Failure(mut mid)) => {
                // The alert telling the client why.
                let _ = mid.get_mut().flush();
                let e = mid.error();
                let why = match (e.ssl_error(), e.io_error()) {
                    (Some(s), _) => s.to_string(),
                    (None, Some(io)) => io.to_string(),
                    (None, None) => format!("{:?}", e.code()),
                };
                return Err(why);
            }
            Err(HandshakeError::SetupFailure(e)) => return Err(e.to_string()),
        }
    }
}

/// The rest of a connection after STARTTLS was ACKed: TLS handshake, option
/// haggling over TLS, transmission. Runs on the connection's own thread.
pub(super) fn serve(
    ctx: &Ctx,
    sock: Sock,
    no_zeroes: bool,
    deadline: Instant,
    rt: &tokio::runtime::Handle,
) -> Result<(), ConnError> {
    let stream = match accept(ctx, sock, deadline) {
        Ok(s) => {
            ctx.stats.tls_handshakes_ok.fetch_add(1, Ordering::Relaxed);
            s
        }
        Err(why) => {
            ctx.stats
                .tls_handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(error = %why, "TLS handshake failed");
            return Err(ConnError::TlsHandshake(why));
        }
    };
    let peer = peer_id(stream.ssl());
    tracing::debug!(%peer, tls = %describe(stream.ssl()), "TLS up");
    let fd = stream.get_ref().as_raw_fd();
    let shared: Shared = Arc::new(Mutex::new(stream));
    let link = handshake::Link::Tls { peer, no_zeroes };
    let left = deadline.saturating_duration_since(Instant::now());
    let hs = {
        let (mut r, mut w) = (Blocking(&shared), Blocking(&shared));
        // The timer is made inside the runtime's context.
        rt.block_on(async {
            tokio::time::timeout(left, handshake::handshake(ctx, &mut r, &mut w, &link)).await
        })
    };
    let r = match hs {
        Err(_) => Err(ConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(handshake::Haggled::Abort)) => Ok(()),
        // The handshake refuses a second STARTTLS; never returned over TLS.
        Ok(Ok(handshake::Haggled::StartTls { .. })) => {
            Err(ConnError::Protocol("STARTTLS over TLS".into()))
        }
        Ok(Ok(handshake::Haggled::Session(sess))) => {
            tracing::debug!(
                export = sess.disk().name(),
                structured = sess.structured,
                "entering transmission over TLS"
            );
            let rd = TlsRead {
                s: shared.clone(),
                fd,
            };
            let wr = TlsWrite {
                s: shared.clone(),
                fd,
                buf: Vec::with_capacity(WRITE_BUF),
            };
            transmit::transmission(ctx, sess, Box::new(rd), Box::new(wr))
        }
    };
    // close_notify: GnuTLS peers report an error without it.
    let mut s = lock(&shared);
    let _ = s.shutdown();
    let _ = s.get_mut().flush();
    drop(s);
    r
}

/// The TLS stream as tokio I/O, for the option haggling on this thread: reads
/// block for at most [`POLL`], then return `Pending` (woken at once), so the
/// haggling's deadline and shutdown checks run in between.
struct Blocking<'a>(&'a Shared);

impl AsyncRead for Blocking<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut s = lock(self.0);
        match s.read(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Blocking<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(lock(self.0).write(buf))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(lock(self.0).flush())
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The transmission phase's read handle on the TLS stream.
struct TlsRead {
    s: Shared,
    fd: RawFd,
}

impl Read for TlsRead {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        lock(&self.s).read(b)
    }
}

impl AsRawFd for TlsRead {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl SockRead for TlsRead {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        lock(&self.s).get_ref().set_read_timeout(t)
    }
    /// Decrypted bytes OpenSSL holds count as well as bytes on the socket.
    fn has_pending(&self) -> bool {
        lock(&self.s).ssl().pending() > 0
            || crate::sys::bytes_pending(self.fd).map_or(true, |n| n > 0)
    }
    fn one_thread(&self) -> bool {
        true
    }
}

/// The transmission phase's write handle: gathers reply bytes in `buf` (up to
/// [`WRITE_BUF`]) and sends them through TLS on `flush`, or sooner when full.
struct TlsWrite {
    s: Shared,
    fd: RawFd,
    buf: Vec<u8>,
}

impl TlsWrite {
    fn send_buf(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            lock(&self.s).write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// How many of `len` more bytes fill `buffered` bytes up to the end of a TLS
/// record (0 when `buffered` already ends one).
fn to_record_end(buffered: usize, len: usize) -> usize {
    ((RECORD - buffered % RECORD) % RECORD).min(len)
}

impl Write for TlsWrite {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() <= WRITE_BUF {
            self.buf.extend_from_slice(b);
            return Ok(b.len());
        }
        if !self.buf.is_empty() {
            // Fill the buffer up to the end of its last TLS record (a reply
            // header then shares its first record with the data) and send it;
            // the rest comes in the next call, straight from the caller's
            // buffer: at most one record's worth is copied here.
            let k = to_record_end(self.buf.len(), b.len());
            self.buf.extend_from_slice(&b[..k]);
            self.send_buf()?;
            if k > 0 {
                return Ok(k);
            }
            return self.write(b);
        }
        // Large data goes out as it is (OpenSSL splits it into records).
        lock(&self.s).write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buf()?;
        lock(&self.s).flush()
    }
}

impl AsRawFd for TlsWrite {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl SockWrite for TlsWrite {
    fn raw_fd(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_topped_up_to_one_record_only() {
        // A 16-byte reply header ahead of 256 KiB of data: one record's worth.
        assert_eq!(to_record_end(16, 256 * 1024), RECORD - 16);
        // A structured chunk header (20 bytes) behind held replies.
        assert_eq!(to_record_end(RECORD + 20, 256 * 1024), RECORD - 20);
        // Already on a record boundary: nothing is copied.
        assert_eq!(to_record_end(RECORD, 256 * 1024), 0);
        assert_eq!(to_record_end(2 * RECORD, 100_000), 0);
        // Never more than the caller has.
        assert_eq!(to_record_end(60 * 1024, 5 * 1024), 4 * 1024);
        assert_eq!(to_record_end(50 * 1024, 1000), 1000);
    }
}
