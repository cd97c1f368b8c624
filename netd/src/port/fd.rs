//! Ports on a descriptor whose every read and write is one frame after its
//! virtio-net header: a TAP queue opened with IFF_VNET_HDR (`tap`, the hostonly
//! `host` TAP) or an AF_PACKET socket with PACKET_VNET_HDR (`vm`, `uplink`).
//!
//! Transmit ([`FdTx`]) is one `writev` of header and frame on the caller's thread.
//! Receive ([`rx_loop`]) reads until `EAGAIN` and only then waits in `poll(2)` on the
//! fd and the stop eventfd: under load one `read` per frame and no `poll`. A port
//! whose device can disappear (a TAP deleted with its namespace, a VMM's TAP removed)
//! is a *reopening* port: when reading fails for good its thread retries opening the
//! device every half second and carries on with the new fd, meanwhile sends count as
//! `drop_down`. Such a port may instead be read by another thread's loop (see
//! [`super::InlineReader`]), which hands it back here when a read fails there.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::common::{attach, finish_start, spawn_thread, Cleanup, RunningPort, Stop};
use super::rxpool::RxPool;
use super::{GiveReader, InlineReader, PortError, MAX_FRAME};
use crate::config::PortSpec;
use crate::offload::{check_gso, VnetHdr, VNET_HDR_LEN};
use crate::switch::{Network, Port, PortClass, TxError, VnetTx};
use crate::sys;

pub(super) fn classify(e: io::Error) -> TxError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => TxError::Full,
        Some(libc::ENETDOWN) | Some(libc::EIO) | Some(libc::ENXIO) | Some(libc::EBADFD) => {
            TxError::Down
        }
        _ => TxError::Io(e),
    }
}

/// Transmit on a fd whose every write is one frame preceded by a virtio-net
/// header (TAP with IFF_VNET_HDR, AF_PACKET with PACKET_VNET_HDR). The fd can be
/// replaced when a `vm` port's TAP is recreated.
pub(super) struct FdTx(Arc<RwLock<Option<Arc<OwnedFd>>>>);

