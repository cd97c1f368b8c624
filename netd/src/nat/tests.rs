//! Unit tests of the router: a smoltcp "guest" talking through it to host sockets on
//! loopback, and a randomized feed of mutated frames.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::device::QueueDevice;
use super::*;

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

fn test_config() -> RouterConfig {
    let mut cfg = RouterConfig::defaults();
    // Unit tests never send anything beyond loopback.
    cfg.outbound_allow = vec![(Ipv4Addr::new(127, 0, 0, 0), 8)];
    cfg.resolv_conf = "/nonexistent/resolv.conf".into();
    cfg
}

/// A smoltcp guest wired to a running router.
struct Guest {
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    to_router: mpsc::Sender<Bytes>,
    from_router: mpsc::Receiver<Bytes>,
}

impl Guest {
    /// Opens a TCP connection from guest port `local` to `to`; the socket's handle.
    fn connect(&mut self, to: (IpAddress, u16), local: u16) -> SocketHandle {
        let h = self.sockets.add(tcp_socket());
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, to, local)
            .unwrap();
        h
    }

    fn start(cfg: RouterConfig) -> (Guest, RouterHandle) {
        let (to_router, router_rx) = mpsc::channel(1024);
        let (router_tx, from_router) = mpsc::channel(1024);
        let (router, handle) = Router::new(cfg, router_rx, router_tx).unwrap();
        tokio::spawn(router.run());
        let mut dev = QueueDevice::new(1500);
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ethernet(GUEST_MAC)),
            &mut dev,
            smoltcp::time::Instant::now(),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(GUEST_IP.into(), 24)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(10, 0, 2, 2))
            .unwrap();
        (
            Guest {
                iface,
                dev,
                sockets: SocketSet::new(Vec::new()),
                to_router,
                from_router,
            },
            handle,
        )
    }

    /// Runs the guest stack until `done` or a 5 s timeout.
    async fn run_until(&mut self, mut done: impl FnMut(&mut SocketSet<'static>) -> bool) -> bool {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < end {
            self.iface.poll(
                smoltcp::time::Instant::now(),
                &mut self.dev,
                &mut self.sockets,
            );
            while let Some(f) = self.dev.tx.pop_front() {
                self.to_router.send(f.into_bytes()).await.unwrap();
            }
            if done(&mut self.sockets) {
                return true;
            }
            if let Ok(Some(f)) =
                tokio::time::timeout(Duration::from_millis(10), self.from_router.recv()).await
            {
                self.dev.rx.push_back(f);
                while let Ok(f) = self.from_router.try_recv() {
                    self.dev.rx.push_back(f);
                }
            }
        }
        false
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    )
}

#[tokio::test]
async fn tcp_to_gateway_reaches_host_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong:").await.unwrap();
        s.write_all(&buf).await.unwrap();
        // Host closes: the guest sees a FIN.
    });
    let (mut g, handle) = Guest::start(test_config());
    let h = g.connect((IpAddress::v4(10, 0, 2, 2), port), 40000);
    let mut sent = false;
    let mut got = Vec::new();
    let ok = g
        .run_until(|s| {
            let sock = s.get_mut::<tcp::Socket>(h);
            if sock.may_send() && !sent {
                sock.send_slice(b"hello").unwrap();
                sent = true;
            }
            while sock.can_recv() {
                sock.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            !sock.may_recv() && sent && got.len() >= 10
        })
        .await;
    assert!(ok, "no echo; got {:?}", String::from_utf8_lossy(&got));
    assert_eq!(&got, b"pong:hello");
    let flows = handle.flows().await.unwrap();
    assert!(flows
        .iter()
        .any(|f| f.proto == "tcp" && f.guest == "10.0.2.15:40000"));
}

