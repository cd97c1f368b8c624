//! Where a capture's pcapng goes ([`Sink`]): the control connection itself, or the
//! file the client handed over (`pass_fd`), written by a thread of its own.
//!
//! Theory of operation. With `pass_fd` the CLI sends its output's descriptor
//! (SCM_RIGHTS) and the daemon writes the stream there directly: no copy through
//! the connection and no relaying process between the switch and the file, which
//! on a small host is CPU the switch keeps. Writes to a file may wait on the disk
//! and writes to a pipe on its reader, so they happen on a writer thread fed by a
//! small bounded queue of batches ([`QUEUE`]): when it is full, the serving task
//! waits, the capture's own queue fills, and the switch counts what does not fit
//! as lost, as with a slow reader of the connection. A pipe or socket is made
//! non-blocking for the capture (its flags are put back at the end) so that the
//! thread can give up on a reader that stopped reading: once the capture is over
//! it has [`DRAIN`] to write what is left, then it closes.
//!
//! A [`Batch`] is the encoded blocks of many frames with the frames' bytes left
//! where the switch put them: the block headers, padding and options are encoded
//! into one buffer, and the writer thread hands them and the frames to `writev`
//! in order, so a frame is not copied again on its way out. The frames' buffers
//! are released once the batch is written (their charge on the capture's budget
//! was refunded when the serving task took them from the queue, as for a copy);
//! what the writer holds is bounded by its queue: [`QUEUE`] batches and the one
//! being written, each of at most 1 MiB and one frame.

use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::sys;

/// Batches waiting for the writer thread.
const QUEUE: usize = 4;
/// How long the writer may go on once the capture is over and its reader stalls.
const DRAIN: Duration = Duration::from_secs(5);

/// Frames shorter than this are copied into a batch's encoded bytes rather than
/// written from their own buffer (an iovec of their own costs more than that).
const COPY_BELOW: usize = 512;

/// Part of the stream: encoded bytes with frames to write between them (see the
/// module doc).
#[derive(Default)]
pub(super) struct Batch {
    /// The bytes other than the frames' own.
    meta: Vec<u8>,
    /// Each frame, with where in `meta` it goes.
    frames: Vec<(usize, Bytes)>,
    /// The frames' bytes.
    frame_bytes: usize,
}

impl Batch {
    /// The encoded bytes, to append a block (or the part of one before or after
    /// a frame) to.
    pub(super) fn meta(&mut self) -> &mut Vec<u8> {
        &mut self.meta
    }

    /// Appends a frame's bytes, after what [`Batch::meta`] holds now.
    pub(super) fn frame(&mut self, data: &Bytes) {
        if data.len() < COPY_BELOW {
            self.meta.extend_from_slice(data);
        } else {
            self.frame_bytes += data.len();
            self.frames.push((self.meta.len(), data.clone()));
        }
    }

    /// The batch's length in the stream.
    pub(super) fn len(&self) -> usize {
        self.meta.len() + self.frame_bytes
    }

    /// Empties the batch (releasing its frames), keeping its buffers.
    pub(super) fn clear(&mut self) {
        self.meta.clear();
        self.frames.clear();
        self.frame_bytes = 0;
    }

    /// The batch's bytes in stream order, for `writev`.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut out = Vec::with_capacity(2 * self.frames.len() + 1);
        let mut at = 0;
        for (to, data) in &self.frames {
            let m = self.meta.get(at..*to).unwrap_or_default();
            if !m.is_empty() {
                out.push(IoSlice::new(m));
            }
            out.push(IoSlice::new(data));
            at = *to;
        }
        let rest = self.meta.get(at..).unwrap_or_default();
        if !rest.is_empty() {
            out.push(IoSlice::new(rest));
        }
        out
    }

    /// Appends the batch's bytes in stream order to `out`.
    fn flatten(&self, out: &mut Vec<u8>) {
        for s in self.slices() {
            out.extend_from_slice(&s);
        }
    }
}

/// A capture's output.
pub(super) enum Sink<W> {
    /// The pcapng goes on the control connection.
    Stream(W),
    /// The pcapng goes to the client's file, through the writer thread; the
    /// connection (`conn`) gets the summary line at the end.
    File(FileSink, W),
}

