//! UDP flows of the NAT router.
//!
//! # Theory of operation
//!
//! UDP has no connection, so a *flow* is the 4-tuple (guest address and port,
//! destination address and port) of the first datagram. Each flow gets its own host
//! UDP socket, bound to an ephemeral port and connected to the mapped destination
//! (the real address; 127.0.0.1 for the gateway; the host resolver for the DNS
//! address, port 53). Because the socket is connected, the kernel delivers to it only
//! datagrams from that peer: replies go back to the guest as if from the destination
//! it asked for, and nothing else from outside gets in. A flow is removed after
//! `udp_timeout` without traffic in either direction.
//!
//! Port forwards: a host socket bound to the forward's host address. A datagram from a
//! new client opens a *session*: a gateway port is allocated and the datagram goes to
//! the guest from (gateway, that port); the guest's replies to that port go back to
//! the client from the forward's socket. Sessions expire like flows.
//!
//! A datagram larger than the network's MTU allows is dropped and counted: the router
//! does not fragment.
//!
//! Each flow registers its host socket's read interest with a waker of its own (see
//! `wake.rs`), so a step reads only the flows whose sockets woke, not all of them. A
//! flow is re-armed after every read and, as a safety net, once a second by the
//! housekeeping sweep ([`UdpTable::rearm`]), so a wake-up that got lost (a read that
//! stopped at the burst limit or on an error, say) costs at most a second.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;
use tokio::net::UdpSocket;

use super::config::ForwardErrors;
use super::frame::{IPV4_HDR, UDP_HDR};
use super::frame6::udp_frame_any;
use super::router::GuestCounts;
use super::wake::Ready;
use super::{FlowInfo, Forward, NatError, Router};

/// Memory charged to one UDP or ICMP flow for the flow-table bound.
pub const FLOW_COST: usize = 4096;

/// Datagrams read from one host socket per step, so one busy flow cannot starve others.
const BURST: usize = 64;

type Key = (SocketAddr, SocketAddr);

struct Flow {
    sock: UdpSocket,
    mac: EthernetAddress,
    host_peer: SocketAddr,
    last: Instant,
    /// Marks this flow ready when its host socket is (see `wake.rs`).
    waker: Waker,
    /// On this step's work list already.
    queued: bool,
}

impl Flow {
    /// Registers the flow's waker for its socket's next readability; if the socket
    /// is readable already, marks the flow ready now.
    fn arm(&self) {
        let mut cx = Context::from_waker(&self.waker);
        if self.sock.poll_recv_ready(&mut cx).is_ready() {
            self.waker.wake_by_ref();
        }
    }
}

struct Session {
    host: SocketAddr,
    client: SocketAddr,
    guest: SocketAddr,
    last: Instant,
}

/// UDP flows and forwards.
#[derive(Default)]
pub struct UdpTable {
    flows: HashMap<Key, Flow>,
    forwards: HashMap<SocketAddr, (Forward, UdpSocket)>,
    /// Forward sessions by gateway port.
    sessions: HashMap<u16, Session>,
    by_client: HashMap<(SocketAddr, SocketAddr), u16>,
    next_port: u16,
    /// The flows whose host sockets woke since the last step.
    ready: Ready<Key>,
    /// The work list of a step (kept for its allocation).
    woken: Vec<Key>,
}

impl UdpTable {
    /// Flows plus forward sessions.
    pub fn len(&self) -> usize {
        self.flows.len() + self.sessions.len()
    }

    /// Registers interest; true if a socket is readable. Flows register their own
    /// wakers (see `wake.rs`): only those woken count.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> bool {
        let mut ready = self.ready.poll(cx.waker());
        for (_, s) in self.forwards.values() {
            ready |= s.poll_recv_ready(cx).is_ready();
        }
        ready
    }

    /// Binds a forward's socket.
    pub fn add_forward(&mut self, f: Forward) -> Result<(), NatError> {
        if self.forwards.contains_key(&f.host) {
            return Err(f.exists());
        }
        let bind_err = |source| f.bind_failed(source);
        let std_sock = std::net::UdpSocket::bind(f.host).map_err(bind_err)?;
        std_sock.set_nonblocking(true).map_err(bind_err)?;
        let sock = UdpSocket::from_std(std_sock).map_err(bind_err)?;
        tracing::info!(host = %f.host, guest = %f.guest, "udp forward added");
        self.forwards.insert(f.host, (f, sock));
        Ok(())
    }

    /// Removes a forward and its sessions.
    pub fn del_forward(&mut self, host: SocketAddr) -> bool {
        if self.forwards.remove(&host).is_none() {
            return false;
        }
        self.sessions.retain(|_, s| s.host != host);
        self.by_client.retain(|(h, _), _| *h != host);
        true
    }

    /// The forwards in place.
    pub fn forwards(&self) -> Vec<Forward> {
        self.forwards.values().map(|(f, _)| f.clone()).collect()
    }

    /// The flows, for `netd flows`.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = Instant::now();
        let mut v: Vec<FlowInfo> = self
            .flows
            .iter()
            .map(|((guest, dst), f)| FlowInfo::open("udp", guest, dst, f.host_peer, now - f.last))
            .collect();
        v.extend(self.sessions.iter().map(|(port, s)| {
            let dst = format!("gateway:{port}");
            FlowInfo {
                forward: true,
                ..FlowInfo::open("udp", s.guest, dst, s.client, now - s.last)
            }
        }));
        v
    }

    /// Removes flows and sessions idle longer than `timeout` (taking the flows off
    /// their guests' `counts`).
    pub fn expire(&mut self, timeout: Duration, counts: &mut GuestCounts) {
        let now = Instant::now();
        self.flows.retain(|(guest, _), f| {
            let keep = now.duration_since(f.last) <= timeout;
            if !keep {
                counts.dec(guest.ip());
            }
            keep
        });
        self.sessions
            .retain(|_, s| now.duration_since(s.last) <= timeout);
        let sessions = &self.sessions;
        self.by_client.retain(|_, p| sessions.contains_key(p));
    }

    /// Re-arms every flow (the once-a-second safety net for a lost wake-up).
    pub fn rearm(&self) {
        for f in self.flows.values() {
            f.arm();
        }
    }
}

