//! Fuzzes the DHCP parser and the server's whole frame path: any bytes, as a UDP
//! payload and as an Ethernet frame, must never panic; whatever parses must
//! re-emit to the same message.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use netd::config::{DhcpSpec, Ipv4Spec};
use netd::dhcp::{DhcpMessage, DhcpServer, LeaseDb};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = DhcpMessage::parse(data) {
        let again = DhcpMessage::parse(&m.to_vec()).expect("emitted message parses");
        assert_eq!(again, m);
    }
    let v4 = Ipv4Spec {
        network: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 0, 0, 1),
    };
    let spec = DhcpSpec {
        server: Ipv4Addr::new(10, 0, 0, 1),
        start: Ipv4Addr::new(10, 0, 0, 100),
        end: Ipv4Addr::new(10, 0, 0, 110),
        lease_time: 600,
        dns: vec![],
        router: None,
        reservations: vec![],
        domain: None,
    };
    let mut s = DhcpServer::new(v4, spec, [2, 0, 0, 0, 0, 1], true, LeaseDb::default());
    let _ = s.handle_frame(data, 1000);
    let frame = netd::wire::emit_udp_frame(
        [0xff; 6],
        [2, 0, 0, 0, 0, 2],
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
        data,
    );
    let _ = s.handle_frame(&frame, 1000);
});
