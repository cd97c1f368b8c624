//! The virtio-mmio transport (version 2 register layout, virtio spec 4.2.2).
//!
//! Every register access the guest makes in the device's 4 KiB window lands in
//! [`MmioTransport::read`] / [`MmioTransport::write`] from a vCPU thread (through
//! [`BusDevice`]). Queue addresses and sizes the driver writes are kept in virtio-queue
//! `Queue`s. FEATURES_OK is refused when the driver acks a feature the device did not
//! offer or leaves out VERSION_1. The device is activated at DRIVER_OK only if every
//! queue the driver made ready passes `Queue::is_valid` against guest memory; a driver
//! that points a ring outside RAM gets DEVICE_NEEDS_RESET instead of a device that
//! touches bad memory. After that, a kick (QueueNotify) reaches the device only for a
//! queue the driver made ready, since the addresses of any other were never checked.
//! A status write of 0 resets the device and its queues.
//!
//! The status register follows the spec's state machine (as Firecracker's transport
//! does): bits are only added, in the order ACKNOWLEDGE, DRIVER, FEATURES_OK,
//! DRIVER_OK; driver features are writable only between DRIVER and FEATURES_OK, queue
//! registers only between FEATURES_OK and DRIVER_OK; after FAILED or NEEDS_RESET only
//! a reset is accepted. Anything else is ignored and counted in `refused_mmio`, so a
//! guest cannot re-program the rings of an active device or change features under it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Counters, IrqLine, VirtioDevice, F_VERSION_1};
use crate::vmm::state::{DeviceSnap, QueueSnap};

const MAGIC: u32 = 0x7472_6976;
/// Offset of the QueueNotify register (what KVM_IOEVENTFD watches for a disk).
pub const QUEUE_NOTIFY: u64 = 0x50;
const VENDOR: u32 = 0x554d_4551; // "QEMU", as many guests expect any value

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

