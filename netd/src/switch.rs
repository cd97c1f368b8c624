//! The learning L2 switch: one [`Network`] per configured network.
//!
//! Theory of operation. A network is a set of ports and a MAC table. Every port
//! has a transmit side (an object implementing [`PortTx`]: a TAP fd, an AF_PACKET
//! socket, a stream socket, a bounded channel to an in-process service) and a
//! receive side that somebody drives by calling [`Network::ingress`] with each frame
//! it read: a thread per fd-based port, a thread per service port, or the thread of
//! the service that reads a port itself ([`Network::ingress_local`], the NAT
//! router's inline guest port). `ingress` does
//! all the switching on the caller's thread, with no queue in between and no
//! allocation:
//!
//! 1. check the frame (at least an Ethernet header, source MAC unicast, payload no
//!    larger than the ingress port's MTU); a bad frame is dropped and counted on
//!    the ingress port, by reason;
//! 2. on a guarded guest port, the port guard ([`guard`]): the source MAC must be
//!    the port's, ARP and DHCP must not claim another MAC, and on networks with
//!    DHCP or NAT the IPv4 source must be one the port may use; anything else is
//!    dropped and counted by reason (`drop_spoofed_*`);
//! 3. learn the source MAC on the ingress port (bounded table; a full table stops
//!    learning, it never evicts a live entry, so a MAC flood cannot push out hosts;
//!    an unguarded port holds at most `max_macs_per_port` entries, more are
//!    `drop_mac_limit`; a service's MAC is pinned to its port, and a frame from it
//!    on another port is `drop_spoofed_mac`);
//! 4. forward: a known unicast destination goes to its port only; broadcast,
//!    multicast and unknown unicast are flooded to every other port of the network;
//! 5. each egress port checks its MTU (for a TCP super-frame: its segments') and
//!    sends: with the frame's virtio-net header to ports that take one (TAP, vm),
//!    finished in software ([`crate::offload`]) to those that do not (stream,
//!    services); a full or absent peer is a counted drop on the egress port.
//!
//! A frame can only ever reach ports of the network it entered: networks share no
//! table and no port list. Entries age out after `mac_ageing` seconds without a
//! frame from that MAC; a deleted port takes its entries with it.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::budget::ByteBudget;
use crate::offload::{finish, segment_payload_len, VnetHdr, VNET_HDR_LEN};

mod fdb;
pub mod guard;

pub use self::fdb::{Fdb, Learn};
pub use self::guard::{Guard, GuardDrop, IpGuard, PortGuard};

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;

/// Identifies a port inside its network.
pub type PortId = u64;

/// What a port is, as the switch and the control API see it (`kind` in `netd port
/// list`): a guest port by its kind, the hostonly network's host TAP, a bridged
/// network's uplink, or an in-process service (DHCP, the NAT router). Isolation
/// (NAT `isolated = true`) tells services from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortClass {
    /// A TAP queue netd holds.
    Tap,
    /// A TAP a VMM holds, reached through AF_PACKET.
    Vm,
    /// A QEMU `-netdev stream` unix socket.
    Stream,
    /// The hostonly network's own TAP.
    Host,
    /// A bridged network's host NIC.
    Uplink,
    /// An in-process service.
    Service,
    /// A VXLAN tunnel to remote VTEPs.
    Vxlan,
}

impl PortClass {
    /// The name shown for it (the same as its JSON form).
    pub fn as_str(self) -> &'static str {
        match self {
            PortClass::Tap => "tap",
            PortClass::Vm => "vm",
            PortClass::Stream => "stream",
            PortClass::Host => "host",
            PortClass::Uplink => "uplink",
            PortClass::Service => "service",
            PortClass::Vxlan => "vxlan",
        }
    }
}

impl std::fmt::Display for PortClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frame could not be sent on a port.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// the port's queue is full
    #[error("the port's queue is full")]
    Full,
    /// the port has no peer right now
    #[error("the port has no peer right now")]
    Down,
    /// I/O error sending on the port
    #[error("I/O error sending on the port")]
    Io(#[source] std::io::Error),
}

