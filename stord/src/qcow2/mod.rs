//! qcow2 (version 3) images, read and written by stord itself: a disk's
//! layer, the backing chain under it, cluster allocation with refcounts, and
//! the order metadata reaches the file in.
//!
//! # Theory of operation
//!
//! A qcow2 image maps guest clusters (64 KiB in the images stord creates) to
//! host clusters through two levels of tables: the L1 table (in memory, whole)
//! points to L2 tables (cached), whose entries say for one guest cluster:
//! not here (read the backing file), reads as zeroes, or data at a host
//! offset. Every host cluster's use count is in the refcount blocks, found
//! through the refcount table. Files: `header.rs` (the checked header),
//! `table.rs` (entries), `image.rs` (one image: lookup, reads, writes,
//! flush), `alloc.rs` (refcounts, allocation, the flush order, the check
//! at open), `create.rs` (new images, copying a chain into one),
//! `online.rs` (growing, and copying the chain in while the image serves).
//!
//! Compressed clusters (`qemu-img convert -c`) are read: the L2 entry
//! gives a byte offset and a length of at most two clusters of raw
//! deflate, inflated (flate2, pure Rust) into exactly one cluster, else the
//! request gets EIO. A write to a compressed cluster allocates a normal one
//! (the rest of the cluster inflated into it); the host clusters the
//! compressed data lay in, which other compressed clusters may share, lose
//! one reference each at the next flush (freed at zero). stord never writes
//! compressed clusters.
//!
//! Reads of a cluster fall through the chain: a qcow2 or raw backing file,
//! opened read-only; past the end of a smaller backing file reads zeroes.
//! A read takes runs of clusters at once (`Image::extent`): data clusters
//! at consecutive host offsets are one pread, unallocated ones one read of
//! the backing file, and a READ that is one run of data in one file of the
//! chain is sent from that file's mapping (`Image::locate`,
//! `Disk::mapped_at`), one copy from the page cache to the socket.
//! Writes to a cluster not yet in the image allocate one at the end of the
//! file (copy-on-write: the parts of the cluster the write does not cover are
//! copied from the chain first). Host clusters are never reused while the
//! image is open: a cluster freed by TRIM or WRITE_ZEROES (its L2 entry
//! becomes a zero cluster) has its refcount dropped and its blocks punched
//! out only after the new L2 entry is durable, so no stale pointer ever
//! reads another cluster's data.
//!
//! # Crash consistency (no lazy refcounts)
//!
//! Data is written at once; metadata changes are kept in memory and written
//! at FLUSH (and FUA, and when more than [`image::DIRTY_MAX`] bytes of tables
//! are dirty), in three phases, each ended by an `fdatasync`:
//!
//! 1. new refcount blocks and new L2 tables (whole clusters nothing durable
//!    points to yet), and changed refcounts in existing blocks;
//! 2. refcount table entries naming new refcount blocks (only when there are);
//! 3. changed L2 entries, and L1 entries naming new L2 tables.
//!
//! Then the refcounts of freed clusters drop and their blocks are punched
//! (a fourth sync when there were any).
//!
//! The refcount table grows when an allocation (a data cluster, a table, a
//! larger L1 table of a grow) lies past what it reaches (images of small
//! clusters made by `qemu-img create` reach 8 MiB of file at first): a
//! table of at least twice the entries goes to the end of the file, with
//! the refcount blocks counting it; those blocks are written and synced,
//! then the new table, synced, then the header names it (one sector,
//! synced), and the old table's clusters are freed at the next flush. A
//! crash before the header leaks the new table at most, one after it the
//! old table; the check at open frees either. Growth stops at
//! `header::MAX_REFTABLE_BYTES` (QEMU's bound: with 512-byte clusters,
//! 128 GiB of file), where an allocation fails with ENOSPC. So whatever subset of a flush's
//! writes a crash leaves on the disk, every durable L1 or L2 entry points
//! to a cluster whose contents and refcount were durable before it: the worst
//! a crash leaves is leaked clusters (refcount 1, nothing points to them).
//! Those are found and freed when the image is next opened writable (the
//! check at open, `alloc.rs`), so `qemu-img check` is clean again. A cluster
//! referenced more often than its refcount (which this order never makes) or
//! twice refuses the open: the image is corrupt.
//!
//! # Concurrency
//!
//! The tables are behind one `RwLock`. A READ, and a WRITE to a cluster
//! already in the image, take it shared only for the lookup (a cache hit),
//! then do their I/O without it; an L2 table missing from the cache, an
//! allocating write (whose copy-on-write and data write happen under the
//! lock, so two writes to one new cluster cannot lose each other) and the
//! metadata part of a flush take it exclusively. A flush with no metadata
//! to write is one `fdatasync`, under no lock.
//!
//! # Hostile images
//!
//! Every length is bounded by the header check (`header.rs`); L1 entries are
//! checked at open (aligned, inside the file, not on the header or a table);
//! an L2 entry is checked when used: a cluster (or compressed data) past
//! the end of the file or on metadata, compressed data that does not
//! inflate to a cluster, or reserved bits set answer that request with
//! EIO and leaves the rest of the disk working. Backing file names are
//! resolved by a [`Root`]: inside the state directory only plain `NAME.img`
//! names of that directory; for an imported file, names (relative or absolute)
//! that lead, symbolic links followed, to a file inside its own directory. A chain deeper than [`MAX_CHAIN`] or that loops is refused.

