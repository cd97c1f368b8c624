use super::*;
use crate::test_util::{check_reemit, emit_exact, random_inputs, round_trip};
use bytes::BytesMut;

#[test]
fn commands_convert_both_ways() {
    for v in 0..=7u16 {
        let c = Command::try_from(v).unwrap();
        assert_eq!(u16::from(c), v);
    }
    assert_eq!(Command::try_from(8), Err(UnknownCommand(8)));
    assert_eq!(UnknownCommand(99).to_string(), "unknown command 99");
}

#[test]
fn request_round_trip_and_payload() {
    let r = Request::new(
        Command::Write,
        cflag::FUA,
        0xdead_beef_0102_0304,
        1 << 40,
        4096,
    );
    round_trip(&r, REQUEST_LEN, |v, o| v.emit(o), Request::parse);
    assert_eq!(r.payload_len(), 4096);
    assert_eq!(r.command(), Ok(Command::Write));
    assert!(r.has_flag(cflag::FUA) && !r.has_flag(cflag::DF));
    let rd = Request {
        kind: Command::Read.into(),
        ..r
    };
    assert_eq!(rd.payload_len(), 0);
    let unknown = Request { kind: 99, ..r };
    assert_eq!(unknown.command(), Err(UnknownCommand(99)));
    assert_eq!(unknown.payload_len(), 0);
}

#[test]
fn request_bad_magic_and_short() {
    let mut b = BytesMut::new();
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_bytes(0, 24);
    assert!(matches!(Request::parse(&b), Err(ParseError::BadMagic(_))));
    assert_eq!(
        Request::parse(&REQUEST_MAGIC.to_be_bytes()),
        Err(ParseError::Truncated { need: 28, have: 4 })
    );
}

#[test]
fn simple_reply_round_trip_and_layout() {
    let r = SimpleReply {
        error: err::EINVAL,
        handle: 7,
    };
    let b = round_trip(&r, SIMPLE_REPLY_LEN, |v, o| v.emit(o), SimpleReply::parse);
    assert_eq!(
        &b[..],
        &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
    );
    assert_eq!(ReplyKind::parse(&b), Ok(ReplyKind::Simple));
    assert_eq!(ReplyKind::Simple.header_len(), SIMPLE_REPLY_LEN);
    assert!(SimpleReply::parse(&b[..15]).is_err());
}

#[test]
fn chunks_round_trip() {
    // OFFSET_DATA header and offset; the data is the caller's.
    let b = emit_exact(CHUNK_HEADER_LEN + 8, |o| {
        emit_offset_data_header(o, 5, 4096, 512, Final::No)
    });
    assert_eq!(ReplyKind::parse(&b), Ok(ReplyKind::Structured));
    let h = ChunkHeader::parse(&b).unwrap();
    assert_eq!((h.handle, h.len, h.is_final()), (5, 8 + 512, false));
    assert_eq!(h.payload(), Ok(ChunkPayload::OffsetData { data_len: 512 }));
    assert_eq!(parse_offset(&b[CHUNK_HEADER_LEN..]), Ok(4096));

    let b = emit_exact(CHUNK_HEADER_LEN + 12, |o| {
        emit_offset_hole(o, 9, 512, 1024, Final::Yes)
    });
    let h = ChunkHeader::parse(&b).unwrap();
    assert!(h.is_final());
    assert_eq!(h.payload(), Ok(ChunkPayload::OffsetHole));
    assert_eq!(
        OffsetHole::parse(&b[CHUNK_HEADER_LEN..]),
        Ok(OffsetHole {
            offset: 512,
            len: 1024
        })
    );

    let b = emit_exact(CHUNK_HEADER_LEN, |o| emit_none(o, 3));
    let h = ChunkHeader::parse(&b).unwrap();
    assert_eq!((h.payload(), h.is_final()), (Ok(ChunkPayload::None), true));

    let b = emit_exact(CHUNK_HEADER_LEN + 6 + 9, |o| {
        emit_error_chunk(o, 1, err::EPERM, "read-only")
    });
    let h = ChunkHeader::parse(&b).unwrap();
    assert_eq!(h.payload(), Ok(ChunkPayload::Error));
    assert_eq!(
        ErrorChunk::parse(&b[CHUNK_HEADER_LEN..]),
        Ok(ErrorChunk {
            error: err::EPERM,
            message: b"read-only"
        })
    );

    let extents = [
        Extent {
            len: 4096,
            flags: 0,
        },
        Extent { len: 512, flags: 3 },
    ];
    let b = emit_exact(CHUNK_HEADER_LEN + 4 + 16, |o| {
        emit_block_status(o, 3, BASE_ALLOCATION_ID, &extents)
    });
    let h = ChunkHeader::parse(&b).unwrap();
    assert_eq!((h.payload(), h.len), (Ok(ChunkPayload::BlockStatus), 20));
    assert_eq!(
        BlockStatus::parse(&b[CHUNK_HEADER_LEN..]),
        Ok(BlockStatus {
            context: BASE_ALLOCATION_ID,
            extents: extents.to_vec()
        })
    );
}

