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
//! 2. learn the source MAC on the ingress port (bounded table; a full table stops
//!    learning, it never evicts a live entry, so a MAC flood cannot push out hosts);
//! 3. forward: a known unicast destination goes to its port only; broadcast,
//!    multicast and unknown unicast are flooded to every other port of the network;
//! 4. each egress port checks its MTU (for a TCP super-frame: its segments') and
//!    sends: with the frame's virtio-net header to ports that take one (TAP, vm),
//!    finished in software ([`crate::offload`]) to those that do not (stream,
//!    services); a full or absent peer is a counted drop on the egress port.
//!
//! A frame can only ever reach ports of the network it entered: networks share no
//! table and no port list. Entries age out after `mac_ageing` seconds without a
//! frame from that MAC; a deleted port takes its entries with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::offload::{finish, segment_payload_len, VnetHdr, VNET_HDR_LEN};

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;

/// Identifies a port inside its network.
pub type PortId = u64;

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
}

/// A snapshot of [`Counters`], as the control API shows it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
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
        }
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
    /// Kind, for display ("tap", "vm", "stream", "service", "host").
    pub kind: String,
    /// Largest payload (frame minus Ethernet header, minus a VLAN tag if any).
    pub mtu: usize,
    /// Counters.
    pub counters: Counters,
    /// Whether the port takes virtio-net headers.
    pub vnet: bool,
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

    fn send(&self, frame: &[u8], hdr: Option<&VnetHdr>) {
        if frame_payload(frame, hdr) > self.mtu {
            inc(&self.counters.drop_mtu, 1);
            return;
        }
        if self.vnet {
            let h = hdr.map(|h| h.to_bytes()).unwrap_or([0; VNET_HDR_LEN]);
            self.account(self.tx.send_vnet(&h, frame), frame.len());
            return;
        }
        match hdr.filter(|h| !h.is_plain()) {
            None => self.account(self.tx.send(frame), frame.len()),
            Some(h) => SCRATCH.with(|s| {
                let mut scratch = s.borrow_mut();
                let r = finish(h, frame, &mut scratch, &mut |seg| {
                    self.account(self.tx.send(seg), seg.len())
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

/// One learned MAC.
#[derive(Debug, Clone, Copy)]
struct FdbEntry {
    port: PortId,
    seen: Instant,
}

/// The MAC table: bounded, with ageing.
#[derive(Debug)]
pub struct Fdb {
    map: HashMap<[u8; 6], FdbEntry>,
    max: usize,
    ageing: Duration,
    /// Learn attempts refused because the table was full of live entries.
    pub full_refusals: u64,
    /// Sweeps of the whole table for aged-out entries (each costs O(table)).
    pub sweeps: u64,
    last_sweep: Option<Instant>,
}

/// Least time between two sweeps of a full table. A flood of new source MACs into a
/// full table would otherwise cost a walk of the whole table (up to `max_macs`, a
/// million) per frame, under the lock every ingress takes; this way a freed slot
/// is reused at most this late.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Fdb {
    /// An empty table holding at most `max` entries, forgetting after `ageing`.
    pub fn new(max: usize, ageing: Duration) -> Self {
        Fdb {
            map: HashMap::new(),
            max,
            ageing,
            full_refusals: 0,
            sweeps: 0,
            last_sweep: None,
        }
    }

    /// Records that `mac` was seen on `port` at `now`.
    pub fn learn(&mut self, mac: [u8; 6], port: PortId, now: Instant) {
        if let Some(e) = self.map.get_mut(&mac) {
            e.port = port;
            e.seen = now;
            return;
        }
        if self.map.len() >= self.max {
            let due = self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL);
            if due {
                let ageing = self.ageing;
                self.map.retain(|_, e| now.duration_since(e.seen) < ageing);
                self.sweeps += 1;
                self.last_sweep = Some(now);
            }
            if self.map.len() >= self.max {
                self.full_refusals += 1;
                return;
            }
        }
        self.map.insert(mac, FdbEntry { port, seen: now });
    }

    /// The port `mac` was last seen on, unless aged out.
    pub fn lookup(&self, mac: &[u8; 6], now: Instant) -> Option<PortId> {
        self.map
            .get(mac)
            .filter(|e| now.duration_since(e.seen) < self.ageing)
            .map(|e| e.port)
    }

    /// Forgets every entry of `port`.
    pub fn flush_port(&mut self, port: PortId) {
        self.map.retain(|_, e| e.port != port);
    }

    /// Live entries: (mac, port, age).
    pub fn entries(&self, now: Instant) -> Vec<([u8; 6], PortId, Duration)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, e)| now.duration_since(e.seen) < self.ageing)
            .map(|(m, e)| (*m, e.port, now.duration_since(e.seen)))
            .collect();
        v.sort_by_key(|(m, _, _)| *m);
        v
    }

    /// Number of stored entries (live or not yet swept).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A learned MAC, as the control API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MacEntry {
    /// The MAC.
    pub mac: String,
    /// The port name.
    pub port: String,
    /// Seconds since last seen.
    pub age_secs: u64,
}

/// A port, as the control API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PortInfo {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// MTU.
    pub mtu: usize,
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

/// Channel transmit of a direct service that takes offloaded frames: each message
/// is the virtio-net header followed by the frame.
struct VnetChannelTx(mpsc::Sender<Bytes>);

impl PortTx for VnetChannelTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.send_vnet(&[0; VNET_HDR_LEN], frame)
    }

    fn vnet(&self) -> bool {
        true
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let mut b = Vec::with_capacity(VNET_HDR_LEN + frame.len());
        b.extend_from_slice(hdr);
        b.extend_from_slice(frame);
        match self.0.try_send(Bytes::from(b)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(TxError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TxError::Down),
        }
    }
}

