//! The guest port a router reads on its own thread ([`crate::port::InlineReader`]).
//!
//! With one guest port on a NAT network, the daemon hands that port's fd to the
//! router instead of giving it a receive thread. The router registers the fd and the
//! port's stop eventfd with its reactor, reads frames into one large buffer and
//! switches each on this thread ([`crate::switch::Network::ingress_local`]). A frame
//! for the router itself is split off the buffer into the inbox with no copy (small
//! ones are copied, so that a frame held long, such as a SYN waiting for its host
//! connect, never pins the buffer); the buffer's space comes back once the step that
//! handled its frames drops them.
//!
//! Reads stop at a byte budget per wake-up so that the router's other work keeps its
//! turn. When a read fails for good (the TAP went away with its namespace), the port
//! falls back to a receive thread of its own, which reopens the device.

use std::task::{Context, Poll};

use bytes::Bytes;

use super::{sys, Router, INBOX_BATCH};

/// A guest port the router reads itself (see [`crate::port::InlineReader`]).
pub(super) struct Inline {
    // Field order: both registrations end before the reader closes the fds.
    fd: tokio::io::unix::AsyncFd<crate::port::SharedFd>,
    stop: tokio::io::unix::AsyncFd<crate::port::StopFd>,
    reader: crate::port::InlineReader,
    /// Frames are read into this buffer and split off it: a frame for the router
    /// goes on as a view of it, and the space comes back once the frames read into
    /// it are dropped (after the step that handled them).
    buf: bytes::BytesMut,
}

/// Capacity of an inline reader's buffer: room for 16 frames of 64 KiB.
const INLINE_BUF: usize = 16 * 65 * 1024;

/// Frames up to this size are copied out of the inline buffer (a held SYN must not
/// pin a whole buffer); larger ones are handed on in place.
const INLINE_COPY_MAX: usize = 2048;

/// Most bytes one wake-up reads from an inline port before doing a step.
const INLINE_BUDGET: usize = 1 << 20;

impl Router {
    /// Reads the inline guest port while it has frames (within a budget): frames
    /// for the router join the inbox, others are switched now. True if any frame
    /// came in.
    pub(super) fn poll_inline(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(il) = self.inline.as_mut() else {
            return false;
        };
        if il.reader.stopped() {
            tracing::debug!(port = il.reader.name(), "inline port stopped");
            self.inline = None;
            return false;
        }
        // Registers the wake-up on the stop eventfd (it is never readable before).
        let _ = il.stop.poll_read_ready(cx);
        let mut got = false;
        let mut budget = INLINE_BUDGET;
        let mut failed = None;
        // A TAP whose device went away (its namespace was deleted) signals only
        // EPOLLERR, which tokio's read readiness does not include: housekeeping sets
        // `inline_probe` so that a read is tried anyway, once a second; it fails then.
        let mut probe = std::mem::take(&mut self.inline_probe);
        while self.inbox.len() < INBOX_BATCH && budget > 0 {
            let mut guard = None;
            if !std::mem::take(&mut probe) {
                match il.fd.poll_read_ready(cx) {
                    Poll::Ready(Ok(g)) => guard = Some(g),
                    Poll::Ready(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let mut clear = || {
                if let Some(g) = guard.as_mut() {
                    g.clear_ready();
                }
            };
            // Room for one more frame: the buffer's own space once every frame split
            // off it has been dropped (the usual case: they die with the step that
            // handled them), else a new buffer.
            let max = crate::port::INLINE_READ_MAX;
            if il.buf.capacity() - il.buf.len() < max && !il.buf.try_reclaim(max) {
                il.buf = bytes::BytesMut::with_capacity(INLINE_BUF);
            }
            match il.reader.read(&mut il.buf) {
                Ok(0) => clear(),
                Ok(n) => {
                    got = true;
                    budget = budget.saturating_sub(n);
                    let msg = if n <= INLINE_COPY_MAX {
                        let m = Bytes::copy_from_slice(&il.buf);
                        il.buf.clear();
                        m
                    } else {
                        il.buf.split().freeze()
                    };
                    if il.reader.switch(&msg) {
                        self.inbox.push(msg);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => clear(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Stopping at the budget leaves the fd marked readable: the next round reads
        // on at once (and `got` makes this round ready).
        if let Some(e) = failed {
            if let Some(il) = self.inline.take() {
                tracing::info!(port = il.reader.name(), error = %e, "inline port read failed; giving it a thread");
                let Inline {
                    fd, stop, reader, ..
                } = il;
                drop((fd, stop));
                if let Err(e) = reader.fall_back() {
                    tracing::warn!(error = %e, "cannot start the port thread");
                }
            }
        }
        got
    }

    /// Takes over a guest port, or gives it back (it then gets a thread) when this
    /// router reads one already or its fds cannot be registered.
    pub(super) fn attach_reader(&mut self, reader: crate::port::InlineReader) {
        let give_back = |reader: crate::port::InlineReader, why: &str| {
            tracing::debug!(port = reader.name(), why, "inline port declined");
            if let Err(e) = reader.fall_back() {
                tracing::warn!(error = %e, "cannot start the port thread");
            }
        };
        if self.inline.is_some() {
            return give_back(reader, "the router reads a port already");
        }
        let fd = match sys::register_fd(reader.fd()) {
            Ok(fd) => fd,
            Err(_) => return give_back(reader, "cannot register its fd"),
        };
        let stop = match sys::register_fd(reader.stop_fd()) {
            Ok(s) => s,
            Err(_) => {
                drop(fd);
                return give_back(reader, "cannot register its stop fd");
            }
        };
        tracing::debug!(port = reader.name(), "router reads the port on its thread");
        self.inline = Some(Inline {
            fd,
            stop,
            reader,
            buf: bytes::BytesMut::with_capacity(INLINE_BUF),
        });
    }
}
