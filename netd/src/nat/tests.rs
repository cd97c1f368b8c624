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
    // The tests' servers are on the host's loopback, through the gateway.
    cfg.host_loopback = true;
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
        let (
            router,
            Ends {
                to_router,
                from_router,
                handle,
            },
        ) = wired_router(cfg, 1024);
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

    /// Sends `hello` on the connection `h` and reads what comes back until the host
    /// closes, with at least 10 bytes read: whether that happened in time, and the bytes.
    async fn send_hello_read_to_close(&mut self, h: SocketHandle) -> (bool, Vec<u8>) {
        let (mut sent, mut got) = (false, Vec::new());
        let ok = self
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
        (ok, got)
    }
}

/// A TCP server on the host's loopback `addr` that answers one connection's five
/// bytes with `pong:` and them, then closes: its port, and the task, which ends
/// with the peer's address.
async fn tcp_pong_once(addr: &str) -> (u16, tokio::task::JoinHandle<SocketAddr>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong:").await.unwrap();
        s.write_all(&buf).await.unwrap();
        peer
    });
    (port, task)
}

/// A UDP server on the host's loopback `addr` that sends one datagram back: its port.
async fn udp_echo_once(addr: &str) -> u16 {
    let server = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 100];
        let (n, from) = server.recv_from(&mut buf).await.unwrap();
        server.send_to(&buf[..n], from).await.unwrap();
    });
    port
}

/// The router's config as the guest's side of `frame::classify` sees it: the
/// router's addresses are valid sources there.
fn guest_view() -> RouterConfig {
    let mut view = RouterConfig::defaults();
    view.gateway = GUEST_IP;
    view.dns = Ipv4Addr::new(10, 0, 2, 16);
    view
}

/// A TCP listener on the host's loopback and the address a guest reaches it by
/// (the gateway, its port: the test config has `host_loopback`).
async fn host_listener() -> (tokio::net::TcpListener, (Ipv4Addr, u16)) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, (Ipv4Addr::new(10, 0, 2, 2), port))
}

/// The test's ends of a router's channels, and its handle.
struct Ends {
    to_router: mpsc::Sender<Bytes>,
    from_router: mpsc::Receiver<Bytes>,
    handle: RouterHandle,
}

/// A router on `cfg` whose channels hold `depth` frames each way, and the test's
/// ends of them.
fn wired_router(cfg: RouterConfig, depth: usize) -> (Router, Ends) {
    let (to_router, router_rx) = mpsc::channel(depth);
    let (router_tx, from_router) = mpsc::channel(depth);
    let (router, handle) = Router::new(cfg, router_rx, router_tx).unwrap();
    let ends = Ends {
        to_router,
        from_router,
        handle,
    };
    (router, ends)
}

/// A router on the test config that the test drives frame by frame
/// (`process_frame_for_test`), with its channel ends and handle, for the caller
/// to hold so that the router runs as it would behind a live switch.
fn frame_driven_router() -> (Router, Ends) {
    wired_router(test_config(), 16)
}

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    )
}

