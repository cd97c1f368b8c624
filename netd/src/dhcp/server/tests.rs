//! Unit tests of the DHCP server: the DORA exchange, lease bookkeeping and its
//! persistence, and the bounds and counters on hostile clients.

use std::path::Path;

use super::*;
use crate::dhcp::message::tests::msg;
use crate::wire::Arp;

fn server(dir: Option<&Path>) -> DhcpServer {
    let v4 = Ipv4Spec {
        network: Ipv4Addr::new(10, 9, 0, 0),
        prefix: 24,
        gateway: Ipv4Addr::new(10, 9, 0, 1),
    };
    let spec = DhcpSpec {
        server: Ipv4Addr::new(10, 9, 0, 1),
        start: Ipv4Addr::new(10, 9, 0, 100),
        end: Ipv4Addr::new(10, 9, 0, 102),
        lease_time: 3600,
        dns: vec![Ipv4Addr::new(10, 9, 0, 1)],
        router: Some(Ipv4Addr::new(10, 9, 0, 1)),
        reservations: vec![DhcpReservation {
            mac: [2, 0, 0, 0, 0, 0x99],
            ip: Ipv4Addr::new(10, 9, 0, 50),
            hostname: None,
        }],
        domain: None,
    };
    let db = LeaseDb::load(dir.map(|d| d.join("leases.json"))).unwrap();
    DhcpServer::new(v4, spec, [2, 0, 0, 0, 0, 1], true, db)
}

/// A client's broadcast from 02:..:07, port 68 to 67, carrying `payload`.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    wire::emit_udp_frame(
        BROADCAST_MAC,
        [2, 0, 0, 0, 0, 7],
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
        payload,
    )
}

/// The type of `s`'s answer to `m` at `now` (the test fails on silence).
fn answer(s: &mut DhcpServer, m: &DhcpMessage, now: u64) -> MsgType {
    s.handle(m, now).expect("an answer").msg_type
}

fn sid() -> (u8, Vec<u8>) {
    (opt::SERVER_ID, vec![10, 9, 0, 1])
}
fn req_ip(ip: [u8; 4]) -> (u8, Vec<u8>) {
    (opt::REQUESTED_IP, ip.to_vec())
}

#[test]
fn full_exchange_with_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = server(Some(dir.path()));
    let offer = s.handle(&msg(MsgType::Discover, 7, vec![]), 1000).unwrap();
    assert_eq!(offer.msg_type, MsgType::Offer);
    assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
    assert_eq!(
        offer.option_ip(opt::SUBNET_MASK),
        Some(Ipv4Addr::new(255, 255, 255, 0))
    );
    assert_eq!(
        offer.option_ip(opt::ROUTER),
        Some(Ipv4Addr::new(10, 9, 0, 1))
    );
    assert_eq!(
        offer.option(opt::LEASE_TIME),
        Some(&3600u32.to_be_bytes()[..])
    );
    // A second client is offered a different address while the first offer holds.
    let o2 = s.handle(&msg(MsgType::Discover, 8, vec![]), 1000).unwrap();
    assert_eq!(o2.yiaddr, Ipv4Addr::new(10, 9, 0, 101));
    let ack = s
        .handle(
            &msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 100])]),
            1001,
        )
        .unwrap();
    assert_eq!(ack.msg_type, MsgType::Ack);
    assert_eq!(ack.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
    // Client 8 asking for client 7's address is refused.
    let taken = msg(MsgType::Request, 8, vec![sid(), req_ip([10, 9, 0, 100])]);
    assert_eq!(answer(&mut s, &taken, 1002), MsgType::Nak);
    // Out-of-subnet request (init-reboot from another network): NAK.
    let elsewhere = msg(MsgType::Request, 9, vec![req_ip([192, 168, 1, 5])]);
    assert_eq!(answer(&mut s, &elsewhere, 1002), MsgType::Nak);
    // Request for another server: silence.
    assert!(s
        .handle(
            &msg(
                MsgType::Request,
                8,
                vec![(opt::SERVER_ID, vec![10, 9, 0, 2]), req_ip([10, 9, 0, 101])]
            ),
            1002
        )
        .is_none());
    // What `run`'s writer does with a change: save it.
    assert!(s.take_changed());
    s.db.save().unwrap();
    // Restart: the lease is back, and the same client gets the same address.
    let mut s = server(Some(dir.path()));
    assert_eq!(s.db.leases().len(), 1);
    let o = s.handle(&msg(MsgType::Discover, 8, vec![]), 1100).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 101));
    let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 1100).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
    // Renewal (ciaddr, no requested IP option).
    let mut renew = msg(MsgType::Request, 7, vec![]);
    renew.ciaddr = Ipv4Addr::new(10, 9, 0, 100);
    assert_eq!(answer(&mut s, &renew, 1200), MsgType::Ack);
    // Release frees it for others.
    let mut rel = msg(MsgType::Release, 7, vec![sid()]);
    rel.ciaddr = Ipv4Addr::new(10, 9, 0, 100);
    assert!(s.handle(&rel, 1300).is_none());
    assert!(s.usable(Ipv4Addr::new(10, 9, 0, 100), &[2, 0, 0, 0, 0, 8], 1300));
}

