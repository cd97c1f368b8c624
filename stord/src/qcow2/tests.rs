//! Unit tests of the qcow2 engine: chains, allocation, zeroing, the flush
//! order's result after a simulated crash, and hostile tables. (qemu-img
//! judges the images in `integration-tests/tests/stord_qcow2.rs`.)

use super::*;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

fn raw_base(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("base.img");
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&[0x11; 4096], 0).unwrap();
    f.write_all_at(&[0x22; 70000], 3 * MIB).unwrap();
    p
}

/// A new standalone image `name` of `size` bytes in `dir`, opened writable,
/// and the root its names resolve in.
fn fresh(dir: &Path, name: &str, size: u64) -> (PathBuf, Root, Image) {
    let p = dir.join(name);
    create::create(&p, size, None, 0o600).unwrap();
    let root = Root::disks(dir).unwrap();
    let img = Image::open(&p, true, &root).unwrap();
    (p, root, img)
}

/// `top.img`, a writable overlay on the raw base of [`raw_base`] (8 MiB).
fn overlay_on_raw(dir: &Path) -> (PathBuf, Root, Image) {
    raw_base(dir, 8 * MIB);
    let top = dir.join("top.img");
    create::create(&top, 8 * MIB, Some(("base.img", "raw")), 0o600).unwrap();
    let root = Root::disks(dir).unwrap();
    let img = Image::open(&top, true, &root).unwrap();
    (top, root, img)
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xa5; len];
    img.read(off, &mut b).unwrap();
    b
}

#[test]
fn overlay_reads_through_and_copies_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let (top, root, img) = overlay_on_raw(dir.path());
    assert_eq!(read(&img, 0, 4096), vec![0x11; 4096]);
    assert_eq!(read(&img, 4096, 10), vec![0; 10]);
    // A partial write into the base's data keeps the rest of the cluster.
    img.write(3 * MIB + 100, &[0x33; 10]).unwrap();
    let got = read(&img, 3 * MIB, 200);
    assert_eq!(&got[..100], &[0x22; 100][..]);
    assert_eq!(&got[100..110], &[0x33; 10][..]);
    assert_eq!(&got[110..], &[0x22; 90][..]);
    assert_eq!(
        img.status(3 * MIB, 64 * 1024).unwrap(),
        (64 * 1024, Run::Data)
    );
    assert_eq!(img.status(MIB, MIB).unwrap(), (MIB, Run::Zero));
    // Zero a whole cluster of base data: reads zero, the base keeps its data.
    img.zero(3 * MIB, 65536, true, false).unwrap();
    assert_eq!(read(&img, 3 * MIB, 65536), vec![0; 65536]);
    assert_eq!(img.status(3 * MIB, 65536).unwrap().1, Run::Zero);
    // A partial zero on data that is not zero is not fast.
    assert!(matches!(
        img.zero(0, 512, true, false),
        Err(Qcow2Error::NotFast)
    ));
    img.zero(0, 512, false, false).unwrap();
    assert_eq!(read(&img, 0, 1024)[..512], [0; 512]);
    assert_eq!(read(&img, 0, 1024)[512..], [0x11; 512]);
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&top, true, &root).unwrap();
    assert_eq!(&read(&img, 3 * MIB + 65536, 10), &[0x22; 10]);
    assert_eq!(read(&img, 3 * MIB, 10), vec![0; 10]);
    let base = std::fs::read(dir.path().join("base.img")).unwrap();
    assert_eq!(&base[3 * MIB as usize..3 * MIB as usize + 10], &[0x22; 10]);
    assert_eq!(img.chain_paths().len(), 2);
}

