//! Virtio devices over the virtio-mmio transport (virtio 1.x, "modern" layout).
//!
//! A device implements [`VirtioDevice`]: its type, feature bits, config space and what
//! to do when the guest kicks a queue. [`mmio::MmioTransport`] owns the queues and the
//! register state the driver programs, and calls the device with the queues and guest
//! memory once the driver has set DRIVER_OK. Interrupts go through an [`IrqLine`]: the
//! interrupt status register plus an eventfd that KVM (irqfd) turns into a pulse on
//! the device's IOAPIC pin.
//!
//! Guest memory and rings are hostile: devices read every descriptor through
//! vm-memory's checked accessors, validate a request's shape before acting on it, and
//! answer a malformed chain with an error status (or a zero-length used entry) and a
//! counter bump. Nothing a guest writes can make them panic.

pub mod blk;
pub mod chain;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the config space changed.
pub const INT_CONFIG: u32 = 2;

/// An interrupt line of one device: status register plus an eventfd (irqfd).
pub struct IrqLine {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqLine {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        IrqLine {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Raises the interrupt for a used-ring update.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        // An eventfd write only fails if the counter would overflow, which a pending
        // interrupt can't make worse.
        let _ = self.evt.write(1);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd (for KVM_IRQFD).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Counters every device keeps (reported in logs on exit, and by tests).
#[derive(Debug, Default)]
pub struct Counters {
    /// Malformed descriptor chains seen (answered with an error, then dropped).
    pub bad_chains: AtomicU64,
    /// Requests or frames completed.
    pub completed: AtomicU64,
    /// Back-end I/O errors reported to the guest.
    pub io_errors: AtomicU64,
    /// Frames dropped (e.g. too large for the guest's buffers).
    pub dropped: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 net, 2 block).
    fn device_type(&self) -> u32;
    /// Offered feature bits.
    fn features(&self) -> u64;
    /// Maximum size of each queue (the number of queues is this slice's length).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, acked_features: u64);
    /// The driver kicked queue `index`. Returns true if the guest should be interrupted.
    fn notify(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Counters.
    fn counters(&self) -> &Counters;
}

/// Copies `src` (a config space image) at `offset` into `data`, zero past the end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}
