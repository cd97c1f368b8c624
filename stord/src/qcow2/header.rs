//! The qcow2 header: parsed once, every field bounded, into a checked
//! [`Header`]; and the header stord writes for the images it creates.
//!
//! What is refused (each with its own [`Qcow2Error`]): a bad magic, versions
//! other than 2 and 3, encryption, a cluster size outside 512 B..2 MiB, a
//! refcount width other than 16 bits, a virtual size above
//! [`MAX_VIRTUAL_SIZE`], an L1 table too small for the size or above
//! [`MAX_L1_BYTES`], a refcount table above [`MAX_REFTABLE_BYTES`], tables
//! not cluster-aligned, in the header's cluster or past the end of the file,
//! incompatible features other than `dirty` (compression type, external data
//! file, extended L2 entries, `corrupt`), a backing file name longer than
//! [`MAX_BACKING_NAME`] or outside the header cluster, and header extensions
//! that run past the header cluster.
//!
//! `dirty` (lazy refcounts) is accepted only for reading: the refcounts of such
//! an image may be short, so it is never written (stord never sets it).

use super::Qcow2Error;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size accepted (bits).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size accepted (bits): 2 MiB, as QEMU.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Cluster size of the images stord creates: 64 KiB, QEMU's default.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
/// Largest virtual size accepted: 2^60 bytes, stord's largest disk.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 60;
/// Largest L1 table accepted (QEMU's QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted (QEMU's QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name accepted (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Header length of a version 3 header stord writes.
pub const V3_HEADER_LEN: u32 = 104;
/// Header extension: the backing file's format.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// The image was found corrupt.
    pub const CORRUPT: u64 = 1 << 1;
}

