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

use super::config::ForwardErrors;
use super::{FlowInfo, Forward, NatError, Router};

type Key = (SocketAddr, SocketAddr);

struct Flow {
    handle: SocketHandle,
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

/// Guest MSS from which a flow's ACKs are delayed (jumbo MTUs only).
const DELAYED_ACK_MIN_MSS: u16 = 16 * 1024;

/// MSS written into guest SYNs in offload mode: the largest segment that fits a
/// 64 KiB IPv4 packet with TCP options.
const OFFLOAD_MSS: u16 = 65535 - 20 - 60;

/// Copies a SYN frame with its MSS option raised to [`OFFLOAD_MSS`] and the TCP
/// checksum recomputed; returns it with the guest's MSS. `None` when the SYN has no
/// MSS option (the flow then goes without super-frames) or is malformed.
fn raise_syn_mss(frame: &[u8]) -> Option<(Bytes, u16)> {
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};
    let mut buf = frame.to_vec();
    let mut eth = EthernetFrame::new_checked(&mut buf[..]).ok()?;
    let mut ip = Ipv4Packet::new_checked(eth.payload_mut()).ok()?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let mut tcp = TcpPacket::new_checked(ip.payload_mut()).ok()?;
    let opts = tcp.options_mut();
    let mut i = 0;
    let mut mss = None;
    while i < opts.len() {
        match opts.get(i).copied()? {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let v = opts.get_mut(i + 2..i + 4)?;
                    mss = Some(u16::from_be_bytes([v[0], v[1]]));
                    v.copy_from_slice(&OFFLOAD_MSS.to_be_bytes());
                }
                i += len;
            }
        }
    }
    let mss = mss.filter(|m| *m >= 64)?;
    tcp.fill_checksum(&src.into(), &dst.into());
    Some((Bytes::from(buf), mss))
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
        let target = match self.map_dst(key.1) {
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
            self.guest_pending.dec(guest.ip());
            match r.result {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let mut s = self.new_socket();
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
                    let handle = self.sockets.add(s);
                    self.tcp.flows.insert(
                        r.key,
                        Flow {
                            guest_mss: p.mss,
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
                    self.guest_flows.dec(guest.ip());
                    self.stats.connect_failed += 1;
                    if super::router::out_of_fds(&e) {
                        self.stats.no_fds += 1;
                    }
                    if let Some(f) = super::frame6::tcp_rst_any(self.mac, p.mac, dst, guest, p.seq)
                    {
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
                (guest.into(), SocketAddrV4::new(gw, port).into()),
                Flow {
                    // smoltcp opened this one: it uses the guest's MSS itself.
                    guest_mss: 0,
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
        let flows = &self.tcp.flows;
        super::free_forward_port(&mut self.tcp.next_port, |p| {
            flows.contains_key(&(guest.into(), SocketAddrV4::new(gw, p).into()))
        })
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

    /// The virtio-net header of an outgoing TCP frame in offload mode (and the frame
    /// with the pseudo-header sum in its checksum field), or `None` to send it as is.
    /// Returns the header, where the checksum field is and what goes in it.
    pub(super) fn tcp_offload_header(
        &self,
        frame: &[u8],
    ) -> Option<(crate::offload::VnetHdr, usize, u16)> {
        use crate::offload::{VnetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4};
        if self.offload && super::frame6::is_ipv6(frame) {
            return super::v6::tcp6_offload_header(frame);
        }
        if !self.offload || frame.get(12..14)? != [0x08, 0x00] {
            return None;
        }
        let ip = frame.get(super::frame::ETH_HDR..)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        if *ip.get(9)? != 6 || ihl < 20 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        let tcp = ip.get(ihl..total)?;
        let doff = usize::from(tcp.get(12)? >> 4) * 4;
        if doff < 20 || tcp.len() < doff {
            return None;
        }
        // Pseudo-header sum, folded, not complemented: what a NIC expects with
        // NEEDS_CSUM (the receiver folds in the TCP header and payload).
        let mut sum: u32 = 0;
        for pair in ip.get(12..20)?.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1)?]));
        }
        sum += 6 + tcp.len() as u32;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let csum_at = super::frame::ETH_HDR + ihl + 16;
        frame.get(csum_at..csum_at + 2)?;
        let payload = tcp.len() - doff;
        let mut hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            hdr_len: (super::frame::ETH_HDR + ihl + doff) as u16,
            gso_size: 0,
            csum_start: (super::frame::ETH_HDR + ihl) as u16,
            csum_offset: 16,
        };
        if ihl + tcp.len() > self.cfg.mtu {
            // A super-frame: cut at the guest's MSS, within the network's MTU.
            let dst_ip = std::net::Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let src_ip = std::net::Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            let key = (
                SocketAddrV4::new(dst_ip, dport).into(),
                SocketAddrV4::new(src_ip, sport).into(),
            );
            let guest_mss = self.tcp.flows.get(&key).map(|f| f.guest_mss).unwrap_or(0);
            let fit = self.cfg.mtu.checked_sub(ihl + doff)? as u16;
            let mss = if guest_mss == 0 {
                fit
            } else {
                guest_mss.min(fit)
            };
            if mss == 0 || payload == 0 {
                return None;
            }
            hdr.gso_type = GSO_TCPV4;
            hdr.gso_size = mss;
        }
        Some((hdr, csum_at, sum as u16))
    }

    /// Removes flows whose guest side is over, and flows whose socket is (back) in
    /// LISTEN: the held SYN was fed to it in this step's ingress, so LISTEN now means
    /// smoltcp refused that SYN or the guest reset the half-open connection. Such a
    /// socket would take the next SYN to the same destination from *any* guest and
    /// splice it to this flow's host connection.
    pub(super) fn tcp_cleanup(&mut self) {
        let sockets = &mut self.sockets;
        let counts = &mut self.guest_flows;
        let stats = &mut self.stats;
        self.tcp.flows.retain(|(guest, _), f| {
            let state = sockets.get::<Socket>(f.handle).state();
            if state == State::Listen {
                stats.listen_reaped += 1;
            }
            if matches!(state, State::Closed | State::TimeWait | State::Listen) {
                if f.forward.is_none() {
                    counts.dec(guest.ip());
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{EthernetAddress, Ipv4Packet, TcpControl, TcpPacket, TcpRepr};
    use std::net::Ipv4Addr;

    fn syn(mss: Option<u16>) -> Vec<u8> {
        let (src, dst) = (Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2));
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: mss,
            sack_permitted: true,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        crate::nat::tests::tcp_frame(
            EthernetAddress([2, 0, 0, 0, 0, 1]),
            EthernetAddress([2, 0, 0, 0, 0, 2]),
            (src, dst),
            &repr,
            0xa5,
        )
    }

    #[test]
    fn syn_mss_is_raised_and_checksum_stays_valid() {
        let (out, mss) = raise_syn_mss(&syn(Some(1460))).unwrap();
        assert_eq!(mss, 1460);
        let ip = Ipv4Packet::new_checked(&out[14..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        let repr = TcpRepr::parse(
            &tcp,
            &ip.src_addr().into(),
            &ip.dst_addr().into(),
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(repr.max_seg_size, Some(OFFLOAD_MSS));
        assert_eq!(repr.window_scale, Some(7), "other options kept");
        // No MSS option: left alone.
        assert!(raise_syn_mss(&syn(None)).is_none());
        // Truncated frames never panic.
        let f = syn(Some(1460));
        for n in 0..f.len() {
            let _ = raise_syn_mss(&f[..n]);
        }
    }
}
