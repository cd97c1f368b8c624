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

pub mod announce;
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

    /// Raises the interrupt for a configuration change.
    pub fn signal_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status bits without signalling (a restored device's pending bits).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
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
    /// virtio-mmio register writes refused (out of the status state machine's order).
    pub refused_mmio: AtomicU64,
    /// virtio-net: frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// virtio-net: bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// virtio-net: frames the guest sent that went out.
    pub tx_packets: AtomicU64,
    /// virtio-net: bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// virtio-net: RARP announces sent from the host side after a move.
    pub announce_frames: AtomicU64,
    /// virtio-blk: reads completed.
    pub reads: AtomicU64,
    /// virtio-blk: writes completed.
    pub writes: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
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
    /// Whether `saved`, a snapshot's config space, is this device's (`current` is
    /// what it reads now): by default byte for byte.
    fn same_config(&self, saved: &[u8], current: &[u8]) -> bool {
        saved == current
    }
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

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers for device unit tests on virtio-queue's MockSplitQueue.

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// 16 MiB of guest memory; queues at 0, buffers from 1 MiB.
    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// A 16-entry mock queue in `mem` (the driver's side) and the device's [`Queue`]
    /// over it.
    pub fn mock_queue(mem: &GuestMemoryMmap) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        let q = vq.create_queue().unwrap();
        (vq, q)
    }

    /// A raw descriptor.
    pub fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Used ring entry `i` of a mock queue: (id, len).
    pub fn used(mem: &GuestMemoryMmap, used_addr: GuestAddress, i: u16) -> (u32, u32) {
        let base = used_addr.0 + 4 + 8 * u64::from(i);
        (
            mem.read_obj::<u32>(GuestAddress(base)).unwrap(),
            mem.read_obj::<u32>(GuestAddress(base + 4)).unwrap(),
        )
    }

    /// Used ring index.
    pub fn used_idx(mem: &GuestMemoryMmap, used_addr: GuestAddress) -> u16 {
        mem.read_obj::<u16>(GuestAddress(used_addr.0 + 2)).unwrap()
    }

    /// 1 to 16 random descriptors, for the devices' randomized tests: address and
    /// length from the test's own choosers (biased towards its buffers), then random
    /// flags (NEXT, WRITE, INDIRECT) and a `next` index that may point past the table.
    pub fn random_descs(
        rng: &mut Rng,
        addr: impl Fn(&mut Rng) -> u64,
        len: impl Fn(&mut Rng) -> u32,
    ) -> Vec<RawDescriptor> {
        let n = (rng.next() % 16) as usize + 1;
        (0..n)
            .map(|_| {
                let a = addr(rng);
                let l = len(rng);
                d(a, l, (rng.next() % 8) as u16, (rng.next() % 20) as u16)
            })
            .collect()
    }

    /// The devices' randomized tests: `rounds` rounds, each on a fresh mock queue
    /// over one guest memory, with one random stream from `seed` (so a failure
    /// replays); after each round the used index must be sane (at most the queue's
    /// 16 entries, whatever the round fed the device).
    pub fn random_rounds(
        seed: u64,
        rounds: usize,
        mut round: impl FnMut(
            &mut Rng,
            &GuestMemoryMmap,
            &MockSplitQueue<'_, GuestMemoryMmap>,
            &mut Queue,
        ),
    ) {
        let m = mem();
        let mut rng = Rng(seed);
        for _ in 0..rounds {
            let (vq, mut q) = mock_queue(&m);
            round(&mut rng, &m, &vq, &mut q);
            assert!(used_idx(&m, vq.used_addr()) as usize <= 16);
        }
    }

    /// A tiny deterministic PRNG (xorshift64*), so randomized tests replay.
    pub struct Rng(pub u64);
    impl Rng {
        /// Next value.
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }
}