#[tokio::test]
async fn tcp_to_gateway_reaches_host_loopback() {
    // The host closes after its answer: the guest sees a FIN.
    let (port, _host) = tcp_pong_once("127.0.0.1:0").await;
    let (mut g, handle) = Guest::start(test_config());
    let h = g.connect((IpAddress::v4(10, 0, 2, 2), port), 40000);
    let (ok, got) = g.send_hello_read_to_close(h).await;
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
    let port = udp_echo_once("127.0.0.1:0").await;
    let (router, mut ends) = wired_router(test_config(), 16);
    tokio::spawn(router.run());
    let frame = frame::udp_frame(
        GUEST_MAC,
        EthernetAddress(RouterConfig::defaults().mac),
        (GUEST_IP, 5555),
        (Ipv4Addr::new(10, 0, 2, 2), port),
        b"datagram",
    );
    ends.to_router.send(frame).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ends.from_router.recv())
        .await
        .unwrap()
        .unwrap();
    // Parsed as the guest would.
    match frame::classify(&reply, GUEST_MAC, &guest_view()) {
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
    let (mut router, _ends) = frame_driven_router();
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
    let (router, ends) = wired_router(cfg, 16);
    let (to_router, h) = (&ends.to_router, &ends.handle);
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
    let (mut router, _ends) = frame_driven_router();
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
        domain: None,
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

/// The outbound lists: the most specific entry decides, a deny wins a tie, and an
/// empty allow list means anywhere not denied.
#[test]
fn outbound_lists_most_specific_entry_decides() {
    let c = |s: &str| parse_cidr(s).unwrap();
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let deny = vec![c("169.254.0.0/16"), c("192.168.56.0/24")];
    assert!(outbound_allows(&[], &deny, ip("198.51.100.1")));
    assert!(!outbound_allows(&[], &deny, ip("169.254.169.254")));
    assert!(!outbound_allows(&[], &deny, ip("192.168.56.101")));
    // A host punched through a denied subnet; the rest stays denied.
    let allow = vec![c("0.0.0.0/0"), c("192.168.56.7/32")];
    assert!(outbound_allows(&allow, &deny, ip("192.168.56.7")));
    assert!(!outbound_allows(&allow, &deny, ip("192.168.56.8")));
    assert!(outbound_allows(&allow, &deny, ip("203.0.113.9")));
    // A non-empty allow list confines; a tie goes to deny.
    let allow = vec![c("198.51.100.0/24")];
    assert!(!outbound_allows(&allow, &[], ip("203.0.113.9")));
    assert!(!outbound_allows(
        &allow,
        &[c("198.51.100.0/24")],
        ip("198.51.100.1")
    ));
    // Parsing: bare address is /32, host bits and junk are refused with a reason.
    assert_eq!(c("192.0.2.1"), (ip("192.0.2.1"), 32));
    assert!(parse_cidr("192.0.2.1/24")
        .unwrap_err()
        .contains("192.0.2.0/24"));
    assert!(parse_cidr("192.0.2.0/33").is_err());
    assert!(parse_cidr("nope/8").is_err());
    assert!(DEFAULT_DENY.contains(&c("169.254.0.0/16")));
}

/// A UDP frame from guest `src` to `dst`, to the router's MAC.
fn guest_udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Bytes {
    frame::udp_frame(
        GUEST_MAC,
        EthernetAddress(RouterConfig::defaults().mac),
        src,
        dst,
        payload,
    )
}

/// Regression (issue 11, finding 5): without `host_loopback` the gateway is not the
/// host's loopback, and 127.0.0.0/8 is never a destination, even when the allow
/// list names it; both are counted and nothing reaches the host's listener.
#[tokio::test]
async fn host_loopback_is_off_by_default_and_127_is_never_direct() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = test_config();
    cfg.host_loopback = false;
    let (mut g, handle) = Guest::start(cfg);
    let h = g.connect((IpAddress::v4(10, 0, 2, 2), port), 40010);
    assert!(
        g.run_until(|s| s.get::<tcp::Socket>(h).state() == tcp::State::Closed)
            .await,
        "connect to the gateway was not reset"
    );
    let h2 = g.connect((IpAddress::v4(127, 0, 0, 1), port), 40011);
    let _ = g
        .run_until(|s| s.get::<tcp::Socket>(h2).state() == tcp::State::Closed)
        .await;
    let st = handle.stats().await.unwrap();
    assert_eq!(st.denied_host, 1, "{st:?}");
    assert!(st.denied_loopback >= 1, "{st:?}");
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the host's listener was reached");
}

