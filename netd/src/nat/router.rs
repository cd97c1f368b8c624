//! The router itself: its state ([`Router`]), how it is built and started, and its
//! loop (see the module doc of [`crate::nat`], "The loop"): wait for anything ready,
//! then one step of ingress, pumps and egress. The per-protocol work is in `tcp.rs`,
//! `udp.rs` and `icmp.rs` (each an `impl Router` over its own flow table), the
//! inline guest port in `inline.rs`, control requests in `handle.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use tokio::sync::mpsc;

use super::device::{self, QueueDevice};
use super::frame::{self, Classified};
use super::handle::Command;
use super::inline::Inline;
use super::{icmp, tcp, udp, NatError, RouterConfig, RouterHandle, Stats};
use crate::dns;

/// Gateway ports that forward sessions (TCP and UDP) come from, towards the guest.
pub(super) const FWD_PORT_FIRST: u16 = 32768;
pub(super) const FWD_PORT_LAST: u16 = 60999;

/// The next port of the forward range, round robin from `*next` (a value outside
/// the range starts at its beginning), that `taken` does not claim; `None` when
/// every port of the range is taken.
pub(super) fn free_forward_port(next: &mut u16, taken: impl Fn(u16) -> bool) -> Option<u16> {
    for _ in FWD_PORT_FIRST..=FWD_PORT_LAST {
        let p = (*next).clamp(FWD_PORT_FIRST, FWD_PORT_LAST);
        *next = if p == FWD_PORT_LAST {
            FWD_PORT_FIRST
        } else {
            p + 1
        };
        if !taken(p) {
            return Some(p);
        }
    }
    None
}

/// A function that switches one frame now.
pub type FrameFn = Box<dyn Fn(&[u8]) + Send>;

/// Where the router's frames go: a channel (tests, the fuzz target) or straight
/// into the switch on the router's thread.
pub enum ToSwitch {
    /// A bounded channel; the router waits when it is full.
    Channel(mpsc::Sender<Bytes>),
    /// A function switching the frame now (frames a busy port cannot take are
    /// dropped and counted by the switch, as for any port).
    Direct(FrameFn),
    /// Like `Direct`, and the switch takes offloaded frames: TCP frames go with a
    /// virtio-net header (partial checksum, and TCP segmentation for super-frames).
    Offload(OffloadFn),
}

/// A function that switches one frame, with its virtio-net header if offloaded.
pub type OffloadFn = Box<dyn Fn(Option<&crate::offload::VnetHdr>, &[u8]) + Send>;

/// The router: one per NAT network, run by one task.
pub struct Router {
    pub(super) cfg: RouterConfig,
    /// TCP frames leave as offloaded frames (see `tcp.rs`, "Offload").
    pub(super) offload: bool,
    pub(super) mac: EthernetAddress,
    pub(super) iface: Interface,
    pub(super) dev: QueueDevice,
    pub(super) sockets: SocketSet<'static>,
    pub(super) from_switch: mpsc::Receiver<Bytes>,
    pub(super) to_switch: ToSwitch,
    pub(super) ctl: mpsc::Receiver<Command>,
    pub(super) inbox: Vec<Bytes>,
    pub(super) stopped: bool,
    pub(super) timer: Pin<Box<tokio::time::Sleep>>,
    pub(super) next_housekeeping: tokio::time::Instant,
    pub(super) resolvers: dns::Resolvers,
    /// The DNS-over-TCP front of the network's names, if it has some (`dns.rs`).
    pub(super) dns_tcp: Option<dns::tcp::Listener>,
    pub(super) stats: Stats,
    pub(super) tcp: tcp::TcpTable,
    pub(super) udp: udp::UdpTable,
    pub(super) icmp: icmp::IcmpTable,
    /// Guest MACs by address, learned from their frames, for frames the router builds.
    pub(super) guest_macs: HashMap<IpAddr, EthernetAddress>,
    /// IPv6: the service (RAs, NDP, DHCPv6) and what smoltcp knows (`v6.rs`).
    pub(super) v6: Option<super::v6::V6State>,
    /// The DHCP server, for datagrams to port 67 of the router's own addresses.
    pub(super) dhcp: Option<LocalService>,
    /// A guest port read on this thread, if the daemon handed one over.
    pub(super) inline: Option<Inline>,
    /// Try a read of the inline port even if it is not marked readable.
    pub(super) inline_probe: bool,
    /// Receive buffer for host datagrams (UDP, ICMP), made once: a zeroed 64 KiB
    /// allocation per step showed up in profiles.
    pub(super) scratch: Vec<u8>,
    /// Flows (pending TCP connects included, forwards not) per guest address.
    pub(super) guest_flows: GuestCounts,
    /// TCP connects in progress per guest address.
    pub(super) guest_pending: GuestCounts,
    /// The host's own addresses (refused as destinations without `host_loopback`)
    /// and when they were read.
    pub(super) host_addrs: (Vec<IpAddr>, Option<std::time::Instant>),
    /// Panic in the next step (the fault injection of the supervisor's test).
    pub(super) inject_panic: bool,
}

