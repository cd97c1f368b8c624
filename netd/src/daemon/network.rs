//! Network lifecycle: [`Daemon::start_network`] builds one network of the validated
//! config (the switch and its guard settings, the hostonly host TAP with forwarding
//! off, the DHCP server, the NAT router, the configured ports), and
//! [`stop_network`] takes it down again, removing the TAPs netd created. The
//! services' MACs are derived from the network name, so they stay the same across
//! restarts.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Daemon, DaemonError, NetState};
use crate::config::{Mode, NetworkSpec};
use crate::dhcp::{DhcpServer, LeaseDb};
use crate::port as ports;
use crate::switch::Network;

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
    pub(super) fn start_network(
        spec: NetworkSpec,
        state_dir: &Path,
    ) -> Result<NetState, DaemonError> {
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
                services.extend(spec.dns.as_ref().map(|d| d.addr));
                let reserved: Vec<([u8; 6], std::net::Ipv4Addr)> = spec
                    .dhcp
                    .as_ref()
                    .map(|d| d.reservations.iter().map(|r| (r.mac, r.ip)).collect())
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
            names: spec
                .dns
                .as_ref()
                .map(|d| crate::dns::LocalNames::new(d.zone.clone())),
            dns_task: None,
            ipv6: None,
        };
        let fail = |st: NetState, e: DaemonError| {
            stop_network(st);
            Err(e)
        };
        if let (Some(h), Some(v4)) = (&spec.host_ifname, &spec.ipv4) {
            match ports::start_host_port(
                &net,
                h,
                v4.gateway,
                v4.mask(),
                spec.ipv6.as_ref().map(|v| v.gateway),
            ) {
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
            if let Some(n) = &st.names {
                server.set_names(n.clone());
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
        if let Some(v6) = &spec.ipv6 {
            match start_ipv6(&net, &spec, v6, state_dir, router_mac) {
                Ok(svc) => {
                    st.ipv6 = Some(svc);
                    if let (Some(n), Some(g)) = (&st.names, net.ip6_guard()) {
                        n.set_ipv6(g.clone());
                    }
                }
                Err(e) => return fail(st, e),
            }
        }
        net.set_isolated(spec.isolated);
        if let Some(cfg) = &spec.nat {
            let mut cfg = cfg.clone();
            cfg.mac = router_mac;
            cfg.names = st.names.clone().map(crate::dns::SharedNames);
            // The router runs the IPv6 service itself (see `nat/v6.rs`).
            cfg.ipv6_service = st.ipv6.clone().map(crate::ipv6::SharedService);
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
        if let (Some(d), Some(names), None) = (&spec.dns, &st.names, &spec.nat) {
            match start_dns(&net, &spec, d, names.clone()) {
                Ok(t) => st.dns_task = Some(t),
                Err(e) => return fail(st, e),
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
}

/// Starts the DNS responder of a hostonly or internal network (see
/// [`crate::modes::dns`]): on the host TAP's address when `dns` is a hostonly
/// network's gateway, else as a service port owning the address.
fn start_dns(
    net: &Arc<Network>,
    spec: &NetworkSpec,
    d: &crate::config::DnsSpec,
    names: Arc<crate::dns::LocalNames>,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    use crate::dns::tcp::{TcpDns, MAX_CONNECTIONS, MAX_PER_CLIENT};
    use crate::modes::dns::{host_listener, host_socket, serve, Front};
    let gateway = spec.ipv4.as_ref().map(|v| v.gateway);
    let dns_err = |e| DaemonError::Dns(spec.name.clone(), d.addr, e);
    let mut tcp = None;
    let front = match &spec.host_ifname {
        Some(h) if gateway == Some(d.addr) => {
            let l = host_listener(d.addr, h).map_err(dns_err)?;
            let t = TcpDns::new(
                names.clone(),
                d.resolv_conf.clone(),
                MAX_CONNECTIONS,
                MAX_PER_CLIENT,
            );
            tcp = Some(t.spawn(l).map_err(dns_err)?);
            Front::Socket(host_socket(d.addr, h).map_err(dns_err)?)
        }
        _ => {
            let port = net
                .attach_service("dns", 256)
                .map_err(|e| DaemonError::DnsAttach(spec.name.clone(), e))?;
            let mac = service_mac(&spec.name, 3);
            net.pin_mac("dns", mac)
                .map_err(|e| DaemonError::DnsAttach(spec.name.clone(), e))?;
            Front::Port {
                port,
                mac,
                addr: d.addr,
                mtu: spec.mtu as usize,
            }
        }
    };
    tracing::info!(network = %spec.name, addr = %d.addr, domain = %d.zone.domain, "DNS responder up");
    let resolv_conf = d.resolv_conf.clone();
    Ok(tokio::spawn(async move {
        // The TCP front lives (and stops) with the UDP responder.
        let _tcp = tcp;
        serve(names, resolv_conf, front).await
    }))
}

/// Starts the IPv6 service of a network with `subnet6` (see [`crate::ipv6`]): its
/// own service port and MAC; the gateway address is the host TAP's on hostonly.
/// On a NAT network the service is the router's (`router_mac`, no port of its
/// own): the router runs it on its thread (see `nat/v6.rs`).
fn start_ipv6(
    net: &Arc<Network>,
    spec: &NetworkSpec,
    v6: &crate::config::Ipv6Spec,
    state_dir: &Path,
    router_mac: [u8; 6],
) -> Result<Arc<Mutex<crate::ipv6::Ipv6Service>>, DaemonError> {
    let path = state_dir.join(format!("leases6-{}.json", spec.name));
    let db = crate::ipv6::dhcp6::Lease6Db::load(Some(path))
        .map_err(|e| DaemonError::Leases6(spec.name.clone(), e))?;
    let nat = spec.nat.is_some();
    let mac = if nat {
        router_mac
    } else {
        service_mac(&spec.name, 4)
    };
    let own_gateway = spec.host_ifname.is_none();
    let mut svc = crate::ipv6::Ipv6Service::new(v6.clone(), mac, spec.mtu, own_gateway, db);
    if nat {
        svc.set_router();
    }
    let ll = svc.link_local();
    let mut protected = vec![v6.gateway, ll];
    protected.extend(v6.dns);
    let guard = Arc::new(crate::switch::guard6::Ip6Guard::new(
        v6.prefix,
        &protected,
        Duration::from_secs(spec.mac_ageing),
    ));
    guard.set_leases(svc.dhcp6.db.leases());
    net.set_ip6_guard(guard);
    let svc = Arc::new(Mutex::new(svc));
    if nat {
        tracing::info!(network = %spec.name, prefix = %v6.prefix, link_local = %ll, "IPv6 on the NAT router");
        return Ok(svc);
    }
    let port = net
        .attach_service("ipv6", 256)
        .map_err(|e| DaemonError::Ipv6Attach(spec.name.clone(), e))?;
    net.pin_mac("ipv6", mac)
        .map_err(|e| DaemonError::Ipv6Attach(spec.name.clone(), e))?;
    tracing::info!(network = %spec.name, prefix = %v6.prefix, link_local = %ll, "IPv6 service up");
    tokio::spawn(crate::ipv6::run(
        svc.clone(),
        port,
        net.ip6_guard().cloned(),
    ));
    Ok(svc)
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

pub(super) fn stop_network(st: NetState) {
    // Captures end first: their readers get the statistics and the end of stream.
    st.net.end_captures();
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
    // And the DNS responder (a socket front has no port: its task is stopped).
    if let Some(t) = st.dns_task {
        t.abort();
    }
    let _ = st.net.remove_port("dns");
    let _ = st.net.remove_port("ipv6");
}