/// Regression (issue 11, finding 7): one guest at `max_flows_per_guest` gets ICMP
/// unreachables for more flows, counted; another guest still opens flows.
#[tokio::test]
async fn per_guest_quota_refuses_only_the_guest_over_it() {
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let mut cfg = test_config();
    cfg.limits.max_flows_per_guest = 3;
    let (
        router,
        Ends {
            to_router,
            mut from_router,
            handle: h,
        },
    ) = wired_router(cfg, 64);
    tokio::spawn(router.run());
    let gw = Ipv4Addr::new(10, 0, 2, 2);
    for sport in 1000..1005 {
        to_router
            .send(guest_udp((GUEST_IP, sport), (gw, port), b"x"))
            .await
            .unwrap();
    }
    let other = Ipv4Addr::new(10, 0, 2, 16);
    to_router
        .send(guest_udp((other, 2000), (gw, port), b"y"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = h.stats().await.unwrap();
    assert_eq!(st.guest_quota, 2, "{st:?}");
    let flows = h.flows().await.unwrap();
    assert_eq!(
        flows
            .iter()
            .filter(|f| f.guest.starts_with("10.0.2.15:"))
            .count(),
        3
    );
    assert_eq!(
        flows
            .iter()
            .filter(|f| f.guest.starts_with("10.0.2.16:"))
            .count(),
        1
    );
    // The server got the first three and the other guest's datagram.
    let mut buf = [0u8; 16];
    let mut got = Vec::new();
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(100), server.recv_from(&mut buf)).await
    {
        got.extend_from_slice(&buf[..n]);
    }
    got.sort();
    assert_eq!(got, b"xxxy");
    // Two ICMP "administratively prohibited" answers went to the guest over quota.
    let mut unreachable = 0;
    while let Ok(f) = from_router.try_recv() {
        if f.get(14 + 9) == Some(&1) && f.get(14 + 20) == Some(&3) && f.get(14 + 21) == Some(&13) {
            unreachable += 1;
        }
    }
    assert_eq!(unreachable, 2);
}

/// The supervisor (issue 11): a router that panics is restarted on its thread with
/// its forwards and counters, counted in `restarts`, and serves flows again.
#[test]
fn a_panicking_router_is_restarted_with_its_forwards() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let port = server.local_addr().unwrap().port();
    let (to_router, router_rx) = mpsc::channel(64);
    let (router_tx, _from_router) = mpsc::channel(64);
    let h = Router::spawn_thread(
        "nat-test-sup",
        test_config(),
        router_rx,
        ToSwitch::Channel(router_tx),
        None,
    )
    .unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fport = free.local_addr().unwrap().port();
    drop(free);
    let fwd = Forward {
        proto: Proto::Tcp,
        host: SocketAddr::from(([127, 0, 0, 1], fport)),
        guest: "10.0.2.15:22".parse().unwrap(),
    };
    h.request_blocking(NatRequest::AddForward(fwd)).unwrap();
    h.request_blocking(NatRequest::InjectPanic).unwrap();
    // Wait for the restart (the supervisor pauses 100 ms after one).
    let mut restarts = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(50));
        let st = h.request_blocking(NatRequest::Stats).unwrap();
        restarts = st["restarts"].as_u64().unwrap();
        if restarts == 1 {
            break;
        }
    }
    assert_eq!(restarts, 1);
    let fw = h.request_blocking(NatRequest::ListForwards).unwrap();
    assert_eq!(fw.as_array().unwrap().len(), 1, "forward kept: {fw}");
    // A flow after the restart.
    to_router
        .blocking_send(guest_udp(
            (GUEST_IP, 3000),
            (Ipv4Addr::new(10, 0, 2, 2), port),
            b"again",
        ))
        .unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"again");
}

/// A TCP segment from a guest to the router's MAC.
fn guest_tcp(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    control: smoltcp::wire::TcpControl,
    seq: u32,
    ack: Option<u32>,
) -> Bytes {
    use smoltcp::wire::{TcpRepr, TcpSeqNumber};
    let repr = TcpRepr {
        src_port: src.1,
        dst_port: dst.1,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 64000,
        window_scale: None,
        max_seg_size: (control == smoltcp::wire::TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    Bytes::from(tcp_frame(
        GUEST_MAC,
        EthernetAddress(RouterConfig::defaults().mac),
        (src.0, dst.0),
        &repr,
        0,
    ))
}

/// An Ethernet + IPv4 frame around `repr` from `ips.0` to `ips.1` (checksums
/// valid), the rest of the buffer `fill` bytes: the unit tests' one TCP builder.
pub(super) fn tcp_frame(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    ips: (Ipv4Addr, Ipv4Addr),
    repr: &smoltcp::wire::TcpRepr,
    fill: u8,
) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket};
    let mut buf = vec![fill; 14 + 20 + repr.buffer_len()];
    EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    Ipv4Repr {
        src_addr: ips.0,
        dst_addr: ips.1,
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    }
    .emit(
        &mut Ipv4Packet::new_unchecked(&mut buf[14..]),
        &ChecksumCapabilities::default(),
    );
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[34..]),
        &IpAddress::Ipv4(ips.0),
        &IpAddress::Ipv4(ips.1),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// The sequence number of the SYN-ACK among `out` (there must be one).
fn synack_seq(out: &[Bytes]) -> smoltcp::wire::TcpSeqNumber {
    out.iter()
        .find_map(|f| {
            let t = smoltcp::wire::TcpPacket::new_checked(f.get(34..)?).ok()?;
            (t.syn() && t.ack()).then(|| t.seq_number())
        })
        .expect("SYN-ACK")
}