/// A count per guest address (the per-guest quotas).
#[derive(Debug, Default)]
pub(super) struct GuestCounts(HashMap<IpAddr, usize>);

impl GuestCounts {
    /// The count of `ip`.
    pub(super) fn get(&self, ip: impl Into<IpAddr>) -> usize {
        self.0.get(&ip.into()).copied().unwrap_or(0)
    }
    /// One more for `ip`.
    pub(super) fn inc(&mut self, ip: impl Into<IpAddr>) {
        *self.0.entry(ip.into()).or_insert(0) += 1;
    }
    /// The counts of IPv6 guest addresses, summed.
    pub(super) fn total_ipv6(&self) -> usize {
        self.0
            .iter()
            .filter(|(a, _)| a.is_ipv6())
            .map(|(_, n)| n)
            .sum()
    }
    /// One less for `ip` (an entry at zero goes).
    pub(super) fn dec(&mut self, ip: impl Into<IpAddr>) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.0.entry(ip.into()) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Why a flow's destination is refused; each is counted (see [`Stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Denied {
    /// No host destination: another guest, the DNS address off port 53, no resolver.
    Nowhere,
    /// The host's loopback, directly.
    Loopback,
    /// The host itself: the gateway without `host_loopback`, or a host address.
    Host,
    /// The outbound lists (`outbound_allow`, `outbound_deny`).
    Policy,
}

/// Whether an I/O error means the process ran out of file descriptors.
pub(super) fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

impl Stats {
    /// Counts a guest's packet dropped because its host socket would not open
    /// (and `no_fds` too when that was for want of descriptors).
    pub(super) fn host_socket_failed(&mut self, e: &std::io::Error) {
        self.dropped += 1;
        if out_of_fds(e) {
            self.no_fds += 1;
        }
    }
}

/// A service that lives behind the router's own addresses: it takes a whole Ethernet
/// frame and returns the frame that answers it, if any. The daemon plugs the
/// network's DHCP server in here ([`Router::set_dhcp`]).
pub type LocalService = Box<dyn FnMut(&[u8]) -> Option<Vec<u8>> + Send>;

/// The DHCP server port (RFC 2131).
pub const DHCP_SERVER_PORT: u16 = 67;

/// How many frames one wake-up takes from the switch before doing a step.
pub(super) const INBOX_BATCH: usize = 256;

impl Router {
    /// Builds a router on a service port of the switch. Binds the configured port
    /// forwards; must be called inside a tokio runtime.
    pub fn new(
        cfg: RouterConfig,
        from_switch: mpsc::Receiver<Bytes>,
        to_switch: mpsc::Sender<Bytes>,
    ) -> Result<(Router, RouterHandle), NatError> {
        Self::with_sink(cfg, from_switch, ToSwitch::Channel(to_switch))
    }

