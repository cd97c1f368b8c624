//! Fuzzes the transmission request parser: parse, re-emit, compare.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stord::wire::{Request, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        let mut b = bytes::BytesMut::new();
        r.emit(&mut b);
        assert_eq!(&b[..], &data[..REQUEST_LEN]);
        assert!(r.payload_len() <= r.len);
    }
});
