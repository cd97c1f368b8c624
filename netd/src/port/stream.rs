//! `stream` ports: QEMU's `-netdev stream` framing (a 4-byte big-endian length,
//! then the frame) on a unix socket netd listens on, as passt speaks it.
//!
//! One peer at a time; after it leaves, the next connection is accepted. A length
//! above [`MAX_FRAME`] is a protocol violation: that connection is closed and
//! counted (`drop_malformed`), netd carries on.
//!
//! Transmit never blocks the sender. The switch calls [`StreamTx::send`] on the
//! thread of whichever port a frame came in on, under the network's port list; a
//! peer that reads slowly (or never) must not hold that thread. So a send only
//! appends the framed bytes to the peer's own [`TxQueue`], bounded in bytes
//! ([`TX_QUEUE_BYTES`], each frame charged [`FRAME_COST`] more for its bookkeeping),
//! and a writer thread of that connection does the blocking writes. When the queue
//! is full the frame is dropped and counted on this port (`drop_full`): a slow peer
//! loses only its own frames. A failed write ends the connection (a partial frame
//! would desynchronise the framing).
//!
//! The socket path. netd binds `path` itself and removes it with the port, and it
//! never unlinks what is not its own: a file there that is not a socket is refused,
//! and so is a socket somebody listens on or that belongs to another user; only a
//! stale socket of netd's user (nobody listening: a netd that died) is replaced. On
//! removal the socket is unlinked only while it still is the one netd bound.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::common::{attach, finish_start, socket_id, spawn_thread, Cleanup, Stop};
use super::{PortError, RunningPort, MAX_FRAME};
use crate::config::PortSpec;
use crate::switch::{Network, Port, PortClass, PortTx, TxError};
use crate::sys;

/// Most bytes waiting for one stream peer: about 700 full 1500-byte frames.
pub(super) const TX_QUEUE_BYTES: usize = 1 << 20;
/// What a queued frame costs beyond its bytes (its length prefix and bookkeeping),
/// so a flood of tiny frames is bounded too.
pub(super) const FRAME_COST: usize = 64;

/// The transmit queue of one stream peer: framed messages waiting for its writer
/// thread, bounded in bytes.
#[derive(Default)]
pub(super) struct TxQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    msgs: VecDeque<Vec<u8>>,
    /// Bytes charged for what is queued or being written.
    charged: usize,
    closed: bool,
}