/// Unflushed metadata is lost in a crash but leaves a consistent image:
/// the leaks are freed at the next writable open; flushed writes stay.
#[test]
fn unflushed_writes_leave_only_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let (p, root, img) = fresh(dir.path(), "a.img", 64 * MIB);
    img.write(0, &[1; 4096]).unwrap();
    img.flush().unwrap();
    img.write(40 * MIB, &[2; 4096]).unwrap();
    // "Crash": the refcount of the second write's clusters reached the
    // file (phase 1 of a flush), its L2 and L1 entries did not.
    {
        let m = img.read_meta();
        for (&off, (counts, _)) in &m.refblocks {
            img.file
                .write_all_at(&table::encode_u16s(counts), off)
                .unwrap();
        }
    }
    std::mem::forget(img);
    let img = Image::open(&p, true, &root).unwrap();
    assert_eq!(read(&img, 0, 4096), vec![1; 4096]);
    assert_eq!(read(&img, 40 * MIB, 4096), vec![0; 4096]);
    let m = img.read_meta();
    let used: u32 = m
        .refblocks
        .values()
        .flat_map(|r| r.0.iter())
        .map(|&c| c as u32)
        .sum();
    // header, reftable, refblock, L1, one L2 table, one data cluster
    assert_eq!(used, 6);
}

#[test]
fn hostile_tables_answer_eio_or_refuse_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (p, root, img) = fresh(dir.path(), "h.img", 64 * MIB);
    img.write(0, &[7; 65536]).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&p, false, &root).unwrap();
    let l1 = img.header().l1_offset;
    let l2 = table::decode_l1(img.read_meta().l1[0], img.cs)
        .unwrap()
        .unwrap();
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    // An L2 entry past the end of the file: EIO on that cluster only.
    f.write_all_at(&(table::COPIED | 1 << 40).to_be_bytes(), l2 + 8)
        .unwrap();
    // An L2 entry pointing at the header.
    f.write_all_at(&(table::COPIED).to_be_bytes(), l2 + 16)
        .unwrap();
    f.write_all_at(&(table::COPIED | l1).to_be_bytes(), l2 + 24)
        .unwrap();
    let img = Image::open(&p, false, &root).unwrap();
    let mut b = vec![0; 512];
    assert!(img.read(65536, &mut b).is_err(), "past EOF");
    assert!(img.read(3 * 65536, &mut b).is_err(), "on the L1 table");
    img.read(0, &mut b).unwrap();
    assert_eq!(b, vec![7; 512]);
    drop(img);
    assert!(matches!(
        Image::open(&p, true, &root),
        Err(Qcow2Error::Corrupt(_))
    ));
    // An L1 entry naming the refcount table refuses the open.
    f.write_all_at(&(table::COPIED | 65536).to_be_bytes(), l1)
        .unwrap();
    assert!(matches!(
        Image::open(&p, false, &root),
        Err(Qcow2Error::Corrupt(_))
    ));
}

#[test]
fn backing_names_stay_inside_and_chains_do_not_loop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = Root::disks(d).unwrap();
    for bad in [
        "../x.img",
        "/etc/passwd",
        "sub/x.img",
        "x",
        ".x.img",
        "missing.img",
    ] {
        assert!(
            matches!(root.resolve(bad), Err(Qcow2Error::Backing(_))),
            "{bad}"
        );
    }
    create::create(&d.join("a.img"), MIB, Some(("b.img", "qcow2")), 0o600).unwrap();
    create::create(&d.join("b.img"), MIB, Some(("a.img", "qcow2")), 0o600).unwrap();
    let e = Image::open(&d.join("a.img"), false, &root).unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    std::os::unix::fs::symlink("/etc/hostname", d.join("l.img")).unwrap();
    create::create(&d.join("c.img"), MIB, Some(("l.img", "raw")), 0o600).unwrap();
    assert!(Image::open(&d.join("c.img"), false, &root).is_err());
}