/// Lets the router take what its tasks finished (connects) and do a step with
/// `frame`; the frames it answers with.
async fn settle_and_feed(router: &mut Router, frame: Bytes) -> Vec<Bytes> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::future::poll_fn(|cx| {
        let _ = router.poll_events(cx);
        std::task::Poll::Ready(())
    })
    .await;
    router.process_frame_for_test(frame)
}

/// Regression (issue 11, findings 1 and 11): a SYN from 0.0.0.0 to a listening
/// destination never reaches smoltcp (whose assert it hit), and a flow whose socket
/// falls back to LISTEN (the guest reset it half-open) is removed at once, so a
/// second guest's SYN to the same destination opens its own flow instead of being
/// adopted by that socket.
#[tokio::test]
async fn unspecified_source_is_dropped_and_a_socket_back_in_listen_is_reaped() {
    use smoltcp::wire::TcpControl;
    let (_listener, gw) = host_listener().await;
    let (mut router, _ends) = frame_driven_router();
    // The guest asks for the gateway first, as a real one does (smoltcp learns it).
    router.process_frame_for_test(arp_request(gw.0));
    let out = router.process_frame_for_test(guest_tcp(
        (Ipv4Addr::UNSPECIFIED, 4000),
        gw,
        TcpControl::Syn,
        100,
        None,
    ));
    assert!(out.is_empty());
    assert_eq!(router.stats.bad_source, 1);
    // An honest SYN: connect, then the held SYN gets its SYN-ACK.
    let g = (GUEST_IP, 4001);
    let out = router.process_frame_for_test(guest_tcp(g, gw, TcpControl::Syn, 1000, None));
    assert!(out.is_empty(), "no SYN-ACK before the host connect");
    let out = settle_and_feed(&mut router, Bytes::new()).await;
    let synack = synack_seq(&out);
    // The guest resets it half-open, in window: smoltcp goes back to LISTEN.
    let rst = guest_tcp(g, gw, TcpControl::Rst, 1001, Some((synack + 1).0 as u32));
    router.process_frame_for_test(rst);
    assert_eq!(router.stats.listen_reaped, 1);
    assert_eq!(router.tcp.len(), 0, "the flow is gone");
    // Another guest's SYN to the same destination waits for its own connect.
    let other = (Ipv4Addr::new(10, 0, 2, 16), 4002);
    let out = router.process_frame_for_test(guest_tcp(other, gw, TcpControl::Syn, 5000, None));
    assert!(out.is_empty(), "adopted by a stale socket: {out:?}");
    assert_eq!(router.tcp.len(), 1, "pending on its own");
    assert_eq!(router.guest_flows.get(GUEST_IP), 0);
    assert_eq!(router.guest_flows.get(other.0), 1);
}

/// Regression (NAT soak bench, bench/netd-soak.sh): smoltcp's neighbor cache held
/// 8 entries, so with more guests than that talking at once each new guest evicted
/// another, and smoltcp dropped that guest's next segment (it sends an ARP request
/// instead, and stays silent for a second): TCP flows of a 64-guest network stalled
/// in retransmissions. Every one of 24 guests must get its host data at once.
#[tokio::test]
async fn more_than_eight_guests_all_get_their_tcp_data() {
    use smoltcp::wire::{TcpControl, TcpPacket};
    let (listener, gw) = host_listener().await;
    let (mut router, _ends) = frame_driven_router();
    let guests: Vec<Ipv4Addr> = (0..24).map(|i| Ipv4Addr::new(10, 0, 2, 100 + i)).collect();
    let mut hosts = Vec::new();
    for &ip in &guests {
        router.process_frame_for_test(frame::arp_request((GUEST_MAC, ip), gw.0));
        let g = (ip, 5000);
        router.process_frame_for_test(guest_tcp(g, gw, TcpControl::Syn, 1000, None));
        let (stream, _) = listener.accept().await.unwrap();
        hosts.push(stream);
        let out = settle_and_feed(&mut router, Bytes::new()).await;
        let synack = synack_seq(&out);
        let ack = guest_tcp(g, gw, TcpControl::None, 1001, Some((synack + 1).0 as u32));
        router.process_frame_for_test(ack);
    }
    for h in &mut hosts {
        h.write_all(b"data").await.unwrap();
    }
    let mut got = std::collections::HashSet::new();
    for _ in 0..3 {
        for f in settle_and_feed(&mut router, Bytes::new()).await {
            let Some(t) = f.get(34..).and_then(|t| TcpPacket::new_checked(t).ok()) else {
                continue;
            };
            if f.get(12..14) == Some(&[8, 0][..]) && !t.payload().is_empty() {
                got.insert(Ipv4Addr::new(f[30], f[31], f[32], f[33]));
            }
        }
    }
    let missing: Vec<_> = guests.iter().filter(|g| !got.contains(g)).collect();
    assert!(missing.is_empty(), "no data reached {missing:?}");
}