pub mod alloc;
pub mod create;
pub mod header;
pub mod image;
pub mod online;
pub mod table;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use image::{Image, Run};

/// Deepest backing chain accepted.
pub const MAX_CHAIN: usize = 16;

/// Errors of qcow2 images.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// I/O on the image file failed
    #[error("I/O on the image file failed")]
    Io(#[from] std::io::Error),
    /// not a qcow2 image
    #[error("not a qcow2 image (bad magic)")]
    NotQcow2,
    /// unsupported qcow2 feature
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    /// invalid qcow2 header
    #[error("invalid qcow2 header: {0}")]
    BadHeader(String),
    /// corrupt qcow2 metadata
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// backing file refused
    #[error("backing file refused: {0}")]
    Backing(String),
    /// the image is full
    #[error("the image's refcount table is full")]
    Full,
    /// the layer is read-only
    #[error("the image is read-only")]
    ReadOnly,
    /// a zero write that would not be fast
    #[error("zeroing would not be faster than writing")]
    NotFast,
}

impl Qcow2Error {
    /// The errno this failure answers an NBD request with.
    pub fn errno(&self) -> i32 {
        match self {
            Qcow2Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Qcow2Error::Full => libc::ENOSPC,
            Qcow2Error::ReadOnly => libc::EPERM,
            Qcow2Error::NotFast => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}

/// Where backing file names may lead (see the module docs).
#[derive(Debug, Clone)]
pub struct Root {
    /// The directory, canonical.
    dir: PathBuf,
    /// Only plain `NAME.img` names (the state directory's `disks/`).
    disks: bool,
}

impl Root {
    /// The state directory's `disks/`: backing names are `NAME.img` there.
    pub fn disks(dir: &Path) -> Result<Root, Qcow2Error> {
        Ok(Root {
            dir: dir.canonicalize()?,
            disks: true,
        })
    }

    /// The directory of an imported file: relative names inside it.
    pub fn import_dir(dir: &Path) -> Result<Root, Qcow2Error> {
        Ok(Root {
            dir: dir.canonicalize()?,
            disks: false,
        })
    }

    /// The file a backing name stands for, or why it is refused.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, Qcow2Error> {
        let refuse = |why: &str| Err(Qcow2Error::Backing(format!("{name:?}: {why}")));
        if self.disks {
            let stem = name.strip_suffix(".img").unwrap_or("");
            if crate::config::check_disk_name(stem).is_err() {
                return refuse("a backing file in the state directory is a disk's NAME.img");
            }
        }
        let p = Path::new(name);
        if self.disks
            && p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return refuse("only plain names in the state directory are followed");
        }
        let full = match self.dir.join(p).canonicalize() {
            Ok(f) => f,
            Err(e) => return refuse(&format!("cannot open it: {e}")),
        };
        if !full.starts_with(&self.dir) || full.parent().is_none() {
            return refuse("it leads outside the image's directory");
        }
        Ok(full)
    }
}