/// A device behind the virtio-mmio register window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    /// Resets so far: an I/O thread that let go of the lock during a round checks
    /// it before completing, so it never writes into the rings of a reset device.
    resets: u64,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps a device.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Arc<IrqLine>) -> Self {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            resets: 0,
        }
    }

    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&m| Queue::new(m).ok())
            .collect()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver has set DRIVER_OK and the queues were valid.
    pub fn active(&self) -> bool {
        self.active
    }

    /// How many times the driver reset the device.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Whether queue `index` exists and the driver made it ready (only such a queue
    /// has checked ring addresses and may be served).
    pub fn queue_ready(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| q.ready())
    }

    /// The device, the queues and guest memory, for back-end threads (net RX).
    pub fn parts(&mut self) -> (&mut D, &mut [Queue], &GuestMemoryMmap, &IrqLine) {
        (&mut self.device, &mut self.queues, &self.mem, &self.irq)
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A 32-bit (or narrower) read of the register at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.device.features() | F_VERSION_1;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.queue().map(|q| q.max_size() as u32).unwrap_or(0),
            0x44 => self.queue().map(|q| q.ready() as u32).unwrap_or(0),
            0x60 => self.irq.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }

    /// A write of the register at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // Config writes are not used by our devices (MAC is read-only here).
            return;
        }
        let mut b = [0u8; 4];
        for (i, d) in data.iter().take(4).enumerate() {
            b[i] = *d;
        }
        let v = u32::from_le_bytes(b);
        // What each register needs (virtio 1.2, 3.1.1 and 4.2.2.2, as Firecracker
        // enforces it): features are written after DRIVER and before FEATURES_OK,
        // queues after FEATURES_OK and before DRIVER_OK, and nothing but a reset
        // once the device failed or needs a reset.
        let broken = self.status & (STATUS_FAILED | STATUS_NEEDS_RESET) != 0;
        let features_phase =
            !broken && self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER;
        let queue_phase =
            !broken && self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) == STATUS_FEATURES_OK;
        let allowed = match offset {
            0x20 => features_phase,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => queue_phase,
            _ => true,
        };
        if !allowed {
            self.refuse(
                offset,
                "register written outside its phase of device set-up",
            );
            return;
        }
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.acked = (self.acked & !0xffff_ffff) | u64::from(v),
                1 => self.acked = (self.acked & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                // A size past u16 is invalid, not a smaller size: `as u16` would turn
                // 0x10010 into 16. Size 0 is refused by the queue (it keeps the old one).
                let size = u16::try_from(v).unwrap_or(0);
                if let Some(q) = self.queue() {
                    q.set_size(size);
                }
            }
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => self.notify(v),
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    /// Counts and logs (at debug: a guest can do this in a loop) a refused write.
    fn refuse(&self, offset: u64, why: &'static str) {
        Counters::bump(&self.device.counters().refused_mmio);
        tracing::debug!(
            device = self.device.device_type(),
            offset = format_args!("{offset:#x}"),
            status = self.status,
            why,
            "virtio-mmio write refused"
        );
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue() {
            f(q)
        }
    }

    /// A write of the status register. 0 resets. FAILED may be set at any time.
    /// Otherwise the driver may only add bits, in the order of the spec's
    /// initialization (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK: each needs the
    /// ones before it, DRIVER_OK one FEATURES_OK the device already accepted), and
    /// never clear one: a write that would clear DRIVER_OK (and so re-open the queue
    /// registers under an active device) or skip a step is refused and counted.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            self.active = false;
            return;
        }
        let old = self.status;
        // NEEDS_RESET is the device's to set; the driver's copy of it is ignored.
        let mut v = v & (STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let in_order = |s: u32| {
            (s & STATUS_DRIVER == 0 || s & STATUS_ACK != 0)
                && (s & STATUS_FEATURES_OK == 0 || s & STATUS_DRIVER != 0)
                && (s & STATUS_DRIVER_OK == 0 || old & STATUS_FEATURES_OK != 0)
        };
        if old & (STATUS_FAILED | STATUS_NEEDS_RESET) != 0 || v & old != old || !in_order(v) {
            self.refuse(0x70, "status write out of the initialization order");
            return;
        }
        // FEATURES_OK only sticks if the driver accepted VERSION_1 and nothing we
        // did not offer.
        if v & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features() | F_VERSION_1;
            if self.acked & !offered != 0 || self.acked & F_VERSION_1 == 0 {
                v &= !STATUS_FEATURES_OK;
                v &= !STATUS_DRIVER_OK;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && !self.active {
            let ok = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if ok {
                self.device.activate(self.acked);
                self.active = true;
            } else {
                tracing::warn!(
                    device = self.device.device_type(),
                    "driver set DRIVER_OK with bad queues: needs reset"
                );
                v |= STATUS_NEEDS_RESET;
                v &= !STATUS_DRIVER_OK;
            }
        }
        self.status = v;
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(&self.device);
        self.acked = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.active = false;
        self.resets = self.resets.wrapping_add(1);
        self.irq.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn notify(&mut self, index: u32) {
        if !self.active {
            return;
        }
        let Ok(index) = u16::try_from(index) else {
            return;
        };
        // A queue the driver never made ready has unchecked ring addresses (DRIVER_OK
        // only validates ready queues): the device must not touch it.
        if !self.queue_ready(usize::from(index)) {
            return;
        }
        if self.device.notify(index, &mut self.queues, &self.mem) {
            self.irq.signal_used();
        }
    }
}

/// Bytes of config space a snapshot keeps (more than any of our devices has).
const CONFIG_SNAP: usize = 64;

impl<D: VirtioDevice> MmioTransport<D> {
    /// Tells the driver that the config space changed: a new ConfigGeneration and a
    /// configuration change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.irq.signal_config();
    }

    /// The device's config space, as far as a snapshot keeps it.
    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_SNAP];
        self.device.read_config(0, &mut c);
        c
    }

    /// The transport's registers, its queues and the config space, for a snapshot.
    pub fn save(&self) -> DeviceSnap {
        DeviceSnap {
            device_type: self.device.device_type(),
            acked: self.acked,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            active: self.active,
            irq_status: self.irq.status(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnap {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                    }
                })
                .collect(),
            config: self.config_bytes(),
        }
    }

    /// Puts a saved state back on a fresh transport of the same device. Refused (the
    /// transport left as it was) when the device differs (type, queues, config space:
    /// another MAC or disk size), when the acked features are not all offered, or when
    /// an active device's ready queue does not fit in guest memory. An active device
    /// is activated again with its acked features.
    pub fn restore(&mut self, s: &DeviceSnap) -> Result<(), String> {
        if s.device_type != self.device.device_type() {
            return Err(format!(
                "device type {} in the state, {} here",
                s.device_type,
                self.device.device_type()
            ));
        }
        if !self.device.same_config(&s.config, &self.config_bytes()) {
            return Err(
                "its config space differs from the saved one (another MAC or disk size)".into(),
            );
        }
        let offered = self.device.features() | F_VERSION_1;
        if s.acked & !offered != 0 {
            return Err(format!(
                "acked features {:#x} were not offered",
                s.acked & !offered
            ));
        }
        let max: Vec<u16> = self.device.queue_max_sizes().to_vec();
        if s.queues.len() != max.len() {
            return Err(format!(
                "{} queues in the state, {} here",
                s.queues.len(),
                max.len()
            ));
        }
        let mut queues = Vec::new();
        for (i, (q, &m)) in s.queues.iter().zip(&max).enumerate() {
            if q.max_size != m {
                return Err(format!(
                    "queue {i}: maximum size {} in the state, {m} here",
                    q.max_size
                ));
            }
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue = Queue::try_from(state).map_err(|e| format!("queue {i}: {e:?}"))?;
            if s.active && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(format!("queue {i}: its rings are outside guest memory"));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.acked = s.acked;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.irq.ack(u32::MAX);
        self.irq.set(s.irq_status);
        self.active = s.active;
        if s.active {
            self.device.activate(s.acked);
        }
        Ok(())
    }
}

