//! virtio-blk, backed by a [`BlockBackend`] (in production an NBD connection).
//!
//! Theory of operation: on a kick of the request queue, every available chain is popped,
//! walked into a checked [`ChainView`] and parsed ([`request`]: header `{type, reserved,
//! sector}`, data, one status byte at the end of the writable part) into a checked
//! [`BlkRequest`] before anything is executed. The valid requests of the kick are then
//! handed to the backend ([`backend`]) together, so they are in flight on the NBD
//! connection at the same time, and completions are written back in order. A round
//! takes at most [`MAX_BATCH`] chains and stops early once it holds [`MAX_BATCH_BYTES`]
//! of data, so host memory per device stays bounded whatever the guest queues; chains
//! left in the avail ring are taken by the next round of the same kick. FLUSH maps to
//! NBD FLUSH, DISCARD to TRIM, WRITE_ZEROES to WRITE_ZEROES (`may_unmap` allows a hole).
//! A backend error answers the request with `VIRTIO_BLK_S_IOERR`; a malformed chain is
//! answered with IOERR if it has a status byte (else a zero-length used entry) and
//! counted in `bad_chains`.
//!
//! Files: this one holds the device (features, config space, the kick loop and
//! completion); `request.rs` the chain parser; `backend.rs` the backend trait, its NBD
//! implementation and the in-memory disk of the tests; `tests.rs` the unit tests.

pub mod backend;
pub mod request;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use self::backend::{BlockBackend, MemDisk};
use self::request::ID_LEN;
pub use self::request::{BadRequest, BlkRequest, Disk};
use super::chain::ChainView;
use super::{read_config_bytes, Counters, VirtioDevice};
use crate::nbd::{self, NbdError, Outcome, Request};

/// Device ID of virtio-blk.
pub const DEVICE_ID: u32 = VIRTIO_ID_BLOCK;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;

// Feature bits the device may offer (bit numbers from the virtio-blk header).
const F_SIZE_MAX: u64 = 1 << VIRTIO_BLK_F_SIZE_MAX;
const F_SEG_MAX: u64 = 1 << VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << VIRTIO_BLK_F_RO;
const F_FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;
const F_DISCARD: u64 = 1 << VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u64 = 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// Status: success.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status: I/O error.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

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

/// The errno every request of a batch gets when the backend itself failed.
const EIO: u32 = 5;

/// The valid chains of one round and the backend requests they make, between
/// [`Block::collect`] and [`Block::complete`].
pub struct Round {
    batch: Vec<Pending>,
    reqs: Vec<Request>,
}

