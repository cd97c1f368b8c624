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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use fabric_api::netd::{ControlStats, DhcpStats, Request, Response};
use fabric_api::MAX_REQUEST;
use fabric_util::{error_chain, MacAddr};

use crate::config::{ControlSpec, Mode, NetworkSpec, PortSpec};
use crate::dhcp::{DhcpServer, LeaseDb, LeaseError};
use crate::port::{self as ports, PortError, RunningPort, SocketId};
use crate::switch::{Network, SwitchError};

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
    /// port {1:?} of network {0} is not a vxlan port
    #[error("port {1:?} of network {0} is not a vxlan port")]
    NotVxlan(String, String),
    /// network {0}, vxlan port {1:?}
    #[error("network {0}, vxlan port {1:?}")]
    Vxlan(String, String, #[source] crate::port::vxlan::VxlanError),
}

struct NetState {
    spec: NetworkSpec,
    net: Arc<Network>,
    host: Option<RunningPort>,
    /// Keeps forwarding off on the hostonly host TAP (see [`guard_forwarding`]).
    forwarding_guard: Option<tokio::task::JoinHandle<()>>,
    ports: Vec<RunningPort>,
    dhcp: Option<Arc<Mutex<DhcpServer>>>,
    nat: Option<crate::nat::RouterHandle>,
    /// The router's switch port (frames the router reads itself are counted on it).
    nat_port: Option<Arc<crate::switch::Port>>,
    /// The DHCP server's queue for frames the router hands over (until the router
    /// takes it).
    dhcp_routed: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
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
}

/// The control server's counters (see [`ControlStats`]).
#[derive(Default)]
struct ControlCounters {
    open: AtomicUsize,
    max: AtomicUsize,
    refused_full: AtomicU64,
    closed_idle: AtomicU64,
}

pub use fabric_api::netd::NetInfo;

/// A locally administered MAC derived from the network name, for its services.
fn service_mac(net: &str, salt: u8) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in net.bytes().chain([salt]) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x02, 0x4e, b[0], b[1], b[2], b[3]]
}

/// Whether the DHCP server's address is one the NAT router owns (answers ARP for).
fn router_owns_dhcp_server(spec: &NetworkSpec) -> bool {
    match (&spec.nat, &spec.dhcp) {
        (Some(n), Some(d)) => d.server == n.gateway || d.server == n.dns,
        _ => false,
    }
}