#[test]
fn reservation_decline_inform_and_exhaustion() {
    let mut s = server(None);
    let o = s.handle(&msg(MsgType::Discover, 0x99, vec![]), 10).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 50));
    // Client 7 is offered .100 and declines it: .100 is kept out of use.
    let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 10).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
    assert!(s
        .handle(&msg(MsgType::Decline, 7, vec![req_ip([10, 9, 0, 100])]), 10)
        .is_none());
    let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 11).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 101));
    let o = s.handle(&msg(MsgType::Discover, 8, vec![]), 11).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 102));
    assert!(
        s.handle(&msg(MsgType::Discover, 9, vec![]), 11).is_none(),
        "pool exhausted"
    );
    let mut inf = msg(MsgType::Inform, 5, vec![]);
    inf.ciaddr = Ipv4Addr::new(10, 9, 0, 7);
    let a = s.handle(&inf, 12).unwrap();
    assert_eq!(a.msg_type, MsgType::Ack);
    assert!(a.option(opt::LEASE_TIME).is_none());
    assert_eq!(a.yiaddr, Ipv4Addr::UNSPECIFIED);
}

/// The names `s` publishes at `now`, as (name, address).
fn published(names: &crate::dns::LocalNames, now: u64) -> Vec<(String, Ipv4Addr)> {
    names
        .entries(now)
        .into_iter()
        .map(|e| (e.name, e.ip))
        .collect()
}

/// Gives `s` an empty names table of `lab.lab` to publish in, and returns it.
fn publish_names(s: &mut DhcpServer) -> Arc<crate::dns::LocalNames> {
    let names = crate::dns::LocalNames::new(crate::dns::Zone {
        domain: "lab.lab".into(),
        hosts: Vec::new(),
        subnet: (Ipv4Addr::new(10, 9, 0, 0), 24),
    });
    s.set_names(names.clone());
    names
}

#[test]
fn a_reservation_hostname_is_sent_and_published_instead_of_the_clients() {
    let mut s = server(None);
    let names = publish_names(&mut s);
    let sent = (opt::HOSTNAME, b"guestsays".to_vec());
    // No hostname on the reservation yet: no option 12; the client's name is used.
    let o = s.handle(&msg(MsgType::Discover, 0x99, vec![]), 10).unwrap();
    assert!(o.option(opt::HOSTNAME).is_none());
    let req = msg(
        MsgType::Request,
        0x99,
        vec![sid(), req_ip([10, 9, 0, 50]), sent.clone()],
    );
    assert_eq!(answer(&mut s, &req, 11), MsgType::Ack);
    s.sync_guard();
    let at = Ipv4Addr::new(10, 9, 0, 50);
    assert_eq!(published(&names, 12), [("guestsays.lab.lab".into(), at)]);
    // The reservation gains a hostname at runtime: DNS has it at once.
    let mut r = s.spec.reservations.clone();
    r[0].hostname = Some("db1".into());
    s.set_reservations(r);
    assert_eq!(published(&names, 12), [("db1.lab.lab".into(), at)]);
    // OFFER and ACK carry it, whatever the client sent.
    let o = s.handle(&msg(MsgType::Discover, 0x99, vec![]), 20).unwrap();
    assert_eq!(o.option(opt::HOSTNAME), Some(&b"db1"[..]));
    let ack = s.handle(&req, 21).unwrap();
    assert_eq!(ack.msg_type, MsgType::Ack);
    assert_eq!(ack.option(opt::HOSTNAME), Some(&b"db1"[..]));
    s.sync_guard();
    assert_eq!(published(&names, 22), [("db1.lab.lab".into(), at)]);
    // The lease still records what the client sent.
    assert_eq!(s.db.leases()[0].hostname.as_deref(), Some("guestsays"));
    // Other clients are not given the name.
    let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 22).unwrap();
    assert!(o.option(opt::HOSTNAME).is_none());
    // Only while the lease lasts.
    assert!(published(&names, 21 + 3600).is_empty());
    // The reservation removed: the client's own name again.
    s.set_reservations(Vec::new());
    assert_eq!(published(&names, 22), [("guestsays.lab.lab".into(), at)]);
}

