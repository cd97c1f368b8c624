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

/// Kills this process with SIGKILL, as an outside `kill -9` would: no
/// destructor, no flush, no exit handler runs (the crash test hook).
pub fn kill_self() -> ! {
    // SAFETY: kill(2) with our own pid and a valid signal number touches no
    // memory of this process.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    std::process::abort()
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

/// A read-only shared mapping of a file that this process never reads itself:
/// its pages are only handed to the kernel, as the source of `writev`, which
/// copies them straight from the page cache into the socket (one copy, where
/// pread + write make two).
///
/// Why user space must never touch it: a page the kernel cannot provide (the
/// file shrank under the mapping, or the disk failed) raises SIGBUS on a load
/// from user space, which would kill the daemon; the same fault inside a
/// system call's copy makes that call fail with EFAULT instead. So the mapping
/// hands out no slices, only [`FileMap::populate`] and [`FileMap::writev`].
#[derive(Debug)]
pub struct FileMap {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and only its address is shared: the kernel
// does every access, and munmap happens once, in Drop, when no user is left.
unsafe impl Send for FileMap {}
// SAFETY: as above; no method mutates the mapping.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the first `len` bytes of `file` (shared, read-only).
    pub fn new(file: &File, len: u64) -> io::Result<FileMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), over
        // a valid fd; nothing else in the process is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FileMap { base, len })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never true: `new` refuses an empty mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes `[offset, offset + len)` resident and mapped (MADV_POPULATE_READ):
    /// reads it from the disk if it is not in the page cache, so a later
    /// `writev` from it does not wait for the disk. Fails with EFAULT when a
    /// page cannot be read (past the end of the file, an I/O error) and with
    /// EINVAL on kernels older than 5.14; the caller then reads the ordinary
    /// way, which reports the real error.
    pub fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        let (start, span) = self.page_span(offset, len)?;
        loop {
            // SAFETY: the range lies inside our own mapping (checked by
            // page_span); POPULATE_READ only faults pages in, it reads nothing
            // into user space and changes no mapping.
            let r = unsafe {
                libc::madvise(
                    self.base.cast::<u8>().add(start).cast(),
                    span,
                    libc::MADV_POPULATE_READ,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// One `writev(fd, [head, mapping[offset..offset + len], tail])`: returns
    /// the bytes written, which may be fewer than offered. EFAULT means a page
    /// of the range could not be read (nothing was written by this call then).
    pub fn writev(
        &self,
        fd: RawFd,
        head: &[u8],
        offset: usize,
        len: usize,
        tail: &[u8],
    ) -> io::Result<usize> {
        self.page_span(offset, len)?;
        let iov = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                // SAFETY: in bounds of the mapping (checked above).
                iov_base: unsafe { self.base.cast::<u8>().add(offset).cast() },
                iov_len: len,
            },
            libc::iovec {
                iov_base: tail.as_ptr() as *mut libc::c_void,
                iov_len: tail.len(),
            },
        ];
        loop {
            // SAFETY: three iovecs over memory that stays valid for the call:
            // borrowed slices and our own mapping; writev only reads them, in
            // the kernel (see the type's docs).
            let r = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The page-aligned range covering `[offset, offset + len)`, checked to lie
    /// inside the mapping.
    fn page_span(&self, offset: usize, len: usize) -> io::Result<(usize, usize)> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let page = page_size();
        let start = offset - offset % page;
        Ok((start, end - start))
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the last owner is
        // going away, so no call is using it.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: sysconf with a valid name has no side effects.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r > 0 {
        r as usize
    } else {
        4096
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

/// Shuts a socket down both ways (wakes threads blocked in recv / send on it);
/// errors (not a socket, already shut) are of no interest.
pub fn shutdown_socket(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor the caller keeps open; it only
    // changes the socket's state.
    let _ = unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// A listening unix socket at `path` whose file has `mode` (and group `gid`)
/// before anyone can connect: bind, chmod / chown the path, then listen. A
/// client can connect only after listen(2), so no client ever sees a socket
/// with looser permissions, and a failure to set them is an error.
pub fn listen_unix(
    path: &std::path::Path,
    mode: u32,
    gid: Option<u32>,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let set = || -> io::Result<()> {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        if let Some(g) = gid {
            std::os::unix::fs::chown(path, None, Some(g))?;
        }
        Ok(())
    };
    if let Err(e) = set() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: listen(2) on our own socket.
    if unsafe { libc::listen(sock.as_raw_fd(), 1024) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(std::os::unix::net::UnixListener::from(sock))
}

/// The id of group `name` (a name, or a number): one lookup for both daemons.
pub use fabric_util::sys::group_id;
