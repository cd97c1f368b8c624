//! The smoltcp device of the router: two frame queues.
//!
//! # Theory of operation
//!
//! smoltcp pulls frames from a `Device` and pushes frames to it. Here the device is
//! nothing but a receive queue (frames from the switch that the classifier handed to
//! smoltcp) and a transmit queue (frames smoltcp produced), both drained by the router
//! loop between calls to `Interface::poll`. No I/O happens inside smoltcp, so the
//! router can own every socket and wait on all of them in one place.
//!
//! Large transmit frames (TCP super-frames of up to 64 KiB) are built in buffers the
//! router hands back once the frame is switched ([`QueueDevice::recycle`]): a fresh
//! zeroed 64 KiB allocation per frame cost a memset and, as the allocator gave the
//! memory back and took it again, page faults (a quarter of the router's time
//! host->guest in profiles).

use std::collections::VecDeque;

use bytes::Bytes;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// Frames at least this long are built in recycled buffers.
const POOL_MIN: usize = 4096;

/// Most recycled buffers kept (each up to 64 KiB).
const POOL_MAX: usize = 64;

/// A frame waiting for the switch.
#[derive(Debug)]
pub enum Frame {
    /// A frame of its own (small frames, frames the router built).
    Bytes(Bytes),
    /// The first `len` bytes of a recycled buffer.
    Pooled(Vec<u8>, usize),
}

impl Frame {
    /// The frame's bytes, writable (a shared `Bytes` is made a `Vec` first: no copy
    /// when this is its only reference).
    pub fn make_mut(&mut self) -> &mut [u8] {
        if let Frame::Bytes(b) = self {
            let b = std::mem::take(b);
            let len = b.len();
            *self = Frame::Pooled(Vec::from(b), len);
        }
        match self {
            Frame::Pooled(v, len) => v.get_mut(..*len).unwrap_or_default(),
            Frame::Bytes(_) => &mut [],
        }
    }

    /// The frame as `Bytes` (no copy).
    pub fn into_bytes(self) -> Bytes {
        match self {
            Frame::Bytes(b) => b,
            Frame::Pooled(mut v, len) => {
                v.truncate(len);
                Bytes::from(v)
            }
        }
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Frame::Bytes(b) => b,
            Frame::Pooled(v, len) => v.get(..*len).unwrap_or_default(),
        }
    }
}

impl From<Bytes> for Frame {
    fn from(b: Bytes) -> Self {
        Frame::Bytes(b)
    }
}

/// A frame queue pair seen by smoltcp as an Ethernet device.
#[derive(Debug)]
pub struct QueueDevice {
    /// Frames waiting for smoltcp.
    pub rx: VecDeque<Bytes>,
    /// Frames smoltcp emitted, waiting for the switch.
    pub tx: VecDeque<Frame>,
    /// Buffers of switched frames, for the next large frames.
    pool: Vec<Vec<u8>>,
    mtu: usize,
    offload: bool,
}

impl QueueDevice {
    /// A device with an IP MTU of `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            pool: Vec::new(),
            mtu,
            offload: false,
        }
    }

    /// Takes back a frame that has been switched: its buffer builds a later frame.
    pub fn recycle(&mut self, frame: Frame) {
        if let Frame::Pooled(v, _) = frame {
            if self.pool.len() < POOL_MAX {
                self.pool.push(v);
            }
        }
    }

    /// A device whose TCP frames leave with a virtio-net header (see `tcp.rs`,
    /// "Offload"): smoltcp may build TCP segments up to 64 KiB and leaves their
    /// checksum to the receiver of the header.
    pub fn with_offload(mtu: usize) -> Self {
        QueueDevice {
            offload: true,
            ..Self::new(mtu)
        }
    }
}

/// Hands one queued frame to smoltcp.
pub struct Rx(Bytes);

/// Lets smoltcp append one frame to the transmit queue.
pub struct Tx<'a> {
    tx: &'a mut VecDeque<Frame>,
    pool: &'a mut Vec<Vec<u8>>,
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if len < POOL_MIN {
            let mut buf = vec![0u8; len];
            let r = f(&mut buf);
            self.tx.push_back(Frame::Bytes(Bytes::from(buf)));
            return r;
        }
        // A recycled buffer keeps its length (every byte stays initialized), so it
        // is zeroed only where it grows.
        let mut buf = self.pool.pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let r = f(buf.get_mut(..len).unwrap_or_default());
        self.tx.push_back(Frame::Pooled(buf, len));
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _ts: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((
            Rx(frame),
            Tx {
                tx: &mut self.tx,
                pool: &mut self.pool,
            },
        ))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            tx: &mut self.tx,
            pool: &mut self.pool,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + super::frame::ETH_HDR;
        caps.max_burst_size = None;
        if self.offload {
            caps.max_transmission_unit = 65535 + super::frame::ETH_HDR;
            // Neither computed (the receiver of the vnet header does it) nor verified
            // here: the classifier verifies plain frames, and offloaded input comes
            // from the kernel of a local port.
            caps.checksum.tcp = smoltcp::phy::Checksum::None;
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(dev: &mut QueueDevice, len: usize, byte: u8) -> Frame {
        let tx = dev.transmit(Instant::from_millis(0)).unwrap();
        tx.consume(len, |b| b.fill(byte));
        dev.tx.pop_front().unwrap()
    }

    #[test]
    fn large_frames_reuse_recycled_buffers_with_exact_contents() {
        let mut dev = QueueDevice::with_offload(65520);
        let a = emit(&mut dev, 60000, 1);
        assert!(matches!(a, Frame::Pooled(..)));
        assert_eq!(a.len(), 60000);
        let ptr = a.as_ptr();
        dev.recycle(a);
        // Shorter: same buffer, only its first bytes are the frame.
        let b = emit(&mut dev, 5000, 2);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|&x| x == 2));
        dev.recycle(b);
        // Longer than the buffer ever was: it grows.
        let mut c = emit(&mut dev, 65000, 3);
        assert_eq!(c.len(), 65000);
        assert!(c.iter().all(|&x| x == 3));
        c.make_mut()[0] = 9;
        let bytes = c.into_bytes();
        assert_eq!((bytes.len(), bytes[0], bytes[64999]), (65000, 9, 3));
        // Small frames are their own allocations; recycling them keeps nothing.
        let d = emit(&mut dev, 60, 4);
        assert!(matches!(d, Frame::Bytes(_)));
        dev.recycle(d);
        assert!(dev.pool.is_empty());
    }
}