/// The transmit side of a port.
pub trait PortTx: Send + Sync {
    /// Sends one complete Ethernet frame (no vnet header).
    fn send(&self, frame: &[u8]) -> Result<(), TxError>;

    /// Sends a frame to the remote the destination MAC was learned behind (a
    /// vxlan port; `None`: flood to every remote). Other ports ignore `remote`.
    fn send_to(&self, frame: &[u8], remote: Option<Ipv4Addr>) -> Result<(), TxError> {
        let _ = remote;
        self.send(frame)
    }

    /// Whether the port takes frames with a virtio-net header (and so offloaded,
    /// unfinished frames: partial checksums, TCP super-frames).
    fn vnet(&self) -> bool {
        false
    }

    /// Sends a frame preceded by its virtio-net header. Only called when
    /// [`vnet`](Self::vnet) is true.
    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let _ = hdr;
        self.send(frame)
    }

    /// [`send_vnet`](Self::send_vnet) to the remote the destination was learned
    /// behind (see [`send_to`](Self::send_to)).
    fn send_vnet_to(
        &self,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
        remote: Option<Ipv4Addr>,
    ) -> Result<(), TxError> {
        let _ = remote;
        self.send_vnet(hdr, frame)
    }
}

/// The transmit side of a port whose every frame goes with a virtio-net header (a
/// vnet TAP, an AF_PACKET socket with PACKET_VNET_HDR, a service that takes
/// offloaded frames); a plain frame goes with an all-zero header. Every such type is
/// a [`PortTx`] that takes offloaded frames.
pub trait VnetTx: Send + Sync {
    /// Sends `frame` preceded by `hdr`.
    fn send_with_hdr(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError>;
}

impl<T: VnetTx> PortTx for T {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.send_with_hdr(&[0; VNET_HDR_LEN], frame)
    }

    fn vnet(&self) -> bool {
        true
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        self.send_with_hdr(hdr, frame)
    }
}

thread_local! {
    /// Per-thread buffer for frames finished in software (see [`crate::offload`]).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Switch errors.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// a port named {0:?} already exists on this network
    #[error("a port named {0:?} already exists on this network")]
    PortExists(String),
    /// no port named {0:?} on this network
    #[error("no port named {0:?} on this network")]
    NoSuchPort(String),
    /// cannot start the port's thread
    #[error("cannot start the port's thread")]
    Thread(#[source] std::io::Error),
}

/// Per-port counters. `rx` is what the port delivered into the switch, `tx` what the
/// switch sent out of the port.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames received from the port and accepted.
    pub rx_frames: AtomicU64,
    /// Bytes of those.
    pub rx_bytes: AtomicU64,
    /// Frames sent out of the port.
    pub tx_frames: AtomicU64,
    /// Bytes of those.
    pub tx_bytes: AtomicU64,
    /// Dropped on ingress: shorter than an Ethernet header or multicast source.
    pub drop_malformed: AtomicU64,
    /// Dropped: larger than the port MTU (ingress or egress).
    pub drop_mtu: AtomicU64,
    /// Dropped on egress: the port's queue was full.
    pub drop_full: AtomicU64,
    /// Dropped on egress: the port had no peer.
    pub drop_down: AtomicU64,
    /// Dropped on egress: I/O error.
    pub drop_io: AtomicU64,
    /// Dropped on ingress: destination learned on the same port (hairpin).
    pub drop_hairpin: AtomicU64,
    /// Dropped on egress: an offloaded frame that could not be finished in software.
    pub drop_offload: AtomicU64,
    /// Times the port's receive thread panicked and was restarted.
    pub restarts: AtomicU64,
    /// Dropped by the guard: a source MAC not the port's (or a service's MAC).
    pub drop_spoofed_mac: AtomicU64,
    /// Dropped by the guard: an IPv4 source the port may not use.
    pub drop_spoofed_ip: AtomicU64,
    /// Dropped by the guard: ARP claiming another MAC or address.
    pub drop_spoofed_arp: AtomicU64,
    /// Dropped by the guard: a DHCP message with another MAC as `chaddr`.
    pub drop_spoofed_dhcp: AtomicU64,
    /// Dropped on ingress: a new source MAC on a port at `max_macs_per_port`.
    pub drop_mac_limit: AtomicU64,
    /// Dropped on ingress: a TCP super-frame asking for too much work (segment size
    /// below [`crate::offload::MIN_GSO_SIZE`] or more than
    /// [`crate::offload::MAX_GSO_SEGS`] segments).
    pub drop_gso: AtomicU64,
}