#[test]
fn a_refused_hostname_is_counted_once_not_at_every_renewal() {
    let mut s = server(None);
    let names = publish_names(&mut s);
    let refused = || {
        names
            .counters
            .hostname_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mac = 7u8;
    let o = s.handle(&msg(MsgType::Discover, mac, vec![]), 10).unwrap();
    let req = |h: &[u8]| {
        msg(
            MsgType::Request,
            mac,
            vec![
                sid(),
                req_ip(o.yiaddr.octets()),
                (opt::HOSTNAME, h.to_vec()),
            ],
        )
    };
    for t in 0..3 {
        assert_eq!(answer(&mut s, &req(b"not a label"), 11 + t), MsgType::Ack);
    }
    assert_eq!(refused(), 1, "three ACKs of one bad name count once");
    assert_eq!(answer(&mut s, &req(b"bad_name"), 20), MsgType::Ack);
    assert_eq!(refused(), 2, "another bad name counts again");
    assert_eq!(answer(&mut s, &req(b"good"), 21), MsgType::Ack);
    assert_eq!(refused(), 2);
}

#[test]
fn frame_path_and_arp() {
    let mut s = server(None);
    let d = msg(MsgType::Discover, 7, vec![]).to_vec();
    let f = client_frame(&d);
    let r = s.handle_frame(&f, 5).unwrap();
    let e = Ethernet::parse(&r).unwrap();
    assert_eq!(e.dst, [2, 0, 0, 0, 0, 7]);
    let ip = Ipv4::parse(e.payload).unwrap();
    let u = Udp::parse(ip.payload).unwrap();
    assert_eq!(u.dst_port, 68);
    assert_eq!(
        DhcpMessage::parse(u.payload).unwrap().msg_type,
        MsgType::Offer
    );
    let mut arp = vec![];
    wire::emit_ethernet(&mut arp, BROADCAST_MAC, [2, 0, 0, 0, 0, 7], ETHERTYPE_ARP);
    Arp {
        op: 1,
        sha: [2, 0, 0, 0, 0, 7],
        spa: Ipv4Addr::new(10, 9, 0, 100),
        tha: [0; 6],
        tpa: Ipv4Addr::new(10, 9, 0, 1),
    }
    .emit(&mut arp);
    let r = s.handle_frame(&arp, 5).unwrap();
    let a = Arp::parse(Ethernet::parse(&r).unwrap().payload).unwrap();
    assert_eq!(
        (a.op, a.sha, a.spa),
        (2, [2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 9, 0, 1))
    );
    // A datagram to port 67 that is not DHCP: dropped and counted.
    assert_eq!(s.malformed, 0);
    let junk = client_frame(b"not dhcp");
    assert!(s.handle_frame(&junk, 5).is_none());
    assert_eq!(s.malformed, 1);
}

#[test]
fn tables_stay_bounded_under_mac_churn() {
    let mut s = server(None);
    for i in 0..2000u32 {
        let b = i.to_be_bytes();
        let mut d = msg(MsgType::Discover, 0, vec![]);
        d.chaddr = [2, 1, b[0], b[1], b[2], b[3]];
        let now = 1000 + u64::from(i) * 4000; // every lease expired by the next client
        if let Some(o) = s.handle(&d, now) {
            let mut r = msg(
                MsgType::Request,
                0,
                vec![sid(), (opt::REQUESTED_IP, o.yiaddr.octets().to_vec())],
            );
            r.chaddr = d.chaddr;
            assert_eq!(answer(&mut s, &r, now), MsgType::Ack);
        }
        let _ = s.handle(
            &msg(MsgType::Decline, 7, vec![req_ip([1, 2, b[2], b[3]])]),
            now,
        );
    }
    assert!(s.db.by_mac.len() <= 3, "{}", s.db.by_mac.len());
    assert!(s.db.offers.len() <= 3);
    assert!(
        s.db.declined.is_empty(),
        "declines outside the range are ignored"
    );
}

#[test]
fn a_big_range_is_not_a_big_table() {
    // A /16 with the default-sized range: made-up MACs cannot grow the tables past
    // MAX_CLIENTS, and every allocation stays cheap while they try.
    let mut s = server(None);
    s.v4.prefix = 16;
    s.spec.end = Ipv4Addr::new(10, 9, 255, 254);
    let n = MAX_CLIENTS as u32 + 10;
    let mut offered = 0;
    for i in 0..n {
        let b = i.to_be_bytes();
        let mut d = msg(MsgType::Discover, 0, vec![]);
        d.chaddr = [2, 1, b[0], b[1], b[2], b[3]];
        if s.handle(&d, 1000).is_some() {
            offered += 1;
        }
    }
    assert_eq!(offered, MAX_CLIENTS);
    assert_eq!(s.db.offers.len(), MAX_CLIENTS);
    // Once the offers have lapsed: each new client takes what it is offered.
    let t = 1000 + OFFER_HOLD_SECS + 1;
    let mut acked = 0;
    for i in 0..n {
        let b = i.to_be_bytes();
        let mut d = msg(MsgType::Discover, 0, vec![]);
        d.chaddr = [2, 2, b[0], b[1], b[2], b[3]];
        let Some(o) = s.handle(&d, t) else { continue };
        let mut r = msg(MsgType::Request, 0, vec![sid(), req_ip(o.yiaddr.octets())]);
        r.chaddr = d.chaddr;
        if answer(&mut s, &r, t) == MsgType::Ack {
            acked += 1;
        }
    }
    assert_eq!(acked, MAX_CLIENTS);
    assert_eq!(s.db.by_mac.len(), MAX_CLIENTS);
    // Declines of addresses that are not the sender's do nothing.
    for i in 0..n {
        let b = i.to_be_bytes();
        let d = msg(MsgType::Decline, 7, vec![req_ip([10, 9, 200 + b[2], b[3]])]);
        let _ = s.handle(&d, t);
    }
    assert!(s.db.declined.is_empty());
    assert_eq!(s.foreign_release, u64::from(n));
    assert_eq!(s.refused_full, 20);
    // Once the leases expire, new clients get in again.
    let later = t + 3601;
    let mut d = msg(MsgType::Discover, 0, vec![]);
    d.chaddr = [2, 3, 0, 0, 0, 1];
    let o = s.handle(&d, later).expect("an offer");
    let mut r = msg(MsgType::Request, 0, vec![sid(), req_ip(o.yiaddr.octets())]);
    r.chaddr = d.chaddr;
    assert_eq!(answer(&mut s, &r, later), MsgType::Ack);
    assert_eq!(s.db.by_mac.len(), 1);
}

/// A saver that waits until its gate is opened, then writes the file.
/// Returns the gate (shut), the count of writes done and the saver.
fn gated_saver(dir: &Path) -> (Arc<Gate>, Arc<AtomicU64>, Saver) {
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let writes = Arc::new(AtomicU64::new(0));
    let (g, w) = (gate.clone(), writes.clone());
    let mut file = file_saver(Some(dir.join("leases.json")));
    let save: Saver = Box::new(move |l: &[Lease]| {
        let (m, cv) = &*g;
        let mut open = m.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        drop(open);
        w.fetch_add(1, Ordering::Relaxed);
        file(l)
    });
    (gate, writes, save)
}

/// Whether the lease write may go ahead, and the condition it waits on.
type Gate = (Mutex<bool>, std::sync::Condvar);

fn open_gate(gate: &Gate) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

/// Like [`with_run`], with the lease file written by `save`.
fn with_run_saver<T>(
    server: DhcpServer,
    save: Saver,
    f: impl AsyncFnOnce(mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>, Arc<Mutex<DhcpServer>>) -> T,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = Arc::new(Mutex::new(server));
    rt.block_on(async move {
        let (to_service, from_switch) = mpsc::channel(64);
        let (to_switch, replies) = mpsc::channel(64);
        let port = crate::switch::ServicePort {
            to_switch,
            from_switch,
        };
        tokio::spawn(run_with(server.clone(), port, None, save));
        f(to_service, replies, server).await
    })
}

#[test]
fn a_slow_lease_write_holds_the_ack_but_not_the_server() {
    use std::time::Duration;
    // The write waits for the gate: meanwhile the runtime runs other tasks and
    // the server answers other clients; the ACK leaves only after the write.
    let dir = tempfile::tempdir().unwrap();
    let (gate, writes, save) = gated_saver(dir.path());
    with_run_saver(
        server(Some(dir.path())),
        save,
        async |tx, mut replies, server| {
            let d = msg(MsgType::Discover, 7, vec![]);
            assert!(server.lock().unwrap().handle(&d, unix_now()).is_some());
            let r = msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 100])]).to_vec();
            tx.send(Bytes::from(client_frame(&r))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Another message is answered while the write waits.
            let d = client_frame(&msg(MsgType::Inform, 7, vec![]).to_vec());
            tx.send(Bytes::from(d)).await.unwrap();
            let first = tokio::time::timeout(Duration::from_secs(2), replies.recv()).await;
            let first = first.expect("answered during the write").unwrap();
            let m = DhcpMessage::parse(&first[42..]).unwrap();
            assert_eq!(m.msg_type, MsgType::Ack);
            assert_eq!(
                m.yiaddr,
                Ipv4Addr::UNSPECIFIED,
                "the INFORM's answer, not the lease"
            );
            assert_eq!(writes.load(Ordering::Relaxed), 0, "still waiting");
            assert!(
                !dir.path().join("leases.json").exists(),
                "the lease is not on disk yet"
            );
            open_gate(&gate);
            let ack = tokio::time::timeout(Duration::from_secs(5), replies.recv()).await;
            let ack = ack.expect("the ACK after the write").unwrap();
            let m = DhcpMessage::parse(&ack[42..]).unwrap();
            assert_eq!(
                (m.msg_type, m.yiaddr),
                (MsgType::Ack, Ipv4Addr::new(10, 9, 0, 100))
            );
            assert!(
                dir.path().join("leases.json").exists(),
                "on disk before the ACK"
            );
        },
    );
}

