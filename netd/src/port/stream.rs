//! `stream` ports: QEMU's `-netdev stream` framing (a 4-byte big-endian length,
//! then the frame) on a unix socket netd listens on, as passt speaks it.
//!
//! One peer at a time; after it leaves, the next connection is accepted. The socket
//! is blocking (its writer, on other ports' threads, shares the file description),
//! so the reader waits for readability in `poll(2)` with the stop eventfd first, and
//! writes have a short timeout so a stuck peer cannot hold another port's thread. A
//! length above [`MAX_FRAME`] is a protocol violation: that connection is closed and
//! counted (`drop_malformed`), netd carries on. A failed write drops the peer too:
//! a partial frame would desynchronise the framing.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::common::{attach, finish_start, spawn_thread, Cleanup, Stop};
use super::{PortError, RunningPort, MAX_FRAME};
use crate::config::PortSpec;
use crate::switch::{Network, Port, PortClass, PortTx, TxError};
use crate::sys;

/// The current stream peer, with a reusable buffer for length + frame.
struct StreamConn {
    stream: UnixStream,
    buf: Vec<u8>,
}

struct StreamTx(Arc<Mutex<Option<StreamConn>>>);

impl PortTx for StreamTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let conn = guard.as_mut().ok_or(TxError::Down)?;
        let len = u32::try_from(frame.len())
            .map_err(|_| TxError::Io(io::ErrorKind::InvalidInput.into()))?;
        conn.buf.clear();
        conn.buf.extend_from_slice(&len.to_be_bytes());
        conn.buf.extend_from_slice(frame);
        if let Err(e) = conn.stream.write_all(&conn.buf) {
            // A partial write would desynchronise the framing: drop this peer.
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            *guard = None;
            return Err(TxError::Io(e));
        }
        Ok(())
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
    // A socket file left by an earlier run is stale: nobody can listen on it now.
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let conn: Arc<Mutex<Option<StreamConn>>> = Arc::new(Mutex::new(None));
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
        Cleanup::RemoveSocket(path),
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
    conn: &Mutex<Option<StreamConn>>,
    stop: &Stop,
    buf: &mut [u8],
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // Writes happen on other ports' threads: never let a stuck peer hold them long.
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = stream.try_clone()?;
    *conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(StreamConn {
        stream,
        buf: Vec::with_capacity(MAX_FRAME + 4),
    });
    loop {
        let mut hdr = [0u8; 4];
        if !read_full(&mut reader, &mut hdr, stop)? {
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
        if !read_full(&mut reader, frame, stop)? && len > 0 {
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
}
