//! `vxlan` ports: a network's frames tunnelled to other hosts in VXLAN (RFC 7348)
//! over UDP, to other netds or to the kernel's `vxlan` devices.
//!
//! # Theory of operation
//!
//! A vxlan port is a port whose "wire" is UDP. Each frame the switch sends out of
//! it is prefixed with the 8-byte VXLAN header (its VNI) and sent as one datagram
//! to a remote VTEP's UDP `port`: to the one remote the switch learned the
//! destination MAC behind, or, for broadcast, multicast and unknown unicast, to
//! every remote of the flood list (head-end replication) and to the multicast
//! `group` if there is one. The flood list changes at runtime (`netd vxlan remote
//! add|del`) without restarting the port.
//!
//! Receive is one thread reading the port's UDP socket (bound to `local`:`port`,
//! joined to `group`). The tunnel is as untrusted as a guest port: a datagram from
//! a sender that is not a listed remote is dropped (`drop_sender`) unless
//! `accept_any = true` or the port has a `group` (the members of a multicast
//! group are not known in advance); one that is not VXLAN (shorter than the
//! header, I flag clear) is `drop_not_vxlan`; one with another VNI is `drop_vni`.
//! Each such drop is counted on the tunnel ([`TunnelCounters`], `netd vxlan show`
//! and the `vxlan` object of `netd port list --json`). The inner frame then enters
//! the switch like any port's frame, where a bad one (short, multicast source,
//! above the MTU) is dropped and counted on the port. With `learning` (the
//! default) the switch records which remote each source MAC came from, so a MAC
//! that moves between hosts is relearned from its next frame.
//!
//! Sizes: a frame of the network's MTU becomes a datagram of MTU + 50 bytes on an
//! IPv4 underlay (20 IP, 8 UDP, 8 VXLAN, 14 inner Ethernet). The port refuses to
//! start, and a remote is refused, when the route towards it has a smaller MTU
//! (the error names both values): nothing is fragmented or silently lost. The port
//! cuts a guest's TCP super-frame (TSO) into segments of the network's MTU before
//! encapsulating them, and finishes partial checksums, in software
//! ([`crate::offload`]): the wire carries only finished packets.
//!
//! Batches: a TCP super-frame the switch hands over whole (the port takes
//! virtio-net headers) is cut here into segments of the network's MTU, each
//! encapsulated, and sent with one `sendmsg` per 64 datagrams (UDP_SEGMENT). The
//! receiving socket has UDP_GRO, so one read may bring a batch of datagrams from
//! one sender; the inner TCP segments of one flow in a batch are coalesced back
//! into one super-frame ([`gro`]) for the TAP or `vm` port that takes it.
//!
//! Outer source port: RFC 7348 asks for a hash of the inner flow, so that an ECMP
//! underlay spreads flows and keeps each in order. The port sends from a pool of
//! [`SEND_SOCKETS`] UDP sockets bound to source ports in 49152..65535 and picks
//! one by [`wire::flow_hash`] of the inner frame.
//!
//! # Files
//!
//! `wire.rs` the header and the flow hash, `spec.rs` the checked settings,
//! `gro.rs` the receive coalescing of TCP segments into super-frames, `sys.rs` the
//! path MTU socket option and UDP segmentation offload (UDP_SEGMENT, UDP_GRO).

pub mod gro;
mod spec;
mod sys;
pub mod wire;

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub use self::spec::{check_remote, validate, VxlanSpec, DEFAULT_PORT};
use self::wire::VxlanHeader;
use super::common::{attach, finish_start, spawn_thread, Cleanup, RunningPort, Stop};
use super::{PortError, MAX_FRAME};
use crate::config::PortSpec;
use crate::offload::{finish, VnetHdr, VNET_HDR_LEN};
use crate::switch::{Network, Port, PortClass, PortId, PortTx, TxError};

/// Bytes VXLAN adds to a frame's payload on an IPv4 underlay: IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14).
pub const OVERHEAD: u32 = 50;

/// UDP sockets a port sends from, one source port each (picked by flow hash).
pub const SEND_SOCKETS: usize = 16;

/// Most remotes on one port's flood list.
pub const MAX_REMOTES: usize = 1024;

