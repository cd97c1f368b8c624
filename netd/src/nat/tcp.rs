//! TCP flows of the NAT router.
//!
//! # Theory of operation
//!
//! A guest connection is spliced from two connections: the guest's, terminated by a
//! smoltcp socket, and the router's own host socket (tokio `TcpStream`).
//!
//! Opening (guest side): the classifier hands over a SYN with no flow. The router
//! starts a host `connect` to the mapped destination in a task and keeps no state but
//! a *pending* entry; retransmitted SYNs meanwhile are dropped. When the connect
//! succeeds, a smoltcp socket is created listening on exactly the destination address
//! and port, and the held SYN is fed to it: the guest gets its SYN-ACK only once the
//! far end accepted. When the connect fails (refused, unreachable, timed out), the
//! guest gets a RST for its SYN.
//!
//! Opening (port forward): a host listener accepts; the router opens a smoltcp socket
//! from the gateway address and a free port to the guest address.
//!
//! Data: smoltcp's `recv` and `send` lend a slice of the socket's ring buffer; the host
//! socket's `try_write` / `try_read` work on that slice directly, so bytes are copied
//! once per direction between kernel and ring. When the ring is full (guest slow), the
//! host socket is not read (its receive window closes); when the host socket is full,
//! the ring is not drained (the guest's window closes).
//!
//! Closing: a host EOF closes the smoltcp socket (FIN after the queued bytes); a guest
//! FIN, once its bytes are written, shuts the host socket down for writing. A host
//! error aborts the smoltcp socket (RST to the guest); a guest RST drops the host
//! socket with SO_LINGER 0 (RST to the host peer). A flow is removed when its smoltcp
//! socket is closed or in TIME-WAIT.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, SocketAddrV4};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::wire::{EthernetAddress, IpListenEndpoint, TcpSeqNumber};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{FlowInfo, Forward, NatError, Router};

type Key = (SocketAddrV4, SocketAddrV4);

struct Flow {
    handle: SocketHandle,
    stream: TcpStream,
    host_peer: SocketAddr,
    /// The forward's host address, for flows a forward opened.
    forward: Option<SocketAddr>,
    host_eof: bool,
    host_wr_shut: bool,
    want_read: bool,
    want_write: bool,
    last: Instant,
}

struct Pending {
    syn: Bytes,
    mac: EthernetAddress,
    seq: TcpSeqNumber,
}

struct ConnectResult {
    key: Key,
    target: SocketAddr,
    result: std::io::Result<TcpStream>,
}

/// TCP flows, pending connects and forward listeners.
pub struct TcpTable {
    flows: HashMap<Key, Flow>,
    pending: HashMap<Key, Pending>,
    results_tx: mpsc::UnboundedSender<ConnectResult>,
    results_rx: mpsc::UnboundedReceiver<ConnectResult>,
    results: Vec<ConnectResult>,
    listeners: HashMap<SocketAddr, (Forward, TcpListener)>,
    accepted: Vec<(SocketAddr, TcpStream, SocketAddr)>,
    next_port: u16,
}

impl Default for TcpTable {
    fn default() -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        TcpTable {
            flows: HashMap::new(),
            pending: HashMap::new(),
            results_tx,
            results_rx,
            results: Vec::new(),
            listeners: HashMap::new(),
            accepted: Vec::new(),
            next_port: FWD_PORT_FIRST,
        }
    }
}

const FWD_PORT_FIRST: u16 = 32768;
const FWD_PORT_LAST: u16 = 60999;

impl TcpTable {
    /// Flows plus pending connects.
    pub fn len(&self) -> usize {
        self.flows.len() + self.pending.len()
    }

