//! The port guard: what a guest port may send (modelled on libvirt's
//! `clean-traffic` filter).
//!
//! Theory of operation. The guest behind a port is hostile. Without a guard it
//! could send from any source MAC (the router's, to black-hole every other guest's
//! traffic to the gateway or sit in the middle; another guest's, to steal its
//! frames; thousands of made-up ones, to fill the MAC table so that unicast turns
//! into floods) and from any source address (another guest's, to receive its port
//! forwards; the gateway's, by gratuitous ARP).
//!
//! A port whose guard is `clean` (the default of every guest port: `tap`, `vm`,
//! `stream`) is therefore checked on ingress, before the switch learns anything
//! from the frame ([`check`]):
//!
//! - **MAC lock**: the port is locked to its configured `mac`, else to the first
//!   source MAC it sends from that no other port holds (a live MAC-table entry on
//!   another local port, a pinned service MAC, another port's configured MAC or
//!   another port's live learned lock). A frame from any other source MAC is
//!   dropped (`drop_spoofed_mac`). A learned lock is released once the MAC has
//!   been silent for the network's `mac_ageing`, so a VM that comes back with a
//!   new MAC works again, and at once when the port's device is replaced (a TAP
//!   recreated in a namespace that came back, a new peer on a stream port):
//!   [`PortGuard::release_learned`], or when the port is deleted.
//! - **Moves between hosts** (live migration over a `vxlan` network): a MAC that
//!   the table has behind a vxlan port (it lives on another host) is free to
//!   lock: it is a VM that just arrived, and its first frame (QEMU's RARP
//!   announce, the guest's gratuitous ARP) locks it to its new port and moves
//!   the table entry there. The other way, a frame from a remote VTEP moves the
//!   table entry of a MAC that left (the tunnel's sender is a listed peer whose
//!   own guard let the frame out), but never a lock: the port the VM left keeps
//!   its learned lock until it is deleted or the MAC has been silent for
//!   `mac_ageing`, so no other guest on this host takes the MAC meanwhile, and
//!   the VM may come back to that same port at any time. Across hosts the guard
//!   cannot tell a VM that moved from a guest of another host claiming a MAC
//!   that lives elsewhere (flood-and-learn VXLAN has no other source of truth);
//!   on this host a MAC in use by a local port is never given to another.
//! - **ARP**: the sender hardware address must be the locked MAC; the sender
//!   address must be 0.0.0.0 (a probe) or one the port may use (`drop_spoofed_arp`).
//! - **DHCP**: a message to port 67 must carry the locked MAC as `chaddr`
//!   (`drop_spoofed_dhcp`), so nobody can ask for, release or decline a lease in
//!   another guest's name.
//! - **IPv4 source** (only on networks with DHCP or NAT, where the fabric knows who
//!   owns which address: [`IpGuard`]): the port's live lease, else its reservation,
//!   else (a guest with a static address) the first free address it uses in the
//!   subnet, bound to its MAC until it has been unused for `mac_ageing`. Never the
//!   gateway, the DNS or DHCP server address, the network or broadcast address, or
//!   an address leased, reserved or bound to another MAC; 0.0.0.0 only for a DHCP
//!   message to port 67. Anything else is `drop_spoofed_ip`, and so is a VLAN-tagged
//!   frame there (its inner addresses are not checked).
//!
//! IPv6 has rules of its own (`guard6.rs`: no RAs, Redirects or DHCPv6 server
//! messages from a guest anywhere; NDP that cannot claim another's MAC; on a
//! network with `subnet6`, sources bound to the MAC and NDP that cannot claim
//! the gateway's or another guest's address; ND and MLD bounded). Other
//! ethertypes pass the address checks (the MAC lock still holds).
//!
//! Ports that are not a guest are never guarded: the hostonly network's host TAP
//! (the host itself), a bridged network's uplink (the LAN) and the services. Their
//! and `guard = "off"` ports' learned MACs are capped per port instead
//! (`max_macs_per_port`, `drop_mac_limit`), so one port cannot fill the table.
//!
//! A check that passed is remembered per port for up to [`RECHECK`] and until the
//! network's leases change ([`IpGuard::generation`]), so the hot path of a guest's
//! traffic costs a few byte compares, not a table lookup under a shared lock.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use fabric_api::netd::Guard;