/// A snapshot of [`Counters`], as the control API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// See [`Counters`].
    pub rx_frames: u64,
    /// See [`Counters`].
    pub rx_bytes: u64,
    /// See [`Counters`].
    pub tx_frames: u64,
    /// See [`Counters`].
    pub tx_bytes: u64,
    /// See [`Counters`].
    pub drop_malformed: u64,
    /// See [`Counters`].
    pub drop_mtu: u64,
    /// See [`Counters`].
    pub drop_full: u64,
    /// See [`Counters`].
    pub drop_down: u64,
    /// See [`Counters`].
    pub drop_io: u64,
    /// See [`Counters`].
    pub drop_hairpin: u64,
    /// See [`Counters`].
    pub drop_offload: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub restarts: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_mac: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_ip: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_arp: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_dhcp: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_mac_limit: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_gso: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            rx_frames: r(&self.rx_frames),
            rx_bytes: r(&self.rx_bytes),
            tx_frames: r(&self.tx_frames),
            tx_bytes: r(&self.tx_bytes),
            drop_malformed: r(&self.drop_malformed),
            drop_mtu: r(&self.drop_mtu),
            drop_full: r(&self.drop_full),
            drop_down: r(&self.drop_down),
            drop_io: r(&self.drop_io),
            drop_hairpin: r(&self.drop_hairpin),
            drop_offload: r(&self.drop_offload),
            restarts: r(&self.restarts),
            drop_spoofed_mac: r(&self.drop_spoofed_mac),
            drop_spoofed_ip: r(&self.drop_spoofed_ip),
            drop_spoofed_arp: r(&self.drop_spoofed_arp),
            drop_spoofed_dhcp: r(&self.drop_spoofed_dhcp),
            drop_mac_limit: r(&self.drop_mac_limit),
            drop_gso: r(&self.drop_gso),
        }
    }

    /// Counts a drop by the guard.
    fn guard_drop(&self, why: GuardDrop) {
        let c = match why {
            GuardDrop::SpoofedMac => &self.drop_spoofed_mac,
            GuardDrop::SpoofedIp => &self.drop_spoofed_ip,
            GuardDrop::SpoofedArp => &self.drop_spoofed_arp,
            GuardDrop::SpoofedDhcp => &self.drop_spoofed_dhcp,
            GuardDrop::MacLimit => &self.drop_mac_limit,
        };
        inc(c, 1);
    }
}

fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// A port as the switch sees it.
pub struct Port {
    /// Id, unique in the network.
    pub id: PortId,
    /// Name, unique in the network.
    pub name: String,
    /// What the port is.
    pub kind: PortClass,
    /// Largest payload (frame minus Ethernet header, minus a VLAN tag if any).
    pub mtu: usize,
    /// Counters.
    pub counters: Counters,
    /// Whether the port takes virtio-net headers.
    pub vnet: bool,
    /// The port guard (off on everything but a guarded guest port).
    pub guard: PortGuard,
    tx: Box<dyn PortTx>,
}

impl Port {
    fn account(&self, r: Result<(), TxError>, len: usize) {
        match r {
            Ok(()) => {
                inc(&self.counters.tx_frames, 1);
                inc(&self.counters.tx_bytes, len as u64);
            }
            Err(TxError::Full) => inc(&self.counters.drop_full, 1),
            Err(TxError::Down) => inc(&self.counters.drop_down, 1),
            Err(TxError::Io(_)) => inc(&self.counters.drop_io, 1),
        }
    }

