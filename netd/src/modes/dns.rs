//! The DNS responder of a hostonly or internal network whose `dns` key names an
//! address: it answers the network's names ([`crate::dns::LocalNames`]) and relays
//! every other query to the host's resolver, as a NAT network's DNS address does.
//!
//! # Theory of operation
//!
//! One task per network, with one of two fronts:
//!
//! - [`Front::Socket`]: `dns` is the gateway of a hostonly network, which is the
//!   host's own address on the host TAP. The host kernel owns that address (it
//!   answers ARP for it), so the responder is an ordinary UDP socket bound to
//!   gateway:53 and to the host TAP (`SO_BINDTODEVICE`: queries arriving on other
//!   interfaces never reach it).
//! - [`Front::Port`]: any other address (every `dns` of an internal network, which
//!   has no host interface). The responder is a service port of the switch with a
//!   MAC of its own: it answers ARP for the address and reads UDP to its port 53.
//!
//! A query that is not local is relayed from one host UDP socket to the host's
//! first resolver ([`crate::dns::Resolvers`], re-read when `resolv.conf` changes)
//! under an id of the responder's choosing (the client's id is restored in the
//! reply). A reply is accepted only from the resolver the query went to and for an
//! id waiting: at most [`MAX_PENDING`] wait, each for [`PENDING_TIMEOUT`]; more are
//! dropped and counted (`forward_dropped`), as are replies too large for the
//! network's MTU. Malformed queries are dropped and counted (`malformed`).
//!
//! DNS over TCP: [`Front::Socket`] has a TCP listener beside it, on the same
//! address and interface ([`host_listener`]), served by a
//! [`crate::dns::tcp::TcpDns`] front (the NAT router's): the same answers, the
//! rest forwarded to the resolver over TCP, at most
//! [`crate::dns::tcp::MAX_PER_CLIENT`] connections per guest. [`Front::Port`] has
//! no TCP stack (it reads frames of UDP to port 53): a TCP query to an internal
//! network's `dns` address gets no answer, and a resolver falls back to UDP or
//! gives up, as with any server that does not listen on TCP.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;

use crate::dns::{Answer, LocalNames, Resolvers};
use crate::switch::ServicePort;
use crate::wire::{self, Ethernet, Ipv4, Udp, ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_UDP};

/// Most relayed queries waiting for the resolver.
pub const MAX_PENDING: usize = 256;
/// How long a relayed query waits for its reply.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(5);

/// Where queries come from and answers go.
pub enum Front {
    /// A UDP socket on the host's own address (the hostonly gateway).
    Socket(UdpSocket),
    /// A service port of the switch owning `addr` at `mac`.
    Port {
        /// The port.
        port: ServicePort,
        /// Its MAC.
        mac: [u8; 6],
        /// The address DNS is served on.
        addr: Ipv4Addr,
        /// The network's MTU (largest IP packet).
        mtu: usize,
    },
}

/// Who asked.
#[derive(Debug, Clone, Copy)]
enum Client {
    Addr(SocketAddr),
    Frame {
        mac: [u8; 6],
        ip: Ipv4Addr,
        port: u16,
    },
}

enum Input {
    Query(Vec<u8>, Client),
    /// A frame to send as is (an ARP answer).
    Frame(Vec<u8>),
    Nothing,
    Closed,
}

struct Pending {
    client: Client,
    id: [u8; 2],
    server: SocketAddr,
    at: Instant,
}

impl Front {
    async fn next(&mut self, buf: &mut [u8]) -> Input {
        match self {
            Front::Socket(s) => match s.recv_from(buf).await {
                Ok((n, from)) => match buf.get(..n) {
                    Some(q) => Input::Query(q.to_vec(), Client::Addr(from)),
                    None => Input::Nothing,
                },
                Err(_) => Input::Nothing,
            },
            Front::Port {
                port, mac, addr, ..
            } => {
                let Some(frame) = port.from_switch.recv().await else {
                    return Input::Closed;
                };
                let Some(eth) = Ethernet::parse(&frame) else {
                    return Input::Nothing;
                };
                match eth.ethertype {
                    ETHERTYPE_ARP => match wire::arp_answer(eth.payload, *mac, *addr) {
                        Some(f) => Input::Frame(f),
                        None => Input::Nothing,
                    },
                    ETHERTYPE_IPV4 => {
                        let Some(ip) = Ipv4::parse(eth.payload) else {
                            return Input::Nothing;
                        };
                        if ip.protocol != IPPROTO_UDP || ip.dst != *addr {
                            return Input::Nothing;
                        }
                        match Udp::parse(ip.payload) {
                            Some(u) if u.dst_port == 53 => Input::Query(
                                u.payload.to_vec(),
                                Client::Frame {
                                    mac: eth.src,
                                    ip: ip.src,
                                    port: u.src_port,
                                },
                            ),
                            _ => Input::Nothing,
                        }
                    }
                    _ => Input::Nothing,
                }
            }
        }
    }