#[test]
fn requests_for_what_was_never_offered_are_naked() {
    let mut s = server(None);
    // REQUEST without DISCOVER, INIT-REBOOT style and SELECTING style: NAK.
    let r = msg(MsgType::Request, 7, vec![req_ip([10, 9, 0, 101])]);
    assert_eq!(answer(&mut s, &r, 10), MsgType::Nak);
    let r = msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 101])]);
    assert_eq!(answer(&mut s, &r, 10), MsgType::Nak);
    // A renewal of a lease it does not hold: NAK.
    let mut renew = msg(MsgType::Request, 7, vec![]);
    renew.ciaddr = Ipv4Addr::new(10, 9, 0, 101);
    assert_eq!(answer(&mut s, &renew, 10), MsgType::Nak);
    assert_eq!(s.nak_unoffered, 3);
    assert!(s.db.by_mac.is_empty());
    // Offered .100, asking for .101 instead: NAK; for .100: ACK.
    let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 10).unwrap();
    assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
    let r = msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 101])]);
    assert_eq!(answer(&mut s, &r, 11), MsgType::Nak);
    let r = msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 100])]);
    assert_eq!(answer(&mut s, &r, 11), MsgType::Ack);
    assert!(s.take_changed(), "the ACK changed the leases");
    // INIT-REBOOT of the known lease (even expired) and renewal: ACK.
    let r = msg(MsgType::Request, 7, vec![req_ip([10, 9, 0, 100])]);
    assert_eq!(answer(&mut s, &r, 5000), MsgType::Ack);
    renew.ciaddr = Ipv4Addr::new(10, 9, 0, 100);
    assert_eq!(answer(&mut s, &renew, 5001), MsgType::Ack);
    // A reserved client may ask for its reservation straight away.
    let r = msg(MsgType::Request, 0x99, vec![req_ip([10, 9, 0, 50])]);
    assert_eq!(answer(&mut s, &r, 10), MsgType::Ack);
}

