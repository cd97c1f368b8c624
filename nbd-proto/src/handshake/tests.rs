use super::*;
use crate::test_util::{check_reemit, emit_exact, random_inputs, round_trip};
use bytes::BytesMut;

fn opt_data_info(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

#[test]
fn hello_and_client_flags_round_trip() {
    let h = Hello {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    };
    let b = round_trip(&h, HELLO_LEN, |v, o| v.emit(o), Hello::parse);
    // The first magic alone is checked before more bytes are needed.
    assert!(matches!(
        Hello::parse(&b[..8]),
        Err(ParseError::Truncated { .. })
    ));
    assert!(matches!(
        Hello::parse(&b[..17]),
        Err(ParseError::Truncated { .. })
    ));
    assert_eq!(Hello::parse(b"HTTP/1.1"), Err(ParseError::NotNbd));
    let mut old = b.clone();
    old[8] ^= 1;
    assert_eq!(Hello::parse(&old), Err(ParseError::Oldstyle));

    let f = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    };
    let b = round_trip(&f, ClientFlags::LEN, |v, o| v.emit(o), ClientFlags::parse);
    assert_eq!(b, [0, 0, 0, 3]);
    assert_eq!(
        ClientFlags::parse(&[0, 0, 0, 4]),
        Err(ParseError::UnknownFlags(4))
    );
    assert!(ClientFlags::parse(&[0, 0]).is_err());
}

#[test]
fn option_header_round_trip() {
    let h = OptionHeader {
        option: opt::GO,
        len: 42,
    };
    round_trip(&h, OPTION_HEADER_LEN, |v, o| v.emit(o), OptionHeader::parse);
}

#[test]
fn option_header_bad_magic_and_short() {
    let mut b = BytesMut::new();
    b.put_u64(NBDMAGIC);
    b.put_u64(0);
    assert_eq!(OptionHeader::parse(&b), Err(ParseError::BadMagic(NBDMAGIC)));
    assert!(matches!(
        OptionHeader::parse(&b[..5]),
        Err(ParseError::Truncated { need: 16, have: 5 })
    ));
}

#[test]
fn go_parses_name_and_requests() {
    let d = opt_data_info("disk0", &[info::NAME, info::BLOCK_SIZE]);
    assert_eq!(
        OptionRequest::parse(opt::GO, &d),
        Ok(OptionRequest::Info {
            go: true,
            name: "disk0".into(),
            requests: vec![info::NAME, info::BLOCK_SIZE]
        })
    );
}

#[test]
fn go_rejects_inconsistent_lengths() {
    let mut d = opt_data_info("disk0", &[1]);
    d.push(0); // trailing byte
    assert!(OptionRequest::parse(opt::GO, &d).is_err());
    let mut d = opt_data_info("disk0", &[]);
    d[3] = 200; // name length past the end
    assert!(OptionRequest::parse(opt::INFO, &d).is_err());
    assert!(OptionRequest::parse(opt::GO, &[0, 0]).is_err());
}

