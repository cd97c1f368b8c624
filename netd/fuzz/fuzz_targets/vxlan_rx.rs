//! Fuzzes what a vxlan port does with a datagram: the VXLAN header parser, the
//! flow hash and the receive coalescer. Any bytes must never panic; a header that
//! parses must re-emit to the same VNI; a super-frame the coalescer builds from
//! segments must be one the software segmentation can cut again, into as many
//! segments as went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netd::offload::finish;
use netd::port::vxlan::gro::Coalescer;
use netd::port::vxlan::wire::{flow_hash, VxlanHeader};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, inner)) = VxlanHeader::parse(data) {
        let bytes = h.emit();
        let again = VxlanHeader::parse(&bytes).expect("emitted header parses");
        assert_eq!(again.0, h);
        let _ = flow_hash(inner);
    }
    // The input as a run of frames: a length byte, then that many bytes.
    let mut c = Coalescer::default();
    let mut rest = data;
    let mut offered = 0usize;
    let check = |f: &[u8], h: Option<&netd::offload::VnetHdr>, n: usize| {
        if let Some(h) = h {
            let mut scratch = Vec::new();
            let mut segs = 0;
            finish(h, f, &mut scratch, &mut |_| segs += 1).expect("coalesced frame segments");
            assert_eq!(segs, n);
        }
    };
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len) * 8;
        let (frame, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        if c.offer(frame) {
            offered += 1;
        } else {
            let n = offered;
            c.flush(&mut |f, h| check(f, h, n));
            offered = usize::from(c.offer(frame));
        }
    }
    let n = offered;
    c.flush(&mut |f, h| check(f, h, n));
});
