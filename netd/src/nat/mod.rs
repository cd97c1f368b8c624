//! The NAT router of a `mode = "nat"` network: a slirp-style userspace router.
//!
//! # Theory of operation
//!
//! The router is a port of the network's switch (a *service port*: two channels of
//! Ethernet frames). It owns a smoltcp interface in any-IP mode with the gateway and
//! DNS addresses (10.0.2.2 and 10.0.2.3 by default) and a default route through itself,
//! so it accepts IPv4 packets to *any* destination. Every flow a guest opens is
//! terminated here and re-originated from an ordinary host socket, owned by this one
//! task; there is no iptables, no `ip_forward` and no kernel NAT, and nothing beyond
//! the TAP needs privileges.
//!
//! - TCP (`tcp.rs`): a guest SYN starts a host `connect`; only when it succeeds does a
//!   smoltcp socket listen on the destination and receive the SYN, so a refused or
//!   unreachable destination answers the guest with a RST, as a real host would. Bytes
//!   are then copied between the smoltcp socket buffers and the host socket with no
//!   intermediate buffer. Large socket buffers give a scaled window.
//! - UDP (`udp.rs`) and ICMP echo (`icmp.rs`): flows of connected host sockets, built
//!   and parsed with smoltcp's wire types, with idle timeouts.
//! - DNS (`dns.rs`): flows to the DNS address, port 53, go to the host's resolver.
//! - The gateway address maps to the host's loopback (127.0.0.1), as in VirtualBox.
//! - DHCP: the network's DHCP server is a port of its own, but its identifier is the
//!   gateway address (10.0.2.2, as in VirtualBox's NAT and QEMU's user networking),
//!   which the router owns: broadcasts reach the server on the switch, but a client's
//!   unicast renewal (RENEWING state, at T1) is addressed to the router's MAC. So UDP
//!   to port 67 of the router's own addresses goes to the server through a
//!   [`LocalService`] the daemon plugs in, never to the host's loopback, and the
//!   answer leaves from the router's MAC (the address the client sent to).
//! - Port forwards: a host listener (TCP) or socket (UDP) whose connections or
//!   datagrams the router originates to a guest address, from the gateway address.
//!   Nothing else from outside reaches a guest: host sockets are only ever connected
//!   by the router on a guest's behalf.
//!
//! # The loop
//!
//! In the daemon the router runs on a thread of its own with a single-threaded tokio
//! runtime ([`Router::spawn_thread`]): its host sockets are registered with that
//! thread's reactor, and its frames enter the switch on that thread
//! ([`ToSwitch::Offload`]), TCP ones as offloaded frames with a virtio-net header
//! (64 KiB super-frames, partial checksums; see `tcp.rs`, "Offload"). Tests and the
//! fuzz target feed it through plain channels instead.
//!
//! When the network has one guest port (`tap` or `vm`), the router also reads that
//! port itself ([`crate::ports::InlineReader`]): the port's fd is registered with the
//! router's reactor, frames are read into a large buffer and switched on this thread
//! ([`crate::switch::Network::ingress_local`]); those for the router are split off
//! the buffer into the inbox with no copy (small ones are copied, so that a held SYN
//! never pins the buffer). Before, a receive thread read the frame, copied it into a
//! channel message and woke this thread: a copy and a thread hand-off per frame. The
//! guest's frames and the router's answers now share one thread (figures in
//! bench/README-nat.md).
//!
//! One task runs [`Router::run`]: wait until anything is ready (a frame, a control
//! request, a finished connect, a readable/writable host socket, a smoltcp timer),
//! then do one *step*: classify frames (`frame.rs`), feed smoltcp (ingress only), pump
//! every flow with non-blocking reads and writes, let smoltcp emit, and send the
//! frames to the switch. smoltcp emits after the pumps so that its ACKs advertise
//! the window as it is once the batch went on to the host (it sends a separate
//! window update only when the window doubles). The wait registers interest only where progress is possible (a host socket
//! is polled for reading only while its smoltcp send buffer has room), which is the
//! back-pressure in both directions.
//!
//! # Bounds
//!
//! The flow table is bounded by count (`max_flows`) and by memory (`max_flow_memory`,
//! counting each TCP flow's two smoltcp buffers); a flow over the bound is refused (a
//! RST for TCP, a drop for UDP/ICMP) and counted. UDP and ICMP flows expire when idle;
//! TCP flows when closed, or after `tcp_idle_timeout` without traffic.