    /// Sends `payload` to `client`; false if it could not go (too large, gone).
    async fn send(&self, client: Client, payload: &[u8]) -> bool {
        match (self, client) {
            (Front::Socket(s), Client::Addr(a)) => s.send_to(payload, a).await.is_ok(),
            (
                Front::Port {
                    port,
                    mac,
                    addr,
                    mtu,
                },
                Client::Frame {
                    mac: to,
                    ip,
                    port: p,
                },
            ) => {
                if payload.len() + 28 > *mtu {
                    return false;
                }
                let f = wire::emit_udp_frame(to, *mac, *addr, ip, 53, p, payload);
                port.to_switch.send(Bytes::from(f)).await.is_ok()
            }
            _ => false,
        }
    }

    async fn send_frame(&self, f: Vec<u8>) {
        if let Front::Port { port, .. } = self {
            let _ = port.to_switch.send(Bytes::from(f)).await;
        }
    }
}

/// Serves DNS for `names` on `front` until the front closes (the port is removed)
/// or the task is aborted.
pub async fn serve(names: Arc<LocalNames>, resolv_conf: PathBuf, mut front: Front) {
    let upstream = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the DNS relay socket; DNS not served");
            return;
        }
    };
    let mut relay = Relay {
        resolvers: Resolvers::new(resolv_conf),
        pending: HashMap::new(),
        rng: (crate::dns::unix_now() as u32) ^ std::process::id().rotate_left(16) | 1,
    };
    let mut buf = vec![0u8; 65536];
    let mut ubuf = vec![0u8; 65536];
    let c = &names.counters;
    loop {
        tokio::select! {
            input = front.next(&mut buf) => match input {
                Input::Closed => return,
                Input::Nothing => {}
                Input::Frame(f) => front.send_frame(f).await,
                Input::Query(q, client) => match names.answer(&q, crate::dns::unix_now()) {
                    Answer::Local(r) => {
                        front.send(client, &r).await;
                    }
                    Answer::Drop => {}
                    Answer::Forward => {
                        if !relay.forward(&upstream, q, client) {
                            c.forward_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
            },
            r = upstream.recv_from(&mut ubuf) => {
                let Ok((n, from)) = r else { continue };
                let Some(reply) = ubuf.get_mut(..n) else { continue };
                if let Some(client) = relay.take(reply, from) {
                    if !front.send(client, reply).await {
                        c.forward_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The queries relayed to the host's resolver.
struct Relay {
    resolvers: Resolvers,
    pending: HashMap<u16, Pending>,
    rng: u32,
}

impl Relay {
    /// A fresh id no waiting query has (xorshift: ids are not sequential).
    fn next_id(&mut self) -> u16 {
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 17;
            self.rng ^= self.rng << 5;
            let id = (self.rng >> 8) as u16;
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Sends `q` to the resolver under a new id; false if dropped.
    fn forward(&mut self, sock: &UdpSocket, mut q: Vec<u8>, client: Client) -> bool {
        let now = Instant::now();
        self.pending
            .retain(|_, p| now.duration_since(p.at) < PENDING_TIMEOUT);
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        let Some(server) = self.resolvers.current() else {
            return false;
        };
        let id = self.next_id();
        let Some(head) = q.get_mut(..2) else {
            return false;
        };
        let orig = [head[0], head[1]];
        head.copy_from_slice(&id.to_be_bytes());
        if sock.try_send_to(&q, server).is_err() {
            return false;
        }
        self.pending.insert(
            id,
            Pending {
                client,
                id: orig,
                server,
                at: now,
            },
        );
        true
    }

    /// The client of the resolver's `reply` from `from`, with the client's id put
    /// back; None if nobody waits for it.
    fn take(&mut self, reply: &mut [u8], from: SocketAddr) -> Option<Client> {
        let head = reply.get_mut(..2)?;
        let id = u16::from_be_bytes([head[0], head[1]]);
        if self.pending.get(&id)?.server != from {
            return None;
        }
        let p = self.pending.remove(&id)?;
        head.copy_from_slice(&p.id);
        Some(p.client)
    }
}

/// A socket of type `ty` bound to `addr`:53 on interface `ifname` only.
fn bound_socket(
    addr: Ipv4Addr,
    ifname: &str,
    ty: socket2::Type,
) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket};
    let s = Socket::new(Domain::IPV4, ty, None)?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.set_freebind_v4(true)?;
    if ty == socket2::Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.bind(&SocketAddr::from((addr, 53)).into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// The socket of [`Front::Socket`]: UDP `addr`:53 on interface `ifname` only.
pub fn host_socket(addr: Ipv4Addr, ifname: &str) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(bound_socket(addr, ifname, socket2::Type::DGRAM)?.into())
}

/// The TCP listener beside [`Front::Socket`]: `addr`:53 on interface `ifname`
/// only, served by a [`crate::dns::tcp::TcpDns`] front.
pub fn host_listener(addr: Ipv4Addr, ifname: &str) -> std::io::Result<tokio::net::TcpListener> {
    let s = bound_socket(addr, ifname, socket2::Type::STREAM)?;
    s.listen(128)?;
    tokio::net::TcpListener::from_std(s.into())
}
