use super::*;

fn blocks(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while read_block(&mut bytes, &mut buf).unwrap() {
        out.push(buf.clone());
    }
    out
}

#[test]
fn a_capture_round_trips_block_by_block() {
    let mut out = Vec::new();
    emit_shb(&mut out, "netd test");
    emit_idb(&mut out, 128, "vm1", "netd lab port vm1 (tap)");
    let frame: Vec<u8> = (0..61u8).collect();
    let p = Packet {
        interface: 0,
        ts_ns: 1_700_000_000_123_456_789,
        orig_len: 61,
        flags: FLAG_INBOUND | FLAG_BROADCAST,
        comment: Some("dropped: spoofed_mac"),
        data: &frame,
    };
    emit_epb(&mut out, &p);
    let bare = Packet {
        comment: None,
        flags: 0,
        data: &frame[..3],
        ..p
    };
    emit_epb(&mut out, &bare);
    emit_isb(
        &mut out,
        &Stats {
            interface: 0,
            start_ns: 1,
            end_ns: 2,
            received: 7,
            dropped: 5,
        },
    );
    assert_eq!(out.len() % 4, 0);
    let b = blocks(&out);
    assert_eq!(b.len(), 5);
    assert!(is_shb(&b[0]));
    let idb = Block::parse(&b[1]).unwrap();
    assert_eq!(idb.kind, IDB);
    let opts = idb.options(8);
    assert!(opts.contains(&(IF_NAME, b"vm1".as_slice())), "{opts:?}");
    assert!(opts.contains(&(IF_TSRESOL, [9u8].as_slice())), "{opts:?}");
    assert_eq!(Block::parse(&b[2]).unwrap().packet(), Some(p));
    assert_eq!(Block::parse(&b[3]).unwrap().packet(), Some(bare));
    assert_eq!(Block::parse(&b[4]).unwrap().stats(), Some((0, 7, 5)));
}

#[test]
fn padding_is_zero_and_lengths_match_at_both_ends() {
    for n in 0..9usize {
        let mut out = vec![0xa5; 3];
        let data = vec![0xffu8; n];
        emit_epb(
            &mut out,
            &Packet {
                interface: 1,
                ts_ns: 0,
                orig_len: n as u32,
                flags: 0,
                comment: Some("x"),
                data: &data,
            },
        );
        let whole = &out[3..];
        assert_eq!(whole.len() % 4, 0);
        let b = Block::parse(whole).unwrap();
        // The data's padding, then the comment's.
        let pad_end = 20 + n.div_ceil(4) * 4;
        assert!(b.body[20 + n..pad_end].iter().all(|&x| x == 0), "n={n}");
        assert_eq!(&b.body[pad_end..pad_end + 8], &[1, 0, 1, 0, b'x', 0, 0, 0]);
    }
}

#[test]
fn bad_streams_are_refused_before_anything_is_allocated() {
    let mut out = Vec::new();
    emit_shb(&mut out, "t");
    let mut buf = Vec::new();
    // Cut anywhere inside the block: truncated, not a hang or a panic.
    for cut in 1..out.len() {
        let r = read_block(&mut &out[..cut], &mut buf);
        assert!(matches!(r, Err(PcapngError::Truncated)), "cut {cut}: {r:?}");
    }
    // A huge length is refused from the header alone.
    let mut huge = out.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        read_block(&mut huge.as_slice(), &mut buf),
        Err(PcapngError::BadLength { .. })
    ));
    assert!(buf.len() <= 8);
    for len in [0u32, 8, 13] {
        let mut bad = out.clone();
        bad[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(read_block(&mut bad.as_slice(), &mut buf).is_err(), "{len}");
    }
    let mut trailer = out.clone();
    let n = trailer.len();
    trailer[n - 1] ^= 1;
    assert!(matches!(
        read_block(&mut trailer.as_slice(), &mut buf),
        Err(PcapngError::Trailer(SHB))
    ));
    // A parsed block whose fields lie about their lengths yields nothing.
    let mut epb = Vec::new();
    emit_epb(
        &mut epb,
        &Packet {
            interface: 0,
            ts_ns: 0,
            orig_len: 4,
            flags: 0,
            comment: None,
            data: &[1, 2, 3, 4],
        },
    );
    epb[20..24].copy_from_slice(&1000u32.to_le_bytes());
    assert_eq!(Block::parse(&epb).unwrap().packet(), None);
    assert!(!is_shb(&epb));
}

#[test]
fn an_epb_written_around_its_data_is_the_same_block() {
    let long = "x".repeat(70_000);
    for n in [0usize, 1, 2, 3, 4, 5, 1514, 65_535] {
        let data = vec![0xa5u8; n];
        for (comment, flags) in [
            (None, 0),
            (Some("dropped: mtu"), 0),
            (None, FLAG_OUTBOUND),
            (Some(long.as_str()), FLAG_INBOUND | FLAG_UNICAST),
        ] {
            let p = Packet {
                interface: 3,
                ts_ns: 42,
                orig_len: 70_000,
                flags,
                comment,
                data: &data,
            };
            let mut whole = Vec::new();
            emit_epb(&mut whole, &p);
            let mut parts = Vec::new();
            emit_epb_head(&mut parts, &p);
            assert_eq!(parts.len(), 28, "the header only");
            parts.extend_from_slice(&data);
            emit_epb_tail(&mut parts, &p);
            assert_eq!(parts, whole);
            let b = blocks(&whole);
            assert_eq!(b.len(), 1, "one block, lengths checked");
            let got = Block::parse(&b[0]).unwrap().packet().unwrap();
            assert_eq!((got.data, got.flags), (&data[..], flags));
        }
    }
}
