//! The running daemon: networks, their ports and services, the control server,
//! readiness notification and shutdown.
//!
//! Theory of operation. [`Daemon::start`] builds every network of the validated
//! config: the switch, the host TAP of a hostonly network, the configured ports and
//! the DHCP service. Control requests change that state at runtime under one
//! mutex (port setup may block briefly: it runs on a blocking thread). On shutdown
//! every port is stopped and the TAPs netd created are removed (unless marked
//! persistent); TAPs that existed before netd started are left alone. A hostonly
//! network's host TAP has forwarding off, and a task keeps it off.
//!
//! This file holds the daemon's state (every network's `NetState` under the one
//! mutex) and the runtime port changes; the rest is split by concern:
//! - `daemon/network.rs`: building one network from its spec and stopping it;
//! - `daemon/dispatch.rs`: [`Daemon::handle`], one control request;
//! - `daemon/control.rs`: the control socket and its connections ([`serve_control`]);
//! - `daemon/netops.rs`: networks and reservations changed at runtime, and the start
//!   with the runtime state ([`Daemon::start_persistent`]);
//! - `daemon/runtime.rs`: the runtime state file and which side wins when it and
//!   the config file disagree.
//! - `daemon/capture.rs`: a `capture` request's connection, a pcapng stream.
//! - `daemon/metrics.rs`: what `/metrics` exports ([`Metrics`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use crate::config::{NetworkSpec, PortSpec};
use crate::dhcp::{DhcpServer, LeaseError};
use crate::port::{self as ports, PortError, RunningPort};
use crate::switch::{Network, SwitchError};

mod capture;
mod capture_out;
mod control;
mod dispatch;
mod metrics;
mod netops;
mod network;
pub mod runtime;

use self::network::stop_network;

pub use self::control::serve_control;
pub use self::metrics::Metrics;