    /// Registers interest; true if something is ready now.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> bool {
        let mut ready = false;
        while let Poll::Ready(Some(r)) = self.results_rx.poll_recv(cx) {
            self.results.push(r);
            ready = true;
        }
        for (host, (_, l)) in &self.listeners {
            while let Poll::Ready(r) = l.poll_accept(cx) {
                match r {
                    Ok((s, peer)) => {
                        self.accepted.push((*host, s, peer));
                        ready = true;
                    }
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "forward accept failed");
                        break;
                    }
                }
                if self.accepted.len() >= 64 {
                    break;
                }
            }
        }
        for f in self.flows.values() {
            if f.want_read && f.stream.poll_read_ready(cx).is_ready() {
                ready = true;
            }
            if f.want_write && f.stream.poll_write_ready(cx).is_ready() {
                ready = true;
            }
        }
        ready
    }

    /// Binds a forward's listener.
    pub fn add_forward(&mut self, f: Forward) -> Result<(), NatError> {
        if self.listeners.contains_key(&f.host) {
            return Err(NatError::ForwardExists {
                proto: f.proto,
                host: f.host,
            });
        }
        let bind_err = |source| NatError::Bind {
            proto: f.proto,
            host: f.host,
            source,
        };
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(f.host),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(bind_err)?;
        sock.set_reuse_address(true).map_err(bind_err)?;
        sock.bind(&f.host.into()).map_err(bind_err)?;
        sock.listen(128).map_err(bind_err)?;
        sock.set_nonblocking(true).map_err(bind_err)?;
        let l = TcpListener::from_std(sock.into()).map_err(bind_err)?;
        tracing::info!(host = %f.host, guest = %f.guest, "tcp forward added");
        self.listeners.insert(f.host, (f, l));
        Ok(())
    }

    /// Removes a forward and resets the connections it made.
    pub fn del_forward(&mut self, host: SocketAddr, sockets: &mut SocketSet<'_>) -> bool {
        if self.listeners.remove(&host).is_none() {
            return false;
        }
        for f in self.flows.values_mut() {
            if f.forward == Some(host) {
                sockets.get_mut::<Socket>(f.handle).abort();
            }
        }
        tracing::info!(%host, "tcp forward removed");
        true
    }

    /// The forwards in place.
    pub fn forwards(&self) -> Vec<Forward> {
        self.listeners.values().map(|(f, _)| f.clone()).collect()
    }

    /// The flows, for `netd flows`.
    pub fn flows(&self, sockets: &SocketSet<'_>) -> Vec<FlowInfo> {
        let now = Instant::now();
        let mut v: Vec<FlowInfo> = self
            .flows
            .iter()
            .map(|((guest, dst), f)| FlowInfo {
                proto: "tcp".into(),
                guest: guest.to_string(),
                dst: dst.to_string(),
                host_peer: f.host_peer.to_string(),
                state: format!("{}", sockets.get::<Socket>(f.handle).state()),
                forward: f.forward.is_some(),
                idle_s: now.duration_since(f.last).as_secs(),
            })
            .collect();
        v.extend(self.pending.keys().map(|(guest, dst)| FlowInfo {
            proto: "tcp".into(),
            guest: guest.to_string(),
            dst: dst.to_string(),
            host_peer: String::new(),
            state: "CONNECTING".into(),
            forward: false,
            idle_s: 0,
        }));
        v
    }

    /// Resets flows idle longer than `timeout`, and flows whose guest side never
    /// got established within `open_timeout` (a lost SYN, a guest that went away).
    pub fn expire(
        &mut self,
        timeout: Duration,
        open_timeout: Duration,
        sockets: &mut SocketSet<'_>,
    ) {
        let now = Instant::now();
        for f in self.flows.values_mut() {
            let sock = sockets.get_mut::<Socket>(f.handle);
            let opening = matches!(
                sock.state(),
                State::Listen | State::SynReceived | State::SynSent
            );
            let idle = now.duration_since(f.last);
            if idle > timeout || (opening && idle > open_timeout) {
                sock.abort();
            }
        }
    }
}

enum ReadOutcome {
    Data,
    Eof,
    Block,
    Error,
}

