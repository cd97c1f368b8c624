//! The client against scripted servers, honest and lying ones; the servers'
//! bytes come from nbd-proto's emitters, so the tests speak the same wire
//! format as stord.

use super::*;
use crate::testutil::serve_one;
use nbd_proto::{chunk, OptionHeader, OptionReply, OPTION_HEADER_LEN, REQUEST_LEN};
use std::os::unix::net::UnixListener;

/// A server of one connection on a fresh unix socket, running `script`:
/// the socket's directory (removed when dropped), its address, the thread.
fn scripted<T: Send + 'static>(
    script: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> (tempfile::TempDir, NbdAddr, std::thread::JoinHandle<T>) {
    let (dir, path, server) = serve_one("nbd.sock", script);
    (dir, NbdAddr::Unix(path), server)
}

/// A server (see [`scripted`]) that shakes hands, takes the first request and
/// answers it with `answer(stream, cookie, offset)`.
fn answering_first<T: Send + 'static>(
    answer: impl FnOnce(&mut UnixStream, u64, u64) -> T + Send + 'static,
) -> (tempfile::TempDir, NbdAddr, std::thread::JoinHandle<T>) {
    scripted(move |mut s| {
        handshake(&mut s);
        let (_, cookie, off, _) = request(&mut s);
        answer(&mut s, cookie, off)
    })
}

/// The payload of an offset chunk (data or hole): the offset, then `rest` (the
/// data, or the hole's length).
fn at_offset(offset: u64, rest: &[u8]) -> Vec<u8> {
    [&offset.to_be_bytes()[..], rest].concat()
}

/// Connects to `addr` and reads `len` bytes at `offset`, which must fail the
/// connection: the error.
fn failed_read(addr: &NbdAddr, offset: u64, len: u32) -> NbdError {
    let mut c = NbdClient::connect(addr, "e").unwrap();
    c.submit(&[Request::Read { offset, len }]).unwrap_err()
}

fn opt_reply(s: &mut UnixStream, option: u32, reply: OptionReply<'_>) {
    let mut b = Vec::new();
    reply.emit(option, &mut b);
    s.write_all(&b).unwrap();
}

fn chunk(s: &mut UnixStream, flags: u16, kind: u16, handle: u64, payload: &[u8]) {
    try_chunk(s, flags, kind, handle, payload).unwrap();
}

/// Sends a structured reply chunk; an error means the client hung up.
fn try_chunk(
    s: &mut UnixStream,
    flags: u16,
    kind: u16,
    handle: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::new();
    ChunkHeader {
        flags,
        kind,
        handle,
        len: payload.len() as u32,
    }
    .emit(&mut b);
    b.extend_from_slice(payload);
    s.write_all(&b)
}

fn simple_reply(s: &mut UnixStream, error: u32, handle: u64) {
    let mut b = Vec::new();
    SimpleReply { error, handle }.emit(&mut b);
    s.write_all(&b).unwrap();
}

/// Reads one request: (type, cookie, offset, len), skipping a write's payload.
fn request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
    let r = nbd_proto::Request::parse(&rd::<REQUEST_LEN>(s).unwrap()).unwrap();
    rd_vec(s, r.payload_len()).unwrap();
    (r.kind, r.handle, r.offset, r.len)
}