    fn send(&self, frame: &[u8], hdr: Option<&VnetHdr>, remote: Option<Ipv4Addr>) {
        if frame_payload(frame, hdr) > self.mtu {
            inc(&self.counters.drop_mtu, 1);
            return;
        }
        if self.vnet {
            let h = hdr.map(|h| h.to_bytes()).unwrap_or([0; VNET_HDR_LEN]);
            self.account(self.tx.send_vnet_to(&h, frame, remote), frame.len());
            return;
        }
        match hdr.filter(|h| !h.is_plain()) {
            None => self.account(self.tx.send_to(frame, remote), frame.len()),
            Some(h) => SCRATCH.with(|s| {
                let mut scratch = s.borrow_mut();
                let r = finish(h, frame, &mut scratch, &mut |seg| {
                    self.account(self.tx.send_to(seg, remote), seg.len())
                });
                if r.is_err() {
                    inc(&self.counters.drop_offload, 1);
                }
            }),
        }
    }
}

/// Payload size that counts against an MTU: for a TCP super-frame, its largest
/// segment's.
fn frame_payload(frame: &[u8], hdr: Option<&VnetHdr>) -> usize {
    match hdr {
        Some(h) if h.is_gso() => segment_payload_len(h, frame),
        _ => payload_len(frame),
    }
}

/// Payload length of a frame, not counting one 802.1Q tag.
fn payload_len(frame: &[u8]) -> usize {
    let base = frame.len().saturating_sub(ETH_HLEN);
    match frame.get(12..14) {
        Some([0x81, 0x00]) => base.saturating_sub(4),
        _ => base,
    }
}

/// A learned MAC, as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MacEntry {
    /// The MAC.
    pub mac: String,
    /// The port name.
    pub port: String,
    /// Seconds since last seen.
    pub age_secs: u64,
    /// The remote VTEP the MAC lives behind (vxlan ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// A port, as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortInfo {
    /// Name.
    pub name: String,
    /// What the port is (serialized as "tap", "vm", "stream", "host", "uplink" or
    /// "service").
    pub kind: PortClass,
    /// MTU.
    pub mtu: usize,
    /// The port guard in force: "clean" (guarded) or "off".
    #[serde(default)]
    pub guard: Guard,
    /// The MAC a guarded port is locked to, if any yet.
    #[serde(default)]
    pub locked_mac: Option<String>,
    /// Counters.
    pub counters: CountersSnapshot,
}

/// One network: a learning switch.
pub struct Network {
    name: String,
    mtu: usize,
    ports: RwLock<Vec<Arc<Port>>>,
    fdb: Mutex<Fdb>,
    next_id: AtomicU64,
    /// Every port its own segment with the services (NAT `isolated = true`).
    isolated: AtomicBool,
    /// MAC ageing (also how long a learned port lock outlives its MAC's silence).
    ageing: Duration,
    /// Whether guest ports without their own setting are guarded.
    guard_default: AtomicBool,
    /// Most MACs an unguarded port may hold in the table.
    max_per_port: AtomicUsize,
    /// Who may use which address (networks with DHCP or NAT).
    ip_guard: OnceLock<Arc<IpGuard>>,
}

/// An in-process service attached to a network as a port: frames the service
/// sends on `to_switch` enter the switch, frames the switch forwards to the service
/// arrive on `from_switch`. Both are bounded; when `from_switch` is full the
/// switch drops the frame and counts it (`drop_full`) on the service's port. The
/// port goes away when the service drops `to_switch`.
pub struct ServicePort {
    /// Frames into the switch.
    pub to_switch: mpsc::Sender<Bytes>,
    /// Frames out of the switch.
    pub from_switch: mpsc::Receiver<Bytes>,
}