/// Errors of a vxlan port.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    /// cannot set up the UDP socket of the tunnel
    #[error("cannot set up the UDP socket of the tunnel ({what})")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// no route to the remote
    #[error("no route to {remote} on the underlay")]
    NoRoute {
        /// The remote or group.
        remote: Ipv4Addr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// the network's MTU does not fit the underlay
    #[error(
        "network MTU {network_mtu} does not fit the underlay towards {remote}: VXLAN needs \
         an underlay MTU of {need} (the network MTU + {OVERHEAD}), its MTU is {underlay_mtu}; \
         set the network's mtu to at most {fits} or raise the underlay's",
        need = network_mtu + OVERHEAD,
        fits = underlay_mtu.saturating_sub(OVERHEAD)
    )]
    Mtu {
        /// The network's MTU.
        network_mtu: u32,
        /// The underlay's MTU towards `remote`.
        underlay_mtu: u32,
        /// The remote or group.
        remote: Ipv4Addr,
    },
    /// the remote is already on the flood list
    #[error("{0} is already a remote of this port")]
    RemoteExists(Ipv4Addr),
    /// the remote is not on the flood list
    #[error("{0} is not a remote of this port")]
    NoSuchRemote(Ipv4Addr),
    /// bad remote address
    #[error("bad remote address: expected {0}")]
    BadRemote(String),
    /// the flood list is full
    #[error("the flood list is full ({MAX_REMOTES} remotes)")]
    TooManyRemotes,
}

/// Counters of the tunnel itself (the port's frame counters are the switch's).
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Datagrams accepted (their inner frame went to the switch).
    pub rx_datagrams: AtomicU64,
    /// Dropped: from a sender that is not a listed remote.
    pub drop_sender: AtomicU64,
    /// Dropped: not a VXLAN datagram (short, I flag clear).
    pub drop_not_vxlan: AtomicU64,
    /// Dropped: a VNI other than the port's.
    pub drop_vni: AtomicU64,
    /// Datagrams sent (one per remote a frame went to).
    pub tx_datagrams: AtomicU64,
    /// Datagrams the kernel refused to send.
    pub tx_errors: AtomicU64,
}

/// [`TunnelCounters`], as the control API shows them.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TunnelCountersSnapshot {
    /// See [`TunnelCounters`].
    pub rx_datagrams: u64,
    /// See [`TunnelCounters`].
    pub drop_sender: u64,
    /// See [`TunnelCounters`].
    pub drop_not_vxlan: u64,
    /// See [`TunnelCounters`].
    pub drop_vni: u64,
    /// See [`TunnelCounters`].
    pub tx_datagrams: u64,
    /// See [`TunnelCounters`].
    pub tx_errors: u64,
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A running tunnel's shared state: settings, flood list, counters. The port's
/// transmit side, its receive thread and the control API share it.
pub struct Tunnel {
    spec: VxlanSpec,
    remotes: RwLock<Vec<Ipv4Addr>>,
    counters: TunnelCounters,
    network: Arc<Network>,
    port: OnceLock<PortId>,
}

/// A tunnel, as the control API shows it (`netd vxlan show`).
#[derive(Debug, Clone, Serialize)]
pub struct TunnelInfo {
    /// VNI.
    pub vni: u32,
    /// Local underlay address, if set.
    pub local: Option<Ipv4Addr>,
    /// UDP port.
    pub port: u16,
    /// Multicast group, if any.
    pub group: Option<Ipv4Addr>,
    /// The flood list now.
    pub remotes: Vec<Ipv4Addr>,
    /// Learning on.
    pub learning: bool,
    /// Any sender accepted.
    pub accept_any: bool,
    /// Counters.
    pub counters: TunnelCountersSnapshot,
}

