//! DNS over TCP (RFC 7766) for a network's names: the same answers as over UDP.
//!
//! # Theory of operation
//!
//! A [`TcpDns`] front serves one network's [`LocalNames`] on a TCP listener: the
//! NAT router's on `127.0.0.1`, an ephemeral port (its guests' TCP connections to
//! the DNS address, port 53, are rewritten to it, as their UDP flows to the
//! resolver are), the hostonly responder's on the gateway address, port 53, bound
//! to the host TAP. Each connection carries messages framed by a 2-byte length;
//! several queries may follow each other on one connection, pipelined (sent before
//! the answers to the earlier ones came back), and the answers may come back in
//! another order (RFC 7766, 6.2.1.1: a client matches them by id).
//!
//! Each query goes through [`LocalNames::answer`], exactly as a UDP datagram does:
//! a local name (or NXDOMAIN of the domain) is answered from the table; any other
//! query is written, framed as it came, to one TCP connection to the host's first
//! resolver ([`Resolvers`], re-read when `resolv.conf` changes) that the client's
//! connection opened on its first forwarded query, and that connection's answers
//! are relayed back as they come. The client's ids are kept (the upstream
//! connection belongs to one client connection, so ids cannot clash). Why a TCP
//! upstream rather than the UDP relay of [`crate::modes::dns`]: an answer too large
//! for UDP (the reason a client retries over TCP) comes back whole.
//!
//! # Bounds
//!
//! Everything a client sends is hostile until parsed:
//!
//! - a query longer than [`MAX_QUERY`] bytes, or shorter than a DNS header, closes
//!   the connection at its length prefix (nothing of it is read), counted in
//!   `malformed`; so does a message that is not one readable question (the same
//!   check as UDP's), and a connection closed in the middle of a message;
//! - each message (its length and its bytes) must arrive within [`IDLE_TIMEOUT`]
//!   of the end of the previous one: a connection idle or dripping bytes that long
//!   is closed, counted in `tcp_timeouts`; so is a client that does not read its
//!   answers for that long (at most [`QUEUE`] answers, [`QUEUE_KIB`] KiB, wait for
//!   it: with the query being read, about 84 KiB per connection at most);
//! - at most `max_connections` are open at once, and at most `max_per_client` from
//!   one address (the hostonly responder: [`MAX_CONNECTIONS`], [`MAX_PER_CLIENT`]
//!   per guest); more are closed at once, counted in `tcp_refused`. On a NAT
//!   network every connection comes from the router's host socket on the loopback,
//!   so the front's bound is `max_flows` for all; per guest, the flow quota
//!   (`max_flows_per_guest`, `max_pending_per_guest`) bounds them, each being a
//!   flow;
//! - a forwarded query that cannot reach the resolver (none configured, connect or
//!   write failed within [`CONNECT_TIMEOUT`] / [`IDLE_TIMEOUT`]) closes the
//!   connection (the client sees what it would have seen connecting to a dead
//!   resolver), counted in `forward_dropped`.
//!
//! A client that closes its side (after its last query) still gets the answers on
//! their way: the upstream connection is shut down for writing, its last answers
//! are relayed (each within [`IDLE_TIMEOUT`]), then the connection is closed.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::{unix_now, Answer, LocalNames, Resolvers};

/// Longest query read (one question, with room for EDNS options).
pub const MAX_QUERY: usize = 4096;
/// How long one message may take to arrive (or to be taken by the client).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection to the resolver may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections open at once on a responder's listener.
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections open at once from one guest on a responder's listener.
pub const MAX_PER_CLIENT: usize = 16;
/// Answers waiting for one client to read them.
pub const QUEUE: usize = 16;
/// KiB of answers waiting for one client (the largest DNS message fits).
pub const QUEUE_KIB: u32 = 80;

/// The queue of answers to one client, bounded by count and by bytes.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<(Vec<u8>, OwnedSemaphorePermit)>,
    kib: Arc<Semaphore>,
}

impl Out {
    /// Queues `msg`, framed, waiting for room; false when the writer is gone.
    async fn send(&self, msg: &[u8]) -> bool {
        let m = framed(msg);
        let k = u32::try_from(m.len().div_ceil(1024)).unwrap_or(QUEUE_KIB);
        let Ok(permit) = self.kib.clone().acquire_many_owned(k.min(QUEUE_KIB)).await else {
            return false;
        };
        self.tx.send((m, permit)).await.is_ok()
    }
}

