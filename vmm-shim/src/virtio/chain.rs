//! A checked view of one descriptor chain.
//!
//! [`ChainView::parse`] walks a chain once (virtio-queue's iterator bounds its length
//! and follows indirect tables) and checks what the spec requires and what we rely on:
//! the chain is not cut short by a bad `next` index, readable descriptors come before
//! writable ones, every buffer lies inside guest memory, and the totals fit in a u32.
//! After that, devices only move bytes through [`ChainView::read`] and
//! [`ChainView::write`], which use vm-memory's checked copies.

use std::ops::Deref;

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
        let mut done = 0usize;
        let mut skip = skip as u64;
        for &(addr, l) in &self.readable {
            if done == out.len() {
                break;
            }
            let l = u64::from(l);
            if skip >= l {
                skip -= l;
                continue;
            }
            let n = ((l - skip) as usize).min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], addr.checked_add(skip)?)
                .ok()?;
            done += n;
            skip = 0;
        }
        (done == out.len()).then_some(out)
    }

    /// Writes `data` into the writable part starting `skip` bytes in.
    pub fn write(&self, mem: &GuestMemoryMmap, skip: u32, data: &[u8]) -> Option<()> {
        let mut done = 0usize;
        let mut skip = skip as u64;
        for &(addr, l) in &self.writable {
            if done == data.len() {
                break;
            }
            let l = u64::from(l);
            if skip >= l {
                skip -= l;
                continue;
            }
            let n = ((l - skip) as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], addr.checked_add(skip)?)
                .ok()?;
            done += n;
            skip = 0;
        }
        (done == data.len()).then_some(())
    }
}