#[test]
fn chains_copy_into_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_, root, img) = overlay_on_raw(dir.path());
    img.write(5 * MIB, &[9; 1000]).unwrap();
    img.flush().unwrap();
    let layer = Layer::Qcow2(Box::new(img));
    let flat = dir.path().join("flat.img");
    create::copy_to_qcow2(&layer, &flat, 0o600).unwrap();
    let f = Image::open(&flat, true, &root).unwrap();
    assert!(f.backing().is_none());
    for (off, len) in [(0, 8192), (3 * MIB, 70000), (5 * MIB, 1000), (7 * MIB, 100)] {
        let mut a = vec![0; len];
        layer.read(off, &mut a).unwrap();
        assert_eq!(read(&f, off, len), a, "{off}");
    }
}

/// Writers on several threads into the same new clusters (each its own
/// 4 KiB block, the rest copied from the base) lose none of each other's
/// data: copy-on-write and the data write happen under the table lock.
#[test]
fn concurrent_partial_writes_into_one_new_cluster_all_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, img) = overlay_on_raw(dir.path());
    let img = std::sync::Arc::new(img);
    // The base holds 0x22 in the whole cluster at 3 MiB.
    let at = |t: u64| 3 * MIB + t * 4096;
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || img.write(at(t), &[t as u8 + 1; 4096]).unwrap())
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..16u64 {
        let want = if t < 8 { t as u8 + 1 } else { 0x22 };
        assert_eq!(read(&img, at(t), 4096), vec![want; 4096], "block {t}");
    }
    img.flush().unwrap();
}

/// Deflates `data` raw, as QEMU's compressed clusters are.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1024);
    let mut z = flate2::Compress::new(flate2::Compression::default(), false);
    z.compress_vec(data, &mut out, flate2::FlushCompress::Finish)
        .unwrap();
    out
}

/// A compressed guest cluster 1 (its deflated bytes 100 bytes into a
/// host cluster, refcount 1) under a plain cluster 0; the image's path.
fn with_compressed(dir: &Path, pattern: &[u8]) -> (PathBuf, Root) {
    let (p, root, img) = fresh(dir, "c.img", 8 * MIB);
    img.write(0, &[7; 65536]).unwrap();
    let z = deflate(pattern);
    {
        let mut m = img.write_meta();
        let host = img.alloc_cluster(&mut m).unwrap();
        img.file.write_all_at(&z, host + 100).unwrap();
        let sectors = (100 + z.len() as u64).div_ceil(512);
        let e = table::COMPRESSED | (sectors - 1) << 54 | (host + 100);
        img.set_l2(&mut m, 1, e).unwrap();
    }
    img.flush().unwrap();
    (p, root)
}

#[test]
fn compressed_clusters_read_and_are_replaced_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let (p, root) = with_compressed(dir.path(), &pattern);
    let img = Image::open(&p, true, &root).unwrap();
    assert_eq!(read(&img, 65536, 65536), pattern);
    assert_eq!(read(&img, 65536 + 1000, 10), pattern[1000..1010]);
    assert_eq!(img.status(65536, 65536).unwrap(), (65536, Run::Data));
    // A partial write: a new cluster, the rest inflated into it; the
    // compressed one's host cluster is freed at the flush.
    img.write(65536 + 4096, &[0xee; 4096]).unwrap();
    img.flush().unwrap();
    let mut want = pattern.clone();
    want[4096..8192].fill(0xee);
    assert_eq!(read(&img, 65536, 65536), want);
    let used: u32 = img
        .read_meta()
        .refblocks
        .values()
        .flat_map(|r| r.0.iter())
        .map(|&c| c as u32)
        .sum();
    // header, reftable, refblock, L1, L2, two data clusters
    assert_eq!(used, 7);
    drop(img);
    let img = Image::open(&p, true, &root).unwrap();
    assert_eq!(read(&img, 65536, 65536), want);
}

