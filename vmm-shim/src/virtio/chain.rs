//! A checked view of one descriptor chain.
//!
//! [`ChainView::parse`] walks a chain once, reading each descriptor from the table
//! itself (virtio-queue's iterator would follow indirect tables, up to 65,535
//! descriptors each, although we never offer VIRTIO_F_INDIRECT_DESC), and checks what
//! the spec requires and what we rely on: no indirect descriptor, at most
//! [`MAX_CHAIN_DESCS`] (and at most the queue size) descriptors, so a loop ends there,
//! the chain is not cut short by a bad `next` index, readable descriptors come before
//! writable ones, every buffer lies inside guest memory, and the totals fit in a u32.
//! After that, devices only move bytes through [`ChainView::read`] and
//! [`ChainView::write`], which use vm-memory's checked copies.

use std::ops::Range;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Why a chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// the chain ends at a descriptor that says it has a successor (bad next index or
    /// unreadable descriptor)
    #[error("descriptor chain cut short (bad next index, loop or unreadable descriptor)")]
    Truncated,
    /// a readable descriptor follows a writable one
    #[error("readable descriptor after a writable one")]
    Order,
    /// a buffer lies outside guest memory
    #[error("buffer outside guest memory")]
    OutOfMemory,
    /// the chain's buffers add up to more than 4 GiB
    #[error("chain longer than 4 GiB")]
    TooLong,
    /// a descriptor refers to an indirect table (the feature is not offered)
    #[error("indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not offered")]
    Indirect,
    /// the chain has more descriptors than the queue size or [`MAX_CHAIN_DESCS`]
    /// (a loop, or a chain longer than any request we serve)
    #[error("descriptor chain longer than {MAX_CHAIN_DESCS} descriptors or the queue")]
    TooManyDescriptors,
}

/// Most descriptors one chain may have (no device here needs more than its queue
/// size: virtio-blk at most SEG_MAX + 2 = 128).
pub const MAX_CHAIN_DESCS: usize = 256;
/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// The buffers of one chain, split into the readable and the writable part.
#[derive(Debug, Clone, Default)]
pub struct ChainView {
    /// Head index (for the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<(GuestAddress, u32)>,
    /// Device-writable buffers, in order.
    pub writable: Vec<(GuestAddress, u32)>,
    /// Total readable bytes.
    pub readable_len: u32,
    /// Total writable bytes.
    pub writable_len: u32,
}

impl ChainView {
    /// Walks and checks the chain that starts at descriptor `head` of the table at
    /// `table` (of `queue_size` entries).
    pub fn parse(
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
    ) -> Result<Self, ChainError> {
        let mut v = ChainView {
            head,
            ..Default::default()
        };
        let cap = usize::from(queue_size).min(MAX_CHAIN_DESCS);
        let mut index = head;
        for n in 0..=cap {
            if index >= queue_size {
                return Err(ChainError::Truncated);
            }
            if n == cap {
                // A loop, or a chain longer than we serve.
                return Err(ChainError::TooManyDescriptors);
            }
            let d: Descriptor = table
                .checked_add(u64::from(index) * DESC_SIZE)
                .and_then(|a| mem.read_obj(a).ok())
                .ok_or(ChainError::Truncated)?;
            // VIRTIO_F_INDIRECT_DESC is never offered, so a driver must not use it.
            if d.refers_to_indirect_table() {
                return Err(ChainError::Indirect);
            }
            if d.len() > 0 && !mem.check_range(d.addr(), d.len() as usize, Permissions::ReadWrite) {
                return Err(ChainError::OutOfMemory);
            }
            if d.is_write_only() {
                v.writable_len = v
                    .writable_len
                    .checked_add(d.len())
                    .ok_or(ChainError::TooLong)?;
                v.writable.push((d.addr(), d.len()));
            } else {
                if !v.writable.is_empty() {
                    return Err(ChainError::Order);
                }
                v.readable_len = v
                    .readable_len
                    .checked_add(d.len())
                    .ok_or(ChainError::TooLong)?;
                v.readable.push((d.addr(), d.len()));
            }
            if !d.has_next() {
                return Ok(v);
            }
            index = d.next();
        }
        Err(ChainError::TooManyDescriptors)
    }

    /// Reads `len` readable bytes starting `skip` bytes into the readable part.
    pub fn read(&self, mem: &GuestMemoryMmap, skip: u32, len: u32) -> Option<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        for span in spans(&self.readable, skip, out.len()) {
            let (addr, range) = span?;
            mem.read_slice(out.get_mut(range)?, addr).ok()?;
        }
        Some(out)
    }

    /// Writes `data` into the writable part starting `skip` bytes in.
    pub fn write(&self, mem: &GuestMemoryMmap, skip: u32, data: &[u8]) -> Option<()> {
        for span in spans(&self.writable, skip, data.len()) {
            let (addr, range) = span?;
            mem.write_slice(data.get(range)?, addr).ok()?;
        }
        Some(())
    }
}

