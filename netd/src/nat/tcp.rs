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
//! Offload: when the switch takes offloaded frames (the daemon's case), the router
//! rewrites the MSS option of the guest's SYN (before smoltcp sees it) to nearly
//! 64 KiB and keeps the guest's own MSS. smoltcp then builds TCP segments of up to
//! 64 KiB and does not checksum them; each TCP frame leaves with a virtio-net header:
//! the pseudo-header sum in the checksum field and NEEDS_CSUM, plus TCPV4 GSO with the
//! guest's MSS when the frame is larger than the network's MTU. A guest TAP with vnet
//! headers takes such a frame in one write (its kernel trusts the partial checksum);
//! other ports get it finished and cut to MSS-sized segments by the switch. Per 64 KiB
//! of data that is one frame through the router instead of up to 44.
//!
//! Closing: a host EOF closes the smoltcp socket (FIN after the queued bytes); a guest
//! FIN, once its bytes are written, shuts the host socket down for writing. A host
//! error aborts the smoltcp socket (RST to the guest); a guest RST drops the host
//! socket with SO_LINGER 0 (RST to the host peer). A flow is removed when its smoltcp
//! socket is closed or in TIME-WAIT.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use smoltcp::socket::tcp::State;
use smoltcp::wire::{EthernetAddress, IpListenEndpoint, TcpSeqNumber};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::config::ForwardErrors;
use super::ring::{FlowSocket, Ring};
use super::tcp_wire::{raise_syn_mss, DELAYED_ACK_MIN_MSS};
use super::wake::Ready;
use super::{FlowInfo, Forward, NatError, Router};

pub(super) type Key = (SocketAddr, SocketAddr);

/// A flow idle this long with empty rings gives their pages back (see `ring.rs`).
const RELEASE_IDLE: Duration = Duration::from_secs(2);

