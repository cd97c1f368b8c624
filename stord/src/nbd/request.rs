//! Request semantics: validation against the export and the negotiation
//! (which error each invalid request gets, and the typed command of a valid
//! one), execution on the disk, and the READ path's choice of strategy
//! ([`read_plan`]), producing simple or structured replies; and the
//! connection's payload [`Budget`], which request payloads and READ data
//! held in memory count against.

use super::*;

/// A finished reply: segments to write back to back.
pub(super) type Reply = Vec<Bytes>;

/// A reply ready to be written.
pub(super) enum Out {
    /// Segments written back to back.
    Segs(Reply),
    /// READ data sent from the disk file's mapping.
    Mapped(MappedRead),
}

pub(super) fn simple(handle: u64, error: u32) -> Reply {
    let mut b = BytesMut::with_capacity(SIMPLE_REPLY_LEN);
    SimpleReply { error, handle }.emit(&mut b);
    vec![b.freeze()]
}

pub(super) fn error_reply(sess: &Session, handle: u64, error: u32, msg: &str) -> Reply {
    if sess.structured {
        let mut b = BytesMut::with_capacity(32 + msg.len());
        nbd_proto::emit_error_chunk(&mut b, handle, error, msg);
        vec![b.freeze()]
    } else {
        simple(handle, error)
    }
}

