//! A `tap` or `vm` port read by another thread's event loop instead of a receive
//! thread of its own ([`InlineReader`]): the NAT router reads its network's only
//! guest port this way (see the module doc of [`crate::nat`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::common::Stop;
use super::fd::{gso_refused, ReopeningReader, RX_BUF};
use super::PortError;
use crate::offload::{VnetHdr, VNET_HDR_LEN};
use crate::switch::Port;
use crate::sys;

/// A `tap` or `vm` port read by the event loop of a service on the same network
/// (the NAT router's thread) instead of a receive thread of its own: with one guest
/// behind a router, every frame the guest sends is read on the thread that handles
/// it, so it crosses no thread and no channel, and a frame for that service is
/// handed over in the buffer it was read into (no copy).
///
/// The loop registers [`InlineReader::fd`] and [`InlineReader::stop_fd`] with its
/// reactor, calls [`InlineReader::read`] while the fd is readable and hands each
/// frame to [`InlineReader::switch`]. When a read fails for good (the TAP went
/// away), [`InlineReader::fall_back`] gives the port a receive thread, which reopens
/// the device as for any port. Dropping the reader (the port was stopped, or the
/// loop ended) lets [`RunningPort::shutdown`](super::RunningPort::shutdown) go on.
pub struct InlineReader {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) local: Arc<Port>,
    pub(super) inner: ReopeningReader,
    pub(super) done: std::sync::mpsc::Sender<()>,
}

/// Most bytes one [`InlineReader::read`] takes: a virtio-net header and a frame.
pub const INLINE_READ_MAX: usize = RX_BUF;

/// A shared descriptor, for registering with a reactor.
pub struct SharedFd(Arc<OwnedFd>);

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The stop eventfd of an inline port, for registering with a reactor.
pub struct StopFd(Arc<Stop>);

impl AsRawFd for StopFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.efd.as_raw_fd()
    }
}

impl InlineReader {
    /// The port's fd (non-blocking; each read is a virtio-net header and a frame).
    pub fn fd(&self) -> SharedFd {
        SharedFd(self.fd.clone())
    }

    /// Readable once the port is to stop (see [`InlineReader::stopped`]).
    pub fn stop_fd(&self) -> StopFd {
        StopFd(self.inner.stop.clone())
    }

    /// Whether the port is being removed: drop the reader.
    pub fn stopped(&self) -> bool {
        self.inner.stop.is_set()
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Reads one message (virtio-net header, then the frame) appended to `buf`;
    /// returns its length. `WouldBlock` when there is none now.
    pub fn read(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        sys::read_append(self.fd.as_raw_fd(), buf, RX_BUF)
    }

    /// Switches one message read by [`InlineReader::read`]; `true` when it is for the
    /// reading service itself (counted as delivered to it; the caller takes it as
    /// is), `false` when it was switched elsewhere or dropped.
    pub fn switch(&self, msg: &[u8]) -> bool {
        let (net, port) = (&self.inner.net, &self.inner.port);
        match (VnetHdr::parse(msg), msg.get(VNET_HDR_LEN..)) {
            (Some(h), Some(frame)) if gso_refused(port, &h, frame) => false,
            (Some(h), Some(frame)) => {
                let hdr = (!h.is_plain()).then_some(&h);
                net.ingress_local(port, frame, hdr, &self.local)
            }
            // Shorter than a header: counted as malformed by the switch.
            _ => {
                net.ingress(port, &[]);
                false
            }
        }
    }

    /// Gives the port a receive thread of its own (after a hard read error here, or
    /// when no loop takes the reader); that thread reopens the device if it is gone.
    pub fn fall_back(self) -> Result<(), PortError> {
        let InlineReader { inner, done, .. } = self;
        inner.spawn(Some(done)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::Cleanup;
    use super::super::fd::{start_reopening_port, Reopen};
    use super::super::testing::{device, eventually, frame, sink, spec, with_hdr};
    use super::super::{GiveReader, RunningPort};
    use super::*;
    use crate::config::PortKind;
    use crate::switch::Network;
    use crate::switch::PortClass;

    /// Starts guest port "g" on `fd`, offering it to `give`; its device never comes
    /// back once gone.
    fn start_guest(
        net: &Arc<Network>,
        local: &Arc<Port>,
        fd: OwnedFd,
        give: GiveReader<'_>,
    ) -> RunningPort {
        let no_reopen: Reopen = Box::new(|| Err(io::ErrorKind::NotFound.into()));
        let s = spec("g", PortKind::Tap);
        start_reopening_port(
            net,
            &s,
            PortClass::Tap,
            fd,
            no_reopen,
            Cleanup::None,
            Some((local.clone(), give)),
        )
        .unwrap()
    }

    #[test]
    fn an_inline_port_is_read_by_its_taker_or_gets_a_thread() {
        let (net, local, seen) = sink();
        // The switch learns MAC 02::42 on the local service port.
        let mut from_local = frame(0x42, 60);
        from_local[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        net.ingress(&local, &from_local);
        let mut to_local = frame(7, 60);
        to_local[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x42]);

        let (fd, dev) = device();
        let mut taken = None;
        let mut give = |r: InlineReader| {
            taken = Some(r);
            Ok(())
        };
        let rp = start_guest(&net, &local, fd, &mut give);
        let reader = taken.take().expect("handed over");
        assert_eq!(reader.name(), "g");
        dev.send(&with_hdr(&to_local)).unwrap();
        let mut buf = bytes::BytesMut::new();
        assert!(eventually(|| reader.read(&mut buf).is_ok()));
        assert!(reader.switch(&buf), "for the taker itself: not sent again");
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(local.counters.snapshot().tx_frames, 1);
        // Once the taker gives it up, the port has a thread of its own.
        reader.fall_back().unwrap();
        dev.send(&with_hdr(&to_local)).unwrap();
        assert!(eventually(|| seen.lock().unwrap().len() == 1));
        rp.shutdown();

        // A loop that declines the reader: a thread from the start.
        let (fd, dev) = device();
        let mut decline = |r: InlineReader| Err(r);
        let rp = start_guest(&net, &local, fd, &mut decline);
        dev.send(&with_hdr(&to_local)).unwrap();
        assert!(eventually(|| seen.lock().unwrap().len() == 2));
        rp.shutdown();
        assert!(net.port("g").is_none());
    }
}
