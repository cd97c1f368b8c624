//! A TCP flow's smoltcp socket, alone in a socket set, with its two ring buffers in
//! a memory mapping of their own.
//!
//! # Theory of operation
//!
//! *One set per flow.* smoltcp's `Interface` looks for the socket of an incoming
//! segment by walking every socket of the set it is given, and its egress and
//! `poll_delay` walk them all too. With every flow in one set, each frame cost work
//! in proportion to the flow count (10,000 flows: a third of the idle throughput).
//! The router knows a segment's flow from its addresses, so it hands the interface
//! that flow's set only ([`FlowSocket::set`]); frames of no flow go with the
//! router's own, empty, set (smoltcp answers them with a RST, as before).
//!
//! *Rings in their own mapping.* Each flow's receive and transmit rings (the
//! `tcp_buffer` setting, 512 KiB each by default) are the two halves of one
//! anonymous `mmap`, not heap allocations: the kernel gives pages only where
//! bytes were written, whatever the allocator's state (from the heap, `calloc`
//! zeroes reused memory, and with one malloc arena 10,000 flows took 1.3 GiB), and
//! unmapping gives them all back. A ring that is empty can give its pages back
//! ([`FlowSocket::release`], `MADV_DONTNEED`: the next write faults in a zero page),
//! which the router does for flows idle a few seconds; an idle flow then holds no
//! ring pages at all.
//!
//! The rings are lent to smoltcp as `'static` slices; they live exactly as long as
//! the set that holds the socket, because [`FlowSocket`] owns both, never gives the
//! socket out of the set, and drops the set before the mapping.

use std::io;
use std::ptr::NonNull;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{Socket, SocketBuffer};

/// An anonymous private mapping of `len` bytes (both rings), unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone; nothing about it
// is tied to the thread that made it.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; no
        // existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped only
        // here; `FlowSocket` drops the socket set (the only user of the memory)
        // before its mapping.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Which ring of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ring {
    /// Bytes from the guest, not yet written to the host socket.
    Rx,
    /// Bytes for the guest, not yet acknowledged by it.
    Tx,
}

/// A flow's TCP socket in a set of its own, and the memory of its rings.
pub(super) struct FlowSocket {
    // Field order matters: the set (holding the socket that borrows the rings) is
    // dropped before the mapping.
    set: SocketSet<'static>,
    handle: SocketHandle,
    mem: Mapping,
    ring: usize,
}

impl FlowSocket {
    /// A socket with two rings of `ring` bytes each (a multiple of the page size is
    /// best; any size works), set up by `setup`.
    pub(super) fn new(ring: usize, setup: impl FnOnce(&mut Socket<'static>)) -> io::Result<Self> {
        let mem = Mapping::new(
            ring.checked_mul(2)
                .ok_or_else(|| io::Error::other("ring size"))?,
        )?;
        // SAFETY: the mapping is `2 * ring` bytes, readable and writable, zeroed by
        // the kernel, and owned by `mem`, which outlives every use: the two
        // disjoint halves are given only to the socket, which lives in `set`, which
        // is dropped before `mem` (field order) and never hands the socket out.
        // Nothing else makes a reference to this memory (`release` only advises
        // the kernel about pages of an empty ring, between smoltcp's calls).
        let (rx, tx) = unsafe {
            let base = mem.ptr.as_ptr();
            (
                std::slice::from_raw_parts_mut(base, ring),
                std::slice::from_raw_parts_mut(base.add(ring), ring),
            )
        };
        let mut sock = Socket::new(SocketBuffer::new(rx), SocketBuffer::new(tx));
        setup(&mut sock);
        let mut set = SocketSet::new(Vec::with_capacity(1));
        let handle = set.add(sock);
        Ok(FlowSocket {
            set,
            handle,
            mem,
            ring,
        })
    }

    /// The socket.
    pub(super) fn sock(&self) -> &Socket<'static> {
        self.set.get::<Socket>(self.handle)
    }

    /// The socket, to change.
    pub(super) fn sock_mut(&mut self) -> &mut Socket<'static> {
        self.set.get_mut::<Socket>(self.handle)
    }

    /// The set holding only this socket, for the interface's calls.
    pub(super) fn set(&mut self) -> &mut SocketSet<'static> {
        &mut self.set
    }

    /// Gives the pages of `ring` back to the kernel. The caller has checked that
    /// the ring holds no bytes smoltcp will read again: for `Tx`, nothing queued
    /// or unacknowledged (`send_queue() == 0`); for `Rx`, nothing queued
    /// (`recv_queue() == 0`) and nothing held out of order (everything the guest
    /// sent was acknowledged). Its contents then read as zeros, which nobody reads.
    pub(super) fn release(&mut self, ring: Ring) {
        let off = match ring {
            Ring::Rx => 0,
            Ring::Tx => self.ring,
        };
        let page = page_size();
        // Whole pages inside the ring only (the ring size need not be page-aligned).
        let start = off.div_ceil(page) * page;
        let end = ((off + self.ring) / page) * page;
        if end <= start {
            return;
        }
        // SAFETY: [start, end) lies inside the mapping owned by `self.mem`; no
        // reference into it is live (smoltcp only touches the rings inside its own
        // calls, and this takes `&mut self`). MADV_DONTNEED on a private anonymous
        // mapping only makes those pages read as zero from now on.
        unsafe {
            libc::madvise(
                self.mem.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of the mapping, from mincore.
    fn resident(f: &FlowSocket) -> usize {
        let page = page_size();
        let pages = f.mem.len.div_ceil(page);
        let mut v = vec![0u8; pages];
        // SAFETY: the mapping is page-aligned and `len` long; `v` has a byte per page.
        let r = unsafe { libc::mincore(f.mem.ptr.as_ptr().cast(), f.mem.len, v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn rings_take_pages_only_where_written_and_give_them_back() {
        let mut f = FlowSocket::new(512 << 10, |s| s.set_nagle_enabled(false)).unwrap();
        assert_eq!(resident(&f), 0, "a new flow holds no ring pages");
        assert!(!f.sock().is_open());
        // Write through the socket's own buffer (it is not connected, so fill the
        // ring directly through the mapping the way smoltcp would).
        let ring = f.ring;
        // SAFETY: (test) no reference into the mapping is live.
        unsafe {
            f.mem.ptr.as_ptr().write(1);
            f.mem.ptr.as_ptr().add(ring + 5000).write(2);
        }
        assert_eq!(resident(&f), 2);
        f.release(Ring::Tx);
        assert_eq!(resident(&f), 1, "the tx ring's page went back");
        f.release(Ring::Rx);
        assert_eq!(resident(&f), 0);
        // SAFETY: (test) as above.
        let first = unsafe { f.mem.ptr.as_ptr().read() };
        assert_eq!(first, 0, "released pages read as zero");
        // Odd sizes keep the release inside the ring.
        let mut g = FlowSocket::new(5000, |_| {}).unwrap();
        // SAFETY: (test) as above; byte 4999 is the rx ring's last, 5000 the tx ring's first.
        unsafe {
            g.mem.ptr.as_ptr().add(4999).write(7);
            g.mem.ptr.as_ptr().add(5000).write(8);
        }
        g.release(Ring::Rx);
        g.release(Ring::Tx);
        // SAFETY: (test) as above.
        unsafe {
            assert_eq!(
                g.mem.ptr.as_ptr().add(4999).read(),
                7,
                "a page shared with the tx ring is kept"
            );
            assert_eq!(g.mem.ptr.as_ptr().add(5000).read(), 8);
        }
        let _ = g.sock_mut();
        let _ = g.set();
    }
}