impl Daemon {
    /// Builds every network. Must run inside a tokio runtime (services are tasks).
    pub fn start(specs: Vec<NetworkSpec>, state_dir: &Path) -> Result<Arc<Self>, DaemonError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| DaemonError::StateDir(state_dir.to_path_buf(), e))?;
        let d = Arc::new(Daemon {
            nets: Mutex::new(BTreeMap::new()),
            control: ControlCounters::default(),
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

    fn start_network(spec: NetworkSpec, state_dir: &Path) -> Result<NetState, DaemonError> {
        let net = Network::new(
            &spec.name,
            spec.mtu,
            spec.max_macs,
            Duration::from_secs(spec.mac_ageing),
        );
        net.set_guard_default(spec.guard);
        net.set_max_macs_per_port(spec.max_macs_per_port);
        // On a network with DHCP or NAT the fabric knows who owns which address:
        // guarded ports may then send only from theirs (see switch::guard).
        let ip_guard = match (&spec.ipv4, spec.dhcp.is_some() || spec.nat.is_some()) {
            (Some(v4), true) => {
                let mut services = vec![v4.gateway];
                services.extend(spec.dhcp.as_ref().map(|d| d.server));
                services.extend(spec.nat.as_ref().map(|n| n.dns));
                let reserved = spec
                    .dhcp
                    .as_ref()
                    .map(|d| d.reservations.clone())
                    .unwrap_or_default();
                let g = Arc::new(crate::switch::IpGuard::new(
                    v4.network,
                    v4.prefix,
                    &services,
                    &reserved,
                    Duration::from_secs(spec.mac_ageing),
                ));
                net.set_ip_guard(g.clone());
                Some(g)
            }
            _ => None,
        };
        let router_mac = service_mac(&spec.name, 2);
        let mut st = NetState {
            spec: spec.clone(),
            net: net.clone(),
            host: None,
            forwarding_guard: None,
            ports: Vec::new(),
            dhcp: None,
            nat: None,
            nat_port: None,
            dhcp_routed: None,
        };
        let fail = |st: NetState, e: DaemonError| {
            stop_network(st);
            Err(e)
        };
        if let (Some(h), Some(v4)) = (&spec.host_ifname, &spec.ipv4) {
            match ports::start_host_port(&net, h, v4.gateway, v4.mask()) {
                Ok(p) => {
                    st.host = Some(p);
                    st.forwarding_guard = Some(guard_forwarding(h.clone()));
                }
                Err(source) => {
                    return fail(
                        st,
                        DaemonError::Port {
                            net: spec.name.clone(),
                            port: h.clone(),
                            source,
                        },
                    )
                }
            }
        }
        if let (Some(d), Some(v4)) = (&spec.dhcp, &spec.ipv4) {
            let path = state_dir.join(format!("leases-{}.json", spec.name));
            let db = match LeaseDb::load(Some(path)) {
                Ok(db) => db,
                Err(e) => return fail(st, DaemonError::Leases(spec.name.clone(), e)),
            };
            // The server answers ARP for its own address unless somebody else owns
            // it: the host on hostonly (the gateway), the router on nat (its gateway
            // and DNS addresses; the router then hands it the unicast datagrams).
            let answer_arp = spec.mode == Mode::Internal
                || (d.server != v4.gateway && !router_owns_dhcp_server(&spec));
            let mut server = DhcpServer::new(
                v4.clone(),
                d.clone(),
                service_mac(&spec.name, 1),
                answer_arp,
                db,
            );
            if let Some(g) = &ip_guard {
                server.set_ip_guard(g.clone());
            }
            let server = Arc::new(Mutex::new(server));
            let sp = match net.attach_service("dhcp", 256) {
                Ok(sp) => sp,
                Err(e) => return fail(st, DaemonError::Dhcp(spec.name.clone(), e)),
            };
            if let Err(e) = net.pin_mac("dhcp", service_mac(&spec.name, 1)) {
                return fail(st, DaemonError::Dhcp(spec.name.clone(), e));
            }
            // Unicast DHCP to the router's addresses reaches the server through a
            // queue of its own: the router thread never waits for it.
            let routed = if router_owns_dhcp_server(&spec) {
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                st.dhcp_routed = Some(tx);
                Some(crate::dhcp::Routed {
                    rx,
                    mac: router_mac,
                })
            } else {
                None
            };
            tokio::spawn(crate::dhcp::run(server.clone(), sp, routed));
            st.dhcp = Some(server);
        }
        net.set_isolated(spec.isolated);
        if let Some(cfg) = &spec.nat {
            let mut cfg = cfg.clone();
            cfg.mac = router_mac;
            // The router's queue: ~6 MiB of MTU-sized frames, and at most
            // SERVICE_QUEUE_BYTES whatever the frames (TCP super-frames included).
            let cap = (4096 * 1500 / cfg.mtu.max(1500)).max(128);
            let (sw_in, from_switch) = match net.attach_service_direct("nat", cap, true) {
                Ok(p) => p,
                Err(e) => return fail(st, DaemonError::NatAttach(spec.name.clone(), e)),
            };
            st.nat_port = Some(sw_in.port().clone());
            if let Err(e) = net.pin_mac("nat", router_mac) {
                return fail(st, DaemonError::NatAttach(spec.name.clone(), e));
            }
            let sink = crate::nat::ToSwitch::Offload(Box::new(move |h, f: &[u8]| match h {
                Some(h) => sw_in.send_vnet(h, f),
                None => sw_in.send(f),
            }));
            // The DHCP server's identifier is the router's (VirtualBox and QEMU use
            // the gateway, 10.0.2.2): a renewing client unicasts to the router's MAC,
            // so the router passes port-67 datagrams to its own addresses on to the
            // server rather than giving the server an address of its own.
            // The hook only queues the frame (the server answers from its own task,
            // after the lease is saved): no lock, no fsync on the router thread.
            let dhcp = match (&st.dhcp, st.dhcp_routed.take()) {
                (Some(server), Some(tx)) => {
                    let stats = server
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .shared
                        .clone();
                    let hook: crate::nat::LocalService = Box::new(move |f: &[u8]| {
                        if tx.try_send(bytes::Bytes::copy_from_slice(f)).is_err() {
                            stats
                                .dropped_busy
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        None
                    });
                    Some(hook)
                }
                _ => None,
            };
            let tname = format!("nat-{}", spec.name);
            match crate::nat::Router::spawn_thread(&tname, cfg, from_switch, sink, dhcp) {
                Ok(handle) => st.nat = Some(handle),
                Err(e) => return fail(st, DaemonError::Nat(spec.name.clone(), e)),
            }
        }
        if let Some(up) = &spec.uplink {
            match crate::port::start_uplink(&net, up) {
                Ok(p) => st.ports.push(p),
                Err(source) => {
                    return fail(
                        st,
                        DaemonError::Port {
                            net: spec.name.clone(),
                            port: up.clone(),
                            source,
                        },
                    )
                }
            }
        }
        for p in &spec.ports {
            match st.start_port(p, spec.ports.len() == 1) {
                Ok(rp) => st.ports.push(rp),
                Err(source) => {
                    return fail(
                        st,
                        DaemonError::Port {
                            net: spec.name.clone(),
                            port: p.name.clone(),
                            source,
                        },
                    )
                }
            }
        }
        tracing::info!(network = %spec.name, mode = ?spec.mode, ports = spec.ports.len(), "network up");
        Ok(st)
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

    /// Sends a request to a NAT network's router (from a blocking thread).
    fn nat_request(
        &self,
        net: &str,
        req: crate::nat::NatRequest,
    ) -> Result<serde_json::Value, DaemonError> {
        let h = self
            .with_net(net, |st| st.nat.clone())?
            .ok_or_else(|| DaemonError::NotNat(net.to_string()))?;
        h.request_blocking(req)
            .map_err(|e| DaemonError::Nat(net.to_string(), e))
    }

    /// Serves one request.
    pub fn handle(&self, req: Request) -> Result<serde_json::Value, DaemonError> {
        let j = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
        match req {
            Request::NetList => Ok(j(serde_json::to_value(self.net_list()))),
            Request::PortList { net } => self.with_net(&net, |st| {
                let infos = st.net.port_infos();
                let rows: Vec<serde_json::Value> = infos
                    .into_iter()
                    .map(|pi| {
                        let rp = st.ports.iter().find(|p| p.spec.name == pi.name);
                        let mut v = j(serde_json::to_value(&pi));
                        if let (Some(rp), Some(o)) = (rp, v.as_object_mut()) {
                            o.insert("ifname".into(), j(serde_json::to_value(&rp.spec.ifname)));
                            o.insert("netns".into(), j(serde_json::to_value(&rp.spec.netns)));
                            o.insert("path".into(), j(serde_json::to_value(&rp.spec.path)));
                            o.insert(
                                "mac".into(),
                                j(serde_json::to_value(rp.spec.mac.map(MacAddr))),
                            );
                            if let Some(t) = &rp.tunnel {
                                o.insert("vxlan".into(), j(serde_json::to_value(t.info())));
                            }
                        }
                        v
                    })
                    .collect();
                serde_json::Value::Array(rows)
            }),
            Request::PortAdd { net, port } => {
                let spec = crate::config::validate_port(&port, "<control>", "port")
                    .map_err(DaemonError::BadPort)?;
                self.port_add(&net, spec)?;
                Ok(serde_json::Value::Null)
            }
            Request::PortDel { net, name } => {
                self.port_del(&net, &name)?;
                Ok(serde_json::Value::Null)
            }
            Request::VxlanRemoteAdd { net, port, remote } => {
                let t = self.tunnel(&net, &port)?;
                t.add_remote(remote)
                    .map_err(|e| DaemonError::Vxlan(net.clone(), port.clone(), e))?;
                tracing::info!(network = %net, port = %port, %remote, "vxlan remote added");
                Ok(serde_json::Value::Null)
            }
            Request::VxlanRemoteDel { net, port, remote } => {
                let t = self.tunnel(&net, &port)?;
                t.del_remote(remote)
                    .map_err(|e| DaemonError::Vxlan(net.clone(), port.clone(), e))?;
                tracing::info!(network = %net, port = %port, %remote, "vxlan remote removed");
                Ok(serde_json::Value::Null)
            }
            Request::VxlanShow { net, port } => {
                Ok(j(serde_json::to_value(self.tunnel(&net, &port)?.info())))
            }
            Request::Mac { net } => {
                self.with_net(&net, |st| j(serde_json::to_value(st.net.mac_table())))
            }
            Request::ForwardAdd { net, forward } => {
                self.nat_request(&net, crate::nat::NatRequest::AddForward(forward))
            }
            Request::ForwardDel { net, proto, host } => {
                let host = crate::nat::parse_host_addr(&host).map_err(|e| {
                    DaemonError::Nat(
                        net.clone(),
                        crate::nat::NatError::Invalid {
                            key: "host",
                            reason: e,
                        },
                    )
                })?;
                self.nat_request(&net, crate::nat::NatRequest::DelForward(proto, host))
            }
            Request::ForwardList { net } => {
                self.nat_request(&net, crate::nat::NatRequest::ListForwards)
            }
            Request::Flows { net } => self.nat_request(&net, crate::nat::NatRequest::Flows),
            Request::NatStats { net } => self.nat_request(&net, crate::nat::NatRequest::Stats),
            Request::OutboundList { net } => self.nat_request(
                &net,
                crate::nat::NatRequest::Outbound(crate::nat::OutboundChange::Show),
            ),
            Request::OutboundAdd { net, list, cidr } => {
                let c = parse_cidr_arg(&net, &cidr)?;
                let change = crate::nat::OutboundChange::Add(list, c);
                self.nat_request(&net, crate::nat::NatRequest::Outbound(change))
            }
            Request::OutboundDel { net, list, cidr } => {
                let c = parse_cidr_arg(&net, &cidr)?;
                let change = crate::nat::OutboundChange::Del(list, c);
                self.nat_request(&net, crate::nat::NatRequest::Outbound(change))
            }
            Request::NatFault { net } => {
                if !fault_injection() {
                    return Err(DaemonError::Nat(
                        net,
                        crate::nat::NatError::Invalid {
                            key: "nat_fault",
                            reason: format!(
                                "fault injection is off (start netd with {FAULT_INJECTION_ENV}=1)"
                            ),
                        },
                    ));
                }
                self.nat_request(&net, crate::nat::NatRequest::InjectPanic)
            }
            Request::Leases { net } => self.with_net(&net, |st| {
                let leases = st
                    .dhcp
                    .as_ref()
                    .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).db.leases())
                    .unwrap_or_default();
                j(serde_json::to_value(leases))
            }),
            Request::ControlStats => {
                let c = &self.control;
                let stats = ControlStats {
                    connections: c.open.load(Ordering::Relaxed),
                    max_connections: c.max.load(Ordering::Relaxed),
                    refused_full: c.refused_full.load(Ordering::Relaxed),
                    closed_idle: c.closed_idle.load(Ordering::Relaxed),
                };
                Ok(j(serde_json::to_value(stats)))
            }
            Request::DhcpStats { net } => {
                let dhcp = self
                    .with_net(&net, |st| st.dhcp.clone())?
                    .ok_or_else(|| DaemonError::NoDhcp(net.clone()))?;
                let stats: DhcpStats = dhcp.lock().unwrap_or_else(|e| e.into_inner()).stats();
                Ok(j(serde_json::to_value(stats)))
            }
        }
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

/// A CIDR of an `outbound_*` request, parsed at the edge.
fn parse_cidr_arg(net: &str, cidr: &str) -> Result<(std::net::Ipv4Addr, u8), DaemonError> {
    crate::nat::parse_cidr(cidr).map_err(|reason| {
        DaemonError::Nat(
            net.to_string(),
            crate::nat::NatError::Invalid {
                key: "cidr",
                reason,
            },
        )
    })
}

/// How often the hostonly host TAP's forwarding setting is checked.
const FORWARDING_CHECK: Duration = Duration::from_secs(1);

/// Keeps IPv4 and IPv6 forwarding off on the hostonly host TAP `ifname`: a write
/// to the global `net.ipv4.ip_forward` (or `conf/all/forwarding`) after netd set it
/// turns every interface's forwarding back on, so it is checked every
/// [`FORWARDING_CHECK`] and turned off again (logged as a warning).
fn guard_forwarding(ifname: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FORWARDING_CHECK);
        loop {
            tick.tick().await;
            if let Ok(false) = crate::sys::if_forwarding_off(&ifname) {
                let r = crate::sys::if_disable_forwarding(&ifname);
                tracing::warn!(ifname = %ifname, ok = r.is_ok(), "forwarding was turned on for the hostonly host TAP; turned it off again");
            }
        }
    })
}