#[test]
fn release_and_decline_act_only_on_the_senders_own_lease() {
    let mut s = server(None);
    let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 10).unwrap();
    let r = msg(MsgType::Request, 7, vec![sid(), req_ip(o.yiaddr.octets())]);
    assert_eq!(answer(&mut s, &r, 10), MsgType::Ack);
    assert!(s.take_changed());
    let victim = o.yiaddr;
    // Client 8 releases and declines 7's address: nothing happens.
    let mut rel = msg(MsgType::Release, 8, vec![sid()]);
    rel.ciaddr = victim;
    assert!(s.handle(&rel, 20).is_none());
    let dec = msg(MsgType::Decline, 8, vec![req_ip(victim.octets())]);
    assert!(s.handle(&dec, 20).is_none());
    assert_eq!(s.foreign_release, 2);
    assert!(!s.take_changed());
    assert!(s.db.declined.is_empty());
    let l = &s.db.by_mac[&[2, 0, 0, 0, 0, 7]];
    assert_eq!(
        (l.ip, l.expires),
        (victim, 10 + 3600),
        "7's lease untouched"
    );
    let mut renew = msg(MsgType::Request, 7, vec![]);
    renew.ciaddr = victim;
    assert_eq!(answer(&mut s, &renew, 30), MsgType::Ack, "7 still renews");
    // 7 itself may release it.
    rel.chaddr = [2, 0, 0, 0, 0, 7];
    assert!(s.handle(&rel, 40).is_none());
    assert!(s.take_changed());
    assert_eq!(s.db.by_mac[&[2, 0, 0, 0, 0, 7]].expires, 40);
}

