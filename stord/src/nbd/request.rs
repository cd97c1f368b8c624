//! Request semantics: validation against the export and the negotiation
//! (which error each invalid request gets), and execution on the disk, producing
//! simple or structured replies.

use super::*;

/// A finished reply: segments to write back to back.
pub(super) type Reply = Vec<Bytes>;

pub(super) fn simple(handle: u64, error: u32) -> Reply {
    let mut b = BytesMut::with_capacity(16);
    wire::emit_simple_reply(&mut b, error, handle);
    vec![b.freeze()]
}

pub(super) fn error_reply(sess: &Session, handle: u64, error: u32, msg: &str) -> Reply {
    if sess.structured {
        let mut b = BytesMut::with_capacity(32 + msg.len());
        wire::emit_error_chunk(&mut b, handle, error, msg);
        vec![b.freeze()]
    } else {
        simple(handle, error)
    }
}

/// Checks a request against the export and the negotiation; `Err` is the NBD
/// error value and a message for the client.
pub(super) fn validate(sess: &Session, req: &Request) -> Result<(), (u32, String)> {
    let einval = |m: &str| Err((err::EINVAL, m.to_string()));
    let allowed = match req.kind {
        cmd::READ if sess.structured => cflag::FUA | cflag::DF,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        cmd::DISC => 0,
        k => return Err((err::EINVAL, format!("unknown command {k}"))),
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
    if req.kind == cmd::FLUSH {
        return if req.offset == 0 && req.len == 0 {
            Ok(())
        } else {
            einval("FLUSH offset and length must be zero")
        };
    }
    let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && sess.disk().read_only() {
        return Err((err::EPERM, "the export is read-only".into()));
    }
    if matches!(req.kind, cmd::READ | cmd::WRITE) && req.len > wire::MAX_PAYLOAD {
        let e = if req.kind == cmd::READ && req.flags & cflag::DF != 0 {
            err::EOVERFLOW
        } else {
            err::EINVAL
        };
        return Err((
            e,
            format!(
                "length {} exceeds the maximum {}",
                req.len,
                wire::MAX_PAYLOAD
            ),
        ));
    }
    let end = req.offset.checked_add(req.len as u64);
    if !matches!(end, Some(e) if e <= sess.size) {
        let e = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
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
    if req.kind == cmd::BLOCK_STATUS {
        if !sess.base_allocation {
            return einval("no metadata context was negotiated");
        }
        if req.len == 0 {
            return einval("BLOCK_STATUS length must not be zero");
        }
    }
    Ok(())
}

/// Runs a validated request on the blocking pool; returns its reply.
pub(super) fn execute(sess: &Session, req: Request, payload: &[u8]) -> Reply {
    let disk = sess.disk();
    let fua = req.flags & cflag::FUA != 0;
    let res = match req.kind {
        cmd::READ => return read(sess, req),
        cmd::WRITE => disk.write(req.offset, payload, fua),
        cmd::FLUSH => disk.flush(),
        cmd::TRIM => disk.trim(req.offset, req.len as u64, fua),
        cmd::CACHE => disk.cache(req.offset, req.len as u64),
        cmd::WRITE_ZEROES => disk.write_zeroes(
            req.offset,
            req.len as u64,
            req.flags & cflag::NO_HOLE != 0,
            req.flags & cflag::FAST_ZERO != 0,
            fua,
        ),
        cmd::BLOCK_STATUS => {
            let max = if req.flags & cflag::REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            match disk.extents(req.offset, req.len as u64, max) {
                Ok(ext) if !ext.is_empty() => {
                    let mut b = BytesMut::with_capacity(24 + 8 * ext.len());
                    wire::emit_block_status(&mut b, req.handle, wire::BASE_ALLOCATION_ID, &ext);
                    return vec![b.freeze()];
                }
                Ok(_) => {
                    // Cannot happen for len > 0; "allocated" is always a safe answer.
                    let e = [wire::Extent {
                        len: req.len,
                        flags: 0,
                    }];
                    let mut b = BytesMut::with_capacity(32);
                    wire::emit_block_status(&mut b, req.handle, wire::BASE_ALLOCATION_ID, &e);
                    return vec![b.freeze()];
                }
                Err(e) => Err(e),
            }
        }
        _ => return error_reply(sess, req.handle, err::EINVAL, "unknown command"),
    };
    match res {
        Ok(()) => simple(req.handle, 0),
        Err(e) => {
            if !matches!(e, crate::disk::DiskError::NotFast) {
                tracing::warn!(export = disk.name(), kind = req.kind, error = %crate::error_chain(&e), "request failed");
            }
            error_reply(sess, req.handle, e.nbd_errno(), &crate::error_chain(&e))
        }
    }
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

/// A READ reply whose data goes from the disk file's mapping to the socket.
pub(super) struct MappedRead {
    /// The reply header (simple reply or one OFFSET_DATA chunk).
    pub hdr: Bytes,
    /// The mapping, held until the reply is written.
    pub map: std::sync::Arc<crate::sys::FileMap>,
    /// Where the data starts in the file.
    pub offset: usize,
    /// Data bytes.
    pub len: usize,
}

/// For a validated READ of [`MAPPED_READ_MIN`] bytes or more whose reply is
/// one header followed by the file's bytes (simple reply, or one OFFSET_DATA
/// chunk: DF, a fixed disk, or too short to look for holes), the reply to send
/// from the mapping, its pages made resident first (reading the disk now, not
/// under the connection's write lock). `None`: build the reply with [`read`],
/// which also reports any error the pages gave.
pub(super) fn mapped_read(sess: &Session, req: &Request) -> Option<MappedRead> {
    if req.kind != cmd::READ || req.len < MAPPED_READ_MIN {
        return None;
    }
    let hdr = single_chunk_header(sess, req)?;
    let map = sess.disk().mapping(req.offset, req.len as u64)?;
    let offset = usize::try_from(req.offset).ok()?;
    let len = req.len as usize;
    map.populate(offset, len).ok()?;
    Some(MappedRead {
        hdr,
        map,
        offset,
        len,
    })
}

/// The reply header of a READ answered with one piece of data, or `None` if
/// the reply may need hole chunks.
fn single_chunk_header(sess: &Session, req: &Request) -> Option<Bytes> {
    let mut hdr = BytesMut::with_capacity(32);
    if !sess.structured {
        wire::emit_simple_reply(&mut hdr, 0, req.handle);
    } else if req.flags & cflag::DF != 0
        || sess.disk().alloc() == Alloc::Fixed
        || (req.len as u64) < HOLE_SCAN_MIN
    {
        wire::emit_offset_data_header(&mut hdr, true, req.handle, req.offset, req.len);
    } else {
        return None;
    }
    Some(hdr.freeze())
}

/// Largest READ answered from the page cache by the reading worker itself.
const CACHED_READ_MAX: u32 = 16 * 1024;

/// Answers a validated READ of up to [`CACHED_READ_MAX`] bytes from the page
/// cache without waiting for the disk; `None` if the data is not all cached
/// (or the read is of another kind): the caller runs [`read`] then, where
/// waiting holds up nobody.
pub(super) fn read_cached(sess: &Session, req: &Request) -> Option<Reply> {
    if req.kind != cmd::READ || req.len == 0 || req.len > CACHED_READ_MAX {
        return None;
    }
    let hdr = single_chunk_header(sess, req)?;
    let data = sess
        .disk()
        .read_cached(req.offset, req.len as usize)
        .ok()??;
    Some(vec![hdr, Bytes::from(data)])
}

pub(super) fn read(sess: &Session, req: Request) -> Reply {
    let disk = sess.disk();
    let handle = req.handle;
    let len = req.len as u64;
    if !sess.structured {
        return match disk.read(req.offset, req.len as usize) {
            Ok(data) => {
                let mut v = simple(handle, 0);
                v.push(Bytes::from(data));
                v
            }
            Err(e) => simple(handle, e.nbd_errno()),
        };
    }
    if len == 0 {
        let mut b = BytesMut::with_capacity(20);
        wire::emit_none(&mut b, handle);
        return vec![b.freeze()];
    }
    let fail = |e: crate::disk::DiskError| {
        error_reply(sess, handle, e.nbd_errno(), &crate::error_chain(&e))
    };
    // DF forbids fragments; fixed disks have no holes worth skipping; below
    // HOLE_SCAN_MIN the two lseek calls cost more than sending the zeroes.
    let segments =
        if req.flags & cflag::DF != 0 || disk.alloc() == Alloc::Fixed || len < HOLE_SCAN_MIN {
            vec![(len, false)]
        } else {
            match disk.segments(req.offset, len, MAX_READ_CHUNKS) {
                Ok(mut s) => {
                    let covered: u64 = s.iter().map(|(l, _)| l).sum();
                    if covered < len {
                        s.push((len - covered, false));
                    }
                    s
                }
                Err(e) => return fail(e),
            }
        };
    let mut out = Vec::with_capacity(segments.len() * 2);
    let mut pos = req.offset;
    let n = segments.len();
    for (i, (seg, hole)) in segments.into_iter().enumerate() {
        let done = i + 1 == n;
        let mut hdr = BytesMut::with_capacity(32);
        if hole {
            wire::emit_offset_hole(&mut hdr, done, handle, pos, seg as u32);
            out.push(hdr.freeze());
        } else {
            let data = match disk.read(pos, seg as usize) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            wire::emit_offset_data_header(&mut hdr, done, handle, pos, seg as u32);
            out.push(hdr.freeze());
            out.push(Bytes::from(data));
        }
        pos += seg;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(structured: bool, ro: bool) -> (tempfile::TempDir, Session) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(
            dir.path(),
            &[crate::config::DiskConfig {
                name: "d".into(),
                size: crate::config::Size(1 << 20),
                alloc: Alloc::Dynamic,
                read_only: ro,
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
            },
        )
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validation_error_codes() {
        let (_d, s) = session(true, false);
        assert!(validate(&s, &req(cmd::READ, 0, 0, 4096)).is_ok());
        assert_eq!(
            validate(&s, &req(cmd::READ, 0, 1 << 20, 1)).unwrap_err().0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(cmd::WRITE, 0, 1 << 20, 1)).unwrap_err().0,
            err::ENOSPC
        );
        assert_eq!(
            validate(&s, &req(cmd::WRITE_ZEROES, 0, u64::MAX, 1))
                .unwrap_err()
                .0,
            err::ENOSPC
        );
        assert_eq!(validate(&s, &req(99, 0, 0, 0)).unwrap_err().0, err::EINVAL);
        assert_eq!(
            validate(&s, &req(cmd::WRITE, cflag::DF, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(cmd::FLUSH, 0, 1, 0)).unwrap_err().0,
            err::EINVAL
        );
        assert_eq!(
            validate(&s, &req(cmd::READ, cflag::DF, 0, wire::MAX_PAYLOAD + 1))
                .unwrap_err()
                .0,
            err::EOVERFLOW
        );
        assert_eq!(
            validate(&s, &req(cmd::BLOCK_STATUS, 0, 0, 0))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        let (_d, ro) = session(false, true);
        assert_eq!(
            validate(&ro, &req(cmd::WRITE, 0, 0, 1)).unwrap_err().0,
            err::EPERM
        );
        assert_eq!(
            validate(&ro, &req(cmd::TRIM, 0, 0, 1)).unwrap_err().0,
            err::EPERM
        );
        assert_eq!(
            validate(&ro, &req(cmd::READ, cflag::DF, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
        assert_eq!(
            validate(&ro, &req(cmd::BLOCK_STATUS, 0, 0, 1))
                .unwrap_err()
                .0,
            err::EINVAL
        );
    }

    #[test]
    fn structured_read_of_sparse_disk_is_holes() {
        let (_d, s) = session(true, false);
        s.disk().write(8192, &[7u8; 4096], false).unwrap();
        let r = read(&s, req(cmd::READ, 0, 0, 65536));
        // hole [0,8192), data [8192,12288), hole [12288,65536)
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!(&r[0][6..8], &wire::chunk::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&r[1][6..8], &wire::chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(r[2], Bytes::from(vec![7u8; 4096]));
        assert_eq!(&r[3][4..6], &wire::chunk::FLAG_DONE.to_be_bytes());
        let df = read(&s, req(cmd::READ, cflag::DF, 0, 65536));
        assert_eq!(df.len(), 2);
        assert_eq!(df[1].len(), 65536);
    }
}
