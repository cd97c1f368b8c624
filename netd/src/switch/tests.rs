//! Unit tests of the switch: flooding and learning, drops by reason, the bounded
//! and ageing MAC table, port removal, service ports.

use super::*;
use bytes::Bytes;
use std::sync::Mutex as StdMutex;

#[derive(Default)]
struct Sink(StdMutex<Vec<Vec<u8>>>);
struct SinkTx(Arc<Sink>);
impl PortTx for SinkTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.0 .0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(ETH_HLEN)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
const BCAST: [u8; 6] = [0xff; 6];

fn net3() -> (Arc<Network>, Vec<Arc<Port>>, Vec<Arc<Sink>>) {
    let net = Network::new("n", 1500, 16, Duration::from_secs(300));
    let mut ports = vec![];
    let mut sinks = vec![];
    for i in 0..3 {
        let s = Arc::new(Sink::default());
        ports.push(
            net.add_port(
                &format!("p{i}"),
                PortClass::Tap,
                Box::new(SinkTx(s.clone())),
            )
            .unwrap(),
        );
        sinks.push(s);
    }
    (net, ports, sinks)
}

fn count(s: &Sink) -> usize {
    s.0.lock().unwrap().len()
}

#[test]
fn floods_unknown_then_forwards_learned() {
    let (net, p, s) = net3();
    net.ingress(&p[0], &frame(B, A, 60));
    assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (0, 1, 1));
    net.ingress(&p[1], &frame(A, B, 60));
    assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 1, 1));
    net.ingress(&p[0], &frame(B, A, 60));
    assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 2, 1));
    net.ingress(&p[0], &frame(BCAST, A, 60));
    assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 3, 2));
    let c = p[0].counters.snapshot();
    assert_eq!(c.rx_frames, 3);
    assert_eq!(p[1].counters.snapshot().tx_frames, 3);
    let table = net.mac_table();
    assert_eq!(table.len(), 2);
}

#[test]
fn malformed_and_mtu_are_counted_not_forwarded() {
    let (net, p, s) = net3();
    net.ingress(&p[0], &[1, 2, 3]);
    net.ingress(&p[0], &[]);
    net.ingress(&p[0], &frame(B, BCAST, 60));
    net.ingress(&p[0], &frame(B, A, 1515));
    net.ingress(&p[0], &frame(B, A, 1514));
    let c = p[0].counters.snapshot();
    assert_eq!(c.drop_malformed, 3);
    assert_eq!(c.drop_mtu, 1);
    assert_eq!(c.rx_frames, 1);
    assert_eq!(count(&s[1]), 1);
}

#[test]
fn removed_port_forgets_macs_and_hairpin_is_dropped() {
    let (net, p, s) = net3();
    net.ingress(&p[1], &frame(BCAST, B, 60));
    net.ingress(&p[1], &frame(B, A, 60));
    assert_eq!(p[1].counters.snapshot().drop_hairpin, 1);
    net.remove_port("p1").unwrap();
    assert!(net.mac_table().is_empty());
    net.ingress(&p[0], &frame(B, A, 60));
    assert_eq!(count(&s[2]), 2);
    assert!(net.remove_port("p1").is_err());
}

#[test]
fn service_port_moves_frames_both_ways_and_counts_full() {
    let (net, p, s) = net3();
    let mut svc = net.attach_service("svc", 1).unwrap();
    net.ingress(&p[0], &frame(BCAST, A, 60));
    net.ingress(&p[0], &frame(BCAST, A, 60));
    let got = svc.from_switch.try_recv().unwrap();
    assert_eq!(&got[0..6], &BCAST);
    assert_eq!(net.port("svc").unwrap().counters.snapshot().drop_full, 1);
    svc.to_switch
        .blocking_send(Bytes::from(frame(A, B, 60)))
        .unwrap();
    let ok = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        count(&s[0]) == 1
    });
    assert!(ok, "service frame reached the learned port");
    drop(svc);
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(5));
        net.port("svc").is_none()
    });
    assert!(
        gone,
        "service port removed when the service drops its sender"
    );
}