/// The ingress side of a direct service port: switches a frame on the caller's
/// thread. The port leaves the switch when removed by name (the service then sees
/// its `from_switch` channel close).
pub struct SwitchIn {
    net: Arc<Network>,
    port: Arc<Port>,
}

impl SwitchIn {
    /// The service's port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// Switches one frame from the service.
    pub fn send(&self, frame: &[u8]) {
        self.net.ingress(&self.port, frame);
    }

    /// Switches one offloaded frame (a TCP super-frame with its virtio-net header):
    /// vnet ports take it as is, the others get it segmented in software.
    pub fn send_vnet(&self, hdr: &VnetHdr, frame: &[u8]) {
        self.net.ingress_vnet(&self.port, hdr, frame);
    }
}

/// Most bytes waiting in the channel from the switch to one service, besides its
/// bound in frames: a channel of 4096 frames would otherwise hold 4096 TCP
/// super-frames of 64 KiB (see [`crate::budget`]).
pub const SERVICE_QUEUE_BYTES: usize = 16 << 20;

/// Channel transmit of a direct service that takes offloaded frames: each message
/// is the virtio-net header followed by the frame.
struct VnetChannelTx(mpsc::Sender<Bytes>, Arc<ByteBudget>);

impl VnetTx for VnetChannelTx {
    fn send_with_hdr(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let msg = self.1.charge(&[hdr, frame]).ok_or(TxError::Full)?;
        channel_send(&self.0, msg)
    }
}

struct ChannelTx(mpsc::Sender<Bytes>, Arc<ByteBudget>);

impl PortTx for ChannelTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        let msg = self.1.charge(&[frame]).ok_or(TxError::Full)?;
        channel_send(&self.0, msg)
    }
}

/// A service's channel takes a message now or the frame is dropped: full, or the
/// service has gone.
fn channel_send(tx: &mpsc::Sender<Bytes>, msg: Bytes) -> Result<(), TxError> {
    tx.try_send(msg).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => TxError::Full,
        mpsc::error::TrySendError::Closed(_) => TxError::Down,
    })
}

impl Network {
    /// A network with no port.
    pub fn new(name: &str, mtu: u32, max_macs: usize, ageing: Duration) -> Arc<Self> {
        Arc::new(Network {
            name: name.to_string(),
            mtu: mtu as usize,
            ports: RwLock::new(Vec::new()),
            fdb: Mutex::new(Fdb::new(max_macs, ageing)),
            next_id: AtomicU64::new(1),
            isolated: AtomicBool::new(false),
            ageing,
            guard_default: AtomicBool::new(false),
            max_per_port: AtomicUsize::new(usize::MAX),
            ip_guard: OnceLock::new(),
        })
    }

    /// The guard of guest ports without a `guard` of their own (a new network's is
    /// off; netd sets the network's `guard`, default clean).
    pub fn set_guard_default(&self, g: Guard) {
        self.guard_default
            .store(g == Guard::Clean, Ordering::Relaxed);
    }

    /// The most MACs an unguarded port may hold in the table.
    pub fn set_max_macs_per_port(&self, n: usize) {
        self.max_per_port.store(n.max(1), Ordering::Relaxed);
    }

    /// Turns on the IPv4 source checks of guarded ports with `g` (once; later calls
    /// are ignored).
    pub fn set_ip_guard(&self, g: Arc<IpGuard>) {
        let _ = self.ip_guard.set(g);
    }

    /// The network's address bindings, if it checks IPv4 sources.
    pub fn ip_guard(&self) -> Option<&Arc<IpGuard>> {
        self.ip_guard.get()
    }