struct ChannelTx(mpsc::Sender<Bytes>);

impl PortTx for ChannelTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        match self.0.try_send(Bytes::copy_from_slice(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(TxError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TxError::Down),
        }
    }
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
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its MTU.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Adds a port with the network's MTU; returns it.
    pub fn add_port(
        &self,
        name: &str,
        kind: &str,
        tx: Box<dyn PortTx>,
    ) -> Result<Arc<Port>, SwitchError> {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        if ports.iter().any(|p| p.name == name) {
            return Err(SwitchError::PortExists(name.to_string()));
        }
        let port = Arc::new(Port {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            kind: kind.to_string(),
            mtu: self.mtu,
            counters: Counters::default(),
            vnet: tx.vnet(),
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
        let port = self.add_port(name, "service", Box::new(ChannelTx(to_service_tx)))?;
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
            Box::new(VnetChannelTx(to_service_tx))
        } else {
            Box::new(ChannelTx(to_service_tx))
        };
        let port = self.add_port(name, "service", tx)?;
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
        self.ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| PortInfo {
                name: p.name.clone(),
                kind: p.kind.clone(),
                mtu: p.mtu,
                counters: p.counters.snapshot(),
            })
            .collect()
    }

    /// The learned MAC table.
    pub fn mac_table(&self) -> Vec<MacEntry> {
        let now = Instant::now();
        let entries = self
            .fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries(now);
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        entries
            .into_iter()
            .map(|(mac, id, age)| MacEntry {
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
        self.ingress_inner(from, frame, hdr, Some(local))
    }

    fn ingress_with(&self, from: &Port, frame: &[u8], hdr: Option<&VnetHdr>) {
        self.ingress_inner(from, frame, hdr, None);
    }

    fn ingress_inner(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        local: Option<&Port>,
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
        inc(&from.counters.rx_frames, 1);
        inc(&from.counters.rx_bytes, frame.len() as u64);
        let now = Instant::now();
        let target = {
            let mut fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            fdb.learn(src, from.id, now);
            if dst[0] & 1 == 0 {
                fdb.lookup(&dst, now)
            } else {
                None
            }
        };
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        let isolated = self.isolated.load(Ordering::Relaxed) && from.kind != "service";
        let allowed = |p: &Port| !isolated || p.kind == "service";
        match target {
            Some(id) if id == from.id => inc(&from.counters.drop_hairpin, 1),
            Some(id) => {
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
                        _ => p.send(frame, hdr),
                    }
                }
            }
            None => {
                for p in ports.iter().filter(|p| p.id != from.id && allowed(p)) {
                    p.send(frame, hdr);
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Sink(StdMutex<Vec<Vec<u8>>>);
    struct SinkTx(Arc<Sink>);
    impl PortTx for SinkTx {
        fn send(&self, frame: &[u8]) -> Result<(), TxError> {
            self.0 .0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(ETH_HLEN)];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const BCAST: [u8; 6] = [0xff; 6];

    fn net3() -> (Arc<Network>, Vec<Arc<Port>>, Vec<Arc<Sink>>) {
        let net = Network::new("n", 1500, 16, Duration::from_secs(300));
        let mut ports = vec![];
        let mut sinks = vec![];
        for i in 0..3 {
            let s = Arc::new(Sink::default());
            ports.push(
                net.add_port(&format!("p{i}"), "test", Box::new(SinkTx(s.clone())))
                    .unwrap(),
            );
            sinks.push(s);
        }
        (net, ports, sinks)
    }

    fn count(s: &Sink) -> usize {
        s.0.lock().unwrap().len()
    }

    #[test]
    fn floods_unknown_then_forwards_learned() {
        let (net, p, s) = net3();
        net.ingress(&p[0], &frame(B, A, 60));
        assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (0, 1, 1));
        net.ingress(&p[1], &frame(A, B, 60));
        assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 1, 1));
        net.ingress(&p[0], &frame(B, A, 60));
        assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 2, 1));
        net.ingress(&p[0], &frame(BCAST, A, 60));
        assert_eq!((count(&s[0]), count(&s[1]), count(&s[2])), (1, 3, 2));
        let c = p[0].counters.snapshot();
        assert_eq!(c.rx_frames, 3);
        assert_eq!(p[1].counters.snapshot().tx_frames, 3);
        let table = net.mac_table();
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn malformed_and_mtu_are_counted_not_forwarded() {
        let (net, p, s) = net3();
        net.ingress(&p[0], &[1, 2, 3]);
        net.ingress(&p[0], &[]);
        net.ingress(&p[0], &frame(B, BCAST, 60));
        net.ingress(&p[0], &frame(B, A, 1515));
        net.ingress(&p[0], &frame(B, A, 1514));
        let c = p[0].counters.snapshot();
        assert_eq!(c.drop_malformed, 3);
        assert_eq!(c.drop_mtu, 1);
        assert_eq!(c.rx_frames, 1);
        assert_eq!(count(&s[1]), 1);
    }

    #[test]
    fn table_is_bounded_and_ages() {
        let mut fdb = Fdb::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        fdb.learn([2, 0, 0, 0, 0, 1], 1, t0);
        fdb.learn([2, 0, 0, 0, 0, 2], 1, t0);
        fdb.learn([2, 0, 0, 0, 0, 3], 1, t0);
        assert_eq!(fdb.len(), 2);
        assert_eq!(fdb.full_refusals, 1);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 1], t0), Some(1));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 1], later), None);
        fdb.learn([2, 0, 0, 0, 0, 3], 2, later);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 3], later), Some(2));
        assert_eq!(fdb.len(), 1);
    }

    #[test]
    fn a_mac_flood_into_a_full_table_does_not_sweep_per_frame() {
        let mut fdb = Fdb::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        fdb.learn([2, 0, 0, 0, 0, 1], 1, t0);
        fdb.learn([2, 0, 0, 0, 0, 2], 1, t0);
        for i in 0..1000u16 {
            let b = i.to_be_bytes();
            fdb.learn(
                [2, 1, 0, 0, b[0], b[1]],
                1,
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert_eq!(fdb.full_refusals, 1000);
        assert_eq!(fdb.sweeps, 1);
        // Known MACs still refresh, and after ageing the table takes new ones again.
        fdb.learn([2, 0, 0, 0, 0, 1], 3, t0 + Duration::from_secs(5));
        assert_eq!(
            fdb.lookup(&[2, 0, 0, 0, 0, 1], t0 + Duration::from_secs(5)),
            Some(3)
        );
        let later = t0 + Duration::from_secs(11);
        fdb.learn([2, 0, 0, 0, 0, 9], 2, later);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 9], later), Some(2));
    }

    #[test]
    fn removed_port_forgets_macs_and_hairpin_is_dropped() {
        let (net, p, s) = net3();
        net.ingress(&p[1], &frame(BCAST, B, 60));
        net.ingress(&p[1], &frame(B, A, 60));
        assert_eq!(p[1].counters.snapshot().drop_hairpin, 1);
        net.remove_port("p1").unwrap();
        assert!(net.mac_table().is_empty());
        net.ingress(&p[0], &frame(B, A, 60));
        assert_eq!(count(&s[2]), 2);
        assert!(net.remove_port("p1").is_err());
    }

    #[test]
    fn service_port_moves_frames_both_ways_and_counts_full() {
        let (net, p, s) = net3();
        let mut svc = net.attach_service("svc", 1).unwrap();
        net.ingress(&p[0], &frame(BCAST, A, 60));
        net.ingress(&p[0], &frame(BCAST, A, 60));
        let got = svc.from_switch.try_recv().unwrap();
        assert_eq!(&got[0..6], &BCAST);
        assert_eq!(net.port("svc").unwrap().counters.snapshot().drop_full, 1);
        svc.to_switch
            .blocking_send(Bytes::from(frame(A, B, 60)))
            .unwrap();
        let ok = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            count(&s[0]) == 1
        });
        assert!(ok, "service frame reached the learned port");
        drop(svc);
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            net.port("svc").is_none()
        });
        assert!(
            gone,
            "service port removed when the service drops its sender"
        );
    }
}