// IPv6 (`v6.rs`, `frame6.rs`).

const GUEST_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x15);
const GW6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// The test config with the NAT default IPv6 layout (`fd00::/64`, `::2`, `::3`).
fn test_config6() -> RouterConfig {
    let mut cfg = test_config();
    cfg.ipv6 = Some(crate::config::Ipv6Spec {
        prefix: "fd00::".parse().unwrap(),
        gateway: GW6,
        dns: Some("fd00::3".parse().unwrap()),
        range: None,
        lease_time: 86_400,
    });
    cfg
}

fn router_mac() -> EthernetAddress {
    EthernetAddress(RouterConfig::defaults().mac)
}

/// A smoltcp guest with IPv6 (SLAAC-like `fd00::15`, default route via the
/// gateway: it finds the router's MAC by a Neighbor Solicitation) connects to
/// `[fd00::2]:port`, which the router carries to the host's `[::1]:port`.
#[tokio::test]
async fn ipv6_tcp_to_gateway_reaches_host_loopback() {
    let (port, host) = tcp_pong_once("[::1]:0").await;
    let (mut g, handle) = Guest::start(test_config6());
    g.iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(GUEST_IP6.into(), 64)).unwrap();
    });
    g.iface.routes_mut().add_default_ipv6_route(GW6).unwrap();
    let h = g.connect((IpAddress::Ipv6(GW6), port), 40000);
    let (ok, got) = g.send_hello_read_to_close(h).await;
    let stats = handle.stats().await.unwrap();
    assert!(
        ok,
        "no echo; got {:?} {stats:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(&got, b"pong:hello");
    assert!(stats.frames_in6 > 0, "{stats:?}");
    assert!(host.await.unwrap().is_ipv6());
}

/// A Router Solicitation gets an RA that makes the router the default router,
/// with the prefix and RDNSS; an NS for the gateway gets an NA with the router's MAC.
#[tokio::test]
async fn ipv6_rs_and_ns_are_answered_by_the_router() {
    use crate::ipv6::wire::{self, link_local, multicast_mac, solicited_node};
    let (mut router, _ends) = wired_router(test_config6(), 16);
    // The ICMPv6 message of type `want` among the router's answers to `body`,
    // sent from the guest's `src` to the multicast or unicast `dst`.
    let mut answer = |src, dst, body, want: u8| {
        let f = wire::emit_frame(multicast_mac(dst), GUEST_MAC.0, src, dst, 58, 255, body, 2);
        let out = router.process_frame_for_test(Bytes::from(f));
        out.iter().find_map(|f| {
            let ip = wire::Ipv6::parse(f.get(14..)?)?;
            (ip.payload.first() == Some(&want)).then(|| ip.payload.to_vec())
        })
    };
    let ll = link_local(GUEST_MAC.0);
    let all_routers: std::net::Ipv6Addr = "ff02::2".parse().unwrap();
    let mut rs = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    rs.extend_from_slice(&GUEST_MAC.0);
    let ra = answer(ll, all_routers, rs, 134).expect("an RA");
    assert_eq!(
        u16::from_be_bytes([ra[6], ra[7]]),
        crate::ipv6::ROUTER_LIFETIME
    );
    let dns: std::net::Ipv6Addr = "fd00::3".parse().unwrap();
    assert!(ra.windows(16).any(|w| w == dns.octets()), "RDNSS");
    // NS for the gateway from the guest's address.
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&GW6.octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&GUEST_MAC.0);
    let na = answer(GUEST_IP6, solicited_node(GW6), ns, 136).expect("an NA");
    assert_eq!(&na[8..24], &GW6.octets());
    assert_eq!(&na[26..32], &router_mac().0);
}