#[test]
fn corrupt_compressed_data_answers_eio() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = vec![0x5a; 65536];
    let (p, root) = with_compressed(dir.path(), &pattern);
    let img = Image::open(&p, false, &root).unwrap();
    assert_eq!(read(&img, 65536, 65536), pattern);
    let e = img.read_meta().l2.values().next().unwrap().entries[1];
    let table::Cluster::Compressed { off, .. } = table::decode_l2(e, 65536).unwrap() else {
        panic!("not compressed");
    };
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0xff; 64], off).unwrap();
    let img = Image::open(&p, false, &root).unwrap();
    let mut b = vec![0; 4096];
    assert!(matches!(
        img.read(65536, &mut b),
        Err(Qcow2Error::Corrupt(_))
    ));
    img.read(0, &mut b).unwrap();
    assert_eq!(b, vec![7; 4096]);
}

/// The sum of all refcounts: clusters in use.
fn used_clusters(img: &Image) -> u32 {
    let mut m = img.write_meta();
    let rt = m.reftable.clone();
    rt.iter()
        .filter(|e| **e != 0)
        .enumerate()
        .map(|(i, _)| {
            let per = img.cs / 2;
            (0..per)
                .map(|j| img.refcount(&mut m, (i as u64 * per + j) * img.cs).unwrap() as u32)
                .sum::<u32>()
        })
        .sum()
}

#[test]
fn grow_moves_the_l1_table_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (p, root, img) = fresh(dir.path(), "g.img", 8 * MIB);
    img.write(MIB, &[5; 4096]).unwrap();
    assert!(img.grow(4 * MIB).is_err(), "shrink");
    img.grow(100 * MIB).unwrap();
    assert_eq!(img.read_meta().l1_offset, img.header().l1_offset);
    let big = (2 << 30) + 65536;
    img.grow(big).unwrap();
    assert_ne!(img.read_meta().l1_offset, img.header().l1_offset);
    img.write(2 << 30, &[6; 4096]).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&p, true, &root).unwrap();
    assert_eq!(img.size(), big);
    assert_eq!(read(&img, MIB, 4096), vec![5; 4096]);
    assert_eq!(read(&img, 2 << 30, 4096), vec![6; 4096]);
    assert_eq!(read(&img, big - 4096, 4096), vec![0; 4096]);
    // header, reftable, refblock, the new L1, two L2 tables, two data
    assert_eq!(used_clusters(&img), 8);
}

#[test]
fn stream_then_detach_makes_the_image_self_contained() {
    let dir = tempfile::tempdir().unwrap();
    let (top, root, img) = overlay_on_raw(dir.path());
    img.write(3 * MIB + 100, &[0x33; 10]).unwrap();
    img.zero(0, 65536, false, false).unwrap();
    let before = read(&img, 0, 8 * MIB as usize);
    img.stream().unwrap();
    img.write(3 * MIB + 65536, &[0x44; 10]).unwrap();
    img.detach().unwrap();
    assert_eq!(img.chain_paths().len(), 1);
    let mut after = before.clone();
    after[3 * MIB as usize + 65536..][..10].fill(0x44);
    assert_eq!(read(&img, 0, 8 * MIB as usize), after);
    drop(img);
    std::fs::remove_file(dir.path().join("base.img")).unwrap();
    let img = Image::open(&top, true, &root).unwrap();
    assert!(img.header().backing.is_none());
    assert_eq!(read(&img, 0, 8 * MIB as usize), after);
}

/// The sum of the refcounts in the blocks loaded (all of them once the
/// image was opened writable, or created since).
fn counted(img: &Image) -> u64 {
    let m = img.read_meta();
    m.refblocks
        .values()
        .flat_map(|r| r.0.iter())
        .map(|&c| c as u64)
        .sum()
}