impl Tunnel {
    /// Whether a datagram from `ip` is accepted.
    fn accepts(&self, ip: Ipv4Addr) -> bool {
        self.spec.accept_any
            || self.spec.group.is_some()
            || self
                .remotes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&ip)
    }

    /// Adds `remote` to the flood list, after checking that the network's frames
    /// fit the underlay towards it.
    pub fn add_remote(&self, remote: Ipv4Addr) -> Result<(), VxlanError> {
        check_remote(remote).map_err(VxlanError::BadRemote)?;
        check_underlay(&self.spec, remote, self.network.mtu() as u32)?;
        let mut r = self.remotes.write().unwrap_or_else(|e| e.into_inner());
        if r.contains(&remote) {
            return Err(VxlanError::RemoteExists(remote));
        }
        if r.len() >= MAX_REMOTES {
            return Err(VxlanError::TooManyRemotes);
        }
        r.push(remote);
        Ok(())
    }

    /// Removes `remote` from the flood list and forgets the MACs learned behind it
    /// (frames to them flood again until they are relearned elsewhere).
    pub fn del_remote(&self, remote: Ipv4Addr) -> Result<(), VxlanError> {
        {
            let mut r = self.remotes.write().unwrap_or_else(|e| e.into_inner());
            let i = r
                .iter()
                .position(|x| *x == remote)
                .ok_or(VxlanError::NoSuchRemote(remote))?;
            r.remove(i);
        }
        if let Some(id) = self.port.get() {
            self.network.flush_remote(*id, remote);
        }
        Ok(())
    }

    /// Settings, flood list and counters.
    pub fn info(&self) -> TunnelInfo {
        let c = &self.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TunnelInfo {
            vni: self.spec.vni,
            local: self.spec.local,
            port: self.spec.port,
            group: self.spec.group,
            remotes: self
                .remotes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            learning: self.spec.learning,
            accept_any: self.spec.accept_any,
            counters: TunnelCountersSnapshot {
                rx_datagrams: r(&c.rx_datagrams),
                drop_sender: r(&c.drop_sender),
                drop_not_vxlan: r(&c.drop_not_vxlan),
                drop_vni: r(&c.drop_vni),
                tx_datagrams: r(&c.tx_datagrams),
                tx_errors: r(&c.tx_errors),
            },
        }
    }
}

fn sock_err(what: &'static str) -> impl FnOnce(io::Error) -> VxlanError {
    move |source| VxlanError::Socket { what, source }
}

/// Checks that a frame of `mtu` fits the underlay towards `dst` once encapsulated.
fn check_underlay(spec: &VxlanSpec, dst: Ipv4Addr, mtu: u32) -> Result<(), VxlanError> {
    let s =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("socket"))?;
    if let Some(l) = spec.local {
        s.bind(&SockAddr::from(SocketAddrV4::new(l, 0)))
            .map_err(sock_err("bind to local"))?;
    }
    s.connect(&SockAddr::from(SocketAddrV4::new(dst, spec.port)))
        .map_err(|source| VxlanError::NoRoute {
            remote: dst,
            source,
        })?;
    let underlay = sys::path_mtu(&s).map_err(|source| VxlanError::NoRoute {
        remote: dst,
        source,
    })?;
    if mtu + OVERHEAD > underlay {
        return Err(VxlanError::Mtu {
            network_mtu: mtu,
            underlay_mtu: underlay,
            remote: dst,
        });
    }
    Ok(())
}

/// The socket the port receives on: `local` (or any address with a group):`port`.
fn recv_socket(spec: &VxlanSpec) -> Result<UdpSocket, VxlanError> {
    let s =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("socket"))?;
    // Room for bursts: a full-speed sender fills the default buffer in well under
    // a millisecond.
    let _ = s.set_recv_buffer_size(4 << 20);
    let bind = match (spec.group, spec.local) {
        (Some(_), _) | (None, None) => Ipv4Addr::UNSPECIFIED,
        (None, Some(l)) => l,
    };
    s.bind(&SockAddr::from(SocketAddrV4::new(bind, spec.port)))
        .map_err(sock_err("bind the VXLAN port"))?;
    if let Some(g) = spec.group {
        s.join_multicast_v4(&g, &spec.local.unwrap_or(Ipv4Addr::UNSPECIFIED))
            .map_err(sock_err("join the multicast group"))?;
    }
    s.set_nonblocking(true).map_err(sock_err("non-blocking"))?;
    // Batches of datagrams per read where the kernel offers it; without, one each.
    if let Err(e) = sys::set_udp_gro(&s) {
        tracing::debug!(error = %e, "no UDP_GRO: one datagram per read");
    }
    Ok(s.into())
}

