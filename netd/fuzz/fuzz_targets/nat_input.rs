//! Fuzz target: the NAT router's input, driven far enough that flows exist.
//!
//! The input is a program. Its first byte picks the router (offload on or off, MTU
//! 1500 or 65520); then each operation is a tag byte and its arguments:
//!
//! - a raw frame (2-byte big-endian length, then the bytes; in offload mode the
//!   bytes start with the virtio-net header);
//! - a TCP segment, UDP datagram or ICMP echo the harness builds from the fuzzer's
//!   fields with correct checksums (a flag breaks them), from one of four guests, to
//!   the gateway (the host's loopback: `host_loopback`), the DNS address, or
//!   anywhere; in offload mode with a plain, partial-checksum, GSO or raw header;
//! - "settle": let the runtime run, so host connects finish and the router opens
//!   its smoltcp sockets (`Router::settle_for_test`), and host data comes in.
//!
//! TCP sequence and acknowledgement numbers can be relative to what the harness
//! saw last on that flow (the router's SYN-ACK and segments), so the fuzzer reaches
//! established connections, data, FIN and RST in window without guessing an ISN.
//! The host peers are a TCP server and a UDP echo socket on 127.0.0.1 run by the
//! harness; flows may only go to loopback (`outbound_allow`), and the resolver
//! list is empty, so nothing is ever sent off the machine.
#![no_main]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use netd::nat::{Router, RouterConfig, ToSwitch};
use netd::offload::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, VNET_HDR_LEN};
use netd::wire::checksum;
use tokio::sync::mpsc;

const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const RMAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// The harness's host peers: (TCP server port, UDP echo port), started once.
fn peers() -> (u16, u16) {
    static PEERS: OnceLock<(u16, u16)> = OnceLock::new();
    *PEERS.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("tcp listener");
        let tport = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    // Some data towards the guest, then read until the router closes.
                    let _ = s.write_all(&[0x5a; 3000]);
                    let mut b = [0u8; 4096];
                    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                });
            }
        });
        let u = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        let uport = u.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let mut b = [0u8; 65536];
            while let Ok((n, from)) = u.recv_from(&mut b) {
                let _ = u.send_to(&b[..n], from);
            }
        });
        (tport, uport)
    })
}

/// Reads the fuzzer's bytes as arguments; past the end everything is zero.
struct Args<'a>(&'a [u8]);

impl Args<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

type FlowKey = (Ipv4Addr, u16);