/// UDP over IPv6 to the gateway reaches the host's `[::1]`; hostile sources and
/// destinations are dropped by reason, before any flow.
#[tokio::test]
async fn ipv6_udp_round_trip_and_hostile_packets_are_dropped() {
    use std::net::{Ipv6Addr, SocketAddrV6};
    let port = udp_echo_once("[::1]:0").await;
    let (mut router, mut ends) = wired_router(test_config6(), 16);
    let v6 = |a: Ipv6Addr, p: u16| SocketAddrV6::new(a, p, 0, 0);
    let udp = |src: Ipv6Addr, dst: Ipv6Addr| {
        frame6::udp6_frame(
            GUEST_MAC,
            router_mac(),
            v6(src, 5555),
            v6(dst, port),
            b"dgram",
        )
    };
    let far: Ipv6Addr = "2001:db8::1".parse().unwrap();
    for (f, what) in [
        (udp("fd01::15".parse().unwrap(), far), "outside the prefix"),
        (udp(GW6, far), "the router's own"),
        (udp("fe80::1".parse().unwrap(), far), "link-local source"),
        (udp(GUEST_IP6, Ipv6Addr::LOCALHOST), "::1"),
        (
            udp(GUEST_IP6, "::ffff:127.0.0.1".parse().unwrap()),
            "v4-mapped",
        ),
        (udp(GUEST_IP6, "fe80::9".parse().unwrap()), "link-local dst"),
    ] {
        assert!(router.process_frame_for_test(f).is_empty(), "{what}");
    }
    let mut zero = udp(GUEST_IP6, far).to_vec();
    zero[14 + 40 + 6..14 + 40 + 8].fill(0);
    router.process_frame_for_test(Bytes::from(zero));
    let s = &router.stats;
    assert_eq!(
        (s.bad_source, s.denied_loopback, s.martian_dst, s.malformed),
        (3, 1, 2, 1),
        "{s:?}"
    );
    tokio::spawn(router.run());
    ends.to_router.send(udp(GUEST_IP6, GW6)).await.unwrap();
    let reply = loop {
        let f = tokio::time::timeout(Duration::from_secs(5), ends.from_router.recv())
            .await
            .unwrap()
            .unwrap();
        let Some(ip) = crate::ipv6::wire::Ipv6::parse(&f[14..]) else {
            continue;
        };
        if ip.proto == Some(17) {
            assert!(ip.checksum_ok());
            assert_eq!((ip.src, ip.dst), (GW6, GUEST_IP6));
            break ip.payload.to_vec();
        }
    };
    assert_eq!(&reply[8..], b"dgram");
}