#[tokio::test]
async fn refused_connect_resets_the_guest() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mut g, handle) = Guest::start(test_config());
    let h = g.connect((IpAddress::v4(10, 0, 2, 2), port), 40001);
    let ok = g
        .run_until(|s| s.get::<tcp::Socket>(h).state() == tcp::State::Closed)
        .await;
    assert!(ok, "guest socket not reset");
    assert_eq!(handle.stats().await.unwrap().connect_failed, 1);
}

#[tokio::test]
async fn destinations_outside_the_allow_list_are_reset() {
    let (mut g, _handle) = Guest::start(test_config());
    let h = g.connect((IpAddress::v4(198, 18, 0, 9), 80), 40002);
    assert!(
        g.run_until(|s| s.get::<tcp::Socket>(h).state() == tcp::State::Closed)
            .await
    );
}

#[tokio::test]
async fn tcp_forward_reaches_guest_and_removal_cuts_it() {
    let (mut g, handle) = Guest::start(test_config());
    let host_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let host: SocketAddr = format!("127.0.0.1:{host_port}").parse().unwrap();
    handle
        .add_forward(Forward {
            proto: Proto::Tcp,
            host,
            guest: "10.0.2.15:22".parse().unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(handle.forwards().await.unwrap().len(), 1);
    let h = g.sockets.add(tcp_socket());
    g.sockets.get_mut::<tcp::Socket>(h).listen(22).unwrap();
    let client = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
        s.write_all(b"ssh?").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        buf
    });
    let mut got = Vec::new();
    let ok = g
        .run_until(|s| {
            let sock = s.get_mut::<tcp::Socket>(h);
            while sock.can_recv() {
                sock.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            if got == b"ssh?" && sock.can_send() {
                sock.send_slice(b"SSH!").unwrap();
                got.push(b'.');
            }
            got.len() == 5 && sock.send_queue() == 0
        })
        .await;
    assert!(ok);
    g.run_until(|_| client.is_finished()).await;
    assert_eq!(&client.await.unwrap(), b"SSH!");
    handle.del_forward(Proto::Tcp, host).await.unwrap();
    assert!(tokio::net::TcpStream::connect(host).await.is_err());
    assert!(matches!(
        handle.del_forward(Proto::Tcp, host).await,
        Err(NatError::NoSuchForward { .. })
    ));
}

#[tokio::test]
async fn udp_to_gateway_round_trip() {
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 100];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        server.send_to(&buf[..n], from).await.unwrap();
    });
    let (to_router, router_rx) = mpsc::channel(16);
    let (router_tx, mut from_router) = mpsc::channel(16);
    let (router, _h) = Router::new(test_config(), router_rx, router_tx).unwrap();
    tokio::spawn(router.run());
    let frame = frame::udp_frame(
        GUEST_MAC,
        EthernetAddress(RouterConfig::defaults().mac),
        (GUEST_IP, 5555),
        (Ipv4Addr::new(10, 0, 2, 2), port),
        b"datagram",
    );
    to_router.send(frame).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), from_router.recv())
        .await
        .unwrap()
        .unwrap();
    match frame::classify(&reply, GUEST_MAC, |_| false) {
        frame::Classified::Udp {
            src, dst, payload, ..
        } => {
            assert_eq!(src, (Ipv4Addr::new(10, 0, 2, 2), port));
            assert_eq!(dst, (GUEST_IP, 5555));
            assert_eq!(payload, b"datagram");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// xorshift64*: deterministic randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn arp_request(target: Ipv4Addr) -> Bytes {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0u8; 14 + repr.buffer_len()];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]));
    Bytes::from(buf)
}

#[tokio::test]
async fn random_and_mutated_frames_never_panic() {
    let (_to_router, router_rx) = mpsc::channel(16);
    let (router_tx, _from_router) = mpsc::channel(16);
    let (mut router, _h) = Router::new(test_config(), router_rx, router_tx).unwrap();
    let rmac = EthernetAddress(RouterConfig::defaults().mac);
    let gw = Ipv4Addr::new(10, 0, 2, 2);
    let seeds: Vec<Bytes> = vec![
        arp_request(gw),
        frame::udp_frame(GUEST_MAC, rmac, (GUEST_IP, 1000), (gw, 9), b"0123456789"),
        frame::udp_frame(
            GUEST_MAC,
            rmac,
            (GUEST_IP, 1000),
            (Ipv4Addr::new(10, 0, 2, 3), 53),
            b"q",
        ),
        frame::tcp_rst(
            GUEST_MAC,
            rmac,
            (GUEST_IP, 1000),
            (gw, 9),
            smoltcp::wire::TcpSeqNumber(7),
        ),
    ];
    // The ARP seed is answered.
    let out = router.process_frame_for_test(seeds[0].clone());
    assert!(out.iter().any(|f| f.len() >= 42), "no ARP reply");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let before = router.stats.malformed;
    for i in 0..20_000 {
        let seed = &seeds[rng.below(seeds.len())];
        let mut f = seed.to_vec();
        match i % 4 {
            0 => {
                // Flip a few bytes past the MAC addresses (so the frame still reaches
                // the router's parser).
                for _ in 0..1 + rng.below(4) {
                    let at = 12 + rng.below(f.len() - 12);
                    f[at] = rng.next() as u8;
                }
            }
            1 => f.truncate(rng.below(f.len())),
            2 => {
                let extra = rng.below(64);
                f.extend((0..extra).map(|_| rng.next() as u8));
            }
            _ => {
                let n = rng.below(200);
                let mut r: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                if r.len() >= 6 {
                    r[..6].copy_from_slice(&rmac.0);
                }
                f = r;
            }
        }
        let _ = router.process_frame_for_test(Bytes::from(f));
    }
    assert!(
        router.stats.malformed > before,
        "corrupt frames were not counted"
    );
    assert_eq!(router.stats.frames_in, 20_001);
}

#[test]
fn config_validation_names_the_key() {
    let mut c = RouterConfig::defaults();
    c.mtu = 70000;
    assert!(c.validate().unwrap_err().to_string().contains("mtu"));
    let mut c = RouterConfig::defaults();
    c.dns = Ipv4Addr::new(192, 168, 0, 3);
    assert!(c.validate().unwrap_err().to_string().contains("dns"));
    let mut c = RouterConfig::defaults();
    c.forwards.push(Forward {
        proto: Proto::Tcp,
        host: "127.0.0.1:2222".parse().unwrap(),
        guest: "192.168.1.5:22".parse().unwrap(),
    });
    assert!(matches!(
        c.validate(),
        Err(NatError::GuestOutsideSubnet { .. })
    ));
    assert_eq!(
        parse_host_addr("2222").unwrap(),
        "127.0.0.1:2222".parse().unwrap()
    );
    assert!(parse_host_addr("nope").is_err());
}

#[tokio::test]
async fn flow_table_is_bounded_and_udp_flows_expire() {
    let mut cfg = test_config();
    cfg.limits.max_flows = 2;
    cfg.limits.udp_timeout = Duration::from_millis(100);
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let (to_router, router_rx) = mpsc::channel(16);
    let (router_tx, _from_router) = mpsc::channel(16);
    let (router, h) = Router::new(cfg, router_rx, router_tx).unwrap();
    tokio::spawn(router.run());
    let rmac = EthernetAddress(RouterConfig::defaults().mac);
    for sport in 1000..1005 {
        let f = frame::udp_frame(
            GUEST_MAC,
            rmac,
            (GUEST_IP, sport),
            (Ipv4Addr::new(10, 0, 2, 2), port),
            b"x",
        );
        to_router.send(f).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.flows().await.unwrap().len(), 2, "table bound");
    assert_eq!(h.stats().await.unwrap().flows_refused, 3);
    // Housekeeping runs once a second; idle UDP flows go.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(h.flows().await.unwrap().is_empty(), "idle flows expired");
}

#[tokio::test]
async fn forward_guest_outside_subnet_and_duplicates_are_refused() {
    let (_g, h) = Guest::start(test_config());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let host: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let bad = Forward {
        proto: Proto::Tcp,
        host,
        guest: "192.168.9.9:22".parse().unwrap(),
    };
    assert!(matches!(
        h.add_forward(bad).await,
        Err(NatError::GuestOutsideSubnet { .. })
    ));
    let good = Forward {
        proto: Proto::Udp,
        host,
        guest: "10.0.2.15:53".parse().unwrap(),
    };
    h.add_forward(good.clone()).await.unwrap();
    assert!(matches!(
        h.add_forward(good).await,
        Err(NatError::ForwardExists { .. })
    ));
}

#[tokio::test]
async fn offloaded_super_frame_is_finished_into_valid_segments() {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr};
    let (_to_router, router_rx) = mpsc::channel(16);
    let sink = ToSwitch::Offload(Box::new(|_, _| {}));
    let (router, _h) = Router::with_sink(test_config(), router_rx, sink).unwrap();
    // A 4000-byte TCP segment from the router to the guest (MTU 1500).
    let (src, dst) = (Ipv4Addr::new(10, 0, 2, 2), GUEST_IP);
    let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    let repr = TcpRepr {
        src_port: 8080,
        dst_port: 40000,
        control: TcpControl::Psh,
        seq_number: smoltcp::wire::TcpSeqNumber(1000),
        ack_number: Some(smoltcp::wire::TcpSeqNumber(5)),
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &payload,
    };
    let tcp_len = repr.buffer_len();
    let mut f = vec![0xa5u8; 14 + 20 + tcp_len];
    EthernetRepr {
        src_addr: EthernetAddress(RouterConfig::defaults().mac),
        dst_addr: GUEST_MAC,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp_len,
        hop_limit: 64,
    }
    .emit(
        &mut Ipv4Packet::new_unchecked(&mut f[14..]),
        &ChecksumCapabilities::default(),
    );
    // As smoltcp leaves it in offload mode: no TCP checksum.
    let mut caps = ChecksumCapabilities::default();
    caps.tcp = smoltcp::phy::Checksum::None;
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut f[34..]),
        &IpAddress::Ipv4(src),
        &IpAddress::Ipv4(dst),
        &caps,
    );
    let (hdr, at, sum) = router.tcp_offload_header(&f).expect("offloaded");
    assert_eq!(hdr.gso_type, crate::offload::GSO_TCPV4);
    assert_eq!(hdr.gso_size, 1460);
    assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16));
    f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    // What a port without vnet headers gets: MSS-sized segments, each valid.
    let mut segs = Vec::new();
    let mut scratch = Vec::new();
    crate::offload::finish(&hdr, &f, &mut scratch, &mut |s| segs.push(s.to_vec())).unwrap();
    assert_eq!(segs.len(), 3);
    let mut got = Vec::new();
    for s in &segs {
        assert!(s.len() <= 14 + 1500);
        let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
        assert!(ip.verify_checksum());
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(
            tcp.verify_checksum(&src.into(), &dst.into()),
            "segment checksum"
        );
        got.extend_from_slice(tcp.payload());
    }
    assert_eq!(got, payload);
}