/// What the harness saw of each guest TCP flow.
#[derive(Default, Clone, Copy)]
struct Seen {
    /// The router's next sequence number (what the guest would ACK).
    router_next: u32,
    /// The guest's next sequence number.
    guest_next: u32,
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, body_len: usize, ttl: u8) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    let total = (20 + body_len).min(usize::from(u16::MAX)) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = ttl;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = proto;
    p[10..12].copy_from_slice(&(len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    p
}

fn guest(i: u8) -> ([u8; 6], Ipv4Addr) {
    let i = i % 4;
    (
        [0x02, 0, 0, 0, 0, 0x10 + i],
        Ipv4Addr::new(10, 0, 2, 15 + i),
    )
}

/// The destination an argument byte picks.
fn dst(a: &mut Args, tcp: bool) -> (Ipv4Addr, u16) {
    let (tport, uport) = peers();
    match a.u8() % 6 {
        0 | 1 => (GW, if tcp { tport } else { uport }),
        2 => (GW, 1), // closed on the host: refused / ICMP unreachable
        3 => (DNS, 53),
        4 => (DNS, a.u16()),
        _ => (Ipv4Addr::from(a.u32()), a.u16()),
    }
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// A TCP segment from the fuzzer's fields; its virtio-net header in offload mode.
fn tcp_op(a: &mut Args, offload: bool, flows: &mut HashMap<FlowKey, Seen>) -> Vec<u8> {
    let (gmac, gip) = guest(a.u8());
    let sport = 40000 + u16::from(a.u8() % 8);
    let (dip, dport) = dst(a, true);
    let flags = a.u8();
    let mode = a.u8();
    let seen = flows.entry((gip, sport)).or_default();
    // Relative numbers (mode bits 0 and 1) let the fuzzer stay in window.
    let seq = if mode & 1 != 0 {
        seen.guest_next
            .wrapping_add(u32::from(a.u8()).wrapping_sub(8))
    } else {
        a.u32()
    };
    let ack = if mode & 2 != 0 {
        seen.router_next
            .wrapping_add(u32::from(a.u8()).wrapping_sub(8))
    } else {
        a.u32()
    };
    let window = a.u16();
    let opt_words = usize::from(a.u8() % 11);
    let opts = a.bytes(opt_words * 4).to_vec();
    let plen = usize::from(a.u16() % 9000);
    let mut payload = a.bytes(plen).to_vec();
    // A long payload the fuzzer need not spell out (GSO super-frames).
    if mode & 0x10 != 0 {
        payload.resize(plen.max(payload.len()) * 8, 0x61);
    }
    let syn = flags & 0x02 != 0;
    let fin = flags & 0x01 != 0;
    seen.guest_next = seq
        .wrapping_add(payload.len() as u32)
        .wrapping_add(u32::from(syn) + u32::from(fin));
    let mut t = Vec::with_capacity(20 + opts.len() + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push(((5 + opts.len() / 4) as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(&payload);
    let ph = pseudo(gip, dip, 6, t.len());
    let partial = offload && mode & 0x0c == 0x04;
    let c = if partial {
        // A partial checksum: the pseudo-header sum only, as a kernel hands it over.
        !checksum(&[&ph])
    } else {
        checksum(&[&ph, &t])
    };
    let c = if mode & 0x20 != 0 { c ^ 0x5555 } else { c };
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(VNET_HDR_LEN + 34 + t.len());
    if offload {
        let hdr = match (mode >> 2) & 3 {
            0 => VnetHdr::default(),
            1 => VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 16,
                ..VnetHdr::default()
            },
            2 => VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: (34 + 20 + opts.len()) as u16,
                gso_size: a.u16() % 9000,
                csum_start: 34,
                csum_offset: 16,
            },
            _ => VnetHdr::parse(&[
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
                a.u8(),
            ])
            .unwrap_or_default(),
        };
        f.extend_from_slice(&hdr.to_bytes());
    }
    eth(RMAC, gmac, 0x0800, &mut f);
    f.extend_from_slice(&ipv4(gip, dip, 6, t.len(), 64));
    f.extend_from_slice(&t);
    f
}

fn udp_op(a: &mut Args, offload: bool) -> Vec<u8> {
    let (gmac, gip) = guest(a.u8());
    let sport = 40000 + u16::from(a.u8() % 8);
    let (dip, dport) = dst(a, false);
    let plen = usize::from(a.u16() % 2000);
    let payload = a.bytes(plen).to_vec();
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(&payload);
    let c = checksum(&[&pseudo(gip, dip, 17, u.len()), &u]);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    if offload {
        f.extend_from_slice(&[0; VNET_HDR_LEN]);
    }
    eth(RMAC, gmac, 0x0800, &mut f);
    f.extend_from_slice(&ipv4(gip, dip, 17, u.len(), a.u8()));
    f.extend_from_slice(&u);
    f
}

fn icmp_op(a: &mut Args, offload: bool) -> Vec<u8> {
    let (gmac, gip) = guest(a.u8());
    let (dip, _) = dst(a, false);
    let ty = if a.u8() & 1 == 0 { 8 } else { a.u8() };
    let ident = a.u16();
    let seq = a.u16();
    let plen = usize::from(a.u8());
    let payload = a.bytes(plen).to_vec();
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&payload);
    let c = checksum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    if offload {
        f.extend_from_slice(&[0; VNET_HDR_LEN]);
    }
    eth(RMAC, gmac, 0x0800, &mut f);
    f.extend_from_slice(&ipv4(gip, dip, 1, m.len(), 64));
    f.extend_from_slice(&m);
    f
}

fn arp_op(a: &mut Args, offload: bool) -> Vec<u8> {
    let (gmac, gip) = guest(a.u8());
    let target = if a.u8() & 1 == 0 { GW } else { DNS };
    let mut f = Vec::new();
    if offload {
        f.extend_from_slice(&[0; VNET_HDR_LEN]);
    }
    eth([0xff; 6], gmac, 0x0806, &mut f);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&gmac);
    f.extend_from_slice(&gip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Notes the router's sequence numbers in what it sent to the guests.
fn observe(out: &[Bytes], offload: bool, flows: &mut HashMap<FlowKey, Seen>) {
    for f in out {
        let f = if offload && f.len() > VNET_HDR_LEN && f.get(12..14) != Some(&[8, 0]) {
            &f[VNET_HDR_LEN..]
        } else {
            &f[..]
        };
        if f.len() < 54 || f[12..14] != [8, 0] || f[23] != 6 {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let Some(t) = f.get(14 + ihl..(14 + total).min(f.len())) else {
            continue;
        };
        if t.len() < 20 {
            continue;
        }
        let gip = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
        let gport = u16::from_be_bytes([t[2], t[3]]);
        let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
        let doff = usize::from(t[12] >> 4) * 4;
        let len = t.len().saturating_sub(doff) as u32;
        let flags = t[13];
        let next = seq
            .wrapping_add(len)
            .wrapping_add(u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0));
        flows.entry((gip, gport)).or_default().router_next = next;
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
    }
    let _ = peers();
    let mut a = Args(data);
    let setup = a.u8();
    let offload = setup & 1 != 0;
    RT.with(|rt| {
        rt.block_on(async {
            let (_to_router, from_switch) = mpsc::channel(1);
            let mut cfg = RouterConfig::defaults();
            cfg.outbound_allow = vec![(Ipv4Addr::LOCALHOST, 8)];
            cfg.host_loopback = true;
            cfg.resolv_conf = "/nonexistent".into();
            cfg.mtu = if setup & 2 != 0 { 65520 } else { 1500 };
            cfg.limits.connect_timeout = Duration::from_millis(200);
            // Frames a step sends come back from `process_frame_for_test`; the
            // channel (used only by `serve`) stays open for the run.
            let (to_switch, _from_router) = mpsc::channel(1);
            let sink = if offload {
                ToSwitch::Offload(Box::new(|_, _| {}))
            } else {
                ToSwitch::Channel(to_switch)
            };
            let Ok((mut router, _handle)) = Router::with_sink(cfg, from_switch, sink) else {
                return;
            };
            let mut flows: HashMap<FlowKey, Seen> = HashMap::new();
            let mut ops = 0;
            while !a.done() && ops < 64 {
                ops += 1;
                let frame = match a.u8() % 8 {
                    0 => {
                        let n = usize::from(a.u16());
                        a.bytes(n).to_vec()
                    }
                    1 | 2 => tcp_op(&mut a, offload, &mut flows),
                    3 => udp_op(&mut a, offload),
                    4 => icmp_op(&mut a, offload),
                    5 => arp_op(&mut a, offload),
                    _ => {
                        // Let the host connects and host sockets make progress.
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        if a.u8() & 0x0f == 0 {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        let out = router.settle_for_test();
                        observe(&out, offload, &mut flows);
                        continue;
                    }
                };
                let out = router.process_frame_for_test(Bytes::from(frame));
                observe(&out, offload, &mut flows);
            }
        });
    });
});
