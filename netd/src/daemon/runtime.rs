//! Runtime state: what the control API changed, kept in `state_dir/runtime.json`
//! so that it comes back after a restart.
//!
//! Theory of operation. Every network has a *base* table and its runtime
//! [`Changes`]. The base of a network of the config file is its `[[network]]`
//! table there (read afresh at every start, never stored here); the base of a
//! network added with `net add` is the table it was added with (stored). The
//! changes are the ports, port forwards and DHCP reservations added, and those of
//! the base removed, each by its identity (a port by name, a forward by protocol
//! and host address, a reservation by MAC), the remotes added to or removed from
//! vxlan ports' flood lists, and the CIDRs added to or removed from a NAT network's
//! outbound lists. The network netd runs is the base with the changes applied
//! ([`Changes::apply`]): removals first, then additions, so a config port removed
//! and added again with other settings is the new one; then the flood list changes
//! on the ports so found (a change of a port no longer there is a conflict). The
//! outbound changes are replayed, in order, on the router's validated lists
//! ([`Changes::apply_outbound`]: the file's entries, the defaults and the other
//! networks' subnets), since the defaults and the subnets are in no table.
//!
//! The config file wins. When the file changed under the state (a port added at
//! runtime is now in the file too, a removed one is gone from it, a network added
//! at runtime now has a namesake in the file) the file's item is used, the runtime
//! one is set aside with a warning naming both, and `net list` shows the conflict.
//! The file is what the administrator edits, reviews and keeps in version control;
//! the state is what the API did since, on top of it.
//!
//! The file is written whole after every change ([`fabric_util::fs::write_durable`]:
//! temporary file, fsync, rename, fsync of the directory, mode 0600). A file that
//! cannot be read as the state is reported (its path and the parser's message),
//! moved aside to `runtime.json.corrupt`, and netd starts with the config file's
//! networks alone.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use fabric_api::netd::{Forward, PolicyList, PortConfig, PortKind, Proto, Reservation, Source};
use fabric_util::MacAddr;
use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;

/// The state file's name in `state_dir`.
pub const STATE_FILE: &str = "runtime.json";

/// The state file's format version.
const VERSION: u32 = 1;

/// State file errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// cannot read runtime state {0}
    #[error("cannot read runtime state {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// runtime state {0} is corrupt
    #[error("runtime state {0} is corrupt")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// runtime state {0} has version {1}, this netd reads version 1
    #[error("runtime state {0} has version {1}, this netd reads version {VERSION}")]
    Version(PathBuf, u32),
    /// cannot write runtime state {0}
    #[error("cannot write runtime state {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// A forward's identity: its protocol and host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardKey {
    /// Protocol.
    pub proto: Proto,
    /// Host address.
    pub host: SocketAddr,
}

impl From<&Forward> for ForwardKey {
    fn from(f: &Forward) -> Self {
        ForwardKey {
            proto: f.proto,
            host: f.host,
        }
    }
}

/// What the control API changed on top of a network's base table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Changes {
    /// Ports added (each with its `name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortConfig>,
    /// Names of base ports removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_ports: Vec<String>,
    /// Forwards added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
    /// Base forwards removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_forwards: Vec<ForwardKey>,
    /// Reservations added (or replacing a base one of the same MAC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<Reservation>,
    /// MACs of base reservations removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_reservations: Vec<String>,
    /// Remotes added to or removed from vxlan ports' flood lists (`netd vxlan
    /// remote add|del`), the last change of each (port, remote).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vxlan_remotes: Vec<RemoteChange>,
    /// CIDRs added to or removed from the NAT router's outbound lists (`netd
    /// outbound add|del`), the last change of each (list, CIDR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<OutboundEdit>,
}

/// A runtime change of a vxlan port's flood list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteChange {
    /// The vxlan port's name.
    pub port: String,
    /// The remote VTEP.
    pub remote: Ipv4Addr,
    /// Added (else removed).
    pub added: bool,
}

/// A runtime change of a NAT network's outbound lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundEdit {
    /// Which list.
    pub list: PolicyList,
    /// The CIDR, `A.B.C.D/LEN`.
    pub cidr: String,
    /// Added (else removed).
    pub added: bool,
}

