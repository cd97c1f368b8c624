//! Client side of the handshake: the server's greeting, option reply headers
//! and every reply's data, as a client parses them. Whatever parses re-emits
//! to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{
    rep, Hello, Info, OptionReply, OptionReplyHeader, HELLO_LEN, OPTION_REPLY_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::parse(data) {
        let mut b = Vec::new();
        h.emit(&mut b);
        assert_eq!(&b[..], &data[..HELLO_LEN]);
    }
    if let Ok(h) = OptionReplyHeader::parse(data) {
        let mut b = Vec::new();
        h.emit(&mut b);
        assert_eq!(&b[..], &data[..OPTION_REPLY_HEADER_LEN]);
    }
    // First byte picks the reply type (known ones and an error), the rest is
    // its data.
    if let Some((&code, rest)) = data.split_first() {
        let reply = match code % 6 {
            5 => rep::ERR_UNSUP,
            t => u32::from(t),
        };
        if let Ok(r) = OptionReply::parse(reply, rest) {
            assert_eq!(r.reply_type(), reply);
            let mut b = Vec::new();
            r.emit(7, &mut b);
            let emitted = &b[OPTION_REPLY_HEADER_LEN..];
            // Items of a known fixed size may carry bytes this side ignores.
            match r {
                OptionReply::Info(
                    Info::Export { .. } | Info::BlockSize { .. } | Info::Unknown(_),
                ) => {
                    assert!(rest.starts_with(emitted))
                }
                _ => assert_eq!(emitted, rest),
            }
        }
    }
});
