//! Receive buffers that a running capture may keep ([`RxPool`]).
//!
//! Theory of operation. A port's receive thread reads each frame into one buffer
//! and reuses it for the next read. While a capture runs on the network, the
//! thread instead gives the buffer away as a [`Bytes`] (the capture keeps it
//! rather than a copy, see [`crate::switch::Network::ingress_rx`]) and reads on
//! into another one from the port's pool. A buffer comes back to the pool when its
//! last reference is dropped: at once when no capture kept the frame, or once the
//! capture wrote it out. So a busy port under capture cycles through the few
//! buffers its capture holds at a time, already mapped and warm in the cache,
//! instead of a fresh allocation per frame (which the allocator hands back to the
//! kernel and takes again, a page fault per page). The pool keeps at most
//! [`POOL_MAX`] buffers; once the capture is over, the receive thread empties it
//! at its next frame or when it next waits for one, and buffers that come back
//! later are freed.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Most spare buffers a port's pool keeps.
pub(super) const POOL_MAX: usize = 64;

/// A port's spare receive buffers, each `size` bytes long.
pub(super) struct RxPool {
    size: usize,
    free: Mutex<Spare>,
}

/// The spare buffers, and whether the pool takes buffers back (from the first
/// [`RxPool::lend`] until [`RxPool::clear`]).
#[derive(Default)]
struct Spare {
    on: bool,
    bufs: Vec<Vec<u8>>,
}

/// A buffer given away: its first `len` bytes are the message.
struct Lent {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<RxPool>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

impl RxPool {
    /// A pool of buffers of `size` bytes.
    pub(super) fn new(size: usize) -> Arc<Self> {
        Arc::new(RxPool {
            size,
            free: Mutex::new(Spare::default()),
        })
    }

    /// A buffer of the pool's size: a spare one, or a new one; from now on the
    /// pool takes buffers back.
    fn buffer(&self) -> Vec<u8> {
        let spare = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.on = true;
            free.bufs.pop()
        };
        spare.unwrap_or_else(|| vec![0u8; self.size])
    }

    /// Gives away `buf` (its first `len` bytes are a message) as a [`Bytes`],
    /// replacing it with another buffer; `buf` comes back to the pool when the
    /// message's last reference is dropped.
    pub(super) fn lend(self: &Arc<Self>, buf: &mut Vec<u8>, len: usize) -> Bytes {
        let next = self.buffer();
        let buf = std::mem::replace(buf, next);
        let len = len.min(buf.len());
        Bytes::from_owner(Lent {
            buf,
            len,
            pool: self.clone(),
        })
    }

    /// Takes back a buffer (dropped if the pool is full or cleared, or the
    /// buffer is not of its size).
    fn put(&self, buf: Vec<u8>) {
        if buf.len() != self.size {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.on && free.bufs.len() < POOL_MAX {
            free.bufs.push(buf);
        }
    }

    /// Frees the spare buffers, and those still lent as they come back (the
    /// capture ended), until the next [`RxPool::lend`].
    pub(super) fn clear(&self) {
        let spare = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.on = false;
            std::mem::take(&mut free.bufs)
        };
        drop(spare);
    }

    /// Spare buffers now.
    #[cfg(test)]
    fn spare(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bufs
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_buffer_comes_back_when_its_last_reference_goes() {
        let pool = RxPool::new(100);
        let mut buf = vec![0u8; 100];
        buf[..3].copy_from_slice(b"abc");
        let first = buf.as_ptr();
        let msg = pool.lend(&mut buf, 3);
        assert_eq!(&msg[..], b"abc");
        assert_ne!(buf.as_ptr(), first, "reading on into another buffer");
        let kept = msg.slice(1..);
        drop(msg);
        assert_eq!(pool.spare(), 0, "a slice still holds it");
        drop(kept);
        assert_eq!(pool.spare(), 1);
        // The next one given out is the same memory.
        let again = pool.lend(&mut buf, 0);
        assert_eq!(buf.as_ptr(), first);
        drop(again);
        // Bounded, and emptied on demand.
        let held: Vec<Bytes> = (0..POOL_MAX + 10).map(|_| pool.lend(&mut buf, 1)).collect();
        drop(held);
        assert_eq!(pool.spare(), POOL_MAX);
        pool.clear();
        assert_eq!(pool.spare(), 0);
        // What comes back after the end is freed, not kept.
        let late = pool.lend(&mut buf, 1);
        pool.clear();
        drop(late);
        assert_eq!(pool.spare(), 0);
        // A length past the buffer is cut at it.
        assert_eq!(pool.lend(&mut buf, 1000).len(), 100);
    }
}