    /// Pins `mac` (a service's own MAC) to the port `port`: frames from it on any
    /// other port are dropped, and it never ages or moves.
    pub fn pin_mac(&self, port: &str, mac: [u8; 6]) -> Result<(), SwitchError> {
        let p = self
            .port(port)
            .ok_or_else(|| SwitchError::NoSuchPort(port.to_string()))?;
        self.fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pin(mac, p.id, Instant::now());
        Ok(())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its MTU.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Adds a port with the network's MTU and guard; returns it.
    pub fn add_port(
        &self,
        name: &str,
        kind: PortClass,
        tx: Box<dyn PortTx>,
    ) -> Result<Arc<Port>, SwitchError> {
        self.add_port_with(name, kind, tx, None, None)
    }

    /// Adds a port with the network's MTU; a guest port (`tap`, `vm`, `stream`) is
    /// guarded per `guard` (else the network's default) and locked to `mac` if
    /// given. Other kinds are never guarded.
    pub fn add_port_with(
        &self,
        name: &str,
        kind: PortClass,
        tx: Box<dyn PortTx>,
        guard: Option<Guard>,
        mac: Option<[u8; 6]>,
    ) -> Result<Arc<Port>, SwitchError> {
        let guest = matches!(kind, PortClass::Tap | PortClass::Vm | PortClass::Stream);
        let on = guest
            && match guard {
                Some(g) => g == Guard::Clean,
                None => self.guard_default.load(Ordering::Relaxed),
            };
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        if ports.iter().any(|p| p.name == name) {
            return Err(SwitchError::PortExists(name.to_string()));
        }
        let port = Arc::new(Port {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            kind,
            mtu: self.mtu,
            counters: Counters::default(),
            vnet: tx.vnet(),
            guard: PortGuard::new(on, mac.filter(|_| on)),
            tx,
        });
        ports.push(port.clone());
        Ok(port)
    }

    /// Removes a port and its learned MACs.
    pub fn remove_port(&self, name: &str) -> Result<Arc<Port>, SwitchError> {
        let port = {
            let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
            let i = ports
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| SwitchError::NoSuchPort(name.to_string()))?;
            ports.remove(i)
        };
        self.fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_port(port.id);
        Ok(port)
    }