/// What the vCPU's MMIO bus dispatches to.
pub trait BusDevice: Send {
    /// Register read.
    fn bus_read(&mut self, offset: u64, data: &mut [u8]);
    /// Register write.
    fn bus_write(&mut self, offset: u64, data: &[u8]);
    /// The device's state, for a snapshot.
    fn save(&self) -> DeviceSnap;
    /// Puts a saved state back (see [`MmioTransport::restore`]).
    fn restore(&mut self, s: &DeviceSnap) -> Result<(), String>;
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn bus_read(&mut self, offset: u64, data: &mut [u8]) {
        self.read(offset, data)
    }
    fn bus_write(&mut self, offset: u64, data: &[u8]) {
        self.write(offset, data)
    }
    fn save(&self) -> DeviceSnap {
        MmioTransport::save(self)
    }
    fn restore(&mut self, s: &DeviceSnap) -> Result<(), String> {
        MmioTransport::restore(self, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::mem;
    use crate::virtio::Counters;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A device that records which queues it was asked to serve.
    #[derive(Default)]
    struct Probe {
        notified: Vec<u16>,
        counters: Counters,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0)
        }
        fn activate(&mut self, _acked: u64) {}
        fn notify(&mut self, index: u16, _q: &mut [Queue], _m: &GuestMemoryMmap) -> bool {
            self.notified.push(index);
            false
        }
        fn counters(&self) -> &Counters {
            &self.counters
        }
    }

    fn w(t: &mut MmioTransport<Probe>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// A fresh transport for a [`Probe`], over the test memory.
    fn transport() -> MmioTransport<Probe> {
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        MmioTransport::new(Probe::default(), mem(), irq)
    }

    /// Puts the selected queue's rings at 0x1000, 0x2000 and 0x3000 and readies it.
    fn place_rings(t: &mut MmioTransport<Probe>) {
        for (off, v) in [(0x80, 0x1000), (0x90, 0x2000), (0xa0, 0x3000), (0x44, 1)] {
            w(t, off, v);
        }
    }

    #[test]
    fn oversized_queue_num_and_unready_queues_are_ignored() {
        let mut t = transport();
        for (off, v) in [(0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
            w(&mut t, off, v);
        }
        // Queue 0: 0x10010 entries must not become 16; then a proper set-up.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 0x1_0010);
        assert_eq!(t.queues[0].size(), 256);
        w(&mut t, 0x38, 16);
        assert_eq!(t.queues[0].size(), 16);
        place_rings(&mut t);
        // Queue 1: rings far outside guest memory, never made ready.
        w(&mut t, 0x30, 1);
        w(&mut t, 0x80, 0xffff_0000);
        w(&mut t, 0x70, 15);
        assert!(t.active());
        w(&mut t, 0x50, 1);
        w(&mut t, 0x50, 0);
        w(&mut t, 0x50, 7);
        assert_eq!(t.device().notified, vec![0]);
    }

    fn refused(t: &MmioTransport<Probe>) -> u64 {
        Counters::get(&t.device().counters.refused_mmio)
    }

    #[test]
    fn status_follows_the_spec_state_machine() {
        let mut t = transport();
        // Features before DRIVER, DRIVER_OK before FEATURES_OK: refused.
        w(&mut t, 0x70, 1);
        w(&mut t, 0x20, 1);
        assert_eq!(t.acked, 0);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x70, 7);
        assert_eq!(t.status, 3);
        // Queue registers before FEATURES_OK: refused.
        w(&mut t, 0x38, 16);
        assert_eq!(t.queues[0].size(), 256);
        assert_eq!(refused(&t), 3);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, 11);
        assert_eq!(t.status, 11);
        // Features after FEATURES_OK: refused.
        w(&mut t, 0x20, 0);
        assert_eq!(t.acked, F_VERSION_1);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        place_rings(&mut t);
        w(&mut t, 0x70, 15);
        assert!(t.active());
        assert_eq!(refused(&t), 4);
        // Active: dropping DRIVER_OK to re-open the queue registers, then moving
        // the descriptor table: both refused, the ring stays where it was checked.
        w(&mut t, 0x70, 11);
        w(&mut t, 0x80, 0xffff_0000);
        w(&mut t, 0x44, 0);
        assert_eq!(t.status, 15);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        assert!(t.queues[0].ready());
        assert_eq!(refused(&t), 7);
        w(&mut t, 0x50, 0);
        assert_eq!(t.device().notified, vec![0]);
        // FAILED sticks until a reset; then set-up starts over.
        w(&mut t, 0x70, 0x80);
        assert!(!t.active());
        w(&mut t, 0x70, 15);
        assert_eq!(t.status, 15 | 0x80);
        w(&mut t, 0x70, 0);
        assert_eq!(t.status, 0);
        w(&mut t, 0x70, 1);
        assert_eq!(t.status, 1);
    }
}
