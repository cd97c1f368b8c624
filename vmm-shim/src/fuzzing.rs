//! Entry points for fuzzing what a guest controls in both virtio devices.
//!
//! [`run_chains`] turns arbitrary bytes into guest memory holding a split virtqueue
//! (descriptor table, avail ring, buffers), then lets virtio-blk (on an in-memory
//! [`MemDisk`]) and virtio-net (TX and RX, on a loopback backend) consume it.
//! Invariants: no panic, and the used index never moves by more than the number of
//! chains the ring could hold.
//!
//! [`run_mmio`] drives both devices' virtio-mmio transports with register traffic
//! from the input (optionally after a well-behaved driver's set-up), so the queues are
//! configured, activated, kicked and reset in any order. Invariant: no panic.
//!
//! The cargo-fuzz targets in `fuzz/` (`virtio_chains`, `virtio_mmio`) call these, and
//! the unit tests below run both on seeded random inputs.

use std::collections::VecDeque;
use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::blk::{Block, MemDisk};
use crate::virtio::net::{Net, NetBackend};

/// Guest memory size for a fuzz run.
const MEM: usize = 1 << 20;
/// Queue size used (a power of two no larger than the table area).
const QSIZE: u16 = 16;
/// Where [`run_chains`] puts the descriptor table,
const DESC: u64 = 0;
/// the avail ring
const AVAIL: u64 = 0x100;
/// and the used ring.
const USED: u64 = 0x200;

/// The disk both harnesses give virtio-blk: 64 KiB in memory, submissions not kept.
fn ram_disk() -> MemDisk {
    MemDisk {
        record: false,
        ..MemDisk::new(64 << 10)
    }
}

#[derive(Default)]
struct Loopback(VecDeque<Vec<u8>>);

