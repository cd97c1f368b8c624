//! Guest names in DNS: the names a network's DNS answers itself, before it forwards
//! anything to the host's resolver, as libvirt's dnsmasq does.
//!
//! # Theory of operation
//!
//! A network that serves DNS (every NAT network, at its DNS address 10.0.2.3; a
//! hostonly or internal network whose `dns` key names an address) has a [`Zone`]:
//! its `domain` (default `NET.lab`), its static `[[network.host]]` entries and its
//! subnet. At run time a [`LocalNames`] table, shared by the network's DHCP server
//! and its DNS front (the NAT router, or [`crate::modes::dns`]), adds the hostnames
//! guests sent in DHCP (option 12) with their leases. For each query
//! [`LocalNames::answer`] decides:
//!
//! - `NAME.DOMAIN` and the bare `NAME` (one label, no dot): A for a known name;
//!   AAAA for a lease's name on a network with IPv6: the addresses of the prefix
//!   the lease's MAC holds now, as the network's IPv6 guard knows them (its
//!   DHCPv6 lease, and the SLAAC, privacy or configured addresses bound to the MAC
//!   at first use, see [`crate::switch::guard6`]; [`LocalNames::set_ipv6`]); an
//!   empty NOERROR answer for its other types (and AAAA of a static entry, or of a
//!   guest with no IPv6 address known); NXDOMAIN for an unknown one. An unknown single label is never forwarded (as
//!   dnsmasq's `domain-needed`): it would leak lab names to the upstream resolver.
//!   Deeper names under the domain are NXDOMAIN; the domain itself has no data.
//! - `D.C.B.A.in-addr.arpa` for an address of the subnet: PTR to `NAME.DOMAIN`, or
//!   NXDOMAIN.
//! - Anything else (other names, other classes, other opcodes) is forwarded.
//! - A datagram that does not parse as one question ([`wire::Query::parse`]) is
//!   dropped and counted (`malformed`).
//!
//! Answers are authoritative with TTL 0 (a lease may change at any time).
//!
//! The same answers come over UDP (the NAT router's `dns.rs`, the responder of
//! [`crate::modes::dns`]) and over TCP ([`tcp`]: RFC 7766 framing, bounded and
//! timed out).
//!
//! # Names guests choose
//!
//! A guest's hostname is as hostile as the rest of its DHCP message. It is published
//! only when it is one DNS label of letters, digits and hyphens (1..63 bytes, no
//! hyphen first or last), compared case-insensitively, and not the name of a static
//! entry (which always wins); otherwise the lease is kept but the name is not
//! published, counted in `hostname_refused`. Two guests with the same name: the
//! newest lease wins (the one that expires last, which is the one ACKed last), and
//! the older guest's name comes back when that lease ends. An expired lease's name is
//! not answered. The table holds at most [`MAX_LEASE_NAMES`] names (the DHCP server's
//! own bound on leases is the same), so no guest can grow it.

pub mod resolv;
pub mod tcp;
pub mod wire;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

pub use self::resolv::{parse_resolv_conf, Resolvers};
use self::wire::{
    Query, Rdata, CLASS_IN, RCODE_NOERROR, RCODE_NXDOMAIN, TYPE_A, TYPE_AAAA, TYPE_ANY,
};
use crate::switch::guard6::Ip6Guard;

/// Most names from leases in one table.
pub const MAX_LEASE_NAMES: usize = crate::dhcp::MAX_CLIENTS;
/// Most static `[[network.host]]` entries of one network.
pub const MAX_STATIC_HOSTS: usize = 1024;

/// The validated static part of a network's names: what the config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// The domain, lowercase, without a trailing dot (`lab0.lab`).
    pub domain: String,
    /// Static entries: (lowercase label, address).
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// The subnet, for PTR queries.
    pub subnet: (Ipv4Addr, u8),
}

/// Whether `s` is a host label netd publishes: 1..63 letters, digits and hyphens,
/// no hyphen first or last.
pub fn valid_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=wire::MAX_LABEL).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-')
}

