//! Server side of the transmission phase: request headers. Parse, re-emit,
//! compare; the typed command and the payload length agree with the header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{Command, Request, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        let mut b = bytes::BytesMut::new();
        r.emit(&mut b);
        assert_eq!(&b[..], &data[..REQUEST_LEN]);
        assert!(r.payload_len() <= r.len);
        match r.command() {
            Ok(c) => assert_eq!(u16::from(c), r.kind),
            Err(e) => assert_eq!(e.0, r.kind),
        }
        if r.payload_len() > 0 {
            assert_eq!(r.command(), Ok(Command::Write));
        }
    }
});