/// A MAC as the state keeps it (`aa:bb:cc:dd:ee:ff`, lower case), or the text as
/// given when it is not a MAC (validation refuses it later).
pub fn mac_key(s: &str) -> String {
    s.parse::<MacAddr>()
        .map(|m| m.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// The name netd gives a port of a table (see `validate_port`).
fn port_key(p: &PortConfig) -> String {
    crate::config::validate_port(p, "", "")
        .map(|s| s.name)
        .unwrap_or_else(|_| p.shown_name())
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

impl Changes {
    /// Whether nothing was changed.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// A port was added (`port.name` set).
    pub fn port_added(&mut self, port: PortConfig) {
        let name = port_key(&port);
        self.ports.retain(|p| port_key(p) != name);
        self.vxlan_remotes.retain(|r| r.port != name);
        self.ports.push(port);
    }

    /// The port `name` was removed.
    pub fn port_removed(&mut self, base: &NetworkConfig, name: &str) {
        self.ports.retain(|p| port_key(p) != name);
        self.vxlan_remotes.retain(|r| r.port != name);
        if base.port.iter().any(|p| port_key(p) == name) {
            push_unique(&mut self.removed_ports, name.to_string());
        }
    }

    /// A forward was added.
    pub fn forward_added(&mut self, f: Forward) {
        let k = ForwardKey::from(&f);
        self.forwards.retain(|x| ForwardKey::from(x) != k);
        self.forwards.push(f);
    }

    /// The forward `k` was removed.
    pub fn forward_removed(&mut self, base: &NetworkConfig, k: ForwardKey) {
        self.forwards.retain(|x| ForwardKey::from(x) != k);
        if base.forward.iter().any(|x| ForwardKey::from(x) == k) {
            push_unique(&mut self.removed_forwards, k);
        }
    }

    /// A reservation was added; it replaces any other of its MAC.
    pub fn reservation_added(&mut self, base: &NetworkConfig, mut r: Reservation) {
        r.mac = mac_key(&r.mac);
        let mac = r.mac.clone();
        self.reservation_removed(base, &mac);
        self.reservations.push(r);
    }

    /// The reservation of `mac` was removed.
    pub fn reservation_removed(&mut self, base: &NetworkConfig, mac: &str) {
        let mac = mac_key(mac);
        self.reservations.retain(|x| mac_key(&x.mac) != mac);
        if base.reservation.iter().any(|x| mac_key(&x.mac) == mac) {
            push_unique(&mut self.removed_reservations, mac);
        }
    }

    /// `remote` was added to (`added`) or removed from vxlan port `port`'s flood
    /// list.
    pub fn remote_changed(&mut self, port: &str, remote: Ipv4Addr, added: bool) {
        self.vxlan_remotes
            .retain(|r| !(r.port == port && r.remote == remote));
        self.vxlan_remotes.push(RemoteChange {
            port: port.to_string(),
            remote,
            added,
        });
    }

    /// `cidr` was added to (`added`) or removed from the outbound list `list`.
    pub fn outbound_changed(&mut self, list: PolicyList, cidr: crate::nat::Cidr, added: bool) {
        let cidr = cidr.to_string();
        self.outbound
            .retain(|o| !(o.list == list && o.cidr == cidr));
        self.outbound.push(OutboundEdit { list, cidr, added });
    }

    /// Replays the outbound changes on a router's validated lists (the file's
    /// entries, the defaults and the other networks' subnets), in order.
    pub fn apply_outbound(&self, nat: &mut crate::nat::RouterConfig) {
        for o in &self.outbound {
            let Ok(cidr) = crate::nat::parse_cidr_any(&o.cidr) else {
                tracing::warn!(cidr = %o.cidr, "an outbound change of the runtime state is not a CIDR; skipped");
                continue;
            };
            nat.outbound_edit(o.list, cidr, o.added);
        }
    }

    /// Whether the outbound changes added `cidr` to the deny list.
    pub fn denies(&self, cidr: crate::nat::Cidr) -> bool {
        let cidr = cidr.to_string();
        self.outbound
            .iter()
            .any(|o| o.list == PolicyList::Deny && o.added && o.cidr == cidr)
    }

    /// The base with these changes applied, and the changes that no longer fit the
    /// base (the base wins; each is described for the log and `net list`). The
    /// changes are left holding only what applied.
    pub fn apply(&mut self, base: &NetworkConfig) -> (NetworkConfig, Vec<String>) {
        let mut t = base.clone();
        let mut conflicts = Vec::new();
        let mut c = |what: String, removed: bool| {
            conflicts.push(if removed {
                format!("{what}, removed at runtime, is no longer in the base table")
            } else {
                format!("{what}, added at runtime, is now in the base table too: that one is used")
            })
        };
        apply_items(
            &mut t.port,
            &mut self.removed_ports,
            &mut self.ports,
            port_key,
            |name| format!("port {name:?}"),
            &mut c,
        );
        apply_items(
            &mut t.forward,
            &mut self.removed_forwards,
            &mut self.forwards,
            |f: &Forward| ForwardKey::from(f),
            |k| format!("{} forward {}", k.proto, k.host),
            &mut c,
        );
        apply_items(
            &mut t.reservation,
            &mut self.removed_reservations,
            &mut self.reservations,
            |r| mac_key(&r.mac),
            |mac| format!("the reservation of {mac}"),
            &mut c,
        );
        // Flood list changes, on the ports as they now are.
        self.vxlan_remotes.retain(|r| {
            let port = t
                .port
                .iter_mut()
                .find(|p| p.kind == PortKind::Vxlan && port_key(p) == r.port);
            let Some(p) = port else {
                conflicts.push(format!(
                    "the flood list change of vxlan port {:?} (remote {}) has no such port in the base table any more",
                    r.port, r.remote
                ));
                return false;
            };
            p.vxlan.remotes.retain(|x| *x != r.remote);
            if r.added {
                p.vxlan.remotes.push(r.remote);
            }
            true
        });
        (t, conflicts)
    }
}

/// Applies one kind of change to the base's `items`: every key of `removed` is
/// taken out, then every item of `added` put in. A removal that finds nothing and
/// an addition whose key the base has already are reported to `conflict` (with
/// `true` for a removal) and dropped from the changes.
fn apply_items<T: Clone, K: PartialEq>(
    items: &mut Vec<T>,
    removed: &mut Vec<K>,
    added: &mut Vec<T>,
    key: impl Fn(&T) -> K,
    name: impl Fn(&K) -> String,
    conflict: &mut impl FnMut(String, bool),
) {
    removed.retain(|k| {
        let had = items.len();
        items.retain(|x| key(x) != *k);
        let found = items.len() != had;
        if !found {
            conflict(name(k), true);
        }
        found
    });
    added.retain(|x| {
        let k = key(x);
        let clash = items.iter().any(|y| key(y) == k);
        if clash {
            conflict(name(&k), false);
        } else {
            items.push(x.clone());
        }
        !clash
    });
}

/// One network in the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredNet {
    /// The network's name.
    pub name: String,
    /// `config`: changes to a network of the config file; `api`: a network added
    /// with `net add`.
    pub source: Source,
    /// The table an `api` network was added with (absent for `config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<NetworkConfig>,
    /// What changed since.
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub changes: Changes,
}

/// The state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    networks: Vec<StoredNet>,
}

/// Reads the state file `path` (a missing file is an empty state).
pub fn load(path: &Path) -> Result<Vec<StoredNet>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StateError::Read(path.to_path_buf(), e)),
    };
    let f: StateFile =
        serde_json::from_slice(&bytes).map_err(|e| StateError::Parse(path.to_path_buf(), e))?;
    if f.version != VERSION {
        return Err(StateError::Version(path.to_path_buf(), f.version));
    }
    Ok(f.networks)
}

