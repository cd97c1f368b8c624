//! virtio-blk, backed by a [`BlockBackend`] (in production an NBD connection).
//!
//! Theory of operation: on a kick of the request queue, every available chain is popped
//! and parsed (header `{type, reserved, sector}`, data, one status byte at the end of
//! the writable part) into a checked [`BlkRequest`] before anything is executed. The
//! valid requests of the kick are then handed to the backend together, so they are in
//! flight on the NBD connection at the same time, and completions are written back in
//! order. A round takes at most [`MAX_BATCH`] chains and stops early once it holds
//! [`MAX_BATCH_BYTES`] of data, so host memory per device stays bounded whatever the
//! guest queues. FLUSH maps to NBD FLUSH, DISCARD to TRIM, WRITE_ZEROES to WRITE_ZEROES
//! (`may_unmap` allows a hole). A backend error answers the request with
//! `VIRTIO_BLK_S_IOERR`; a malformed chain is answered with IOERR if it has a status byte
//! (else a zero-length used entry) and counted in `bad_chains`.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::chain::ChainView;
use super::{read_config_bytes, Counters, VirtioDevice};
use crate::nbd::{self, NbdClient, NbdError, Outcome, Request};

/// Device ID of virtio-blk.
pub const DEVICE_ID: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;

/// Largest segment we ask the driver for.
pub const SIZE_MAX: u32 = 256 << 10;
/// Most data segments per request (SIZE_MAX * SEG_MAX stays under the NBD payload cap).
pub const SEG_MAX: u32 = 126;
/// Largest data transfer of one request (and of one NBD request).
pub const MAX_REQUEST: u32 = nbd::MAX_PAYLOAD;
/// Most discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors per discard / write-zeroes segment (keeps each NBD length in u32).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 8;
/// Most chains handled per kick before the used ring is published.
pub const MAX_BATCH: usize = 256;
/// Most data bytes (read or written) in one batch. A guest can point every chain of
/// a full queue at the same buffer, so without this bound 256 chains of
/// [`MAX_REQUEST`] each would make the VMM hold 8 GiB of host memory at once.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;

/// What a block device talks to.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read-only export.
    fn read_only(&self) -> bool;
    /// FLUSH supported.
    fn can_flush(&self) -> bool;
    /// TRIM supported.
    fn can_trim(&self) -> bool;
    /// WRITE_ZEROES supported.
    fn can_write_zeroes(&self) -> bool;
    /// Runs requests (in flight together); an `Err` means the backend is gone.
    fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError>;
    /// Flushes and disconnects.
    fn close(&mut self) -> Result<(), NbdError>;
}

impl BlockBackend for NbdClient {
    fn size(&self) -> u64 {
        NbdClient::size(self)
    }
    fn read_only(&self) -> bool {
        NbdClient::read_only(self)
    }
    fn can_flush(&self) -> bool {
        self.flags() & nbd::TFLAG_SEND_FLUSH != 0
    }
    fn can_trim(&self) -> bool {
        self.flags() & nbd::TFLAG_SEND_TRIM != 0
    }
    fn can_write_zeroes(&self) -> bool {
        self.flags() & nbd::TFLAG_SEND_WRITE_ZEROES != 0
    }
    fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        NbdClient::submit(self, reqs)
    }
    fn close(&mut self) -> Result<(), NbdError> {
        NbdClient::close(self)
    }
}

/// A parsed, checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkRequest {
    /// Backend requests; their data (for reads) goes to the guest.
    Io {
        /// Whether read data is copied to the guest.
        is_read: bool,
        /// One or more backend requests (discard has several segments).
        reqs: Vec<Request>,
    },
    /// GET_ID: the answer is written directly.
    GetId,
    /// Answered with this status without touching the backend.
    Fail(u8),
}

impl BlkRequest {
    /// Data bytes the request moves between the guest and the backend.
    fn data_len(&self) -> u64 {
        match self {
            BlkRequest::Io { reqs, .. } => reqs
                .iter()
                .map(|r| match r {
                    Request::Read { len, .. } => u64::from(*len),
                    Request::Write { data, .. } => data.len() as u64,
                    _ => 0,
                })
                .sum(),
            _ => 0,
        }
    }
}

