use std::sync::atomic::Ordering;

use super::wire::tests::query;
use super::wire::{TYPE_A, TYPE_AAAA, TYPE_PTR};
use super::*;

fn names() -> Arc<LocalNames> {
    LocalNames::new(Zone {
        domain: "lab0.lab".into(),
        hosts: vec![("files".into(), Ipv4Addr::new(10, 0, 2, 9))],
        subnet: (Ipv4Addr::new(10, 0, 2, 0), 24),
    })
}

/// The reply's rcode and its A / PTR data (the bytes after the question).
fn decode(a: Answer, qlen: usize) -> (u8, Vec<u8>) {
    match a {
        Answer::Local(r) => (r[3] & 0xf, r[qlen..].to_vec()),
        other => panic!("not a local answer: {other:?}"),
    }
}

#[test]
fn answers_names_under_the_domain_and_bare_labels() {
    let n = names();
    n.set_leases([("Alpha", Ipv4Addr::new(10, 0, 2, 15), 100)].into_iter());
    for name in ["alpha.lab0.lab", "ALPHA.Lab0.LAB", "alpha"] {
        let q = query(name, TYPE_A);
        let (rcode, rest) = decode(n.answer(&q, 50), q.len());
        assert_eq!(rcode, 0, "{name}");
        assert_eq!(&rest[rest.len() - 4..], &[10, 0, 2, 15], "{name}");
    }
    let q = query("files.lab0.lab", TYPE_A);
    let (_, rest) = decode(n.answer(&q, 50), q.len());
    assert_eq!(&rest[rest.len() - 4..], &[10, 0, 2, 9], "static entry");
    // AAAA of a known name: NOERROR, no answer.
    let q = query("alpha.lab0.lab", TYPE_AAAA);
    assert_eq!(decode(n.answer(&q, 50), q.len()), (0, vec![]));
    // Unknown in the domain, unknown bare label, deeper name: NXDOMAIN.
    for name in ["nobody.lab0.lab", "nobody", "x.alpha.lab0.lab"] {
        let q = query(name, TYPE_A);
        assert_eq!(decode(n.answer(&q, 50), q.len()).0, 3, "{name}");
    }
    // The lease ended: gone.
    let q = query("alpha", TYPE_A);
    assert_eq!(decode(n.answer(&q, 100), q.len()).0, 3);
    // Elsewhere: forwarded.
    assert_eq!(
        n.answer(&query("www.fabric.test", TYPE_A), 50),
        Answer::Forward
    );
    let c = &n.counters;
    assert_eq!(c.nxdomain.load(Ordering::Relaxed), 4);
    assert_eq!(c.forwarded.load(Ordering::Relaxed), 1);
    assert_eq!(c.answered.load(Ordering::Relaxed), 9);
}

#[test]
fn ptr_answers_inside_the_subnet_only() {
    let n = names();
    n.set_leases([("alpha", Ipv4Addr::new(10, 0, 2, 15), 100)].into_iter());
    let q = query("15.2.0.10.in-addr.arpa", TYPE_PTR);
    let (rcode, rest) = decode(n.answer(&q, 50), q.len());
    assert_eq!(rcode, 0);
    assert!(rest.ends_with(b"\x05alpha\x04lab0\x03lab\x00"), "{rest:?}");
    let q = query("9.2.0.10.in-addr.arpa", TYPE_PTR);
    let (_, rest) = decode(n.answer(&q, 50), q.len());
    assert!(rest.ends_with(b"\x05files\x04lab0\x03lab\x00"));
    let q = query("77.2.0.10.in-addr.arpa", TYPE_PTR);
    assert_eq!(decode(n.answer(&q, 50), q.len()).0, 3);
    // Outside the subnet: not ours to answer.
    let q = query("8.0.200.10.in-addr.arpa", TYPE_PTR);
    assert_eq!(n.answer(&q, 50), Answer::Forward);
}

