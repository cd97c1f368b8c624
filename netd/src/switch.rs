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
//!
//! This file holds the [`Network`] itself (its ports, its table, the control API's
//! views of them); the rest is split along the steps above:
//! - `switch/port.rs`: what a port is and its transmit side, step 5 ([`Port`], [`PortTx`]);
//! - `switch/counters.rs`: the per-port counters, by reason;
//! - `switch/ingress.rs`: steps 1 to 4, the switching path;
//! - `switch/guard.rs`: the port guard of step 2; `switch/fdb.rs`: the MAC table of
//!   step 3;
//! - `switch/service.rs`: in-process services attached as ports ([`ServicePort`],
//!   [`SwitchIn`]);
//! - `switch/capture.rs`: packet capture (`netd capture`), recorded on the
//!   switching path when a capture runs ([`Capture`]).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod capture;
mod counters;
mod fdb;
pub mod guard;
pub mod guard6;
mod ingress;
mod port;
mod service;

pub use self::capture::{
    now_ns, Capture, CapturedPort, Record, CAPTURE_QUEUE_BYTES, CAPTURE_QUEUE_FRAMES, MAX_CAPTURES,
};
pub use self::counters::{Counters, CountersSnapshot};
pub use self::fdb::{Fdb, Learn};
pub use self::guard::{Guard, GuardDrop, IpGuard, PortGuard};
pub use self::port::{Port, PortClass, PortTx, TxError, VnetTx};
pub use self::service::{ServicePort, SwitchIn, SERVICE_QUEUE_BYTES};

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;

/// Identifies a port inside its network.
pub type PortId = u64;

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
    /// a snaplen out of range
    #[error("snaplen {0} is out of range: expected 1 to 262144")]
    BadSnaplen(u32),
    /// as many captures as allowed run on the network
    #[error("{0} captures already run on this network (the most at once)")]
    TooManyCaptures(usize),
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
    ip6_guard: OnceLock<Arc<guard6::Ip6Guard>>,
    /// The captures running on the network (`netd capture`).
    captures: capture::Taps,
}

impl Network {
    /// Ends every capture running on the network (it is being removed).
    pub fn end_captures(&self) {
        self.captures.end_all();
    }

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
            ip6_guard: OnceLock::new(),
            captures: capture::Taps::default(),
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

    /// Sets the network's IPv6 address guard (once: a network with `subnet6`).
    pub fn set_ip6_guard(&self, g: Arc<guard6::Ip6Guard>) {
        let _ = self.ip6_guard.set(g);
    }

    /// The network's IPv6 address guard, if it has one.
    pub fn ip6_guard(&self) -> Option<&Arc<guard6::Ip6Guard>> {
        self.ip6_guard.get()
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

    /// Forgets the MACs learned on `port` behind `remote` (a remote taken off a
    /// vxlan port's flood list).
    pub fn flush_remote(&self, port: PortId, remote: Ipv4Addr) {
        self.fdb
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_remote(port, remote);
    }

    /// Isolation: when on, frames from a port other than a service go only to the
    /// services (the NAT router, DHCP), never to another port: each VM is alone on
    /// its segment with the network's services.
    pub fn set_isolated(&self, on: bool) {
        self.isolated.store(on, Ordering::Relaxed);
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
}

#[cfg(test)]
mod tests;
