//! The MAC table of a network: learned MAC -> port, bounded, with ageing. For a
//! `vxlan` port an entry also holds the remote VTEP the MAC lives behind (the
//! "remote" column), so unicast goes to that remote alone.
//!
//! A full table stops learning; it never evicts a live entry, so a flood of made-up
//! source MACs cannot push out the hosts already known. Aged-out entries are swept
//! only when the table is full, and at most once per [`SWEEP_INTERVAL`], so such a
//! flood does not cost a walk of the whole table per frame under the lock every
//! ingress takes.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::PortId;

/// One learned MAC.
#[derive(Debug, Clone, Copy)]
struct FdbEntry {
    port: PortId,
    seen: Instant,
    /// The remote VTEP behind a vxlan port.
    remote: Option<Ipv4Addr>,
}

/// The MAC table: bounded, with ageing.
#[derive(Debug)]
pub struct Fdb {
    map: HashMap<[u8; 6], FdbEntry>,
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
            max,
            ageing,
            full_refusals: 0,
            sweeps: 0,
            last_sweep: None,
        }
    }

    /// Records that `mac` was seen on `port` at `now`.
    pub fn learn(&mut self, mac: [u8; 6], port: PortId, now: Instant) {
        self.learn_remote(mac, port, None, now)
    }

    /// Records that `mac` was seen on `port`, behind `remote` (a vxlan port's
    /// sender), at `now`. A MAC that moved (port or remote) is simply updated.
    pub fn learn_remote(
        &mut self,
        mac: [u8; 6],
        port: PortId,
        remote: Option<Ipv4Addr>,
        now: Instant,
    ) {
        if let Some(e) = self.map.get_mut(&mac) {
            e.port = port;
            e.seen = now;
            e.remote = remote;
            return;
        }
        if self.map.len() >= self.max {
            let due = self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL);
            if due {
                let ageing = self.ageing;
                self.map.retain(|_, e| now.duration_since(e.seen) < ageing);
                self.sweeps += 1;
                self.last_sweep = Some(now);
            }
            if self.map.len() >= self.max {
                self.full_refusals += 1;
                return;
            }
        }
        self.map.insert(
            mac,
            FdbEntry {
                port,
                seen: now,
                remote,
            },
        );
    }

    /// Like [`Fdb::lookup`], with the remote the MAC lives behind, if any.
    pub fn lookup_remote(&self, mac: &[u8; 6], now: Instant) -> Option<(PortId, Option<Ipv4Addr>)> {
        self.map
            .get(mac)
            .filter(|e| now.duration_since(e.seen) < self.ageing)
            .map(|e| (e.port, e.remote))
    }

    /// The remote `mac` was learned behind, if any.
    pub fn remote_of(&self, mac: &[u8; 6]) -> Option<Ipv4Addr> {
        self.map.get(mac).and_then(|e| e.remote)
    }

    /// Forgets every entry of `port` behind `remote`.
    pub fn flush_remote(&mut self, port: PortId, remote: Ipv4Addr) {
        self.map
            .retain(|_, e| !(e.port == port && e.remote == Some(remote)));
    }

    /// The port `mac` was last seen on, unless aged out.
    pub fn lookup(&self, mac: &[u8; 6], now: Instant) -> Option<PortId> {
        self.map
            .get(mac)
            .filter(|e| now.duration_since(e.seen) < self.ageing)
            .map(|e| e.port)
    }

    /// Forgets every entry of `port`.
    pub fn flush_port(&mut self, port: PortId) {
        self.map.retain(|_, e| e.port != port);
    }

    /// Live entries: (mac, port, age).
    pub fn entries(&self, now: Instant) -> Vec<([u8; 6], PortId, Duration)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, e)| now.duration_since(e.seen) < self.ageing)
            .map(|(m, e)| (*m, e.port, now.duration_since(e.seen)))
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

    #[test]
    fn table_is_bounded_and_ages() {
        let mut fdb = Fdb::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        fdb.learn([2, 0, 0, 0, 0, 1], 1, t0);
        fdb.learn([2, 0, 0, 0, 0, 2], 1, t0);
        fdb.learn([2, 0, 0, 0, 0, 3], 1, t0);
        assert_eq!(fdb.len(), 2);
        assert_eq!(fdb.full_refusals, 1);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 1], t0), Some(1));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 1], later), None);
        fdb.learn([2, 0, 0, 0, 0, 3], 2, later);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 3], later), Some(2));
        assert_eq!(fdb.len(), 1);
    }

    #[test]
    fn remotes_are_learned_moved_and_flushed() {
        let mut fdb = Fdb::new(8, Duration::from_secs(10));
        let t0 = Instant::now();
        let (r1, r2) = (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2));
        let m = [2, 0, 0, 0, 0, 1];
        fdb.learn_remote(m, 5, Some(r1), t0);
        assert_eq!(fdb.lookup_remote(&m, t0), Some((5, Some(r1))));
        // Moves between remotes, then to a local port, each from its next frame.
        fdb.learn_remote(m, 5, Some(r2), t0);
        assert_eq!(fdb.remote_of(&m), Some(r2));
        fdb.learn(m, 1, t0);
        assert_eq!(fdb.lookup_remote(&m, t0), Some((1, None)));
        fdb.learn_remote(m, 5, Some(r1), t0);
        fdb.learn_remote([2, 0, 0, 0, 0, 2], 5, Some(r2), t0);
        fdb.flush_remote(5, r1);
        assert_eq!(fdb.lookup(&m, t0), None);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 2], t0), Some(5));
    }

    #[test]
    fn a_mac_flood_into_a_full_table_does_not_sweep_per_frame() {
        let mut fdb = Fdb::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        fdb.learn([2, 0, 0, 0, 0, 1], 1, t0);
        fdb.learn([2, 0, 0, 0, 0, 2], 1, t0);
        for i in 0..1000u16 {
            let b = i.to_be_bytes();
            fdb.learn(
                [2, 1, 0, 0, b[0], b[1]],
                1,
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert_eq!(fdb.full_refusals, 1000);
        assert_eq!(fdb.sweeps, 1);
        // Known MACs still refresh, and after ageing the table takes new ones again.
        fdb.learn([2, 0, 0, 0, 0, 1], 3, t0 + Duration::from_secs(5));
        assert_eq!(
            fdb.lookup(&[2, 0, 0, 0, 0, 1], t0 + Duration::from_secs(5)),
            Some(3)
        );
        let later = t0 + Duration::from_secs(11);
        fdb.learn([2, 0, 0, 0, 0, 9], 2, later);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 9], later), Some(2));
    }
}