    /// Like [`Router::new`], with any [`ToSwitch`].
    pub fn with_sink(
        cfg: RouterConfig,
        from_switch: mpsc::Receiver<Bytes>,
        to_switch: ToSwitch,
    ) -> Result<(Router, RouterHandle), NatError> {
        cfg.validate()?;
        let mac = EthernetAddress(cfg.mac);
        let offload = matches!(to_switch, ToSwitch::Offload(_));
        let mut dev = if offload {
            QueueDevice::with_offload(cfg.mtu)
        } else {
            QueueDevice::new(cfg.mtu)
        };
        let iface = make_iface(&cfg, mac, &mut dev)?;
        let (ctl_tx, ctl_rx) = mpsc::channel(16);
        let resolvers = dns::Resolvers::new(cfg.resolv_conf.clone());
        let mut router = Router {
            offload,
            mac,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            from_switch,
            to_switch,
            ctl: ctl_rx,
            inbox: Vec::new(),
            stopped: false,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            next_housekeeping: tokio::time::Instant::now() + Duration::from_secs(1),
            resolvers,
            dns_tcp: super::dns::tcp_front(&cfg),
            stats: Stats::default(),
            tcp: tcp::TcpTable::default(),
            udp: udp::UdpTable::default(),
            icmp: icmp::IcmpTable::default(),
            guest_macs: HashMap::new(),
            v6: super::v6::V6State::new(&cfg, mac)?,
            dhcp: None,
            inline: None,
            inline_probe: false,
            scratch: Vec::new(),
            guest_flows: GuestCounts::default(),
            guest_pending: GuestCounts::default(),
            host_addrs: (Vec::new(), None),
            inject_panic: false,
            cfg,
        };
        for f in router.cfg.forwards.clone() {
            router.add_forward(f)?;
        }
        Ok((router, RouterHandle::new(ctl_tx)))
    }