#[test]
fn replies_have_exact_layout() {
    let mut b = BytesMut::new();
    emit_offset_hole(&mut b, 9, 512, 1024, Final::Yes);
    assert_eq!(b.len(), 20 + 12);
    assert_eq!(&b[4..6], &[0, 1]);
    assert_eq!(&b[6..8], &[0, 2]);
    assert_eq!(&b[16..20], &12u32.to_be_bytes());

    let mut b = BytesMut::new();
    emit_error_chunk(&mut b, 1, err::EPERM, "read-only");
    assert_eq!(&b[16..20], &(6u32 + 9).to_be_bytes());
    assert_eq!(&b[20..24], &1u32.to_be_bytes());
    assert_eq!(&b[24..26], &9u16.to_be_bytes());

    // A long message is cut at a character boundary.
    let mut b = BytesMut::new();
    emit_error_chunk(&mut b, 1, err::EIO, &"é".repeat(600));
    assert_eq!(b.len(), 20 + 6 + 1024);
}

#[test]
fn hostile_chunk_headers_are_errors() {
    let h = |kind, len| ChunkHeader {
        flags: 0,
        kind,
        handle: 1,
        len,
    };
    assert!(h(chunk::OFFSET_DATA, 7).payload().is_err());
    assert!(h(chunk::OFFSET_DATA, 8).payload().is_err());
    assert!(h(chunk::OFFSET_DATA, MAX_PAYLOAD + 9).payload().is_err());
    assert!(h(chunk::OFFSET_HOLE, 13).payload().is_err());
    assert!(h(chunk::ERROR, 5).payload().is_err());
    assert!(h(chunk::OFFSET_DATA, MAX_PAYLOAD + 8).payload().is_ok());
    assert_eq!(
        h(chunk::NONE, 3).payload(),
        Ok(ChunkPayload::Other { error: false })
    );
    assert_eq!(
        h(chunk::ERROR_BIT + 77, 3).payload(),
        Ok(ChunkPayload::Other { error: true })
    );
    assert!(OffsetHole::parse(&[0u8; 12]).is_err(), "empty hole");
    assert!(OffsetHole::parse(&[0u8; 11]).is_err());
    assert!(BlockStatus::parse(&[0u8; 7]).is_err());
    assert!(ReplyKind::parse(&[1, 2, 3, 4]).is_err());
    assert!(ReplyKind::parse(&[1, 2]).is_err());
    // A message length past the payload is cut to the payload.
    let e = ErrorChunk::parse(&[0, 0, 0, 5, 0, 200, b'x']).unwrap();
    assert_eq!((e.error, e.message), (5, &b"x"[..]));
    assert!(ErrorChunk::parse(&[0, 0, 0, 5, 0]).is_err());
}

/// Randomized robustness: arbitrary bytes never panic the parsers (the same
/// functions the fuzz targets drive), and whatever parses re-emits identically.
#[test]
fn random_bytes_never_panic() {
    random_inputs(|rng, mut buf| {
        let len = buf.len();
        if len >= 4 {
            let magic = match rng.next_u64() % 4 {
                0 => REQUEST_MAGIC,
                1 => SIMPLE_REPLY_MAGIC,
                2 => STRUCTURED_REPLY_MAGIC,
                _ => rng.next_u64() as u32,
            };
            buf[..4].copy_from_slice(&magic.to_be_bytes());
        }
        check_reemit(&buf, REQUEST_LEN, Request::parse, |r, b| {
            assert!(r.payload_len() <= r.len);
            r.emit(b)
        });
        check_reemit(&buf, SIMPLE_REPLY_LEN, SimpleReply::parse, |r, b| r.emit(b));
        check_reemit(&buf, CHUNK_HEADER_LEN, ChunkHeader::parse, |h, b| {
            let _ = h.payload();
            h.emit(b)
        });
        let _ = ReplyKind::parse(&buf);
        let _ = OffsetHole::parse(&buf);
        let _ = ErrorChunk::parse(&buf);
        let _ = BlockStatus::parse(&buf);
        let _ = parse_offset(&buf);
    });
}