struct Flow {
    /// The smoltcp socket, in a set of its own (see `ring.rs`).
    sock: FlowSocket,
    /// Marks this flow ready when its host socket is (see `wake.rs`).
    waker: Waker,
    /// In this step's work list.
    dirty: bool,
    /// When smoltcp wants this flow polled again (its entry in the timer heap).
    next_poll: Option<smoltcp::time::Instant>,
    /// One past the last sequence number the guest sent, and the last the flow
    /// acknowledged: equal when smoltcp holds no out-of-order data.
    guest_end: Option<TcpSeqNumber>,
    acked: Option<TcpSeqNumber>,
    /// `last` when the rings were last given back (none since then if equal).
    released: Option<Instant>,
    /// The guest's MSS from its SYN (segment size of offloaded super-frames).
    guest_mss: u16,
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
    mss: u16,
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
    /// Flows woken by their host sockets.
    ready: Ready<Key>,
    /// The flows this step works on (each with `dirty` set).
    dirty: Vec<Key>,
    /// smoltcp timers of the flows, earliest first (stale entries are skipped).
    timers: BinaryHeap<Reverse<(smoltcp::time::Instant, Key)>>,
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
            ready: Ready::default(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            pending: HashMap::new(),
            results_tx,
            results_rx,
            results: Vec::new(),
            listeners: HashMap::new(),
            accepted: Vec::new(),
            next_port: super::FWD_PORT_FIRST,
        }
    }
}

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
        // Flows register their own wakers (see `wake.rs`): only those woken count.
        ready |= self.ready.poll(cx.waker());
        ready
    }

    /// The guest's MSS of a flow (0 if unknown).
    pub(super) fn guest_mss(&self, key: &Key) -> u16 {
        self.flows.get(key).map(|f| f.guest_mss).unwrap_or(0)
    }

    /// The earliest smoltcp timer of any flow.
    pub(super) fn next_timer(&self) -> Option<smoltcp::time::Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Puts flow `key` on this step's work list.
    fn mark(&mut self, key: Key) {
        if let Some(f) = self.flows.get_mut(&key) {
            if !f.dirty {
                f.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Puts the flows woken since the last step, and those whose smoltcp timer is
    /// due, on this step's work list.
    pub(super) fn take_ready(&mut self, now: smoltcp::time::Instant) {
        let mut woken = Vec::new();
        self.ready.take(&mut woken);
        for k in woken {
            self.mark(k);
        }
        while let Some(Reverse((t, k))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(f) = self.flows.get_mut(&k) {
                if f.next_poll == Some(t) {
                    f.next_poll = None;
                    self.mark(k);
                }
            }
        }
    }

    /// Binds a forward's listener.
    pub fn add_forward(&mut self, f: Forward) -> Result<(), NatError> {
        if self.listeners.contains_key(&f.host) {
            return Err(f.exists());
        }
        let bind_err = |source| f.bind_failed(source);
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
    pub fn del_forward(&mut self, host: SocketAddr) -> bool {
        if self.listeners.remove(&host).is_none() {
            return false;
        }
        for f in self.flows.values_mut() {
            if f.forward == Some(host) {
                f.sock.sock_mut().abort();
                f.waker.wake_by_ref();
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
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = Instant::now();
        let mut v: Vec<FlowInfo> = self
            .flows
            .iter()
            .map(|((guest, dst), f)| FlowInfo {
                state: format!("{}", f.sock.sock().state()),
                forward: f.forward.is_some(),
                ..FlowInfo::open("tcp", guest, dst, f.host_peer, now - f.last)
            })
            .collect();
        v.extend(self.pending.keys().map(|(guest, dst)| FlowInfo {
            state: "CONNECTING".into(),
            ..FlowInfo::open("tcp", guest, dst, "", Duration::ZERO)
        }));
        v
    }

    /// Resets flows idle longer than `timeout`, and flows whose guest side never
    /// got established within `open_timeout` (a lost SYN, a guest that went away).
    /// Flows idle for [`RELEASE_IDLE`] give back the pages of their empty rings.
    pub fn expire(&mut self, timeout: Duration, open_timeout: Duration) {
        let now = Instant::now();
        for f in self.flows.values_mut() {
            let sock = f.sock.sock_mut();
            let opening = matches!(
                sock.state(),
                State::Listen | State::SynReceived | State::SynSent
            );
            let idle = now.duration_since(f.last);
            if idle > timeout || (opening && idle > open_timeout) {
                sock.abort();
                f.waker.wake_by_ref();
            } else if idle >= RELEASE_IDLE && f.released != Some(f.last) {
                f.released = Some(f.last);
                let tx_empty = sock.send_queue() == 0;
                let rx_empty = sock.recv_queue() == 0 && f.guest_end == f.acked;
                if tx_empty {
                    f.sock.release(Ring::Tx);
                }
                if rx_empty {
                    f.sock.release(Ring::Rx);
                }
                if !(tx_empty && rx_empty) {
                    f.released = None;
                }
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
        src: SocketAddr,
        dst: SocketAddr,
        seq: TcpSeqNumber,
    ) {
        let key = (src, dst);
        if self.tcp.flows.contains_key(&key) {
            // A retransmitted SYN of a flow being opened: smoltcp answers it.
            self.dev.rx.push_back(frame);
            return;
        }
        if self.tcp.pending.contains_key(&key) {
            return;
        }
        let rst = |r: &mut Router| {
            if let Some(f) = super::frame6::tcp_rst_any(r.mac, mac, dst, src, seq) {
                r.dev.tx.push_back(f.into());
            }
        };
        // DNS to the DNS address goes to the network's names first (`dns.rs`).
        let target = match self
            .dns_tcp_target(key.1)
            .map_or_else(|| self.map_dst(key.1), Ok)
        {
            Ok(t) => t,
            Err(d) => {
                self.count_denied(d, |s| &mut s.connect_failed);
                rst(self);
                return;
            }
        };
        if !self.guest_fits(src.ip(), true) {
            rst(self);
            return;
        }
        if !self.flow_fits(2 * self.cfg.limits.tcp_buffer) {
            self.stats.flows_refused += 1;
            rst(self);
            return;
        }
        self.guest_flows.inc(src.ip());
        self.guest_pending.inc(src.ip());
        // The held SYN is a copy of its own: `frame` may be a view of a larger
        // receive buffer (see `port::InlineReader`), which it must not pin.
        let (syn, mss) = if self.offload {
            raise_syn_mss(&frame).unwrap_or_else(|| (Bytes::copy_from_slice(&frame), 0))
        } else {
            (Bytes::copy_from_slice(&frame), 0)
        };
        self.tcp.pending.insert(key, Pending { syn, mss, mac, seq });
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

    /// A flow's socket (its rings mapped, see `ring.rs`); a failure is counted as
    /// a refused flow.
    fn new_socket(&mut self) -> Option<FlowSocket> {
        let r = FlowSocket::new(self.cfg.limits.tcp_buffer, |s| {
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
        });
        match r {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %e, "no memory for a TCP flow's rings");
                self.stats.flows_refused += 1;
                None
            }
        }
    }

    /// Adds a flow, on this step's work list.
    fn insert_flow(
        &mut self,
        key: Key,
        sock: FlowSocket,
        stream: TcpStream,
        host_peer: SocketAddr,
        forward: Option<SocketAddr>,
        guest_mss: u16,
    ) {
        let waker = self.tcp.ready.waker(key);
        self.tcp.flows.insert(
            key,
            Flow {
                sock,
                waker,
                dirty: false,
                next_poll: None,
                guest_end: None,
                acked: None,
                released: None,
                guest_mss,
                stream,
                host_peer,
                forward,
                host_eof: false,
                host_wr_shut: false,
                want_read: false,
                want_write: false,
                last: Instant::now(),
            },
        );
        self.tcp.mark(key);
    }

    /// Host connects that finished: open the guest side, or RST the guest.
    pub(super) fn tcp_connect_results(&mut self) {
        for r in std::mem::take(&mut self.tcp.results) {
            let Some(p) = self.tcp.pending.remove(&r.key) else {
                continue;
            };
            let (guest, dst) = r.key;
            self.guest_pending.dec(guest.ip());
            match r.result {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let Some(mut fs) = self.new_socket() else {
                        self.guest_flows.dec(guest.ip());
                        continue;
                    };
                    let s = fs.sock_mut();
                    if p.mss >= DELAYED_ACK_MIN_MSS {
                        // A jumbo-MTU guest sends 64 KiB super-frames: ACKing every
                        // second one (or after 1 ms) halves the ACK frames the router
                        // writes to the TAP. Smaller MSSes keep immediate ACKs: there
                        // smoltcp's "every second segment" counts the raised MSS, so
                        // small TSO frames would wait for the timer.
                        s.set_ack_delay(Some(smoltcp::time::Duration::from_millis(1)));
                    }
                    let ep = IpListenEndpoint {
                        addr: Some(dst.ip().into()),
                        port: dst.port(),
                    };
                    if s.listen(ep).is_err() {
                        self.guest_flows.dec(guest.ip());
                        continue;
                    }
                    self.insert_flow(r.key, fs, stream, r.target, None, p.mss);
                    self.dev.rx.push_back(p.syn);
                }
                Err(e) => {
                    tracing::debug!(%guest, %dst, target = %r.target, error = %e, "connect failed");
                    self.guest_flows.dec(guest.ip());
                    self.stats.connect_failed += 1;
                    if super::router::out_of_fds(&e) {
                        self.stats.no_fds += 1;
                    }
                    // No IPv6 route on the host: the guest's connect fails at once
                    // with the host's reason (an ICMPv6 unreachable), else a RST.
                    let f = match super::v6::no_route(&e) {
                        Some(code) if guest.is_ipv6() => self.unreachable6(p.mac, &p.syn, code),
                        _ => super::frame6::tcp_rst_any(self.mac, p.mac, dst, guest, p.seq),
                    };
                    if let Some(f) = f {
                        self.dev.tx.push_back(f.into());
                    }
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
            let Some(gw) = self.forward_gateway(guest) else {
                self.stats.flows_refused += 1;
                continue;
            };
            let Some(port) = self.free_forward_port(guest, gw) else {
                self.stats.flows_refused += 1;
                continue;
            };
            let Some(mut fs) = self.new_socket() else {
                continue;
            };
            let local = IpListenEndpoint {
                addr: Some(gw.into()),
                port,
            };
            if fs
                .sock_mut()
                .connect(
                    self.iface.context(),
                    (smoltcp::wire::IpAddress::from(guest.ip()), guest.port()),
                    local,
                )
                .is_err()
            {
                continue;
            }
            let _ = stream.set_nodelay(true);
            tracing::debug!(%host, %peer, %guest, "forwarded connection");
            // smoltcp opened this one: it uses the guest's MSS itself (0).
            let key = (guest, SocketAddr::new(gw, port));
            self.insert_flow(key, fs, stream, peer, Some(host), 0);
        }
    }

    fn free_forward_port(&mut self, guest: SocketAddr, gw: IpAddr) -> Option<u16> {
        let flows = &self.tcp.flows;
        super::free_forward_port(&mut self.tcp.next_port, |p| {
            flows.contains_key(&(guest, SocketAddr::new(gw, p)))
        })
    }

    /// Moves bytes both ways for the flows of this step's work list.
    pub(super) fn tcp_pump(&mut self) {
        let now = Instant::now();
        let t = &mut self.tcp;
        for key in &t.dirty {
            let Some(flow) = t.flows.get_mut(key) else {
                continue;
            };
            let sock = flow.sock.sock_mut();
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

    /// Removes flows whose guest side is over, and flows whose socket is (back) in
    /// LISTEN: the held SYN was fed to it in this step's ingress, so LISTEN now means
    /// smoltcp refused that SYN or the guest reset the half-open connection. Such a
    /// socket would take the next SYN to the same destination from *any* guest and
    /// splice it to this flow's host connection.
    ///
    /// The flows left register interest in their host sockets with their own
    /// wakers and put their next smoltcp timer in the heap; the work list is
    /// emptied.
    pub(super) fn tcp_cleanup(&mut self, now: smoltcp::time::Instant) {
        let t = &mut self.tcp;
        for key in std::mem::take(&mut t.dirty) {
            let Some(f) = t.flows.get_mut(&key) else {
                continue;
            };
            f.dirty = false;
            let state = f.sock.sock().state();
            if state == State::Listen {
                self.stats.listen_reaped += 1;
            }
            if matches!(state, State::Closed | State::TimeWait | State::Listen) {
                if f.forward.is_none() {
                    self.guest_flows.dec(key.0.ip());
                }
                if !(f.host_eof && f.host_wr_shut) {
                    // The guest reset or the flow was aborted: reset the host side too.
                    let _ = socket2::SockRef::from(&f.stream).set_linger(Some(Duration::ZERO));
                }
                t.flows.remove(&key);
                continue;
            }
            // Ready already (data came in since the pump): wake at once.
            let mut cx = Context::from_waker(&f.waker);
            if (f.want_read && f.stream.poll_read_ready(&mut cx).is_ready())
                || (f.want_write && f.stream.poll_write_ready(&mut cx).is_ready())
            {
                f.waker.wake_by_ref();
            }
            if let Some(d) = self.iface.poll_delay(now, f.sock.set()) {
                let at = now + d;
                // An earlier entry stays: the flow is polled then and asks again.
                if f.next_poll.is_none_or(|p| at < p) {
                    f.next_poll = Some(at);
                    t.timers.push(Reverse((at, key)));
                }
            }
        }
    }

    /// Hands the frames queued for smoltcp to the interface one at a time, each
    /// with the socket set of its flow (see `ring.rs`), or the router's own set
    /// when it has none; the flows that got frames go on the work list.
    pub(super) fn tcp_ingress(&mut self, now: smoltcp::time::Instant) {
        while let Some(frame) = self.dev.rx.front() {
            let seg = super::tcp_wire::tcp_segment(frame);
            let arp_from = super::tcp_wire::neighbor_sender(frame);
            let t = &mut self.tcp;
            match seg.and_then(|s| t.flows.get_mut(&s.key).map(|f| (s, f))) {
                Some((seg, f)) => {
                    if f.guest_end.is_none_or(|e| seg.end > e) {
                        f.guest_end = Some(seg.end);
                    }
                    if !f.dirty {
                        f.dirty = true;
                        t.dirty.push(seg.key);
                    }
                    self.iface
                        .poll_ingress_single(now, &mut self.dev, f.sock.set());
                }
                None => {
                    self.iface
                        .poll_ingress_single(now, &mut self.dev, &mut self.sockets);
                    if let Some(ip) = arp_from {
                        // A flow waiting for this guest's MAC can send now.
                        let keys: Vec<Key> =
                            t.flows.keys().filter(|k| k.0.ip() == ip).copied().collect();
                        for k in keys {
                            t.mark(k);
                        }
                    }
                }
            }
        }
    }

    /// Lets the flows of the work list emit until they have nothing more (each
    /// pass sends at most one segment), noting what each acknowledged.
    pub(super) fn tcp_egress(&mut self, now: smoltcp::time::Instant) {
        let t = &mut self.tcp;
        for key in &t.dirty {
            let Some(f) = t.flows.get_mut(key) else {
                continue;
            };
            let first = self.dev.tx.len();
            for _ in 0..4096 {
                let before = self.dev.tx.len();
                self.iface.poll_egress(now, &mut self.dev, f.sock.set());
                if self.dev.tx.len() == before {
                    break;
                }
            }
            if let Some(ack) = self
                .dev
                .tx
                .range(first..)
                .rev()
                .find_map(|fr| super::tcp_wire::tcp_ack(fr))
            {
                f.acked = Some(ack);
            }
        }
    }
}