impl TxQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame` with its length prefix, or says why not: `Full` over the
    /// byte bound, `Down` once the connection is over.
    pub(super) fn push(&self, frame: &[u8]) -> Result<(), TxError> {
        let len = u32::try_from(frame.len())
            .map_err(|_| TxError::Io(io::ErrorKind::InvalidInput.into()))?;
        let cost = frame.len() + FRAME_COST;
        let mut st = self.lock();
        if st.closed {
            return Err(TxError::Down);
        }
        if st.charged + cost > TX_QUEUE_BYTES {
            return Err(TxError::Full);
        }
        let mut msg = Vec::with_capacity(4 + frame.len());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(frame);
        st.msgs.push_back(msg);
        st.charged += cost;
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for messages; takes all of them (still charged until [`Self::written`]).
    /// None once closed.
    fn take(&self) -> Option<VecDeque<Vec<u8>>> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            if !st.msgs.is_empty() {
                return Some(std::mem::take(&mut st.msgs));
            }
            st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Releases the charge of messages written (`frame_bytes` without prefixes).
    fn written(&self, frames: usize, frame_bytes: usize) {
        let mut st = self.lock();
        st.charged = st.charged.saturating_sub(frame_bytes + frames * FRAME_COST);
    }

    /// Ends the queue: later pushes are `Down`, the writer stops.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// Transmit of a stream port: into the current peer's queue, if there is a peer.
struct StreamTx(Arc<Mutex<Option<Arc<TxQueue>>>>);

impl PortTx for StreamTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        let q = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(TxError::Down)?;
        q.push(frame)
    }
}

/// Why a stream port cannot have its path.
fn path_refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::AlreadyExists, why)
}

/// Makes `path` free for netd to bind, or refuses (see the module doc): nothing
/// there; or a stale socket of netd's own user, which is removed. Anything else is
/// left exactly as it is. (The control socket is claimed the same way.)
pub fn claim_socket_path(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    if !md.file_type().is_socket() {
        return Err(path_refused(format!(
            "{} exists and is not a socket; netd does not replace it",
            path.display()
        )));
    }
    let (euid, _) = sys::effective_ids();
    if md.uid() != euid {
        return Err(path_refused(format!(
            "{} is a socket of uid {}, not netd's; netd does not replace it",
            path.display(),
            md.uid()
        )));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(path_refused(format!(
            "{} is a socket another program listens on",
            path.display()
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            // Nobody listens: left by a netd that is gone.
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

pub(super) fn start_stream_port(
    net: &Arc<Network>,
    spec: &PortSpec,
) -> Result<RunningPort, PortError> {
    let path = spec.path.clone().unwrap_or_default();
    let listen_err = |source| PortError::Listen {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    claim_socket_path(&path).map_err(listen_err)?;
    let listener = UnixListener::bind(&path).map_err(listen_err)?;
    let id = socket_id(&path).ok_or_else(|| listen_err(io::ErrorKind::NotFound.into()))?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let conn: Arc<Mutex<Option<Arc<TxQueue>>>> = Arc::new(Mutex::new(None));
    let (port, stop) = attach(
        net,
        spec,
        PortClass::Stream,
        Box::new(StreamTx(conn.clone())),
    )?;
    let (n2, s2) = (net.clone(), stop.clone());
    let name = spec.name.clone();
    let thread = spawn_thread(format!("st-{}", spec.name), move || {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    tracing::info!(port = %name, "stream peer connected");
                    // A new peer is a new VM: its MAC is not a spoof of the last one's.
                    port.guard.release_learned();
                    if let Err(e) = serve_stream(&n2, &port, stream, &conn, &s2, &mut buf) {
                        tracing::info!(port = %name, error = %e, "stream peer left");
                    }
                    *conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sys::poll2(listener.as_raw_fd(), s2.efd.as_raw_fd(), -1).unwrap_or(true) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(port = %name, error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if s2.is_set() {
                return;
            }
        }
    });
    let started = thread.map(|t| (Some(t), None));
    finish_start(
        net,
        spec,
        PortClass::Stream,
        stop,
        started,
        Cleanup::RemoveSocket(path, id),
    )
}

/// Reads exactly `buf.len()` bytes, waking up to check `stop`. Ok(false) on a
/// clean EOF before the first byte.
fn read_full(stream: &mut UnixStream, buf: &mut [u8], stop: &Stop) -> io::Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        if stop.is_set() {
            return Err(io::Error::other("port stopped"));
        }
        // The socket is blocking (its writer shares the file description), so
        // wait for readability first to stay stoppable.
        let (ready, woke) = sys::poll2_ready(stream.as_raw_fd(), stop.efd.as_raw_fd(), 1000)?;
        if woke {
            return Err(io::Error::other("port stopped"));
        }
        if !ready {
            continue;
        }
        match stream.read(buf.get_mut(off..).unwrap_or_default()) {
            Ok(0) if off == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn serve_stream(
    net: &Network,
    port: &Port,
    stream: UnixStream,
    conn: &Mutex<Option<Arc<TxQueue>>>,
    stop: &Stop,
    buf: &mut [u8],
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let queue = Arc::new(TxQueue::default());
    let writer = {
        let (q, mut w) = (queue.clone(), stream.try_clone()?);
        spawn_thread(format!("stw-{}", port.name), move || write_loop(&q, &mut w))
            .map_err(|e| io::Error::other(crate::error_chain(&e)))?
    };
    *conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(queue.clone());
    let mut reader = stream;
    let r = read_loop(net, port, &mut reader, stop, buf);
    // Wake a writer blocked on a peer that does not read, and end it.
    *conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    queue.close();
    let _ = reader.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    r
}

/// Writes queued frames to the peer until the queue closes or a write fails; a
/// failure ends the connection (the reader sees it shut down).
fn write_loop(q: &TxQueue, w: &mut UnixStream) {
    while let Some(batch) = q.take() {
        let (n, bytes) = (batch.len(), batch.iter().map(|m| m.len() - 4).sum());
        for msg in &batch {
            if w.write_all(msg).is_err() {
                // A partial write would desynchronise the framing: drop this peer.
                q.close();
                let _ = w.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        q.written(n, bytes);
    }
}

fn read_loop(
    net: &Network,
    port: &Port,
    reader: &mut UnixStream,
    stop: &Stop,
    buf: &mut [u8],
) -> io::Result<()> {
    loop {
        let mut hdr = [0u8; 4];
        if !read_full(reader, &mut hdr, stop)? {
            return Ok(());
        }
        let len = u32::from_be_bytes(hdr) as usize;
        if len > MAX_FRAME {
            port.counters
                .drop_malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame length {len} above {MAX_FRAME}"),
            ));
        }
        let frame = buf.get_mut(..len).unwrap_or_default();
        if !read_full(reader, frame, stop)? && len > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        net.ingress(port, frame);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::super::testing::{eventually, frame, sink, spec};
    use super::*;
    use crate::config::PortKind;

    fn start() -> (
        tempfile::TempDir,
        Arc<Network>,
        RunningPort,
        super::super::testing::Seen,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (net, _sink, seen) = sink();
        let mut s = spec("st", PortKind::Stream);
        s.path = Some(dir.path().join("sub/st.sock"));
        let rp = start_stream_port(&net, &s).unwrap();
        (dir, net, rp, seen)
    }

    fn connect(dir: &tempfile::TempDir) -> UnixStream {
        let c = UnixStream::connect(dir.path().join("sub/st.sock")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c
    }

    fn send_framed(c: &mut UnixStream, f: &[u8]) {
        c.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        c.write_all(f).unwrap();
    }

    #[test]
    fn frames_cross_both_ways_with_a_length_prefix() {
        let (dir, net, rp, seen) = start();
        let mut c = connect(&dir);
        let f = frame(7, 60);
        // Split across writes: the reader waits for the whole frame.
        c.write_all(&60u32.to_be_bytes()[..2]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        c.write_all(&60u32.to_be_bytes()[2..]).unwrap();
        c.write_all(&f).unwrap();
        send_framed(&mut c, &frame(7, 100));
        assert!(eventually(|| seen.lock().unwrap().len() == 2));
        assert_eq!(seen.lock().unwrap()[0], f);
        // From the switch to the peer: 4-byte big-endian length, then the frame.
        let from_sink = frame(9, 80);
        net.ingress(&net.port("sink").unwrap(), &from_sink);
        let mut hdr = [0u8; 4];
        c.read_exact(&mut hdr).unwrap();
        assert_eq!(u32::from_be_bytes(hdr), 80);
        let mut got = vec![0u8; 80];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, from_sink);
        let path = dir.path().join("sub/st.sock");
        assert!(path.exists());
        rp.shutdown();
        assert!(!path.exists(), "socket file removed with the port");
        assert!(net.port("st").is_none());
    }

    #[test]
    fn an_oversized_length_ends_that_peer_only() {
        let (dir, net, rp, seen) = start();
        let mut c = connect(&dir);
        c.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes()).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 0, "connection closed");
        let port = net.port("st").unwrap();
        assert_eq!(port.counters.drop_malformed.load(Ordering::Relaxed), 1);
        // The next peer is served; with no peer, sends count as down.
        assert!(eventually(|| {
            net.ingress(&net.port("sink").unwrap(), &frame(9, 60));
            port.counters.drop_down.load(Ordering::Relaxed) > 0
        }));
        let mut c2 = connect(&dir);
        send_framed(&mut c2, &frame(8, 60));
        assert!(eventually(|| seen.lock().unwrap().len() == 1));
        rp.shutdown();
    }

    #[test]
    fn a_stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (net, _sink, _seen) = sink();
        let mut s = spec("st", PortKind::Stream);
        s.path = Some(path.clone());
        let rp = start_stream_port(&net, &s).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        rp.shutdown();
    }

    /// Regression (issue 11, item 10): a peer that never reads stalled the thread
    /// of every port that sent to it. Now its queue fills, its frames are dropped
    /// and counted, and the sender never waits.
    #[test]
    fn a_peer_that_never_reads_costs_only_its_own_frames() {
        let (dir, net, rp, _seen) = start();
        let c = connect(&dir);
        let port = net.port("st").unwrap();
        let sink = net.port("sink").unwrap();
        // Wait until the peer is being served (a frame reaches its queue).
        assert!(eventually(|| {
            net.ingress(&sink, &frame(9, 60));
            port.counters.tx_frames.load(Ordering::Relaxed) > 0
        }));
        let t0 = std::time::Instant::now();
        let n = 20_000;
        for _ in 0..n {
            net.ingress(&sink, &frame(9, 1514));
        }
        let took = t0.elapsed();
        let s = port.counters.snapshot();
        assert!(s.drop_full > 0, "{s:?}");
        // What was queued or written is bounded by the queue and the socket buffer.
        assert!(s.tx_bytes < 8 * TX_QUEUE_BYTES as u64, "{s:?}");
        assert!(took < Duration::from_secs(5), "sending took {took:?}");
        // The peer still gets whole frames in order once it reads.
        let mut c = c;
        let mut hdr = [0u8; 4];
        c.read_exact(&mut hdr).unwrap();
        assert_eq!(u32::from_be_bytes(hdr), 60);
        rp.shutdown();
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_frames() {
        let q = TxQueue::default();
        let mut n = 0;
        while q.push(&[0u8; 1000]).is_ok() {
            n += 1;
        }
        assert_eq!(n, TX_QUEUE_BYTES / (1000 + FRAME_COST));
        assert!(matches!(q.push(&[0u8; 1000]), Err(TxError::Full)));
        // Tiny frames are bounded by their cost too.
        let q = TxQueue::default();
        let mut n = 0;
        while q.push(&[]).is_ok() {
            n += 1;
        }
        assert_eq!(n, TX_QUEUE_BYTES / FRAME_COST);
        // Written messages free their room; a closed queue is down.
        let b = q.take().unwrap();
        q.written(b.len(), 0);
        assert!(q.push(&[1]).is_ok());
        q.close();
        assert!(matches!(q.push(&[1]), Err(TxError::Down)));
        assert!(q.take().is_none());
    }

    /// Regression (issue 11, item 12): a stream port's path unlinked whatever
    /// socket was there.
    #[test]
    fn a_path_that_is_not_netds_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (net, _sink, _seen) = sink();
        let mut s = spec("st", PortKind::Stream);
        // A regular file.
        let file = dir.path().join("file");
        std::fs::write(&file, b"precious").unwrap();
        s.path = Some(file.clone());
        assert!(matches!(
            start_stream_port(&net, &s),
            Err(PortError::Listen { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A socket somebody listens on.
        let other = dir.path().join("other.sock");
        let l = std::os::unix::net::UnixListener::bind(&other).unwrap();
        s.path = Some(other.clone());
        let e = start_stream_port(&net, &s).err().expect("refused");
        assert!(
            crate::error_chain(&e).contains("listens"),
            "{}",
            crate::error_chain(&e)
        );
        assert!(
            UnixStream::connect(&other).is_ok(),
            "its socket still works"
        );
        drop(l);
        // A directory.
        s.path = Some(dir.path().to_path_buf());
        assert!(start_stream_port(&net, &s).is_err());
        assert!(dir.path().is_dir());
        assert!(net.port("st").is_none());
    }
}