/// How long a passed address check is reused without looking at the tables.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Most static bindings (guests with a self-assigned address) a network keeps.
pub const MAX_STATIC: usize = 4096;

/// Why the guard dropped a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardDrop {
    /// Source MAC not the port's.
    SpoofedMac,
    /// IPv4 source not one the port may use (or a tagged frame on an addressed network).
    SpoofedIp,
    /// ARP claiming a MAC or address that is not the port's.
    SpoofedArp,
    /// DHCP message whose `chaddr` is not the port's MAC.
    SpoofedDhcp,
    /// The port already has as many learned MACs as it may.
    MacLimit,
    /// IPv6 source not one the port may use (see [`super::guard6`]).
    SpoofedIp6,
    /// A Router Advertisement, Redirect or DHCPv6 server message from a guest.
    RogueRouter,
    /// Neighbor Discovery claiming an address or MAC that is not the port's.
    SpoofedNd,
    /// ND or MLD past the port's rate ([`super::guard6::ND_PER_SEC`]).
    NdLimit,
}

/// The guard state of one port.
#[derive(Debug)]
pub struct PortGuard {
    /// Whether the port is guarded (`clean` on a guest port).
    pub on: bool,
    /// The MAC the port is configured with, if any: the lock, from the start.
    pub configured: Option<[u8; 6]>,
    state: Mutex<PortState>,
}

#[derive(Debug, Default)]
struct PortState {
    /// The learned lock and when its MAC was last seen.
    locked: Option<([u8; 6], Instant)>,
    /// The last IPv4 source that passed, when, and the lease generation then.
    ip_ok: Option<(Ipv4Addr, Instant, u64)>,
    /// The same for IPv6.
    ip6_ok: Option<(std::net::Ipv6Addr, Instant, u64)>,
    /// ND/MLD messages in the current one-second window, and when it began.
    nd: Option<(Instant, u32)>,
}

impl PortGuard {
    /// The guard of a port: `on` for a guarded guest port, with its configured MAC.
    pub fn new(on: bool, configured: Option<[u8; 6]>) -> Self {
        PortGuard {
            on,
            configured,
            state: Mutex::new(PortState::default()),
        }
    }

    /// An unguarded port.
    pub fn off() -> Self {
        Self::new(false, None)
    }

    /// The MAC the port is locked to now, if any.
    pub fn locked_mac(&self) -> Option<[u8; 6]> {
        self.configured.or_else(|| {
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .locked
                .map(|(m, _)| m)
        })
    }

    /// Whether `src` is the port's MAC. `free` says whether the port may take `src`
    /// as its lock (nobody else holds it); it is asked only when the port has no
    /// live lock, and not under this port's state lock (it looks at the other
    /// ports' locks, [`PortGuard::holds`]).
    pub fn mac_ok(
        &self,
        src: [u8; 6],
        now: Instant,
        ageing: Duration,
        free: impl FnOnce() -> bool,
    ) -> bool {
        if let Some(m) = self.configured {
            return m == src;
        }
        let live = |seen: Instant| now.saturating_duration_since(seen) < ageing;
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((m, seen)) = st.locked {
                if m == src {
                    st.locked = Some((m, now));
                    return true;
                }
                if live(seen) {
                    return false;
                }
            }
        }
        if !free() {
            return false;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Only this port's own reader locks it, but stay exact if another did.
        if matches!(st.locked, Some((m, seen)) if m != src && live(seen)) {
            return false;
        }
        st.locked = Some((src, now));
        st.ip_ok = None;
        st.ip6_ok = None;
        true
    }