    /// Builds a router and runs it on a thread of its own (named `name`), with a
    /// single-threaded runtime: every host socket of the router is registered with
    /// that thread's reactor, so a wake-up is one epoll return on the thread that does
    /// the work, with no hand-off between runtime workers.
    /// `dhcp`, if given, is plugged in with [`Router::set_dhcp`].
    pub fn spawn_thread(
        name: &str,
        cfg: RouterConfig,
        from_switch: mpsc::Receiver<Bytes>,
        to_switch: ToSwitch,
        dhcp: Option<LocalService>,
    ) -> Result<RouterHandle, NatError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_err = |e: std::io::Error| NatError::Invalid {
            key: "thread",
            reason: format!("cannot start the router thread: {e}"),
        };
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(thread_err(e)));
                        return;
                    }
                };
                let router = rt.block_on(async move {
                    match Router::with_sink(cfg, from_switch, to_switch) {
                        Ok((mut router, handle)) => {
                            if let Some(d) = dhcp {
                                router.set_dhcp(d);
                            }
                            let _ = tx.send(Ok(handle));
                            Some(router)
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            None
                        }
                    }
                });
                if let Some(router) = router {
                    super::supervise::supervise(&rt, router);
                }
            })
            .map_err(thread_err)?;
        rx.recv().map_err(|_| NatError::Stopped)?
    }

    /// Hands UDP datagrams to port 67 of the router's own addresses (the gateway and
    /// DNS addresses) to `dhcp` instead of the host: the network's DHCP server, whose
    /// identifier is one of those addresses, so that a client's unicast renewal is
    /// answered. Without it such datagrams are flows like any other (to the host's
    /// loopback for the gateway).
    pub fn set_dhcp(&mut self, dhcp: LocalService) {
        self.dhcp = Some(dhcp);
    }

    /// Runs until the switch side of the port goes away.
    pub async fn run(mut self) {
        tracing::info!(gateway = %self.cfg.gateway, dns = %self.cfg.dns, mtu = self.cfg.mtu, "NAT router up");
        self.serve().await;
        tracing::info!("NAT router stopped");
    }

    /// The loop of [`Router::run`], on a borrowed router (the supervisor keeps it
    /// across a panic).
    pub(super) async fn serve(&mut self) {
        loop {
            std::future::poll_fn(|cx| self.poll_events(cx)).await;
            if self.stopped {
                break;
            }
            self.step();
            while let Some(mut frame) = self.dev.tx.pop_front() {
                self.stats.frames_out += 1;
                match &self.to_switch {
                    ToSwitch::Direct(f) => f(&frame),
                    ToSwitch::Offload(f) => match self.tcp_offload_header(&frame) {
                        Some((hdr, at, sum)) => {
                            // In place: the router holds the only reference.
                            if let Some(c) = frame.make_mut().get_mut(at..at + 2) {
                                c.copy_from_slice(&sum.to_be_bytes());
                            }
                            f(Some(&hdr), &frame)
                        }
                        None => f(None, &frame),
                    },
                    ToSwitch::Channel(tx) => {
                        if tx.send(frame.into_bytes()).await.is_err() {
                            self.stopped = true;
                            break;
                        }
                        continue;
                    }
                }
                self.dev.recycle(frame);
            }
            if self.stopped {
                break;
            }
        }
    }

    /// Feeds one frame through the router synchronously and returns the frames it
    /// answers with (used by the fuzz target and the randomized unit test).
    pub fn process_frame_for_test(&mut self, frame: Bytes) -> Vec<Bytes> {
        // (Channel-fed routers take plain frames; see `ingest_vnet` for the others.)
        self.inbox.push(frame);
        self.step_and_take()
    }

    /// Takes what the router's tasks and host sockets have ready now (finished host
    /// connects, host data, forward accepts) without waiting, then does one step; the
    /// frames it answers with. Call it inside the router's runtime, after letting that
    /// runtime run (the fuzz target, so that flows get past their host connect).
    #[doc(hidden)]
    pub fn settle_for_test(&mut self) -> Vec<Bytes> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = self.poll_events(&mut cx);
        self.step_and_take()
    }

    /// One step, then the frames it sent (the test entry points' common tail).
    fn step_and_take(&mut self) -> Vec<Bytes> {
        self.step();
        self.dev
            .tx
            .drain(..)
            .map(device::Frame::into_bytes)
            .collect()
    }

    /// Registers interest in everything that can make progress; ready when any is.
    pub(super) fn poll_events(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut ready = false;
        while self.inbox.len() < INBOX_BATCH {
            match self.from_switch.poll_recv(cx) {
                Poll::Ready(Some(f)) => {
                    self.inbox.push(f);
                    ready = true;
                }
                Poll::Ready(None) => {
                    self.stopped = true;
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
        }
        ready |= self.poll_inline(cx);
        if self.inbox.len() >= INBOX_BATCH {
            ready = true;
        }
        // Every handle dropped (Ready(None)) just ends the loop: keep serving.
        while let Poll::Ready(Some(cmd)) = self.ctl.poll_recv(cx) {
            self.handle_command(cmd);
            ready = true;
        }
        ready |= self.tcp.poll_ready(cx);
        ready |= self.udp.poll_ready(cx);
        ready |= self.icmp.poll_ready(cx);
        if std::future::Future::poll(self.timer.as_mut(), cx).is_ready() {
            ready = true;
        }
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The datagram receive buffer (64 KiB); put it back in `self.scratch` after use.
    pub(super) fn take_scratch(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.scratch);
        if buf.len() < 65536 {
            buf = vec![0u8; 65536];
        }
        buf
    }

    /// Where a guest's flow to `dst` really goes on the host, or why nowhere.
    ///
    /// The gateway address stands for the host's loopback only with
    /// `host_loopback`; without it only its DNS port (to the resolver) is a flow. The
    /// DNS address, port 53, goes to the host resolver. Any other destination must
    /// not be the host's loopback or one of the host's own addresses (unless
    /// `host_loopback`) and must pass the outbound lists.
    pub(super) fn map_dst(&mut self, dst: SocketAddr) -> Result<SocketAddr, Denied> {
        let dst = match dst {
            SocketAddr::V4(d) => d,
            SocketAddr::V6(d) => return self.map_dst6(d),
        };
        let ip = *dst.ip();
        if ip == self.cfg.gateway {
            if self.cfg.host_loopback {
                return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port()));
            }
            if dst.port() == 53 {
                return self.resolvers.current().ok_or(Denied::Nowhere);
            }
            return Err(Denied::Host);
        }
        if ip == self.cfg.dns {
            return if dst.port() == 53 {
                self.resolvers.current().ok_or(Denied::Nowhere)
            } else {
                Err(Denied::Nowhere)
            };
        }
        // Other addresses of the NAT subnet are guests (they talk directly, on the
        // switch), never host destinations; and no broadcast/multicast flows.
        if self.cfg.in_subnet(ip) || ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified() {
            return Err(Denied::Nowhere);
        }
        if ip.is_loopback() {
            return Err(Denied::Loopback);
        }
        if !self.cfg.host_loopback && self.is_host_addr(ip) {
            return Err(Denied::Host);
        }
        if !super::config::outbound_allows(&self.cfg.outbound_allow, &self.cfg.outbound_deny, ip) {
            return Err(Denied::Policy);
        }
        Ok(SocketAddr::V4(dst))
    }

    /// Counts a refused destination (`Nowhere` counts as `nowhere`, which the
    /// caller names: a TCP connect failure or a dropped datagram).
    pub(super) fn count_denied(&mut self, d: Denied, nowhere: fn(&mut Stats) -> &mut u64) {
        let c = match d {
            Denied::Nowhere => nowhere(&mut self.stats),
            Denied::Loopback => &mut self.stats.denied_loopback,
            Denied::Host => &mut self.stats.denied_host,
            Denied::Policy => &mut self.stats.denied_policy,
        };
        *c += 1;
    }

    /// Whether `ip` is one of the host's own addresses (read at most once a second).
    pub(super) fn is_host_addr(&mut self, ip: impl Into<IpAddr>) -> bool {
        let ip = ip.into();
        let now = std::time::Instant::now();
        let stale = match self.host_addrs.1 {
            Some(t) => now.duration_since(t) >= Duration::from_secs(1),
            None => true,
        };
        if stale {
            self.host_addrs = (super::sys::host_addrs(), Some(now));
        }
        self.host_addrs.0.contains(&ip)
    }

    /// Whether guest `ip` may open one more flow (`connect`: a TCP connect, which
    /// also counts against the pending quota); counts a refusal.
    pub(super) fn guest_fits(&mut self, ip: impl Into<IpAddr>, connect: bool) -> bool {
        let ip = ip.into();
        let l = &self.cfg.limits;
        let ok = self.guest_flows.get(ip) < l.max_flows_per_guest
            && (!connect || self.guest_pending.get(ip) < l.max_pending_per_guest);
        if !ok {
            self.stats.guest_quota += 1;
        }
        ok
    }

    /// Whether one more flow costing `bytes` fits the table.
    pub(super) fn flow_fits(&self, bytes: usize) -> bool {
        let count = self.tcp.len() + self.udp.len() + self.icmp.len();
        let mem = self.tcp.len() * 2 * self.cfg.limits.tcp_buffer
            + (self.udp.len() + self.icmp.len()) * udp::FLOW_COST;
        count < self.cfg.limits.max_flows && mem + bytes <= self.cfg.limits.max_flow_memory
    }

    /// One round of work after a wake-up.
    pub(super) fn step(&mut self) {
        if std::mem::take(&mut self.inject_panic) {
            panic!("injected fault (nat_fault request, NETD_FAULT_INJECTION=1)");
        }
        let now = smoltcp::time::Instant::now();
        self.tcp_connect_results();
        self.tcp_accept_forwards();
        self.udp_forward_input();
        for frame in std::mem::take(&mut self.inbox) {
            self.stats.frames_in += 1;
            if self.offload {
                self.ingest_vnet(frame);
            } else {
                self.ingest(frame, false);
            }
        }
        // Ingress only, then the pumps, then egress: the ACKs for this batch leave
        // after its data went on to the host sockets, so they advertise the window
        // as it is then. (ACKs sent before the pump advertised a window smaller by
        // the batch, and smoltcp sends a window update only once the window doubles:
        // the guest sender was window-limited half of the time at MTU 65520.)
        // Only the flows with work (frames, ready host sockets, due timers) are
        // looked at (see `ring.rs` and `wake.rs`).
        self.tcp.take_ready(now);
        self.tcp_ingress(now);
        self.tcp_pump();
        self.udp_pump();
        self.icmp_pump();
        self.egress(now);
        self.tcp_cleanup(now);
        let tnow = tokio::time::Instant::now();
        if tnow >= self.next_housekeeping {
            self.next_housekeeping = tnow + Duration::from_secs(1);
            self.expire();
            self.inline_probe = self.inline.is_some();
            self.router_adverts();
        }
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
            .into_iter()
            .chain(self.tcp.next_timer().map(|t| t - now.min(t)))
            .min()
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1));
        let deadline = (tnow + delay).min(self.next_housekeeping);
        self.timer.as_mut().reset(deadline);
    }

    /// Lets smoltcp emit until it has nothing more (each pass sends at most one
    /// segment per socket).
    fn egress(&mut self, now: smoltcp::time::Instant) {
        for _ in 0..4096 {
            let before = self.dev.tx.len();
            self.iface
                .poll_egress(now, &mut self.dev, &mut self.sockets);
            if self.dev.tx.len() == before {
                break;
            }
        }
        self.tcp_egress(now);
    }

    /// A frame after its virtio-net header (offload mode). A TCP super-frame from a
    /// local kernel goes to smoltcp whole, as one segment (its checksum is trusted);
    /// any other unfinished frame is finished in software first.
    fn ingest_vnet(&mut self, msg: Bytes) {
        use crate::offload::{VnetHdr, GSO_TCPV4, VNET_HDR_LEN};
        let Some(hdr) = VnetHdr::parse(&msg) else {
            self.stats.malformed += 1;
            return;
        };
        let frame = msg.slice(VNET_HDR_LEN.min(msg.len())..);
        if hdr.is_plain() {
            return self.ingest(frame, false);
        }
        let tcp_v4 = frame.get(12..14) == Some(&[0x08, 0x00][..])
            && frame.get(frame::ETH_HDR + 9) == Some(&6);
        if tcp_v4 && (hdr.gso_type & !crate::offload::GSO_ECN == GSO_TCPV4 || !hdr.is_gso()) {
            return self.ingest(frame, true);
        }
        let mut scratch = Vec::new();
        let mut done = Vec::new();
        if crate::offload::finish(&hdr, &frame, &mut scratch, &mut |f| {
            done.push(Bytes::copy_from_slice(f))
        })
        .is_err()
        {
            self.stats.malformed += 1;
        }
        for f in done {
            self.ingest(f, false);
        }
    }

    fn ingest(&mut self, frame: Bytes, tcp_csum_partial: bool) {
        if super::frame6::is_ipv6(&frame) {
            return self.ingest6(frame);
        }
        match frame::classify_with(&frame, self.mac, &self.cfg, tcp_csum_partial) {
            Classified::Ignore => {}
            Classified::Malformed => self.stats.malformed += 1,
            Classified::Dropped(r) => self.stats.count_drop(r),
            Classified::ArpRequest {
                src_mac, src_ip, ..
            } => {
                // smoltcp answers (the target is one of its addresses) and learns the
                // guest's MAC in the same step, so its first reply needs no ARP.
                if self.cfg.valid_guest_src(src_ip) {
                    self.guest_macs.insert(src_ip.into(), src_mac);
                    self.dev.rx.push_back(frame.clone());
                }
            }
            Classified::Smoltcp => self.dev.rx.push_back(frame.clone()),
            Classified::TcpSyn {
                src_mac,
                src,
                dst,
                seq,
            } => {
                self.guest_macs.insert(src.0.into(), src_mac);
                self.tcp_syn(frame.clone(), src_mac, src.into(), dst.into(), seq);
            }
            Classified::Udp {
                src_mac,
                src,
                dst,
                payload,
            } => {
                self.guest_macs.insert(src.0.into(), src_mac);
                if dst.1 == DHCP_SERVER_PORT && self.cfg.own4(dst.0) {
                    if let Some(dhcp) = self.dhcp.as_mut() {
                        if let Some(mut reply) = dhcp(&frame) {
                            // Answer from the MAC the client sent to (ours, by ARP), so
                            // the switch never learns the DHCP port's MAC on this port.
                            if let Some(src) = reply.get_mut(6..12) {
                                src.copy_from_slice(&self.mac.0);
                            }
                            self.dev.tx.push_back(Bytes::from(reply).into());
                        }
                        return;
                    }
                }
                self.udp_input(src_mac, src.into(), dst.into(), payload);
            }
            Classified::IcmpEcho(echo) => self.icmp_input(echo, &frame),
        }
    }

    pub(super) fn expire(&mut self) {
        let limits = self.cfg.limits.clone();
        self.udp.expire(limits.udp_timeout, &mut self.guest_flows);
        self.icmp.expire(limits.icmp_timeout, &mut self.guest_flows);
        self.udp.rearm();
        self.icmp.rearm();
        self.tcp
            .expire(limits.tcp_idle_timeout, 3 * limits.connect_timeout);
        if self.guest_macs.len() > 4096 {
            self.guest_macs.clear();
        }
        if let Some(v6) = &mut self.v6 {
            v6.expire();
        }
    }
}

