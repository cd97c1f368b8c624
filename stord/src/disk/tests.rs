//! Unit tests of raw disks.

use super::*;

/// A mapping is shared until READs touched MAP_REGIONS_MAX regions of it,
/// then the next READ gets a fresh one, and the old one still serves its
/// readers; a grown disk gets a mapping that covers the new size.
#[test]
fn mapping_is_replaced_after_enough_regions_and_on_growth() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.img");
    let regions = MAP_REGIONS_MAX as u64 + 1;
    let d = Disk::create("d", &p, regions << MAP_REGION_SHIFT, Alloc::Dynamic, false).unwrap();
    let first = d.mapping(0, 4096).unwrap();
    for r in 1..MAP_REGIONS_MAX as u64 {
        let m = d.mapping(r << MAP_REGION_SHIFT, 4096).unwrap();
        assert!(Arc::ptr_eq(&m, &first), "region {r}");
    }
    // Rereading a region touched before costs nothing.
    assert!(Arc::ptr_eq(&d.mapping(4096, 8192).unwrap(), &first));
    let fresh = d
        .mapping((MAP_REGIONS_MAX as u64) << MAP_REGION_SHIFT, 4096)
        .unwrap();
    assert!(!Arc::ptr_eq(&fresh, &first));
    first.populate(0, 4096).unwrap();
    assert!(Arc::ptr_eq(&d.mapping(0, 4096).unwrap(), &fresh));

    assert!(
        d.mapping(regions << MAP_REGION_SHIFT, 1).is_none(),
        "past the end"
    );
    d.resize((regions << MAP_REGION_SHIFT) + 4096).unwrap();
    let grown = d.mapping(regions << MAP_REGION_SHIFT, 4096).unwrap();
    assert!(grown.len() as u64 > regions << MAP_REGION_SHIFT);
    grown
        .populate(regions as usize * (1 << MAP_REGION_SHIFT), 4096)
        .unwrap();
}

#[test]
fn dynamic_disk_is_sparse_and_punches() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.img");
    let d = Disk::create("d", &p, 8 << 20, Alloc::Dynamic, false).unwrap();
    assert_eq!(d.size(), 8 << 20);
    assert!(d.allocated_bytes() < 1 << 20);
    let ext = d.extents(0, 8 << 20, 64).unwrap();
    assert_eq!(
        ext,
        vec![Extent {
            len: 8 << 20,
            flags: 3
        }]
    );

    d.write(1 << 20, &[0xab; 65536], true).unwrap();
    assert_eq!(d.read(1 << 20, 4).unwrap(), vec![0xab; 4]);
    let ext = d.extents(0, 8 << 20, 64).unwrap();
    assert!(ext.iter().any(|e| e.flags == 0), "{ext:?}");
    assert_eq!(ext.iter().map(|e| e.len as u64).sum::<u64>(), 8 << 20);

    d.write_zeroes(1 << 20, 65536, false, true, false).unwrap();
    assert_eq!(d.read(1 << 20, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(d.extents(0, 8 << 20, 64).unwrap().len(), 1);
}

#[test]
fn reads_past_the_host_file_end_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.img");
    std::fs::write(&p, b"0123456789").unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let v = sys::pread_vec(&f, 4, 16).unwrap();
    assert_eq!(&v[..6], b"456789");
    assert_eq!(&v[6..], &[0u8; 10]);
}

#[test]
fn fixed_disk_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.img");
    let d = Disk::create("f", &p, 4 << 20, Alloc::Fixed, false).unwrap();
    assert!(d.allocated_bytes() >= 4 << 20);
    d.trim(0, 4 << 20, false).unwrap();
    assert!(d.allocated_bytes() >= 4 << 20);
    for e in d.extents(0, 4 << 20, 64).unwrap() {
        assert_eq!(e.flags & STATE_HOLE, 0);
    }
    d.resize(8 << 20).unwrap();
    assert!(d.allocated_bytes() >= 8 << 20);
    assert!(Disk::create("f", &p, 1, Alloc::Fixed, false).is_err());
}

#[test]
fn files_are_private_and_read_only_disks_are_opened_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.img");
    let d = Disk::create("r", &p, 1 << 20, Alloc::Dynamic, true).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, FILE_MODE);
    // The descriptor cannot write: a bug above cannot reach the file.
    assert!(d.file.write_all_at(b"x", 0).is_err());
    d.resize(2 << 20).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
    drop(d);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _d = Disk::open("r", &p, Alloc::Dynamic, false).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, FILE_MODE);
}

/// One failed sync latches: every later flush, FUA write and resize sync
/// fails with EIO, even though the next fdatasync would succeed (Linux
/// reports a writeback error once per file description).
#[test]
fn failed_sync_is_latched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.img");
    let d = Disk::create("l", &p, 1 << 20, Alloc::Dynamic, false).unwrap();
    d.flush().unwrap();
    let injected = d.sync(|_| Err(io::Error::from_raw_os_error(libc::EIO)));
    assert_eq!(injected.unwrap_err().nbd_errno(), err::EIO);
    assert!(d.failed());
    assert_eq!(d.flush().unwrap_err().nbd_errno(), err::EIO);
    assert!(d.write(0, b"abc", true).is_err(), "FUA write acknowledged");
    d.write(0, b"abc", false).unwrap();
    assert!(d.write_zeroes(0, 4096, false, false, true).is_err());
    assert!(d.resize(2 << 20).is_err());
    assert_eq!(d.flush_failures(), 1);
    drop(d);
    let d = Disk::open("l", &p, Alloc::Dynamic, false).unwrap();
    assert!(!d.failed(), "reopening clears the latch");
    d.flush().unwrap();
}
