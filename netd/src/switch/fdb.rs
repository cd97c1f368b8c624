//! The MAC table of a network: learned MAC -> port, bounded, with ageing. For a
//! `vxlan` port an entry also holds the remote VTEP the MAC lives behind (the
//! "remote" column), so unicast goes to that remote alone.
//!
//! A full table stops learning; it never evicts a live entry, so a flood of made-up
//! source MACs cannot push out the hosts already known. Aged-out entries are swept
//! only when the table is full, and at most once per [`SWEEP_INTERVAL`], so such a
//! flood does not cost a walk of the whole table per frame under the lock every
//! ingress takes.
//!
//! Two more bounds against a hostile port: a port may hold at most its cap of
//! entries (`max_macs_per_port` for an unguarded port; a guarded one is locked to
//! one MAC before it gets here), and a service's MAC (the router's, the DHCP
//! server's) is pinned to the service's port: it never ages, never moves, and a
//! frame from it on another port is refused ([`Learn::Pinned`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::PortId;

/// One learned MAC.
#[derive(Debug, Clone, Copy)]
struct FdbEntry {
    port: PortId,
    seen: Instant,
    /// A service's MAC: never ages, never moves.
    pinned: bool,
    /// The remote VTEP behind a vxlan port.
    remote: Option<Ipv4Addr>,
}

impl FdbEntry {
    /// A MAC just learned (or moved) on `port`, behind `remote` on a vxlan port.
    fn learned(port: PortId, seen: Instant, remote: Option<Ipv4Addr>) -> Self {
        FdbEntry {
            port,
            seen,
            pinned: false,
            remote,
        }
    }
}

/// What [`Fdb::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Learned or refreshed.
    Learned,
    /// The table is full of live entries: not learned (the frame may still go).
    TableFull,
    /// The MAC is pinned to another port: the frame is not from its owner.
    Pinned,
    /// The port already holds its cap of entries.
    PortFull,
}

/// The MAC table: bounded, with ageing.
#[derive(Debug)]
pub struct Fdb {
    map: HashMap<[u8; 6], FdbEntry>,
    /// Entries per port.
    per_port: HashMap<PortId, usize>,
    max: usize,
    ageing: Duration,
    /// Learn attempts refused because the table was full of live entries.
    pub full_refusals: u64,
    /// Sweeps of the whole table for aged-out entries (each costs O(table)).
    pub sweeps: u64,
    last_sweep: Option<Instant>,
}