/// The pool of sockets the port sends from, each bound to its own source port.
fn send_sockets(spec: &VxlanSpec) -> Result<Vec<Socket>, VxlanError> {
    let local = spec.local.unwrap_or(Ipv4Addr::UNSPECIFIED);
    // Where in 49152..65535 to start looking, so that two ports (or two netds)
    // do not all try the same ports first.
    let seed = (std::process::id() as usize).wrapping_mul(2654435761) ^ (spec.vni as usize);
    let mut out = Vec::with_capacity(SEND_SOCKETS);
    let mut candidate = seed;
    for _ in 0..SEND_SOCKETS {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(sock_err("socket"))?;
        let mut bound = false;
        for _ in 0..64 {
            candidate = candidate.wrapping_add(1021);
            let p = 49152 + (candidate % 16384) as u16;
            if s.bind(&SockAddr::from(SocketAddrV4::new(local, p))).is_ok() {
                bound = true;
                break;
            }
        }
        if !bound {
            s.bind(&SockAddr::from(SocketAddrV4::new(local, 0)))
                .map_err(sock_err("bind a source port"))?;
        }
        s.set_ttl_v4(u32::from(spec.ttl.unwrap_or(64)))
            .map_err(sock_err("ttl"))?;
        if spec.group.is_some() {
            s.set_multicast_ttl_v4(u32::from(spec.ttl.unwrap_or(1)))
                .map_err(sock_err("multicast ttl"))?;
            // Our own floods must not come back to us.
            s.set_multicast_loop_v4(false)
                .map_err(sock_err("multicast loop"))?;
            if let Some(l) = spec.local {
                s.set_multicast_if_v4(&l)
                    .map_err(sock_err("multicast interface"))?;
            }
        }
        // Nothing is ever read from these: keep what strays in small.
        let _ = s.set_recv_buffer_size(4096);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true).map_err(sock_err("non-blocking"))?;
        out.push(s);
    }
    Ok(out)
}

/// The transmit side: encapsulate and send to one remote or to all.
struct VxlanTx {
    tunnel: Arc<Tunnel>,
    socks: Vec<Socket>,
    header: [u8; wire::HEADER_LEN],
    group: Option<SockAddr>,
    /// Whether the kernel takes UDP_SEGMENT (cleared on its first refusal).
    gso: AtomicBool,
}

