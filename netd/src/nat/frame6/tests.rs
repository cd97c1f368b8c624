use std::net::{Ipv6Addr, SocketAddrV6};

use super::*;
use crate::config::Ipv6Spec;

const ROUTER: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);
const GUEST: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

fn cfg() -> RouterConfig {
    let mut c = RouterConfig::defaults();
    c.ipv6 = Some(Ipv6Spec {
        prefix: "fd00::".parse().unwrap(),
        gateway: "fd00::2".parse().unwrap(),
        dns: Some("fd00::3".parse().unwrap()),
        range: None,
        lease_time: 3600,
    });
    c
}

fn a(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn sa(s: &str, p: u16) -> SocketAddrV6 {
    SocketAddrV6::new(a(s), p, 0, 0)
}

fn classify(f: &[u8]) -> Classified6<'_> {
    let c = cfg();
    // `c` lives only here: classify a copy's view through a leaked config.
    let c: &'static RouterConfig = Box::leak(Box::new(c));
    classify6(&f[14..], GUEST, true, c, |x| c.own6(x))
}

#[test]
fn built_frames_carry_valid_checksums_and_classify_back() {
    // A guest's datagram (built with the builder, addresses swapped).
    let f = udp6_frame(
        GUEST,
        ROUTER,
        sa("fd00::15", 5000),
        sa("2001:db8::1", 53),
        b"q",
    );
    match classify(&f) {
        Classified6::Udp {
            src, dst, payload, ..
        } => {
            assert_eq!(src.to_string(), "[fd00::15]:5000");
            assert_eq!(dst.to_string(), "[2001:db8::1]:53");
            assert_eq!(payload, b"q");
        }
        other => panic!("{other:?}"),
    }
    let rst = tcp6_rst(
        ROUTER,
        GUEST,
        sa("2001:db8::1", 80),
        sa("fd00::15", 4000),
        TcpSeqNumber(9),
    );
    let ip = Ipv6::parse(&rst[14..]).unwrap();
    assert!(ip.checksum_ok() && ip.payload[13] == 0x14);
    assert_eq!(&ip.payload[8..12], &10i32.to_be_bytes());
    let u = icmp6_unreachable(
        ROUTER,
        GUEST,
        a("fd00::2"),
        sa("fd00::15", 4000),
        sa("2001:db8::1", 53),
        3,
        1,
    );
    let ip = Ipv6::parse(&u[14..]).unwrap();
    assert!(ip.checksum_ok());
    assert_eq!((ip.payload[0], ip.payload[1]), (1, 1));
    let na = guest_advert((GUEST, a("fd00::15")), ROUTER, a("fd00::2"));
    assert!(Ipv6::parse(&na[14..]).unwrap().checksum_ok());
    let mut echo = vec![129, 0, 0, 0, 0, 7, 0, 1, 0xa5];
    let r = echo6_reply(
        ROUTER,
        GUEST,
        a("2001:db8::1"),
        a("fd00::15"),
        &echo,
        0x4242,
    )
    .unwrap();
    let ip = Ipv6::parse(&r[14..]).unwrap();
    assert!(ip.checksum_ok() && ip.payload[4..6] == [0x42, 0x42]);
    echo[0] = 128;
    assert!(echo6_reply(ROUTER, GUEST, a("2001:db8::1"), a("fd00::15"), &echo, 1).is_none());
}

#[test]
fn control_frames_and_hostile_ones_are_told_apart() {
    // A TCP SYN to the far side; one with a bad checksum.
    let syn = |src: &str, dst: &str| {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&4000u16.to_be_bytes());
        b[2..4].copy_from_slice(&80u16.to_be_bytes());
        b[12] = 5 << 4;
        b[13] = 0x02;
        frame6(GUEST, ROUTER, a(src), a(dst), IPPROTO_TCP, b, 16)
    };
    assert!(matches!(
        classify(&syn("fd00::15", "2001:db8::1")),
        Classified6::TcpSyn { .. }
    ));
    let mut bad = syn("fd00::15", "2001:db8::1").to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(classify(&bad), Classified6::Malformed));
    for (src, dst, want) in [
        ("fd00::", "2001:db8::1", DropReason::BadSource),
        ("fd00::3", "2001:db8::1", DropReason::BadSource),
        ("2001:db8::9", "2001:db8::1", DropReason::BadSource),
        ("fd00::15", "::1", DropReason::Loopback),
        ("fd00::15", "::ffff:10.0.0.1", DropReason::MartianDst),
        ("fd00::15", "::", DropReason::MartianDst),
    ] {
        match classify(&syn(src, dst)) {
            Classified6::Dropped(r) => assert_eq!(r, want, "{src} -> {dst}"),
            other => panic!("{src} -> {dst}: {other:?}"),
        }
    }
    // Echo to the gateway and DHCPv6 to the router are the service's; echo beyond a flow.
    let echo = |dst: &str| {
        frame6(
            GUEST,
            ROUTER,
            a("fd00::15"),
            a(dst),
            IPPROTO_ICMPV6,
            vec![128, 0, 0, 0, 0, 1, 0, 1],
            2,
        )
    };
    assert!(matches!(classify(&echo("fd00::2")), Classified6::Control));
    assert!(matches!(
        classify(&echo("2001:db8::1")),
        Classified6::Echo(GuestEcho { ident: 1, .. })
    ));
    // Frames not to the router's MAC are ignored unless multicast.
    let f = echo("2001:db8::1");
    let c: &'static RouterConfig = Box::leak(Box::new(cfg()));
    assert!(matches!(
        classify6(&f[14..], GUEST, false, c, |_| false),
        Classified6::Ignore
    ));
}

#[test]
fn truncated_and_random_frames_never_panic() {
    let f = udp6_frame(
        GUEST,
        ROUTER,
        sa("fd00::15", 5000),
        sa("2001:db8::1", 53),
        b"payload",
    );
    for n in 14..f.len() {
        let _ = classify(&f[..n]);
    }
    let mut x: u32 = 11;
    for n in 0..2000usize {
        let mut b = f.to_vec();
        for _ in 0..(n % 6 + 1) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let i = 14 + (x as usize >> 8) % (b.len() - 14);
            b[i] = (x >> 16) as u8;
        }
        b.truncate(14 + n % (b.len() - 13));
        let _ = classify(&b);
    }
}