    fn remove_port_id(&self, id: PortId) {
        self.ports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p.id != id);
        self.fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_port(id);
    }

    /// Isolation: when on, frames from a port other than a service go only to the
    /// services (the NAT router, DHCP), never to another port: each VM is alone on
    /// its segment with the network's services.
    pub fn set_isolated(&self, on: bool) {
        self.isolated.store(on, Ordering::Relaxed);
    }

    /// Attaches an in-process service (DHCP server, NAT router) as a port named
    /// `name`, with channels of `capacity` frames each way.
    pub fn attach_service(
        self: &Arc<Self>,
        name: &str,
        capacity: usize,
    ) -> Result<ServicePort, SwitchError> {
        let (to_service_tx, from_switch) = mpsc::channel(capacity.max(1));
        let (to_switch, mut from_service) = mpsc::channel::<Bytes>(capacity.max(1));
        let port = self.add_port(
            name,
            PortClass::Service,
            Box::new(ChannelTx(
                to_service_tx,
                ByteBudget::new(SERVICE_QUEUE_BYTES),
            )),
        )?;
        let net = self.clone();
        let id = port.id;
        std::thread::Builder::new()
            .name(format!("svc-{name}"))
            .spawn(move || {
                while let Some(frame) = from_service.blocking_recv() {
                    net.ingress(&port, &frame);
                }
                net.remove_port_id(id);
            })
            .map_err(SwitchError::Thread)?;
        Ok(ServicePort {
            to_switch,
            from_switch,
        })
    }

    /// Like [`Network::attach_service`], but the service's frames enter the switch
    /// on the service's own thread (the returned [`SwitchIn`] switches a frame when
    /// called) instead of through a channel and a forwarding thread: one thread
    /// hand-off less per frame, for a busy service such as the NAT router. With
    /// `vnet`, every frame the service receives starts with its virtio-net header
    /// (offloaded frames reach it unfinished, as they reach a vnet TAP).
    pub fn attach_service_direct(
        self: &Arc<Self>,
        name: &str,
        capacity: usize,
        vnet: bool,
    ) -> Result<(SwitchIn, mpsc::Receiver<Bytes>), SwitchError> {
        let (to_service_tx, from_switch) = mpsc::channel(capacity.max(1));
        let tx: Box<dyn PortTx> = if vnet {
            Box::new(VnetChannelTx(
                to_service_tx,
                ByteBudget::new(SERVICE_QUEUE_BYTES),
            ))
        } else {
            Box::new(ChannelTx(
                to_service_tx,
                ByteBudget::new(SERVICE_QUEUE_BYTES),
            ))
        };
        let port = self.add_port(name, PortClass::Service, tx)?;
        Ok((
            SwitchIn {
                net: self.clone(),
                port,
            },
            from_switch,
        ))
    }

    /// The port named `name`.
    pub fn port(&self, name: &str) -> Option<Arc<Port>> {
        self.ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    /// Every port, with counters.
    pub fn port_infos(&self) -> Vec<PortInfo> {
        // Not under the ports lock: a port's guard state is locked while the guard
        // reads the port list.
        let ports: Vec<Arc<Port>> = self.ports.read().unwrap_or_else(|e| e.into_inner()).clone();
        ports
            .iter()
            .map(|p| PortInfo {
                name: p.name.clone(),
                kind: p.kind,
                mtu: p.mtu,
                guard: if p.guard.on { Guard::Clean } else { Guard::Off },
                locked_mac: p.guard.locked_mac().map(|m| crate::config::fmt_mac(&m)),
                counters: p.counters.snapshot(),
            })
            .collect()
    }

    /// The learned MAC table.
    pub fn mac_table(&self) -> Vec<MacEntry> {
        let now = Instant::now();
        let (entries, remotes): (Vec<_>, Vec<_>) = {
            let fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            let entries = fdb.entries(now);
            let remotes = entries.iter().map(|(m, _, _)| fdb.remote_of(m)).collect();
            (entries, remotes)
        };
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        entries
            .into_iter()
            .zip(remotes)
            .map(|((mac, id, age), remote)| MacEntry {
                remote: remote.map(|r| r.to_string()),
                mac: crate::config::fmt_mac(&mac),
                port: ports
                    .iter()
                    .find(|p| p.id == id)
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
                age_secs: age.as_secs(),
            })
            .collect()
    }

    /// Switches one complete frame that arrived on `from`. See the module doc.
    pub fn ingress(&self, from: &Port, frame: &[u8]) {
        self.ingress_with(from, frame, None)
    }

    /// Switches one frame (offloaded with `hdr`, if given) that a vxlan port
    /// `from` received from `remote`: the source MAC is learned behind that remote.
    pub fn ingress_remote(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        remote: Option<Ipv4Addr>,
    ) {
        self.ingress_inner(from, frame, hdr, None, remote);
    }

    /// Forgets the MACs learned on `port` behind `remote` (a remote taken off a
    /// vxlan port's flood list).
    pub fn flush_remote(&self, port: PortId, remote: Ipv4Addr) {
        self.fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_remote(port, remote);
    }

    /// Switches one frame that arrived on `from` with a virtio-net header.
    pub fn ingress_vnet(&self, from: &Port, hdr: &VnetHdr, frame: &[u8]) {
        self.ingress_with(from, frame, Some(hdr))
    }

    /// Like [`Network::ingress`] / [`Network::ingress_vnet`] (every check, learning
    /// and counter the same), except that a frame the switch would send to `local`
    /// alone is not sent: it is counted as sent on `local` and `true` says the caller
    /// (the thread that owns `local`, which read the frame itself) takes it as is. Any
    /// other frame is switched as usual and the answer is `false`.
    pub fn ingress_local(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        local: &Port,
    ) -> bool {
        self.ingress_inner(from, frame, hdr, Some(local), None)
    }

    fn ingress_with(&self, from: &Port, frame: &[u8], hdr: Option<&VnetHdr>) {
        self.ingress_inner(from, frame, hdr, None, None);
    }

    fn ingress_inner(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        local: Option<&Port>,
        remote: Option<Ipv4Addr>,
    ) -> bool {
        let (dst, src) = match (frame.get(0..6), frame.get(6..12)) {
            (Some(d), Some(s)) if frame.len() >= ETH_HLEN => {
                let mut dst = [0u8; 6];
                let mut src = [0u8; 6];
                dst.copy_from_slice(d);
                src.copy_from_slice(s);
                (dst, src)
            }
            _ => {
                inc(&from.counters.drop_malformed, 1);
                return false;
            }
        };
        if src[0] & 1 != 0 {
            inc(&from.counters.drop_malformed, 1);
            return false;
        }
        if frame_payload(frame, hdr) > from.mtu {
            inc(&from.counters.drop_mtu, 1);
            return false;
        }
        let now = Instant::now();
        if from.guard.on {
            if let Err(why) = self.guard_check(from, src, frame, now) {
                from.counters.guard_drop(why);
                return false;
            }
        }
        let target = {
            let mut fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            // A guarded port is locked to one MAC already.
            let cap = if from.guard.on {
                usize::MAX
            } else {
                self.max_per_port.load(Ordering::Relaxed)
            };
            match fdb.learn_remote(src, from.id, remote, now, cap) {
                Learn::Learned | Learn::TableFull => {}
                // A service may answer from another service's MAC (the DHCP server
                // replying for the router): forwarded, not learned.
                Learn::Pinned if from.kind == PortClass::Service => {}
                Learn::Pinned => {
                    from.counters.guard_drop(GuardDrop::SpoofedMac);
                    return false;
                }
                Learn::PortFull => {
                    from.counters.guard_drop(GuardDrop::MacLimit);
                    return false;
                }
            }
            if dst[0] & 1 == 0 {
                fdb.lookup_remote(&dst, now)
            } else {
                None
            }
        };
        inc(&from.counters.rx_frames, 1);
        inc(&from.counters.rx_bytes, frame.len() as u64);
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        let isolated = self.isolated.load(Ordering::Relaxed) && from.kind != PortClass::Service;
        let allowed = |p: &Port| !isolated || p.kind == PortClass::Service;
        match target {
            Some((id, _)) if id == from.id => inc(&from.counters.drop_hairpin, 1),
            Some((id, to)) => {
                if let Some(p) = ports.iter().find(|p| p.id == id && allowed(p)) {
                    match local {
                        // Same MTU check and counters as `Port::send`, no copy.
                        Some(l) if l.id == id => {
                            if frame_payload(frame, hdr) > l.mtu {
                                inc(&l.counters.drop_mtu, 1);
                                return false;
                            }
                            l.account(Ok(()), frame.len());
                            return true;
                        }
                        _ => p.send(frame, hdr, to),
                    }
                }
            }
            None => {
                for p in ports.iter().filter(|p| p.id != from.id && allowed(p)) {
                    p.send(frame, hdr, None);
                }
            }
        }
        false
    }

    /// The port guard of a guarded port (see [`guard`]).
    fn guard_check(
        &self,
        from: &Port,
        src: [u8; 6],
        frame: &[u8],
        now: Instant,
    ) -> Result<(), GuardDrop> {
        let free = || self.mac_free(src, from.id, now);
        if !from.guard.mac_ok(src, now, self.ageing, free) {
            return Err(GuardDrop::SpoofedMac);
        }
        guard::check(
            frame,
            src,
            &from.guard,
            self.ip_guard.get().map(|g| &**g),
            now,
        )
    }

    /// Whether a guarded port `id` may lock `mac`: no other port has it (learned
    /// and live, pinned, or configured).
    fn mac_free(&self, mac: [u8; 6], id: PortId, now: Instant) -> bool {
        {
            let fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            if fdb.pinned_elsewhere(&mac, id) || fdb.lookup(&mac, now).is_some_and(|p| p != id) {
                return false;
            }
        }
        !self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|p| p.id != id && p.guard.configured == Some(mac))
    }
}

#[cfg(test)]
mod tests;