impl VnetTx for FdTx {
    fn send_with_hdr(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        let fd = guard.as_ref().ok_or(TxError::Down)?;
        match sys::writev2(fd.as_raw_fd(), hdr, frame) {
            Ok(_) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }
}

/// Whether a frame read with header `h` asks for too much segmentation work (see
/// [`crate::offload::check_gso`]); such a frame is counted (`drop_gso`) on `port`
/// and goes nowhere, whichever ports it was for.
pub(super) fn gso_refused(port: &Port, h: &VnetHdr, frame: &[u8]) -> bool {
    match check_gso(h, frame) {
        Ok(()) => false,
        Err(e) => {
            port.counters
                .drop_gso
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(port = %port.name, error = %e, "GSO frame refused");
            true
        }
    }
}

/// Size of the receive buffer of fd-based ports: a vnet header and a frame.
pub(super) const RX_BUF: usize = VNET_HDR_LEN + MAX_FRAME;

/// Reads frames (each after its virtio-net header) from `fd` into the switch until
/// stopped or a hard error. `buf` is the receive buffer (one read, one frame):
/// while a capture runs on the network, each frame is handed over in it as a
/// [`Bytes`] ([`Network::ingress_rx`]), so the capture keeps it without a copy,
/// and the next read goes to a buffer from `pool` (see [`super::rxpool`]).
pub(super) fn rx_loop(
    net: &Network,
    port: &Port,
    fd: RawFd,
    stop: &Stop,
    buf: &mut Vec<u8>,
    pool: &Arc<RxPool>,
) -> io::Result<()> {
    let mut lent = false;
    loop {
        if stop.is_set() {
            return Ok(());
        }
        match sys::read(fd, buf) {
            Ok(0) => {
                // A TAP never returns 0; treat it as "nothing now".
                if sys::poll2(fd, stop.efd.as_raw_fd(), 100)? {
                    return Ok(());
                }
            }
            Ok(n) => {
                let got = buf.get(..n).unwrap_or_default();
                if got
                    .get(VNET_HDR_LEN..)
                    .is_some_and(crate::daemon::is_fault_frame)
                {
                    panic!("injected fault (fault frame, NETD_FAULT_INJECTION=1)");
                }
                if net.capturing() {
                    lent = true;
                    let msg = pool.lend(buf, n);
                    switch_msg(net, port, &msg, Some(&msg));
                } else {
                    if std::mem::take(&mut lent) {
                        // The capture ended: its buffers are not needed any more.
                        pool.clear();
                    }
                    switch_msg(net, port, got, None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if lent && !net.capturing() {
                    lent = false;
                    pool.clear();
                }
                if sys::poll2(fd, stop.efd.as_raw_fd(), -1)? {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Switches one message read by [`rx_loop`] (virtio-net header, then the frame);
/// `shared`: the same message as a [`Bytes`] a capture may keep, None when no
/// capture runs (the loop looked).
fn switch_msg(net: &Network, port: &Port, got: &[u8], shared: Option<&Bytes>) {
    let frame_of = |m: &Bytes| m.slice(VNET_HDR_LEN..);
    match (VnetHdr::parse(got), got.get(VNET_HDR_LEN..)) {
        (Some(h), Some(frame)) if h.is_plain() => {
            let shared = shared.map(frame_of);
            net.ingress_rx(port, frame, None, shared.as_ref())
        }
        (Some(h), Some(frame)) if gso_refused(port, &h, frame) => {}
        (Some(h), Some(frame)) => {
            let shared = shared.map(frame_of);
            net.ingress_rx(port, frame, Some(&h), shared.as_ref())
        }
        // Shorter than a header: counted as malformed by the switch.
        _ => net.ingress(port, &[]),
    }
}

/// Starts a port on `fd` (one frame, after its virtio-net header, per read and
/// write) with a receive thread that ends on the first hard error: for devices that
/// do not come back (the hostonly host TAP, a bridged network's uplink).
pub(super) fn start_fd_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    kind: PortClass,
    fd: OwnedFd,
    cleanup: Cleanup,
) -> Result<RunningPort, PortError> {
    let fd = Arc::new(fd);
    let slot = Arc::new(RwLock::new(Some(fd.clone())));
    let (port, stop) = attach(net, spec, kind, Box::new(FdTx(slot)))?;
    let (n2, s2) = (net.clone(), stop.clone());
    let name = spec.name.clone();
    let thread = spawn_thread(format!("rx-{}", spec.name), move || {
        let mut buf = vec![0u8; RX_BUF];
        let pool = RxPool::new(RX_BUF);
        if let Err(e) = rx_loop(&n2, &port, fd.as_raw_fd(), &s2, &mut buf, &pool) {
            tracing::warn!(port = %name, error = %e, "port receive stopped");
        }
    });
    let started = thread.map(|t| (Some(t), None));
    finish_start(net, spec, kind, stop, started, cleanup)
}

/// Reopens a port's fd after its device went away.
pub(super) type Reopen = Box<dyn Fn() -> io::Result<OwnedFd> + Send>;

/// Starts a port on a vnet-header fd whose device may disappear: when reading fails
/// for good, the thread retries `reopen` every half second until it succeeds (or the
/// port is stopped), and carries on with the new fd. Meanwhile sends count as
/// `drop_down`. With `inline`, the fd is first offered to another loop as an
/// [`InlineReader`]; the thread only starts if that loop declines it or, later, when
/// a read fails for good there.
pub(super) fn start_reopening_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    kind: PortClass,
    fd: OwnedFd,
    reopen: Reopen,
    cleanup: Cleanup,
    inline: Option<(Arc<Port>, GiveReader<'_>)>,
) -> Result<RunningPort, PortError> {
    let fd = Arc::new(fd);
    let slot = Arc::new(RwLock::new(Some(fd.clone())));
    let (port, stop) = attach(net, spec, kind, Box::new(FdTx(slot.clone())))?;
    let reader = ReopeningReader {
        net: net.clone(),
        port,
        slot,
        stop: stop.clone(),
        reopen,
        name: spec.name.clone(),
    };
    let started = match inline {
        Some((local, give)) => {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let r = InlineReader {
                fd,
                local,
                inner: reader,
                done: done_tx,
            };
            match give(r) {
                Ok(()) => Ok((None, Some(done_rx))),
                Err(r) => {
                    tracing::debug!(port = %spec.name, "no inline reader; port thread instead");
                    r.fall_back().map(|()| (None, Some(done_rx)))
                }
            }
        }
        None => reader.spawn(None).map(|t| (Some(t), None)),
    };
    finish_start(net, spec, kind, stop, started, cleanup)
}

/// What the receive thread of a reopening port works with.
pub(super) struct ReopeningReader {
    pub(super) net: Arc<Network>,
    pub(super) port: Arc<Port>,
    pub(super) slot: Arc<RwLock<Option<Arc<OwnedFd>>>>,
    pub(super) stop: Arc<Stop>,
    pub(super) reopen: Reopen,
    pub(super) name: String,
}

impl ReopeningReader {
    /// Starts the receive thread; `done` is dropped when it ends.
    pub(super) fn spawn(
        self,
        done: Option<std::sync::mpsc::Sender<()>>,
    ) -> Result<JoinHandle<()>, PortError> {
        spawn_thread(format!("rx-{}", self.name), move || {
            let _done = done;
            self.run();
        })
    }

    fn run(self) {
        let ReopeningReader {
            net,
            port,
            slot,
            stop,
            reopen,
            name,
        } = self;
        let mut buf = vec![0u8; RX_BUF];
        let pool = RxPool::new(RX_BUF);
        while !stop.is_set() {
            let cur = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(fd) = cur {
                // The supervisor: a panic in the switch path (or anything under it)
                // costs the frame being handled, not the port. Logged with its cause,
                // counted in the port's `restarts`; the loop reads on after the pause.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rx_loop(&net, &port, fd.as_raw_fd(), &stop, &mut buf, &pool)
                }));
                match r {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => {
                        tracing::info!(port = %name, error = %e, "port lost its device; will reopen")
                    }
                    Err(p) => {
                        let cause = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        let n = port
                            .counters
                            .restarts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                            + 1;
                        tracing::error!(port = %name, %cause, restarts = n, "port receive thread panicked; restarting it");
                        // The device is fine: read it again after the pause below.
                        if let Ok(d) = sys::eventfd() {
                            if sys::poll2(d.as_raw_fd(), stop.efd.as_raw_fd(), 100).unwrap_or(true)
                            {
                                return;
                            }
                        }
                        continue;
                    }
                }
            }
            *slot.write().unwrap_or_else(|e| e.into_inner()) = None;
            // Wait a little (stoppably), then try again.
            if let Ok(d) = sys::eventfd() {
                if sys::poll2(d.as_raw_fd(), stop.efd.as_raw_fd(), 500).unwrap_or(true) {
                    return;
                }
            }
            match reopen() {
                Ok(fd) => {
                    tracing::info!(port = %name, "port reopened");
                    // A new device, a new MAC behind it: not a spoof of the old one.
                    port.guard.release_learned();
                    *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fd));
                }
                Err(e) => tracing::debug!(port = %name, error = %e, "device not back yet"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::testing::{device, eventually, frame, sink, spec, with_hdr};
    use super::*;
    use crate::config::PortKind;
    use crate::switch::PortTx;

    #[test]
    fn errnos_map_to_drop_reasons() {
        let e = |n| classify(io::Error::from_raw_os_error(n));
        assert!(matches!(e(libc::EAGAIN), TxError::Full));
        assert!(matches!(e(libc::ENOBUFS), TxError::Full));
        for n in [libc::ENETDOWN, libc::EIO, libc::ENXIO, libc::EBADFD] {
            assert!(matches!(e(n), TxError::Down), "{n}");
        }
        assert!(matches!(e(libc::EPERM), TxError::Io(_)));
        // A port whose device is gone has no fd: down.
        let gone = FdTx(Arc::new(RwLock::new(None)));
        assert!(matches!(gone.send(&frame(1, 60)), Err(TxError::Down)));
    }

    /// The fd port "d" (a TAP) on `fd`.
    fn tap_port_d(net: &Arc<Network>, fd: OwnedFd) -> RunningPort {
        start_fd_port(
            net,
            &spec("d", PortKind::Tap),
            PortClass::Tap,
            fd,
            Cleanup::None,
        )
        .unwrap()
    }

    #[test]
    fn an_fd_port_moves_frames_after_a_vnet_header() {
        let (net, sink_port, seen) = sink();
        let (fd, dev) = device();
        let rp = tap_port_d(&net, fd);
        let f = frame(7, 60);
        dev.send(&with_hdr(&f)).unwrap();
        dev.send(&[1, 2, 3]).unwrap();
        assert!(eventually(|| seen.lock().unwrap().len() == 1));
        assert_eq!(seen.lock().unwrap()[0], f);
        let port = net.port("d").unwrap();
        assert!(eventually(|| port
            .counters
            .drop_malformed
            .load(Ordering::Relaxed)
            == 1));
        // Towards the device: a zero header, then the frame, in one datagram.
        let back = frame(9, 70);
        net.ingress(&sink_port, &back);
        let mut buf = vec![0u8; 200];
        let n = dev.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &with_hdr(&back)[..]);
        rp.shutdown();
        assert!(net.port("d").is_none());
    }

    /// Regression (issue 11, item 9): a super-frame with segment size 1 from a vnet
    /// port is refused on ingress and counted, not cut into 65,000 frames.
    #[test]
    fn a_gso_frame_with_tiny_segments_is_refused_on_ingress() {
        let (net, _sink_port, seen) = sink();
        let (fd, dev) = device();
        let rp = tap_port_d(&net, fd);
        let h = VnetHdr {
            flags: crate::offload::F_NEEDS_CSUM,
            gso_type: crate::offload::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut msg = h.to_bytes().to_vec();
        msg.extend_from_slice(&frame(7, 60_000));
        dev.send(&msg).unwrap();
        // An honest frame after it still goes through.
        dev.send(&with_hdr(&frame(7, 60))).unwrap();
        assert!(eventually(|| seen.lock().unwrap().len() == 1));
        let c = net.port("d").unwrap().counters.snapshot();
        assert_eq!(c.drop_gso, 1, "{c:?}");
        assert_eq!(c.rx_frames, 1, "{c:?}");
        assert_eq!(seen.lock().unwrap()[0].len(), 60);
        rp.shutdown();
    }
}
