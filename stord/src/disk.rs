//! A disk: one host file served as one NBD export.
//!
//! Theory of operation: all I/O is positioned (`pread`/`pwrite` through
//! `FileExt`), so one `File` is shared by every connection of every client and
//! needs no lock; the kernel page cache is the only cache, shared by all
//! connections, which is what makes `NBD_FLAG_CAN_MULTI_CONN` honest: an
//! `fdatasync` issued for a FLUSH on any connection persists every write any
//! connection has completed before it.
//!
//! `fixed` disks are fallocated in full when created (a full host disk fails the
//! create, not a later write) and keep their blocks: TRIM is accepted and ignored,
//! WRITE_ZEROES uses FALLOC_FL_ZERO_RANGE. `dynamic` disks are sparse files; TRIM
//! and WRITE_ZEROES (without NO_HOLE) punch holes.
//!
//! Write-behind: a large write (128 KiB or more, without FUA) starts writeback
//! of its range at once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does
//! not wait). A sequential stream is then mostly on the disk by the time the
//! client's FLUSH arrives, instead of all of it waiting for the `fdatasync`.
//! This changes no promise: only FUA and FLUSH (`fdatasync`) make data durable.
//!
//! A failed `fdatasync` is latched: Linux reports a writeback error once per
//! open file description, and every connection shares this one, so whoever
//! syncs next (another connection's FLUSH, a resize, the shutdown flush) would
//! otherwise consume the error and a later FLUSH would be acknowledged
//! although data was lost. Once a sync fails the disk is `failed`: every later
//! FLUSH and FUA write fails with EIO until the disk is reopened (as QEMU's
//! file driver does); it is logged, counted and shown by `disk list`.
//!
//! Disk files are created 0600 (and tightened to it when opened); a read-only
//! disk is opened read-only, so no bug above can write to it.
//!
//! Large READs are sent from a shared read-only mapping of the file (one copy,
//! page cache to socket, in the kernel; see [`sys::FileMap`] for why stord
//! itself never reads that memory).
//!
//! A `qcow2` disk (see [`crate::qcow2`]) is served by the same methods: each
//! hands the request to its [`crate::qcow2::Image`] instead of the file,
//! READs are never sent from a mapping (the guest's offsets are not the
//! file's), FLUSH and FUA flush the image's metadata in order, through the
//! same latch. Its size is the image's virtual size; it grows (never
//! shrinks) with `resize` (`qcow2::online`), while clients are attached.
//!
//! Calls here block; each connection runs them on its own worker threads
//! (see `nbd`), never on the tokio runtime.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{Alloc, Format};
use crate::qcow2::{Image, Qcow2Error, Root, Run};
use crate::sys;
use nbd_proto::{err, Extent, STATE_HOLE, STATE_ZERO};

/// Errors of disk operations, each mapped to an NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// I/O on the disk file failed
    #[error("I/O on the disk file failed")]
    Io(#[source] io::Error),
    /// zeroing would not be faster than writing
    #[error("zeroing would not be faster than writing")]
    NotFast,
    /// cannot create the disk file {path}
    #[error("cannot create the disk file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// cannot open the disk file {path}
    #[error("cannot open the disk file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// the qcow2 image {path} was refused
    #[error("the qcow2 image {path} was refused")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Qcow2Error,
    },
    /// a qcow2 operation failed
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    /// a qcow2 disk is only grown, and only when writable
    #[error("a qcow2 disk is only grown (not shrunk), and only when writable")]
    NoResize,
}

/// The NBD error value of an errno.
fn nbd_errno_of(e: Option<i32>) -> u32 {
    match e {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => err::ENOSPC,
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => err::EPERM,
        Some(libc::ENOMEM) => err::ENOMEM,
        Some(libc::EINVAL) => err::EINVAL,
        _ => err::EIO,
    }
}

impl DiskError {
    /// The NBD error value for this failure.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            DiskError::NotFast | DiskError::Qcow2(Qcow2Error::NotFast) => err::ENOTSUP,
            DiskError::NoResize => err::EINVAL,
            DiskError::Io(e)
            | DiskError::Create { source: e, .. }
            | DiskError::Open { source: e, .. } => nbd_errno_of(e.raw_os_error()),
            DiskError::Qcow2(e) | DiskError::Image { source: e, .. } => {
                nbd_errno_of(Some(e.errno()))
            }
        }
    }
}

