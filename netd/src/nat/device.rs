//! The smoltcp device of the router: two frame queues.
//!
//! # Theory of operation
//!
//! smoltcp pulls frames from a `Device` and pushes frames to it. Here the device is
//! nothing but a receive queue (frames from the switch that the classifier handed to
//! smoltcp) and a transmit queue (frames smoltcp produced), both drained by the router
//! loop between calls to `Interface::poll`. No I/O happens inside smoltcp, so the
//! router can own every socket and wait on all of them in one place.

use std::collections::VecDeque;

use bytes::Bytes;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// A frame queue pair seen by smoltcp as an Ethernet device.
#[derive(Debug)]
pub struct QueueDevice {
    /// Frames waiting for smoltcp.
    pub rx: VecDeque<Bytes>,
    /// Frames smoltcp emitted, waiting for the switch.
    pub tx: VecDeque<Bytes>,
    mtu: usize,
    offload: bool,
}

impl QueueDevice {
    /// A device with an IP MTU of `mtu` bytes.
    pub fn new(mtu: usize) -> Self {
        QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            offload: false,
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
pub struct Tx<'a>(&'a mut VecDeque<Bytes>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(Bytes::from(buf));
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _ts: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _ts: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(&mut self.tx))
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
