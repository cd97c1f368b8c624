//! Fuzz target: the NAT router's IPv6 classifier (`nat/frame6.rs`) on arbitrary
//! Ethernet payloads, both as frames to the router's MAC and as multicast, on a
//! network with the NAT default IPv6 layout (`fd00::/64`, `::2`, `::3`). Nothing may
//! panic; a flow's payload must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netd::nat::frame::GuestEcho;
use netd::nat::frame6::{classify6, Classified6};
use netd::nat::RouterConfig;
use smoltcp::wire::EthernetAddress;

fuzz_target!(|data: &[u8]| {
    let mut cfg = RouterConfig::defaults();
    cfg.ipv6 = Some(netd::config::Ipv6Spec {
        prefix: "fd00::".parse().unwrap(),
        gateway: "fd00::2".parse().unwrap(),
        dns: Some("fd00::3".parse().unwrap()),
        range: None,
        lease_time: 3600,
    });
    let mac = EthernetAddress([0x52, 0x54, 0, 1, 2, 3]);
    for to_router in [true, false] {
        match classify6(data, mac, to_router, &cfg, |a| cfg.own6(a)) {
            Classified6::Udp { payload, .. }
            | Classified6::Echo(GuestEcho { icmp: payload, .. }) => {
                let range = data.as_ptr_range();
                assert!(range.contains(&payload.as_ptr()) || payload.is_empty());
            }
            _ => {}
        }
    }
});