/// A checked qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries of the L1 table.
    pub l1_size: u32,
    /// Where the L1 table starts.
    pub l1_offset: u64,
    /// Where the refcount table starts.
    pub reftable_offset: u64,
    /// Clusters of the refcount table.
    pub reftable_clusters: u32,
    /// Internal snapshots (their tables are never read).
    pub nb_snapshots: u32,
    /// Incompatible features (only `dirty` may be set).
    pub incompatible: u64,
    /// Autoclear features.
    pub autoclear: u64,
    /// The backing file's name as stored, if any.
    pub backing: Option<String>,
    /// The backing file's format from its header extension, if given.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of one L2 table (8 bytes each).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Parses and checks the first cluster of an image (`buf`: at least the
    /// first 512 bytes, at most one cluster, more is ignored) of a file of
    /// `file_len` bytes.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
        let bad = |what: &str| Err(Qcow2Error::BadHeader(what.to_string()));
        if buf.len() < 72 || be32(buf, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!("version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return bad(&format!(
                "cluster_bits {cluster_bits}, expected {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}"
            ));
        }
        let cs = 1u64 << cluster_bits;
        if buf.len() < cs.min(512) as usize {
            return bad("the header cluster is cut short");
        }
        let buf = &buf[..buf.len().min(cs as usize)];
        let size = be64(buf, 24);
        if size > MAX_VIRTUAL_SIZE {
            return bad(&format!("virtual size {size} above {MAX_VIRTUAL_SIZE}"));
        }
        if be32(buf, 32) != 0 {
            return Err(Qcow2Error::Unsupported("encryption".into()));
        }
        let (incompatible, autoclear, header_len) = if version == 3 {
            if buf.len() < 104 {
                return bad("a version 3 header is 104 bytes at least");
            }
            let refcount_order = be32(buf, 96);
            if refcount_order != 4 {
                return Err(Qcow2Error::Unsupported(format!(
                    "refcount_order {refcount_order} (only 16-bit refcounts, order 4)"
                )));
            }
            let hl = be32(buf, 100) as u64;
            if hl < 104 || hl > buf.len() as u64 || !hl.is_multiple_of(8) {
                return bad(&format!("header_length {hl}"));
            }
            (be64(buf, 72), be64(buf, 88), hl)
        } else {
            (0, 0, 72)
        };
        let known = incompat::DIRTY | incompat::CORRUPT;
        if incompatible & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible features {:#x} (compression type, external data file or extended L2 entries)",
                incompatible & !known
            )));
        }
        if incompatible & incompat::CORRUPT != 0 {
            return Err(Qcow2Error::Corrupt(
                "the image is marked corrupt; repair it with `qemu-img check -r all`".into(),
            ));
        }
        let l2_entries = cs / 8;
        let l1_size = be32(buf, 36);
        let l1_needed = size.div_ceil(cs * l2_entries);
        if (l1_size as u64) < l1_needed {
            return bad(&format!(
                "l1_size {l1_size} too small for {size} bytes (needs {l1_needed})"
            ));
        }
        if l1_size as u64 * 8 > MAX_L1_BYTES {
            return bad(&format!("l1_size {l1_size} above {MAX_L1_BYTES} bytes"));
        }
        let l1_offset = be64(buf, 40);
        check_table("L1 table", l1_offset, l1_size as u64 * 8, cs, file_len)?;
        let reftable_offset = be64(buf, 48);
        let reftable_clusters = be32(buf, 56);
        let rt_bytes = reftable_clusters as u64 * cs;
        if reftable_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return bad(&format!(
                "refcount_table_clusters {reftable_clusters}, expected 1 to {} clusters",
                MAX_REFTABLE_BYTES / cs
            ));
        }
        check_table("refcount table", reftable_offset, rt_bytes, cs, file_len)?;
        let nb_snapshots = be32(buf, 60);
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        let backing = if backing_offset == 0 {
            None
        } else {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return bad(&format!(
                    "backing file name of {backing_len} bytes, expected 1 to {MAX_BACKING_NAME}"
                ));
            }
            let end = backing_offset.checked_add(backing_len as u64);
            if backing_offset < header_len || !matches!(end, Some(e) if e <= buf.len() as u64) {
                return bad("the backing file name is not inside the header cluster");
            }
            let raw = &buf[backing_offset as usize..(backing_offset + backing_len as u64) as usize];
            match std::str::from_utf8(raw) {
                Ok(s) if !s.contains('\0') => Some(s.to_string()),
                _ => return bad("the backing file name is not UTF-8 text"),
            }
        };
        let backing_format = parse_extensions(buf, header_len as usize)?;
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_offset,
            reftable_offset,
            reftable_clusters,
            nb_snapshots,
            incompatible,
            autoclear,
            backing,
            backing_format,
        })
    }

    /// Reads and checks the header of the image `file`; also the file's
    /// length.
    pub fn read_from(file: &std::fs::File) -> Result<(Header, u64), Qcow2Error> {
        let file_len = file.metadata()?.len();
        let mut first = vec![0u8; (1usize << MAX_CLUSTER_BITS).min(file_len as usize)];
        super::table::read_full(file, &mut first, 0)?;
        Ok((Header::parse(&first, file_len)?, file_len))
    }

    /// The header of an image stord creates (version 3, no features),
    /// with its extensions and backing name, in one buffer of at most a
    /// cluster.
    pub fn emit(&self) -> Vec<u8> {
        let mut b = vec![0u8; V3_HEADER_LEN as usize];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_offset);
        put64(&mut b, 48, self.reftable_offset);
        put32(&mut b, 56, self.reftable_clusters);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, V3_HEADER_LEN);
        if let Some(f) = &self.backing_format {
            b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(f.len() as u32).to_be_bytes());
            b.extend_from_slice(f.as_bytes());
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing {
            let at = b.len() as u64;
            put64(&mut b, 8, at);
            put32(&mut b, 16, name.len() as u32);
            b.extend_from_slice(name.as_bytes());
        }
        b
    }
}