/// One served disk.
#[derive(Debug)]
pub struct Disk {
    name: String,
    path: PathBuf,
    file: File,
    size: AtomicU64,
    alloc: Alloc,
    read_only: bool,
    connections: AtomicUsize,
    /// A sync failed: every later flush fails (see the module docs).
    failed: AtomicBool,
    /// Syncs that failed.
    flush_failures: AtomicU64,
    /// Set while a shrink runs: no new connection may attach.
    pub(crate) exclusive: AtomicBool,
    /// Requests served, by command (see [`crate::metrics`]).
    io: crate::metrics::DiskIo,
    /// The file mapped for sending READ data (made on first use, replaced
    /// after [`MAP_REGIONS_MAX`] regions and on resize).
    map: Mutex<Option<MapState>>,
    /// A qcow2 disk's mappings of the files of its chain, top first (see
    /// [`Disk::mapped_at`]).
    layer_maps: Vec<Mutex<Option<MapState>>>,
    /// A qcow2 disk's image (`None`: a raw disk).
    image: Option<Image>,
}

/// The current mapping of a disk file and the 2 MiB regions of it that READs
/// have been sent from.
#[derive(Debug)]
struct MapState {
    map: Arc<sys::FileMap>,
    regions: std::collections::HashSet<u64>,
}

/// A mapping of `file` (of `size()` bytes, asked only for a new mapping)
/// for sending `[offset, offset + len)` from, kept in `state` (see
/// [`Disk::mapping`]).
fn map_range(
    state: &Mutex<Option<MapState>>,
    file: &File,
    size: impl FnOnce() -> u64,
    offset: u64,
    len: u64,
    name: &str,
) -> Option<Arc<sys::FileMap>> {
    let end = offset.checked_add(len)?;
    let touched = (offset >> MAP_REGION_SHIFT)..=(end.saturating_sub(1) >> MAP_REGION_SHIFT);
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(st) = state.as_mut() {
        if st.map.len() as u64 >= end {
            st.regions.extend(touched.clone());
            if st.regions.len() <= MAP_REGIONS_MAX {
                return Some(st.map.clone());
            }
        }
    }
    let size = size();
    if end > size {
        return None;
    }
    match sys::FileMap::new(file, size) {
        Ok(m) => {
            let map = Arc::new(m);
            *state = Some(MapState {
                map: map.clone(),
                regions: touched.collect(),
            });
            Some(map)
        }
        Err(e) => {
            *state = None;
            tracing::debug!(disk = %name, error = %e, "cannot map the disk file; reading with pread");
            None
        }
    }
}

/// Size of the file region one page-table page maps (512 pages of 4 KiB).
const MAP_REGION_SHIFT: u32 = 21;

/// Regions a mapping may have touched before the next READ gets a fresh
/// mapping (the old one is unmapped when its last reader is done). A mapping
/// keeps a 4 KiB page-table page for every 2 MiB region it was read from until
/// it is unmapped, and those are not reclaimed with the page cache: without a
/// bound, a client reading a 10 TiB disk end to end would leave 20 GiB of page
/// tables behind. This bounds them at 16 MiB per disk, while a client that
/// keeps reading the same 8 GiB (a benchmark, a VM's hot set) never pays for
/// faulting its pages in again.
const MAP_REGIONS_MAX: usize = 4096;

/// Largest zero buffer written when the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

/// Smallest write after which writeback of its range is started at once.
const WRITEBACK_MIN: usize = 128 * 1024;

/// Mode of disk files: the daemon's user only.
pub const FILE_MODE: u32 = 0o600;

