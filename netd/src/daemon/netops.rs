//! Runtime networks and reservations, and what makes runtime changes last:
//! [`Daemon::start_persistent`] starts the config file's networks with their
//! runtime changes and the networks added through the API (see
//! `daemon/runtime.rs` for the state file and which side wins), `net_add` /
//! `net_del`, the `reservation_*` requests, and the hooks that record a port or
//! forward change in the state after the daemon made it.
//!
//! A runtime network is checked as the config file's are: its table by
//! [`NetworkConfig::validate_at`], then against the running networks (its name, and
//! every interface it would use, free). A NAT network denies every other
//! network's subnet; one added at runtime is denied to the NAT networks already
//! running too (their routers are told), and `net del` lifts that deny at once
//! (unless the other network's table or runtime changes deny the subnet
//! themselves). `net del` also ends the captures running on the network.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fabric_api::netd::{NetInfo, PolicyList, Reservation, ReservationInfo, Source};

use super::runtime::{self, Changes, Entry, ForwardKey, Runtime};
use super::{stop_network, ControlCounters, Daemon, DaemonError, NetState};
use crate::config::{Config, NetworkConfig, NetworkSpec};
use crate::nat::{NatRequest, OutboundChange};

/// What the control API calls the source of a runtime table in errors.
pub const CONTROL_PATH: &str = "<control>";

/// Every interface a network uses: its ports', its host TAP, its uplink.
fn ifnames(spec: &NetworkSpec) -> impl Iterator<Item = &String> {
    spec.ports
        .iter()
        .filter_map(|p| p.ifname.as_ref())
        .chain(spec.host_ifname.as_ref())
        .chain(spec.uplink.as_ref())
}