#[test]
fn hostile_names_are_refused_and_counted_and_the_newest_lease_wins() {
    let n = names();
    assert!(n.check_hostname("Beta-2"));
    for bad in [
        "",
        "-x",
        "x-",
        "a.b",
        "under_score",
        "files",
        &"a".repeat(64),
        "é",
    ] {
        assert!(!n.check_hostname(bad), "{bad:?}");
    }
    assert_eq!(n.counters.hostname_refused.load(Ordering::Relaxed), 8);
    n.set_leases(
        [
            ("dup", Ipv4Addr::new(10, 0, 2, 20), 200),
            ("dup", Ipv4Addr::new(10, 0, 2, 21), 300),
            ("dup", Ipv4Addr::new(10, 0, 2, 22), 250),
            ("files", Ipv4Addr::new(10, 0, 2, 23), 300),
            ("a.b", Ipv4Addr::new(10, 0, 2, 24), 300),
        ]
        .into_iter(),
    );
    let e = n.entries(0);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(
        (e[1].name.as_str(), e[1].ip),
        ("dup.lab0.lab", Ipv4Addr::new(10, 0, 2, 21))
    );
    assert_eq!(e[0].source, "static");
    // Bounded.
    let many: Vec<String> = (0..MAX_LEASE_NAMES + 10).map(|i| format!("h{i}")).collect();
    n.set_leases(
        many.iter()
            .map(|h| (h.as_str(), Ipv4Addr::new(10, 0, 2, 30), 100)),
    );
    assert_eq!(n.entries(0).len(), MAX_LEASE_NAMES + 1);
}

#[test]
fn malformed_queries_are_dropped_and_counted() {
    let n = names();
    let mut resp = query("alpha", TYPE_A);
    resp[2] |= 0x80;
    for b in [&b"\x00\x01"[..], &resp, &[0u8; 12]] {
        assert_eq!(n.answer(b, 0), Answer::Drop);
    }
    assert_eq!(n.counters.malformed.load(Ordering::Relaxed), 3);
    assert_eq!(n.counters.queries.load(Ordering::Relaxed), 0);
}

#[test]
fn labels_and_domains() {
    assert!(valid_label("a") && valid_label("web-1") && valid_label(&"x".repeat(63)));
    assert!(valid_domain("lab0.lab") && valid_domain("my_net.lab"));
    assert!(!valid_domain("a..b") && !valid_domain(".lab") && !valid_domain("a b"));
}

#[test]
fn aaaa_answers_the_addresses_the_ipv6_guard_binds_to_the_leases_mac() {
    use std::time::{Duration, Instant};
    let n = names();
    let (mac, other) = ([2, 0, 0, 0, 0, 0x15], [2, 0, 0, 0, 0, 0x16]);
    n.set_guest_leases(
        [
            ("alpha", Ipv4Addr::new(10, 0, 2, 15), 100, Some(mac)),
            ("beta", Ipv4Addr::new(10, 0, 2, 16), 100, Some(other)),
        ]
        .into_iter(),
    );
    let q = query("alpha.lab0.lab", TYPE_AAAA);
    assert_eq!(
        decode(n.answer(&q, 50), q.len()),
        (0, vec![]),
        "no IPv6 on the network: NOERROR, no data"
    );
    let gw: Ipv6Addr = "fd00::2".parse().unwrap();
    let g = Arc::new(Ip6Guard::new(
        "fd00::".parse().unwrap(),
        &[gw],
        Duration::from_secs(300),
    ));
    n.set_ipv6(g.clone());
    let slaac: Ipv6Addr = "fd00::ff:fe00:15".parse().unwrap();
    let now = Instant::now();
    for a in ["fe80::ff:fe00:15", "fd00::ff:fe00:15"] {
        assert!(g.allow(mac, a.parse().unwrap(), now, 50));
    }
    assert!(
        !g.allow(other, slaac, now, 50),
        "another guest cannot take it"
    );
    let (rcode, rest) = decode(n.answer(&q, 50), q.len());
    assert_eq!(rcode, 0);
    assert_eq!(&rest[rest.len() - 16..], &slaac.octets(), "{rest:?}");
    assert_eq!(
        rest.len(),
        12 + 16,
        "one record, the link-local one is not published"
    );
    // beta has no IPv6 address; ANY gives alpha's A and AAAA.
    let q = query("beta", TYPE_AAAA);
    assert_eq!(decode(n.answer(&q, 50), q.len()), (0, vec![]));
    let q = query("alpha", super::wire::TYPE_ANY);
    let (_, rest) = decode(n.answer(&q, 50), q.len());
    assert_eq!(rest.len(), (12 + 4) + (12 + 16));
    // Static entries have no MAC: no AAAA.
    let q = query("files", TYPE_AAAA);
    assert_eq!(decode(n.answer(&q, 50), q.len()), (0, vec![]));
}