/// Replaces the state file `path` with `nets`, atomically and durably.
pub fn save(path: &Path, nets: &[StoredNet]) -> Result<(), StateError> {
    let f = StateFile {
        version: VERSION,
        networks: nets.to_vec(),
    };
    let werr = |e| StateError::Write(path.to_path_buf(), e);
    let mut data = serde_json::to_vec_pretty(&f).map_err(|e| werr(std::io::Error::other(e)))?;
    data.push(b'\n');
    fabric_util::fs::write_durable(path, &data, 0o600).map_err(werr)
}

/// Moves a state file that cannot be read aside (`runtime.json.corrupt`), so that
/// the next save does not overwrite what is in it; returns where it went.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(".corrupt");
    let to = PathBuf::from(name);
    std::fs::rename(path, &to)?;
    Ok(to)
}

/// One network's entry while netd runs: where it comes from, its base table, its
/// changes.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Config file or API.
    pub source: Source,
    /// The base table (see the module docs).
    pub base: NetworkConfig,
    /// The runtime changes.
    pub changes: Changes,
}

impl Entry {
    /// The table netd runs: the base with the changes applied.
    pub fn effective(&self) -> NetworkConfig {
        self.changes.clone().apply(&self.base).0
    }

    /// As stored in the state file (None: a config network without changes).
    pub fn stored(&self, name: &str) -> Option<StoredNet> {
        match self.source {
            Source::Config if self.changes.is_empty() => None,
            Source::Config => Some(StoredNet {
                name: name.to_string(),
                source: Source::Config,
                table: None,
                changes: self.changes.clone(),
            }),
            Source::Api => Some(StoredNet {
                name: name.to_string(),
                source: Source::Api,
                table: Some(self.base.clone()),
                changes: self.changes.clone(),
            }),
        }
    }
}

/// The runtime state while netd runs: an entry per running network, the API
/// networks that could not start (kept, with the reason), and the conflicts found
/// at start (per network, for `net list`).
#[derive(Debug, Default)]
pub struct Runtime {
    /// The state file.
    pub path: PathBuf,
    /// The config file (named in conflicts).
    pub config_path: PathBuf,
    /// Running networks.
    pub nets: BTreeMap<String, Entry>,
    /// API networks not running: their entry and why.
    pub idle: BTreeMap<String, (Entry, String)>,
    /// Conflicts between the config file and the state, per network.
    pub conflicts: BTreeMap<String, Vec<String>>,
}

impl Runtime {
    /// Writes the whole state.
    pub fn save(&self) -> Result<(), StateError> {
        let nets: Vec<StoredNet> = self
            .nets
            .iter()
            .chain(self.idle.iter().map(|(n, (e, _))| (n, e)))
            .filter_map(|(n, e)| e.stored(n))
            .collect();
        save(&self.path, &nets)
    }

    /// Records a conflict of network `net` (logged as a warning too).
    pub fn conflict(&mut self, net: &str, what: String) {
        tracing::warn!(
            network = net,
            config = %self.config_path.display(),
            state = %self.path.display(),
            "{what}"
        );
        self.conflicts
            .entry(net.to_string())
            .or_default()
            .push(what);
    }
}

#[cfg(test)]
mod tests;