/// The writer thread's side of a [`Sink::File`].
pub(super) struct FileSink {
    tx: Option<mpsc::Sender<Batch>>,
    /// Batches the writer is done with, for reuse (a fresh 256 KiB buffer per
    /// batch would be fresh pages per batch).
    spare: std::sync::mpsc::Receiver<Batch>,
    done: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl FileSink {
    /// Starts the writer thread for `fd`.
    pub(super) fn start(fd: OwnedFd) -> std::io::Result<Self> {
        let out = Output::new(fd)?;
        let (tx, mut rx) = mpsc::channel::<Batch>(QUEUE);
        let (spare_tx, spare) = std::sync::mpsc::sync_channel(QUEUE);
        let done = std::thread::Builder::new()
            .name("capture-writer".into())
            .spawn(move || {
                let r = (|| {
                    while let Some(mut buf) = rx.blocking_recv() {
                        out.write_all(&mut buf.slices(), &rx)?;
                        buf.clear();
                        let _ = spare_tx.try_send(buf);
                    }
                    Ok(())
                })();
                out.restore();
                r
            })?;
        Ok(FileSink {
            tx: Some(tx),
            spare,
            done: Some(done),
        })
    }

    /// Queues `buf` for the writer (waiting while the queue is full) and leaves
    /// an empty buffer in its place; false when the writer has stopped.
    async fn put(&mut self, buf: &mut Batch) -> bool {
        let next = self.spare.try_recv().unwrap_or_default();
        let full = std::mem::replace(buf, next);
        match &self.tx {
            Some(tx) => tx.send(full).await.is_ok(),
            None => false,
        }
    }

    /// Ends the stream: the writer writes what is queued (within [`DRAIN`] of a
    /// stalled reader) and closes; its result.
    pub(super) async fn finish(&mut self) -> std::io::Result<()> {
        self.tx = None;
        match self.done.take() {
            Some(t) => tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(std::io::Error::other)?
                .unwrap_or_else(|_| Err(std::io::Error::other("capture writer panicked"))),
            None => Ok(()),
        }
    }
}

impl<W: AsyncWrite + Unpin> Sink<W> {
    /// Writes (or queues) `buf`; false when the output is gone. `buf` is left
    /// empty, ready for the next batch.
    pub(super) async fn put(&mut self, buf: &mut Batch) -> bool {
        match self {
            Sink::Stream(w) => {
                let mut flat = Vec::with_capacity(buf.len());
                buf.flatten(&mut flat);
                buf.clear();
                w.write_all(&flat).await.is_ok()
            }
            Sink::File(f, _) => f.put(buf).await,
        }
    }
}

/// The client's file, as the writer thread holds it.
struct Output {
    fd: std::fs::File,
    /// The status flags to put back (a pipe or socket made non-blocking).
    restore: Option<i32>,
}

impl Output {
    fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let raw = fd.as_raw_fd();
        let mut restore = None;
        if !sys::is_regular_file(raw)? {
            let flags = sys::status_flags(raw)?;
            if flags & libc::O_NONBLOCK == 0 {
                sys::set_status_flags(raw, flags | libc::O_NONBLOCK)?;
                restore = Some(flags);
            }
        }
        Ok(Output {
            fd: fd.into(),
            restore,
        })
    }

    /// Writes all of `bufs` (with `writev`), waiting for a slow reader; once the
    /// capture is over (`rx` closed), for at most [`DRAIN`] without progress.
    fn write_all(
        &self,
        mut bufs: &mut [IoSlice<'_>],
        rx: &mpsc::Receiver<Batch>,
    ) -> std::io::Result<()> {
        let raw = self.fd.as_raw_fd();
        let mut stalled_since: Option<Instant> = None;
        while !bufs.is_empty() {
            match (&self.fd).write_vectored(bufs) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    IoSlice::advance_slices(&mut bufs, n);
                    stalled_since = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if rx.is_closed() {
                        let since = *stalled_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > DRAIN {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the capture's reader stopped reading",
                            ));
                        }
                    }
                    sys::poll_out(raw, 200)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn restore(&self) {
        if let Some(flags) = self.restore {
            let _ = sys::set_status_flags(self.fd.as_raw_fd(), flags);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[tokio::test]
    async fn batches_reach_a_pipe_in_order_and_its_flags_are_put_back() {
        let (mut r, w) = std::io::pipe().unwrap();
        let w: OwnedFd = w.into();
        let dup = w.try_clone().unwrap();
        let before = sys::status_flags(dup.as_raw_fd()).unwrap();
        let mut sink = FileSink::start(w).unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        let mut want = Vec::new();
        for i in 0..50u8 {
            // Encoded bytes and frames (long ones written from their own buffer,
            // short ones copied), in stream order.
            let mut buf = Batch::default();
            for (j, n) in [100_000usize, 7, 3000, 0, 511, 512].into_iter().enumerate() {
                let head = vec![i ^ j as u8; j + 1];
                buf.meta().extend_from_slice(&head);
                let frame = Bytes::from(vec![i.wrapping_add(j as u8); n]);
                buf.frame(&frame);
                want.extend_from_slice(&head);
                want.extend_from_slice(&frame);
            }
            buf.meta().extend_from_slice(b"end");
            want.extend_from_slice(b"end");
            let mut flat = Vec::new();
            buf.flatten(&mut flat);
            assert_eq!(flat.len(), buf.len());
            assert!(sink.put(&mut buf).await);
            assert_eq!(buf.len(), 0);
        }
        sink.finish().await.unwrap();
        assert_eq!(sys::status_flags(dup.as_raw_fd()).unwrap(), before);
        drop(dup);
        assert_eq!(reader.join().unwrap(), want);
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_is_given_up_after_the_capture() {
        let (_r, w) = std::io::pipe().unwrap();
        let mut sink = FileSink::start(w.into()).unwrap();
        // More than a pipe holds (64 KiB), never read.
        let mut buf = Batch::default();
        buf.frame(&Bytes::from(vec![7u8; 1 << 20]));
        assert!(sink.put(&mut buf).await);
        let t = Instant::now();
        let e = sink.finish().await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < DRAIN + Duration::from_secs(3));
    }
}