impl NetBackend for Loopback {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.0.len() < 8 {
            self.0.push_back(frame.to_vec());
        }
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// A ready queue of [`QSIZE`] entries on the rings at [`DESC`], [`AVAIL`], [`USED`].
fn queue() -> Queue {
    let mut q = Queue::new(QSIZE).unwrap_or_else(|_| unreachable!("QSIZE is a valid size"));
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

/// Runs both devices over a queue built from `data`.
///
/// Layout: `data` is copied to guest address 0 (descriptor table at 0, avail ring at
/// 0x100, used ring at 0x200, the rest is buffer space); the used ring is cleared
/// before each device runs.
pub fn run_chains(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let n = data.len().min(MEM);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let ro = data.first().is_some_and(|b| b & 1 == 1);
    // Each device gets a fresh queue over the same rings; a fresh queue starts its used
    // index at 0, so the used ring is cleared to match. After each run, the used index
    // must not have moved past what the ring holds.
    let fresh_queue = || {
        let _ = mem.write_slice(&[0u8; 0x100], GuestAddress(USED));
        queue()
    };
    let check_used = |what: &str| {
        let used_idx = mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap_or(0);
        assert!(
            used_idx <= QSIZE,
            "{what} used more chains than the ring holds"
        );
    };

    let mut blk = Block::new(ram_disk(), ro, "fuzz");
    blk.process(&mut fresh_queue(), &mem);
    check_used("blk");
    let mut net = Net::new(Loopback::default(), [0x52, 0x54, 0, 0, 0, 1], None, true);
    net.process_tx(&mut fresh_queue(), &mem);
    check_used("net TX");
    net.rx_pump(&mut fresh_queue(), &mem);
    check_used("net RX");
}

/// Register writes of a well-behaved driver: ACK, DRIVER, features (VERSION_1), every
/// queue at 16 entries with its rings inside the 1 MiB of guest memory, FEATURES_OK,
/// DRIVER_OK. Random register traffic after this reaches the devices' queue code.
fn driver_init(queues: u32) -> Vec<(u64, u32)> {
    let mut w = vec![(0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)];
    for i in 0..queues {
        let base = 0x8_0000 + u32::from(QSIZE) * 0x100 * i;
        w.extend([
            (0x30, i),
            (0x38, u32::from(QSIZE)),
            (0x80, base),
            (0x90, base + 0x100),
            (0xa0, base + 0x200),
            (0x44, 1),
        ]);
    }
    w.push((0x70, 15));
    w
}

/// Drives the virtio-mmio transport of both devices with register traffic from
/// `data`, over guest memory that also comes from `data`.
///
/// Layout: the first 64 KiB of `data` (or less) is copied to guest address 0 and, a
/// second time, to the rings area at 0x8_0000; the rest is a list of 6-byte
/// accesses `[kind, register/4, value (u32 LE)]` (`kind` bit 0: write; bits 1-2:
/// access size; bit 3: follow a well-behaved driver's set-up first). Invariant: no
/// panic, whatever the order and values of the accesses.
pub fn run_mmio(data: &[u8]) {
    use std::sync::Arc;

    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::IrqLine;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let split = data.len().min(64 << 10);
    let (image, ops) = data.split_at(split);
    let _ = mem.write_slice(image, GuestAddress(0));
    let _ = mem.write_slice(image, GuestAddress(0x8_0000));
    let irq = || {
        EventFd::new(EFD_NONBLOCK)
            .ok()
            .map(|e| Arc::new(IrqLine::new(e)))
    };
    let (Some(i1), Some(i2)) = (irq(), irq()) else {
        return;
    };
    let ro = data.first().is_some_and(|b| b & 1 == 1);
    let mut blk = MmioTransport::new(Block::new(ram_disk(), ro, "fuzz"), mem.clone(), i1);
    let mut net = MmioTransport::new(
        Net::new(Loopback::default(), [0x52, 0x54, 0, 0, 0, 1], None, true),
        mem.clone(),
        i2,
    );
    if ops.first().is_some_and(|k| k & 8 != 0) {
        for (off, v) in driver_init(1) {
            blk.write(off, &v.to_le_bytes());
        }
        for (off, v) in driver_init(2) {
            net.write(off, &v.to_le_bytes());
        }
    }
    for op in ops.chunks_exact(6) {
        let (kind, reg) = (op[0], u64::from(op[1]) * 4);
        let v = u32::from_le_bytes([op[2], op[3], op[4], op[5]]);
        let size = [1usize, 2, 4, 8][usize::from((kind >> 1) & 3)];
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&v.to_le_bytes());
        for d in [
            &mut blk as &mut dyn crate::virtio::mmio::BusDevice,
            &mut net as &mut dyn crate::virtio::mmio::BusDevice,
        ] {
            if kind & 1 == 1 {
                d.bus_write(reg, &buf[..size]);
            } else {
                d.bus_read(reg, &mut buf[..size]);
            }
        }
        if kind & 0x10 != 0 {
            // Hand the net RX path a frame now and then, as the TAP would.
            let (dev, queues, mem, _) = net.parts();
            if let Some(q) = queues.get_mut(0) {
                dev.rx_pump(q, mem);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::Rng;

    /// Rewrites the descriptor table at the start of `data` (as far as it reaches) so
    /// each of the 16 entries points into `base..base + span` with a length under 1 KiB,
    /// flags NEXT / WRITE only and a `next` inside the table: chains that get past the
    /// first checks.
    fn plausible_table(data: &mut [u8], rng: &mut Rng, base: u64, span: u64) {
        for desc in data.chunks_exact_mut(16).take(16) {
            let addr = base + (rng.next() % span);
            desc[..8].copy_from_slice(&addr.to_le_bytes());
            let l = (rng.next() % 0x400) as u32;
            desc[8..12].copy_from_slice(&l.to_le_bytes());
            desc[12] &= 3;
            desc[14] %= 16;
        }
    }

    #[test]
    fn random_queue_images_never_panic() {
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        for _ in 0..500 {
            let len = (rng.next() % 0x1000) as usize + 0x300;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Make descriptors point into the buffer area and chains plausible half the
            // time, so the devices get past the first checks.
            if rng.next().is_multiple_of(2) {
                plausible_table(&mut data, &mut rng, 0x400, 0x800);
                data[0x102] = (rng.next() % 17) as u8;
                data[0x103] = 0;
            }
            run_chains(&data);
        }
    }

    #[test]
    fn random_register_traffic_never_panics() {
        let mut rng = Rng(0x5eed_0fb1_ade5);
        for _ in 0..300 {
            let img = (rng.next() % 0x2000) as usize;
            let mut data: Vec<u8> = (0..img).map(|_| rng.next() as u8).collect();
            // Rings at 0x8_0000 hold the image again: make its descriptors point at
            // guest memory half the time so chains get parsed.
            if rng.next().is_multiple_of(2) {
                plausible_table(&mut data, &mut rng, 0x1000, 0x1000);
                if data.len() > 0x130 {
                    data[0x102] = (rng.next() % 17) as u8;
                    data[0x103] = 0;
                    for i in 0..16 {
                        data[0x104 + 2 * i] %= 16;
                        data[0x105 + 2 * i] = 0;
                    }
                }
            }
            data.resize(64 << 10, 0);
            let n = (rng.next() % 200) as usize;
            for _ in 0..n {
                // Mostly the registers that exist (0x00..0x100) and the config space.
                let reg = match rng.next() % 4 {
                    0 => (rng.next() % 0x48) as u8,
                    1 => [0x14u8, 0x0c, 0x1c, 0x20][(rng.next() % 4) as usize],
                    _ => rng.next() as u8,
                };
                let v = match rng.next() % 4 {
                    0 => rng.next() as u32,
                    1 => (rng.next() % 3) as u32,
                    2 => [0u32, 1, 3, 11, 15, 16, 0x8_0000, 0x10010][(rng.next() % 8) as usize],
                    _ => (rng.next() % 0x10_0000) as u32,
                };
                data.push(rng.next() as u8);
                data.push(reg);
                data.extend_from_slice(&v.to_le_bytes());
            }
            run_mmio(&data);
        }
    }
}