/// Where `len` bytes go that start `skip` bytes into the buffers `bufs`: one item per
/// buffer touched, the guest address and the range of the caller's bytes that belongs
/// there. An item is `None` where the bytes cannot be placed (the address would
/// overflow, or the buffers end first); it is the last one, so a caller that copies
/// item by item and stops at `None` has copied exactly what fitted. Both directions of
/// [`ChainView`] copy through this one walk.
fn spans(
    bufs: &[(GuestAddress, u32)],
    skip: u32,
    len: usize,
) -> impl Iterator<Item = Option<(GuestAddress, Range<usize>)>> + '_ {
    let mut done = 0usize;
    let mut skip = u64::from(skip);
    let mut bufs = bufs.iter();
    std::iter::from_fn(move || loop {
        if done == len {
            return None;
        }
        let Some(&(addr, l)) = bufs.next() else {
            done = len;
            return Some(None);
        };
        let l = u64::from(l);
        if skip >= l {
            skip -= l;
            continue;
        }
        let n = usize::try_from(l - skip).map_or(len - done, |n| n.min(len - done));
        let span = addr.checked_add(skip).map(|a| (a, done..done + n));
        // After a `None` nothing more is placed.
        done = if span.is_some() { done + n } else { len };
        skip = 0;
        return Some(span);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::mem;

    fn view() -> ChainView {
        // Two buffers each way, the second of each split off at an odd length.
        let bufs = vec![(GuestAddress(0x10_0000), 3), (GuestAddress(0x20_0000), 5)];
        ChainView {
            head: 0,
            readable: bufs.clone(),
            writable: bufs,
            readable_len: 8,
            writable_len: 8,
        }
    }

    #[test]
    fn copies_cross_buffers_honour_skip_and_stop_at_the_end() {
        let m = mem();
        let v = view();
        assert_eq!(v.write(&m, 0, b"abcdefgh"), Some(()));
        assert_eq!(v.read(&m, 0, 8).as_deref(), Some(&b"abcdefgh"[..]));
        assert_eq!(v.read(&m, 2, 3).as_deref(), Some(&b"cde"[..]));
        assert_eq!(v.read(&m, 3, 5).as_deref(), Some(&b"defgh"[..]));
        assert_eq!(v.read(&m, 8, 0).as_deref(), Some(&b""[..]));
        assert_eq!(v.write(&m, 7, b"Z"), Some(()));
        assert_eq!(v.read(&m, 7, 1).as_deref(), Some(&b"Z"[..]));
        // Past the end: fails, having written only what fitted.
        assert_eq!(v.write(&m, 6, b"XYW"), None);
        assert_eq!(v.read(&m, 0, 8).as_deref(), Some(&b"abcdefXY"[..]));
        assert_eq!(v.read(&m, 6, 3), None);
        assert_eq!(v.read(&m, 9, 0).as_deref(), Some(&b""[..]));
        assert_eq!(v.read(&m, 9, 1), None);
    }

    /// Writes descriptors at table 0 of `m`; parses the chain from `head`.
    fn walk(
        m: &GuestMemoryMmap,
        descs: &[(u64, u32, u16, u16)],
        qsize: u16,
    ) -> Result<ChainView, ChainError> {
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            m.write_obj(Descriptor::new(a, l, f, n), GuestAddress(16 * i as u64))
                .unwrap();
        }
        ChainView::parse(m, GuestAddress(0), qsize, 0)
    }

    #[test]
    fn indirect_descriptors_loops_and_long_chains_are_refused() {
        let m = mem();
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let v = walk(
            &m,
            &[(0x10_0000, 16, NEXT, 1), (0x10_1000, 1, WRITE, 0)],
            16,
        )
        .unwrap();
        assert_eq!((v.readable_len, v.writable_len), (16, 1));
        // An indirect table, even a well-formed one.
        assert_eq!(
            walk(
                &m,
                &[(0x10_0000, 16, NEXT, 1), (0x20_0000, 32, INDIRECT, 0)],
                16
            )
            .unwrap_err(),
            ChainError::Indirect
        );
        // A loop ends at the queue size.
        assert_eq!(
            walk(
                &m,
                &[(0x10_0000, 16, NEXT, 1), (0x10_0000, 16, NEXT, 0)],
                16
            )
            .unwrap_err(),
            ChainError::TooManyDescriptors
        );
        // A chain through a table bigger than the cap, or past the queue size.
        let long: Vec<_> = (0..300u16).map(|i| (0x10_0000, 16, NEXT, i + 1)).collect();
        assert_eq!(
            walk(&m, &long, 1024).unwrap_err(),
            ChainError::TooManyDescriptors
        );
        assert_eq!(walk(&m, &long[..4], 3).unwrap_err(), ChainError::Truncated);
    }
}