/// Whether `s` is a domain netd can serve names under: dot-separated labels of
/// letters, digits, hyphens and underscores, at most 190 bytes (so that a 63-byte
/// host label fits under it).
pub fn valid_domain(s: &str) -> bool {
    s.len() <= 190
        && s.split('.').all(|l| {
            (1..=wire::MAX_LABEL).contains(&l.len())
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

/// The DNS counters of a network (`netd dns NET --stats`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Queries read.
    pub queries: AtomicU64,
    /// Queries answered from the table (NXDOMAIN included).
    pub answered: AtomicU64,
    /// Of those, NXDOMAIN.
    pub nxdomain: AtomicU64,
    /// Queries forwarded to the host's resolver.
    pub forwarded: AtomicU64,
    /// Datagrams that were not one readable question (dropped).
    pub malformed: AtomicU64,
    /// Guest hostnames not published (not a label, or a static entry's name).
    pub hostname_refused: AtomicU64,
    /// Forwarded queries dropped: no resolver, too many waiting, send failed.
    pub forward_dropped: AtomicU64,
    /// DNS-over-TCP connections accepted ([`tcp`]).
    pub tcp_connections: AtomicU64,
    /// DNS-over-TCP connections refused: too many open.
    pub tcp_refused: AtomicU64,
    /// DNS-over-TCP connections closed idle, too slow, or not reading answers.
    pub tcp_timeouts: AtomicU64,
}

/// One published name, as `netd dns NET` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NameEntry {
    /// The fully qualified name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// `static` or `lease`.
    pub source: &'static str,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send this reply.
    Local(Vec<u8>),
    /// Not a local name: forward the query as it came.
    Forward,
    /// Malformed: drop it (counted).
    Drop,
}

/// A network's names at run time: the [`Zone`] plus the names of live leases.
#[derive(Debug)]
pub struct LocalNames {
    zone: Zone,
    domain_labels: Vec<Vec<u8>>,
    /// Lease names: label -> (address, lease end in Unix seconds, the client's MAC
    /// if known).
    leases: RwLock<HashMap<String, LeaseName>>,
    /// The network's IPv6 guard, where the guests' IPv6 addresses are known.
    ipv6: std::sync::OnceLock<Arc<Ip6Guard>>,
    /// The counters.
    pub counters: Counters,
}

impl LocalNames {
    /// The table of `zone`, with no lease names yet.
    pub fn new(zone: Zone) -> Arc<Self> {
        let domain_labels = zone
            .domain
            .split('.')
            .map(|l| l.as_bytes().to_vec())
            .collect();
        Arc::new(LocalNames {
            zone,
            domain_labels,
            leases: RwLock::default(),
            ipv6: std::sync::OnceLock::new(),
            counters: Counters::default(),
        })
    }

    /// The zone.
    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    fn is_static(&self, label: &str) -> bool {
        self.zone.hosts.iter().any(|(n, _)| n == label)
    }

    /// Whether a guest's hostname (from a DHCP REQUEST being ACKed) will be
    /// published; a refusal is counted.
    pub fn check_hostname(&self, hostname: &str) -> bool {
        let l = hostname.to_ascii_lowercase();
        let ok = valid_label(&l) && !self.is_static(&l);
        if !ok {
            self.counters
                .hostname_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Replaces the lease names with those of `leases` (hostname, address, lease
    /// end): invalid and static names are skipped, the lease that ends last wins a
    /// name, at most [`MAX_LEASE_NAMES`] are kept.
    pub fn set_leases<'a>(&self, leases: impl Iterator<Item = (&'a str, Ipv4Addr, u64)>) {
        self.set_guest_leases(leases.map(|(h, ip, end)| (h, ip, end, None)));
    }

    /// [`LocalNames::set_leases`] with each lease's client MAC (the DHCP server's),
    /// whose IPv6 addresses answer AAAA queries for its name.
    pub fn set_guest_leases<'a>(
        &self,
        leases: impl Iterator<Item = (&'a str, Ipv4Addr, u64, Option<[u8; 6]>)>,
    ) {
        let mut t: HashMap<String, LeaseName> = HashMap::new();
        for (h, ip, end, mac) in leases {
            let l = h.to_ascii_lowercase();
            if !valid_label(&l) || self.is_static(&l) {
                continue;
            }
            let full = t.len() >= MAX_LEASE_NAMES;
            match t.get_mut(&l) {
                Some(e) if e.1 < end => *e = (ip, end, mac),
                Some(_) => {}
                None if !full => {
                    t.insert(l, (ip, end, mac));
                }
                None => {}
            }
        }
        *self.leases.write().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// Answers AAAA queries from the IPv6 addresses `guard` binds to the leases'
    /// MACs (set once, when the network's IPv6 starts).
    pub fn set_ipv6(&self, guard: Arc<Ip6Guard>) {
        let _ = self.ipv6.set(guard);
    }

    /// The address of `label` at `now` (Unix seconds), and its lease's MAC.
    fn lookup(&self, label: &str, now: u64) -> Option<(Ipv4Addr, Option<[u8; 6]>)> {
        if let Some((_, ip)) = self.zone.hosts.iter().find(|(n, _)| n == label) {
            return Some((*ip, None));
        }
        let t = self.leases.read().unwrap_or_else(|e| e.into_inner());
        t.get(label)
            .filter(|(_, end, _)| *end > now)
            .map(|(ip, _, mac)| (*ip, *mac))
    }

    /// The IPv6 addresses a lease's MAC holds now (none without IPv6).
    fn addrs6(&self, mac: Option<[u8; 6]>, now: u64) -> Vec<Ipv6Addr> {
        match (mac, self.ipv6.get()) {
            (Some(m), Some(g)) => g.addrs_of(m, std::time::Instant::now(), now),
            _ => Vec::new(),
        }
    }

    /// The name of `ip` at `now`: a static entry first, else the newest live lease.
    fn reverse(&self, ip: Ipv4Addr, now: u64) -> Option<String> {
        if let Some((n, _)) = self.zone.hosts.iter().find(|(_, a)| *a == ip) {
            return Some(n.clone());
        }
        let t = self.leases.read().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .filter(|(_, (a, end, _))| *a == ip && *end > now)
            .max_by_key(|(_, (_, end, _))| *end)
            .map(|(n, _)| n.clone())
    }

    /// Every published name at `now`, sorted by address.
    pub fn entries(&self, now: u64) -> Vec<NameEntry> {
        let d = &self.zone.domain;
        let mut v: Vec<NameEntry> = self
            .zone
            .hosts
            .iter()
            .map(|(n, ip)| NameEntry {
                name: format!("{n}.{d}"),
                ip: *ip,
                source: "static",
            })
            .collect();
        let t = self.leases.read().unwrap_or_else(|e| e.into_inner());
        v.extend(
            t.iter()
                .filter(|(_, (_, end, _))| *end > now)
                .map(|(n, (ip, _, _))| NameEntry {
                    name: format!("{n}.{d}"),
                    ip: *ip,
                    source: "lease",
                }),
        );
        v.sort_by(|a, b| (a.ip, &a.name).cmp(&(b.ip, &b.name)));
        v
    }

    /// The counters, as the control API shows them.
    pub fn stats(&self, now: u64) -> fabric_api::netd::DnsStats {
        let c = &self.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        fabric_api::netd::DnsStats {
            names: self.entries(now).len(),
            queries: r(&c.queries),
            answered: r(&c.answered),
            nxdomain: r(&c.nxdomain),
            forwarded: r(&c.forwarded),
            malformed: r(&c.malformed),
            hostname_refused: r(&c.hostname_refused),
            forward_dropped: r(&c.forward_dropped),
            tcp_connections: r(&c.tcp_connections),
            tcp_refused: r(&c.tcp_refused),
            tcp_timeouts: r(&c.tcp_timeouts),
        }
    }

    /// What to do with the query datagram `b` at `now` (see the module doc); counts
    /// it.
    pub fn answer(&self, b: &[u8], now: u64) -> Answer {
        let c = &self.counters;
        let q = match Query::parse(b) {
            Ok(q) => q,
            Err(e) => {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "malformed DNS query dropped");
                return Answer::Drop;
            }
        };
        c.queries.fetch_add(1, Ordering::Relaxed);
        let local = if q.opcode() == 0 && q.qclass == CLASS_IN {
            self.local(&q, now)
        } else {
            None
        };
        match local {
            Some((rcode, answers)) => {
                c.answered.fetch_add(1, Ordering::Relaxed);
                if rcode == RCODE_NXDOMAIN {
                    c.nxdomain.fetch_add(1, Ordering::Relaxed);
                }
                Answer::Local(wire::reply(&q, rcode, &answers, 0))
            }
            None => {
                c.forwarded.fetch_add(1, Ordering::Relaxed);
                Answer::Forward
            }
        }
    }

    /// The local answer to `q`, or None to forward it.
    fn local(&self, q: &Query<'_>, now: u64) -> Option<(u8, Vec<Rdata>)> {
        let labels = &q.labels;
        if let Some(ip) = ptr_addr(labels) {
            let (net, prefix) = self.zone.subnet;
            if !crate::nat::prefix_match(ip, net, prefix) {
                return None;
            }
            return Some(match self.reverse(ip, now) {
                Some(name) if q.qtype == wire::TYPE_PTR || q.qtype == TYPE_ANY => {
                    let mut full = vec![name.into_bytes()];
                    full.extend(self.domain_labels.iter().cloned());
                    (RCODE_NOERROR, vec![Rdata::Ptr(full)])
                }
                Some(_) => (RCODE_NOERROR, Vec::new()),
                None => (RCODE_NXDOMAIN, Vec::new()),
            });
        }
        let d = &self.domain_labels;
        let rel: &[Vec<u8>] = if labels.len() >= d.len() && labels.ends_with(d) {
            labels.get(..labels.len() - d.len())?
        } else if labels.len() == 1 {
            labels
        } else {
            return None;
        };
        Some(match rel {
            [] => (RCODE_NOERROR, Vec::new()),
            [one] => {
                let label = std::str::from_utf8(one).ok();
                let Some((ip, mac)) = label.and_then(|l| self.lookup(l, now)) else {
                    return Some((RCODE_NXDOMAIN, Vec::new()));
                };
                let mut v = Vec::new();
                if q.qtype == TYPE_A || q.qtype == TYPE_ANY {
                    v.push(Rdata::A(ip));
                }
                if q.qtype == TYPE_AAAA || q.qtype == TYPE_ANY {
                    v.extend(self.addrs6(mac, now).into_iter().map(Rdata::Aaaa));
                }
                (RCODE_NOERROR, v)
            }
            _ => (RCODE_NXDOMAIN, Vec::new()),
        })
    }
}

/// A lease's name: its address, when it ends (Unix seconds), its client's MAC.
type LeaseName = (Ipv4Addr, u64, Option<[u8; 6]>);

/// A handle on a [`LocalNames`] table for settings that compare by value (the NAT
/// router's): two handles are equal when they are the same table.
#[derive(Debug, Clone)]
pub struct SharedNames(pub Arc<LocalNames>);

impl PartialEq for SharedNames {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedNames {}

/// The address of a full `D.C.B.A.in-addr.arpa` name.
fn ptr_addr(labels: &[Vec<u8>]) -> Option<Ipv4Addr> {
    let [d, c, b, a, inaddr, arpa] = labels else {
        return None;
    };
    if inaddr != b"in-addr" || arpa != b"arpa" {
        return None;
    }
    let octet = |l: &Vec<u8>| std::str::from_utf8(l).ok()?.parse::<u8>().ok();
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

/// Unix time in seconds (the clock leases are kept in).
pub fn unix_now() -> u64 {
    crate::dhcp::unix_now()
}

#[cfg(test)]
mod tests;
