//! Unit tests of the IPv6 service: RAs for solicitations (and their options), NAs
//! for netd's own addresses only, DHCPv6 stateless and stateful, and hostile input
//! counted and dropped.

use super::wire::{emit_frame, link_local, multicast_mac, nd_options, Ipv6};
use super::*;

const GUEST: [u8; 6] = [0x52, 0x54, 0, 0, 0, 7];
const SVC: [u8; 6] = [0x02, 0x4e, 1, 2, 3, 4];

fn spec(range: bool) -> Ipv6Spec {
    Ipv6Spec {
        prefix: "fd42::".parse().unwrap(),
        gateway: "fd42::1".parse().unwrap(),
        dns: Some("fd42::53".parse().unwrap()),
        range: range.then(|| ("fd42::100".parse().unwrap(), "fd42::101".parse().unwrap())),
        lease_time: 3600,
    }
}

fn svc(range: bool, own_gateway: bool) -> Ipv6Service {
    Ipv6Service::new(
        spec(range),
        SVC,
        1500,
        own_gateway,
        dhcp6::Lease6Db::default(),
    )
}

fn icmp_frame(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, body: Vec<u8>) -> Vec<u8> {
    emit_frame(
        multicast_mac(dst),
        GUEST,
        src,
        dst,
        IPPROTO_ICMPV6,
        hop,
        body,
        2,
    )
}

fn rs(hop: u8) -> Vec<u8> {
    let mut b = vec![icmp::RS, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    b.extend_from_slice(&GUEST);
    icmp_frame(link_local(GUEST), "ff02::2".parse().unwrap(), hop, b)
}

fn ns(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut b = vec![icmp::NS, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&target.octets());
    if !src.is_unspecified() {
        b.extend_from_slice(&[1, 1]);
        b.extend_from_slice(&GUEST);
    }
    icmp_frame(src, wire::solicited_node(target), 255, b)
}

#[test]
fn a_solicitation_gets_one_advert_with_prefix_mtu_and_rdnss() {
    let mut s = svc(false, false);
    let t0 = Instant::now();
    let out = s.handle_frame(&rs(255), t0, 0);
    assert_eq!(out.len(), 1);
    let ip = Ipv6::parse(&out[0][14..]).unwrap();
    assert!(ip.checksum_ok());
    assert_eq!(
        (ip.src, ip.dst, ip.hop_limit),
        (link_local(SVC), ALL_NODES, 255)
    );
    assert_eq!(ip.payload[0], icmp::RA);
    assert_eq!(ip.payload[5], 0x40, "O flag (DNS), no M flag");
    assert_eq!(&ip.payload[6..8], &[0, 0], "router lifetime 0");
    let opts = nd_options(&ip.payload[16..]).unwrap();
    let kinds: Vec<u8> = opts.iter().map(|o| o.0).collect();
    assert_eq!(kinds, vec![1, 5, 3, 25]);
    let prefix = opts[2].1;
    assert_eq!((prefix[0], prefix[1]), (64, 0xc0), "on-link, autonomous");
    assert_eq!(&prefix[14..30], &spec(false).prefix.octets());
    assert_eq!(&opts[3].1[6..22], &spec(false).dns.unwrap().octets());
    // A second solicitation at once is not answered (flood bound), later it is.
    assert!(s.handle_frame(&rs(255), t0, 0).is_empty());
    assert_eq!(s.stats.rs_limited, 1);
    assert_eq!(s.handle_frame(&rs(255), t0 + RS_ANSWER_GAP, 0).len(), 1);
    // Off-link (hop limit not 255) solicitations are malformed.
    assert!(s
        .handle_frame(&rs(64), t0 + RS_ANSWER_GAP * 4, 0)
        .is_empty());
    assert_eq!(s.stats.malformed, 1);
    // Stateful: M flag, prefix not autonomous.
    let ra = svc(true, false).router_advert();
    let ip = Ipv6::parse(&ra[14..]).unwrap();
    assert_eq!(ip.payload[5], 0xc0);
}

#[test]
fn neighbor_solicitations_are_answered_for_own_addresses_only() {
    let gw: Ipv6Addr = "fd42::1".parse().unwrap();
    let me = "fd42::7".parse().unwrap();
    let mut host_owned = svc(false, false);
    assert!(host_owned
        .handle_frame(&ns(me, gw), Instant::now(), 0)
        .is_empty());
    let mut internal = svc(false, true);
    let out = internal.handle_frame(&ns(me, gw), Instant::now(), 0);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][0..6], &GUEST);
    let ip = Ipv6::parse(&out[0][14..]).unwrap();
    assert_eq!((ip.payload[0], ip.payload[4]), (icmp::NA, 0x60));
    assert_eq!(&ip.payload[8..24], &gw.octets());
    assert_eq!(&ip.payload[26..32], &SVC);
    // DAD for the link-local: defended to all nodes.
    let out = internal.handle_frame(
        &ns(Ipv6Addr::UNSPECIFIED, link_local(SVC)),
        Instant::now(),
        0,
    );
    assert_eq!(Ipv6::parse(&out[0][14..]).unwrap().dst, ALL_NODES);
    assert!(internal
        .handle_frame(&ns(me, "fd42::9".parse().unwrap()), Instant::now(), 0)
        .is_empty());
}

