//! One qcow2 image: open (with its chain), cluster lookup through the L2
//! cache, reads, writes, zeroing and discard; the allocation and the flush
//! order are in `alloc.rs` (see the module docs of `qcow2`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::header::{incompat, Header};
use super::table::{self, Cluster, COPIED, ZERO};
use super::{Layer, Qcow2Error, Root};

/// Clean L2 tables kept in the cache, in bytes.
pub const L2_CACHE_BYTES: u64 = 32 << 20;
/// Dirty tables (L2 and refcount blocks) after which a write flushes them.
pub const DIRTY_MAX: u64 = 16 << 20;

/// What a run of guest bytes reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Data held by some layer.
    Data,
    /// Zeroes (a zero cluster, or no layer holds it).
    Zero,
}

/// A cached L2 table.
#[derive(Debug)]
pub(super) struct L2 {
    pub entries: Vec<u64>,
    pub dirty: bool,
}

/// The image's tables (see the concurrency notes of `qcow2`).
#[derive(Debug)]
pub(super) struct Meta {
    pub l1: Vec<u64>,
    /// Where the L1 table is (it moves when the image grows past it).
    pub l1_offset: u64,
    pub l1_dirty: BTreeSet<usize>,
    pub l2: HashMap<u64, L2>,
    pub reftable: Vec<u64>,
    /// Where the refcount table is (it moves when it grows: `alloc.rs`).
    pub reftable_offset: u64,
    pub reftable_dirty: BTreeSet<usize>,
    /// Refcount blocks loaded, by offset: counts and dirty flag.
    pub refblocks: HashMap<u64, (Vec<u16>, bool)>,
    /// Tables allocated since the last flush (written whole in phase 1).
    pub fresh: HashSet<u64>,
    /// Host clusters one reference fewer names (a data cluster, each
    /// cluster a compressed one lies in, a moved L1 table's).
    pub freed: Vec<u64>,
    /// Where the next cluster is allocated.
    pub end: u64,
    /// Host clusters holding metadata (header, tables).
    pub metadata: HashSet<u64>,
}

/// One open qcow2 image.
#[derive(Debug)]
pub struct Image {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) hdr: Header,
    pub(super) cs: u64,
    pub(super) writable: bool,
    pub(super) backing: Option<Box<Layer>>,
    /// Virtual size (grows: `online.rs`).
    pub(super) size: AtomicU64,
    /// The chain was copied into this image and its header names no
    /// backing file any more (`online.rs`): the backing is not read.
    pub(super) detached: AtomicBool,
    pub(super) meta: RwLock<Meta>,
}