/// The router's smoltcp interface: the gateway and DNS addresses, any-IP.
pub(super) fn make_iface(
    cfg: &RouterConfig,
    mac: EthernetAddress,
    dev: &mut QueueDevice,
) -> Result<Interface, NatError> {
    let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(mac));
    icfg.random_seed = seed();
    let mut iface = Interface::new(icfg, dev, smoltcp::time::Instant::now());
    let prefix = cfg.subnet.1;
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(cfg.gateway.into(), prefix));
        if cfg.dns != cfg.gateway {
            let _ = addrs.push(IpCidr::new(cfg.dns.into(), prefix));
        }
    });
    // Any-IP: a packet to any destination is accepted when the route for it
    // points at one of our addresses; the default route points at the gateway.
    iface.set_any_ip(true);
    let no_route = |key| NatError::Invalid {
        key,
        reason: "cannot install the default route".into(),
    };
    iface
        .routes_mut()
        .add_default_ipv4_route(cfg.gateway)
        .map_err(|_| no_route("gateway"))?;
    if let Some(v6) = &cfg.ipv6 {
        iface.update_ip_addrs(|addrs| {
            for a in std::iter::once(v6.gateway).chain(v6.dns) {
                let _ = addrs.push(IpCidr::new(a.into(), 64));
            }
        });
        iface
            .routes_mut()
            .add_default_ipv6_route(v6.gateway)
            .map_err(|_| no_route("gateway6"))?;
    }
    Ok(iface)
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}