/// A chain whose request makes no sense (no status byte, short header, odd sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed virtio-blk request")]
pub struct BadRequest;

/// One popped chain, ready to complete.
struct Pending {
    view: ChainView,
    req: BlkRequest,
}

/// The virtio-blk device.
pub struct Block<B: BlockBackend> {
    backend: B,
    read_only: bool,
    features: u64,
    config: Vec<u8>,
    counters: Counters,
    id: [u8; 20],
}

impl<B: BlockBackend> Block<B> {
    /// Creates the device; `force_ro` presents a writable export read-only.
    pub fn new(backend: B, force_ro: bool, id: &str) -> Self {
        let read_only = force_ro || backend.read_only();
        let mut features = F_SIZE_MAX | F_SEG_MAX;
        if read_only {
            features |= F_RO;
        }
        if backend.can_flush() {
            features |= F_FLUSH;
        }
        if backend.can_trim() && !read_only {
            features |= F_DISCARD;
        }
        if backend.can_write_zeroes() && !read_only {
            features |= F_WRITE_ZEROES;
        }
        // virtio_blk_config: capacity@0, size_max@8, seg_max@12, geometry@16,
        // blk_size@20, topology@24, writeback@32, unused@33, num_queues@34,
        // max_discard_sectors@36, max_discard_seg@40, discard_sector_alignment@44,
        // max_write_zeroes_sectors@48, max_write_zeroes_seg@52, write_zeroes_may_unmap@56.
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&(backend.size() / SECTOR).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&512u32.to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[56] = 1;
        let mut idb = [0u8; 20];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Block {
            backend,
            read_only,
            features,
            config,
            counters: Counters::default(),
            id: idb,
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.backend.size() / SECTOR * SECTOR
    }

    /// Whether the guest sees the disk read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Flushes and closes the backend (on shutdown).
    pub fn close(&mut self) -> Result<(), NbdError> {
        self.backend.close()
    }

    /// Parses one chain into a request (the view was already checked for shape).
    pub fn parse(&self, view: &ChainView, mem: &GuestMemoryMmap) -> Result<BlkRequest, BadRequest> {
        // Status byte: last writable byte.
        if view.writable_len == 0 {
            return Err(BadRequest);
        }
        let hdr = view.read(mem, 0, 16).ok_or(BadRequest)?;
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sb = [0u8; 8];
        sb.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sb);
        let in_len = view.writable_len - 1;
        let out_len = view.readable_len - 16;
        let cap = self.capacity();
        let range_ok = |len: u64| {
            sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= cap)
        };
        Ok(match ty {
            T_IN => {
                if in_len == 0 || u64::from(in_len) % SECTOR != 0 || in_len > MAX_REQUEST {
                    return Err(BadRequest);
                }
                if !range_ok(u64::from(in_len)) {
                    return Ok(BlkRequest::Fail(S_IOERR));
                }
                BlkRequest::Io {
                    is_read: true,
                    reqs: vec![Request::Read {
                        offset: sector * SECTOR,
                        len: in_len,
                    }],
                }
            }
            T_OUT => {
                if out_len == 0 || u64::from(out_len) % SECTOR != 0 || out_len > MAX_REQUEST {
                    return Err(BadRequest);
                }
                if self.read_only || !range_ok(u64::from(out_len)) {
                    return Ok(BlkRequest::Fail(S_IOERR));
                }
                let data = view.read(mem, 16, out_len).ok_or(BadRequest)?;
                BlkRequest::Io {
                    is_read: false,
                    reqs: vec![Request::Write {
                        offset: sector * SECTOR,
                        data,
                    }],
                }
            }
            T_FLUSH => {
                if self.features & F_FLUSH == 0 {
                    return Ok(BlkRequest::Fail(S_UNSUPP));
                }
                BlkRequest::Io {
                    is_read: false,
                    reqs: vec![Request::Flush],
                }
            }
            T_GET_ID => {
                if in_len < 20 {
                    return Err(BadRequest);
                }
                BlkRequest::GetId
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let f = if ty == T_DISCARD {
                    F_DISCARD
                } else {
                    F_WRITE_ZEROES
                };
                if self.features & f == 0 {
                    return Ok(BlkRequest::Fail(S_UNSUPP));
                }
                if out_len == 0 || !out_len.is_multiple_of(16) || out_len / 16 > MAX_DISCARD_SEG {
                    return Err(BadRequest);
                }
                let segs = view.read(mem, 16, out_len).ok_or(BadRequest)?;
                let mut reqs = Vec::new();
                for s in segs.chunks_exact(16) {
                    let mut b8 = [0u8; 8];
                    b8.copy_from_slice(&s[0..8]);
                    let start = u64::from_le_bytes(b8);
                    let n = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
                    let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                    if n > MAX_DISCARD_SECTORS || flags & !1 != 0 {
                        return Ok(BlkRequest::Fail(S_UNSUPP));
                    }
                    let ok = start
                        .checked_mul(SECTOR)
                        .and_then(|o| o.checked_add(u64::from(n) * SECTOR))
                        .is_some_and(|end| end <= cap);
                    if !ok {
                        return Ok(BlkRequest::Fail(S_IOERR));
                    }
                    let offset = start * SECTOR;
                    let len = n * SECTOR as u32;
                    reqs.push(if ty == T_DISCARD {
                        Request::Trim { offset, len }
                    } else {
                        Request::WriteZeroes {
                            offset,
                            len,
                            may_trim: flags & 1 == 1,
                        }
                    });
                }
                BlkRequest::Io {
                    is_read: false,
                    reqs,
                }
            }
            _ => BlkRequest::Fail(S_UNSUPP),
        })
    }

    /// Handles every available chain of the request queue. Returns whether any chain
    /// completed (the guest needs an interrupt).
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        loop {
            let mut batch: Vec<Pending> = Vec::new();
            let mut bad_heads: Vec<(u16, Option<ChainView>)> = Vec::new();
            {
                let Ok(iter) = q.iter(mem) else {
                    // A bad avail index: the queue is unusable until reset.
                    Counters::bump(&self.counters.bad_chains);
                    return any;
                };
                let mut bytes = 0u64;
                for chain in iter.take(MAX_BATCH) {
                    let head = chain.head_index();
                    match ChainView::parse(chain, mem) {
                        Ok(view) => match self.parse(&view, mem) {
                            Ok(req) => {
                                bytes += req.data_len();
                                batch.push(Pending { view, req });
                                if bytes >= MAX_BATCH_BYTES {
                                    // The rest stays in the avail ring for the next
                                    // round of this loop.
                                    break;
                                }
                            }
                            Err(BadRequest) => bad_heads.push((head, Some(view))),
                        },
                        Err(_) => bad_heads.push((head, None)),
                    }
                }
            }
            if batch.is_empty() && bad_heads.is_empty() {
                return any;
            }
            any = true;
            for (head, view) in bad_heads {
                Counters::bump(&self.counters.bad_chains);
                let mut len = 0;
                if let Some(v) = view {
                    if v.writable_len > 0 && v.write(mem, v.writable_len - 1, &[S_IOERR]).is_some()
                    {
                        len = 1;
                    }
                }
                let _ = q.add_used(mem, head, len);
            }
            self.execute(batch, q, mem);
        }
    }

    fn execute(&mut self, batch: Vec<Pending>, q: &mut Queue, mem: &GuestMemoryMmap) {
        // All backend requests of the batch go out together.
        let mut all = Vec::new();
        for p in &batch {
            if let BlkRequest::Io { reqs, .. } = &p.req {
                all.extend(reqs.iter().cloned());
            }
        }
        let outcomes: Vec<Outcome> = if all.is_empty() {
            Vec::new()
        } else {
            match self.backend.submit(&all) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "block backend failed");
                    vec![Err(5); all.len()]
                }
            }
        };
        let mut results = outcomes.into_iter();
        for p in batch {
            let v = &p.view;
            let status_at = v.writable_len - 1;
            let (status, written) = match p.req {
                BlkRequest::Fail(s) => (s, 0),
                BlkRequest::GetId => match v.write(mem, 0, &self.id) {
                    Some(()) => (S_OK, 20),
                    None => (S_IOERR, 0),
                },
                BlkRequest::Io { is_read, reqs } => {
                    let mut status = S_OK;
                    let mut written = 0;
                    for _ in 0..reqs.len() {
                        match results.next() {
                            Some(Ok(data)) if is_read => {
                                if v.write(mem, 0, &data).is_some() {
                                    written = data.len() as u32;
                                } else {
                                    status = S_IOERR;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => status = S_IOERR,
                        }
                    }
                    (status, written)
                }
            };
            if status == S_IOERR {
                Counters::bump(&self.counters.io_errors);
            } else {
                Counters::bump(&self.counters.completed);
            }
            let len = if v.write(mem, status_at, &[status]).is_some() {
                written + 1
            } else {
                written
            };
            let _ = q.add_used(mem, v.head, len);
        }
    }
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
    fn activate(&mut self, _acked: u64) {}
    fn notify(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match queues.get_mut(usize::from(index)) {
            Some(q) if index == 0 => self.process(q, mem),
            _ => false,
        }
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Total RAM of a guest memory map (helper for tests and fuzzing).
pub fn mem_len(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Reads a counter.
pub fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::{d, mem, used, used_idx, Rng};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// An in-memory backend that records what it was asked.
    struct MemBackend {
        data: Vec<u8>,
        ro: bool,
        fail_errno: Option<u32>,
        dead: bool,
        submits: Vec<Vec<Request>>,
    }

    impl MemBackend {
        fn new(size: usize) -> Self {
            MemBackend {
                data: vec![0; size],
                ro: false,
                fail_errno: None,
                dead: false,
                submits: Vec::new(),
            }
        }
    }

    impl BlockBackend for MemBackend {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        fn can_flush(&self) -> bool {
            true
        }
        fn can_trim(&self) -> bool {
            true
        }
        fn can_write_zeroes(&self) -> bool {
            true
        }
        fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
            self.submits.push(reqs.to_vec());
            if self.dead {
                return Err(NbdError::Down);
            }
            Ok(reqs
                .iter()
                .map(|r| {
                    if let Some(e) = self.fail_errno {
                        return Err(e);
                    }
                    match r {
                        Request::Read { offset, len } => {
                            let o = *offset as usize;
                            Ok(self.data[o..o + *len as usize].to_vec())
                        }
                        Request::Write { offset, data } => {
                            let o = *offset as usize;
                            self.data[o..o + data.len()].copy_from_slice(data);
                            Ok(vec![])
                        }
                        Request::Trim { offset, len }
                        | Request::WriteZeroes { offset, len, .. } => {
                            let o = *offset as usize;
                            self.data[o..o + *len as usize].fill(0);
                            Ok(vec![])
                        }
                        Request::Flush => Ok(vec![]),
                    }
                })
                .collect())
        }
        fn close(&mut self) -> Result<(), NbdError> {
            Ok(())
        }
    }

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

    #[test]
    fn write_then_read_round_trip_and_batching() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut blk = Block::new(MemBackend::new(1 << 20), false, "t");
        assert_eq!(blk.features() & F_RO, 0);
        m.write_slice(&[0xabu8; 1024], GuestAddress(DATA)).unwrap();
        hdr(&m, HDR, T_OUT, 4);
        hdr(&m, HDR + 16, T_IN, 4);
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
        // Two chains in one kick: write sector 4..6, read it back (a separate batch,
        // since reads and writes never share one).
        vq.add_desc_chains(
            &[
                d(HDR, 16, NEXT, 1),
                d(DATA, 1024, NEXT, 2),
                d(STATUS, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        assert!(blk.process(&mut q, &m));
        vq.add_desc_chains(
            &[
                d(HDR + 16, 16, NEXT, 4),
                d(DATA + 0x1000, 1024, NEXT | WRITE, 5),
                d(STATUS + 1, 1, WRITE, 0),
            ],
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
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut blk = Block::new(MemBackend::new(1 << 20), false, "t");
        let mut descs = Vec::new();
        for i in 0..4u64 {
            hdr(&m, HDR + 16 * i, T_IN, i);
            let b = (3 * i) as u16;
            descs.push(d(HDR + 16 * i, 16, NEXT, b + 1));
            descs.push(d(DATA + 0x1000 * i, 512, NEXT | WRITE, b + 2));
            descs.push(d(STATUS + i, 1, WRITE, 0));
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
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut blk = Block::new(MemBackend::new(1 << 20), false, "t");
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
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut be = MemBackend::new(1 << 20);
        be.ro = true;
        let mut blk = Block::new(be, false, "t");
        assert_ne!(blk.features() & F_RO, 0);
        assert_eq!(blk.features() & (F_DISCARD | F_WRITE_ZEROES), 0);
        hdr(&m, HDR, T_OUT, 0);
        vq.add_desc_chains(
            &[
                d(HDR, 16, NEXT, 1),
                d(DATA, 512, NEXT, 2),
                d(STATUS, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        blk.process(&mut q, &m);
        assert_eq!(status(&m, STATUS), S_IOERR);
        assert!(blk.backend.submits.is_empty());

        // A server-side errno and a dead connection both become IOERR.
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut be = MemBackend::new(1 << 20);
        be.fail_errno = Some(28);
        let mut blk = Block::new(be, false, "t");
        hdr(&m, HDR, T_IN, 0);
        vq.add_desc_chains(
            &[
                d(HDR, 16, NEXT, 1),
                d(DATA, 512, NEXT | WRITE, 2),
                d(STATUS, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        blk.process(&mut q, &m);
        assert_eq!(status(&m, STATUS), S_IOERR);
        blk.backend.fail_errno = None;
        blk.backend.dead = true;
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        vq.add_desc_chains(
            &[
                d(HDR, 16, NEXT, 4),
                d(DATA, 512, NEXT | WRITE, 5),
                d(STATUS, 1, WRITE, 0),
            ],
            3,
        )
        .unwrap();
        blk.process(&mut q, &m);
        assert_eq!(status(&m, STATUS), S_IOERR);
        assert_eq!(count(&blk.counters().io_errors), 2);
    }

    #[test]
    fn bad_chains_are_answered_and_counted() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut blk = Block::new(MemBackend::new(1 << 20), false, "t");
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
        assert_eq!(count(&blk.counters().bad_chains), 3);
        assert_eq!(status(&m, STATUS + 5), S_IOERR);
        assert_eq!(used(&m, vq.used_addr(), 0).1, 0);
        assert!(blk.backend.submits.is_empty());
    }

    /// Random descriptor tables and avail rings: the device must never panic and must
    /// leave the used index sane.
    #[test]
    fn one_batch_holds_a_bounded_amount_of_data() {
        // Five 32 MiB reads, all into the same guest buffer: they must not all be
        // in flight (and in host memory) at once.
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut blk = Block::new(MemBackend::new(MAX_REQUEST as usize), false, "t");
        hdr(&m, HDR, T_IN, 0);
        let mut descs = Vec::new();
        for i in 0..5u64 {
            let b = (3 * i) as u16;
            descs.push(d(HDR, 16, NEXT, b + 1));
            descs.push(d(16 << 20, MAX_REQUEST, NEXT | WRITE, b + 2));
            descs.push(d(STATUS + i, 1, WRITE, 0));
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

    #[test]
    fn randomized_chains_never_panic() {
        let m = mem();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..300 {
            let vq = MockSplitQueue::new(&m, 16);
            let mut q: Queue = vq.create_queue().unwrap();
            let mut blk = Block::new(MemBackend::new(1 << 20), rng.next().is_multiple_of(2), "r");
            let n = (rng.next() % 16) as usize + 1;
            let descs: Vec<_> = (0..n)
                .map(|_| {
                    let addr = match rng.next() % 4 {
                        0 => rng.next(),
                        1 => HDR,
                        2 => DATA + rng.next() % 0x1000,
                        _ => rng.next() % (20 << 20),
                    };
                    let len = match rng.next() % 3 {
                        0 => rng.next() as u32,
                        1 => 16,
                        _ => (rng.next() % 4096) as u32,
                    };
                    d(addr, len, (rng.next() % 8) as u16, (rng.next() % 20) as u16)
                })
                .collect();
            hdr(&m, HDR, (rng.next() % 16) as u32, rng.next() % 4096);
            let _ = vq.add_desc_chains(&descs, 0);
            if rng.next().is_multiple_of(8) {
                // A bogus avail index.
                m.write_obj(rng.next() as u16, GuestAddress(vq.avail_addr().0 + 2))
                    .unwrap();
            }
            blk.process(&mut q, &m);
            assert!(used_idx(&m, vq.used_addr()) as usize <= 16);
        }
    }
}
