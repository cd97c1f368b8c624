//! Server side of the handshake: the client's flags, option headers and every
//! option's data, as a server parses them. Whatever parses re-emits to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{opt, ClientFlags, OptionHeader, OptionRequest, OPTION_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = ClientFlags::parse(data) {
        let mut b = Vec::new();
        f.emit(&mut b);
        assert_eq!(&b[..], &data[..ClientFlags::LEN]);
    }
    if let Ok(h) = OptionHeader::parse(data) {
        let mut b = bytes::BytesMut::new();
        h.emit(&mut b);
        assert_eq!(&b[..], &data[..OPTION_HEADER_LEN]);
    }
    // First byte picks the option code (covering known and unknown ones), the
    // rest is its data.
    if let Some((&code, rest)) = data.split_first() {
        let option = u32::from(code % 16);
        if let Ok(o) = OptionRequest::parse(option, rest) {
            // ABORT ignores its data; every other option re-emits exactly.
            if option != opt::ABORT && !matches!(o, OptionRequest::Unknown(_)) {
                let mut b = Vec::new();
                o.emit(&mut b);
                assert_eq!(&b[OPTION_HEADER_LEN..], rest);
            }
        }
    }
});
