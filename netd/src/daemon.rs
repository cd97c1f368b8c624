//! The running daemon: networks, their ports and services, the control server,
//! readiness notification and shutdown.
//!
//! Theory of operation. [`Daemon::start`] builds every network of the validated
//! config: the switch, the host TAP of a hostonly network, the configured ports and
//! the DHCP service. Control requests change that state at runtime under one
//! mutex (port setup may block briefly: it runs on a blocking thread). On shutdown
//! every port is stopped and the TAPs netd created are removed (unless marked
//! persistent); TAPs that existed before netd started are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use fabric_api::netd::{DhcpStats, Request, Response};
use fabric_api::MAX_REQUEST;
use fabric_util::{error_chain, MacAddr};

use crate::config::{Mode, NetworkSpec, PortSpec};
use crate::dhcp::{DhcpServer, LeaseDb, LeaseError};
use crate::port::{self as ports, PortError, RunningPort};
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
    ports: Vec<RunningPort>,
    dhcp: Option<Arc<Mutex<DhcpServer>>>,
    nat: Option<crate::nat::RouterHandle>,
    /// The router's switch port (frames the router reads itself are counted on it).
    nat_port: Option<Arc<crate::switch::Port>>,
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
        let mut st = NetState {
            spec: spec.clone(),
            net: net.clone(),
            host: None,
            ports: Vec::new(),
            dhcp: None,
            nat: None,
            nat_port: None,
        };
        let fail = |st: NetState, e: DaemonError| {
            stop_network(st);
            Err(e)
        };
        if let (Some(h), Some(v4)) = (&spec.host_ifname, &spec.ipv4) {
            match ports::start_host_port(&net, h, v4.gateway, v4.mask()) {
                Ok(p) => st.host = Some(p),
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
            let server = Arc::new(Mutex::new(DhcpServer::new(
                v4.clone(),
                d.clone(),
                service_mac(&spec.name, 1),
                answer_arp,
                db,
            )));
            let sp = match net.attach_service("dhcp", 256) {
                Ok(sp) => sp,
                Err(e) => return fail(st, DaemonError::Dhcp(spec.name.clone(), e)),
            };
            tokio::spawn(crate::dhcp::run(server.clone(), sp));
            st.dhcp = Some(server);
        }
        net.set_isolated(spec.isolated);
        if let Some(cfg) = &spec.nat {
            let mut cfg = cfg.clone();
            cfg.mac = service_mac(&spec.name, 2);
            // Bound the router's queue in bytes, not only frames: ~6 MiB of full frames.
            let cap = (4096 * 1500 / cfg.mtu.max(1500)).max(128);
            let (sw_in, from_switch) = match net.attach_service_direct("nat", cap, true) {
                Ok(p) => p,
                Err(e) => return fail(st, DaemonError::NatAttach(spec.name.clone(), e)),
            };
            st.nat_port = Some(sw_in.port().clone());
            let sink = crate::nat::ToSwitch::Offload(Box::new(move |h, f: &[u8]| match h {
                Some(h) => sw_in.send_vnet(h, f),
                None => sw_in.send(f),
            }));
            // The DHCP server's identifier is the router's (VirtualBox and QEMU use
            // the gateway, 10.0.2.2): a renewing client unicasts to the router's MAC,
            // so the router passes port-67 datagrams to its own addresses on to the
            // server rather than giving the server an address of its own.
            let dhcp = match &st.dhcp {
                Some(server) if router_owns_dhcp_server(&spec) => {
                    let server = server.clone();
                    let hook: crate::nat::LocalService = Box::new(move |f: &[u8]| {
                        let mut s = server.lock().unwrap_or_else(|e| e.into_inner());
                        s.handle_frame(f, crate::dhcp::unix_now())
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
            Request::DhcpStats { net } => {
                let dhcp = self
                    .with_net(&net, |st| st.dhcp.clone())?
                    .ok_or_else(|| DaemonError::NoDhcp(net.clone()))?;
                let d = dhcp.lock().unwrap_or_else(|e| e.into_inner());
                let stats = DhcpStats {
                    leases: d.db.leases().len(),
                    refused_full: d.refused_full,
                    malformed: d.malformed,
                };
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

fn stop_network(st: NetState) {
    for p in st.ports {
        p.shutdown();
    }
    if let Some(h) = st.host {
        h.shutdown();
    }
    // The DHCP task ends when its port is gone; drop the switch's side of it.
    let _ = st.net.remove_port("dhcp");
    // Likewise the NAT router: its input channel closes and its task ends.
    let _ = st.net.remove_port("nat");
}

/// Serves the control socket until `shutdown` resolves.
pub async fn serve_control(
    daemon: Arc<Daemon>,
    path: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| DaemonError::Control(path.clone(), e))?;
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    backoff.reset();
                    let d = daemon.clone();
                    tokio::spawn(async move { serve_conn(d, stream).await });
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
    let _ = std::fs::remove_file(&path);
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

async fn serve_conn(d: Arc<Daemon>, stream: tokio::net::UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
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