impl Round {
    /// The backend requests of the round, in order.
    pub fn requests(&self) -> &[Request] {
        &self.reqs
    }
}

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
    counters: std::sync::Arc<Counters>,
    id: [u8; ID_LEN as usize],
    /// Where a kick goes when the device has its own I/O thread.
    kick: Option<EventFd>,
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
        let mut idb = [0u8; ID_LEN as usize];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Block {
            backend,
            read_only,
            features,
            config,
            counters: std::sync::Arc::default(),
            id: idb,
            kick: None,
        }
    }

    /// Hands kicks to an I/O thread: a QueueNotify that reaches the transport (when
    /// KVM_IOEVENTFD did not take it first) only signals `kick`, and the thread that
    /// waits on it runs the queue ([`Block::collect`], [`Block::complete`]).
    pub fn with_kick(mut self, kick: EventFd) -> Self {
        self.kick = Some(kick);
        self
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.backend.size() / SECTOR * SECTOR
    }

    /// Whether the guest sees the disk read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What the request parser checks against.
    fn disk(&self) -> Disk {
        Disk {
            capacity: self.capacity(),
            read_only: self.read_only,
            features: self.features,
        }
    }

    /// The device's counters, shared (the metrics server reads them).
    pub fn counters_handle(&self) -> std::sync::Arc<Counters> {
        self.counters.clone()
    }

    /// The backend's counters.
    pub fn backend_stats(&self) -> crate::nbd::SessionStats {
        self.backend.stats()
    }

    /// Flushes and closes the backend (on shutdown).
    pub fn close(&mut self) -> Result<(), NbdError> {
        self.backend.close()
    }

    /// Handles every available chain of the request queue on the calling thread
    /// (unit tests, the fuzz harness, and a device without a kick eventfd): rounds of
    /// [`Block::collect`], the backend, [`Block::complete`]. Returns whether any chain
    /// completed (the guest needs an interrupt).
    pub fn process(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        loop {
            let (round, popped) = self.collect(q, mem);
            if !popped {
                return any;
            }
            any = true;
            if let Some(round) = round {
                let outcomes = self.submit(&round);
                self.complete(round, outcomes, q, mem);
            }
        }
    }

    /// Runs a round's backend requests on this device's own backend.
    pub fn submit(&mut self, round: &Round) -> Result<Vec<Outcome>, NbdError> {
        if round.reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.submit(&round.reqs)
    }

    /// Phase 1 of a round, with the transport locked: pops at most [`MAX_BATCH`] chains
    /// (or [`MAX_BATCH_BYTES`] of data), answers the malformed ones at once and
    /// returns the valid ones as a [`Round`] (None if there were none), and whether
    /// any chain was popped at all (false: the avail ring is empty).
    pub fn collect(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> (Option<Round>, bool) {
        let mut batch: Vec<Pending> = Vec::new();
        let mut bad_heads: Vec<(u16, Option<ChainView>)> = Vec::new();
        {
            let (table, qsize) = (GuestAddress(q.desc_table()), q.size());
            let Ok(iter) = q.iter(mem) else {
                // A bad avail index: the queue is unusable until reset.
                Counters::bump(&self.counters.bad_chains);
                return (None, false);
            };
            let mut bytes = 0u64;
            for chain in iter.take(MAX_BATCH) {
                let head = chain.head_index();
                match ChainView::parse(mem, table, qsize, head) {
                    Ok(view) => match BlkRequest::parse(&view, mem, &self.disk()) {
                        Ok(req) => {
                            bytes += req.data_len();
                            batch.push(Pending { view, req });
                            if bytes >= MAX_BATCH_BYTES {
                                // The rest stays in the avail ring for the next round.
                                break;
                            }
                        }
                        Err(BadRequest) => bad_heads.push((head, Some(view))),
                    },
                    Err(_) => bad_heads.push((head, None)),
                }
            }
        }
        let popped = !batch.is_empty() || !bad_heads.is_empty();
        for (head, view) in bad_heads {
            self.answer_bad(head, view.as_ref(), q, mem);
        }
        if batch.is_empty() {
            return (None, popped);
        }
        let mut reqs = Vec::new();
        for p in &batch {
            if let BlkRequest::Io { reqs: r, .. } = &p.req {
                reqs.extend(r.iter().cloned());
            }
        }
        (Some(Round { batch, reqs }), popped)
    }

    /// Returns a malformed chain to the guest: IOERR in its status byte if it has one
    /// where a status byte would be, else a zero-length used entry.
    fn answer_bad(
        &self,
        head: u16,
        view: Option<&ChainView>,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) {
        Counters::bump(&self.counters.bad_chains);
        let answered = view.is_some_and(|v| {
            v.writable_len > 0 && v.write(mem, v.writable_len - 1, &[S_IOERR]).is_some()
        });
        let _ = q.add_used(mem, head, u32::from(answered));
    }

    /// Phase 3 of a round, with the transport locked again: each chain gets its data
    /// and status, in order; `outcomes` are the backend's answers to the round's
    /// requests (an `Err`: the backend failed, every request gets IOERR).
    pub fn complete(
        &mut self,
        round: Round,
        outcomes: Result<Vec<Outcome>, NbdError>,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) {
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "block backend failed");
                vec![Err(EIO); round.reqs.len()]
            }
        };
        let batch = round.batch;
        let mut results = outcomes.into_iter();
        for p in batch {
            let v = &p.view;
            let status_at = v.writable_len - 1;
            // Which of the read / write counters a success adds to.
            let mut kind = None;
            let (status, written) = match p.req {
                BlkRequest::Fail(s) => (s, 0),
                BlkRequest::GetId => match v.write(mem, 0, &self.id) {
                    Some(()) => (S_OK, ID_LEN),
                    None => (S_IOERR, 0),
                },
                BlkRequest::Io { is_read, reqs } => {
                    kind = if is_read {
                        Some(&self.counters.reads)
                    } else if reqs.iter().any(|r| matches!(r, Request::Write { .. })) {
                        Some(&self.counters.writes)
                    } else {
                        None
                    };
                    let mut status = S_OK;
                    let mut written = 0;
                    for r in &reqs {
                        match results.next() {
                            // A read answered with other than its length is an error
                            // (whatever the backend), never a partial buffer as OK.
                            Some(Ok(data))
                                if is_read
                                    && !matches!(r, Request::Read { len, .. }
                                        if data.len() == *len as usize) =>
                            {
                                status = S_IOERR;
                            }
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
                if let Some(k) = kind {
                    Counters::bump(k);
                }
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
        if let Some(k) = &self.kick {
            // Only fails if the counter would overflow: a kick is pending anyway.
            let _ = k.write(1);
            return false;
        }
        match queues.get_mut(usize::from(index)) {
            Some(q) if index == 0 => self.process(q, mem),
            _ => false,
        }
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests;
