//! A virtio-blk request chain parsed into a checked [`BlkRequest`].
//!
//! Layout of a chain (virtio 1.x, 5.2.6): a device-readable header `{type: u32,
//! reserved: u32, sector: u64}`, then the data (readable for writes and for the segment
//! list of DISCARD / WRITE_ZEROES, writable for reads and GET_ID), then one writable
//! status byte, the last writable byte of the chain. [`BlkRequest::parse`] reads the
//! header and any segment list once, checks every length against the protocol and
//! [`MAX_REQUEST`] / [`MAX_DISCARD_SEG`] / [`MAX_DISCARD_SECTORS`], and every range
//! against the disk's capacity, and yields the NBD requests to run. A chain whose shape
//! is wrong is a [`BadRequest`]; a well-formed request that cannot be served (out of
//! range, read-only disk, feature not offered) becomes [`BlkRequest::Fail`] with the
//! status to answer.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::GuestMemoryMmap;

use super::{
    F_DISCARD, F_FLUSH, F_WRITE_ZEROES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST, SECTOR,
    S_IOERR, S_UNSUPP,
};
use crate::nbd::Request;
use crate::virtio::chain::ChainView;

/// Length of the request header.
const HDR_LEN: u32 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment `{sector: u64, num_sectors: u32,
/// flags: u32}`.
const SEG_LEN: u32 = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: u32 = VIRTIO_BLK_ID_BYTES;

/// What parsing needs to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    /// Capacity in bytes (a whole number of sectors).
    pub capacity: u64,
    /// The guest sees the disk read-only.
    pub read_only: bool,
    /// The feature bits offered to the guest.
    pub features: u64,
}

impl Disk {
    /// Whether `len` bytes from sector `sector` lie on the disk (no overflow either).
    fn holds(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= self.capacity)
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

/// A chain whose request makes no sense (no status byte, short header, odd sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed virtio-blk request")]
pub struct BadRequest;

/// The `N` bytes at `at` in `b`, for `from_le_bytes`. Callers pass buffers whose length
/// was checked to cover the field; returning `None` instead of indexing keeps even a
/// mistake there from panicking on guest bytes.
fn le<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

impl BlkRequest {
    /// Parses one chain (already checked for shape by [`ChainView::parse`]).
    pub fn parse(view: &ChainView, mem: &GuestMemoryMmap, disk: &Disk) -> Result<Self, BadRequest> {
        // Status byte: last writable byte.
        if view.writable_len == 0 {
            return Err(BadRequest);
        }
        let hdr = view.read(mem, 0, HDR_LEN).ok_or(BadRequest)?;
        let ty = u32::from_le_bytes(le(&hdr, 0).ok_or(BadRequest)?);
        let sector = u64::from_le_bytes(le(&hdr, 8).ok_or(BadRequest)?);
        let in_len = view.writable_len - 1;
        let out_len = view.readable_len - HDR_LEN;
        let data_ok = |len: u32| len != 0 && u64::from(len) % SECTOR == 0 && len <= MAX_REQUEST;
        Ok(match ty {
            VIRTIO_BLK_T_IN => {
                if !data_ok(in_len) {
                    return Err(BadRequest);
                }
                if !disk.holds(sector, u64::from(in_len)) {
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
            VIRTIO_BLK_T_OUT => {
                if !data_ok(out_len) {
                    return Err(BadRequest);
                }
                if disk.read_only || !disk.holds(sector, u64::from(out_len)) {
                    return Ok(BlkRequest::Fail(S_IOERR));
                }
                let data = view.read(mem, HDR_LEN, out_len).ok_or(BadRequest)?;
                BlkRequest::Io {
                    is_read: false,
                    reqs: vec![Request::Write {
                        offset: sector * SECTOR,
                        data,
                    }],
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if disk.features & F_FLUSH == 0 {
                    return Ok(BlkRequest::Fail(S_UNSUPP));
                }
                BlkRequest::Io {
                    is_read: false,
                    reqs: vec![Request::Flush],
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                if in_len < ID_LEN {
                    return Err(BadRequest);
                }
                BlkRequest::GetId
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                Self::parse_segments(view, mem, disk, ty, out_len)?
            }
            _ => BlkRequest::Fail(S_UNSUPP),
        })
    }

    /// DISCARD / WRITE_ZEROES: the segment list after the header, one backend request
    /// per segment.
    fn parse_segments(
        view: &ChainView,
        mem: &GuestMemoryMmap,
        disk: &Disk,
        ty: u32,
        out_len: u32,
    ) -> Result<Self, BadRequest> {
        let discard = ty == VIRTIO_BLK_T_DISCARD;
        let feature = if discard { F_DISCARD } else { F_WRITE_ZEROES };
        if disk.features & feature == 0 {
            return Ok(BlkRequest::Fail(S_UNSUPP));
        }
        if out_len == 0 || !out_len.is_multiple_of(SEG_LEN) || out_len / SEG_LEN > MAX_DISCARD_SEG {
            return Err(BadRequest);
        }
        let segs = view.read(mem, HDR_LEN, out_len).ok_or(BadRequest)?;
        let mut reqs = Vec::new();
        for s in segs.chunks_exact(SEG_LEN as usize) {
            let start = u64::from_le_bytes(le(s, 0).ok_or(BadRequest)?);
            let n = u32::from_le_bytes(le(s, 8).ok_or(BadRequest)?);
            let flags = u32::from_le_bytes(le(s, 12).ok_or(BadRequest)?);
            if n > MAX_DISCARD_SECTORS || flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Ok(BlkRequest::Fail(S_UNSUPP));
            }
            if !disk.holds(start, u64::from(n) * SECTOR) {
                return Ok(BlkRequest::Fail(S_IOERR));
            }
            let offset = start * SECTOR;
            // MAX_DISCARD_SECTORS keeps this inside u32.
            let len = n * SECTOR as u32;
            reqs.push(if discard {
                Request::Trim { offset, len }
            } else {
                Request::WriteZeroes {
                    offset,
                    len,
                    may_trim: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            });
        }
        Ok(BlkRequest::Io {
            is_read: false,
            reqs,
        })
    }

    /// Data bytes the request moves between the guest and the backend.
    pub fn data_len(&self) -> u64 {
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