/// Least time between two sweeps of a full table. A flood of new source MACs into a
/// full table would otherwise cost a walk of the whole table (up to `max_macs`, a
/// million) per frame, under the lock every ingress takes; this way a freed slot
/// is reused at most this late.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Fdb {
    /// An empty table holding at most `max` entries, forgetting after `ageing`.
    pub fn new(max: usize, ageing: Duration) -> Self {
        Fdb {
            map: HashMap::new(),
            per_port: HashMap::new(),
            max,
            ageing,
            full_refusals: 0,
            sweeps: 0,
            last_sweep: None,
        }
    }

    /// Records that `mac` was seen on `port` at `now`; `cap` is the most entries
    /// `port` may hold.
    pub fn learn(&mut self, mac: [u8; 6], port: PortId, now: Instant, cap: usize) -> Learn {
        self.learn_remote(mac, port, None, now, cap)
    }

    /// Records that `mac` was seen on `port`, behind `remote` (a vxlan port's
    /// sender), at `now`; `cap` is the most entries `port` may hold. A MAC that
    /// moved (port or remote) is updated from this frame.
    pub fn learn_remote(
        &mut self,
        mac: [u8; 6],
        port: PortId,
        remote: Option<Ipv4Addr>,
        now: Instant,
        cap: usize,
    ) -> Learn {
        if let Some(e) = self.map.get(&mac).copied() {
            if e.pinned {
                return if e.port == port {
                    Learn::Learned
                } else {
                    Learn::Pinned
                };
            }
            if e.port != port {
                if self.count(port) >= cap && !self.sweep_port(port, now, cap) {
                    return Learn::PortFull;
                }
                self.dec(e.port);
                *self.per_port.entry(port).or_default() += 1;
            }
            self.map.insert(mac, FdbEntry::learned(port, now, remote));
            return Learn::Learned;
        }
        if self.count(port) >= cap && !self.sweep_port(port, now, cap) {
            return Learn::PortFull;
        }
        if self.map.len() >= self.max {
            if self.sweep_due(now) {
                self.sweep(now);
            }
            if self.map.len() >= self.max {
                self.full_refusals += 1;
                return Learn::TableFull;
            }
        }
        self.map.insert(mac, FdbEntry::learned(port, now, remote));
        *self.per_port.entry(port).or_default() += 1;
        Learn::Learned
    }

    /// Pins `mac` to `port` (a service's own MAC).
    pub fn pin(&mut self, mac: [u8; 6], port: PortId, now: Instant) {
        if let Some(old) = self.map.get(&mac).map(|e| e.port) {
            self.dec(old);
        }
        self.map.insert(
            mac,
            FdbEntry {
                port,
                seen: now,
                pinned: true,
                remote: None,
            },
        );
        *self.per_port.entry(port).or_default() += 1;
    }

    /// Whether `mac` is pinned to a port other than `port`.
    pub fn pinned_elsewhere(&self, mac: &[u8; 6], port: PortId) -> bool {
        self.map
            .get(mac)
            .is_some_and(|e| e.pinned && e.port != port)
    }

    fn count(&self, port: PortId) -> usize {
        self.per_port.get(&port).copied().unwrap_or(0)
    }

    fn dec(&mut self, port: PortId) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_port.remove(&port);
            }
        }
    }

    fn sweep_due(&self, now: Instant) -> bool {
        self.last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL)
    }

    /// Forgets aged-out entries (counts a sweep).
    fn sweep(&mut self, now: Instant) {
        let ageing = self.ageing;
        self.map
            .retain(|_, e| e.pinned || now.saturating_duration_since(e.seen) < ageing);
        self.recount();
        self.sweeps += 1;
        self.last_sweep = Some(now);
    }

    /// Rebuilds the entries-per-port counts from the table.
    fn recount(&mut self) {
        self.per_port.clear();
        for e in self.map.values() {
            *self.per_port.entry(e.port).or_default() += 1;
        }
    }

    /// A port at its cap: sweeps (at most once per [`SWEEP_INTERVAL`]) and says
    /// whether it is below its cap now.
    fn sweep_port(&mut self, port: PortId, now: Instant, cap: usize) -> bool {
        if self.sweep_due(now) {
            self.sweep(now);
        }
        self.count(port) < cap
    }

    /// Like [`Fdb::lookup`], with the remote the MAC lives behind, if any.
    pub fn lookup_remote(&self, mac: &[u8; 6], now: Instant) -> Option<(PortId, Option<Ipv4Addr>)> {
        self.map
            .get(mac)
            .filter(|e| e.pinned || now.saturating_duration_since(e.seen) < self.ageing)
            .map(|e| (e.port, e.remote))
    }

    /// The remote `mac` was learned behind, if any.
    pub fn remote_of(&self, mac: &[u8; 6]) -> Option<Ipv4Addr> {
        self.map.get(mac).and_then(|e| e.remote)
    }

    /// Forgets every entry of `port` behind `remote`.
    pub fn flush_remote(&mut self, port: PortId, remote: Ipv4Addr) {
        let before = self.map.len();
        self.map
            .retain(|_, e| !(e.port == port && e.remote == Some(remote)));
        if self.map.len() != before {
            self.recount();
        }
    }

    /// The port `mac` was last seen on, unless aged out.
    pub fn lookup(&self, mac: &[u8; 6], now: Instant) -> Option<PortId> {
        self.map
            .get(mac)
            .filter(|e| e.pinned || now.saturating_duration_since(e.seen) < self.ageing)
            .map(|e| e.port)
    }

    /// Forgets every entry of `port`.
    pub fn flush_port(&mut self, port: PortId) {
        self.map.retain(|_, e| e.port != port);
        self.per_port.remove(&port);
    }

    /// Live entries: (mac, port, age).
    pub fn entries(&self, now: Instant) -> Vec<([u8; 6], PortId, Duration)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, e)| e.pinned || now.saturating_duration_since(e.seen) < self.ageing)
            .map(|(m, e)| (*m, e.port, now.saturating_duration_since(e.seen)))
            .collect();
        v.sort_by_key(|(m, _, _)| *m);
        v
    }

    /// Number of stored entries (live or not yet swept).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of 2 (10 s ageing), full at `t0`: 02::01 and 02::02 on port 1.
    fn full_table_of_two(t0: Instant) -> Fdb {
        let mut fdb = Fdb::new(2, Duration::from_secs(10));
        fdb.learn([2, 0, 0, 0, 0, 1], 1, t0, usize::MAX);
        fdb.learn([2, 0, 0, 0, 0, 2], 1, t0, usize::MAX);
        fdb
    }

    #[test]
    fn table_is_bounded_and_ages() {
        let t0 = Instant::now();
        let mut fdb = full_table_of_two(t0);
        fdb.learn([2, 0, 0, 0, 0, 3], 1, t0, usize::MAX);
        assert_eq!(fdb.len(), 2);
        assert_eq!(fdb.full_refusals, 1);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 1], t0), Some(1));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 1], later), None);
        fdb.learn([2, 0, 0, 0, 0, 3], 2, later, usize::MAX);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 3], later), Some(2));
        assert_eq!(fdb.len(), 1);
    }

    #[test]
    fn remotes_are_learned_moved_and_flushed() {
        let mut fdb = Fdb::new(8, Duration::from_secs(10));
        let t0 = Instant::now();
        let (r1, r2) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        let m = [2, 0, 0, 0, 0, 1];
        fdb.learn_remote(m, 5, Some(r1), t0, usize::MAX);
        assert_eq!(fdb.lookup_remote(&m, t0), Some((5, Some(r1))));
        // Moves between remotes, then to a local port, each from its next frame.
        fdb.learn_remote(m, 5, Some(r2), t0, usize::MAX);
        assert_eq!(fdb.remote_of(&m), Some(r2));
        fdb.learn(m, 1, t0, usize::MAX);
        assert_eq!(fdb.lookup_remote(&m, t0), Some((1, None)));
        fdb.learn_remote(m, 5, Some(r1), t0, usize::MAX);
        fdb.learn_remote([2, 0, 0, 0, 0, 2], 5, Some(r2), t0, usize::MAX);
        fdb.flush_remote(5, r1);
        assert_eq!(fdb.lookup(&m, t0), None);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 2], t0), Some(5));
    }

    #[test]
    fn a_mac_flood_into_a_full_table_does_not_sweep_per_frame() {
        let t0 = Instant::now();
        let mut fdb = full_table_of_two(t0);
        for i in 0..1000u16 {
            let b = i.to_be_bytes();
            fdb.learn(
                [2, 1, 0, 0, b[0], b[1]],
                1,
                t0 + Duration::from_millis(u64::from(i)),
                usize::MAX,
            );
        }
        assert_eq!(fdb.full_refusals, 1000);
        assert_eq!(fdb.sweeps, 1);
        // Known MACs still refresh, and after ageing the table takes new ones again.
        fdb.learn(
            [2, 0, 0, 0, 0, 1],
            3,
            t0 + Duration::from_secs(5),
            usize::MAX,
        );
        assert_eq!(
            fdb.lookup(&[2, 0, 0, 0, 0, 1], t0 + Duration::from_secs(5)),
            Some(3)
        );
        let later = t0 + Duration::from_secs(11);
        fdb.learn([2, 0, 0, 0, 0, 9], 2, later, usize::MAX);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 9], later), Some(2));
    }

    #[test]
    fn a_port_holds_at_most_its_cap_and_pins_do_not_move() {
        let mut fdb = Fdb::new(100, Duration::from_secs(10));
        let t0 = Instant::now();
        let m = |i: u8| [2, 0, 0, 0, 1, i];
        for i in 0..3 {
            assert_eq!(fdb.learn(m(i), 1, t0, 3), Learn::Learned);
        }
        assert_eq!(fdb.learn(m(3), 1, t0, 3), Learn::PortFull);
        assert_eq!(
            fdb.learn(m(0), 1, t0, 3),
            Learn::Learned,
            "a known MAC refreshes"
        );
        assert_eq!(
            fdb.learn(m(3), 2, t0, 3),
            Learn::Learned,
            "other ports unaffected"
        );
        // Moving an entry to a full port is refused too; moving away frees a slot.
        assert_eq!(fdb.learn(m(3), 1, t0, 3), Learn::PortFull);
        assert_eq!(fdb.learn(m(0), 2, t0, 3), Learn::Learned);
        assert_eq!(fdb.learn(m(3), 1, t0, 3), Learn::Learned);
        // Aged-out entries make room again.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(fdb.learn(m(9), 1, later, 3), Learn::Learned);
        // A pinned MAC stays with its owner and does not age.
        let svc = [2, 0x4e, 0, 0, 0, 2];
        fdb.pin(svc, 7, t0);
        assert_eq!(fdb.learn(svc, 1, t0, 3), Learn::Pinned);
        assert_eq!(fdb.learn(svc, 7, t0, 3), Learn::Learned);
        assert!(fdb.pinned_elsewhere(&svc, 1));
        assert!(!fdb.pinned_elsewhere(&svc, 7));
        let much_later = t0 + Duration::from_secs(1000);
        assert_eq!(fdb.lookup(&svc, much_later), Some(7));
    }
}