impl Disk {
    /// Creates the host file: `fixed` fallocates the whole size now.
    pub fn create(
        name: &str,
        path: &Path,
        size: u64,
        alloc: Alloc,
        read_only: bool,
    ) -> Result<Disk, DiskError> {
        let mk = |source| DiskError::Create {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)
            .map_err(mk)?;
        let res = match alloc {
            Alloc::Fixed => sys::fallocate(&file, sys::FALLOC_ALLOCATE, 0, size),
            Alloc::Dynamic => file.set_len(size),
        }
        // The mode too, whatever the umask made of it.
        .and_then(|_| file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE)))
        .and_then(|_| file.sync_all());
        if let Err(e) = res {
            // Leave nothing half-made behind: a full host disk fails the create.
            let _ = std::fs::remove_file(path);
            return Err(mk(e));
        }
        drop(file);
        // Served through a descriptor of the right kind (read-only disks
        // read-only).
        Disk::open(name, path, alloc, read_only).map_err(|e| match e {
            DiskError::Open { source, .. } => mk(source),
            e => e,
        })
    }

    /// Opens an existing host file; its size on disk is taken as it is.
    pub fn open(name: &str, path: &Path, alloc: Alloc, read_only: bool) -> Result<Disk, DiskError> {
        let mk = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(mk)?;
        let meta = file.metadata().map_err(mk)?;
        if meta.mode() & 0o077 != 0 {
            // A file from an older stord (0644) or copied in: ours alone.
            file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(mk)?;
        }
        Ok(Disk::from_file(
            name,
            path,
            file,
            meta.len(),
            alloc,
            read_only,
        ))
    }

    fn from_file(
        name: &str,
        path: &Path,
        file: File,
        size: u64,
        alloc: Alloc,
        read_only: bool,
    ) -> Disk {
        Disk {
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            size: AtomicU64::new(size),
            alloc,
            read_only,
            connections: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            flush_failures: AtomicU64::new(0),
            exclusive: AtomicBool::new(false),
            io: crate::metrics::DiskIo::default(),
            map: Mutex::new(None),
            layer_maps: Vec::new(),
            image: None,
        }
    }

    /// Opens a qcow2 image and its chain (backing names resolved in `root`).
    pub fn open_qcow2(
        name: &str,
        path: &Path,
        read_only: bool,
        root: &Root,
    ) -> Result<Disk, DiskError> {
        let img = Image::open(path, !read_only, root).map_err(|source| DiskError::Image {
            path: path.to_path_buf(),
            source,
        })?;
        let file = img.file().try_clone().map_err(DiskError::Io)?;
        if let Ok(m) = file.metadata() {
            if m.mode() & 0o077 != 0 {
                let _ = file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE));
            }
        }
        let mut d = Disk::from_file(name, path, file, img.size(), Alloc::Dynamic, read_only);
        d.layer_maps = (0..=crate::qcow2::MAX_CHAIN)
            .map(|_| Mutex::new(None))
            .collect();
        d.image = Some(img);
        Ok(d)
    }

    /// The file's format.
    pub fn format(&self) -> Format {
        if self.image.is_some() {
            Format::Qcow2
        } else {
            Format::Raw
        }
    }

    /// The files under a qcow2 disk's image, nearest first (empty for raw).
    pub fn chain(&self) -> Vec<PathBuf> {
        self.image
            .as_ref()
            .map(|i| i.chain_paths().into_iter().skip(1).collect())
            .unwrap_or_default()
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Host file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    /// Allocation policy.
    pub fn alloc(&self) -> Alloc {
        self.alloc
    }
    /// Served read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// A flush failed since the disk was opened (see the module docs).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
    /// Syncs that failed since the disk was opened.
    pub fn flush_failures(&self) -> u64 {
        self.flush_failures.load(Ordering::Relaxed)
    }
    /// Requests served on this disk since it was opened.
    pub fn io(&self) -> &crate::metrics::DiskIo {
        &self.io
    }
    /// Open NBD connections on this disk.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
    /// Counts a connection in; the returned guard counts it out on drop.
    pub fn attach(self: &std::sync::Arc<Self>) -> Attachment {
        self.connections.fetch_add(1, Ordering::AcqRel);
        Attachment { disk: self.clone() }
    }
    /// Bytes the host file occupies on the host file system.
    pub fn allocated_bytes(&self) -> u64 {
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
    /// Human-readable description (NBD_INFO_DESCRIPTION, LIST).
    pub fn description(&self) -> String {
        format!(
            "stord {} disk{}",
            if self.image.is_some() {
                "qcow2"
            } else {
                self.alloc.as_str()
            },
            if self.read_only { " (read-only)" } else { "" }
        )
    }

    /// Reads `len` bytes at `offset` (the caller checked bounds).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        if let Some(img) = &self.image {
            let mut buf = vec![0u8; len];
            img.read(offset, &mut buf)?;
            return Ok(buf);
        }
        sys::pread_vec(&self.file, offset, len).map_err(DiskError::Io)
    }

    /// Reads `len` bytes at `offset` if they are all in the page cache, without
    /// waiting for the disk; `Ok(None)` otherwise.
    pub fn read_cached(&self, offset: u64, len: usize) -> Result<Option<Vec<u8>>, DiskError> {
        if self.image.is_some() {
            return Ok(None);
        }
        sys::pread_cached(&self.file, offset, len).map_err(DiskError::Io)
    }

    /// Writes `data` at `offset`; with `fua`, persisted before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        if let Some(img) = &self.image {
            img.write(offset, data)?;
            return if fua { self.flush() } else { Ok(()) };
        }
        self.file
            .write_all_at(data, offset)
            .map_err(DiskError::Io)?;
        if fua {
            self.flush()?;
        } else if data.len() >= WRITEBACK_MIN {
            // A large write is most likely part of a stream that ends in a
            // FLUSH: let the disk start on it now rather than leave all of it
            // to the fdatasync. Only a head start; failure changes nothing.
            let _ = sys::start_writeback(&self.file, offset, data.len() as u64);
        }
        Ok(())
    }

    /// The disk file mapped for sending the `len` bytes at `offset` as READ
    /// data (see [`sys::FileMap`]); made on first use, again after the disk
    /// grew, and again once it touched `MAP_REGIONS_MAX` regions. `None` if the range is past
    /// the disk or the file cannot be mapped: the caller then reads with pread.
    pub fn mapping(&self, offset: u64, len: u64) -> Option<Arc<sys::FileMap>> {
        if self.image.is_some() {
            return None;
        }
        map_range(
            &self.map,
            &self.file,
            || self.size(),
            offset,
            len,
            &self.name,
        )
    }

    /// Where the `len` bytes at guest `offset` can be sent from: a mapping
    /// and the offset in it. A raw disk: its file's ([`Disk::mapping`]). A
    /// qcow2 disk: the file of the chain that holds them as one run of data
    /// (`qcow2::Image::locate`), mapped as a raw disk's file is (one mapping
    /// per layer, made again once the file outgrew it); `None` for zeroes,
    /// compressed data or a range split between clusters or layers (the
    /// caller reads it).
    pub fn mapped_at(&self, offset: u64, len: u64) -> Option<(Arc<sys::FileMap>, usize)> {
        let Some(img) = &self.image else {
            return Some((self.mapping(offset, len)?, usize::try_from(offset).ok()?));
        };
        let (depth, file, at) = img.locate(offset, len).ok()??;
        let state = self.layer_maps.get(depth)?;
        let size = || file.metadata().map_or(0, |m| m.len());
        let map = map_range(state, file, size, at, len, &self.name)?;
        Some((map, usize::try_from(at).ok()?))
    }

    /// Persists every completed write (fdatasync). Fails with EIO, without
    /// syncing, once any sync of this disk failed (see the module docs).
    pub fn flush(&self) -> Result<(), DiskError> {
        if let Some(img) = &self.image {
            return self.sync(|_| {
                img.flush().map_err(|e| match e {
                    Qcow2Error::Io(e) => e,
                    e => io::Error::other(e),
                })
            });
        }
        self.sync(|f| f.sync_data())
    }

    /// Runs a sync of the file through the latch: refused once failed, and a
    /// failure latches.
    fn sync(&self, op: impl FnOnce(&File) -> io::Result<()>) -> Result<(), DiskError> {
        if self.failed() {
            return Err(DiskError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        op(&self.file).map_err(|e| {
            self.latch(&e);
            DiskError::Io(e)
        })
    }

    /// Marks the disk failed after a sync error.
    fn latch(&self, e: &io::Error) {
        self.flush_failures.fetch_add(1, Ordering::Relaxed);
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                disk = %self.name,
                error = %e,
                "flush failed: data written to this disk may be lost; every later FLUSH and FUA write fails until stord reopens it"
            );
        }
    }

    /// Discards a range: dynamic disks punch a hole, fixed disks keep their blocks.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DiskError> {
        if let Some(img) = &self.image {
            img.zero(offset, len, false, true)?;
            return if fua { self.flush() } else { Ok(()) };
        }
        if self.alloc == Alloc::Dynamic && len > 0 {
            sys::fallocate(&self.file, sys::FALLOC_PUNCH, offset, len).map_err(DiskError::Io)?;
            if fua {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Writes zeroes. Dynamic disks punch a hole unless `no_hole`; otherwise the
    /// range is zeroed in place (ZERO_RANGE), falling back to writing zero
    /// buffers, which `fast` forbids (ENOTSUP).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        if let Some(img) = &self.image {
            // Zero clusters whether or not NO_HOLE: they are allocated
            // metadata, not a hole in the file.
            img.zero(offset, len, fast, false)?;
            return if fua { self.flush() } else { Ok(()) };
        }
        let punched = self.alloc == Alloc::Dynamic
            && !no_hole
            && sys::fallocate(&self.file, sys::FALLOC_PUNCH, offset, len).is_ok();
        if !punched {
            match sys::fallocate(&self.file, sys::FALLOC_ZERO, offset, len) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                    ) =>
                {
                    if fast {
                        return Err(DiskError::NotFast);
                    }
                    self.write_zero_buffers(offset, len)?;
                }
                Err(e) => return Err(DiskError::Io(e)),
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(DiskError::Io)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Starts reading a range into the page cache (NBD_CMD_CACHE).
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.image.is_some() {
            return Ok(());
        }
        sys::willneed(&self.file, offset, len).map_err(DiskError::Io)
    }

    /// Splits `[offset, offset + len)` into data / hole segments using
    /// SEEK_DATA / SEEK_HOLE, at most `max` segments (the last one may be cut
    /// short, so the sum can be below `len`). Returns `(length, is_hole)`.
    pub fn segments(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, bool)>, DiskError> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        if let Some(img) = &self.image {
            while pos < end && out.len() < max {
                let (n, run) = img.status(pos, end - pos)?;
                match out.last_mut() {
                    Some((l, hole)) if *hole == (run == Run::Zero) => *l += n,
                    _ => out.push((n, run == Run::Zero)),
                }
                pos += n;
            }
            return Ok(out);
        }
        while pos < end && out.len() < max {
            let data = sys::seek(&self.file, pos, true).map_err(DiskError::Io)?;
            let (seg_end, hole) = match data {
                None => (end, true),
                Some(d) if d > pos => (d.min(end), true),
                Some(_) => {
                    let h = sys::seek(&self.file, pos, false).map_err(DiskError::Io)?;
                    (h.unwrap_or(end).min(end), false)
                }
            };
            if seg_end <= pos {
                // The file changed under us (or a file system misreports); call
                // the rest data, which is always a safe answer.
                out.push((end - pos, false));
                break;
            }
            out.push((seg_end - pos, hole));
            pos = seg_end;
        }
        Ok(out)
    }

    /// `base:allocation` extents of a range, each at most `u32::MAX` bytes.
    /// Fixed disks never report HOLE (their blocks are reserved), only ZERO.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, DiskError> {
        let segs = self.segments(offset, len, max)?;
        let mut out: Vec<Extent> = Vec::with_capacity(segs.len());
        for (l, hole) in segs {
            let flags = match (hole, self.alloc) {
                (false, _) => 0,
                (true, Alloc::Dynamic) => STATE_HOLE | STATE_ZERO,
                (true, Alloc::Fixed) => STATE_ZERO,
            };
            let mut rest = l;
            while rest > 0 && out.len() < max {
                let piece = rest.min(u32::MAX as u64 & !511);
                match out.last_mut() {
                    Some(last)
                        if last.flags == flags && (last.len as u64 + piece) <= u32::MAX as u64 =>
                    {
                        last.len += piece as u32
                    }
                    _ => out.push(Extent {
                        len: piece as u32,
                        flags,
                    }),
                }
                rest -= piece;
            }
        }
        Ok(out)
    }

    /// Copies a qcow2 disk's chain into its own image while it serves
    /// (`qcow2::online`); the header still names the backing file until
    /// [`Disk::detach`].
    pub fn stream(&self) -> Result<(), DiskError> {
        match &self.image {
            Some(img) => Ok(img.stream()?),
            None => Ok(()),
        }
    }

    /// After [`Disk::stream`]: drops the backing file from the image.
    pub fn detach(&self) -> Result<(), DiskError> {
        match &self.image {
            Some(img) => Ok(img.detach()?),
            None => Ok(()),
        }
    }

    /// Changes the size (the caller refuses a shrink while clients are connected).
    pub fn resize(&self, new: u64) -> Result<(), DiskError> {
        if let Some(img) = &self.image {
            if new < img.size() || self.read_only {
                return Err(DiskError::NoResize);
            }
            img.grow(new)?;
            self.size.store(new, Ordering::Release);
            return Ok(());
        }
        let old = self.size();
        // A read-only disk is served through a read-only descriptor; the
        // size changes through one of its own.
        let rw;
        let file = if self.read_only {
            rw = OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(DiskError::Io)?;
            &rw
        } else {
            &self.file
        };
        if new > old && self.alloc == Alloc::Fixed {
            sys::fallocate(file, sys::FALLOC_ALLOCATE, old, new - old).map_err(DiskError::Io)?;
        }
        file.set_len(new).map_err(DiskError::Io)?;
        // Through the latch: this sync may be the one that sees a writeback
        // error of the served data.
        self.sync(|_| file.sync_all())?;
        self.size.store(new, Ordering::Release);
        // Readers still holding the old mapping keep it until they are done.
        *self.map.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}

/// A connection's hold on a disk; counts itself out on drop.
#[derive(Debug)]
pub struct Attachment {
    disk: std::sync::Arc<Disk>,
}

impl Attachment {
    /// The disk.
    pub fn disk(&self) -> &std::sync::Arc<Disk> {
        &self.disk
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.disk.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests;
