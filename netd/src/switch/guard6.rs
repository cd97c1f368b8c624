//! The port guard's IPv6 rules (see [`super::guard`] for the MAC lock and IPv4).
//!
//! Theory of operation. On every guarded guest port, whatever the network:
//!
//! - **Router messages**: a Router Advertisement or Redirect (ICMPv6 134, 137), or a
//!   DHCPv6 server message (UDP from port 547 or to the client port 546), is
//!   dropped (`drop_rogue_router`): a guest that advertised itself could become
//!   every other guest's router or DNS (RA guard, RFC 6105).
//! - **NDP link-layer addresses**: the source (NS, RS) or target (NA) link-layer
//!   address option, when present, must be the port's MAC (`drop_spoofed_nd`).
//! - **Rate**: ND and MLD messages (ICMPv6 130 to 137, 143) are bounded to
//!   [`ND_PER_SEC`] a second per port (`drop_nd_limit`), so one guest cannot keep
//!   every other busy with multicast it must answer.
//!
//! On a network with `subnet6` ([`Ip6Guard`]), in addition:
//!
//! - **Source**: `::` only for DAD and the messages sent during it (NS, RS, MLD
//!   reports); else a link-local address or an address in the prefix that is not
//!   netd's (the gateway, the service's link-local, the announced DNS server) and
//!   not leased (DHCPv6) or bound to another MAC. The first use binds it to the
//!   port's MAC (a SLAAC address, EUI-64 or random, or a privacy address) until it
//!   has been unused for `mac_ageing`; at most [`MAX_ADDRS_PER_MAC`] at once per
//!   MAC, [`super::guard::MAX_STATIC`] in all. Anything else is `drop_spoofed_ip6`.
//! - **NA target**: a Neighbor Advertisement may only claim an address the port may
//!   use by the same rule (`drop_spoofed_nd`): no guest answers for the gateway or
//!   another guest.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::guard::{GuardDrop, PortGuard, MAX_STATIC};
use crate::ipv6::wire::{self, icmp, opt, Ipv6, IPPROTO_ICMPV6, IPPROTO_UDP};

pub use crate::ipv6::wire::ETHERTYPE_IPV6;

/// Most ND and MLD messages one port may send in a second.
pub const ND_PER_SEC: u32 = 50;
/// Most IPv6 addresses bound to one MAC at once (link-local, SLAAC, privacy, DHCPv6).
pub const MAX_ADDRS_PER_MAC: usize = 8;

/// Who may use which IPv6 address on a network with `subnet6`.
#[derive(Debug)]
pub struct Ip6Guard {
    prefix: [u8; 8],
    protected: Vec<Ipv6Addr>,
    ageing: Duration,
    gen: AtomicU64,
    t: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// DHCPv6 leases: address -> (MAC, Unix time it ends).
    leases: HashMap<Ipv6Addr, ([u8; 6], u64)>,
    /// Bound addresses: address -> (MAC, last used).
    bound: HashMap<Ipv6Addr, ([u8; 6], Instant)>,
}