/// Each UDP flow is read only when its host socket wakes (see `wake.rs`): a reply
/// burst longer than one step's read limit, on many flows at once, and a reply that
/// comes after the flow went idle all reach the guest, none lost.
#[tokio::test]
async fn every_udp_reply_reaches_the_guest_when_flows_wake_on_their_own() {
    const FLOWS: u16 = 40;
    const BURST_REPLIES: usize = 150;
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 100];
        loop {
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let late = buf.get(..n) == Some(&b"late"[..]);
            if late {
                // Long after the flow's socket was last read empty.
                tokio::time::sleep(Duration::from_millis(300)).await;
                server.send_to(b"late reply", from).await.unwrap();
                continue;
            }
            for i in 0..BURST_REPLIES {
                server
                    .send_to(format!("{i:04}").as_bytes(), from)
                    .await
                    .unwrap();
            }
        }
    });
    let (router, mut ends) = wired_router(test_config(), 16);
    let to_router = &ends.to_router;
    tokio::spawn(router.run());
    let rmac = EthernetAddress(RouterConfig::defaults().mac);
    let gw = Ipv4Addr::new(10, 0, 2, 2);
    for sport in 0..FLOWS {
        let f = frame::udp_frame(GUEST_MAC, rmac, (GUEST_IP, 6000 + sport), (gw, port), b"go");
        to_router.send(f).await.unwrap();
    }
    let guest_view = guest_view();
    let mut got = std::collections::HashMap::<u16, usize>::new();
    let want = usize::from(FLOWS) * BURST_REPLIES;
    let mut total = 0;
    while total < want {
        let reply = tokio::time::timeout(Duration::from_secs(10), ends.from_router.recv())
            .await
            .unwrap_or_else(|_| panic!("{total} of {want} replies, then none for 10 s"))
            .unwrap();
        if let frame::Classified::Udp { dst, .. } = frame::classify(&reply, GUEST_MAC, &guest_view)
        {
            *got.entry(dst.1).or_default() += 1;
            total += 1;
        }
    }
    assert_eq!(got.len(), usize::from(FLOWS), "every flow got its burst");
    assert!(got.values().all(|n| *n == BURST_REPLIES), "{got:?}");
    // A reply to a flow that has been idle (read empty, armed) since.
    let f = frame::udp_frame(GUEST_MAC, rmac, (GUEST_IP, 6000), (gw, port), b"late");
    to_router.send(f).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ends.from_router.recv())
        .await
        .expect("the late reply")
        .unwrap();
    match frame::classify(&reply, GUEST_MAC, &guest_view) {
        frame::Classified::Udp { dst, payload, .. } => {
            assert_eq!(dst, (GUEST_IP, 6000));
            assert_eq!(payload, b"late reply");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn ipv6_outbound_lists_decide_as_for_ipv4_and_an_allow_list_of_either_family_closes_the_rest() {
    use super::{outbound_allows6, parse_cidr_any, Cidr};
    let c6 = |s: &str| match parse_cidr_any(s).unwrap() {
        Cidr::V6(c) => c,
        Cidr::V4(c) => panic!("{c:?} is not IPv6"),
    };
    let ip = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    let deny = [c6("fe80::/10"), c6("2001:db8::/32")];
    assert!(outbound_allows6(&[], &deny, &[], ip("2606:4700::1")));
    assert!(!outbound_allows6(&[], &deny, &[], ip("2001:db8:5::1")));
    let allow = [c6("2001:db8:5::1")];
    assert!(
        outbound_allows6(&allow, &deny, &[], ip("2001:db8:5::1")),
        "a host punches a hole"
    );
    assert!(
        !outbound_allows6(&allow, &deny, &[], ip("2606:4700::1")),
        "not in the allow list"
    );
    let allow4 = [parse_cidr("203.0.113.0/24").unwrap()];
    assert!(
        !outbound_allows6(&[], &deny, &allow4, ip("2606:4700::1")),
        "an IPv4 allow list restricts IPv6 too"
    );
    assert!(outbound_allows6(
        &[c6("::/0")],
        &deny,
        &allow4,
        ip("2606:4700::1")
    ));
    // Parsing: either family, bare addresses, host bits and lengths checked.
    assert_eq!(
        parse_cidr_any("2001:db8::1"),
        Ok(Cidr::V6((ip("2001:db8::1"), 128)))
    );
    assert_eq!(
        parse_cidr_any("10.0.0.0/8").map(|c| c.to_string()),
        Ok("10.0.0.0/8".into())
    );
    assert!(parse_cidr_any("2001:db8::1/32")
        .unwrap_err()
        .contains("2001:db8::/32"));
    assert!(parse_cidr_any("2001:db8::/129").is_err());
    assert!(parse_cidr_any("2001:zz::/32").is_err());
    // The edits of the control API land in the list of the entry's family.
    let mut cfg = RouterConfig::defaults();
    cfg.outbound_edit(
        fabric_api::netd::PolicyList::Allow,
        Cidr::V6(c6("2001:db8::/32")),
        true,
    );
    assert_eq!(cfg.outbound_allow6, [c6("2001:db8::/32")]);
    assert!(cfg.outbound_allow.is_empty());
    assert_eq!(cfg.outbound_deny6, super::DEFAULT_DENY6);
}

#[test]
fn ipv6_forwards_take_guest_addresses_of_the_prefix_only() {
    let mut cfg = test_config();
    let fwd = |g: &str| Forward {
        proto: Proto::Tcp,
        host: "[::1]:2222".parse().unwrap(),
        guest: g.parse().unwrap(),
    };
    assert!(
        cfg.check_forward(&fwd("[fd00::15]:22")).is_err(),
        "no IPv6 on the network"
    );
    cfg.ipv6 = test_config6().ipv6;
    assert!(cfg.check_forward(&fwd("[fd00::15]:22")).is_ok());
    for bad in [
        "[fd00::2]:22",
        "[fd00::3]:22",
        "[fd00::]:22",
        "[2001:db8::1]:22",
        "[fd00::15]:0",
    ] {
        assert!(cfg.check_forward(&fwd(bad)).is_err(), "{bad}");
    }
    assert!(cfg.check_forward(&fwd("10.0.2.15:22")).is_ok());
}