/// An image whose refcount table runs out (512-byte clusters, a table of
/// one cluster: 8 MiB of file) grows it, in writes and in a grow of the
/// virtual size whose L1 table lies past its reach, and leaks nothing; a
/// crash after a growth, before the next flush, leaves an image the next
/// open takes (its leaks repaired), with the new table.
#[test]
fn the_refcount_table_grows_when_the_file_outgrows_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.img");
    create::create_with(&p, 16 * MIB, None, 0o600, 9, 0).unwrap();
    let root = Root::disks(dir.path()).unwrap();
    let img = Image::open(&p, true, &root).unwrap();
    let first = img.header().reftable_offset;
    assert_eq!(img.read_meta().reftable.len(), 64);
    let data: Vec<u8> = (0..12 * MIB)
        .map(|i| (i / 512) as u8 ^ (i % 251) as u8)
        .collect();
    img.write(0, &data).unwrap();
    assert!(img.read_meta().reftable.len() >= 128);
    assert_ne!(img.read_meta().reftable_offset, first);
    // An L1 table of 16 MiB: past what the table reaches again.
    img.grow(64 << 30).unwrap();
    img.write((64 << 30) - 4096, &[7; 4096]).unwrap();
    img.flush().unwrap();
    let before = counted(&img);
    let rt = img.read_meta().reftable_offset;
    drop(img);
    let img = Image::open(&p, true, &root).unwrap();
    assert_eq!(img.header().reftable_offset, rt);
    assert_eq!(counted(&img), before, "nothing leaked");
    assert_eq!(img.size(), 64 << 30);
    assert_eq!(read(&img, 0, data.len()), data);
    assert_eq!(read(&img, (64 << 30) - 4096, 4096), vec![7; 4096]);

    // Grows again, then a "crash" before any flush.
    let len = img.read_meta().reftable.len();
    img.write(16 * MIB, &vec![9; 40 * MIB as usize]).unwrap();
    let grown = img.read_meta().reftable_offset;
    assert!(img.read_meta().reftable.len() > len);
    std::mem::forget(img);
    let img = Image::open(&p, true, &root).unwrap();
    assert_eq!(img.header().reftable_offset, grown);
    assert_eq!(read(&img, 0, data.len()), data);
    img.write(60 * MIB, &[3; 4096]).unwrap();
    img.flush().unwrap();
    assert_eq!(read(&img, 60 * MIB, 4096), vec![3; 4096]);
}

/// `locate` names the one file (and where in it) a range lies in as one
/// run of data, and nothing for zeroes, holes, or a range across layers
/// or host clusters that are not contiguous.
#[test]
fn locate_finds_runs_of_data_in_one_file_of_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (_top, _root, img) = overlay_on_raw(dir.path());
    let c = 65536;
    // The first write also allocates the L2 table (after its cluster).
    img.write(0, &vec![0x43; c as usize]).unwrap();
    img.write(c, &vec![0x44; 2 * c as usize]).unwrap();
    img.write(5 * c, &[0x45; 100]).unwrap();
    img.write(3 * c, &[0x46; 100]).unwrap();
    let host = |gc: u64| match img.lookup(gc).unwrap() {
        table::Cluster::Data(o) => o,
        other => panic!("{other:?}"),
    };
    let (depth, _, at) = img.locate(c + 100, 2 * c - 100).unwrap().unwrap();
    assert_eq!((depth, at), (0, host(1) + 100));
    // Clusters 2 and 3 are not contiguous on the host (5 came between).
    assert_ne!(host(3), host(2) + c);
    assert!(img.locate(2 * c, 2 * c).unwrap().is_none());
    assert!(
        img.locate(0, 2 * c).unwrap().is_none(),
        "the L2 table between"
    );
    // The base's data, through the overlay; its hole and a range across
    // the layers are not runs of data.
    let (depth, _, at) = img.locate(3 * MIB, 60000).unwrap().unwrap();
    assert_eq!((depth, at), (1, 3 * MIB));
    assert!(img.locate(MIB, 4096).unwrap().is_none());
    assert!(img.locate(5 * c - 4096, 8192).unwrap().is_none());
    img.zero(6 * c, c, false, false).unwrap();
    assert!(img.locate(6 * c, 4096).unwrap().is_none());
}