/// A layer under an image: a qcow2 image or a raw file.
#[derive(Debug)]
pub enum Layer {
    /// A qcow2 image (with its own chain).
    Qcow2(Box<Image>),
    /// A raw file.
    Raw {
        /// The file, read-only.
        file: File,
        /// Its size.
        size: u64,
        /// Its path.
        path: PathBuf,
    },
}

impl Layer {
    /// Opens `path` read-only as `format` ("qcow2", "raw", or `None`: by its
    /// magic), with its chain; `seen` holds the files above it.
    pub fn open(
        path: &Path,
        format: Option<&str>,
        root: &Root,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Layer, Qcow2Error> {
        let canon = path.canonicalize()?;
        if seen.contains(&canon) {
            return Err(Qcow2Error::Backing(format!(
                "the backing chain loops at {}",
                path.display()
            )));
        }
        if seen.len() >= MAX_CHAIN {
            return Err(Qcow2Error::Backing(format!(
                "the backing chain is deeper than {MAX_CHAIN}"
            )));
        }
        seen.push(canon);
        let file = File::open(path)?;
        let qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(f) => return Err(Qcow2Error::Backing(format!("unknown backing format {f:?}"))),
            None => {
                let mut magic = [0u8; 4];
                table::read_full(&file, &mut magic, 0)?;
                u32::from_be_bytes(magic) == header::MAGIC
            }
        };
        if qcow2 {
            Ok(Layer::Qcow2(Box::new(Image::open_with(
                file, path, false, root, seen,
            )?)))
        } else {
            let size = file.metadata()?.len();
            Ok(Layer::Raw {
                file,
                size,
                path: path.to_path_buf(),
            })
        }
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(i) => i.size(),
            Layer::Raw { size, .. } => *size,
        }
    }

    /// The files of this layer and those under it, top first.
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            Layer::Qcow2(i) => i.chain_paths(),
            Layer::Raw { path, .. } => vec![path.clone()],
        }
    }

    /// Fills `buf` from guest `offset`; past the layer's end reads zeroes.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        match self {
            Layer::Qcow2(i) => i.read(offset, &mut buf[..inside]),
            Layer::Raw { file, .. } => Ok(table::read_full(file, &mut buf[..inside], offset)?),
        }
    }

    /// Where the `len` bytes at `offset` lie as one run of data in one file
    /// of this layer's chain (see [`Image::locate`]); a raw file's holes and
    /// its end are not data.
    pub fn locate(&self, offset: u64, len: u64) -> Result<Option<(usize, &File, u64)>, Qcow2Error> {
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Ok(None);
        }
        match self {
            Layer::Qcow2(i) => i.locate(offset, len),
            Layer::Raw { file, .. } => {
                Ok((self.status(offset, len)? == (len, Run::Data)).then_some((0, file, offset)))
            }
        }
    }

    /// The first run at `offset` (at most `len` bytes): its length and kind.
    pub fn status(&self, offset: u64, len: u64) -> Result<(u64, Run), Qcow2Error> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Ok((len, Run::Zero));
        }
        let len = len.min(size - offset);
        match self {
            Layer::Qcow2(i) => i.status(offset, len),
            Layer::Raw { file, .. } => {
                let end = offset + len;
                Ok(match crate::sys::seek(file, offset, true)? {
                    None => (len, Run::Zero),
                    Some(d) if d > offset => (d.min(end) - offset, Run::Zero),
                    Some(_) => {
                        let h = crate::sys::seek(file, offset, false)?.unwrap_or(end);
                        (h.clamp(offset + 1, end) - offset, Run::Data)
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