#[test]
fn port_kinds_keep_their_json_names() {
    // `netd port list --json` is read by scripts: the kind stays a plain string.
    for (class, name) in [
        (PortClass::Tap, "tap"),
        (PortClass::Vm, "vm"),
        (PortClass::Stream, "stream"),
        (PortClass::Host, "host"),
        (PortClass::Uplink, "uplink"),
        (PortClass::Service, "service"),
    ] {
        assert_eq!(serde_json::to_value(class).unwrap(), name);
        assert_eq!(class.to_string(), name);
        let back: PortClass = serde_json::from_value(name.into()).unwrap();
        assert_eq!(back, class);
    }
    let (net, _p, _s) = net3();
    let json = serde_json::to_string(&net.port_infos()[0]).unwrap();
    assert!(
        json.starts_with(r#"{"name":"p0","kind":"tap","mtu":1500,"#),
        "{json}"
    );
}

#[test]
fn isolation_lets_guest_frames_reach_services_only() {
    let (net, p, s) = net3();
    let (svc, mut from_switch) = net.attach_service_direct("svc", 8, false).unwrap();
    net.set_isolated(true);
    net.ingress(&p[0], &frame(BCAST, A, 60));
    assert_eq!(
        (count(&s[1]), count(&s[2])),
        (0, 0),
        "no guest port gets it"
    );
    assert_eq!(&from_switch.try_recv().unwrap()[6..12], &A);
    // A service's frames still reach every port.
    svc.send(&frame(BCAST, B, 60));
    assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 1, 1));
    net.set_isolated(false);
    net.ingress(&p[0], &frame(BCAST, A, 60));
    assert_eq!((count(&s[1]), count(&s[2])), (2, 2));
}

/// A guarded network: a service port "svc" whose MAC is pinned, and guest ports
/// p0..p2 with `guard = "clean"` (p2 configured with MAC B).
/// A network, its service port, its guest ports, and every port's sink.
type Guarded = (Arc<Network>, Arc<Port>, Vec<Arc<Port>>, Vec<Arc<Sink>>);

fn guarded() -> Guarded {
    let net = Network::new("g", 1500, 64, Duration::from_secs(300));
    net.set_guard_default(Guard::Clean);
    net.set_max_macs_per_port(4);
    let svc_sink = Arc::new(Sink::default());
    let svc = net
        .add_port(
            "svc",
            PortClass::Service,
            Box::new(SinkTx(svc_sink.clone())),
        )
        .unwrap();
    net.pin_mac("svc", SVC).unwrap();
    let mut ports = vec![];
    let mut sinks = vec![svc_sink];
    for i in 0..3 {
        let s = Arc::new(Sink::default());
        let mac = (i == 2).then_some(B);
        ports.push(
            net.add_port_with(
                &format!("p{i}"),
                PortClass::Tap,
                Box::new(SinkTx(s.clone())),
                None,
                mac,
            )
            .unwrap(),
        );
        sinks.push(s);
    }
    (net, svc, ports, sinks)
}

const SVC: [u8; 6] = [2, 0x4e, 0, 0, 0, 2];
const C: [u8; 6] = [2, 0, 0, 0, 0, 0xc];

fn c(p: &Port) -> CountersSnapshot {
    p.counters.snapshot()
}

#[test]
fn a_guest_cannot_send_from_a_service_mac_or_another_guests() {
    let (net, svc, p, s) = guarded();
    // The service speaks first; p0 locks to A.
    net.ingress(&svc, &frame(BCAST, SVC, 60));
    net.ingress(&p[0], &frame(BCAST, A, 60));
    assert_eq!(p[0].guard.locked_mac(), Some(A));
    // p1 sends from the router's MAC: dropped, and the router's MAC stays put.
    net.ingress(&p[1], &frame(BCAST, SVC, 60));
    assert_eq!(c(&p[1]).drop_spoofed_mac, 1);
    net.ingress(&p[0], &frame(SVC, A, 60));
    assert_eq!(
        count(&s[0]),
        2,
        "p0's broadcast and unicast reach the router"
    );
    // p1 sends from A (p0's) and from B (p2's configured MAC): dropped.
    net.ingress(&p[1], &frame(BCAST, A, 60));
    net.ingress(&p[1], &frame(BCAST, B, 60));
    assert_eq!(c(&p[1]).drop_spoofed_mac, 3);
    assert_eq!(p[1].guard.locked_mac(), None);
    // p1 locks to C; then it may not change MAC.
    net.ingress(&p[1], &frame(BCAST, C, 60));
    net.ingress(&p[1], &frame(BCAST, [2, 0, 0, 0, 0, 0xd], 60));
    assert_eq!(c(&p[1]).drop_spoofed_mac, 4);
    assert_eq!(p[1].guard.locked_mac(), Some(C));
    // p2 (configured B) may not send from anything else, even before it spoke.
    net.ingress(&p[2], &frame(BCAST, C, 60));
    assert_eq!(c(&p[2]).drop_spoofed_mac, 1);
    net.ingress(&p[2], &frame(A, B, 60));
    assert_eq!(
        count(&s[1]),
        3,
        "B's unicast to A reaches p0 (+2 floods seen)"
    );
    let t = net.mac_table();
    let on = |m: [u8; 6]| {
        t.iter()
            .find(|e| e.mac == crate::config::fmt_mac(&m))
            .map(|e| e.port.clone())
    };
    assert_eq!(on(SVC).as_deref(), Some("svc"));
    assert_eq!(on(A).as_deref(), Some("p0"));
    assert_eq!(on(C).as_deref(), Some("p1"));
}