fn stop_network(st: NetState) {
    for p in st.ports {
        p.shutdown();
    }
    if let Some(g) = st.forwarding_guard {
        g.abort();
    }
    if let Some(h) = st.host {
        h.shutdown();
    }
    // The DHCP task ends when its port is gone; drop the switch's side of it.
    let _ = st.net.remove_port("dhcp");
    // Likewise the NAT router: its input channel closes and its task ends.
    let _ = st.net.remove_port("nat");
}

/// Binds the control socket at `spec.path` with mode 0660 and group `spec.gid`
/// (owner: netd's user). It is bound under a temporary name in the same directory,
/// given its mode and group, and only then renamed into place, so it is never
/// reachable with the umask's mode. What is at the path already must be a stale
/// socket of netd's user (nobody listening); anything else is refused and kept.
fn bind_control(
    spec: &ControlSpec,
) -> std::io::Result<(std::os::unix::net::UnixListener, SocketId)> {
    use std::os::unix::fs::PermissionsExt;
    let path = &spec.path;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    ports::claim_socket_path(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = (|| {
        std::os::unix::fs::chown(&tmp, None, Some(spec.gid))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let id =
        ports::socket_id(path).ok_or_else(|| std::io::Error::other("control socket vanished"))?;
    listener.set_nonblocking(true)?;
    Ok((listener, id))
}

/// Serves the control socket until `shutdown` resolves.
///
/// Bounded: at most `spec.max_connections` connections at once (one more is told
/// so and closed, counted `refused_full`); a connection that sends no request for
/// `spec.idle_timeout` is closed (`closed_idle`). Each connection's peer
/// credentials (SO_PEERCRED: pid, uid, gid) are logged.
pub async fn serve_control(
    daemon: Arc<Daemon>,
    spec: ControlSpec,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let path = spec.path.clone();
    let (std_listener, id) =
        bind_control(&spec).map_err(|e| DaemonError::Control(path.clone(), e))?;
    let listener =
        UnixListener::from_std(std_listener).map_err(|e| DaemonError::Control(path.clone(), e))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(spec.max_connections));
    daemon
        .control
        .max
        .store(spec.max_connections, Ordering::Relaxed);
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    backoff.reset();
                    let cred = stream.peer_cred().ok();
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        daemon.control.refused_full.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = ?cred, max = spec.max_connections, "control connection refused: too many open");
                        tokio::spawn(refuse_conn(stream, spec.max_connections));
                        continue;
                    };
                    tracing::info!(
                        pid = ?cred.as_ref().and_then(|c| c.pid()),
                        uid = cred.as_ref().map(|c| c.uid()),
                        gid = cred.as_ref().map(|c| c.gid()),
                        "control connection"
                    );
                    let d = daemon.clone();
                    let idle = spec.idle_timeout;
                    tokio::spawn(async move {
                        d.control.open.fetch_add(1, Ordering::Relaxed);
                        serve_conn(&d, stream, idle).await;
                        d.control.open.fetch_sub(1, Ordering::Relaxed);
                        drop(slot);
                    });
                }
                Err(e) => {
                    // A pending connection stays pending while accept fails (EMFILE
                    // above all): retrying at once spins. Wait, longer each time.
                    let (wait, log) = backoff.failed();
                    if log {
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, failures = backoff.failures, "control accept failed; backing off");
                    }
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
    if ports::socket_id(&path) == Some(id) {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// The wait after a failed accept: 10 ms doubling to 1 s, reset by a success; a
/// log line for the first failure and every 100th.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u64,
    wait: Duration,
}