impl Ip6Guard {
    /// The guard of the /64 `prefix`; `protected` are netd's own addresses there.
    pub fn new(prefix: Ipv6Addr, protected: &[Ipv6Addr], ageing: Duration) -> Self {
        let mut p = [0u8; 8];
        p.copy_from_slice(&prefix.octets()[..8]);
        Ip6Guard {
            prefix: p,
            protected: protected.to_vec(),
            ageing,
            gen: AtomicU64::new(0),
            t: Mutex::new(Table::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.t.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever the leases change.
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Replaces the DHCPv6 leases.
    pub fn set_leases(&self, leases: &[crate::ipv6::dhcp6::Lease6]) {
        let mut t = self.table();
        t.leases = leases
            .iter()
            .filter_map(|l| Some((l.ip, (crate::config::parse_mac(&l.mac)?, l.expires))))
            .collect();
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// The addresses of the prefix `mac` holds now (a live DHCPv6 lease, or bound
    /// at first use within `mac_ageing`: SLAAC, privacy, configured), sorted; no
    /// link-local ones. At most [`MAX_ADDRS_PER_MAC`] bound, plus its leases.
    pub fn addrs_of(&self, mac: [u8; 6], now: Instant, unix: u64) -> Vec<Ipv6Addr> {
        let t = self.table();
        let live = |seen: &Instant| now.saturating_duration_since(*seen) < self.ageing;
        let leased = t
            .leases
            .iter()
            .filter(|(_, (m, exp))| *m == mac && *exp > unix);
        let bound = t.bound.iter().filter(|(_, (m, s))| *m == mac && live(s));
        let mut v: Vec<Ipv6Addr> = leased
            .map(|(a, _)| *a)
            .chain(bound.map(|(a, _)| *a))
            .filter(|a| a.octets()[..8] == self.prefix)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether the port locked to `mac` may use `ip` (binding it on first use).
    pub fn allow(&self, mac: [u8; 6], ip: Ipv6Addr, now: Instant, unix: u64) -> bool {
        let in_prefix = ip.octets()[..8] == self.prefix;
        if !(in_prefix || wire::is_link_local(ip)) || self.protected.contains(&ip) {
            return false;
        }
        let mut t = self.table();
        if let Some((m, exp)) = t.leases.get(&ip) {
            if *exp > unix {
                return *m == mac;
            }
        }
        let live = |seen: &Instant| now.saturating_duration_since(*seen) < self.ageing;
        match t.bound.get(&ip).copied() {
            Some((m, _)) if m == mac => {
                t.bound.insert(ip, (mac, now));
                return true;
            }
            Some((_, seen)) if live(&seen) => return false,
            _ => {}
        }
        let mine = t
            .bound
            .values()
            .filter(|(m, s)| *m == mac && live(s))
            .count();
        if mine >= MAX_ADDRS_PER_MAC {
            return false;
        }
        if t.bound.len() >= MAX_STATIC {
            t.bound.retain(|_, (_, s)| live(s));
            if t.bound.len() >= MAX_STATIC {
                return false;
            }
        }
        t.bound.insert(ip, (mac, now));
        true
    }
}

fn address_ok(port: &PortGuard, g: &Ip6Guard, mac: [u8; 6], a: Ipv6Addr, now: Instant) -> bool {
    let gen = g.generation();
    if port.ip6_cached(a, now, gen) {
        return true;
    }
    let ok = g.allow(mac, a, now, crate::dhcp::unix_now());
    if ok {
        port.remember_ip6(a, now, gen);
    }
    ok
}

/// Checks an IPv6 packet (the Ethernet payload) from a guarded port locked to `mac`.
pub fn check(
    p: &[u8],
    mac: [u8; 6],
    port: &PortGuard,
    g: Option<&Ip6Guard>,
    now: Instant,
) -> Result<(), GuardDrop> {
    let Some(ip) = Ipv6::parse(p) else {
        return match g {
            Some(_) => Err(GuardDrop::SpoofedIp6),
            None => Ok(()),
        };
    };
    let icmp_type = (ip.proto == Some(IPPROTO_ICMPV6))
        .then(|| ip.payload.first().copied())
        .flatten();
    match icmp_type {
        Some(icmp::RA | icmp::REDIRECT) => return Err(GuardDrop::RogueRouter),
        Some(t @ (130..=137 | 143)) => {
            if !port.nd_allow(now, ND_PER_SEC) {
                return Err(GuardDrop::NdLimit);
            }
            let (fixed, kind) = match t {
                icmp::RS => (8, opt::SLLA),
                icmp::NS => (24, opt::SLLA),
                icmp::NA => (24, opt::TLLA),
                _ => (0, 0),
            };
            if fixed > 0 {
                let lla = ip
                    .payload
                    .get(fixed..)
                    .and_then(wire::nd_options)
                    .and_then(|o| wire::lla(&o, kind));
                match lla {
                    Some(None) => {}
                    Some(Some(m)) if m == mac => {}
                    _ => return Err(GuardDrop::SpoofedNd),
                }
            }
            if let (icmp::NA, Some(g)) = (t, g) {
                let target = ip
                    .payload
                    .get(8..24)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(Ipv6Addr::from);
                match target {
                    Some(a) if address_ok(port, g, mac, a, now) => {}
                    _ => return Err(GuardDrop::SpoofedNd),
                }
            }
        }
        _ => {}
    }
    if ip.proto == Some(IPPROTO_UDP) {
        let ports = ip.payload.get(..4);
        if ports.is_some_and(|u| u[0..2] == [2, 0x23] || u[2..4] == [2, 0x22]) {
            return Err(GuardDrop::RogueRouter);
        }
    }
    let Some(g) = g else { return Ok(()) };
    if ip.src.is_unspecified() {
        return match icmp_type {
            Some(icmp::RS | icmp::NS | 131 | 143) => Ok(()),
            _ => Err(GuardDrop::SpoofedIp6),
        };
    }
    if address_ok(port, g, mac, ip.src, now) {
        Ok(())
    } else {
        Err(GuardDrop::SpoofedIp6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv6::wire::{emit_frame, link_local, multicast_mac};

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    fn g() -> Ip6Guard {
        let gw: Ipv6Addr = "fd42::1".parse().unwrap();
        Ip6Guard::new("fd42::".parse().unwrap(), &[gw], Duration::from_secs(300))
    }

    fn icmp6(src: Ipv6Addr, t: u8, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![t, 0, 0, 0];
        b.extend_from_slice(rest);
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        emit_frame(multicast_mac(dst), A, src, dst, IPPROTO_ICMPV6, 255, b, 2)[14..].to_vec()
    }

    fn na(src: Ipv6Addr, target: Ipv6Addr, tlla: [u8; 6]) -> Vec<u8> {
        let mut r = vec![0x20, 0, 0, 0];
        r.extend_from_slice(&target.octets());
        r.extend_from_slice(&[2, 1]);
        r.extend_from_slice(&tlla);
        icmp6(src, icmp::NA, &r)
    }

    #[test]
    fn router_messages_spoofed_nd_and_sources_are_dropped() {
        let g = g();
        let (pa, pb) = (PortGuard::new(true, None), PortGuard::new(true, None));
        let t0 = Instant::now();
        let lla = link_local(A);
        let ck = |f: &[u8], p: &PortGuard, m| check(f, m, p, Some(&g), t0);
        assert_eq!(
            ck(&icmp6(lla, icmp::RA, &[0; 12]), &pa, A),
            Err(GuardDrop::RogueRouter)
        );
        assert_eq!(
            check(&icmp6(lla, icmp::RA, &[0; 12]), A, &pa, None, t0),
            Err(GuardDrop::RogueRouter),
            "RAs are dropped on every network"
        );
        let mine: Ipv6Addr = "fd42::5054:ff:fe00:1".parse().unwrap();
        assert_eq!(ck(&na(lla, mine, A), &pa, A), Ok(()));
        assert_eq!(
            ck(&na(lla, "fd42::1".parse().unwrap(), A), &pa, A),
            Err(GuardDrop::SpoofedNd)
        );
        assert_eq!(ck(&na(lla, mine, B), &pa, A), Err(GuardDrop::SpoofedNd));
        // B may not claim or use A's bound address, nor the gateway.
        let llb = link_local(B);
        assert_eq!(ck(&na(llb, mine, B), &pb, B), Err(GuardDrop::SpoofedNd));
        assert_eq!(
            ck(&icmp6(mine, 128, &[0; 4]), &pb, B),
            Err(GuardDrop::SpoofedIp6)
        );
        assert_eq!(
            ck(&icmp6("fd42::1".parse().unwrap(), 128, &[0; 4]), &pb, B),
            Err(GuardDrop::SpoofedIp6)
        );
        assert_eq!(
            ck(&icmp6("2001:db8::1".parse().unwrap(), 128, &[0; 4]), &pb, B),
            Err(GuardDrop::SpoofedIp6)
        );
        // DAD from :: is fine; an echo from :: is not.
        let mut ns = vec![0; 4];
        ns.extend_from_slice(&mine.octets());
        assert_eq!(
            ck(&icmp6(Ipv6Addr::UNSPECIFIED, icmp::NS, &ns), &pb, B),
            Ok(())
        );
        assert_eq!(
            ck(&icmp6(Ipv6Addr::UNSPECIFIED, 128, &[0; 4]), &pb, B),
            Err(GuardDrop::SpoofedIp6)
        );
        // DHCPv6 server messages.
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        let adv = emit_frame(
            multicast_mac(dst),
            A,
            lla,
            dst,
            IPPROTO_UDP,
            64,
            vec![2, 0x23, 2, 0x22, 0, 12, 0, 0, 2, 1, 2, 3],
            6,
        );
        assert_eq!(ck(&adv[14..], &pa, A), Err(GuardDrop::RogueRouter));
        // The rate of ND.
        let pc = PortGuard::new(true, None);
        let n = (0..200)
            .filter(|_| ck(&icmp6(Ipv6Addr::UNSPECIFIED, icmp::NS, &ns), &pc, B).is_err())
            .count();
        assert_eq!(n, 200 - ND_PER_SEC as usize);
    }

    #[test]
    fn bindings_per_mac_are_bounded() {
        let g = g();
        let t0 = Instant::now();
        let n = (0..20u16)
            .filter(|i| g.allow(A, Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 1, *i), t0, 0))
            .count();
        assert_eq!(n, MAX_ADDRS_PER_MAC);
    }

    #[test]
    fn random_packets_never_panic() {
        let g = g();
        let p = PortGuard::new(true, None);
        let base = na(link_local(A), "fd42::9".parse().unwrap(), A);
        let mut x: u32 = 3;
        for _ in 0..5000 {
            let mut f = base.clone();
            for _ in 0..3 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let at = (x as usize >> 8) % f.len();
                f[at] = (x >> 16) as u8;
            }
            f.truncate((x as usize) % (f.len() + 1));
            let _ = check(&f, A, &p, Some(&g), Instant::now());
        }
    }
}
