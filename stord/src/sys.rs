//! Thin, safe wrappers around the few Linux calls std does not offer: fallocate
//! modes, SEEK_DATA / SEEK_HOLE, posix_fadvise, and adopting inherited sockets
//! (systemd socket activation). All `unsafe` of the crate lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// fallocate(2) with `mode` over `[offset, offset + len)`.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate takes a valid fd (borrowed from `file`) and plain integers.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Preallocate blocks (mode 0).
pub const FALLOC_ALLOCATE: i32 = 0;
/// Deallocate a range, file size unchanged: reads return zeroes.
pub const FALLOC_PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// Zero a range keeping it allocated, file size unchanged.
pub const FALLOC_ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// lseek(2) with SEEK_DATA (`data = true`) or SEEK_HOLE. `Ok(None)` for ENXIO,
/// i.e. no data (or hole) at or after `offset` before the end of the file.
pub fn seek(file: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: lseek on a valid fd; the fd's position is never used by this crate
    // (all I/O is positioned: pread/pwrite), so moving it concurrently is harmless.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// posix_fadvise(WILLNEED): start reading a range into the page cache.
pub fn willneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: posix_fadvise on a valid fd with plain integers; it only hints.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Takes ownership of an inherited file descriptor (systemd's LISTEN_FDS).
/// Fails unless `fd` is open.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // Inherited sockets must not leak into children we might spawn.
    // SAFETY: setting FD_CLOEXEC on an fd we just checked is open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, r | libc::FD_CLOEXEC) };
    // SAFETY: systemd passed this fd to us for our exclusive use (LISTEN_PID matched
    // our pid); nothing else in the process owns it, so taking ownership is sound.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The address family of a socket (AF_UNIX, AF_INET, AF_INET6).
pub fn socket_family(fd: RawFd) -> io::Result<i32> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `ss`, which is that big.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ss.ss_family as i32)
}

/// The process id (for LISTEN_PID).
pub fn getpid() -> u32 {
    std::process::id()
}

/// Bytes waiting to be read on a socket or pipe (ioctl FIONREAD).
pub fn bytes_pending(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Reads exactly `len` bytes at `offset` into a fresh buffer without zeroing it
/// first (the kernel fills it); bytes past the end of the file read as zero.
pub fn pread_vec(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let mut done = 0usize;
    while done < len {
        let off = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the destination is the buffer's spare capacity from `done` on,
        // `len - done` bytes long and owned by us; pread writes at most that many.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                len - done,
                off,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            // SAFETY: zero the rest of the spare capacity (within `len`).
            unsafe { std::ptr::write_bytes(buf.as_mut_ptr().add(done), 0, len - done) };
            break;
        }
        done += r as usize;
    }
    // SAFETY: every byte in 0..len was written by pread or zeroed above.
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// Waits up to `timeout` for `fd` to become readable (or hung up).
pub fn poll_readable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, count 1.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Sends `buf` on a socket with MSG_MORE (more of the same message follows, so
/// the kernel may hold it back to coalesce it with the next send), or writes it
/// to a non-socket (`socket = false`). Writes all of `buf`.
pub fn send_more(fd: RawFd, buf: &[u8], socket: bool) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &buf[done..];
        let r = if socket {
            // SAFETY: send reads at most `rest.len()` bytes from `rest`, which we borrow.
            unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            }
        } else {
            // SAFETY: write reads at most `rest.len()` bytes from `rest`, which we borrow.
            unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += r as usize;
    }
    Ok(())
}

/// sendfile(2): copies up to `len` bytes of `file` at `offset` to `out` in the
/// kernel (no user-space copy), without moving the file position. Returns the
/// bytes sent; 0 means the end of the file was reached.
pub fn sendfile(out: RawFd, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    let mut off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: two valid fds and a pointer to our own offset variable, which
        // sendfile updates instead of the file position.
        let r = unsafe { libc::sendfile(out, file.as_raw_fd(), &mut off, len) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// sync_file_range(SYNC_FILE_RANGE_WRITE): starts writeback of the dirty pages
/// in a range and returns without waiting for it. Only a head start for a later
/// fdatasync: it persists nothing by itself (no metadata, no cache flush).
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: sync_file_range on a valid fd with plain integers.
    let r =
        unsafe { libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// preadv2(RWF_NOWAIT): reads exactly `len` bytes at `offset` only if they are
/// all in the page cache. `Ok(None)` when reading would wait for the disk (or
/// the file system cannot say), or on a short read: the caller then reads the
/// ordinary, blocking way.
pub fn pread_cached(file: &File, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: one iovec over the buffer's spare capacity (`len` bytes, owned by
    // us); preadv2 writes at most that many.
    let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    if r as usize != len {
        return Ok(None);
    }
    // SAFETY: preadv2 wrote all `len` bytes.
    unsafe { buf.set_len(len) };
    Ok(Some(buf))
}