impl Router {
    /// The largest datagram payload to a guest of the family of `a`.
    fn max_udp_payload(&self, a: &SocketAddr) -> usize {
        let ip = if a.is_ipv6() {
            super::frame6::IPV6_HDR
        } else {
            IPV4_HDR
        };
        self.cfg.mtu.saturating_sub(ip + UDP_HDR)
    }

    /// A datagram from a guest.
    pub(super) fn udp_input(
        &mut self,
        mac: EthernetAddress,
        guest: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) {
        // A guest's reply to a forward session.
        if Some(dst.ip()) == self.forward_gateway(guest) {
            if let Some(s) = self.udp.sessions.get_mut(&dst.port()) {
                if s.guest == guest {
                    s.last = Instant::now();
                    let (host, client) = (s.host, s.client);
                    if let Some((_, sock)) = self.udp.forwards.get(&host) {
                        if socket2::SockRef::from(sock)
                            .send_to(payload, &client.into())
                            .is_err()
                        {
                            self.stats.dropped += 1;
                        }
                    }
                    return;
                }
            }
        }
        // Unicast DHCP (renewals to the server identifier, which is the gateway
        // address) is not a host flow; dropped, the client falls back to broadcast,
        // which the network's DHCP service answers.
        let gw = IpAddr::V4(self.cfg.gateway);
        if (dst.ip() == gw || dst.ip() == IpAddr::V4(self.cfg.dns)) && dst.port() == 67 {
            self.stats.dropped += 1;
            return;
        }
        // The network's own names are answered here; the rest goes on to the
        // host's resolver as a flow (see `dns.rs`).
        if self.dns_local(mac, guest, dst, payload) {
            return;
        }
        let key = (guest, dst);
        if !self.udp.flows.contains_key(&key) {
            let unreachable =
                |r: &mut Router| r.udp_unreachable(mac, guest, dst, payload.len(), None);
            let target = match self.map_dst(dst) {
                Ok(t) => t,
                Err(d) => {
                    self.count_denied(d, |s| &mut s.dropped);
                    if d != super::router::Denied::Nowhere {
                        unreachable(self);
                    }
                    return;
                }
            };
            if !self.guest_fits(guest.ip(), false) {
                unreachable(self);
                return;
            }
            if !self.flow_fits(FLOW_COST) {
                self.stats.flows_refused += 1;
                return;
            }
            let sock = match open_connected(target) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%target, error = %e, "udp flow open failed");
                    self.stats.host_socket_failed(&e);
                    // No route on the host (no IPv6 connectivity, say): the guest
                    // learns it at once rather than by a timeout.
                    if let Some(code) = super::v6::no_route(&e) {
                        self.udp_unreachable(mac, guest, dst, payload.len(), Some(code));
                    }
                    return;
                }
            };
            self.guest_flows.inc(guest.ip());
            let flow = Flow {
                sock,
                mac,
                host_peer: target,
                last: Instant::now(),
                waker: self.udp.ready.waker(key),
                queued: false,
            };
            flow.arm();
            self.udp.flows.insert(key, flow);
        }
        if let Some(f) = self.udp.flows.get_mut(&key) {
            f.last = Instant::now();
            f.mac = mac;
            // Straight to the kernel: tokio's try_send would refuse a socket whose
            // writability it has not seen yet (a new flow).
            if socket2::SockRef::from(&f.sock).send(payload).is_err() {
                self.stats.dropped += 1;
            }
        }
    }

    /// Replies from host sockets back to guests, for the flows whose sockets woke.
    pub(super) fn udp_pump(&mut self) {
        let mut woken = std::mem::take(&mut self.udp.woken);
        self.udp.ready.take(&mut woken);
        if woken.is_empty() {
            self.udp.woken = woken;
            return;
        }
        let (max4, max6) = (
            self.max_udp_payload(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            self.max_udp_payload(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))),
        );
        let mut buf = self.take_scratch();
        let now = Instant::now();
        // A key may be woken more than once a step: each flow is read once.
        woken.retain(|k| match self.udp.flows.get_mut(k) {
            Some(f) if !f.queued => {
                f.queued = true;
                true
            }
            _ => false,
        });
        for key in woken.drain(..) {
            let (guest, dst) = key;
            let Some(f) = self.udp.flows.get_mut(&key) else {
                continue;
            };
            f.queued = false;
            for _ in 0..BURST {
                match f.sock.try_recv(&mut buf) {
                    Ok(n) => {
                        f.last = now;
                        let Some(data) = buf.get(..n) else { break };
                        if n > if guest.is_ipv6() { max6 } else { max4 } {
                            self.stats.dropped += 1;
                            continue;
                        }
                        if let Some(fr) = udp_frame_any(self.mac, f.mac, dst, guest, data) {
                            self.dev.tx.push_back(fr.into());
                        }
                    }
                    // WouldBlock, or an ICMP error reported on the connected socket
                    // (e.g. ECONNREFUSED): nothing to deliver.
                    Err(_) => break,
                }
            }
            // Stopped at the burst limit or on an error, the socket may still be
            // readable: then it is ready again at once; else it waits for its next
            // datagram.
            f.arm();
        }
        self.udp.woken = woken;
        self.scratch = buf;
    }

    /// Datagrams arriving on forward sockets: to the guest.
    pub(super) fn udp_forward_input(&mut self) {
        if self.udp.forwards.is_empty() {
            return;
        }
        let mut buf = self.take_scratch();
        let hosts: Vec<SocketAddr> = self.udp.forwards.keys().copied().collect();
        for host in hosts {
            for _ in 0..BURST {
                let Some((fwd, sock)) = self.udp.forwards.get(&host) else {
                    break;
                };
                let guest = fwd.guest;
                let (n, client) = match sock.try_recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(_) => break,
                };
                if n > self.max_udp_payload(&guest) {
                    self.stats.dropped += 1;
                    continue;
                }
                let port = match self.udp.by_client.get(&(host, client)) {
                    Some(p) => *p,
                    None => {
                        if !self.flow_fits(FLOW_COST) {
                            self.stats.flows_refused += 1;
                            continue;
                        }
                        let Some(p) = self.free_udp_port() else {
                            self.stats.flows_refused += 1;
                            continue;
                        };
                        self.udp.by_client.insert((host, client), p);
                        self.udp.sessions.insert(
                            p,
                            Session {
                                host,
                                client,
                                guest,
                                last: Instant::now(),
                            },
                        );
                        p
                    }
                };
                if let Some(s) = self.udp.sessions.get_mut(&port) {
                    s.last = Instant::now();
                }
                // Until the guest has spoken, its MAC is unknown: broadcast MAC with
                // a unicast IP destination is still delivered by the guest stack.
                let mac = self
                    .guest_macs
                    .get(&guest.ip())
                    .copied()
                    .unwrap_or(EthernetAddress::BROADCAST);
                let (Some(data), Some(gw)) = (buf.get(..n), self.forward_gateway(guest)) else {
                    continue;
                };
                let from = SocketAddr::new(gw, port);
                if let Some(f) = super::frame6::udp_frame_any(self.mac, mac, from, guest, data) {
                    self.dev.tx.push_back(f.into());
                }
            }
        }
        self.scratch = buf;
    }

    /// An ICMP unreachable to the guest for its datagram from `guest` to `dst`
    /// (`no_route`: the ICMPv6 code of the host's reason, see [`super::v6::no_route`];
    /// `None`: "administratively prohibited"), from the gateway of its family.
    fn udp_unreachable(
        &mut self,
        mac: EthernetAddress,
        guest: SocketAddr,
        dst: SocketAddr,
        len: usize,
        no_route: Option<u8>,
    ) {
        let f = match (guest, dst, &self.cfg.ipv6) {
            (SocketAddr::V4(g), SocketAddr::V4(d), _) => super::frame::icmp_unreachable(
                self.mac,
                mac,
                self.cfg.gateway,
                (*g.ip(), g.port()),
                (*d.ip(), d.port()),
                len,
            ),
            (SocketAddr::V6(g), SocketAddr::V6(d), Some(v6)) => {
                let code = no_route.unwrap_or(1);
                super::frame6::icmp6_unreachable(self.mac, mac, v6.gateway, g, d, len, code)
            }
            _ => return,
        };
        self.dev.tx.push_back(f.into());
    }

    fn free_udp_port(&mut self) -> Option<u16> {
        let sessions = &self.udp.sessions;
        super::free_forward_port(&mut self.udp.next_port, |p| sessions.contains_key(&p))
    }
}

fn open_connected(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = match target.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(target)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}