mod device;
pub mod dns;
pub mod frame;
mod icmp;
mod sys;
mod tcp;
mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use tokio::sync::{mpsc, oneshot};

use self::device::QueueDevice;
use self::frame::Classified;

/// Errors of the NAT router and its control requests.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// the router has stopped (its network was removed or the daemon is shutting down)
    #[error("the NAT router has stopped")]
    Stopped,
    /// a port forward on this host address and protocol already exists
    #[error("a {proto} forward on {host} already exists")]
    ForwardExists {
        /// Protocol.
        proto: Proto,
        /// Host address.
        host: SocketAddr,
    },
    /// no such port forward
    #[error("no {proto} forward on {host}")]
    NoSuchForward {
        /// Protocol.
        proto: Proto,
        /// Host address.
        host: SocketAddr,
    },
    /// the host address of a port forward cannot be bound
    #[error("cannot bind {proto} {host} for a port forward")]
    Bind {
        /// Protocol.
        proto: Proto,
        /// Host address.
        host: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// a port forward's guest address is outside the network's subnet
    #[error("forward guest address {guest} is not in the network's subnet {subnet}")]
    GuestOutsideSubnet {
        /// The guest address given.
        guest: SocketAddrV4,
        /// The subnet.
        subnet: String,
    },
    /// an invalid router setting
    #[error("invalid NAT setting {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What was expected.
        reason: String,
    },
}

pub use fabric_api::netd::{parse_host_addr, Forward, Proto};

/// Bounds and timeouts of the flow table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most flows (TCP + UDP + ICMP) at once.
    pub max_flows: usize,
    /// Most bytes of flow buffers at once (each TCP flow counts its two buffers).
    pub max_flow_memory: usize,
    /// Size of each of a TCP flow's two smoltcp buffers (sets the window).
    pub tcp_buffer: usize,
    /// Idle time after which a UDP flow is removed.
    pub udp_timeout: Duration,
    /// Idle time after which an ICMP echo flow is removed.
    pub icmp_timeout: Duration,
    /// Idle time after which an established TCP flow is reset.
    pub tcp_idle_timeout: Duration,
    /// How long a host connect may take before the guest gets a RST.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: 4096,
            max_flow_memory: 512 << 20,
            tcp_buffer: 512 << 10,
            udp_timeout: Duration::from_secs(60),
            icmp_timeout: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(2 * 3600),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything the router needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// The network's subnet: address and prefix length.
    pub subnet: (Ipv4Addr, u8),
    /// The router's address; it stands for the host's loopback.
    pub gateway: Ipv4Addr,
    /// The DNS forwarder's address.
    pub dns: Ipv4Addr,
    /// The router's MAC.
    pub mac: [u8; 6],
    /// IP MTU of the network (up to 65520).
    pub mtu: usize,
    /// Where the host resolvers are listed.
    pub resolv_conf: PathBuf,
    /// Port forwards at start.
    pub forwards: Vec<Forward>,
    /// Flow table bounds.
    pub limits: Limits,
    /// Host destinations flows may go to, as (address, prefix) pairs; empty means
    /// anywhere. The gateway's loopback and the resolver are checked too.
    pub outbound_allow: Vec<(Ipv4Addr, u8)>,
}

impl RouterConfig {
    /// VirtualBox's defaults: 10.0.2.0/24, gateway .2, DNS .3, MTU 1500.
    pub fn defaults() -> Self {
        RouterConfig {
            subnet: (Ipv4Addr::new(10, 0, 2, 0), 24),
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            mac: [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02],
            mtu: 1500,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            forwards: Vec::new(),
            limits: Limits::default(),
            outbound_allow: Vec::new(),
        }
    }

