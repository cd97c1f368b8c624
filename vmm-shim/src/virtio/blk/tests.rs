//! Unit tests of virtio-blk on virtio-queue's MockSplitQueue over a [`MemDisk`].

use super::*;
use crate::nbd::Request;
use crate::virtio::testutil::{d, mem, mock_queue, random_descs, random_rounds, used, used_idx};
use crate::virtio::Counters;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD as T_DISCARD, VIRTIO_BLK_T_FLUSH as T_FLUSH, VIRTIO_BLK_T_IN as T_IN,
    VIRTIO_BLK_T_OUT as T_OUT, VIRTIO_BLK_T_WRITE_ZEROES as T_WRITE_ZEROES,
};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

fn hdr(mem: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
    mem.write_obj(ty, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
    mem.read_obj::<u8>(GuestAddress(at)).unwrap()
}

/// The disk most tests use: 1 MiB, writable.
fn disk() -> Block<MemDisk> {
    Block::new(MemDisk::new(1 << 20), false, "t")
}

/// A request chain in descriptors `first..first + 3`: the header at `hdr`, `len` data
/// bytes at `data` (device-writable if `flags` is [`WRITE`]), the status byte at
/// `status`.
fn io_chain(
    first: u16,
    hdr: u64,
    data: u64,
    len: u32,
    flags: u16,
    status: u64,
) -> [RawDescriptor; 3] {
    [
        d(hdr, 16, NEXT, first + 1),
        d(data, len, NEXT | flags, first + 2),
        d(status, 1, WRITE, 0),
    ]
}

#[test]
fn write_then_read_round_trip_and_batching() {
    let m = mem();
    let (vq, mut q) = mock_queue(&m);
    let mut blk = disk();
    assert_eq!(blk.features() & F_RO, 0);
    m.write_slice(&[0xabu8; 1024], GuestAddress(DATA)).unwrap();
    hdr(&m, HDR, T_OUT, 4);
    hdr(&m, HDR + 16, T_IN, 4);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
    // Two chains in one kick: write sector 4..6, read it back (a separate batch,
    // since reads and writes never share one).
    vq.add_desc_chains(&io_chain(0, HDR, DATA, 1024, 0, STATUS), 0)
        .unwrap();
    assert!(blk.process(&mut q, &m));
    vq.add_desc_chains(
        &io_chain(3, HDR + 16, DATA + 0x1000, 1024, WRITE, STATUS + 1),
        3,
    )
    .unwrap();
    assert!(blk.process(&mut q, &m));
    assert_eq!(status(&m, STATUS), S_OK);
    assert_eq!(status(&m, STATUS + 1), S_OK);
    assert_eq!(used_idx(&m, vq.used_addr()), 2);
    assert_eq!(used(&m, vq.used_addr(), 0), (0, 1));
    assert_eq!(used(&m, vq.used_addr(), 1), (3, 1025));
    let mut back = [0u8; 1024];
    m.read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, [0xab; 1024]);
    assert_eq!(&blk.backend.data[2048..3072], &[0xab; 1024][..]);
}