fn dhcp6(kind: u8, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![0x02, 0x22, 0x02, 0x23, 0, 0, 0, 0, kind, 1, 2, 3];
    b.extend_from_slice(&[0, 1, 0, 10, 0, 3, 0, 1]);
    b.extend_from_slice(&GUEST);
    b.extend_from_slice(extra);
    let l = (b.len() as u16).to_be_bytes();
    b[4..6].copy_from_slice(&l);
    let dst: Ipv6Addr = "ff02::1:2".parse().unwrap();
    emit_frame(
        multicast_mac(dst),
        GUEST,
        link_local(GUEST),
        dst,
        IPPROTO_UDP,
        1,
        b,
        6,
    )
}

const IA: [u8; 16] = [0, 3, 0, 12, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn dhcp6_stateless_and_stateful_with_rapid_commit() {
    let mut s = svc(false, false);
    let out = s.handle_frame(&dhcp6(11, &[]), Instant::now(), 100);
    let ip = Ipv6::parse(&out[0][14..]).unwrap();
    assert!(ip.checksum_ok());
    assert_eq!(
        &ip.payload[..4],
        &[2, 0x23, 2, 0x22],
        "from port 547 to 546"
    );
    let body = &ip.payload[8..];
    assert_eq!(body[0], 7);
    let dns = "fd42::53".parse::<Ipv6Addr>().unwrap().octets();
    assert!(body.windows(16).any(|w| w == dns));
    assert!(
        s.handle_frame(&dhcp6(1, &IA), Instant::now(), 100)
            .is_empty(),
        "stateless: no IA_NA"
    );

    let mut s = svc(true, false);
    let out = s.handle_frame(&dhcp6(1, &IA), Instant::now(), 100);
    assert_eq!(
        Ipv6::parse(&out[0][14..]).unwrap().payload[8],
        2,
        "Advertise"
    );
    assert!(
        s.dhcp6.db.leases().is_empty(),
        "an Advertise commits nothing"
    );
    let mut rapid = IA.to_vec();
    rapid.extend_from_slice(&[0, 14, 0, 0]);
    let out = s.handle_frame(&dhcp6(1, &rapid), Instant::now(), 100);
    assert_eq!(Ipv6::parse(&out[0][14..]).unwrap().payload[8], 7, "Reply");
    let l = &s.dhcp6.db.leases()[0];
    assert_eq!(l.ip, "fd42::100".parse::<Ipv6Addr>().unwrap());
    assert_eq!(l.mac, "52:54:00:00:00:07");
    // Malformed: option length past the end, no client id, truncated.
    let mut bad = dhcp6(11, &[0, 23, 0, 40]);
    let n = bad.len();
    bad.truncate(n);
    for f in [bad, dhcp6(11, &[])[..60].to_vec()] {
        assert!(s.handle_frame(&f, Instant::now(), 100).is_empty());
    }
    assert!(s.dhcp6.malformed >= 1);
}

#[test]
fn random_frames_never_panic() {
    let mut s = svc(true, true);
    let base = [
        rs(255),
        ns(link_local(GUEST), "fd42::1".parse().unwrap()),
        dhcp6(1, &IA),
    ];
    let mut x: u32 = 1;
    for i in 0..6000 {
        let mut f = base[i % 3].clone();
        for _ in 0..3 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let at = 54 + (x as usize >> 8) % (f.len() - 54);
            f[at] = (x >> 16) as u8;
        }
        f.truncate(54 + (x as usize) % (f.len() - 53));
        let _ = s.handle_frame(&f, Instant::now(), 5);
    }
}

fn server_id() -> Vec<u8> {
    let mut v = vec![0, 2, 0, 10, 0, 3, 0, 1];
    v.extend_from_slice(&SVC);
    v
}

#[test]
fn dhcp6_request_renew_release_and_the_lease_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases6-t.json");
    let db = dhcp6::Lease6Db::load(Some(path.clone())).unwrap();
    let mut s = Ipv6Service::new(spec(true), SVC, 1500, false, db);
    let mut req = IA.to_vec();
    req.extend_from_slice(&server_id());
    // A Request without the server's id is refused; with it, a Reply and a lease.
    assert!(s
        .handle_frame(&dhcp6(3, &IA), Instant::now(), 100)
        .is_empty());
    let out = s.handle_frame(&dhcp6(3, &req), Instant::now(), 100);
    assert_eq!(Ipv6::parse(&out[0][14..]).unwrap().payload[8], 7);
    s.dhcp6.save_if_changed().unwrap();
    let on_disk = dhcp6::Lease6Db::load(Some(path.clone())).unwrap();
    assert_eq!(on_disk.leases().len(), 1, "the lease survives a restart");
    assert_eq!(on_disk.leases()[0].expires, 100 + 3600);
    // Renew later: the same address, a later end.
    s.handle_frame(&dhcp6(5, &req), Instant::now(), 2000);
    assert_eq!(s.dhcp6.db.leases()[0].expires, 2000 + 3600);
    assert_eq!(s.dhcp6.db.leases().len(), 1);
    // Another server's Request is not for us.
    let mut other = IA.to_vec();
    other.extend_from_slice(&[0, 2, 0, 4, 0, 3, 0, 9]);
    assert!(s
        .handle_frame(&dhcp6(3, &other), Instant::now(), 100)
        .is_empty());
    // Release ends it, on disk too.
    s.handle_frame(&dhcp6(8, &req), Instant::now(), 2100);
    assert!(s.dhcp6.db.leases().is_empty());
    s.dhcp6.save_if_changed().unwrap();
    assert!(dhcp6::Lease6Db::load(Some(path.clone()))
        .unwrap()
        .leases()
        .is_empty());
    // A corrupt lease file is an error, not an empty list.
    std::fs::write(&path, b"{not json").unwrap();
    assert!(dhcp6::Lease6Db::load(Some(path)).is_err());
}