    /// Checks the settings hang together.
    pub fn validate(&self) -> Result<(), NatError> {
        if !(576..=65520).contains(&self.mtu) {
            return Err(NatError::Invalid {
                key: "mtu",
                reason: format!("expected 576..=65520, got {}", self.mtu),
            });
        }
        if self.subnet.1 > 30 {
            return Err(NatError::Invalid {
                key: "subnet",
                reason: "prefix must be /30 or shorter".into(),
            });
        }
        for (key, a) in [("gateway", self.gateway), ("dns", self.dns)] {
            if !self.in_subnet(a) {
                return Err(NatError::Invalid {
                    key,
                    reason: format!("{a} is not in the subnet"),
                });
            }
        }
        if self.limits.tcp_buffer < 4096 {
            return Err(NatError::Invalid {
                key: "tcp_buffer",
                reason: "at least 4096 bytes".into(),
            });
        }
        for f in &self.forwards {
            self.check_forward(f)?;
        }
        Ok(())
    }

    fn mask(&self) -> u32 {
        if self.subnet.1 == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.subnet.1))
        }
    }

    /// Whether `a` is inside the network's subnet.
    pub fn in_subnet(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.subnet.0) & self.mask()
    }

    fn check_forward(&self, f: &Forward) -> Result<(), NatError> {
        if f.guest.port() == 0 || f.host.port() == 0 {
            return Err(NatError::Invalid {
                key: "forward",
                reason: format!("ports must not be 0 ({} -> {})", f.host, f.guest),
            });
        }
        if !self.in_subnet(*f.guest.ip()) {
            return Err(NatError::GuestOutsideSubnet {
                guest: f.guest,
                subnet: format!("{}/{}", self.subnet.0, self.subnet.1),
            });
        }
        Ok(())
    }
}

/// Counters of the router.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Frames from the switch.
    pub frames_in: u64,
    /// Frames to the switch.
    pub frames_out: u64,
    /// Malformed frames dropped.
    pub malformed: u64,
    /// Flows refused because the table was full (count or memory).
    pub flows_refused: u64,
    /// TCP connects refused or unreachable on the host (answered with a RST).
    pub connect_failed: u64,
    /// Datagrams or echo requests dropped (send failure, too large, no resolver).
    pub dropped: u64,
}

/// One flow, as `netd flows NET` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowInfo {
    /// tcp, udp or icmp.
    pub proto: String,
    /// The guest's end.
    pub guest: String,
    /// The address the guest asked for.
    pub dst: String,
    /// The host-side peer.
    pub host_peer: String,
    /// A short state.
    pub state: String,
    /// Whether a port forward made it.
    pub forward: bool,
    /// Seconds since the last traffic.
    pub idle_s: u64,
}

enum Command {
    AttachReader(crate::ports::InlineReader),
    AddForward(Forward, oneshot::Sender<Result<(), NatError>>),
    DelForward(Proto, SocketAddr, oneshot::Sender<Result<(), NatError>>),
    ListForwards(oneshot::Sender<Vec<Forward>>),
    Flows(oneshot::Sender<Vec<FlowInfo>>),
    Stats(oneshot::Sender<Stats>),
}

/// A control request to a router, for callers on blocking threads (the daemon's
/// control handler).
#[derive(Debug, Clone)]
pub enum NatRequest {
    /// Add a port forward.
    AddForward(Forward),
    /// Remove the forward on this protocol and host address.
    DelForward(Proto, SocketAddr),
    /// List forwards.
    ListForwards,
    /// List flows.
    Flows,
    /// Counters.
    Stats,
}