#[test]
fn strings_are_checked() {
    assert!(OptionRequest::parse(opt::EXPORT_NAME, b"a\0b").is_err());
    assert!(OptionRequest::parse(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
    assert!(OptionRequest::parse(opt::EXPORT_NAME, &vec![b'a'; 4097]).is_err());
    assert_eq!(
        OptionRequest::parse(opt::EXPORT_NAME, b""),
        Ok(OptionRequest::ExportName(String::new()))
    );
}

#[test]
fn empty_options_reject_data() {
    assert_eq!(
        OptionRequest::parse(opt::LIST, &[]),
        Ok(OptionRequest::List)
    );
    assert!(OptionRequest::parse(opt::LIST, &[1]).is_err());
    assert!(OptionRequest::parse(opt::STRUCTURED_REPLY, &[1, 2]).is_err());
    assert_eq!(
        OptionRequest::parse(1234, &[1, 2, 3]),
        Ok(OptionRequest::Unknown(1234))
    );
}

#[test]
fn meta_context_parses_queries() {
    let mut d = Vec::new();
    d.extend_from_slice(&3u32.to_be_bytes());
    d.extend_from_slice(b"foo");
    d.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "x-a:b"] {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    assert_eq!(
        OptionRequest::parse(opt::SET_META_CONTEXT, &d),
        Ok(OptionRequest::MetaContext {
            set: true,
            name: "foo".into(),
            queries: vec!["base:allocation".into(), "x-a:b".into()]
        })
    );
    // A huge query count with no data must not allocate or loop.
    let mut d = Vec::new();
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(OptionRequest::parse(opt::LIST_META_CONTEXT, &d).is_err());
}

/// Every option the client side emits parses back to itself on the server side.
#[test]
fn option_requests_round_trip() {
    let all = [
        OptionRequest::ExportName("disk0".into()),
        OptionRequest::Abort,
        OptionRequest::List,
        OptionRequest::StartTls,
        OptionRequest::StructuredReply,
        OptionRequest::ExtendedHeaders,
        OptionRequest::Info {
            go: true,
            name: "e".into(),
            requests: vec![],
        },
        OptionRequest::Info {
            go: false,
            name: String::new(),
            requests: vec![info::NAME, info::DESCRIPTION],
        },
        OptionRequest::MetaContext {
            set: false,
            name: "d".into(),
            queries: vec![],
        },
        OptionRequest::MetaContext {
            set: true,
            name: "d".into(),
            queries: vec![BASE_ALLOCATION.into(), "base:".into()],
        },
        OptionRequest::Unknown(77),
    ];
    for o in all {
        let b = emit_exact(OPTION_HEADER_LEN + o.data_len(), |out| o.emit(out));
        let h = OptionHeader::parse(&b).unwrap();
        assert_eq!(h.option, o.option());
        assert_eq!(h.len as usize, o.data_len());
        let data = &b[OPTION_HEADER_LEN..];
        assert_eq!(OptionRequest::parse(h.option, data), Ok(o));
    }
}

/// Every reply the server side emits parses back to itself on the client side.
#[test]
fn option_replies_round_trip() {
    let all = [
        OptionReply::Ack,
        OptionReply::Server {
            name: "disk0",
            description: "stord dynamic disk",
        },
        OptionReply::Info(Info::Export {
            size: 1 << 40,
            flags: tflag::HAS_FLAGS | tflag::READ_ONLY,
        }),
        OptionReply::Info(Info::Name("disk0")),
        OptionReply::Info(Info::Description("a disk")),
        OptionReply::Info(Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }),
        OptionReply::Info(Info::Unknown(9)),
        OptionReply::MetaContext {
            id: BASE_ALLOCATION_ID,
            name: BASE_ALLOCATION,
        },
        OptionReply::Error {
            reply: rep::ERR_UNSUP,
            message: b"no TLS",
        },
    ];
    for r in all {
        let b = emit_exact(OPTION_REPLY_HEADER_LEN + r.data_len(), |o| {
            r.emit(opt::GO, o)
        });
        let h = OptionReplyHeader::parse(&b).unwrap();
        assert_eq!((h.option, h.reply), (opt::GO, r.reply_type()));
        assert_eq!(h.len as usize, r.data_len());
        assert_eq!(
            OptionReply::parse(h.reply, &b[OPTION_REPLY_HEADER_LEN..]),
            Ok(r)
        );
    }
}

#[test]
fn option_replies_have_exact_layout() {
    let mut b = BytesMut::new();
    OptionReply::Server {
        name: "ab",
        description: "d",
    }
    .emit(opt::LIST, &mut b);
    assert_eq!(b.len(), 20 + 4 + 2 + 1);
    assert_eq!(&b[0..8], &REPLY_MAGIC.to_be_bytes());
    assert_eq!(&b[20..24], &2u32.to_be_bytes());

    let mut b = BytesMut::new();
    Info::Export {
        size: 0x0102,
        flags: 3,
    }
    .emit(&mut b);
    assert_eq!(&b[..], &[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3]);
}

#[test]
fn hostile_option_replies_are_errors() {
    assert!(OptionReplyHeader::parse(&[0u8; 20]).is_err());
    assert!(OptionReplyHeader::parse(&REPLY_MAGIC.to_be_bytes()).is_err());
    assert!(OptionReply::parse(rep::ACK, &[1]).is_err());
    assert_eq!(
        OptionReply::parse(99, &[]),
        Err(ParseError::UnknownType(99))
    );
    // Short export info, a server name longer than the data, a bad string.
    assert!(Info::parse(&[0, 0, 1]).is_err());
    assert!(Info::parse(&[0]).is_err());
    assert!(OptionReply::parse(rep::SERVER, &[0, 0, 1, 0, b'a']).is_err());
    assert!(OptionReply::parse(rep::META_CONTEXT, &[0, 0, 0, 1, 0xff]).is_err());
    // Trailing bytes after a fixed-size item are ignored.
    let mut d = vec![0u8; 12];
    d[9] = 5;
    d.push(7);
    assert_eq!(Info::parse(&d), Ok(Info::Export { size: 5, flags: 0 }));
}

#[test]
fn export_name_reply_pads_unless_told_not_to() {
    for no_zeroes in [false, true] {
        let r = ExportNameReply {
            size: 1 << 30,
            flags: tflag::HAS_FLAGS,
            no_zeroes,
        };
        let b = emit_exact(r.buffer_len(), |o| r.emit(o));
        assert_eq!(b.len(), if no_zeroes { 10 } else { 134 });
        assert!(b[10..].iter().all(|&x| x == 0));
        assert_eq!(ExportNameReply::parse(&b, no_zeroes), Ok(r));
    }
    assert!(ExportNameReply::parse(&[0u8; 10], false).is_err());
}

/// Randomized robustness: arbitrary bytes never panic the parsers (the same
/// functions the fuzz targets drive), and whatever parses re-emits identically.
#[test]
fn random_bytes_never_panic() {
    random_inputs(|rng, mut buf| {
        let len = buf.len();
        // Bias some inputs towards valid magics so deeper paths run.
        if len >= 8 && rng.next_u64() % 2 == 0 {
            buf[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        }
        if len >= 8 && rng.next_u64() % 4 == 0 {
            buf[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        }
        check_reemit(&buf, OPTION_HEADER_LEN, OptionHeader::parse, |h, b| {
            h.emit(b)
        });
        check_reemit(
            &buf,
            OPTION_REPLY_HEADER_LEN,
            OptionReplyHeader::parse,
            |h, b| h.emit(b),
        );
        check_reemit(&buf, HELLO_LEN, Hello::parse, |h, b| h.emit(b));
        check_reemit(&buf, ClientFlags::LEN, ClientFlags::parse, |f, b| f.emit(b));
        let option = (rng.next_u64() % 14) as u32;
        if let Ok(o) = OptionRequest::parse(option, &buf) {
            assert!(o.data_len() <= buf.len() || option == opt::ABORT);
        }
        let reply = match rng.next_u64() % 6 {
            0 => rep::ERR_INVALID,
            r => r as u32,
        };
        if let Ok(r) = OptionReply::parse(reply, &buf) {
            assert!(r.data_len() <= buf.len());
        }
        let _ = Info::parse(&buf);
    });
}