/// Checks a request against the export and the negotiation; `Ok` is its typed
/// command, `Err` the NBD error value and a message for the client.
pub(super) fn validate(sess: &Session, req: &Request) -> Result<Command, (u32, String)> {
    let einval = |m: &str| Err((err::EINVAL, m.to_string()));
    let cmd = req.command().map_err(|e| (err::EINVAL, e.to_string()))?;
    let allowed = match cmd {
        Command::Read if sess.structured => cflag::FUA | cflag::DF,
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Cache => {
            cflag::FUA
        }
        Command::WriteZeroes => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        Command::BlockStatus => cflag::FUA | cflag::REQ_ONE,
        Command::Disc => 0,
    };
    if req.flags & !allowed != 0 {
        return Err((
            err::EINVAL,
            format!(
                "flags {:#x} not valid for command {}",
                req.flags & !allowed,
                req.kind
            ),
        ));
    }
    if cmd == Command::Flush {
        return if req.offset == 0 && req.len == 0 {
            Ok(cmd)
        } else {
            einval("FLUSH offset and length must be zero")
        };
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && sess.disk().read_only() {
        return Err((err::EPERM, "the export is read-only".into()));
    }
    if matches!(cmd, Command::Read | Command::Write) && req.len > MAX_PAYLOAD {
        let e = if cmd == Command::Read && req.has_flag(cflag::DF) {
            err::EOVERFLOW
        } else {
            err::EINVAL
        };
        return Err((
            e,
            format!("length {} exceeds the maximum {MAX_PAYLOAD}", req.len),
        ));
    }
    let end = req.offset.checked_add(req.len as u64);
    if !matches!(end, Some(e) if e <= sess.size) {
        let e = if matches!(cmd, Command::Write | Command::WriteZeroes) {
            err::ENOSPC
        } else {
            err::EINVAL
        };
        return Err((
            e,
            format!(
                "offset {} + length {} is beyond the end of the export ({} bytes)",
                req.offset, req.len, sess.size
            ),
        ));
    }
    if cmd == Command::BlockStatus {
        if !sess.base_allocation {
            return einval("no metadata context was negotiated");
        }
        if req.len == 0 {
            return einval("BLOCK_STATUS length must not be zero");
        }
    }
    Ok(cmd)
}

/// Runs a validated request on the calling worker thread; returns its reply.
pub(super) fn execute(
    sess: &Session,
    cmd: Command,
    req: &Request,
    payload: &[u8],
    budget: &Budget,
    abort: &std::sync::atomic::AtomicBool,
) -> Out {
    let disk = sess.disk();
    let fua = req.has_flag(cflag::FUA);
    let res = match cmd {
        Command::Read => return read(sess, req, budget, abort),
        Command::Write => disk.write(req.offset, payload, fua),
        Command::Flush => disk.flush(),
        Command::Trim => disk.trim(req.offset, req.len as u64, fua),
        Command::Cache => disk.cache(req.offset, req.len as u64),
        Command::WriteZeroes => disk.write_zeroes(
            req.offset,
            req.len as u64,
            req.has_flag(cflag::NO_HOLE),
            req.has_flag(cflag::FAST_ZERO),
            fua,
        ),
        Command::BlockStatus => {
            let max = if req.has_flag(cflag::REQ_ONE) {
                1
            } else {
                MAX_EXTENTS
            };
            match disk.extents(req.offset, req.len as u64, max) {
                Ok(ext) if !ext.is_empty() => {
                    let mut b = BytesMut::with_capacity(24 + 8 * ext.len());
                    nbd_proto::emit_block_status(&mut b, req.handle, BASE_ALLOCATION_ID, &ext);
                    return Out::Segs(vec![b.freeze()]);
                }
                Ok(_) => {
                    // Cannot happen for len > 0; "allocated" is always a safe answer.
                    let e = [Extent {
                        len: req.len,
                        flags: 0,
                    }];
                    let mut b = BytesMut::with_capacity(32);
                    nbd_proto::emit_block_status(&mut b, req.handle, BASE_ALLOCATION_ID, &e);
                    return Out::Segs(vec![b.freeze()]);
                }
                Err(e) => Err(e),
            }
        }
        // The reader ends the connection on DISC; it is never executed.
        Command::Disc => {
            return Out::Segs(error_reply(
                sess,
                req.handle,
                err::EINVAL,
                "DISC has no reply",
            ))
        }
    };
    Out::Segs(match res {
        Ok(()) => simple(req.handle, 0),
        Err(e) => {
            disk.io().error(cmd);
            if !matches!(e, crate::disk::DiskError::NotFast) {
                tracing::warn!(export = disk.name(), kind = req.kind, error = %crate::error_chain(&e), "request failed");
            }
            error_reply(sess, req.handle, e.nbd_errno(), &crate::error_chain(&e))
        }
    })
}

/// Smallest READ whose holes are looked for (SEEK_DATA / SEEK_HOLE).
const HOLE_SCAN_MIN: u64 = 64 * 1024;

/// Smallest READ whose data is sent from the disk file's mapping (see
/// [`crate::sys::FileMap`]): page cache to socket in one copy. Measured with
/// nbdcopy against pread + writev, and against sendfile, which copies nothing
/// in the server but leaves a local client to copy every byte from cold page
/// cache: 1.1x pread at 256 KiB requests, 1.5x sendfile at 4 MiB. Below this
/// size the madvise call costs more than the copy it saves.
const MAPPED_READ_MIN: u32 = 64 * 1024;

/// Largest READ answered from the page cache by the reading worker itself.
const CACHED_READ_MAX: u32 = 16 * 1024;

/// How a validated READ is answered.
pub(super) enum ReadPlan {
    /// The header, then the data straight from the disk file's mapping.
    Mapped(Bytes),
    /// The header, then the data pread into a buffer of its own; both go
    /// out in one writev.
    Buffered(Bytes),
    /// A structured reply of data and hole chunks, as SEEK_DATA / SEEK_HOLE
    /// find them (at most [`MAX_READ_CHUNKS`] chunks).
    Sparse,
    /// A structured READ of nothing: one NONE chunk.
    Empty,
}

/// Chooses how a READ is answered: the one place stord's READ strategy is
/// decided. A reply that is one header and the data (simple replies; DF,
/// which forbids fragments; fixed disks, which have no holes worth skipping;
/// reads below [`HOLE_SCAN_MIN`], where the two lseek calls cost more than
/// sending the zeroes) is sent from the mapping from [`MAPPED_READ_MIN`] on
/// (not under TLS, `Session::mapped_reads`: the data must pass through the
/// TLS stream) and pread below it; anything else is split into data and holes. The header
/// is emitted here, once.
pub(super) fn read_plan(sess: &Session, req: &Request) -> ReadPlan {
    let mapped = req.len >= MAPPED_READ_MIN && sess.mapped_reads;
    let mut hdr = BytesMut::with_capacity(32);
    if !sess.structured {
        SimpleReply {
            error: 0,
            handle: req.handle,
        }
        .emit(&mut hdr);
    } else if req.len == 0 {
        return ReadPlan::Empty;
    } else if req.has_flag(cflag::DF)
        || sess.disk().alloc() == Alloc::Fixed
        || (req.len as u64) < HOLE_SCAN_MIN
    {
        // A reply sent from the mapping is final only once its data went out
        // (a page may fail then): its DONE comes in a NONE chunk after it.
        // A buffered reply (under TLS too, whatever its size) has its data
        // in hand before the header goes out, and no NONE chunk follows it:
        // its data chunk carries DONE.
        let fin = if mapped { Final::No } else { Final::Yes };
        nbd_proto::emit_offset_data_header(&mut hdr, req.handle, req.offset, req.len, fin);
    } else {
        return ReadPlan::Sparse;
    }
    if mapped {
        ReadPlan::Mapped(hdr.freeze())
    } else {
        ReadPlan::Buffered(hdr.freeze())
    }
}

/// A READ reply whose data goes from the disk file's mapping to the socket.
pub(super) struct MappedRead {
    /// The reply header (simple reply or one OFFSET_DATA chunk).
    pub hdr: Bytes,
    /// The mapping, held until the reply is written.
    pub map: std::sync::Arc<crate::sys::FileMap>,
    /// Where the data starts in the mapping.
    pub at: usize,
    /// Where the data starts on the disk (what a pread fallback reads).
    pub offset: u64,
    /// Data bytes.
    pub len: usize,
    /// What follows the data: for a structured reply the final NONE chunk,
    /// sent only once the data is known good; empty for a simple reply.
    pub tail: Bytes,
    /// A structured reply (a late I/O error becomes an error chunk).
    pub structured: bool,
    /// The request's handle (for that error chunk).
    pub handle: u64,
}

/// The final NONE chunk of a structured reply sent from the mapping (empty for
/// a simple reply).
fn mapped_tail(sess: &Session, handle: u64) -> Bytes {
    let mut b = BytesMut::new();
    if sess.structured {
        nbd_proto::emit_none(&mut b, handle);
    }
    b.freeze()
}

/// Answers a validated READ as [`read_plan`] says. A mapped reply has its
/// pages made resident here (reading the disk now, not under the
/// connection's write lock); if the file cannot be mapped or a page cannot be
/// read, the data is pread instead, which also reports the error. Data read
/// into memory is counted against the payload `budget` while it is produced.
pub(super) fn read(
    sess: &Session,
    req: &Request,
    budget: &Budget,
    abort: &std::sync::atomic::AtomicBool,
) -> Out {
    let aborted = || error_reply(sess, req.handle, err::EIO, "the connection is closing");
    let (hdr, tail) = match read_plan(sess, req) {
        ReadPlan::Mapped(hdr) => match mapped(sess, req, hdr) {
            Ok(m) => return Out::Mapped(m),
            // The header says more chunks follow: end with the NONE chunk.
            Err(hdr) => (hdr, mapped_tail(sess, req.handle)),
        },
        ReadPlan::Buffered(hdr) => (hdr, Bytes::new()),
        ReadPlan::Sparse
            if sess.mapped_reads && sess.disk().format() == crate::config::Format::Qcow2 =>
        {
            // A qcow2 range that is one run of data in one file of the
            // chain goes out from that file's mapping.
            let mut hdr = BytesMut::with_capacity(32);
            let (h, off, len) = (req.handle, req.offset, req.len);
            nbd_proto::emit_offset_data_header(&mut hdr, h, off, len, Final::No);
            if let Ok(m) = mapped(sess, req, hdr.freeze()) {
                return Out::Mapped(m);
            }
            let Some(_mem) = budget.take(req.len as u64, abort) else {
                return Out::Segs(aborted());
            };
            return Out::Segs(sparse(sess, req));
        }
        ReadPlan::Sparse => {
            let Some(_mem) = budget.take(req.len as u64, abort) else {
                return Out::Segs(aborted());
            };
            return Out::Segs(sparse(sess, req));
        }
        ReadPlan::Empty => {
            let mut b = BytesMut::with_capacity(CHUNK_HEADER_LEN);
            nbd_proto::emit_none(&mut b, req.handle);
            return Out::Segs(vec![b.freeze()]);
        }
    };
    let Some(_mem) = budget.take(req.len as u64, abort) else {
        return Out::Segs(aborted());
    };
    Out::Segs(match sess.disk().read(req.offset, req.len as usize) {
        Ok(data) if tail.is_empty() => vec![hdr, Bytes::from(data)],
        Ok(data) => vec![hdr, Bytes::from(data), tail],
        Err(e) => {
            sess.disk().io().error(Command::Read);
            error_reply(sess, req.handle, e.nbd_errno(), &crate::error_chain(&e))
        }
    })
}

/// The mapped reply, or the header back if the data must be pread.
fn mapped(sess: &Session, req: &Request, hdr: Bytes) -> Result<MappedRead, Bytes> {
    let Some((map, at)) = sess.disk().mapped_at(req.offset, req.len as u64) else {
        return Err(hdr);
    };
    let len = req.len as usize;
    if map.populate(at, len).is_err() {
        return Err(hdr);
    }
    Ok(MappedRead {
        hdr,
        map,
        at,
        offset: req.offset,
        len,
        tail: mapped_tail(sess, req.handle),
        structured: sess.structured,
        handle: req.handle,
    })
}

/// Answers a validated READ of up to [`CACHED_READ_MAX`] bytes that
/// [`read_plan`] would pread, from the page cache without waiting for the
/// disk; `None` if the data is not all cached (or the READ is of another
/// kind): the caller hands it to [`read`] on another worker then, where
/// waiting holds up nobody.
pub(super) fn read_cached(sess: &Session, req: &Request) -> Option<Reply> {
    if req.len == 0 || req.len > CACHED_READ_MAX {
        return None;
    }
    let ReadPlan::Buffered(hdr) = read_plan(sess, req) else {
        return None;
    };
    let data = sess
        .disk()
        .read_cached(req.offset, req.len as usize)
        .ok()??;
    Some(vec![hdr, Bytes::from(data)])
}

/// A structured READ split into data and hole chunks.
fn sparse(sess: &Session, req: &Request) -> Reply {
    let disk = sess.disk();
    let handle = req.handle;
    let len = req.len as u64;
    let fail = |e: crate::disk::DiskError| {
        error_reply(sess, handle, e.nbd_errno(), &crate::error_chain(&e))
    };
    let segments = match disk.segments(req.offset, len, MAX_READ_CHUNKS) {
        Ok(mut s) => {
            let covered: u64 = s.iter().map(|(l, _)| l).sum();
            if covered < len {
                s.push((len - covered, false));
            }
            s
        }
        Err(e) => return fail(e),
    };
    let mut out = Vec::with_capacity(segments.len() * 2);
    let mut pos = req.offset;
    let n = segments.len();
    for (i, (seg, hole)) in segments.into_iter().enumerate() {
        let fin = if i + 1 == n { Final::Yes } else { Final::No };
        let mut hdr = BytesMut::with_capacity(32);
        if hole {
            nbd_proto::emit_offset_hole(&mut hdr, handle, pos, seg as u32, fin);
            out.push(hdr.freeze());
        } else {
            let data = match disk.read(pos, seg as usize) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            nbd_proto::emit_offset_data_header(&mut hdr, handle, pos, seg as u32, fin);
            out.push(hdr.freeze());
            out.push(Bytes::from(data));
        }
        pos += seg;
    }
    out
}

/// A bound on payload bytes held by the requests in flight on one connection
/// (WRITE payloads read, READ data being produced). Each connection has its
/// own, so waiting for it only ever waits for that connection's requests.
///
/// The fast path is one atomic compare-and-swap to take and one atomic add to
/// give back; the mutex and condition variable are touched only when the budget
/// runs out (a waiter registers itself, and givers notify only if one exists).
#[derive(Debug)]
pub struct Budget {
    left: AtomicU64,
    waiters: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Budget {
            left: AtomicU64::new(bytes),
            waiters: AtomicU64::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    fn try_take(&self, n: u64) -> bool {
        let mut cur = self.left.load(Ordering::Acquire);
        while cur >= n {
            match self
                .left
                .compare_exchange_weak(cur, cur - n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
        false
    }

    /// Takes `n` bytes, waiting until they are there; the guard gives them
    /// back. `None` if `abort` is set while waiting (the connection broke).
    pub(super) fn take(&self, n: u64, abort: &AtomicBool) -> Option<BudgetGuard<'_>> {
        if !self.try_take(n) {
            let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.waiters.fetch_add(1, Ordering::AcqRel);
            while !self.try_take(n) {
                if abort.load(Ordering::Acquire) {
                    self.waiters.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
                // The timeout covers a give that raced with our registration.
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            self.waiters.fetch_sub(1, Ordering::AcqRel);
        }
        Some(BudgetGuard { budget: self, n })
    }

    fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::AcqRel);
        if self.waiters.load(Ordering::Acquire) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }
}

/// Bytes taken from a [`Budget`], given back on drop.
pub(super) struct BudgetGuard<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        self.budget.give(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proto::chunk;

    fn session(structured: bool, ro: bool) -> (tempfile::TempDir, Session) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(
            dir.path(),
            &[crate::config::DiskConfig {
                name: "d".into(),
                size: crate::config::Size(1 << 20),
                alloc: Alloc::Dynamic,
                read_only: ro,
                allow: None,
                base: None,
            }],
        )
        .unwrap();
        let att = cat.attach("d").unwrap();
        (
            dir,
            Session {
                att,
                size: 1 << 20,
                structured,
                base_allocation: structured,
                mapped_reads: true,
            },
        )
    }

    fn req(kind: impl Into<u16>, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind: kind.into(),
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validation_error_codes() {
        let (_d, s) = session(true, false);
        assert_eq!(
            validate(&s, &req(Command::Read, 0, 0, 4096)),
            Ok(Command::Read)
        );
        assert_eq!(
            validate(&s, &req(Command::Flush, 0, 0, 0)),
            Ok(Command::Flush)
        );
        assert_eq!(
            validate(&s, &req(Command::Read, 0, 1 << 20, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(Command::Write, 0, 1 << 20, 1))
                .unwrap_err()
                .0,
            err::ENOSPC
        );
        assert_eq!(
            validate(&s, &req(Command::WriteZeroes, 0, u64::MAX, 1))
                .unwrap_err()
                .0,
            err::ENOSPC
        );
        assert_eq!(
            validate(&s, &req(99u16, 0, 0, 0)).unwrap_err().0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(Command::Write, cflag::DF, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(Command::Flush, 0, 1, 0)).unwrap_err().0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(Command::Read, cflag::DF, 0, MAX_PAYLOAD + 1))
                .unwrap_err()
                .0,
            err::EOVERFLOW
        );
        assert_eq!(
            validate(&s, &req(Command::BlockStatus, 0, 0, 0))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        let (_d, ro) = session(false, true);
        assert_eq!(
            validate(&ro, &req(Command::Write, 0, 0, 1)).unwrap_err().0,
            err::EPERM
        );
        assert_eq!(
            validate(&ro, &req(Command::Trim, 0, 0, 1)).unwrap_err().0,
            err::EPERM
        );
        assert_eq!(
            validate(&ro, &req(Command::Read, cflag::DF, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&ro, &req(Command::BlockStatus, 0, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
    }

    /// The READ strategy of every kind of READ, decided in one place.
    #[test]
    fn read_plan_picks_each_strategy() {
        let (_d, s) = session(true, false);
        let plan = |flags, len| read_plan(&s, &req(Command::Read, flags, 0, len));
        assert!(matches!(plan(0, 0), ReadPlan::Empty));
        assert!(matches!(plan(0, 4096), ReadPlan::Buffered(_)));
        assert!(matches!(plan(0, 65536), ReadPlan::Sparse));
        assert!(matches!(plan(cflag::DF, 4096), ReadPlan::Buffered(_)));
        assert!(matches!(plan(cflag::DF, 65536), ReadPlan::Mapped(_)));
        let (_d, simple) = session(false, false);
        let plan = |len| read_plan(&simple, &req(Command::Read, 0, 0, len));
        assert!(matches!(plan(0), ReadPlan::Buffered(_)));
        assert!(matches!(plan(4096), ReadPlan::Buffered(_)));
        assert!(matches!(plan(1 << 20), ReadPlan::Mapped(_)));
        // The cache-only path: small buffered reads only, data or not.
        simple.disk().write(0, &[1u8; 4096], false).unwrap();
        let r = read_cached(&simple, &req(Command::Read, 0, 0, 4096)).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1], Bytes::from(vec![1u8; 4096]));
        assert!(read_cached(&simple, &req(Command::Read, 0, 0, 0)).is_none());
        assert!(read_cached(&simple, &req(Command::Read, 0, 0, 65536)).is_none());
    }

    /// Without mapped reads (a TLS session) a large structured READ is
    /// buffered, and its one data chunk is the final one: no NONE chunk
    /// follows it, so it must carry DONE (a client would otherwise wait for
    /// the rest of the reply forever).
    #[test]
    fn buffered_large_structured_read_is_final() {
        let (_d, mut s) = session(true, false);
        s.mapped_reads = false;
        s.disk().write(0, &[3u8; 65536], false).unwrap();
        let budget = Budget::new(1 << 20);
        let no = std::sync::atomic::AtomicBool::new(false);
        let df = req(Command::Read, cflag::DF, 0, 65536);
        assert!(matches!(read_plan(&s, &df), ReadPlan::Buffered(_)));
        let Out::Segs(r) = read(&s, &df, &budget, &no) else {
            panic!("a READ without mapped reads is not mapped");
        };
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(&r[0][4..6], &chunk::FLAG_DONE.to_be_bytes());
        assert_eq!(&r[0][6..8], &chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(r[1], Bytes::from(vec![3u8; 65536]));
    }

    #[test]
    fn structured_read_of_sparse_disk_is_holes() {
        let (_d, s) = session(true, false);
        s.disk().write(8192, &[7u8; 4096], false).unwrap();
        let budget = Budget::new(1 << 20);
        let no = std::sync::atomic::AtomicBool::new(false);
        let Out::Segs(r) = read(&s, &req(Command::Read, 0, 0, 65536), &budget, &no) else {
            panic!("a READ that may have holes is not mapped");
        };
        // hole [0,8192), data [8192,12288), hole [12288,65536)
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!(&r[0][6..8], &chunk::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&r[1][6..8], &chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(r[2], Bytes::from(vec![7u8; 4096]));
        assert_eq!(&r[3][4..6], &chunk::FLAG_DONE.to_be_bytes());
        // DF: one data chunk, sent from the mapping where the file maps.
        let df = req(Command::Read, cflag::DF, 0, 65536);
        assert!(matches!(read_plan(&s, &df), ReadPlan::Mapped(_)));
        // Either way the data chunk is not final; a NONE chunk with DONE
        // follows the data.
        match read(&s, &df, &budget, &no) {
            Out::Segs(df) => {
                assert_eq!(df.len(), 3);
                assert_eq!(&df[0][4..6], &0u16.to_be_bytes());
                assert_eq!(df[1].len(), 65536);
                assert_eq!(&df[2][4..6], &chunk::FLAG_DONE.to_be_bytes());
                assert_eq!(&df[2][6..8], &chunk::NONE.to_be_bytes());
            }
            Out::Mapped(m) => {
                assert_eq!(&m.hdr[6..8], &chunk::OFFSET_DATA.to_be_bytes());
                assert_eq!(&m.hdr[4..6], &0u16.to_be_bytes());
                assert_eq!(&m.tail[4..6], &chunk::FLAG_DONE.to_be_bytes());
                assert_eq!(&m.tail[6..8], &chunk::NONE.to_be_bytes());
                assert_eq!(m.len, 65536);
            }
        }
    }

    #[test]
    fn budget_blocks_until_given_back() {
        let b = Arc::new(Budget::new(100));
        let no = AtomicBool::new(false);
        let g = b.take(80, &no).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let no = AtomicBool::new(false);
            let _g = b2.take(50, &no).unwrap();
            b2.left.load(Ordering::Acquire)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "took more than the budget");
        drop(g);
        assert_eq!(t.join().unwrap(), 50);
        assert_eq!(b.left.load(Ordering::Acquire), 100);
    }
}