#[test]
fn an_unguarded_port_holds_at_most_its_cap_of_macs() {
    let (net, _svc, _p, _s) = guarded();
    let s = Arc::new(Sink::default());
    let off = net
        .add_port_with(
            "off",
            PortClass::Tap,
            Box::new(SinkTx(s)),
            Some(Guard::Off),
            None,
        )
        .unwrap();
    for i in 0..100u8 {
        net.ingress(&off, &frame(BCAST, [2, 1, 0, 0, 0, i], 60));
    }
    assert_eq!(c(&off).drop_mac_limit, 96);
    assert_eq!(c(&off).rx_frames, 4);
    assert_eq!(
        net.mac_table().iter().filter(|e| e.port == "off").count(),
        4
    );
    // The pinned MAC is refused on it too.
    net.ingress(&off, &frame(BCAST, SVC, 60));
    assert_eq!(c(&off).drop_spoofed_mac, 1);
}

#[test]
fn ipv4_sources_and_arp_follow_the_address_table() {
    let (net, _svc, p, _s) = guarded();
    let gw = std::net::Ipv4Addr::new(10, 5, 0, 1);
    let g = Arc::new(IpGuard::new(
        std::net::Ipv4Addr::new(10, 5, 0, 0),
        24,
        &[gw],
        &[],
        Duration::from_secs(300),
    ));
    net.set_ip_guard(g.clone());
    let ip = |n| std::net::Ipv4Addr::new(10, 5, 0, n);
    g.set_leases([(A, ip(50), u64::MAX)]);
    let udp = |src_mac, src| crate::wire::emit_udp_frame(BCAST, src_mac, src, ip(255), 1, 2, b"x");
    net.ingress(&p[0], &udp(A, ip(50)));
    assert_eq!(c(&p[0]).rx_frames, 1);
    net.ingress(&p[0], &udp(A, ip(51)));
    net.ingress(&p[0], &udp(A, gw));
    assert_eq!(c(&p[0]).drop_spoofed_ip, 2);
    // p1 (no lease) binds its first free address; A's lease is not free.
    net.ingress(&p[1], &udp(C, ip(50)));
    assert_eq!(c(&p[1]).drop_spoofed_ip, 1);
    net.ingress(&p[1], &udp(C, ip(60)));
    net.ingress(&p[1], &udp(C, ip(60)));
    assert_eq!(c(&p[1]).rx_frames, 2);
    net.ingress(&p[1], &udp(C, ip(61)));
    assert_eq!(c(&p[1]).drop_spoofed_ip, 2, "one static address per MAC");
}

/// The table entry of `m`: (port name, remote).
fn where_is(net: &Network, m: [u8; 6]) -> Option<(String, Option<String>)> {
    net.mac_table()
        .into_iter()
        .find(|e| e.mac == crate::config::fmt_mac(&m))
        .map(|e| (e.port, e.remote))
}

