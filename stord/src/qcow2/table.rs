//! Table entries of a qcow2 image: L1 and L2 entries decoded into checked
//! values, and the little helpers that move tables between the file and
//! memory (big-endian 8-byte entries, 16-bit refcounts).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Qcow2Error;

/// Bits 9..=55: a host offset (L1 and standard L2 entries).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount exactly 1: the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// L2: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;

/// What an L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not in this image: read from the backing file (zeroes without one).
    Unallocated,
    /// Reads as zeroes (a host cluster may still be kept: `Some`).
    Zero(Option<u64>),
    /// Data at this host offset.
    Data(u64),
    /// Compressed: `len` bytes of raw deflate at host byte `off` (not
    /// aligned), inflating to one cluster. `len` is at most two clusters.
    Compressed {
        /// Host byte offset.
        off: u64,
        /// Bytes the descriptor covers (to the end of its last sector).
        len: u64,
    },
}

/// The host clusters a compressed cluster's bytes lie in.
pub fn compressed_clusters(off: u64, len: u64, cs: u64) -> impl Iterator<Item = u64> {
    (off / cs..=(off + len.max(1) - 1) / cs).map(move |c| c * cs)
}

/// Decodes an L2 entry of an image with clusters of `cs` bytes.
pub fn decode_l2(e: u64, cs: u64) -> Result<Cluster, Qcow2Error> {
    if e & COMPRESSED != 0 {
        // Bits 0..x: the offset; x..62: sectors beyond the first
        // (x = 62 - (cluster_bits - 8), so at most 2 clusters of them).
        let x = 70 - cs.trailing_zeros();
        let off = e & ((1u64 << x) - 1);
        if e & COPIED != 0 || off >> 56 != 0 {
            return Err(Qcow2Error::Corrupt(format!(
                "compressed L2 entry {e:#x} has reserved bits set"
            )));
        }
        let sectors = ((e & !(COPIED | COMPRESSED)) >> x) + 1;
        let len = sectors * 512 - (off & 511);
        return Ok(Cluster::Compressed { off, len });
    }
    if e & !(OFFSET_MASK | COPIED | ZERO) != 0 {
        return Err(Qcow2Error::Corrupt(format!(
            "L2 entry {e:#x} has reserved bits set"
        )));
    }
    let off = e & OFFSET_MASK;
    if !off.is_multiple_of(cs) {
        return Err(Qcow2Error::Corrupt(format!(
            "L2 entry {e:#x}: cluster offset not aligned"
        )));
    }
    Ok(match (e & ZERO != 0, off) {
        (true, 0) => Cluster::Zero(None),
        (true, o) => Cluster::Zero(Some(o)),
        (false, 0) => Cluster::Unallocated,
        (false, o) => Cluster::Data(o),
    })
}

/// Decodes an L1 entry: the L2 table's offset, or `None`.
pub fn decode_l1(e: u64, cs: u64) -> Result<Option<u64>, Qcow2Error> {
    let off = e & OFFSET_MASK;
    if e & !(OFFSET_MASK | COPIED) != 0 || !off.is_multiple_of(cs) {
        return Err(Qcow2Error::Corrupt(format!(
            "L1 entry {e:#x}: reserved bits set or L2 table not aligned"
        )));
    }
    Ok((off != 0).then_some(off))
}

/// Reads `n` big-endian u64 entries at `offset`.
pub fn read_u64s(file: &File, offset: u64, n: usize) -> std::io::Result<Vec<u64>> {
    let mut raw = vec![0u8; n * 8];
    read_full(file, &mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Reads `n` big-endian u16 refcounts at `offset`.
pub fn read_u16s(file: &File, offset: u64, n: usize) -> std::io::Result<Vec<u16>> {
    let mut raw = vec![0u8; n * 2];
    read_full(file, &mut raw, offset)?;
    Ok(raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

/// Encodes u64 entries big-endian.
pub fn encode_u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Encodes u16 refcounts big-endian.
pub fn encode_u16s(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Fills `buf` from `offset`; bytes past the end of the file read as zeroes
/// (a qcow2 file may end inside its last cluster).
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_and_refuse_reserved_bits() {
        let cs = 1 << 16;
        assert_eq!(decode_l2(0, cs).unwrap(), Cluster::Unallocated);
        assert_eq!(decode_l2(1, cs).unwrap(), Cluster::Zero(None));
        assert_eq!(
            decode_l2(COPIED | 0x30000, cs).unwrap(),
            Cluster::Data(0x30000)
        );
        assert_eq!(
            decode_l2(COPIED | 0x30001, cs).unwrap(),
            Cluster::Zero(Some(0x30000))
        );
        // 64 KiB clusters: x = 54; 3 more sectors, at byte 0x10005.
        assert_eq!(
            decode_l2(COMPRESSED | 3 << 54 | 0x10005, cs).unwrap(),
            Cluster::Compressed {
                off: 0x10005,
                len: 4 * 512 - 5
            }
        );
        assert!(decode_l2(COMPRESSED | COPIED | 5, cs).is_err(), "copied");
        // 512-byte clusters: x = 61, offset bits above 55 are reserved.
        assert!(decode_l2(COMPRESSED | 1 << 57, 512).is_err());
        assert_eq!(
            compressed_clusters(0x1fff0, 0x20, cs).collect::<Vec<_>>(),
            vec![0x10000, 0x20000]
        );
        assert!(decode_l2(0x30200, cs).is_err(), "unaligned");
        assert!(decode_l2(1 << 60, cs).is_err(), "reserved");
        assert!(decode_l2(2, cs).is_err(), "reserved");
        assert_eq!(decode_l1(COPIED | 0x50000, cs).unwrap(), Some(0x50000));
        assert_eq!(decode_l1(0, cs).unwrap(), None);
        assert!(decode_l1(1, cs).is_err());
        assert!(decode_l1(0x50200, cs).is_err());
    }
}
