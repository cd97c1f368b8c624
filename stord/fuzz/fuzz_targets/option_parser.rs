//! Fuzzes the handshake parsers: the option header and every option's data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stord::wire::{OptionHeader, OptionRequest, OPTION_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = OptionHeader::parse(data) {
        let mut b = bytes::BytesMut::new();
        h.emit(&mut b);
        assert_eq!(&b[..], &data[..OPTION_HEADER_LEN]);
    }
    // First byte picks the option code (covering known and unknown ones), the
    // rest is its data.
    if let Some((&code, rest)) = data.split_first() {
        let _ = OptionRequest::parse(u32::from(code % 16), rest);
    }
});
