//! Fuzzes the software offload path: any virtio-net header with any frame must
//! never panic, and every produced segment must fit the frame-size bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netd::offload::{finish, VnetHdr, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let (Some(hdr), Some(frame)) = (VnetHdr::parse(data), data.get(VNET_HDR_LEN..)) else {
        return;
    };
    let mut scratch = Vec::new();
    let _ = finish(&hdr, frame, &mut scratch, &mut |seg| {
        assert!(seg.len() <= frame.len().max(60))
    });
});
