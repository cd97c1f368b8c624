//! New images: an empty qcow2 (standalone or an overlay on a backing file,
//! written in a few small writes whatever the size: a linked clone takes
//! milliseconds), and copying what a chain reads as into a new file, qcow2
//! or raw (import, flatten), zeroes skipped.
//!
//! Layout of a new image: the header (cluster 0), the refcount table, one
//! refcount block counting the first clusters, then the L1 table (zeroes,
//! left sparse). The refcount table covers a file of twice the virtual size
//! and 1 GiB more, so it seldom has to grow while the image is served (it
//! grows when it must: `alloc.rs`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::header::{self, Header};
use super::table;
use super::{Layer, Qcow2Error, Run};

/// Creates a new qcow2 image at `path` (which must not exist) of `size`
/// bytes, on `backing` (its stored name and format) if given; mode `mode`.
pub fn create(
    path: &Path,
    size: u64,
    backing: Option<(&str, &str)>,
    mode: u32,
) -> Result<(), Qcow2Error> {
    let covered = size.saturating_mul(2).saturating_add(1 << 30);
    create_with(
        path,
        size,
        backing,
        mode,
        header::DEFAULT_CLUSTER_BITS,
        covered,
    )
}

/// [`create`] with clusters of `1 << bits` bytes and a refcount table that
/// covers a file of `covered` bytes at first (it grows when it must:
/// `alloc.rs`).
pub(super) fn create_with(
    path: &Path,
    size: u64,
    backing: Option<(&str, &str)>,
    mode: u32,
    bits: u32,
    covered: u64,
) -> Result<(), Qcow2Error> {
    let cs = 1u64 << bits;
    let l1_size = size.div_ceil(cs * (cs / 8));
    if l1_size * 8 > header::MAX_L1_BYTES || size > header::MAX_VIRTUAL_SIZE {
        return Err(Qcow2Error::BadHeader(format!(
            "a qcow2 image of {size} bytes needs an L1 table above {} bytes",
            header::MAX_L1_BYTES
        )));
    }
    let rt_entries = covered.div_ceil(cs * (cs / 2)).max(1);
    let rt_clusters = (rt_entries * 8)
        .div_ceil(cs)
        .min(header::MAX_REFTABLE_BYTES / cs);
    let refblock = cs * (1 + rt_clusters);
    let l1_offset = refblock + cs;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let used = 1 + rt_clusters + 1 + l1_clusters;
    if used > cs / 2 {
        return Err(Qcow2Error::BadHeader(format!(
            "a qcow2 image of {size} bytes needs more tables than one refcount block of {cs} bytes counts"
        )));
    }
    let hdr = Header {
        version: 3,
        cluster_bits: bits,
        size,
        l1_size: l1_size as u32,
        l1_offset,
        reftable_offset: cs,
        reftable_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        incompatible: 0,
        autoclear: 0,
        backing: backing.map(|b| b.0.to_string()),
        backing_format: backing.map(|b| b.1.to_string()),
    };
    let head = hdr.emit();
    if head.len() as u64 > cs {
        return Err(Qcow2Error::BadHeader(
            "the header does not fit a cluster".into(),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    let res = (|| -> Result<(), Qcow2Error> {
        file.set_len(used * cs)?;
        file.write_all_at(&head, 0)?;
        file.write_all_at(&refblock.to_be_bytes(), cs)?;
        let counts = vec![1u16; used as usize];
        file.write_all_at(&table::encode_u16s(&counts), refblock)?;
        file.sync_all()?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Largest piece copied at once.
const COPY_CHUNK: u64 = 1 << 20;

/// Copies what `src` reads as into `write`, piece by piece, skipping zeroes
/// (runs the chain calls zero, and data that is all zero bytes).
pub fn copy_from(
    src: &Layer,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), Qcow2Error>,
) -> Result<(), Qcow2Error> {
    let size = src.size();
    let mut pos = 0u64;
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    while pos < size {
        let (n, kind) = src.status(pos, (size - pos).min(COPY_CHUNK))?;
        let n = n.max(1);
        if kind == Run::Data {
            let piece = &mut buf[..n as usize];
            src.read(pos, piece)?;
            if piece.iter().any(|&b| b != 0) {
                write(pos, piece)?;
            }
        }
        pos += n;
    }
    Ok(())
}

/// Copies `src` into a new standalone qcow2 image at `path`.
pub fn copy_to_qcow2(src: &Layer, path: &Path, mode: u32) -> Result<(), Qcow2Error> {
    create(path, src.size(), None, mode)?;
    let res = (|| {
        let root = super::Root::import_dir(path.parent().unwrap_or(Path::new("/")))?;
        let img = super::Image::open(path, true, &root)?;
        copy_from(src, |off, data| img.write(off, data))?;
        img.flush()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Copies `src` into a new sparse raw file at `path`.
pub fn copy_to_raw(src: &Layer, path: &Path, mode: u32) -> Result<(), Qcow2Error> {
    let file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    let res = (|| {
        file.set_len(src.size())?;
        copy_from(src, |off, data| Ok(file.write_all_at(data, off)?))?;
        Ok(file.sync_all()?)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}