#[test]
fn a_mac_moves_between_local_ports_and_remote_vteps_without_being_stolen() {
    let (net, _svc, p, s) = guarded();
    let vs = Arc::new(Sink::default());
    let vx = net
        .add_port("vx", PortClass::Vxlan, Box::new(SinkTx(vs.clone())))
        .unwrap();
    let (r1, r2) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
    let rarp = |m: [u8; 6]| {
        let mut f = frame(BCAST, m, 60);
        f[12..14].copy_from_slice(&[0x80, 0x35]);
        f
    };
    // p0 is A's; the VM with MAC C runs behind remote r1 (host A of a migration).
    net.ingress(&p[0], &frame(BCAST, A, 60));
    net.ingress_remote(&vx, &frame(BCAST, C, 60), None, Some(r1));
    assert_eq!(where_is(&net, C), Some(("vx".into(), Some(r1.to_string()))));
    // It arrives on p1 (no configured MAC): its RARP locks p1 and moves the entry.
    net.ingress(&p[1], &rarp(C));
    assert_eq!(c(&p[1]).drop_spoofed_mac, 0);
    assert_eq!(p[1].guard.locked_mac(), Some(C));
    assert_eq!(where_is(&net, C), Some(("p1".into(), None)));
    let before = count(&s[2]);
    net.ingress(&p[0], &frame(C, A, 60));
    assert_eq!(count(&s[2]), before + 1, "unicast to C goes to p1 now");
    // A local guest on a new port cannot take C: p1 holds it.
    let s3 = Arc::new(Sink::default());
    let p3 = net
        .add_port("p3", PortClass::Tap, Box::new(SinkTx(s3.clone())))
        .unwrap();
    net.ingress(&p3, &rarp(C));
    assert_eq!(c(&p3).drop_spoofed_mac, 1);
    // C leaves for remote r2: the entry follows its frame, p1 keeps its lock...
    net.ingress_remote(&vx, &rarp(C), None, Some(r2));
    assert_eq!(where_is(&net, C), Some(("vx".into(), Some(r2.to_string()))));
    assert_eq!(p[1].guard.locked_mac(), Some(C));
    let sent = count(&vs);
    net.ingress(&p[0], &frame(C, A, 60));
    assert_eq!(count(&vs), sent + 1, "unicast to C goes to the tunnel");
    // ... so another local guest still cannot take C, while C may come back to p1.
    net.ingress(&p3, &rarp(C));
    assert_eq!(c(&p3).drop_spoofed_mac, 2);
    assert_eq!(p3.guard.locked_mac(), None);
    net.ingress(&p[1], &rarp(C));
    assert_eq!(where_is(&net, C), Some(("p1".into(), None)));
    assert_eq!(c(&p[1]).drop_spoofed_mac, 0);
    // Away again, and p1 deleted (its VMM gone): C may come back on a new port.
    net.ingress_remote(&vx, &rarp(C), None, Some(r1));
    net.remove_port("p1").unwrap();
    net.ingress(&p3, &rarp(C));
    assert_eq!(c(&p3).drop_spoofed_mac, 2);
    assert_eq!(p3.guard.locked_mac(), Some(C));
    assert_eq!(where_is(&net, C), Some(("p3".into(), None)));
    // p2 is configured with B: a move to a remote takes the entry, never the
    // binding, and nobody else here may use B.
    net.ingress(&p[2], &frame(BCAST, B, 60));
    net.ingress_remote(&vx, &rarp(B), None, Some(r2));
    assert_eq!(where_is(&net, B), Some(("vx".into(), Some(r2.to_string()))));
    net.ingress(&p[0], &rarp(B));
    assert_eq!(c(&p[0]).drop_spoofed_mac, 1, "p0 is A's");
    net.ingress(&p[2], &frame(BCAST, B, 60));
    assert_eq!(where_is(&net, B), Some(("p2".into(), None)));
    // A service's MAC never moves to the tunnel.
    net.ingress_remote(&vx, &rarp(SVC), None, Some(r1));
    assert_eq!(c(&vx).drop_spoofed_mac, 1);
    assert_eq!(where_is(&net, SVC), Some(("svc".into(), None)));
}

#[test]
fn a_learned_lock_ages_out_after_its_mac_went_remote() {
    let net = Network::new("g", 1500, 64, Duration::from_millis(200));
    net.set_guard_default(Guard::Clean);
    let tx = || Box::new(SinkTx(Arc::new(Sink::default())));
    let p0 = net.add_port("p0", PortClass::Vm, tx()).unwrap();
    let p1 = net.add_port("p1", PortClass::Vm, tx()).unwrap();
    let vx = net.add_port("vx", PortClass::Vxlan, tx()).unwrap();
    net.ingress(&p0, &frame(BCAST, A, 60));
    net.ingress_remote(&vx, &frame(BCAST, A, 60), None, None);
    net.ingress(&p1, &frame(BCAST, A, 60));
    assert_eq!(c(&p1).drop_spoofed_mac, 1, "p0's lock is live");
    std::thread::sleep(Duration::from_millis(250));
    // p0's lock aged; the remote entry too: the MAC is free on this host.
    net.ingress(&p1, &frame(BCAST, A, 60));
    assert_eq!(c(&p1).drop_spoofed_mac, 1);
    assert_eq!(p1.guard.locked_mac(), Some(A));
}