impl Image {
    /// Opens the image at `path` (read-only unless `writable`) and its chain,
    /// whose backing names `root` resolves.
    pub fn open(path: &Path, writable: bool, root: &Root) -> Result<Image, Qcow2Error> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Image::open_with(file, path, writable, root, &mut Vec::new())
    }

    pub(super) fn open_with(
        file: File,
        path: &Path,
        writable: bool,
        root: &Root,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Image, Qcow2Error> {
        if seen.is_empty() {
            seen.push(path.canonicalize()?);
        }
        let (hdr, file_len) = Header::read_from(&file)?;
        let cs = hdr.cluster_size();
        if writable {
            if hdr.incompatible & incompat::DIRTY != 0 {
                return Err(Qcow2Error::Unsupported(
                    "a dirty image (lazy refcounts) is opened read-only only".into(),
                ));
            }
            if hdr.version != 3 || hdr.nb_snapshots != 0 || hdr.autoclear != 0 {
                return Err(Qcow2Error::Unsupported(
                    "only images without internal snapshots or autoclear features are written"
                        .into(),
                ));
            }
        }
        let l1 = table::read_u64s(&file, hdr.l1_offset, hdr.l1_size as usize)?;
        let rt_len = (hdr.reftable_clusters as u64 * cs / 8) as usize;
        let reftable = table::read_u64s(&file, hdr.reftable_offset, rt_len)?;
        let end = file_len.next_multiple_of(cs);
        let mut metadata: HashSet<u64> = HashSet::from([0]);
        let tables = [
            (hdr.l1_offset, hdr.l1_size as u64 * 8),
            (hdr.reftable_offset, hdr.reftable_clusters as u64 * cs),
        ];
        for (off, len) in tables {
            metadata.extend((0..len.div_ceil(cs)).map(|i| off + i * cs));
        }
        let mut check = |e: u64, what: &str| -> Result<(), Qcow2Error> {
            if let Some(o) = table::decode_l1(e, cs)? {
                if o >= end || metadata.contains(&o) {
                    return Err(Qcow2Error::Corrupt(format!(
                        "{what} at {o} is past the end of the file or on the header or a table"
                    )));
                }
                metadata.insert(o);
            }
            Ok(())
        };
        for &e in &l1 {
            check(e, "an L2 table")?;
        }
        for &e in &reftable {
            check(e & !COPIED, "a refcount block")?;
        }
        let backing = match &hdr.backing {
            None => None,
            Some(name) => {
                let p = root.resolve(name)?;
                Some(Box::new(Layer::open(
                    &p,
                    hdr.backing_format.as_deref(),
                    root,
                    seen,
                )?))
            }
        };
        let l1_offset = hdr.l1_offset;
        let reftable_offset = hdr.reftable_offset;
        let img = Image {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(hdr.size),
            detached: AtomicBool::new(false),
            hdr,
            cs,
            writable,
            backing,
            meta: RwLock::new(Meta {
                l1,
                l1_offset,
                l1_dirty: BTreeSet::new(),
                l2: HashMap::new(),
                reftable,
                reftable_offset,
                reftable_dirty: BTreeSet::new(),
                refblocks: HashMap::new(),
                fresh: HashSet::new(),
                freed: Vec::new(),
                end,
                metadata,
            }),
        };
        if writable {
            img.check_and_repair()?;
        }
        Ok(img)
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }
    /// The header.
    pub fn header(&self) -> &Header {
        &self.hdr
    }
    /// The backing layer (none once the chain was copied in).
    pub fn backing(&self) -> Option<&Layer> {
        match self.detached.load(Ordering::Acquire) {
            true => None,
            false => self.backing.as_deref(),
        }
    }
    /// The image's file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// This image's file and its chain's, top first.
    pub fn chain_paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.path.clone()];
        if let Some(b) = self.backing() {
            v.extend(b.paths());
        }
        v
    }

    pub(super) fn read_meta(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }
    pub(super) fn write_meta(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The L2 entry of guest cluster `gc` if its table is cached (or absent):
    /// `Some(entry)`; `None` if the table must be loaded.
    fn cached_entry(&self, m: &Meta, gc: u64) -> Result<Option<u64>, Qcow2Error> {
        let per = self.cs / 8;
        let l1i = (gc / per) as usize;
        let Some(&l1e) = m.l1.get(l1i) else {
            return Err(Qcow2Error::Corrupt(
                "guest cluster beyond the L1 table".into(),
            ));
        };
        match table::decode_l1(l1e, self.cs)? {
            None => Ok(Some(0)),
            Some(off) => Ok(m.l2.get(&off).map(|t| t.entries[(gc % per) as usize])),
        }
    }

    /// Loads the L2 table of guest cluster `gc` into the cache (write lock
    /// held), evicting clean tables over [`L2_CACHE_BYTES`]; its offset.
    pub(super) fn load_l2(&self, m: &mut Meta, gc: u64) -> Result<Option<u64>, Qcow2Error> {
        let per = self.cs / 8;
        let l1i = (gc / per) as usize;
        let Some(off) = table::decode_l1(m.l1[l1i], self.cs)? else {
            return Ok(None);
        };
        if !m.l2.contains_key(&off) {
            if (m.l2.len() as u64 + 1) * self.cs > L2_CACHE_BYTES {
                let clean: Vec<u64> =
                    m.l2.iter()
                        .filter(|(_, t)| !t.dirty)
                        .map(|(o, _)| *o)
                        .take(m.l2.len() / 2 + 1)
                        .collect();
                for o in clean {
                    m.l2.remove(&o);
                }
            }
            let entries = if m.fresh.contains(&off) {
                vec![0; per as usize]
            } else {
                table::read_u64s(&self.file, off, per as usize)?
            };
            m.l2.insert(
                off,
                L2 {
                    entries,
                    dirty: false,
                },
            );
        }
        Ok(Some(off))
    }

    /// The decoded entry of guest cluster `gc`, checked against the file.
    pub(super) fn lookup(&self, gc: u64) -> Result<Cluster, Qcow2Error> {
        {
            let m = self.read_meta();
            if let Some(e) = self.cached_entry(&m, gc)? {
                return self.checked(&m, e);
            }
        }
        let mut m = self.write_meta();
        let entry = match self.load_l2(&mut m, gc)? {
            None => 0,
            Some(off) => m.l2[&off].entries[(gc % (self.cs / 8)) as usize],
        };
        self.checked(&m, entry)
    }

    /// Decodes an L2 entry and refuses data clusters past the end of the
    /// file or on metadata.
    pub(super) fn checked(&self, m: &Meta, e: u64) -> Result<Cluster, Qcow2Error> {
        let c = table::decode_l2(e, self.cs)?;
        match c {
            Cluster::Data(o) | Cluster::Zero(Some(o)) if o >= m.end || m.metadata.contains(&o) => {
                Err(Qcow2Error::Corrupt(format!(
                    "a data cluster at {o} is past the end of the file or on metadata"
                )))
            }
            Cluster::Compressed { off, len }
                if off >= m.end
                    || table::compressed_clusters(off, len, self.cs)
                        .any(|c| m.metadata.contains(&c)) =>
            {
                Err(Qcow2Error::Corrupt(format!(
                    "a compressed cluster at {off} is past the end of the file or on metadata"
                )))
            }
            c => Ok(c),
        }
    }

    /// The cluster holding guest byte `pos`, and how many bytes from `pos`
    /// (at most `max`) read the same way: the following clusters while they
    /// are data at the next host cluster (one pread for the run), or zero,
    /// or unallocated (one read of the backing file; an L1 entry with no L2
    /// table is a whole table's range at once); a compressed cluster alone.
    /// The run ends at an L2 table not in the cache (the next
    /// [`Image::lookup`] loads it).
    fn extent(&self, pos: u64, max: u64) -> Result<(Cluster, u64), Qcow2Error> {
        let cs = self.cs;
        let first = self.lookup(pos / cs)?;
        if matches!(first, Cluster::Compressed { .. }) {
            return Ok((first, (cs - pos % cs).min(max)));
        }
        let m = self.read_meta();
        let per = cs / 8;
        let mut n = 0;
        while n < max {
            let at = pos + n;
            let gc = at / cs;
            if n > 0 {
                let Some(e) = self.cached_entry(&m, gc)? else {
                    break;
                };
                let same = match (first, self.checked(&m, e)?) {
                    // `at` starts a cluster: the run's host cluster there
                    // is `a + pos % cs + n`.
                    (Cluster::Data(a), Cluster::Data(b)) => b == a + pos % cs + n,
                    (Cluster::Zero(_), Cluster::Zero(_)) => true,
                    (Cluster::Unallocated, Cluster::Unallocated) => true,
                    _ => false,
                };
                if !same {
                    break;
                }
            }
            let no_table = first == Cluster::Unallocated
                && m.l1
                    .get((gc / per) as usize)
                    .is_some_and(|&e| e & table::OFFSET_MASK == 0);
            let step = match no_table {
                true => (gc / per + 1) * per * cs - at,
                false => cs - at % cs,
            };
            n += step.min(max - n);
        }
        Ok((first, n))
    }

    /// Where the `len` guest bytes at `offset` (inside the image) lie as one
    /// run of data in one file of the chain: its depth (0: this image), the
    /// file and the offset in it; `None` for zeroes, compressed data, or a
    /// range that is not one run.
    pub fn locate(&self, offset: u64, len: u64) -> Result<Option<(usize, &File, u64)>, Qcow2Error> {
        let (c, n) = self.extent(offset, len)?;
        if n < len {
            return Ok(None);
        }
        Ok(match (c, self.backing()) {
            (Cluster::Data(o), _) => Some((0, &self.file, o + offset % self.cs)),
            (Cluster::Unallocated, Some(b)) => {
                b.locate(offset, len)?.map(|(d, f, o)| (d + 1, f, o))
            }
            _ => None,
        })
    }

    /// Fills `buf` from guest `offset` (inside the image) through the chain,
    /// a run of clusters ([`Image::extent`]) at a time.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_c = pos % self.cs;
            let (c, n) = self.extent(pos, (buf.len() - done) as u64)?;
            let n = n as usize;
            let piece = &mut buf[done..done + n];
            match c {
                Cluster::Data(o) => table::read_full(&self.file, piece, o + in_c)?,
                Cluster::Zero(_) => piece.fill(0),
                Cluster::Unallocated => match self.backing() {
                    Some(b) => b.read(pos, piece)?,
                    None => piece.fill(0),
                },
                Cluster::Compressed { off, len } => {
                    let whole = self.inflate(off, len)?;
                    piece.copy_from_slice(&whole[in_c as usize..in_c as usize + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The first run at `offset`, at most `len` bytes (inside the image).
    pub fn status(&self, offset: u64, len: u64) -> Result<(u64, Run), Qcow2Error> {
        let mut run: Option<Run> = None;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (c, n) = self.extent(pos, len - done)?;
            let (n, kind) = match c {
                Cluster::Data(_) | Cluster::Compressed { .. } => (n, Run::Data),
                Cluster::Zero(_) => (n, Run::Zero),
                Cluster::Unallocated => match self.backing() {
                    Some(b) => b.status(pos, n)?,
                    None => (n, Run::Zero),
                },
            };
            match run {
                None => run = Some(kind),
                Some(k) if k != kind => break,
                _ => {}
            }
            done += n;
            if n == 0 {
                break;
            }
        }
        Ok((done.max(1).min(len), run.unwrap_or(Run::Zero)))
    }

    /// Writes `data` at guest `offset` (inside the image).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        if !self.writable {
            return Err(Qcow2Error::ReadOnly);
        }
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_c = pos % self.cs;
            let n = ((self.cs - in_c) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            let gc = pos / self.cs;
            match self.lookup(gc)? {
                Cluster::Data(o) => self.file.write_all_at(piece, o + in_c)?,
                _ => self.write_new(gc, in_c as usize, piece)?,
            }
            done += n;
        }
        self.flush_if_dirty_over()
    }

    /// Writes part of a guest cluster not held as data (write lock held
    /// across: see the module docs): a new cluster with the rest copied from
    /// what the guest cluster read as (the chain, or a compressed cluster
    /// inflated); a host cluster the entry named is freed.
    fn write_new(&self, gc: u64, at: usize, piece: &[u8]) -> Result<(), Qcow2Error> {
        let mut m = self.write_meta();
        let l2 = self.load_l2(&mut m, gc)?;
        let entry = l2.map_or(0, |o| m.l2[&o].entries[(gc % (self.cs / 8)) as usize]);
        let current = self.checked(&m, entry)?;
        if let Cluster::Data(o) = current {
            // Another write allocated it meanwhile.
            self.file.write_all_at(piece, o + at as u64)?;
            return Ok(());
        }
        let mut buf = vec![0u8; self.cs as usize];
        if piece.len() < buf.len() {
            match (current, self.backing()) {
                (Cluster::Unallocated, Some(b)) => b.read(gc * self.cs, &mut buf)?,
                (Cluster::Compressed { off, len }, _) => buf = self.inflate(off, len)?,
                _ => {}
            }
        }
        buf[at..at + piece.len()].copy_from_slice(piece);
        let host = self.alloc_cluster(&mut m)?;
        self.file.write_all_at(&buf, host)?;
        self.set_l2(&mut m, gc, host | COPIED)?;
        self.free_entry(&mut m, current);
        Ok(())
    }

    /// Queues the host clusters an old entry named for freeing at the
    /// next flush (after its new entry is durable).
    pub(super) fn free_entry(&self, m: &mut Meta, old: Cluster) {
        match old {
            Cluster::Data(o) | Cluster::Zero(Some(o)) => m.freed.push(o),
            Cluster::Compressed { off, len } => {
                m.freed
                    .extend(table::compressed_clusters(off, len, self.cs));
            }
            _ => {}
        }
    }

    /// One compressed cluster, inflated (raw deflate, as QEMU writes it).
    /// Data that does not inflate to exactly a cluster is corrupt (EIO).
    fn inflate(&self, off: u64, len: u64) -> Result<Vec<u8>, Qcow2Error> {
        let mut input = vec![0u8; len as usize];
        table::read_full(&self.file, &mut input, off)?;
        let mut out = vec![0u8; self.cs as usize];
        let mut z = flate2::Decompress::new(false);
        let res = z.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
        if res.is_err() || z.total_out() != self.cs {
            return Err(Qcow2Error::Corrupt(format!(
                "the compressed cluster at {off} does not inflate to a cluster"
            )));
        }
        Ok(out)
    }

    /// Zeroes `[offset, offset + len)`: whole clusters become zero clusters
    /// (their host clusters freed); partial ones are written with zeroes
    /// unless they read as zeroes already, which `fast` forbids (NotFast).
    /// A discard (`discard`) leaves partial clusters as they are.
    pub fn zero(&self, offset: u64, len: u64, fast: bool, discard: bool) -> Result<(), Qcow2Error> {
        if !self.writable {
            return Err(Qcow2Error::ReadOnly);
        }
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / self.cs;
            let in_c = pos % self.cs;
            let n = (self.cs - in_c).min(end - pos);
            if n == self.cs {
                let mut m = self.write_meta();
                let idx = (gc % (self.cs / 8)) as usize;
                let old = match self.load_l2(&mut m, gc)? {
                    Some(off) => m.l2[&off].entries[idx],
                    None => 0,
                };
                let old_cluster = self.checked(&m, old)?;
                self.free_entry(&mut m, old_cluster);
                // Already zero: a zero cluster, or nothing under an image
                // without a backing file (no table is allocated for it).
                let reads_zero = old == ZERO
                    || (old_cluster == Cluster::Unallocated && self.backing().is_none());
                if !reads_zero {
                    self.set_l2(&mut m, gc, ZERO)?;
                }
            } else if !discard && self.status(pos, n)?.1 == Run::Data {
                if fast {
                    return Err(Qcow2Error::NotFast);
                }
                self.write(pos, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        self.flush_if_dirty_over()
    }
}