thread_local! {
    /// Segments of a super-frame, each after its VXLAN header, back to back; and
    /// the scratch space of the segmentation.
    static GSO_BUF: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Most datagrams in one UDP_SEGMENT send (the kernel's UDP_MAX_SEGMENTS is 64 on
/// older kernels) and most bytes (one IP packet's worth before the kernel cuts).
const GSO_MAX_SEGS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;

impl VxlanTx {
    /// The destinations of a frame: its remote, or every remote and the group.
    fn destinations(&self, remote: Option<Ipv4Addr>) -> Vec<SockAddr> {
        let port = self.tunnel.spec.port;
        match remote {
            Some(r) => vec![SockAddr::from(SocketAddrV4::new(r, port))],
            None => {
                let remotes = self
                    .tunnel
                    .remotes
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                self.group
                    .iter()
                    .cloned()
                    .chain(
                        remotes
                            .iter()
                            .map(|r| SockAddr::from(SocketAddrV4::new(*r, port))),
                    )
                    .collect()
            }
        }
    }

    /// Sends `buf`, datagrams of `seg` bytes back to back (the last may be
    /// shorter), to `to`: in UDP_SEGMENT batches, or one by one where the kernel
    /// refuses those.
    fn send_batch(
        &self,
        sock: &Socket,
        buf: &[u8],
        seg: usize,
        to: &SockAddr,
    ) -> Result<(), TxError> {
        let c = &self.tunnel.counters;
        let seg = seg.max(1);
        if let (true, Some(v4)) = (self.gso.load(Ordering::Relaxed), to.as_socket_ipv4()) {
            let per = (GSO_MAX_BYTES / seg).clamp(1, GSO_MAX_SEGS) * seg;
            let mut r = Ok(());
            for chunk in buf.chunks(per) {
                match sys::send_segmented(sock, chunk, seg as u16, v4) {
                    Ok(()) => {
                        let n = chunk.len().div_ceil(seg) as u64;
                        c.tx_datagrams.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
                        ) =>
                    {
                        // No UDP GSO here: one datagram per send from now on.
                        self.gso.store(false, Ordering::Relaxed);
                        return self.send_batch(sock, buf, seg, to);
                    }
                    Err(e) => {
                        inc(&c.tx_errors);
                        r = Err(super::fd::classify(e));
                    }
                }
            }
            return r;
        }
        let mut r = Ok(());
        for d in buf.chunks(seg) {
            match sock.send_to(d, to) {
                Ok(_) => inc(&c.tx_datagrams),
                Err(e) => {
                    inc(&c.tx_errors);
                    r = Err(super::fd::classify(e));
                }
            }
        }
        r
    }

    fn send_one(&self, sock: &Socket, frame: &[u8], to: &SockAddr) -> Result<(), TxError> {
        let bufs = [IoSlice::new(&self.header), IoSlice::new(frame)];
        match sock.send_to_vectored(&bufs, to) {
            Ok(_) => {
                inc(&self.tunnel.counters.tx_datagrams);
                Ok(())
            }
            Err(e) => {
                inc(&self.tunnel.counters.tx_errors);
                Err(super::fd::classify(e))
            }
        }
    }
}

impl PortTx for VxlanTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.send_to(frame, None)
    }

    /// Offloaded frames come whole: a TCP super-frame is cut here, into segments of
    /// the network's MTU, each encapsulated, and sent in UDP_SEGMENT batches (one
    /// system call per batch instead of one per segment).
    fn vnet(&self) -> bool {
        true
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        self.send_vnet_to(hdr, frame, None)
    }

    fn send_vnet_to(
        &self,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
        remote: Option<Ipv4Addr>,
    ) -> Result<(), TxError> {
        let h = match VnetHdr::parse(hdr) {
            Some(h) if !h.is_plain() => h,
            _ => return self.send_to(frame, remote),
        };
        let i = wire::flow_hash(frame) as usize % self.socks.len().max(1);
        let Some(sock) = self.socks.get(i) else {
            return Err(TxError::Down);
        };
        GSO_BUF.with(|b| {
            let (out, scratch) = &mut *b.borrow_mut();
            out.clear();
            let mut seg = 0;
            let done = finish(&h, frame, scratch, &mut |s| {
                if seg == 0 {
                    seg = wire::HEADER_LEN + s.len();
                }
                out.extend_from_slice(&self.header);
                out.extend_from_slice(s);
            });
            if done.is_err() || seg == 0 {
                return Err(TxError::Io(io::Error::other(
                    "offloaded frame could not be finished",
                )));
            }
            let mut r = Err(TxError::Down);
            for to in self.destinations(remote) {
                let one = self.send_batch(sock, out, seg, &to);
                if r.is_err() {
                    r = one;
                }
            }
            r
        })
    }

    fn send_to(&self, frame: &[u8], remote: Option<Ipv4Addr>) -> Result<(), TxError> {
        let i = wire::flow_hash(frame) as usize % self.socks.len().max(1);
        let Some(sock) = self.socks.get(i) else {
            return Err(TxError::Down);
        };
        let port = self.tunnel.spec.port;
        if let Some(r) = remote {
            return self.send_one(sock, frame, &SockAddr::from(SocketAddrV4::new(r, port)));
        }
        // Head-end replication: every remote, and the group.
        let mut result = Err(TxError::Down);
        if let Some(g) = &self.group {
            result = self.send_one(sock, frame, g);
        }
        let remotes = self
            .tunnel
            .remotes
            .read()
            .unwrap_or_else(|e| e.into_inner());
        for r in remotes.iter() {
            let one = self.send_one(sock, frame, &SockAddr::from(SocketAddrV4::new(*r, port)));
            if result.is_err() {
                result = one;
            }
        }
        result
    }
}