#[test]
fn chaddr_must_be_the_senders_mac() {
    let mut s = server(None);
    // client_frame sends from 02:..:07; a DISCOVER in 08's name is ignored.
    let f = client_frame(&msg(MsgType::Discover, 8, vec![]).to_vec());
    assert!(s.handle_frame(&f, 5).is_none());
    assert_eq!(s.spoofed_chaddr, 1);
    assert!(s.db.offers.is_empty());
    let f = client_frame(&msg(MsgType::Discover, 7, vec![]).to_vec());
    assert!(s.handle_frame(&f, 5).is_some());
}

#[test]
fn leases_reach_the_port_guard_before_the_ack_leaves() {
    let mut s = server(None);
    let g = Arc::new(IpGuard::new(
        Ipv4Addr::new(10, 9, 0, 0),
        24,
        &[Ipv4Addr::new(10, 9, 0, 1)],
        &[],
        std::time::Duration::from_secs(300),
    ));
    s.set_ip_guard(g.clone());
    let mac = [2, 0, 0, 0, 0, 7];
    let ip = Ipv4Addr::new(10, 9, 0, 100);
    let t = Instant::now();
    let f = client_frame(&msg(MsgType::Discover, 7, vec![]).to_vec());
    assert!(s.handle_frame(&f, unix_now()).is_some());
    let f = client_frame(&msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 100])]).to_vec());
    assert!(s.handle_frame(&f, unix_now()).is_some());
    assert!(!g.allow([2, 0, 0, 0, 0, 8], ip, t, unix_now()), "7's now");
    assert!(g.allow(mac, ip, t, unix_now()));
    // A static guest's address is not handed out.
    assert!(g.allow(
        [2, 0, 0, 0, 0, 9],
        Ipv4Addr::new(10, 9, 0, 101),
        t,
        unix_now()
    ));
    let mut d = msg(MsgType::Discover, 0, vec![]);
    d.chaddr = [2, 0, 0, 0, 0, 0x0c];
    let o = s.handle(&d, unix_now()).unwrap();
    assert_eq!(
        o.yiaddr,
        Ipv4Addr::new(10, 9, 0, 102),
        ".101 is in static use"
    );
}

/// Runs `run` on a current-thread runtime with the given server; `f` gets the
/// switch side of its port.
fn with_run<T>(
    server: DhcpServer,
    f: impl AsyncFnOnce(mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>, Arc<Mutex<DhcpServer>>) -> T,
) -> T {
    // What `run` saves with: the server's own lease file.
    let save = file_saver(server.db.path().map(|p| p.to_path_buf()));
    with_run_saver(server, save, f)
}