impl AcceptBackoff {
    fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.wait = (self.wait * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        (self.wait, self.failures % 100 == 1)
    }

    fn reset(&mut self) {
        self.wait = Duration::ZERO;
    }
}

/// Tells a connection over the cap why it is closed, reading (for at most a
/// second) the request it sends meanwhile, so that the client gets the answer
/// rather than a broken pipe.
async fn refuse_conn(mut stream: tokio::net::UnixStream, max: usize) {
    let resp = Response::fail(format!(
        "too many control connections (at most {max} at once); try again"
    ));
    let out = fabric_api::encode_line(&resp, b"{\"ok\":false}");
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&out).await?;
        let mut line = String::new();
        BufReader::new((&mut stream).take(MAX_REQUEST as u64))
            .read_line(&mut line)
            .await
    })
    .await;
}

async fn serve_conn(d: &Arc<Daemon>, stream: tokio::net::UnixStream, idle: Duration) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        match tokio::time::timeout(idle, lines.read_line(&mut line)).await {
            Err(_) => {
                d.control.closed_idle.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    idle_secs = idle.as_secs(),
                    "control connection idle; closed"
                );
                let resp = Response::fail(format!(
                    "no request for {} s; connection closed",
                    idle.as_secs()
                ));
                let out = fabric_api::encode_line(&resp, b"{\"ok\":false}");
                let _ = tokio::time::timeout(Duration::from_secs(1), w.write_all(&out)).await;
                return;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
        let resp = match fabric_api::decode_request::<Request>(line.as_bytes()) {
            Err(e) => Response::fail(e),
            Ok(req) => {
                let d2 = d.clone();
                match tokio::task::spawn_blocking(move || d2.handle(req)).await {
                    Ok(Ok(data)) => Response::ok(data),
                    Ok(Err(e)) => Response::fail(error_chain(&e)),
                    Err(e) => Response::fail(format!("internal error: {e}")),
                }
            }
        };
        let out = fabric_api::encode_line(&resp, b"{\"ok\":false}");
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod accept_tests {
    use super::*;

    /// Regression (issue 11, finding 2): failed accepts (EMFILE) back off from 10 ms
    /// to 1 s instead of spinning, log rarely, and a success starts over.
    #[test]
    fn failed_accepts_back_off_and_log_rarely() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<(Duration, bool)> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(waits[0], (Duration::from_millis(10), true));
        assert_eq!(waits[1], (Duration::from_millis(20), false));
        assert_eq!(waits[9].0, Duration::from_secs(1));
        // A hundred failures in a row wait at least 90 s in all, with two log lines.
        let mut b = AcceptBackoff::default();
        let (total, logs) = (0..200).fold((Duration::ZERO, 0), |(t, l), _| {
            let (w, log) = b.failed();
            (t + w, l + usize::from(log))
        });
        assert!(total > Duration::from_secs(190), "{total:?}");
        assert_eq!(logs, 2);
        b.reset();
        assert_eq!(b.failed().0, Duration::from_millis(10));
    }

    /// The test-only fault frame does nothing unless NETD_FAULT_INJECTION=1 was in
    /// the environment (never set in unit tests).
    #[test]
    fn fault_frame_needs_the_variable() {
        let mut f = vec![0xffu8; 12];
        f.extend_from_slice(&FAULT_FRAME.0.to_be_bytes());
        f.extend_from_slice(FAULT_FRAME.1);
        assert!(std::env::var_os(FAULT_INJECTION_ENV).is_none());
        assert!(!fault_injection());
        assert!(!is_fault_frame(&f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// Regression (issue 11, item 12): the control socket's mode was the umask's,
    /// with no bound on connections and no idle timeout.
    #[test]
    fn the_control_socket_is_0660_bounded_and_closes_idle_connections() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (_, gid) = crate::sys::effective_ids();
        let spec = ControlSpec {
            path: path.clone(),
            gid,
            max_connections: 2,
            idle_timeout: Duration::from_secs(1),
        };
        let d = rt.block_on(async { Daemon::start(vec![], &dir.path().join("state")).unwrap() });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(serve_control(d.clone(), spec, async {
            let _ = stop_rx.await;
        }));
        let ok = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            path.exists()
        });
        assert!(ok, "control socket bound");
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o660);
        assert_eq!(md.gid(), gid);

        let call = |c: &mut std::os::unix::net::UnixStream, line: &str| -> String {
            c.write_all(line.as_bytes()).unwrap();
            let mut r = std::io::BufReader::new(c.try_clone().unwrap());
            let mut out = String::new();
            r.read_line(&mut out).unwrap();
            out
        };
        let connect = || {
            let c = std::os::unix::net::UnixStream::connect(&path).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        };
        let mut a = connect();
        let mut b = connect();
        assert!(call(&mut a, "{\"cmd\":\"net_list\"}\n").contains("\"ok\":true"));
        assert!(call(&mut b, "{\"cmd\":\"net_list\"}\n").contains("\"ok\":true"));
        // A third is told and closed, and counted.
        let mut c = connect();
        let mut r = std::io::BufReader::new(c.try_clone().unwrap());
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        assert!(out.contains("too many control connections"), "{out}");
        let _ = c.write_all(b"{\"cmd\":\"net_list\"}\n");
        // The two still work; after a second of silence they are closed.
        assert!(call(&mut a, "{\"cmd\":\"control_stats\"}\n").contains("\"refused_full\":1"));
        std::thread::sleep(Duration::from_millis(1500));
        let mut out = String::new();
        let mut r = std::io::BufReader::new(b.try_clone().unwrap());
        r.read_line(&mut out).unwrap();
        assert!(out.contains("no request for 1 s"), "{out}");
        out.clear();
        assert_eq!(r.read_line(&mut out).unwrap(), 0, "closed");
        // A new connection is served, and the counters say what happened.
        let mut e = connect();
        let stats = call(&mut e, "{\"cmd\":\"control_stats\"}\n");
        assert!(stats.contains("\"closed_idle\":2"), "{stats}");
        assert!(stats.contains("\"connections\":1"), "{stats}");
        let _ = stop_tx.send(());
        rt.block_on(server).unwrap().unwrap();
        assert!(!path.exists(), "socket removed on exit");
    }

    #[test]
    fn the_control_path_is_never_taken_from_somebody_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, b"precious").unwrap();
        let spec = ControlSpec {
            path: path.clone(),
            gid: 0,
            max_connections: 1,
            idle_timeout: Duration::from_secs(1),
        };
        assert!(bind_control(&spec).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
