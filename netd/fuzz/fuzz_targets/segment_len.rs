//! Fuzzes `segment_payload_len`, the size the switch checks against a port's MTU
//! before it forwards a frame (a GSO super-frame counts as its largest segment):
//! any virtio-net header with any frame must never panic, and no segment that
//! `finish` cuts from the frame may be larger than it says. A frame whose segments
//! came out larger than the checked size would carry packets above the MTU past
//! the switch's check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netd::offload::{finish, segment_payload_len, VnetHdr, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let (Some(hdr), Some(frame)) = (VnetHdr::parse(data), data.get(VNET_HDR_LEN..)) else {
        return;
    };
    let checked = segment_payload_len(&hdr, frame);
    if !hdr.is_gso() {
        assert_eq!(checked, frame.len().saturating_sub(14));
    }
    let mut scratch = Vec::new();
    let mut largest = 0usize;
    if finish(&hdr, frame, &mut scratch, &mut |seg| {
        largest = largest.max(seg.len().saturating_sub(14))
    })
    .is_ok()
    {
        assert!(
            largest <= checked,
            "a segment of {largest} bytes past a check of {checked} ({hdr:?}, frame {} bytes)",
            frame.len()
        );
    }
});
