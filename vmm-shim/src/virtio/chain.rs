//! A checked view of one descriptor chain.
//!
//! [`ChainView::parse`] walks a chain once (virtio-queue's iterator bounds its length
//! and follows indirect tables) and checks what the spec requires and what we rely on:
//! the chain is not cut short by a bad `next` index, readable descriptors come before
//! writable ones, every buffer lies inside guest memory, and the totals fit in a u32.
//! After that, devices only move bytes through [`ChainView::read`] and
//! [`ChainView::write`], which use vm-memory's checked copies.

use std::ops::{Deref, Range};

use virtio_queue::DescriptorChain;
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
}

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
    /// Walks and checks a chain.
    pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut v = ChainView {
            head: chain.head_index(),
            ..Default::default()
        };
        let mut last_has_next = false;
        for d in chain {
            last_has_next = d.has_next();
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
        }
        if last_has_next {
            return Err(ChainError::Truncated);
        }
        Ok(v)
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
}