    /// Whether the port holds `mac` as its lock: configured, or learned and seen
    /// within `ageing`. A learned lock outlives the MAC's move to a remote VTEP (the
    /// MAC-table entry moves with the MAC's frames, the lock does not), so no other
    /// guest on this host takes the MAC of a VM that just left it.
    pub fn holds(&self, mac: [u8; 6], now: Instant, ageing: Duration) -> bool {
        if self.configured == Some(mac) {
            return true;
        }
        matches!(
            self.state.lock().unwrap_or_else(|e| e.into_inner()).locked,
            Some((m, seen)) if m == mac && now.saturating_duration_since(seen) < ageing
        )
    }

    /// Forgets the learned lock (a configured MAC stays): the device behind the port
    /// was replaced (a TAP recreated in a new namespace has a new MAC), so its first
    /// source MAC is the guest's again rather than a spoof of the old one.
    pub fn release_learned(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.locked = None;
        st.ip_ok = None;
        st.ip6_ok = None;
    }

    /// Whether `ip` (IPv6) passed within [`RECHECK`] at generation `gen`.
    pub(super) fn ip6_cached(&self, ip: std::net::Ipv6Addr, now: Instant, gen: u64) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        matches!(st.ip6_ok, Some((a, t, g)) if a == ip && g == gen
            && now.saturating_duration_since(t) < RECHECK)
    }

    /// Remembers a passed IPv6 source.
    pub(super) fn remember_ip6(&self, ip: std::net::Ipv6Addr, now: Instant, gen: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).ip6_ok = Some((ip, now, gen));
    }

    /// Counts one ND/MLD message: false past `per_sec` in the current second.
    pub(super) fn nd_allow(&self, now: Instant, per_sec: u32) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &mut st.nd {
            Some((start, n)) if now.saturating_duration_since(*start) < Duration::from_secs(1) => {
                *n += 1;
                *n <= per_sec
            }
            w => {
                *w = Some((now, 1));
                true
            }
        }
    }

    fn ip_cached(&self, ip: Ipv4Addr, now: Instant, gen: u64) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        matches!(st.ip_ok, Some((a, t, g)) if a == ip && g == gen
            && now.saturating_duration_since(t) < RECHECK)
    }

    fn remember_ip(&self, ip: Ipv4Addr, now: Instant, gen: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).ip_ok = Some((ip, now, gen));
    }
}

/// Who may use which address on a network with DHCP or NAT: the DHCP server's
/// leases and reservations (the server keeps them here, [`IpGuard::set_leases`])
/// and the static bindings the guard makes itself.
#[derive(Debug)]
pub struct IpGuard {
    network: u32,
    mask: u32,
    /// Addresses no guest may use: gateway, DNS, DHCP server, network, broadcast.
    protected: Vec<Ipv4Addr>,
    ageing: Duration,
    gen: AtomicU64,
    t: Mutex<IpTable>,
}

#[derive(Debug, Default)]
struct IpTable {
    /// The DHCP reservations (changed at runtime by `netd reservation`).
    reserved: Vec<([u8; 6], Ipv4Addr)>,
    /// MAC -> (address, Unix time the lease ends).
    leases: HashMap<[u8; 6], (Ipv4Addr, u64)>,
    /// Static address -> (MAC, last used).
    statics: HashMap<Ipv4Addr, ([u8; 6], Instant)>,
    /// MAC -> its static address.
    static_of: HashMap<[u8; 6], Ipv4Addr>,
}