/// Drives a running router: port forwards, flows, counters.
#[derive(Debug, Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl RouterHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NatError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NatError::Stopped)?;
        rx.await.map_err(|_| NatError::Stopped)
    }

    /// Serves `req` from a blocking thread (not from inside the runtime's workers);
    /// the answer as JSON.
    pub fn request_blocking(&self, req: NatRequest) -> Result<serde_json::Value, NatError> {
        fn ask<T>(
            tx: &mpsc::Sender<Command>,
            make: impl FnOnce(oneshot::Sender<T>) -> Command,
        ) -> Result<T, NatError> {
            let (otx, orx) = oneshot::channel();
            tx.blocking_send(make(otx)).map_err(|_| NatError::Stopped)?;
            orx.blocking_recv().map_err(|_| NatError::Stopped)
        }
        let j = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        Ok(match req {
            NatRequest::AddForward(f) => {
                ask(&self.tx, |t| Command::AddForward(f, t))??;
                serde_json::Value::Null
            }
            NatRequest::DelForward(p, h) => {
                ask(&self.tx, |t| Command::DelForward(p, h, t))??;
                serde_json::Value::Null
            }
            NatRequest::ListForwards => {
                j(serde_json::to_value(ask(&self.tx, Command::ListForwards)?))
            }
            NatRequest::Flows => j(serde_json::to_value(ask(&self.tx, Command::Flows)?)),
            NatRequest::Stats => j(serde_json::to_value(ask(&self.tx, Command::Stats)?)),
        })
    }

    /// Adds a port forward (binds its host address now).
    pub async fn add_forward(&self, f: Forward) -> Result<(), NatError> {
        self.ask(|tx| Command::AddForward(f, tx)).await?
    }

    /// Removes the forward on `host`; its open connections are closed.
    pub async fn del_forward(&self, proto: Proto, host: SocketAddr) -> Result<(), NatError> {
        self.ask(|tx| Command::DelForward(proto, host, tx)).await?
    }

    /// The forwards in place.
    pub async fn forwards(&self) -> Result<Vec<Forward>, NatError> {
        self.ask(Command::ListForwards).await
    }

    /// The flows in the table.
    pub async fn flows(&self) -> Result<Vec<FlowInfo>, NatError> {
        self.ask(Command::Flows).await
    }

    /// The router's counters.
    pub async fn stats(&self) -> Result<Stats, NatError> {
        self.ask(Command::Stats).await
    }

    /// Hands the router a guest port to read on its own thread (see
    /// [`crate::ports::InlineReader`]); gives it back if the router cannot take it
    /// now. Never blocks.
    pub fn attach_reader(
        &self,
        r: crate::ports::InlineReader,
    ) -> Result<(), crate::ports::InlineReader> {
        match self.tx.try_send(Command::AttachReader(r)) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Command::AttachReader(r) => Err(r),
                _ => Ok(()),
            },
        }
    }
}

/// A guest port the router reads itself (see [`crate::ports::InlineReader`]).
struct Inline {
    // Field order: both registrations end before the reader closes the fds.
    fd: tokio::io::unix::AsyncFd<crate::ports::SharedFd>,
    stop: tokio::io::unix::AsyncFd<crate::ports::StopFd>,
    reader: crate::ports::InlineReader,
    /// Frames are read into this buffer and split off it: a frame for the router
    /// goes on as a view of it, and the space comes back once the frames read into
    /// it are dropped (after the step that handled them).
    buf: bytes::BytesMut,
}

/// Capacity of an inline reader's buffer: room for 16 frames of 64 KiB.
/// Gateway ports that forward sessions (TCP and UDP) come from, towards the guest.
const FWD_PORT_FIRST: u16 = 32768;
const FWD_PORT_LAST: u16 = 60999;

/// The next port of the forward range, round robin from `*next` (a value outside
/// the range starts at its beginning), that `taken` does not claim; `None` when
/// every port of the range is taken.
fn free_forward_port(next: &mut u16, taken: impl Fn(u16) -> bool) -> Option<u16> {
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

const INLINE_BUF: usize = 16 * 65 * 1024;

/// Frames up to this size are copied out of the inline buffer (a held SYN must not
/// pin a whole buffer); larger ones are handed on in place.
const INLINE_COPY_MAX: usize = 2048;

/// Most bytes one wake-up reads from an inline port before doing a step.
const INLINE_BUDGET: usize = 1 << 20;

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
    cfg: RouterConfig,
    /// TCP frames leave as offloaded frames (see `tcp.rs`, "Offload").
    offload: bool,
    mac: EthernetAddress,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    from_switch: mpsc::Receiver<Bytes>,
    to_switch: ToSwitch,
    ctl: mpsc::Receiver<Command>,
    inbox: Vec<Bytes>,
    stopped: bool,
    timer: Pin<Box<tokio::time::Sleep>>,
    next_housekeeping: tokio::time::Instant,
    resolvers: dns::Resolvers,
    stats: Stats,
    tcp: tcp::TcpTable,
    udp: udp::UdpTable,
    icmp: icmp::IcmpTable,
    /// Guest MACs by address, learned from their frames, for frames the router builds.
    guest_macs: HashMap<Ipv4Addr, EthernetAddress>,
    /// The DHCP server, for datagrams to port 67 of the router's own addresses.
    dhcp: Option<LocalService>,
    /// A guest port read on this thread, if the daemon handed one over.
    inline: Option<Inline>,
    /// Try a read of the inline port even if it is not marked readable.
    inline_probe: bool,
    /// Receive buffer for host datagrams (UDP, ICMP), made once: a zeroed 64 KiB
    /// allocation per step showed up in profiles.
    scratch: Vec<u8>,
}