#[test]
fn a_failed_lease_write_sends_no_ack_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    // The state directory disappears after start: every write fails.
    let db_dir = dir.path().join("gone");
    std::fs::create_dir(&db_dir).unwrap();
    let s = server(Some(&db_dir));
    std::fs::remove_dir(&db_dir).unwrap();
    with_run(s, async |tx, mut replies, server| {
        let d = client_frame(&msg(MsgType::Discover, 7, vec![]).to_vec());
        tx.send(Bytes::from(d)).await.unwrap();
        let offer = replies.recv().await.unwrap();
        assert!(offer.len() > 200, "the OFFER needs no write");
        let r = msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 100])]).to_vec();
        tx.send(Bytes::from(client_frame(&r))).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_millis(500), replies.recv()).await;
        assert!(got.is_err(), "no ACK without the lease on disk");
        let st = server.lock().unwrap().stats();
        assert_eq!((st.save_failed, st.commits), (1, 0));
    });
}

#[test]
fn acks_queued_during_a_write_share_the_next_one() {
    use std::time::Duration;
    // The first write waits for the gate; meanwhile ten more clients' REQUESTs
    // are handled and queued: they go out together after one more write.
    let dir = tempfile::tempdir().unwrap();
    let (gate, writes, save) = gated_saver(dir.path());
    let mut s = server(Some(dir.path()));
    s.spec.end = Ipv4Addr::new(10, 9, 0, 200);
    with_run_saver(s, save, async |tx, mut replies, server| {
        for c in 0..11u8 {
            let mut d = msg(MsgType::Discover, 0, vec![]);
            let mac = [2, 0, 0, 0, 1, c];
            d.chaddr = mac;
            let o = server.lock().unwrap().handle(&d, unix_now()).unwrap();
            let mut r = msg(MsgType::Request, 0, vec![sid(), req_ip(o.yiaddr.octets())]);
            r.chaddr = mac;
            let f = wire::emit_udp_frame(
                BROADCAST_MAC,
                mac,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                68,
                67,
                &r.to_vec(),
            );
            tx.send(Bytes::from(f)).await.unwrap();
            // Let the writer take the first one and wait in it.
            tokio::time::sleep(Duration::from_millis(if c == 0 { 200 } else { 5 })).await;
        }
        assert!(replies.try_recv().is_err(), "no ACK before its write");
        open_gate(&gate);
        for _ in 0..11 {
            let a = tokio::time::timeout(Duration::from_secs(5), replies.recv()).await;
            assert!(matches!(a, Ok(Some(_))), "every ACK goes out");
        }
        let st = server.lock().unwrap().stats();
        assert_eq!(
            st.commits, 2,
            "one write for the first, one for the other ten"
        );
        assert_eq!(writes.load(Ordering::Relaxed), 2, "the saver ran twice");
        assert_eq!(st.leases, 11);
    });
    let saved = LeaseDb::load(Some(dir.path().join("leases.json"))).unwrap();
    assert_eq!(saved.leases().len(), 11, "all on disk");
}

/// Randomized robustness: mutations and truncations of valid messages, and
/// random bytes, never panic the parser or the server, and whatever parses
/// re-emits to something that parses to the same message.
#[test]
fn randomized_parse_never_panics() {
    let mut s = server(None);
    let mut rnd = crate::test_util::xorshift(0x9e37_79b9_7f4a_7c15);
    let base = msg(
        MsgType::Request,
        7,
        vec![
            sid(),
            req_ip([10, 9, 0, 100]),
            (opt::HOSTNAME, b"x".to_vec()),
        ],
    )
    .to_vec();
    for i in 0..20_000 {
        let mut b = if i % 4 == 0 {
            (0..(rnd() % 400) as usize)
                .map(|_| rnd() as u8)
                .collect::<Vec<u8>>()
        } else {
            base.clone()
        };
        for _ in 0..(rnd() % 8) {
            if !b.is_empty() {
                let at = (rnd() as usize) % b.len();
                b[at] = rnd() as u8;
            }
        }
        if rnd().is_multiple_of(3) {
            let n = (rnd() as usize) % (b.len() + 1);
            b.truncate(n);
        }
        if let Ok(m) = DhcpMessage::parse(&b) {
            let again = DhcpMessage::parse(&m.to_vec()).unwrap();
            assert_eq!(again, m);
            let _ = s.handle(&m, 100 + i);
        }
        let f = client_frame(&b);
        let _ = s.handle_frame(&f, 100 + i);
        let _ = s.handle_frame(&b, 100 + i);
    }
}