/// Daemon errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// network {net}: cannot start port {port}
    #[error("network {net}: cannot start port {port}")]
    Port {
        /// Network.
        net: String,
        /// Port.
        port: String,
        /// Cause.
        #[source]
        source: PortError,
    },
    /// network {0}: cannot load DHCP leases
    #[error("network {0}: cannot load DHCP leases")]
    Leases(String, #[source] LeaseError),
    /// network {0}: cannot attach the DHCP service
    #[error("network {0}: cannot attach the DHCP service")]
    Dhcp(String, #[source] SwitchError),
    /// network {0}: cannot load DHCPv6 leases
    #[error("network {0}: cannot load DHCPv6 leases")]
    Leases6(String, #[source] crate::ipv6::dhcp6::Lease6Error),
    /// network {0}: cannot attach the IPv6 service
    #[error("network {0}: cannot attach the IPv6 service")]
    Ipv6Attach(String, #[source] SwitchError),
    /// cannot create state directory {0}
    #[error("cannot create state directory {0}")]
    StateDir(PathBuf, #[source] std::io::Error),
    /// cannot listen on control socket {0}
    #[error("cannot listen on control socket {0}")]
    Control(PathBuf, #[source] std::io::Error),
    /// no network named {0:?}
    #[error("no network named {0:?}")]
    NoSuchNetwork(String),
    /// no port named {1:?} on network {0}
    #[error("no port named {1:?} on network {0}")]
    NoSuchPort(String, String),
    /// a port named {1:?} already exists on network {0}
    #[error("a port named {1:?} already exists on network {0}")]
    PortExists(String, String),
    /// interface {0} is already used by another port
    #[error("interface {0} is already used by another port")]
    IfnameInUse(String),
    /// invalid port
    #[error("invalid port")]
    BadPort(#[source] crate::config::ConfigError),
    /// network {0}: NAT router
    #[error("network {0}: NAT router")]
    Nat(String, #[source] crate::nat::NatError),
    /// network {0}: cannot attach the NAT router
    #[error("network {0}: cannot attach the NAT router")]
    NatAttach(String, #[source] SwitchError),
    /// network {0} is not a NAT network
    #[error("network {0} is not a NAT network")]
    NotNat(String),
    /// network {0} has no DHCP server
    #[error("network {0} has no DHCP server")]
    NoDhcp(String),
    /// network {0} serves no DNS
    #[error("network {0} serves no DNS (a hostonly or internal network needs `dns`)")]
    NoDns(String),
    /// network {0}: cannot serve DNS
    #[error("network {0}: cannot serve DNS on {1}")]
    Dns(String, std::net::Ipv4Addr, #[source] std::io::Error),
    /// network {0}: cannot attach the DNS responder
    #[error("network {0}: cannot attach the DNS responder")]
    DnsAttach(String, #[source] SwitchError),
    /// port {1:?} of network {0} is not a vxlan port
    #[error("port {1:?} of network {0} is not a vxlan port")]
    NotVxlan(String, String),
    /// network {0}, vxlan port {1:?}
    #[error("network {0}, vxlan port {1:?}")]
    Vxlan(String, String, #[source] crate::port::vxlan::VxlanError),
    /// invalid network
    #[error("invalid network")]
    BadNetwork(#[source] crate::config::ConfigError),
    /// a network named {0:?} already exists
    #[error("a network named {0:?} already exists")]
    NetworkExists(String),
    /// network {0} has guest ports ({1}): remove them first, or use --force
    #[error("network {0} has guest ports ({1}): remove them first, or use --force")]
    NetInUse(String, String),
    /// network {0} comes from the config file {1}: remove it there and restart netd
    #[error("network {0} comes from the config file {1}: remove it there and restart netd")]
    ConfigNetwork(String, PathBuf),
    /// the change is in effect but could not be saved (it is lost at restart)
    #[error("the change is in effect but could not be saved (it is lost at restart)")]
    State(#[source] runtime::StateError),
    /// this netd keeps no runtime state
    #[error("this netd keeps no runtime state")]
    NoRuntimeState,
    /// network {0} has no reservation for {1}
    #[error("network {0} has no reservation for {1}")]
    NoReservation(String, String),
    /// network {0}: {1} is reserved for {2} already
    #[error("network {0}: {1} is reserved for {2} already")]
    ReservedTwice(String, std::net::Ipv4Addr, String),
    /// network {0}: cannot start the capture
    #[error("network {0}: cannot start the capture")]
    Capture(String, #[source] SwitchError),
    /// a capture is a stream: only the control server serves it
    #[error("a capture is served on its control connection as a pcapng stream, not as an answer")]
    CaptureStream,
}

struct NetState {
    spec: NetworkSpec,
    net: Arc<Network>,
    host: Option<RunningPort>,
    /// Keeps forwarding off on the hostonly host TAP (see `guard_forwarding` in `daemon/network.rs`).
    forwarding_guard: Option<tokio::task::JoinHandle<()>>,
    ports: Vec<RunningPort>,
    dhcp: Option<Arc<Mutex<DhcpServer>>>,
    nat: Option<crate::nat::RouterHandle>,
    /// The router's switch port (frames the router reads itself are counted on it).
    nat_port: Option<Arc<crate::switch::Port>>,
    /// The DHCP server's queue for frames the router hands over (until the router
    /// takes it).
    dhcp_routed: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    /// The network's DNS names, when it serves DNS (see [`crate::dns`]).
    names: Option<Arc<crate::dns::LocalNames>>,
    /// The DNS responder of a hostonly or internal network (see [`crate::modes::dns`]).
    dns_task: Option<tokio::task::JoinHandle<()>>,
    /// The IPv6 service (RAs, NDP, DHCPv6) of a network with `subnet6`.
    ipv6: Option<Arc<Mutex<crate::ipv6::Ipv6Service>>>,
}

impl NetState {
    /// Starts a guest port. The only guest port of a NAT network (no uplink, no
    /// host TAP) is read by the router on its own thread when it is a `tap` or `vm`
    /// port (see [`ports::InlineReader`]): its frames then cross no thread.
    fn start_port(
        &self,
        spec: &PortSpec,
        only_guest: bool,
    ) -> Result<RunningPort, ports::PortError> {
        let inline_ok = only_guest
            && self.spec.uplink.is_none()
            && self.host.is_none()
            && matches!(
                spec.kind,
                crate::config::PortKind::Tap | crate::config::PortKind::Vm
            );
        match (&self.nat, &self.nat_port) {
            (Some(handle), Some(local)) if inline_ok => {
                let mut give = |r| handle.attach_reader(r);
                ports::start_port_with(&self.net, spec, Some((local.clone(), &mut give)))
            }
            _ => ports::start_port(&self.net, spec),
        }
    }
}

/// The daemon's state.
pub struct Daemon {
    nets: Mutex<BTreeMap<String, NetState>>,
    control: ControlCounters,
    /// Where leases (and the runtime state) are kept.
    state_dir: PathBuf,
    /// What the control API changed (None: not recorded, see [`Daemon::start`]).
    runtime: Mutex<Option<runtime::Runtime>>,
}

/// The control server's counters (see [`ControlStats`](fabric_api::netd::ControlStats)).
#[derive(Default)]
struct ControlCounters {
    open: AtomicUsize,
    max: AtomicUsize,
    refused_full: AtomicU64,
    closed_idle: AtomicU64,
}

pub use fabric_api::netd::NetInfo;

impl Daemon {
    /// Builds every network, keeping no runtime state (`netd serve` uses
    /// [`Daemon::start_persistent`]). Must run inside a tokio runtime (services are
    /// tasks).
    pub fn start(specs: Vec<NetworkSpec>, state_dir: &Path) -> Result<Arc<Self>, DaemonError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| DaemonError::StateDir(state_dir.to_path_buf(), e))?;
        let d = Arc::new(Daemon {
            nets: Mutex::new(BTreeMap::new()),
            control: ControlCounters::default(),
            state_dir: state_dir.to_path_buf(),
            runtime: Mutex::new(None),
        });
        for spec in specs {
            let st = match Self::start_network(spec, state_dir) {
                Ok(st) => st,
                Err(e) => {
                    d.shutdown();
                    return Err(e);
                }
            };
            d.lock().insert(st.spec.name.clone(), st);
        }
        Ok(d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NetState>> {
        self.nets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every network, removing the TAPs netd created.
    pub fn shutdown(&self) {
        let nets = std::mem::take(&mut *self.lock());
        for (_, st) in nets {
            stop_network(st);
        }
    }

    /// The network list.
    pub fn net_list(&self) -> Vec<NetInfo> {
        self.lock()
            .values()
            .map(|st| NetInfo {
                name: st.spec.name.clone(),
                mode: st.spec.mode,
                subnet: st
                    .spec
                    .ipv4
                    .as_ref()
                    .map(|v| format!("{}/{}", v.network, v.prefix)),
                gateway: st.spec.ipv4.as_ref().map(|v| v.gateway.to_string()),
                dhcp: st.dhcp.is_some(),
                mtu: st.spec.mtu,
                ports: st.net.port_infos().len(),
                host_ifname: st.spec.host_ifname.clone(),
                source: None,
                conflict: None,
            })
            .collect()
    }

    /// Adds a port at runtime.
    pub fn port_add(&self, net: &str, spec: PortSpec) -> Result<(), DaemonError> {
        let mut nets = self.lock();
        if let Some(ifn) = &spec.ifname {
            let used = nets.values().any(|st| {
                st.ports.iter().any(|p| p.spec.ifname.as_ref() == Some(ifn))
                    || st.spec.host_ifname.as_ref() == Some(ifn)
            });
            if used {
                return Err(DaemonError::IfnameInUse(ifn.clone()));
            }
        }
        let st = nets
            .get_mut(net)
            .ok_or_else(|| DaemonError::NoSuchNetwork(net.to_string()))?;
        if st.net.port(&spec.name).is_some() {
            return Err(DaemonError::PortExists(net.to_string(), spec.name));
        }
        let rp = st
            .start_port(&spec, st.ports.is_empty())
            .map_err(|source| DaemonError::Port {
                net: net.to_string(),
                port: spec.name.clone(),
                source,
            })?;
        tracing::info!(network = net, port = %spec.name, kind = %rp.kind, "port added");
        st.ports.push(rp);
        Ok(())
    }

    /// Removes a port at runtime.
    pub fn port_del(&self, net: &str, name: &str) -> Result<(), DaemonError> {
        let rp = {
            let mut nets = self.lock();
            let st = nets
                .get_mut(net)
                .ok_or_else(|| DaemonError::NoSuchNetwork(net.to_string()))?;
            let i = st
                .ports
                .iter()
                .position(|p| p.spec.name == name)
                .ok_or_else(|| DaemonError::NoSuchPort(net.to_string(), name.to_string()))?;
            st.ports.remove(i)
        };
        rp.shutdown();
        tracing::info!(network = net, port = name, "port removed");
        Ok(())
    }

    /// The tunnel of vxlan port `port` of `net`.
    fn tunnel(
        &self,
        net: &str,
        port: &str,
    ) -> Result<Arc<crate::port::vxlan::Tunnel>, DaemonError> {
        self.with_net(net, |st| {
            let rp = st.ports.iter().find(|p| p.spec.name == port);
            match rp {
                None => Err(DaemonError::NoSuchPort(net.to_string(), port.to_string())),
                Some(rp) => rp
                    .tunnel
                    .clone()
                    .ok_or_else(|| DaemonError::NotVxlan(net.to_string(), port.to_string())),
            }
        })?
    }

    fn with_net<T>(&self, net: &str, f: impl FnOnce(&NetState) -> T) -> Result<T, DaemonError> {
        let nets = self.lock();
        let st = nets
            .get(net)
            .ok_or_else(|| DaemonError::NoSuchNetwork(net.to_string()))?;
        Ok(f(st))
    }
}

/// The environment variable that allows the test-only faults: the `nat_fault`
/// request, and [`FAULT_FRAME`] panicking a port's receive thread.
pub const FAULT_INJECTION_ENV: &str = "NETD_FAULT_INJECTION";

/// A frame with this ethertype (IEEE 802 local experimental 2) and this payload
/// start makes the receive thread of the port it came in on panic, when
/// [`fault_injection`] is on: the port supervisor's test.
pub const FAULT_FRAME: (u16, &[u8]) = (0x88b6, b"netd-fault");

/// Whether the test-only faults are on (`NETD_FAULT_INJECTION=1`, read once).
pub fn fault_injection() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(FAULT_INJECTION_ENV).is_some_and(|v| v == "1"))
}

/// Whether `frame` is the [`FAULT_FRAME`] and faults are on.
pub fn is_fault_frame(frame: &[u8]) -> bool {
    let (ethertype, magic) = FAULT_FRAME;
    frame.get(12..14) == Some(&ethertype.to_be_bytes()[..])
        && frame.get(14..14 + magic.len()) == Some(magic)
        && fault_injection()
}

#[cfg(test)]
mod tests;