/// Checks that a table of `len` bytes at `offset` is cluster-aligned, past
/// the header cluster and inside the file.
fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    if len == 0 {
        return Ok(());
    }
    let end = offset.checked_add(len);
    if !offset.is_multiple_of(cs) || offset < cs || !matches!(end, Some(e) if e <= file_len) {
        return Err(Qcow2Error::BadHeader(format!(
            "{what} at {offset} ({len} bytes): not cluster-aligned, in the header cluster or past the end of the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

/// Walks the header extensions after the header; returns the backing format.
fn parse_extensions(buf: &[u8], mut at: usize) -> Result<Option<String>, Qcow2Error> {
    let mut format = None;
    // At most one extension per 8 bytes of the cluster: the walk ends.
    loop {
        if at + 8 > buf.len() {
            return Err(Qcow2Error::BadHeader(
                "header extensions run past the header cluster".into(),
            ));
        }
        let kind = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        at += 8;
        if kind == 0 {
            return Ok(format);
        }
        let padded = len.next_multiple_of(8);
        if padded > buf.len() - at {
            return Err(Qcow2Error::BadHeader(format!(
                "header extension {kind:#x} of {len} bytes runs past the header cluster"
            )));
        }
        if kind == EXT_BACKING_FORMAT {
            match std::str::from_utf8(&buf[at..at + len]) {
                Ok(s) if len <= 16 => format = Some(s.to_string()),
                _ => {
                    return Err(Qcow2Error::BadHeader(
                        "the backing format extension is not a short format name".into(),
                    ))
                }
            }
        }
        at += padded;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_offset: 3 << 16,
            reftable_offset: 1 << 16,
            reftable_clusters: 1,
            nb_snapshots: 0,
            incompatible: 0,
            autoclear: 0,
            backing: Some("base.img".into()),
            backing_format: Some("qcow2".into()),
        }
    }

    #[test]
    fn emit_then_parse_round_trips() {
        let h = sample();
        let mut buf = h.emit();
        buf.resize(1 << 16, 0xa5);
        assert_eq!(Header::parse(&buf, 4 << 16).unwrap(), h);
        let mut plain = Header {
            backing: None,
            backing_format: None,
            ..h
        }
        .emit();
        plain.resize(512, 0);
        assert!(Header::parse(&plain, 4 << 16).unwrap().backing.is_none());
    }

    /// Each hostile field is refused with its own error, never a panic.
    #[test]
    fn hostile_fields_are_refused() {
        let good = {
            let mut b = sample().emit();
            b.resize(1 << 16, 0);
            b
        };
        let with = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            Header::parse(&b, 4 << 16)
        };
        assert!(matches!(with(0, b"XXXX"), Err(Qcow2Error::NotQcow2)));
        assert!(matches!(
            with(4, &4u32.to_be_bytes()),
            Err(Qcow2Error::Unsupported(_))
        ));
        for bits in [0u32, 8, 22, 63, u32::MAX] {
            assert!(
                matches!(with(20, &bits.to_be_bytes()), Err(Qcow2Error::BadHeader(_))),
                "{bits}"
            );
        }
        assert!(with(24, &u64::MAX.to_be_bytes()).is_err(), "huge size");
        assert!(
            with(24, &(1u64 << 40).to_be_bytes()).is_err(),
            "L1 too small"
        );
        assert!(with(32, &1u32.to_be_bytes()).is_err(), "encrypted");
        assert!(with(36, &u32::MAX.to_be_bytes()).is_err(), "huge L1");
        assert!(with(40, &0u64.to_be_bytes()).is_err(), "L1 in the header");
        assert!(
            with(40, &(3u64 << 16 | 8).to_be_bytes()).is_err(),
            "L1 unaligned"
        );
        assert!(
            with(40, &(9u64 << 16).to_be_bytes()).is_err(),
            "L1 past EOF"
        );
        assert!(
            with(40, &(!0xffffu64).to_be_bytes()).is_err(),
            "L1 end overflows"
        );
        assert!(
            with(48, &0u64.to_be_bytes()).is_err(),
            "reftable in the header"
        );
        assert!(with(56, &0u32.to_be_bytes()).is_err(), "no reftable");
        assert!(with(56, &u32::MAX.to_be_bytes()).is_err(), "huge reftable");
        assert!(with(72, &2u64.to_be_bytes()).is_err(), "corrupt");
        assert!(with(72, &4u64.to_be_bytes()).is_err(), "external data file");
        assert!(with(72, &1u64.to_be_bytes()).is_ok(), "dirty is read");
        assert!(with(96, &5u32.to_be_bytes()).is_err(), "refcount order");
        assert!(with(100, &7u32.to_be_bytes()).is_err(), "header length");
        assert!(with(100, &u32::MAX.to_be_bytes()).is_err(), "header length");
        assert!(
            with(16, &u32::MAX.to_be_bytes()).is_err(),
            "backing name length"
        );
        assert!(
            with(8, &(u64::MAX - 2).to_be_bytes()).is_err(),
            "backing name offset"
        );
        assert!(
            with(8, &8u64.to_be_bytes()).is_err(),
            "backing name in the header"
        );
        // An extension whose length runs past the cluster.
        assert!(
            with(108, &u32::MAX.to_be_bytes()).is_err(),
            "extension length"
        );
        assert!(matches!(
            Header::parse(&good[..40], 1 << 20),
            Err(Qcow2Error::NotQcow2)
        ));
    }
}