impl IpGuard {
    /// The guard of the subnet `network`/`prefix`; `services` are the addresses the
    /// fabric itself owns there, `reserved` the DHCP reservations; a static binding
    /// lasts `ageing` after its last use.
    pub fn new(
        network: Ipv4Addr,
        prefix: u8,
        services: &[Ipv4Addr],
        reserved: &[([u8; 6], Ipv4Addr)],
        ageing: Duration,
    ) -> Self {
        let mask = u32::from(crate::config::prefix_mask(prefix));
        let net = u32::from(network) & mask;
        let mut protected = services.to_vec();
        protected.push(Ipv4Addr::from(net));
        protected.push(Ipv4Addr::from(net | !mask));
        IpGuard {
            network: net,
            mask,
            protected,
            ageing,
            gen: AtomicU64::new(0),
            t: Mutex::new(IpTable {
                reserved: reserved.to_vec(),
                ..IpTable::default()
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, IpTable> {
        self.t.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever the leases change (cached passes are then rechecked).
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Replaces the leases: (MAC, address, Unix time it ends).
    pub fn set_leases(&self, leases: impl IntoIterator<Item = ([u8; 6], Ipv4Addr, u64)>) {
        let mut t = self.table();
        t.leases = leases.into_iter().map(|(m, ip, e)| (m, (ip, e))).collect();
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Replaces the DHCP reservations (a runtime change of the network's).
    pub fn set_reserved(&self, reserved: &[([u8; 6], Ipv4Addr)]) {
        self.table().reserved = reserved.to_vec();
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether `ip` is bound (statically, in use) to a MAC other than `mac`: the DHCP
    /// server does not hand it out then.
    pub fn bound_to_other(&self, ip: Ipv4Addr, mac: &[u8; 6], now: Instant) -> bool {
        self.table()
            .statics
            .get(&ip)
            .is_some_and(|(m, seen)| m != mac && now.saturating_duration_since(*seen) < self.ageing)
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask == self.network
    }

    /// Whether the port locked to `mac` may send from `ip` (binding it, for a static
    /// guest). `unix` is the Unix time leases are judged against.
    pub fn allow(&self, mac: [u8; 6], ip: Ipv4Addr, now: Instant, unix: u64) -> bool {
        let mut t = self.table();
        if let Some((l, exp)) = t.leases.get(&mac) {
            if *exp > unix {
                return *l == ip;
            }
        }
        if let Some((_, r)) = t.reserved.iter().find(|(m, _)| *m == mac) {
            return *r == ip;
        }
        if !self.in_subnet(ip) || self.protected.contains(&ip) {
            return false;
        }
        if t.reserved.iter().any(|(m, r)| *r == ip && *m != mac)
            || t.leases
                .iter()
                .any(|(m, (l, exp))| *l == ip && *m != mac && *exp > unix)
        {
            return false;
        }
        let live = |seen: &Instant| now.saturating_duration_since(*seen) < self.ageing;
        match t.statics.get(&ip).copied() {
            Some((m, _)) if m == mac => {
                t.statics.insert(ip, (mac, now));
                return true;
            }
            Some((m, seen)) if live(&seen) => {
                let _ = m;
                return false;
            }
            Some((m, _)) => {
                t.statics.remove(&ip);
                t.static_of.remove(&m);
            }
            None => {}
        }
        if let Some(old) = t.static_of.get(&mac).copied() {
            match t.statics.get(&old) {
                Some((_, seen)) if live(seen) => return false,
                _ => {
                    t.statics.remove(&old);
                    t.static_of.remove(&mac);
                }
            }
        }
        if t.statics.len() >= MAX_STATIC {
            t.statics.retain(|_, (_, seen)| live(seen));
            let IpTable {
                statics, static_of, ..
            } = &mut *t;
            static_of.retain(|_, ip| statics.contains_key(ip));
            if t.statics.len() >= MAX_STATIC {
                return false;
            }
        }
        t.statics.insert(ip, (mac, now));
        t.static_of.insert(mac, ip);
        true
    }

    /// Number of static bindings kept (live or not yet swept).
    pub fn statics(&self) -> usize {
        self.table().statics.len()
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const VLAN_TYPES: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// Checks a frame from a guarded port whose MAC lock it already passed (`mac`):
/// ARP, DHCP and, with `ip`, IPv4 sources (see the module doc).
pub fn check(
    frame: &[u8],
    mac: [u8; 6],
    port: &PortGuard,
    ip: Option<&IpGuard>,
    ip6: Option<&super::guard6::Ip6Guard>,
    now: Instant,
) -> Result<(), GuardDrop> {
    let Some(et) = frame.get(12..14) else {
        return Ok(());
    };
    let ethertype = u16::from_be_bytes([et[0], et[1]]);
    let payload = frame.get(14..).unwrap_or(&[]);
    let sender = Sender { mac, port, ip, now };
    match ethertype {
        ETHERTYPE_ARP => sender.check_arp(payload),
        ETHERTYPE_IPV4 => sender.check_ipv4(payload),
        super::guard6::ETHERTYPE_IPV6 => super::guard6::check(payload, mac, port, ip6, now),
        t if VLAN_TYPES.contains(&t) && (ip.is_some() || ip6.is_some()) => {
            Err(GuardDrop::SpoofedIp)
        }
        _ => Ok(()),
    }
}

/// What the checks know about the frame's sender: the MAC it passed the lock
/// with, its port's cache, the network's IP guard (if any) and the time.
struct Sender<'a> {
    mac: [u8; 6],
    port: &'a PortGuard,
    ip: Option<&'a IpGuard>,
    now: Instant,
}

impl Sender<'_> {
    fn address_ok(&self, addr: Ipv4Addr, ip: &IpGuard) -> bool {
        let gen = ip.generation();
        if self.port.ip_cached(addr, self.now, gen) {
            return true;
        }
        if ip.allow(self.mac, addr, self.now, crate::dhcp::unix_now()) {
            self.port.remember_ip(addr, self.now, gen);
            return true;
        }
        false
    }

    fn check_arp(&self, p: &[u8]) -> Result<(), GuardDrop> {
        // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4; sha at 8, spa at 14.
        let Some(h) = p.get(..28) else {
            return Err(GuardDrop::SpoofedArp);
        };
        if h[0..6] != [0, 1, 8, 0, 6, 4] || h[8..14] != self.mac {
            return Err(GuardDrop::SpoofedArp);
        }
        let spa = Ipv4Addr::new(h[14], h[15], h[16], h[17]);
        match self.ip {
            Some(ip) if !spa.is_unspecified() && !self.address_ok(spa, ip) => {
                Err(GuardDrop::SpoofedArp)
            }
            _ => Ok(()),
        }
    }

    fn check_ipv4(&self, p: &[u8]) -> Result<(), GuardDrop> {
        let Some(h) = p.get(..20) else {
            return match self.ip {
                Some(_) => Err(GuardDrop::SpoofedIp),
                None => Ok(()),
            };
        };
        let ihl = usize::from(h[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
        // A UDP datagram to port 67 (not a later fragment): DHCP.
        let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
        let udp = p
            .get(ihl..)
            .filter(|_| h[9] == 17 && ihl >= 20 && first_fragment);
        let to_67 = udp.and_then(|u| u.get(2..4)).is_some_and(|d| d == [0, 67]);
        if to_67 {
            // BOOTP: htype at 1, hlen at 2, chaddr at 28 of the UDP payload (8 on).
            if let Some(b) = udp.and_then(|u| u.get(8..8 + 34)) {
                if b[1] == 1 && b[2] == 6 && b[28..34] != self.mac {
                    return Err(GuardDrop::SpoofedDhcp);
                }
            }
        }
        let Some(ip) = self.ip else {
            return Ok(());
        };
        if src.is_unspecified() {
            return if to_67 {
                Ok(())
            } else {
                Err(GuardDrop::SpoofedIp)
            };
        }
        if self.address_ok(src, ip) {
            Ok(())
        } else {
            Err(GuardDrop::SpoofedIp)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Arp, BROADCAST_MAC, ETHERTYPE_ARP as ARP};

    const GW: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    fn ipg() -> IpGuard {
        IpGuard::new(
            Ipv4Addr::new(10, 7, 0, 0),
            24,
            &[GW, Ipv4Addr::new(10, 7, 0, 3)],
            &[([2, 0, 0, 0, 0, 0x77], Ipv4Addr::new(10, 7, 0, 77))],
            Duration::from_secs(300),
        )
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 7, 0, n)
    }

    fn arp(sha: [u8; 6], spa: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![];
        wire::emit_ethernet(&mut f, BROADCAST_MAC, sha, ARP);
        Arp {
            op: 2,
            sha,
            spa,
            tha: [0; 6],
            tpa: spa,
        }
        .emit(&mut f);
        f
    }

    fn udp(src_mac: [u8; 6], src: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        wire::emit_udp_frame(
            BROADCAST_MAC,
            src_mac,
            src,
            Ipv4Addr::BROADCAST,
            68,
            dport,
            payload,
        )
    }

    fn bootp(chaddr: [u8; 6]) -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[28..34].copy_from_slice(&chaddr);
        b
    }

    #[test]
    fn a_learned_lock_holds_until_its_mac_ages_and_is_never_taken_from_another() {
        let g = PortGuard::new(true, None);
        let t0 = Instant::now();
        let age = Duration::from_secs(10);
        assert!(!g.mac_ok(A, t0, age, || false), "held elsewhere: no lock");
        assert!(g.mac_ok(A, t0, age, || true));
        assert!(!g.mac_ok(B, t0, age, || true), "locked to A");
        assert!(g.mac_ok(A, t0 + Duration::from_secs(9), age, || true));
        assert!(!g.mac_ok(B, t0 + Duration::from_secs(18), age, || true));
        assert!(
            g.mac_ok(B, t0 + Duration::from_secs(20), age, || true),
            "A aged"
        );
        assert_eq!(g.locked_mac(), Some(B));
        // A replaced device: the next MAC is the port's at once.
        g.release_learned();
        assert!(g.mac_ok(A, t0 + Duration::from_secs(21), age, || true));
        let c = PortGuard::new(true, Some(A));
        assert!(!c.mac_ok(B, t0, age, || true), "configured MAC only");
        assert!(c.mac_ok(A, t0, age, || false));
        c.release_learned();
        assert!(!c.mac_ok(B, t0, age, || true), "a configured MAC is kept");
    }

    #[test]
    fn leases_reservations_and_static_bindings() {
        let g = ipg();
        let t0 = Instant::now();
        g.set_leases([(A, ip(50), 1000)]);
        assert!(g.allow(A, ip(50), t0, 999));
        assert!(
            !g.allow(A, ip(51), t0, 999),
            "a leased guest uses its lease only"
        );
        assert!(!g.allow(B, ip(50), t0, 999), "another guest's lease");
        assert!(!g.allow(B, GW, t0, 999), "the gateway");
        assert!(!g.allow(B, ip(3), t0, 999), "the DNS address");
        assert!(!g.allow(B, ip(255), t0, 999), "broadcast");
        assert!(
            !g.allow(B, Ipv4Addr::new(10, 8, 0, 5), t0, 999),
            "outside the subnet"
        );
        assert!(!g.allow(B, ip(77), t0, 999), "reserved for another");
        assert!(g.allow([2, 0, 0, 0, 0, 0x77], ip(77), t0, 999));
        // B has no lease: its first free address binds, a second does not.
        assert!(g.allow(B, ip(9), t0, 999));
        assert!(!g.allow(B, ip(10), t0, 999));
        assert!(
            !g.allow(A, ip(9), t0, 1001),
            "bound to B (A's lease has ended)"
        );
        assert!(g.bound_to_other(ip(9), &A, t0));
        // Unused for the ageing time, the binding goes.
        let later = t0 + Duration::from_secs(301);
        assert!(g.allow(B, ip(10), later, 999));
        assert!(g.allow(A, ip(9), later, 1001));
    }

    #[test]
    fn frames_are_checked_by_kind() {
        let g = ipg();
        let p = PortGuard::new(true, Some(A));
        let t0 = Instant::now();
        g.set_leases([(A, ip(50), u64::MAX)]);
        let ok = |f: &[u8]| check(f, A, &p, Some(&g), None, t0);
        assert_eq!(ok(&arp(A, ip(50))), Ok(()));
        assert_eq!(ok(&arp(A, Ipv4Addr::UNSPECIFIED)), Ok(()), "probe");
        assert_eq!(ok(&arp(A, GW)), Err(GuardDrop::SpoofedArp));
        assert_eq!(ok(&arp(B, ip(50))), Err(GuardDrop::SpoofedArp), "sha");
        assert_eq!(ok(&arp(A, ip(60))), Err(GuardDrop::SpoofedArp));
        assert_eq!(
            ok(&arp(A, ip(50))[..30]),
            Err(GuardDrop::SpoofedArp),
            "short"
        );
        assert_eq!(ok(&udp(A, Ipv4Addr::UNSPECIFIED, 67, &bootp(A))), Ok(()));
        assert_eq!(
            ok(&udp(A, Ipv4Addr::UNSPECIFIED, 67, &bootp(B))),
            Err(GuardDrop::SpoofedDhcp)
        );
        assert_eq!(
            ok(&udp(A, Ipv4Addr::UNSPECIFIED, 53, b"x")),
            Err(GuardDrop::SpoofedIp),
            "0.0.0.0 only for DHCP"
        );
        assert_eq!(ok(&udp(A, ip(50), 53, b"x")), Ok(()));
        assert_eq!(ok(&udp(A, ip(51), 53, b"x")), Err(GuardDrop::SpoofedIp));
        let mut tagged = udp(A, ip(50), 53, b"x");
        tagged[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(ok(&tagged), Err(GuardDrop::SpoofedIp));
        let mut v6 = udp(A, ip(51), 53, b"x");
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(ok(&v6), Ok(()));
        // Without address knowledge (an internal network without DHCP) only ARP's
        // sender MAC and DHCP's chaddr are checked.
        let none = |f: &[u8]| check(f, A, &p, None, None, t0);
        assert_eq!(none(&udp(A, ip(51), 53, b"x")), Ok(()));
        assert_eq!(none(&arp(A, GW)), Ok(()));
        assert_eq!(none(&arp(B, GW)), Err(GuardDrop::SpoofedArp));
        assert_eq!(
            none(&udp(A, Ipv4Addr::UNSPECIFIED, 67, &bootp(B))),
            Err(GuardDrop::SpoofedDhcp)
        );
        // A released lease is rechecked at once, not after the cache's second.
        assert_eq!(ok(&udp(A, ip(50), 53, b"x")), Ok(()));
        g.set_leases([(B, ip(50), u64::MAX)]);
        assert_eq!(ok(&udp(A, ip(50), 53, b"x")), Err(GuardDrop::SpoofedIp));
    }

    #[test]
    fn static_bindings_are_bounded() {
        let g = IpGuard::new(
            Ipv4Addr::new(10, 0, 0, 0),
            8,
            &[Ipv4Addr::new(10, 0, 0, 1)],
            &[],
            Duration::from_secs(300),
        );
        let t0 = Instant::now();
        let mut bound = 0;
        for i in 0..(MAX_STATIC as u32 + 100) {
            let b = i.to_be_bytes();
            let mac = [2, 1, b[0], b[1], b[2], b[3]];
            if g.allow(mac, Ipv4Addr::new(10, 1, b[2], b[3]), t0, 0) {
                bound += 1;
            }
        }
        assert_eq!(bound, MAX_STATIC);
        assert_eq!(g.statics(), MAX_STATIC);
    }

    #[test]
    fn random_frames_never_panic() {
        let g = ipg();
        let p = PortGuard::new(true, Some(A));
        let t0 = Instant::now();
        let mut rnd = crate::test_util::xorshift(0x1234_5678_9abc_def1);
        let bases = [arp(A, ip(50)), udp(A, Ipv4Addr::UNSPECIFIED, 67, &bootp(A))];
        for i in 0..20_000 {
            let mut f = bases[i % 2].clone();
            for _ in 0..(rnd() % 6) {
                let at = (rnd() as usize) % f.len();
                f[at] = rnd() as u8;
            }
            let n = (rnd() as usize) % (f.len() + 1);
            f.truncate(n);
            let _ = check(&f, A, &p, Some(&g), None, t0);
            let _ = check(&f, A, &p, None, None, t0);
        }
    }
}