impl Daemon {
    /// Starts the networks of the config file `cfg` (read from `config_path`) with
    /// the runtime state of its `state_dir` on top (see `daemon/runtime.rs`). A
    /// state file that cannot be read is reported and set aside; a network whose
    /// runtime changes no longer start is started from the config file alone (the
    /// changes are kept, the conflict shown); an API network that cannot start is
    /// kept in the state and listed with the reason. Only a config file network
    /// that cannot start stops netd, as before.
    pub fn start_persistent(cfg: &Config, config_path: &Path) -> Result<Arc<Self>, DaemonError> {
        let state_dir = &cfg.state_dir;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| DaemonError::StateDir(state_dir.to_path_buf(), e))?;
        let specs = cfg.validate(config_path).map_err(DaemonError::BadNetwork)?;
        let mut rt = Runtime {
            path: state_dir.join(runtime::STATE_FILE),
            config_path: config_path.to_path_buf(),
            ..Runtime::default()
        };
        let stored = match runtime::load(&rt.path) {
            Ok(s) => s,
            Err(e) => {
                let moved = runtime::set_aside(&rt.path)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|m| format!("not moved: {m}"));
                tracing::error!(
                    error = %fabric_util::error_chain(&e),
                    set_aside = %moved,
                    "the runtime state cannot be read; starting with the config file's networks alone"
                );
                Vec::new()
            }
        };
        let (mut config_changes, mut api) = (std::collections::BTreeMap::new(), Vec::new());
        for s in stored {
            match (s.source, s.table) {
                (Source::Config, _) => {
                    config_changes.insert(s.name, s.changes);
                }
                (Source::Api, Some(table)) => api.push((s.name, table, s.changes)),
                (Source::Api, None) => tracing::warn!(
                    network = %s.name,
                    state = %rt.path.display(),
                    "an API network without its table in the runtime state; dropped"
                ),
            }
        }
        // The config file's networks, each with its runtime changes applied.
        let mut merged = cfg.clone();
        for t in merged.network.iter_mut() {
            let mut changes = config_changes.remove(&t.name).unwrap_or_default();
            let (eff, conflicts) = changes.apply(t);
            for c in conflicts {
                rt.conflict(&t.name, c);
            }
            rt.nets.insert(
                t.name.clone(),
                Entry {
                    source: Source::Config,
                    base: t.clone(),
                    changes,
                },
            );
            *t = eff;
        }
        for name in config_changes.keys() {
            tracing::warn!(
                network = %name,
                config = %config_path.display(),
                "runtime changes of a network no longer in the config file; dropped"
            );
        }
        let merged_specs = match merged.validate(config_path) {
            Ok(mut s) => {
                for spec in s.iter_mut() {
                    if let (Some(nat), Some(e)) = (spec.nat.as_mut(), rt.nets.get(&spec.name)) {
                        e.changes.apply_outbound(nat);
                    }
                }
                Some(s)
            }
            Err(e) => {
                let what = format!(
                    "the runtime changes do not fit the config file ({}); every config network starts from the file alone",
                    fabric_util::error_chain(&e)
                );
                for name in rt.nets.keys().cloned().collect::<Vec<_>>() {
                    rt.conflict(&name, what.clone());
                }
                None
            }
        };
        let d = Arc::new(Daemon {
            nets: Mutex::new(std::collections::BTreeMap::new()),
            control: ControlCounters::default(),
            state_dir: state_dir.clone(),
            runtime: Mutex::new(None),
        });
        for (i, spec) in specs.into_iter().enumerate() {
            let with_changes = merged_specs.as_ref().and_then(|m| m.get(i)).cloned();
            let st = match with_changes.filter(|m| *m != spec) {
                None => Self::start_network(spec, state_dir),
                Some(m) => Self::start_network(m, state_dir).or_else(|e| {
                    rt.conflict(
                        &spec.name,
                        format!(
                            "the network does not start with its runtime changes ({}); started from the config file alone, the changes kept",
                            fabric_util::error_chain(&e)
                        ),
                    );
                    Self::start_network(spec, state_dir)
                }),
            };
            match st {
                Ok(st) => {
                    d.lock().insert(st.spec.name.clone(), st);
                }
                Err(e) => {
                    d.shutdown();
                    return Err(e);
                }
            }
        }
        // The networks added through the API, after the file's (which win a name).
        for (name, table, changes) in api {
            let mut entry = Entry {
                source: Source::Api,
                base: table,
                changes,
            };
            if rt.nets.contains_key(&name) {
                let what = format!(
                    "a network {name:?} was added through the API (kept in {}, not started): the config file's network of that name wins; `netd net del {name}` drops the API copy",
                    rt.path.display()
                );
                rt.conflict(&name, what.clone());
                rt.idle.insert(name, (entry, what));
                continue;
            }
            let (eff, conflicts) = entry.changes.apply(&entry.base);
            for c in conflicts {
                rt.conflict(&name, c);
            }
            match d.net_add_table(&eff, &entry.changes) {
                Ok(()) => {
                    rt.nets.insert(name, entry);
                }
                Err(e) => {
                    let why = fabric_util::error_chain(&e);
                    tracing::warn!(network = %name, state = %rt.path.display(), error = %why, "a network added through the API does not start; kept in the runtime state");
                    rt.idle.insert(name, (entry, why));
                }
            }
        }
        if let Err(e) = rt.save() {
            tracing::warn!(error = %fabric_util::error_chain(&e), "cannot save the runtime state");
        }
        *d.runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(rt);
        Ok(d)
    }

    fn runtime(&self) -> std::sync::MutexGuard<'_, Option<Runtime>> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the runtime entry of `net` and saves the state. Without runtime
    /// state (a daemon from [`Daemon::start`]) nothing is recorded.
    fn record(
        &self,
        net: &str,
        f: impl FnOnce(&mut Changes, &NetworkConfig),
    ) -> Result<(), DaemonError> {
        let mut guard = self.runtime();
        let Some(rt) = guard.as_mut() else {
            return Ok(());
        };
        let Some(e) = rt.nets.get_mut(net) else {
            return Ok(());
        };
        f(&mut e.changes, &e.base);
        rt.save().map_err(DaemonError::State)
    }

    /// Records a port added at runtime (`port` as validated, named `name`).
    pub(super) fn record_port_add(
        &self,
        net: &str,
        mut port: fabric_api::netd::PortConfig,
        name: String,
    ) -> Result<(), DaemonError> {
        port.name = Some(name);
        self.record(net, |c, _| c.port_added(port))
    }

    /// Records a port removed at runtime.
    pub(super) fn record_port_del(&self, net: &str, name: &str) -> Result<(), DaemonError> {
        self.record(net, |c, base| c.port_removed(base, name))
    }

    /// Records a forward added at runtime.
    pub(super) fn record_forward_add(
        &self,
        net: &str,
        f: fabric_api::netd::Forward,
    ) -> Result<(), DaemonError> {
        self.record(net, |c, _| c.forward_added(f))
    }

    /// Records a forward removed at runtime.
    pub(super) fn record_forward_del(&self, net: &str, k: ForwardKey) -> Result<(), DaemonError> {
        self.record(net, |c, base| c.forward_removed(base, k))
    }

    /// Records a remote added to or removed from a vxlan port's flood list.
    pub(super) fn record_remote(
        &self,
        net: &str,
        port: &str,
        remote: std::net::Ipv4Addr,
        added: bool,
    ) -> Result<(), DaemonError> {
        self.record(net, |c, _| c.remote_changed(port, remote, added))
    }

    /// Records a CIDR added to or removed from a NAT network's outbound list.
    pub(super) fn record_outbound(
        &self,
        net: &str,
        list: PolicyList,
        cidr: crate::nat::Cidr,
        added: bool,
    ) -> Result<(), DaemonError> {
        self.record(net, |c, _| c.outbound_changed(list, cidr, added))
    }

    /// Starts a network from a table (not yet validated), checked against the
    /// running networks; the NAT networks deny each other's subnets. `changes`'
    /// outbound changes are replayed on its router's lists.
    fn net_add_table(&self, table: &NetworkConfig, changes: &Changes) -> Result<(), DaemonError> {
        let mut spec = table
            .validate_at(CONTROL_PATH, "")
            .map_err(DaemonError::BadNetwork)?;
        let mut nets = self.lock();
        if nets.contains_key(&spec.name) {
            return Err(DaemonError::NetworkExists(spec.name));
        }
        for ifn in ifnames(&spec) {
            let used = nets.values().any(|st| {
                st.ports.iter().any(|p| p.spec.ifname.as_ref() == Some(ifn))
                    || ifnames(&st.spec).any(|i| i == ifn)
            });
            if used {
                return Err(DaemonError::IfnameInUse(ifn.clone()));
            }
        }
        let subnets = subnets_of(&spec);
        if let Some(nat) = spec.nat.as_mut() {
            for st in nets.values() {
                if let Some(v) = &st.spec.ipv4 {
                    let sub = (v.network, v.prefix);
                    if !nat.outbound_deny.contains(&sub) {
                        nat.outbound_deny.push(sub);
                    }
                }
                if let Some(v) = &st.spec.ipv6 {
                    if !nat.outbound_deny6.contains(&(v.prefix, 64)) {
                        nat.outbound_deny6.push((v.prefix, 64));
                    }
                }
            }
            changes.apply_outbound(nat);
        }
        let others: Vec<(String, crate::nat::RouterHandle)> = nets
            .values()
            .filter_map(|st| st.nat.clone().map(|h| (st.spec.name.clone(), h)))
            .collect();
        let st = Self::start_network(spec, &self.state_dir)?;
        let name = st.spec.name.clone();
        nets.insert(name.clone(), st);
        drop(nets);
        for sub in subnets {
            for (other, h) in &others {
                let deny = OutboundChange::Add(PolicyList::Deny, sub);
                if let Err(e) = h.request_blocking(NatRequest::Outbound(deny)) {
                    tracing::warn!(network = %other, new = %name, subnet = %sub, error = %fabric_util::error_chain(&e), "cannot deny the new network's subnet");
                }
            }
        }
        tracing::info!(network = %name, "network added at runtime");
        Ok(())
    }

    /// `net_add`: starts the network of `table` (one `[[network]]` table as JSON)
    /// and records it.
    pub(super) fn net_add(&self, table: fabric_api::netd::NetworkTable) -> Result<(), DaemonError> {
        let table: NetworkConfig = serde_json::from_value(serde_json::Value::Object(table))
            .map_err(|e| {
                DaemonError::BadNetwork(crate::config::ConfigError::File(
                    fabric_util::toml_file::TomlFileError::Parse {
                        path: PathBuf::from(CONTROL_PATH),
                        message: e.to_string(),
                    },
                ))
            })?;
        let mut guard = self.runtime();
        let rt = guard.as_mut().ok_or(DaemonError::NoRuntimeState)?;
        if rt.idle.contains_key(&table.name) {
            return Err(DaemonError::NetworkExists(table.name));
        }
        self.net_add_table(&table, &Changes::default())?;
        let name = table.name.clone();
        rt.nets.insert(
            name,
            Entry {
                source: Source::Api,
                base: table,
                changes: Changes::default(),
            },
        );
        rt.save().map_err(DaemonError::State)
    }

    /// `net_del`: removes a network added through the API (refused while it has
    /// guest ports, unless `force`), or the API copy a config network shadows.
    /// Returns what was done.
    pub(super) fn net_del(&self, name: &str, force: bool) -> Result<String, DaemonError> {
        let mut guard = self.runtime();
        let rt = guard.as_mut().ok_or(DaemonError::NoRuntimeState)?;
        let source = rt.nets.get(name).map(|e| e.source);
        if source != Some(Source::Api) {
            if rt.idle.remove(name).is_some() {
                rt.save().map_err(DaemonError::State)?;
                return Ok(format!(
                    "removed the API copy of network {name} from {}",
                    rt.path.display()
                ));
            }
            if source == Some(Source::Config) {
                return Err(DaemonError::ConfigNetwork(
                    name.to_string(),
                    rt.config_path.clone(),
                ));
            }
            return Err(DaemonError::NoSuchNetwork(name.to_string()));
        }
        let st: NetState = {
            let mut nets = self.lock();
            let st = nets
                .get(name)
                .ok_or_else(|| DaemonError::NoSuchNetwork(name.to_string()))?;
            let guests: Vec<&str> = st
                .ports
                .iter()
                .filter(|p| p.kind != crate::switch::PortClass::Uplink)
                .map(|p| p.spec.name.as_str())
                .collect();
            if !guests.is_empty() && !force {
                return Err(DaemonError::NetInUse(name.to_string(), guests.join(", ")));
            }
            nets.remove(name)
                .ok_or_else(|| DaemonError::NoSuchNetwork(name.to_string()))?
        };
        let ports = st.ports.len();
        let subnets = subnets_of(&st.spec);
        stop_network(st);
        for sub in subnets {
            self.lift_deny(rt, name, sub);
        }
        let leases = self.state_dir.join(format!("leases-{name}.json"));
        if let Err(e) = std::fs::remove_file(&leases) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %leases.display(), error = %e, "cannot remove the lease file");
            }
        }
        rt.nets.remove(name);
        rt.conflicts.remove(name);
        tracing::info!(network = name, ports, force, "network removed");
        rt.save().map_err(DaemonError::State)?;
        Ok(format!("removed network {name}"))
    }

    /// Tells the NAT routers of the other networks that the subnet `sub` of the
    /// removed network `gone` is no longer to be denied, where only that network
    /// put it on their deny list: not a router whose table or runtime changes deny
    /// it, nor a default entry, nor while another network has that subnet too.
    fn lift_deny(&self, rt: &Runtime, gone: &str, sub: crate::nat::Cidr) {
        let routers: Vec<(String, crate::nat::RouterHandle)> = {
            let nets = self.lock();
            let shared = nets
                .values()
                .any(|st| st.spec.name != gone && subnets_of(&st.spec).contains(&sub));
            let default = match sub {
                crate::nat::Cidr::V4(c) => crate::nat::DEFAULT_DENY.contains(&c),
                crate::nat::Cidr::V6(_) => false,
            };
            if shared || default {
                return;
            }
            nets.values()
                .filter_map(|st| st.nat.clone().map(|h| (st.spec.name.clone(), h)))
                .collect()
        };
        for (other, h) in routers {
            let kept = rt.nets.get(&other).is_some_and(|e| {
                e.changes.denies(sub)
                    || e.effective()
                        .outbound_deny
                        .iter()
                        .flatten()
                        .any(|c| crate::nat::parse_cidr_any(c).is_ok_and(|c| c == sub))
            });
            if kept {
                continue;
            }
            let lift = OutboundChange::Del(PolicyList::Deny, sub);
            match h.request_blocking(NatRequest::Outbound(lift)) {
                Ok(_) => {
                    tracing::info!(network = %other, removed = gone, "the removed network's subnet is no longer denied")
                }
                Err(e) => {
                    tracing::warn!(network = %other, removed = gone, error = %fabric_util::error_chain(&e), "cannot lift the deny of the removed network's subnet")
                }
            }
        }
    }

    /// `net_list` with each network's source and conflicts, and the API networks
    /// that are not running.
    pub(super) fn net_list_full(&self) -> Vec<NetInfo> {
        let mut list = self.net_list();
        let guard = self.runtime();
        let Some(rt) = guard.as_ref() else {
            return list;
        };
        for n in list.iter_mut() {
            n.source = rt.nets.get(&n.name).map(|e| e.source);
            n.conflict = rt.conflicts.get(&n.name).map(|c| c.join("; "));
        }
        for (name, (e, why)) in &rt.idle {
            if list.iter().any(|n| n.name == *name) {
                continue;
            }
            list.push(NetInfo {
                name: name.clone(),
                mode: e.base.mode,
                subnet: e.base.subnet.clone(),
                gateway: e.base.gateway.map(|g| g.to_string()),
                dhcp: false,
                mtu: e.base.mtu.unwrap_or(1500),
                ports: 0,
                host_ifname: None,
                source: Some(Source::Api),
                conflict: Some(format!("not running: {why}")),
            });
        }
        list
    }

    /// Changes the reservations of `net` by `change`, checked as the config file's
    /// are, and gives the DHCP server (and the port guard) the new list.
    fn change_reservations(
        &self,
        net: &str,
        change: impl FnOnce(&mut Changes, &NetworkConfig) -> Result<(), DaemonError>,
    ) -> Result<(), DaemonError> {
        let mut guard = self.runtime();
        let rt = guard.as_mut().ok_or(DaemonError::NoRuntimeState)?;
        let e = rt
            .nets
            .get_mut(net)
            .ok_or_else(|| DaemonError::NoSuchNetwork(net.to_string()))?;
        let mut changes = e.changes.clone();
        change(&mut changes, &e.base)?;
        let candidate = Entry {
            changes,
            ..e.clone()
        };
        let eff = candidate.effective();
        let spec = eff
            .validate_at(CONTROL_PATH, "")
            .map_err(DaemonError::BadNetwork)?;
        let dhcp = spec
            .dhcp
            .ok_or_else(|| DaemonError::NoDhcp(net.to_string()))?;
        let mut ips = std::collections::HashMap::new();
        for r in &dhcp.reservations {
            if let Some(other) = ips.insert(r.ip, r.mac) {
                return Err(DaemonError::ReservedTwice(
                    net.to_string(),
                    r.ip,
                    crate::config::fmt_mac(&other),
                ));
            }
        }
        self.with_net(net, |st| {
            st.dhcp.as_ref().map(|d| {
                d.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_reservations(dhcp.reservations.clone())
            })
        })?
        .ok_or_else(|| DaemonError::NoDhcp(net.to_string()))?;
        e.changes = candidate.changes;
        rt.save().map_err(DaemonError::State)
    }

    /// `reservation_add`.
    pub(super) fn reservation_add(&self, net: &str, r: Reservation) -> Result<(), DaemonError> {
        self.change_reservations(net, |c, base| {
            c.reservation_added(base, r);
            Ok(())
        })?;
        tracing::info!(network = net, "reservation added");
        Ok(())
    }

    /// `reservation_del`.
    pub(super) fn reservation_del(&self, net: &str, mac: &str) -> Result<(), DaemonError> {
        let key = runtime::mac_key(mac);
        self.change_reservations(net, |c, base| {
            let eff = c.clone().apply(base).0;
            if !eff
                .reservation
                .iter()
                .any(|r| runtime::mac_key(&r.mac) == key)
            {
                return Err(DaemonError::NoReservation(net.to_string(), key.clone()));
            }
            c.reservation_removed(base, &key);
            Ok(())
        })?;
        tracing::info!(network = net, mac = %key, "reservation removed");
        Ok(())
    }

    /// `reservation_list`: the network's reservations and where each comes from.
    pub(super) fn reservation_list(&self, net: &str) -> Result<Vec<ReservationInfo>, DaemonError> {
        let guard = self.runtime();
        let rt = guard.as_ref().ok_or(DaemonError::NoRuntimeState)?;
        let e = rt
            .nets
            .get(net)
            .ok_or_else(|| DaemonError::NoSuchNetwork(net.to_string()))?;
        let api: Vec<String> = e
            .changes
            .reservations
            .iter()
            .map(|r| runtime::mac_key(&r.mac))
            .collect();
        let mut out: Vec<ReservationInfo> = e
            .effective()
            .reservation
            .into_iter()
            .map(|r| {
                let mac = runtime::mac_key(&r.mac);
                let source = if api.contains(&mac) || e.source == Source::Api {
                    Source::Api
                } else {
                    Source::Config
                };
                ReservationInfo {
                    mac,
                    ip: r.ip,
                    hostname: r.hostname,
                    source,
                }
            })
            .collect();
        out.sort_by_key(|r| r.ip);
        Ok(out)
    }
}

/// The subnets of a network that the NAT networks deny each other: its IPv4
/// subnet and its IPv6 prefix (a /64), where it has them.
fn subnets_of(spec: &crate::config::NetworkSpec) -> Vec<crate::nat::Cidr> {
    let v4 = spec
        .ipv4
        .as_ref()
        .map(|v| crate::nat::Cidr::V4((v.network, v.prefix)));
    let v6 = spec
        .ipv6
        .as_ref()
        .map(|v| crate::nat::Cidr::V6((v.prefix, 64)));
    v4.into_iter().chain(v6).collect()
}