/// Starts a `vxlan` port of `spec` on `net`.
pub(super) fn start_vxlan_port(
    net: &Arc<Network>,
    spec: &PortSpec,
) -> Result<RunningPort, PortError> {
    let vx = spec
        .vxlan
        .clone()
        .ok_or_else(|| PortError::Vxlan(VxlanError::BadRemote("vxlan settings".into())))?;
    let mtu = net.mtu() as u32;
    for dst in vx.remotes.iter().chain(vx.group.iter()) {
        check_underlay(&vx, *dst, mtu).map_err(PortError::Vxlan)?;
    }
    let rx = recv_socket(&vx).map_err(PortError::Vxlan)?;
    let socks = send_sockets(&vx).map_err(PortError::Vxlan)?;
    let tunnel = Arc::new(Tunnel {
        remotes: RwLock::new(vx.remotes.clone()),
        spec: vx.clone(),
        counters: TunnelCounters::default(),
        network: net.clone(),
        port: OnceLock::new(),
    });
    let tx = VxlanTx {
        tunnel: tunnel.clone(),
        socks,
        header: VxlanHeader { vni: vx.vni }.emit(),
        gso: AtomicBool::new(true),
        group: vx
            .group
            .map(|g| SockAddr::from(SocketAddrV4::new(g, vx.port))),
    };
    let (port, stop) = attach(net, spec, PortClass::Vxlan, Box::new(tx))?;
    let _ = tunnel.port.set(port.id);
    let (n2, s2, t2) = (net.clone(), stop.clone(), tunnel.clone());
    let name = spec.name.clone();
    let started = spawn_thread(format!("vx-{}", spec.name), move || {
        if let Err(e) = rx_loop(&n2, &port, &t2, &rx, &s2) {
            tracing::warn!(port = %name, error = %e, "vxlan receive stopped");
        }
    })
    .map(|t| (Some(t), None));
    let mut rp = finish_start(net, spec, PortClass::Vxlan, stop, started, Cleanup::None)?;
    rp.tunnel = Some(tunnel);
    Ok(rp)
}

/// Reads datagrams until stopped: checks sender, header and VNI, then switches the
/// inner frames (learning their sender as the remote of their source MAC). With
/// UDP_GRO one read may bring a batch of datagrams from one sender; the inner TCP
/// segments of a batch are coalesced ([`gro`]) into super-frames.
fn rx_loop(
    net: &Network,
    port: &Port,
    tunnel: &Tunnel,
    sock: &UdpSocket,
    stop: &Stop,
) -> io::Result<()> {
    // A coalesced batch is at most 64 KiB of UDP payload.
    let mut buf = vec![0u8; (wire::HEADER_LEN + MAX_FRAME).max(65536)];
    let fd = sock.as_raw_fd();
    let c = &tunnel.counters;
    let mut gro = gro::Coalescer::default();
    loop {
        if stop.is_set() {
            return Ok(());
        }
        let (n, from, seg) = match sys::recv_coalesced(sock, &mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if crate::sys::poll2(fd, stop.efd.as_raw_fd(), -1)? {
                    return Ok(());
                }
                continue;
            }
            // ICMP errors for earlier sends surface here; they are not ours to act on.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
            Err(e) => return Err(e),
        };
        let data = buf.get(..n).unwrap_or_default();
        let count = seg.map_or(1, |s| n.div_ceil(s)) as u64;
        let Some(ip) = from.map(|f| *f.ip()).filter(|ip| tunnel.accepts(*ip)) else {
            c.drop_sender.fetch_add(count, Ordering::Relaxed);
            continue;
        };
        let remote = tunnel.spec.learning.then_some(ip);
        let mut emit = |f: &[u8], h: Option<&VnetHdr>| net.ingress_remote(port, f, h, remote);
        for d in data.chunks(seg.unwrap_or(n).max(1)) {
            match VxlanHeader::parse(d) {
                Err(_) => inc(&c.drop_not_vxlan),
                Ok((h, _)) if h.vni != tunnel.spec.vni => inc(&c.drop_vni),
                Ok((_, inner)) => {
                    inc(&c.rx_datagrams);
                    if !gro.offer(inner) {
                        gro.flush(&mut emit);
                        if !gro.offer(inner) {
                            emit(inner, None);
                        }
                    }
                }
            }
        }
        gro.flush(&mut emit);
    }
}

#[cfg(test)]
mod tests;