/// The server's greeting, and the client's flags read.
fn greet(s: &mut UnixStream) {
    let mut hello = Vec::new();
    Hello {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .emit(&mut hello);
    s.write_all(&hello).unwrap();
    ClientFlags::parse(&rd::<{ ClientFlags::LEN }>(s).unwrap()).unwrap();
}

/// Reads one option, header and data, as a server does; its code.
fn read_option(s: &mut UnixStream) -> u32 {
    let h = OptionHeader::parse(&rd::<OPTION_HEADER_LEN>(s).unwrap()).unwrap();
    rd_vec(s, h.len).unwrap();
    h.option
}

/// The server side of the handshake: structured replies, a 1 MiB export.
fn handshake(s: &mut UnixStream) {
    greet(s);
    for _ in 0..2 {
        let option = read_option(s);
        if option == opt::GO {
            let flags = 1u16 | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM;
            let export = Info::Export {
                size: 1 << 20,
                flags,
            };
            opt_reply(s, option, OptionReply::Info(export));
        }
        opt_reply(s, option, OptionReply::Ack);
    }
}

/// A scripted server: handshake, then answers a batch of three requests out of
/// order with data/hole chunks, a simple reply and an error chunk, then sends a
/// reply for a cookie nobody asked about.
fn serve(mut s: UnixStream) {
    handshake(&mut s);
    let reqs: Vec<_> = (0..3).map(|_| request(&mut s)).collect();
    // Third request (a read): EIO as an error chunk.
    let mut e = 5u32.to_be_bytes().to_vec();
    e.extend_from_slice(&4u16.to_be_bytes());
    e.extend_from_slice(b"oops");
    chunk(&mut s, chunk::FLAG_DONE, chunk::ERROR, reqs[2].1, &e);
    // Second (a write): simple reply.
    simple_reply(&mut s, 0, reqs[1].1);
    // First (read 1024 at 4096): data for the second half, a hole for the first.
    let d = at_offset(4096 + 512, &[0xaa; 512]);
    chunk(&mut s, 0, chunk::OFFSET_DATA, reqs[0].1, &d);
    let h = at_offset(4096, &512u32.to_be_bytes());
    chunk(&mut s, chunk::FLAG_DONE, chunk::OFFSET_HOLE, reqs[0].1, &h);
    // Next batch: answered with a cookie from nowhere.
    let r = request(&mut s);
    simple_reply(&mut s, 0, r.1 + 1000);
}

#[test]
fn structured_replies_out_of_order_errors_and_a_lying_server() {
    let (_dir, addr, server) = scripted(serve);
    let mut c = NbdClient::connect(&addr, "e").unwrap();
    assert!(c.structured());
    assert_eq!(c.size(), 1 << 20);
    assert!(!c.read_only());
    let out = c
        .submit(&[
            Request::Read {
                offset: 4096,
                len: 1024,
            },
            Request::Trim {
                offset: 0,
                len: 512,
            },
            Request::Read {
                offset: 0,
                len: 512,
            },
        ])
        .unwrap();
    let mut want = vec![0u8; 512];
    want.extend_from_slice(&[0xaa; 512]);
    assert_eq!(out[0], Ok(want));
    assert_eq!(out[1], Ok(vec![]));
    assert_eq!(out[2], Err(5));
    let err = c.submit(&[Request::Flush]).unwrap_err();
    assert!(matches!(err, NbdError::Protocol(_)), "{err}");
    assert!(matches!(c.submit(&[Request::Flush]), Err(NbdError::Down)));
    server.join().unwrap();
}

#[test]
fn not_an_nbd_server() {
    let (_dir, addr, t) = scripted(|mut s| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let err = NbdClient::connect(&addr, "e").err().unwrap();
    assert!(err.to_string().contains("not an NBD server"), "{err}");
    t.join().unwrap();
}

#[test]
fn chunk_offsets_that_overflow_are_a_protocol_error() {
    // A hole or data chunk whose offset lies so far past the request that
    // offset + length wraps around u64 must fail the connection, not overflow.
    for ty in [chunk::OFFSET_HOLE, chunk::OFFSET_DATA] {
        let (_dir, addr, server) = answering_first(move |s, cookie, _| {
            let p = if ty == chunk::OFFSET_HOLE {
                at_offset(u64::MAX - 4, &512u32.to_be_bytes())
            } else {
                at_offset(u64::MAX - 4, &[0x55; 512])
            };
            chunk(s, chunk::FLAG_DONE, ty, cookie, &p);
        });
        let err = failed_read(&addr, 0, 1024);
        assert!(
            err.to_string().contains("chunk outside the request"),
            "{err}"
        );
        server.join().unwrap();
    }
}

#[test]
fn endless_info_replies_end_the_handshake() {
    let (_dir, addr, server) = scripted(|mut s| {
        greet(&mut s);
        for _ in 0..2 {
            let option = read_option(&mut s);
            if option == opt::STRUCTURED_REPLY {
                opt_reply(&mut s, option, OptionReply::Ack);
            }
        }
        // GO: INFO replies (an unknown info type) until the client hangs up.
        let mut info = Vec::new();
        OptionReply::Info(Info::Unknown(9)).emit(opt::GO, &mut info);
        let mut sent = 0u32;
        loop {
            let ok = s.write_all(&info);
            if ok.is_err() || sent > 100_000 {
                return sent;
            }
            sent += 1;
        }
    });
    let err = NbdClient::connect(&addr, "e").err().unwrap();
    assert!(err.to_string().contains("replies to GO"), "{err}");
    assert!(server.join().unwrap() < 100_000);
}

#[test]
fn endless_chunks_for_one_request_are_a_protocol_error() {
    // Overlapping holes, then (second round) NONE chunks, never DONE.
    for round in 0..2 {
        let (_dir, addr, server) = answering_first(move |s, cookie, off| {
            let h = at_offset(off, &512u32.to_be_bytes());
            let mut sent = 0;
            while sent < 10_000 {
                let (kind, p): (u16, &[u8]) = if round == 0 {
                    (chunk::OFFSET_HOLE, &h)
                } else {
                    (chunk::NONE, &[])
                };
                if try_chunk(s, 0, kind, cookie, p).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        });
        // Without the bounds the client reads all 10 000 chunks, then EOF: Io.
        let err = failed_read(&addr, 4096, 1024);
        assert!(matches!(err, NbdError::Protocol(_)), "{err}");
        server.join().unwrap();
    }
}

#[test]
fn a_read_reply_must_cover_the_request_exactly() {
    // Round 0: one data chunk for half the read, then DONE: an I/O error for that
    // request, and the connection still serves the next read in full.
    // Round 1: two chunks that overlap but add up to the length: a protocol error.
    for round in 0..2 {
        let (_dir, addr, server) = answering_first(move |s, cookie, off| {
            let d = at_offset(off, &[0x11; 512]);
            if round == 0 {
                chunk(s, chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, &d);
                let (_, cookie, off, len) = request(s);
                let d = at_offset(off, &vec![0x22; len as usize]);
                chunk(s, chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, &d);
            } else {
                chunk(s, 0, chunk::OFFSET_DATA, cookie, &d);
                chunk(s, chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, &d);
            }
        });
        let mut c = NbdClient::connect(&addr, "e").unwrap();
        let r = c.submit(&[Request::Read {
            offset: 0,
            len: 1024,
        }]);
        if round == 0 {
            assert_eq!(r.unwrap(), vec![Err(err::EIO)]);
            assert_eq!(c.short_reads(), 1);
            let r = c
                .submit(&[Request::Read {
                    offset: 4096,
                    len: 1024,
                }])
                .unwrap();
            assert_eq!(r, vec![Ok(vec![0x22; 1024])]);
        } else {
            let err = r.unwrap_err();
            assert!(err.to_string().contains("overlap"), "{err}");
        }
        server.join().unwrap();
    }
}

#[test]
fn claimed_ranges_never_overlap() {
    let mut m = BTreeMap::new();
    assert!(claim(&mut m, 10, 20));
    assert!(claim(&mut m, 20, 30));
    assert!(claim(&mut m, 0, 10));
    assert!(!claim(&mut m, 5, 6));
    assert!(!claim(&mut m, 19, 21));
    assert!(!claim(&mut m, 0, 100));
    assert!(claim(&mut m, 30, 31));
}

#[test]
fn a_session_reconnects_and_retries_the_batch_in_flight() {
    for delay in [5u64, 0] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: takes the read, dies without answering.
            let mut s = l.accept().unwrap().0;
            handshake(&mut s);
            request(&mut s);
            drop(s);
            if delay == 0 {
                return;
            }
            // Second: answers it.
            let mut s = l.accept().unwrap().0;
            handshake(&mut s);
            let (_, cookie, _, len) = request(&mut s);
            let mut b = Vec::new();
            SimpleReply {
                error: 0,
                handle: cookie,
            }
            .emit(&mut b);
            b.extend_from_slice(&vec![0x33; len as usize]);
            s.write_all(&b).unwrap();
        });
        let spec = DiskSpec {
            addr: NbdAddr::Unix(path.clone()),
            export: "e".into(),
            read_only: false,
            reconnect_delay: Duration::from_secs(delay),
            tls: None,
        };
        let mut c = NbdSession::connect(&spec).unwrap();
        let r = c.submit(&[Request::Read {
            offset: 0,
            len: 512,
        }]);
        server.join().unwrap();
        if delay == 0 {
            assert!(r.is_err());
            assert_eq!(c.stats().reconnects, 0);
        } else {
            assert_eq!(r.unwrap(), vec![Ok(vec![0x33; 512])]);
            assert_eq!(c.stats().reconnects, 1);
        }
    }
}