/// A service that lives behind the router's own addresses: it takes a whole Ethernet
/// frame and returns the frame that answers it, if any. The daemon plugs the
/// network's DHCP server in here ([`Router::set_dhcp`]).
pub type LocalService = Box<dyn FnMut(&[u8]) -> Option<Vec<u8>> + Send>;

/// The DHCP server port (RFC 2131).
pub const DHCP_SERVER_PORT: u16 = 67;

/// How many frames one wake-up takes from the switch before doing a step.
const INBOX_BATCH: usize = 256;

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
        let mut icfg = IfaceConfig::new(HardwareAddress::Ethernet(mac));
        icfg.random_seed = seed();
        let mut iface = Interface::new(icfg, &mut dev, smoltcp::time::Instant::now());
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
        iface
            .routes_mut()
            .add_default_ipv4_route(cfg.gateway)
            .map_err(|_| NatError::Invalid {
                key: "gateway",
                reason: "cannot install the default route".into(),
            })?;
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
            stats: Stats::default(),
            tcp: tcp::TcpTable::default(),
            udp: udp::UdpTable::default(),
            icmp: icmp::IcmpTable::default(),
            guest_macs: HashMap::new(),
            dhcp: None,
            inline: None,
            inline_probe: false,
            scratch: Vec::new(),
            cfg,
        };
        for f in router.cfg.forwards.clone() {
            router.add_forward(f)?;
        }
        Ok((router, RouterHandle { tx: ctl_tx }))
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
                rt.block_on(async move {
                    match Router::with_sink(cfg, from_switch, to_switch) {
                        Ok((mut router, handle)) => {
                            if let Some(d) = dhcp {
                                router.set_dhcp(d);
                            }
                            let _ = tx.send(Ok(handle));
                            router.run().await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
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
        tracing::info!("NAT router stopped");
    }

    /// Feeds one frame through the router synchronously and returns the frames it
    /// answers with (used by the fuzz target and the randomized unit test).
    pub fn process_frame_for_test(&mut self, frame: Bytes) -> Vec<Bytes> {
        // (Channel-fed routers take plain frames; see `ingest_vnet` for the others.)
        self.inbox.push(frame);
        self.step();
        self.dev
            .tx
            .drain(..)
            .map(device::Frame::into_bytes)
            .collect()
    }

    /// Registers interest in everything that can make progress; ready when any is.
    fn poll_events(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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

    /// Reads the inline guest port while it has frames (within a budget): frames
    /// for the router join the inbox, others are switched now. True if any frame
    /// came in.
    fn poll_inline(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(il) = self.inline.as_mut() else {
            return false;
        };
        if il.reader.stopped() {
            tracing::debug!(port = il.reader.name(), "inline port stopped");
            self.inline = None;
            return false;
        }
        // Registers the wake-up on the stop eventfd (it is never readable before).
        let _ = il.stop.poll_read_ready(cx);
        let mut got = false;
        let mut budget = INLINE_BUDGET;
        let mut failed = None;
        // A TAP whose device went away (its namespace was deleted) signals only
        // EPOLLERR, which tokio's read readiness does not include: housekeeping sets
        // `inline_probe` so that a read is tried anyway, once a second; it fails then.
        let mut probe = std::mem::take(&mut self.inline_probe);
        while self.inbox.len() < INBOX_BATCH && budget > 0 {
            let mut guard = None;
            if !std::mem::take(&mut probe) {
                match il.fd.poll_read_ready(cx) {
                    Poll::Ready(Ok(g)) => guard = Some(g),
                    Poll::Ready(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let mut clear = || {
                if let Some(g) = guard.as_mut() {
                    g.clear_ready();
                }
            };
            // Room for one more frame: the buffer's own space once every frame split
            // off it has been dropped (the usual case: they die with the step that
            // handled them), else a new buffer.
            let max = crate::ports::INLINE_READ_MAX;
            if il.buf.capacity() - il.buf.len() < max && !il.buf.try_reclaim(max) {
                il.buf = bytes::BytesMut::with_capacity(INLINE_BUF);
            }
            match il.reader.read(&mut il.buf) {
                Ok(0) => clear(),
                Ok(n) => {
                    got = true;
                    budget = budget.saturating_sub(n);
                    let msg = if n <= INLINE_COPY_MAX {
                        let m = Bytes::copy_from_slice(&il.buf);
                        il.buf.clear();
                        m
                    } else {
                        il.buf.split().freeze()
                    };
                    if il.reader.switch(&msg) {
                        self.inbox.push(msg);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => clear(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Stopping at the budget leaves the fd marked readable: the next round reads
        // on at once (and `got` makes this round ready).
        if let Some(e) = failed {
            if let Some(il) = self.inline.take() {
                tracing::info!(port = il.reader.name(), error = %e, "inline port read failed; giving it a thread");
                let Inline {
                    fd, stop, reader, ..
                } = il;
                drop((fd, stop));
                if let Err(e) = reader.fall_back() {
                    tracing::warn!(error = %e, "cannot start the port thread");
                }
            }
        }
        got
    }

    /// The datagram receive buffer (64 KiB); put it back in `self.scratch` after use.
    fn take_scratch(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.scratch);
        if buf.len() < 65536 {
            buf = vec![0u8; 65536];
        }
        buf
    }

    fn attach_reader(&mut self, reader: crate::ports::InlineReader) {
        let give_back = |reader: crate::ports::InlineReader, why: &str| {
            tracing::debug!(port = reader.name(), why, "inline port declined");
            if let Err(e) = reader.fall_back() {
                tracing::warn!(error = %e, "cannot start the port thread");
            }
        };
        if self.inline.is_some() {
            return give_back(reader, "the router reads a port already");
        }
        let fd = match sys::register_fd(reader.fd()) {
            Ok(fd) => fd,
            Err(_) => return give_back(reader, "cannot register its fd"),
        };
        let stop = match sys::register_fd(reader.stop_fd()) {
            Ok(s) => s,
            Err(_) => {
                drop(fd);
                return give_back(reader, "cannot register its stop fd");
            }
        };
        tracing::debug!(port = reader.name(), "router reads the port on its thread");
        self.inline = Some(Inline {
            fd,
            stop,
            reader,
            buf: bytes::BytesMut::with_capacity(INLINE_BUF),
        });
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::AttachReader(r) => self.attach_reader(r),
            Command::AddForward(f, tx) => {
                let _ = tx.send(self.add_forward(f));
            }
            Command::DelForward(proto, host, tx) => {
                let r = match proto {
                    Proto::Tcp => self.tcp.del_forward(host, &mut self.sockets),
                    Proto::Udp => self.udp.del_forward(host),
                };
                let _ = tx.send(
                    r.then_some(())
                        .ok_or(NatError::NoSuchForward { proto, host }),
                );
            }
            Command::ListForwards(tx) => {
                let mut v = self.tcp.forwards();
                v.extend(self.udp.forwards());
                let _ = tx.send(v);
            }
            Command::Flows(tx) => {
                let mut v = self.tcp.flows(&self.sockets);
                v.extend(self.udp.flows());
                v.extend(self.icmp.flows());
                let _ = tx.send(v);
            }
            Command::Stats(tx) => {
                let _ = tx.send(self.stats.clone());
            }
        }
    }

    fn add_forward(&mut self, f: Forward) -> Result<(), NatError> {
        self.cfg.check_forward(&f)?;
        match f.proto {
            Proto::Tcp => self.tcp.add_forward(f),
            Proto::Udp => self.udp.add_forward(f),
        }
    }

    /// Where a guest's flow to `dst` really goes on the host, or `None` if nowhere
    /// (or not allowed by `outbound_allow`).
    fn map_dst(&mut self, dst: SocketAddrV4) -> Option<SocketAddr> {
        let target = self.map_dst_unchecked(dst)?;
        if self.cfg.outbound_allow.is_empty() {
            return Some(target);
        }
        let IpAddr::V4(ip) = target.ip() else {
            return None;
        };
        self.cfg
            .outbound_allow
            .iter()
            .any(|(net, len)| prefix_match(ip, *net, *len))
            .then_some(target)
    }

    fn map_dst_unchecked(&mut self, dst: SocketAddrV4) -> Option<SocketAddr> {
        let ip = *dst.ip();
        if ip == self.cfg.gateway {
            return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port()));
        }
        if ip == self.cfg.dns {
            return if dst.port() == 53 {
                self.resolvers.current()
            } else {
                None
            };
        }
        // Other addresses of the NAT subnet are guests (they talk directly, on the
        // switch), never host destinations; and no broadcast/multicast flows.
        if self.cfg.in_subnet(ip) || ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified() {
            return None;
        }
        Some(SocketAddr::V4(dst))
    }

    /// Whether one more flow costing `bytes` fits the table.
    fn flow_fits(&self, bytes: usize) -> bool {
        let count = self.tcp.len() + self.udp.len() + self.icmp.len();
        let mem = self.tcp.len() * 2 * self.cfg.limits.tcp_buffer
            + (self.udp.len() + self.icmp.len()) * udp::FLOW_COST;
        count < self.cfg.limits.max_flows && mem + bytes <= self.cfg.limits.max_flow_memory
    }

    /// One round of work after a wake-up.
    fn step(&mut self) {
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
        while !matches!(
            self.iface
                .poll_ingress_single(now, &mut self.dev, &mut self.sockets),
            smoltcp::iface::PollIngressSingleResult::None
        ) {}
        self.tcp_pump();
        self.udp_pump();
        self.icmp_pump();
        self.egress(now);
        self.tcp_cleanup();
        let tnow = tokio::time::Instant::now();
        if tnow >= self.next_housekeeping {
            self.next_housekeeping = tnow + Duration::from_secs(1);
            self.expire();
            self.inline_probe = self.inline.is_some();
        }
        let delay = self
            .iface
            .poll_delay(now, &self.sockets)
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
        let gw = self.cfg.gateway;
        let dns = self.cfg.dns;
        let own = |a: Ipv4Addr| a == gw || a == dns;
        match frame::classify_with(&frame, self.mac, own, tcp_csum_partial) {
            Classified::Ignore => {}
            Classified::Malformed => self.stats.malformed += 1,
            Classified::ArpRequest {
                src_mac, src_ip, ..
            } => {
                // smoltcp answers (the target is one of its addresses) and learns the
                // guest's MAC in the same step, so its first reply needs no ARP.
                if self.cfg.in_subnet(src_ip) {
                    self.guest_macs.insert(src_ip, src_mac);
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
                self.guest_macs.insert(src.0, src_mac);
                self.tcp_syn(frame.clone(), src_mac, src, dst, seq);
            }
            Classified::Udp {
                src_mac,
                src,
                dst,
                payload,
            } => {
                self.guest_macs.insert(src.0, src_mac);
                if dst.1 == DHCP_SERVER_PORT && own(dst.0) {
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
                self.udp_input(src_mac, src, dst, payload);
            }
            Classified::IcmpEcho {
                src_mac,
                src,
                dst,
                ident,
                icmp,
            } => {
                self.guest_macs.insert(src, src_mac);
                self.icmp_input(src_mac, src, dst, ident, icmp);
            }
        }
    }

    fn expire(&mut self) {
        let limits = self.cfg.limits.clone();
        self.udp.expire(limits.udp_timeout);
        self.icmp.expire(limits.icmp_timeout);
        self.tcp.expire(
            limits.tcp_idle_timeout,
            3 * limits.connect_timeout,
            &mut self.sockets,
        );
        if self.guest_macs.len() > 4096 {
            self.guest_macs.clear();
        }
    }
}

/// Whether `a` is inside `net/len`.
pub fn prefix_match(a: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(a) & mask == u32::from(net) & mask
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests;
