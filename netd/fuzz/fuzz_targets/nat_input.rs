//! Fuzz target: arbitrary bytes as frames into the NAT router's input.
//!
//! The input is split into frames by a 2-byte big-endian length prefix, so one run
//! exercises flow state across several frames (a SYN then segments, a datagram then
//! its retransmission). Flows may only go to loopback (`outbound_allow`), so the
//! fuzzer never sends anything off the machine.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use netd::nat::{Router, RouterConfig};
use tokio::sync::mpsc;

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let _guard = rt.enter();
    let (_to_router, from_switch) = mpsc::channel(1);
    let (to_switch, _from_router) = mpsc::channel(1);
    let mut cfg = RouterConfig::defaults();
    cfg.outbound_allow = vec![(std::net::Ipv4Addr::LOCALHOST, 8)];
    cfg.host_loopback = true;
    cfg.resolv_conf = "/nonexistent".into();
    let Ok((mut router, _handle)) = Router::new(cfg, from_switch, to_switch) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = n.min(body.len());
        let _ = router.process_frame_for_test(Bytes::copy_from_slice(&body[..take]));
        rest = &body[take..];
    }
});