/// One network's DNS over TCP (see the module doc).
#[derive(Debug)]
pub struct TcpDns {
    names: Arc<LocalNames>,
    resolvers: Mutex<Resolvers>,
    open: AtomicUsize,
    max_connections: usize,
    /// Connections open per client address, and the bound on each.
    per_client: Mutex<HashMap<IpAddr, usize>>,
    max_per_client: usize,
    /// [`IDLE_TIMEOUT`] (shorter in unit tests).
    idle: Duration,
}

/// A running listener; dropping it stops accepting (open connections end on their
/// own, within their timeouts).
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Listener {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A task aborted when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One open connection from an address, counted while it lives.
struct Slot(Arc<TcpDns>, IpAddr);

impl Slot {
    /// A slot for a connection from `ip`, if the bounds leave one.
    fn take(front: &Arc<TcpDns>, ip: IpAddr) -> Option<Slot> {
        let mut t = front.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let mine = t.entry(ip).or_insert(0);
        if front.open.load(Ordering::Relaxed) >= front.max_connections
            || *mine >= front.max_per_client
        {
            if *mine == 0 {
                t.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        front.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot(front.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        let mut t = self.0.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.1);
            }
        }
    }
}

/// What reading one message gave.
enum Frame {
    Msg(Vec<u8>),
    /// The peer closed at a message boundary.
    Eof,
    /// A length out of bounds, or the peer closed inside a message.
    Bad,
    Timeout,
    Error,
}

/// Reads one length-prefixed message of `min..=max` bytes within `idle`.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    min: usize,
    max: usize,
    idle: Duration,
) -> Frame {
    let read = async {
        let mut len = [0u8; 2];
        match r.read(&mut len[..1]).await {
            Ok(0) => return Frame::Eof,
            Ok(_) => {}
            Err(_) => return Frame::Error,
        }
        let short = |e: std::io::Error| match e.kind() {
            ErrorKind::UnexpectedEof => Frame::Bad,
            _ => Frame::Error,
        };
        if let Err(e) = r.read_exact(&mut len[1..]).await {
            return short(e);
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n < min || n > max {
            return Frame::Bad;
        }
        let mut b = vec![0u8; n];
        match r.read_exact(&mut b).await {
            Ok(_) => Frame::Msg(b),
            Err(e) => short(e),
        }
    };
    tokio::time::timeout(idle, read)
        .await
        .unwrap_or(Frame::Timeout)
}

/// `msg` with its 2-byte length in front (`msg` is at most 65535 bytes: a query
/// read within [`MAX_QUERY`], or an answer built within a DNS message's bounds).
fn framed(msg: &[u8]) -> Vec<u8> {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(msg.len() + 2);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(msg.get(..usize::from(len)).unwrap_or(msg));
    v
}

/// The connection to the resolver a client connection opened.
struct Upstream {
    w: OwnedWriteHalf,
    relay: Task,
}

impl TcpDns {
    /// The front of `names`, forwarding to the first resolver of `resolv_conf`, with
    /// at most `max_connections` open, `max_per_client` of them from one address.
    pub fn new(
        names: Arc<LocalNames>,
        resolv_conf: PathBuf,
        max_connections: usize,
        max_per_client: usize,
    ) -> Arc<Self> {
        Arc::new(TcpDns {
            names,
            resolvers: Mutex::new(Resolvers::new(resolv_conf)),
            open: AtomicUsize::new(0),
            max_connections,
            per_client: Mutex::default(),
            max_per_client,
            idle: IDLE_TIMEOUT,
        })
    }

    /// Listens on `127.0.0.1`, an ephemeral port; must be called inside a tokio
    /// runtime.
    pub fn spawn_loopback(self: &Arc<Self>) -> std::io::Result<Listener> {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        l.set_nonblocking(true)?;
        self.spawn(TcpListener::from_std(l)?)
    }

    /// Serves on `l`; must be called inside a tokio runtime.
    pub fn spawn(self: &Arc<Self>, l: TcpListener) -> std::io::Result<Listener> {
        let addr = l.local_addr()?;
        let task = tokio::spawn(self.clone().accept_loop(l));
        Ok(Listener { addr, task })
    }

    fn count(&self, c: fn(&super::Counters) -> &AtomicU64) {
        c(&self.names.counters).fetch_add(1, Ordering::Relaxed);
    }

    async fn accept_loop(self: Arc<Self>, l: TcpListener) {
        loop {
            let (s, peer) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, typically: wait instead of spinning.
                    tracing::warn!(error = %e, "DNS over TCP: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = Slot::take(&self, peer.ip()) else {
                self.count(|c| &c.tcp_refused);
                continue;
            };
            self.count(|c| &c.tcp_connections);
            tokio::spawn(self.clone().connection(s, slot));
        }
    }

    /// Serves one client connection until it closes, times out or misbehaves.
    async fn connection(self: Arc<Self>, s: TcpStream, _slot: Slot) {
        let _ = s.set_nodelay(true);
        let (mut rd, wr) = s.into_split();
        let (tx, rx) = mpsc::channel(QUEUE);
        let tx = Out {
            tx,
            kib: Arc::new(Semaphore::new(QUEUE_KIB as usize)),
        };
        let mut writer = tokio::spawn(self.clone().write_loop(wr, rx));
        let mut up: Option<Upstream> = None;
        let clean = loop {
            let q = match read_frame(&mut rd, super::wire::HEADER_LEN, MAX_QUERY, self.idle).await {
                Frame::Msg(q) => q,
                Frame::Eof => break true,
                Frame::Bad => {
                    self.count(|c| &c.malformed);
                    break false;
                }
                Frame::Timeout => {
                    self.count(|c| &c.tcp_timeouts);
                    break false;
                }
                Frame::Error => break false,
            };
            match self.names.answer(&q, unix_now()) {
                Answer::Local(reply) => {
                    if !tx.send(&reply).await {
                        break false;
                    }
                }
                // Counted by `answer`.
                Answer::Drop => break false,
                Answer::Forward => {
                    if !self.forward(&mut up, &q, &tx).await {
                        self.count(|c| &c.forward_dropped);
                        break false;
                    }
                }
            }
        };
        if !clean {
            writer.abort();
            return;
        }
        // The client is done asking: let the answers on their way reach it.
        drop(tx);
        if let Some(u) = up {
            let Upstream { mut w, relay } = u;
            let _ = w.shutdown().await;
            // The relay ends at the resolver's EOF, or at its own timeout.
            let mut relay = relay;
            let _ = (&mut relay.0).await;
        }
        if tokio::time::timeout(self.idle, &mut writer).await.is_err() {
            writer.abort();
        }
    }

    /// Writes the answers of `rx` to the client, each within [`IDLE_TIMEOUT`].
    async fn write_loop(
        self: Arc<Self>,
        mut wr: OwnedWriteHalf,
        mut rx: mpsc::Receiver<(Vec<u8>, OwnedSemaphorePermit)>,
    ) {
        // The permit is given back once the answer is written.
        while let Some((m, _permit)) = rx.recv().await {
            match tokio::time::timeout(self.idle, wr.write_all(&m)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    self.count(|c| &c.tcp_timeouts);
                    return;
                }
            }
        }
        let _ = wr.shutdown().await;
    }

    /// Writes query `q` to the resolver, connecting first if this client has no
    /// live connection to it; false if it cannot.
    async fn forward(&self, up: &mut Option<Upstream>, q: &[u8], tx: &Out) -> bool {
        if up.as_ref().is_some_and(|u| u.relay.0.is_finished()) {
            *up = None;
        }
        let u = match up {
            Some(u) => u,
            None => {
                let target = self
                    .resolvers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .current();
                let Some(target) = target else {
                    return false;
                };
                let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%target, error = %e, "DNS over TCP: resolver unreachable");
                        return false;
                    }
                    Err(_) => return false,
                };
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                let relay = Task(tokio::spawn(relay(r, tx.clone(), self.idle)));
                up.insert(Upstream { w, relay })
            }
        };
        matches!(
            tokio::time::timeout(self.idle, u.w.write_all(&framed(q))).await,
            Ok(Ok(()))
        )
    }
}