#[test]
fn several_requests_of_one_kick_go_out_together() {
    let m = mem();
    let (vq, mut q) = mock_queue(&m);
    let mut blk = disk();
    let mut descs = Vec::new();
    for i in 0..4u64 {
        hdr(&m, HDR + 16 * i, T_IN, i);
        let b = (3 * i) as u16;
        descs.extend(io_chain(
            b,
            HDR + 16 * i,
            DATA + 0x1000 * i,
            512,
            WRITE,
            STATUS + i,
        ));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    assert!(blk.process(&mut q, &m));
    assert_eq!(blk.backend.submits.len(), 1);
    assert_eq!(blk.backend.submits[0].len(), 4);
    assert_eq!(used_idx(&m, vq.used_addr()), 4);
}

#[test]
fn flush_discard_write_zeroes_map_to_nbd_commands() {
    let m = mem();
    let (vq, mut q) = mock_queue(&m);
    let mut blk = disk();
    assert_ne!(blk.features() & F_DISCARD, 0);
    hdr(&m, HDR, T_FLUSH, 0);
    hdr(&m, HDR + 16, T_DISCARD, 0);
    hdr(&m, HDR + 32, T_WRITE_ZEROES, 0);
    // One discard segment: sector 8, 16 sectors; one write-zeroes with unmap.
    m.write_obj(8u64, GuestAddress(DATA)).unwrap();
    m.write_obj(16u32, GuestAddress(DATA + 8)).unwrap();
    m.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    m.write_obj(2u64, GuestAddress(DATA + 16)).unwrap();
    m.write_obj(1u32, GuestAddress(DATA + 24)).unwrap();
    m.write_obj(1u32, GuestAddress(DATA + 28)).unwrap();
    vq.add_desc_chains(
        &[
            d(HDR, 16, NEXT, 1),
            d(STATUS, 1, WRITE, 0),
            d(HDR + 16, 16, NEXT, 3),
            d(DATA, 16, NEXT, 4),
            d(STATUS + 1, 1, WRITE, 0),
            d(HDR + 32, 16, NEXT, 6),
            d(DATA + 16, 16, NEXT, 7),
            d(STATUS + 2, 1, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    blk.process(&mut q, &m);
    let all: Vec<Request> = blk.backend.submits.concat();
    assert_eq!(
        all,
        vec![
            Request::Flush,
            Request::Trim {
                offset: 8 * 512,
                len: 16 * 512
            },
            Request::WriteZeroes {
                offset: 1024,
                len: 512,
                may_trim: true
            },
        ]
    );
    for i in 0..3 {
        assert_eq!(status(&m, STATUS + i), S_OK);
    }
}

#[test]
fn read_only_and_backend_errors_are_ioerr() {
    let m = mem();
    let (vq, mut q) = mock_queue(&m);
    let mut be = MemDisk::new(1 << 20);
    be.read_only = true;
    let mut blk = Block::new(be, false, "t");
    assert_ne!(blk.features() & F_RO, 0);
    assert_eq!(blk.features() & (F_DISCARD | F_WRITE_ZEROES), 0);
    hdr(&m, HDR, T_OUT, 0);
    vq.add_desc_chains(&io_chain(0, HDR, DATA, 512, 0, STATUS), 0)
        .unwrap();
    blk.process(&mut q, &m);
    assert_eq!(status(&m, STATUS), S_IOERR);
    assert!(blk.backend.submits.is_empty());

    // A server-side errno and a dead connection both become IOERR.
    let (vq, mut q) = mock_queue(&m);
    let mut be = MemDisk::new(1 << 20);
    be.fail_errno = Some(28);
    let mut blk = Block::new(be, false, "t");
    hdr(&m, HDR, T_IN, 0);
    vq.add_desc_chains(&io_chain(0, HDR, DATA, 512, WRITE, STATUS), 0)
        .unwrap();
    blk.process(&mut q, &m);
    assert_eq!(status(&m, STATUS), S_IOERR);
    blk.backend.fail_errno = None;
    blk.backend.dead = true;
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    vq.add_desc_chains(&io_chain(3, HDR, DATA, 512, WRITE, STATUS), 3)
        .unwrap();
    blk.process(&mut q, &m);
    assert_eq!(status(&m, STATUS), S_IOERR);
    assert_eq!(Counters::get(&blk.counters().io_errors), 2);
}

#[test]
fn bad_chains_are_answered_and_counted() {
    let m = mem();
    let (vq, mut q) = mock_queue(&m);
    let mut blk = disk();
    hdr(&m, HDR, T_IN, 0);
    vq.add_desc_chains(
        &[
            // Buffer outside RAM.
            d(0x7000_0000, 16, NEXT, 1),
            d(STATUS, 1, WRITE, 0),
            // No status byte.
            d(HDR, 16, 0, 0),
            // Odd-sized read: status gets IOERR.
            d(HDR, 16, NEXT, 4),
            d(DATA, 100, NEXT | WRITE, 5),
            d(STATUS + 5, 1, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    blk.process(&mut q, &m);
    assert_eq!(used_idx(&m, vq.used_addr()), 3);
    assert_eq!(Counters::get(&blk.counters().bad_chains), 3);
    assert_eq!(status(&m, STATUS + 5), S_IOERR);
    assert_eq!(used(&m, vq.used_addr(), 0).1, 0);
    assert!(blk.backend.submits.is_empty());
}

#[test]
fn one_batch_holds_a_bounded_amount_of_data() {
    // Five 32 MiB reads, all into the same guest buffer: they must not all be
    // in flight (and in host memory) at once.
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let (vq, mut q) = mock_queue(&m);
    let mut blk = Block::new(MemDisk::new(MAX_REQUEST as usize), false, "t");
    hdr(&m, HDR, T_IN, 0);
    let mut descs = Vec::new();
    for i in 0..5u64 {
        let b = (3 * i) as u16;
        descs.extend(io_chain(b, HDR, 16 << 20, MAX_REQUEST, WRITE, STATUS + i));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    assert!(blk.process(&mut q, &m));
    assert_eq!(used_idx(&m, vq.used_addr()), 5);
    for i in 0..5 {
        assert_eq!(status(&m, STATUS + i), S_OK);
    }
    assert!(blk.backend.submits.len() > 1);
    for s in &blk.backend.submits {
        let bytes: u64 = s
            .iter()
            .map(|r| match r {
                Request::Read { len, .. } => u64::from(*len),
                _ => 0,
            })
            .sum();
        assert!(bytes <= MAX_BATCH_BYTES, "{bytes} bytes in one batch");
    }
}

/// Random descriptor tables and avail rings: the device must never panic and must
/// leave the used index sane.
#[test]
fn randomized_chains_never_panic() {
    random_rounds(0x1234_5678_9abc_def1, 300, |rng, m, vq, q| {
        let mut blk = Block::new(MemDisk::new(1 << 20), rng.next().is_multiple_of(2), "r");
        let descs = random_descs(
            rng,
            |rng| match rng.next() % 4 {
                0 => rng.next(),
                1 => HDR,
                2 => DATA + rng.next() % 0x1000,
                _ => rng.next() % (20 << 20),
            },
            |rng| match rng.next() % 3 {
                0 => rng.next() as u32,
                1 => 16,
                _ => (rng.next() % 4096) as u32,
            },
        );
        hdr(m, HDR, (rng.next() % 16) as u32, rng.next() % 4096);
        let _ = vq.add_desc_chains(&descs, 0);
        if rng.next().is_multiple_of(8) {
            // A bogus avail index.
            m.write_obj(rng.next() as u16, GuestAddress(vq.avail_addr().0 + 2))
                .unwrap();
        }
        blk.process(q, m);
    });
}