impl Router {
    /// A guest SYN with no flow yet: start the host connect (or refuse).
    pub(super) fn tcp_syn(
        &mut self,
        frame: Bytes,
        mac: EthernetAddress,
        src: (std::net::Ipv4Addr, u16),
        dst: (std::net::Ipv4Addr, u16),
        seq: TcpSeqNumber,
    ) {
        let key = (
            SocketAddrV4::new(src.0, src.1),
            SocketAddrV4::new(dst.0, dst.1),
        );
        if self.tcp.flows.contains_key(&key) {
            // A retransmitted SYN of a flow being opened: smoltcp answers it.
            self.dev.rx.push_back(frame);
            return;
        }
        if self.tcp.pending.contains_key(&key) {
            return;
        }
        let rst = |r: &mut Router| {
            r.dev
                .tx
                .push_back(super::frame::tcp_rst(r.mac, mac, dst, src, seq));
        };
        let Some(target) = self.map_dst(key.1) else {
            self.stats.connect_failed += 1;
            rst(self);
            return;
        };
        if !self.flow_fits(2 * self.cfg.limits.tcp_buffer) {
            self.stats.flows_refused += 1;
            rst(self);
            return;
        }
        self.tcp.pending.insert(
            key,
            Pending {
                syn: frame,
                mac,
                seq,
            },
        );
        let tx = self.tcp.results_tx.clone();
        let timeout = self.cfg.limits.connect_timeout;
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "connect timed out",
                )),
            };
            let _ = tx.send(ConnectResult {
                key,
                target,
                result,
            });
        });
    }

    fn new_socket(&self) -> Socket<'static> {
        let n = self.cfg.limits.tcp_buffer;
        let mut s = Socket::new(SocketBuffer::new(vec![0; n]), SocketBuffer::new(vec![0; n]));
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s
    }

    /// Host connects that finished: open the guest side, or RST the guest.
    pub(super) fn tcp_connect_results(&mut self) {
        for r in std::mem::take(&mut self.tcp.results) {
            let Some(p) = self.tcp.pending.remove(&r.key) else {
                continue;
            };
            let (guest, dst) = r.key;
            match r.result {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let mut s = self.new_socket();
                    let ep = IpListenEndpoint {
                        addr: Some((*dst.ip()).into()),
                        port: dst.port(),
                    };
                    if s.listen(ep).is_err() {
                        continue;
                    }
                    let handle = self.sockets.add(s);
                    self.tcp.flows.insert(
                        r.key,
                        Flow {
                            handle,
                            stream,
                            host_peer: r.target,
                            forward: None,
                            host_eof: false,
                            host_wr_shut: false,
                            want_read: false,
                            want_write: false,
                            last: Instant::now(),
                        },
                    );
                    self.dev.rx.push_back(p.syn);
                }
                Err(e) => {
                    tracing::debug!(%guest, %dst, target = %r.target, error = %e, "connect failed");
                    self.stats.connect_failed += 1;
                    self.dev.tx.push_back(super::frame::tcp_rst(
                        self.mac,
                        p.mac,
                        (*dst.ip(), dst.port()),
                        (*guest.ip(), guest.port()),
                        p.seq,
                    ));
                }
            }
        }
    }

    /// Connections accepted by forward listeners: connect to the guest.
    pub(super) fn tcp_accept_forwards(&mut self) {
        for (host, stream, peer) in std::mem::take(&mut self.tcp.accepted) {
            let Some((fwd, _)) = self.tcp.listeners.get(&host) else {
                continue;
            };
            let guest = fwd.guest;
            if !self.flow_fits(2 * self.cfg.limits.tcp_buffer) {
                self.stats.flows_refused += 1;
                continue;
            }
            let gw = self.cfg.gateway;
            let Some(port) = self.free_forward_port(guest) else {
                self.stats.flows_refused += 1;
                continue;
            };
            let mut s = self.new_socket();
            let local = IpListenEndpoint {
                addr: Some(gw.into()),
                port,
            };
            if s.connect(
                self.iface.context(),
                (smoltcp::wire::IpAddress::Ipv4(*guest.ip()), guest.port()),
                local,
            )
            .is_err()
            {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let handle = self.sockets.add(s);
            tracing::debug!(%host, %peer, %guest, "forwarded connection");
            self.tcp.flows.insert(
                (guest, SocketAddrV4::new(gw, port)),
                Flow {
                    handle,
                    stream,
                    host_peer: peer,
                    forward: Some(host),
                    host_eof: false,
                    host_wr_shut: false,
                    want_read: false,
                    want_write: false,
                    last: Instant::now(),
                },
            );
        }
    }

    fn free_forward_port(&mut self, guest: SocketAddrV4) -> Option<u16> {
        let gw = self.cfg.gateway;
        for _ in FWD_PORT_FIRST..=FWD_PORT_LAST {
            let p = self.tcp.next_port;
            self.tcp.next_port = if p >= FWD_PORT_LAST {
                FWD_PORT_FIRST
            } else {
                p + 1
            };
            if !self
                .tcp
                .flows
                .contains_key(&(guest, SocketAddrV4::new(gw, p)))
            {
                return Some(p);
            }
        }
        None
    }

    /// Moves bytes both ways for every flow.
    pub(super) fn tcp_pump(&mut self) {
        let now = Instant::now();
        for flow in self.tcp.flows.values_mut() {
            let sock = self.sockets.get_mut::<Socket>(flow.handle);
            // Guest to host.
            while sock.can_recv() {
                let r = sock.recv(|buf| match flow.stream.try_write(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(n)) if n > 0 => flow.last = now,
                    Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Ok(Err(_)) => {
                        sock.abort();
                        break;
                    }
                    _ => break,
                }
            }
            flow.want_write = sock.can_recv();
            if !flow.host_wr_shut
                && sock.recv_queue() == 0
                && matches!(
                    sock.state(),
                    State::CloseWait | State::LastAck | State::Closing | State::TimeWait
                )
            {
                flow.host_wr_shut = true;
                let _ = socket2::SockRef::from(&flow.stream).shutdown(std::net::Shutdown::Write);
            }
            // Host to guest.
            while !flow.host_eof && sock.can_send() {
                let r = sock.send(|buf| match flow.stream.try_read(buf) {
                    Ok(0) => (0, ReadOutcome::Eof),
                    Ok(n) => (n, ReadOutcome::Data),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => (0, ReadOutcome::Block),
                    Err(_) => (0, ReadOutcome::Error),
                });
                match r {
                    Ok(ReadOutcome::Data) => flow.last = now,
                    Ok(ReadOutcome::Eof) => {
                        flow.host_eof = true;
                        sock.close();
                    }
                    Ok(ReadOutcome::Error) => {
                        flow.host_eof = true;
                        sock.abort();
                    }
                    Ok(ReadOutcome::Block) | Err(_) => break,
                }
            }
            flow.want_read = !flow.host_eof && sock.can_send();
        }
    }

    /// Removes flows whose guest side is over.
    pub(super) fn tcp_cleanup(&mut self) {
        let sockets = &mut self.sockets;
        self.tcp.flows.retain(|_, f| {
            let state = sockets.get::<Socket>(f.handle).state();
            if matches!(state, State::Closed | State::TimeWait) {
                if !(f.host_eof && f.host_wr_shut) {
                    // The guest reset or the flow was aborted: reset the host side too.
                    let _ = socket2::SockRef::from(&f.stream).set_linger(Some(Duration::ZERO));
                }
                sockets.remove(f.handle);
                false
            } else {
                true
            }
        });
    }
}