/// A renewing client unicasts its REQUEST to the server identifier, 10.0.2.2, which
/// is the router's address (and MAC): the router hands it to the DHCP server plugged
/// in with `set_dhcp` (the network's real server here), and the ACK leaves from the
/// router's MAC and the gateway address, unicast to the client.
#[tokio::test]
async fn unicast_dhcp_renewal_to_the_gateway_is_answered() {
    use crate::config::{DhcpSpec, Ipv4Spec};
    use crate::dhcp::{opt, DhcpMessage, DhcpServer, LeaseDb, MsgType};
    let (_to_router, router_rx) = mpsc::channel(16);
    let (router_tx, _from_router) = mpsc::channel(16);
    let (mut router, _h) = Router::new(test_config(), router_rx, router_tx).unwrap();
    let gw = Ipv4Addr::new(10, 0, 2, 2);
    let v4 = Ipv4Spec {
        network: Ipv4Addr::new(10, 0, 2, 0),
        prefix: 24,
        gateway: gw,
    };
    let spec = DhcpSpec {
        server: gw,
        start: GUEST_IP,
        end: Ipv4Addr::new(10, 0, 2, 30),
        lease_time: 60,
        dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
        router: Some(gw),
        reservations: Vec::new(),
    };
    let dhcp_mac = [2, 0x4e, 0, 0, 0, 1];
    let server = std::sync::Arc::new(std::sync::Mutex::new(DhcpServer::new(
        v4,
        spec,
        dhcp_mac,
        false,
        LeaseDb::load(None).unwrap(),
    )));
    let s = server.clone();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    router.set_dhcp(Box::new(move |f: &[u8]| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.lock().unwrap().handle_frame(f, 1000)
    }));
    let rmac = EthernetAddress(RouterConfig::defaults().mac);
    let renew = DhcpMessage {
        op: 1,
        xid: 0x0bad_cafe,
        secs: 0,
        flags: 0,
        ciaddr: GUEST_IP,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: Ipv4Addr::UNSPECIFIED,
        chaddr: GUEST_MAC.0,
        msg_type: MsgType::Request,
        options: Vec::new(),
    };
    // The client holds its lease (the server NAKs a renewal of a lease it never gave).
    {
        let mut s = server.lock().unwrap();
        let mut d = renew.clone();
        d.ciaddr = Ipv4Addr::UNSPECIFIED;
        d.msg_type = MsgType::Discover;
        assert_eq!(s.handle(&d, 1000).unwrap().yiaddr, GUEST_IP);
        d.msg_type = MsgType::Request;
        d.options = vec![(opt::REQUESTED_IP, GUEST_IP.octets().to_vec())];
        assert_eq!(s.handle(&d, 1000).unwrap().msg_type, MsgType::Ack);
    }
    let f = frame::udp_frame(GUEST_MAC, rmac, (GUEST_IP, 68), (gw, 67), &renew.to_vec());
    let out = router.process_frame_for_test(f);
    assert_eq!(out.len(), 1, "one answer: {out:?}");
    let eth = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(eth.src_addr(), rmac, "answered from the router's MAC");
    assert_eq!(eth.dst_addr(), GUEST_MAC);
    let ip = smoltcp::wire::Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr()), (gw, GUEST_IP));
    let udp = smoltcp::wire::UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
    let ack = DhcpMessage::parse(udp.payload()).unwrap();
    assert_eq!(ack.msg_type, MsgType::Ack);
    assert_eq!((ack.xid, ack.yiaddr), (0x0bad_cafe, GUEST_IP));
    assert_eq!(ack.option_ip(opt::SERVER_ID), Some(gw));
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);

    // Other UDP to the gateway is not the DHCP server's business.
    let f = frame::udp_frame(GUEST_MAC, rmac, (GUEST_IP, 68), (gw, 9), b"x");
    router.process_frame_for_test(f);
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn forward_ports_go_round_robin_skip_taken_and_run_out() {
    use super::router::{free_forward_port, FWD_PORT_FIRST, FWD_PORT_LAST};
    let mut next = 0;
    assert_eq!(
        free_forward_port(&mut next, |_| false),
        Some(FWD_PORT_FIRST)
    );
    assert_eq!(
        free_forward_port(&mut next, |p| p == FWD_PORT_FIRST + 1),
        Some(FWD_PORT_FIRST + 2)
    );
    let mut next = FWD_PORT_LAST;
    assert_eq!(free_forward_port(&mut next, |_| false), Some(FWD_PORT_LAST));
    assert_eq!(next, FWD_PORT_FIRST, "wraps to the start of the range");
    assert_eq!(free_forward_port(&mut next, |_| true), None);
}
