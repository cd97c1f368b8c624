//! Unit tests of the transmission phase: READ replies sent from the mapping.

use super::*;

/// Writes a mapped READ reply into a socket pair; what the peer read.
fn send_mapped(
    disk: &Disk,
    hdr: &'static [u8],
    map: Arc<crate::sys::FileMap>,
    offset: usize,
    len: usize,
) -> Vec<u8> {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        got
    });
    let mut w: Box<dyn SockWrite> = Box::new(a);
    let m = MappedRead {
        hdr: Bytes::from_static(hdr),
        map,
        at: offset,
        offset: offset as u64,
        len,
        tail: Bytes::new(),
        structured: false,
        handle: 0,
    };
    write_mapped(&mut *w, disk, &m, Instant::now() + Duration::from_secs(10)).unwrap();
    drop(w);
    reader.join().unwrap()
}

/// A dynamic disk of `pages` 4 KiB pages of 7s in a fresh directory, a populated
/// mapping of all of it, and then its file cut to `len` bytes under the mapping.
fn mapped_then_cut(pages: usize, len: u64) -> (tempfile::TempDir, Disk, Arc<crate::sys::FileMap>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    std::fs::write(&path, vec![7u8; pages * 4096]).unwrap();
    let disk = Disk::open("d", &path, Alloc::Dynamic, false).unwrap();
    let map = disk.mapping(0, (pages * 4096) as u64).unwrap();
    map.populate(0, pages * 4096).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len)
        .unwrap();
    (dir, disk, map)
}

/// A reply whose file shrank between `populate` and the send: no SIGBUS,
/// the pages still there go out from the mapping, the rest as zeroes (as
/// pread reads past the end of a file), and the reply keeps its length.
#[test]
fn mapped_reply_survives_the_file_shrinking_under_it() {
    let (_dir, disk, map) = mapped_then_cut(3, 6144);
    assert!(map.populate(0, 3 * 4096).is_err(), "page 3 is past the end");
    let got = send_mapped(&disk, b"HDR", map, 0, 3 * 4096);
    assert_eq!(got.len(), 3 + 3 * 4096);
    assert_eq!(&got[..3], b"HDR");
    assert_eq!(&got[3..3 + 6144], &[7u8; 6144][..]);
    assert!(got[3 + 6144..].iter().all(|&x| x == 0));
}

/// A structured reply whose data cannot be read after its header went
/// out: the promised data goes out as zeroes and the reply ends in an
/// ERROR chunk with DONE (never the NONE chunk), so the client gets EIO
/// and the connection stays usable.
#[test]
fn late_read_error_in_a_structured_reply_becomes_an_error_chunk() {
    use nbd_proto::chunk;
    let (dir, _good, map) = mapped_then_cut(2, 0);
    // The fallback pread goes to a disk that cannot be read (a directory:
    // EISDIR), as a failing disk would.
    let broken = Disk::open("b", dir.path(), Alloc::Dynamic, true).unwrap();
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        got
    });
    let mut tail = BytesMut::new();
    nbd_proto::emit_none(&mut tail, 42);
    let m = MappedRead {
        hdr: Bytes::from_static(b"HDR"),
        map,
        at: 0,
        offset: 0,
        len: 2 * 4096,
        tail: tail.freeze(),
        structured: true,
        handle: 42,
    };
    let mut w: Box<dyn SockWrite> = Box::new(a);
    write_mapped(
        &mut *w,
        &broken,
        &m,
        Instant::now() + Duration::from_secs(10),
    )
    .unwrap();
    drop(w);
    let got = reader.join().unwrap();
    assert_eq!(&got[..3], b"HDR");
    let data = &got[3..3 + 2 * 4096];
    assert!(data.iter().all(|&x| x == 0), "not zero padding");
    let c = &got[3 + 2 * 4096..];
    assert_eq!(&c[4..6], &chunk::FLAG_DONE.to_be_bytes());
    assert_eq!(&c[6..8], &chunk::ERROR.to_be_bytes());
    assert_eq!(&c[8..16], &42u64.to_be_bytes());
    let len = u32::from_be_bytes(c[16..20].try_into().unwrap()) as usize;
    assert_eq!(c.len(), 20 + len, "nothing after the error chunk");
    assert_eq!(&c[20..24], &err::EIO.to_be_bytes());
}

/// The mapping is sent from at any offset, and bounds are checked.
#[test]
fn mapped_reply_sends_the_range_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let data: Vec<u8> = (0..5 * 4096u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let disk = Disk::open("d", &path, Alloc::Fixed, false).unwrap();
    assert!(disk.mapping(0, 5 * 4096 + 1).is_none(), "past the disk");
    let map = disk.mapping(0, 5 * 4096).unwrap();
    assert!(
        map.populate(4096, 4 * 4096 + 1).is_err(),
        "past the mapping"
    );
    map.populate(1000, 4 * 4096).unwrap();
    let got = send_mapped(&disk, b"H", map, 1000, 4 * 4096);
    assert_eq!(&got[..1], b"H");
    assert_eq!(&got[1..], &data[1000..1000 + 4 * 4096]);
}