/// Relays the resolver's answers to the client's queue until the resolver closes,
/// fails, is silent for [`IDLE_TIMEOUT`] or the client is gone.
async fn relay(mut r: OwnedReadHalf, tx: Out, idle: Duration) {
    let max = usize::from(u16::MAX);
    while let Frame::Msg(m) = read_frame(&mut r, super::wire::HEADER_LEN, max, idle).await {
        if !tx.send(&m).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::wire::tests::query;
    use super::super::wire::TYPE_A;
    use super::super::Zone;
    use super::*;

    fn front(max_per_client: usize) -> Arc<TcpDns> {
        let names = LocalNames::new(Zone {
            domain: "lab0.lab".into(),
            hosts: vec![("files".into(), Ipv4Addr::new(10, 0, 2, 9))],
            subnet: (Ipv4Addr::new(10, 0, 2, 0), 24),
        });
        let mut f = TcpDns::new(names, "/nonexistent/resolv.conf".into(), 8, max_per_client);
        if let Some(f) = Arc::get_mut(&mut f) {
            f.idle = Duration::from_millis(300);
        }
        f
    }

    /// Reads one framed answer: (its rcode, its last 4 bytes).
    async fn answer(s: &mut TcpStream) -> (u8, [u8; 4]) {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut b = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut b).await.unwrap();
        let tail = b[b.len() - 4..].try_into().unwrap();
        (b[3] & 0xf, tail)
    }

    /// Whether the server closed `s` (EOF or reset) within a second.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    fn counter(f: &TcpDns, c: fn(&super::super::Counters) -> &AtomicU64) -> u64 {
        c(&f.names.counters).load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn answers_pipelined_queries_and_refuses_bad_lengths() {
        let f = front(8);
        let l = f.spawn_loopback().unwrap();
        let mut s = TcpStream::connect(l.addr()).await.unwrap();
        // Two queries in one write, then a third after the answers.
        let mut both = framed(&query("files.lab0.lab", TYPE_A));
        both.extend(framed(&query("nobody.lab0.lab", TYPE_A)));
        s.write_all(&both).await.unwrap();
        assert_eq!(answer(&mut s).await, (0, [10, 0, 2, 9]));
        assert_eq!(answer(&mut s).await.0, 3, "NXDOMAIN");
        s.write_all(&framed(&query("files", TYPE_A))).await.unwrap();
        assert_eq!(answer(&mut s).await, (0, [10, 0, 2, 9]));
        // A length beyond the bound closes at once, counted.
        let before = counter(&f, |c| &c.malformed);
        let mut bad = TcpStream::connect(l.addr()).await.unwrap();
        bad.write_all(&[0xff, 0xff]).await.unwrap();
        assert!(closed(&mut bad).await, "huge length closes");
        // So does a message that is not a query (QR set).
        let mut bad = TcpStream::connect(l.addr()).await.unwrap();
        let mut resp = query("files.lab0.lab", TYPE_A);
        resp[2] |= 0x80;
        bad.write_all(&framed(&resp)).await.unwrap();
        assert!(closed(&mut bad).await, "a response closes");
        assert_eq!(counter(&f, |c| &c.malformed), before + 2);
        // The first connection still works; its EOF ends it cleanly.
        s.write_all(&framed(&query("files", TYPE_A))).await.unwrap();
        assert_eq!(answer(&mut s).await, (0, [10, 0, 2, 9]));
        s.shutdown().await.unwrap();
        assert!(closed(&mut s).await);
        assert_eq!(counter(&f, |c| &c.tcp_connections), 3);
    }

    #[tokio::test]
    async fn times_out_idle_and_slow_clients_and_bounds_connections() {
        let f = front(1);
        let l = f.spawn_loopback().unwrap();
        let mut idle = TcpStream::connect(l.addr()).await.unwrap();
        // The one slot is taken: a second connection is closed at once.
        let mut extra = TcpStream::connect(l.addr()).await.unwrap();
        assert!(closed(&mut extra).await, "over the bound");
        assert_eq!(counter(&f, |c| &c.tcp_refused), 1);
        assert!(closed(&mut idle).await, "idle closes");
        // A slow client: one byte of the length, then nothing.
        let mut slow = TcpStream::connect(l.addr()).await.unwrap();
        slow.write_all(&[0]).await.unwrap();
        assert!(closed(&mut slow).await, "slow closes");
        assert_eq!(counter(&f, |c| &c.tcp_timeouts), 2);
        // No resolver: a forwarded query closes the connection, counted.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut fwd = TcpStream::connect(l.addr()).await.unwrap();
        fwd.write_all(&framed(&query("www.outside.test", TYPE_A)))
            .await
            .unwrap();
        assert!(closed(&mut fwd).await, "nothing to forward to");
        assert_eq!(counter(&f, |c| &c.forward_dropped), 1);
    }
}
