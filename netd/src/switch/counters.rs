//! Per-port counters: atomics bumped on the switching path without a lock
//! ([`Counters`]), and the snapshot of them the control API and `netd port list`
//! show ([`CountersSnapshot`]). Every drop has its own counter, by reason, so an
//! attack shows up as the counter of what it tried.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::guard::GuardDrop;

/// Per-port counters. `rx` is what the port delivered into the switch, `tx` what the
/// switch sent out of the port.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames received from the port and accepted.
    pub rx_frames: AtomicU64,
    /// Bytes of those.
    pub rx_bytes: AtomicU64,
    /// Frames sent out of the port.
    pub tx_frames: AtomicU64,
    /// Bytes of those.
    pub tx_bytes: AtomicU64,
    /// Dropped on ingress: shorter than an Ethernet header or multicast source.
    pub drop_malformed: AtomicU64,
    /// Dropped: larger than the port MTU (ingress or egress).
    pub drop_mtu: AtomicU64,
    /// Dropped on egress: the port's queue was full.
    pub drop_full: AtomicU64,
    /// Dropped on egress: the port had no peer.
    pub drop_down: AtomicU64,
    /// Dropped on egress: I/O error.
    pub drop_io: AtomicU64,
    /// Dropped on ingress: destination learned on the same port (hairpin).
    pub drop_hairpin: AtomicU64,
    /// Dropped on egress: an offloaded frame that could not be finished in software.
    pub drop_offload: AtomicU64,
    /// Times the port's receive thread panicked and was restarted.
    pub restarts: AtomicU64,
    /// Dropped by the guard: a source MAC not the port's (or a service's MAC).
    pub drop_spoofed_mac: AtomicU64,
    /// Dropped by the guard: an IPv4 source the port may not use.
    pub drop_spoofed_ip: AtomicU64,
    /// Dropped by the guard: ARP claiming another MAC or address.
    pub drop_spoofed_arp: AtomicU64,
    /// Dropped by the guard: a DHCP message with another MAC as `chaddr`.
    pub drop_spoofed_dhcp: AtomicU64,
    /// Dropped on ingress: a new source MAC on a port at `max_macs_per_port`.
    pub drop_mac_limit: AtomicU64,
    /// Dropped by the guard: an IPv6 source the port may not use.
    pub drop_spoofed_ip6: AtomicU64,
    /// Dropped by the guard: an RA, Redirect or DHCPv6 server message from a guest.
    pub drop_rogue_router: AtomicU64,
    /// Dropped by the guard: NDP claiming another's address or MAC.
    pub drop_spoofed_nd: AtomicU64,
    /// Dropped by the guard: ND/MLD past the port's rate.
    pub drop_nd_limit: AtomicU64,
    /// Dropped on ingress: a TCP super-frame asking for too much work (segment size
    /// below [`crate::offload::MIN_GSO_SIZE`] or more than
    /// [`crate::offload::MAX_GSO_SEGS`] segments).
    pub drop_gso: AtomicU64,
}

/// A snapshot of [`Counters`], as the control API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// See [`Counters`].
    pub rx_frames: u64,
    /// See [`Counters`].
    pub rx_bytes: u64,
    /// See [`Counters`].
    pub tx_frames: u64,
    /// See [`Counters`].
    pub tx_bytes: u64,
    /// See [`Counters`].
    pub drop_malformed: u64,
    /// See [`Counters`].
    pub drop_mtu: u64,
    /// See [`Counters`].
    pub drop_full: u64,
    /// See [`Counters`].
    pub drop_down: u64,
    /// See [`Counters`].
    pub drop_io: u64,
    /// See [`Counters`].
    pub drop_hairpin: u64,
    /// See [`Counters`].
    pub drop_offload: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub restarts: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_mac: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_ip: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_arp: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_dhcp: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_mac_limit: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_gso: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_ip6: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_rogue_router: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_spoofed_nd: u64,
    /// See [`Counters`].
    #[serde(default)]
    pub drop_nd_limit: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            rx_frames: r(&self.rx_frames),
            rx_bytes: r(&self.rx_bytes),
            tx_frames: r(&self.tx_frames),
            tx_bytes: r(&self.tx_bytes),
            drop_malformed: r(&self.drop_malformed),
            drop_mtu: r(&self.drop_mtu),
            drop_full: r(&self.drop_full),
            drop_down: r(&self.drop_down),
            drop_io: r(&self.drop_io),
            drop_hairpin: r(&self.drop_hairpin),
            drop_offload: r(&self.drop_offload),
            restarts: r(&self.restarts),
            drop_spoofed_mac: r(&self.drop_spoofed_mac),
            drop_spoofed_ip: r(&self.drop_spoofed_ip),
            drop_spoofed_arp: r(&self.drop_spoofed_arp),
            drop_spoofed_dhcp: r(&self.drop_spoofed_dhcp),
            drop_mac_limit: r(&self.drop_mac_limit),
            drop_gso: r(&self.drop_gso),
            drop_spoofed_ip6: r(&self.drop_spoofed_ip6),
            drop_rogue_router: r(&self.drop_rogue_router),
            drop_spoofed_nd: r(&self.drop_spoofed_nd),
            drop_nd_limit: r(&self.drop_nd_limit),
        }
    }

    /// Counts a drop by the guard.
    pub(super) fn guard_drop(&self, why: GuardDrop) {
        let c = match why {
            GuardDrop::SpoofedMac => &self.drop_spoofed_mac,
            GuardDrop::SpoofedIp => &self.drop_spoofed_ip,
            GuardDrop::SpoofedArp => &self.drop_spoofed_arp,
            GuardDrop::SpoofedDhcp => &self.drop_spoofed_dhcp,
            GuardDrop::MacLimit => &self.drop_mac_limit,
            GuardDrop::SpoofedIp6 => &self.drop_spoofed_ip6,
            GuardDrop::RogueRouter => &self.drop_rogue_router,
            GuardDrop::SpoofedNd => &self.drop_spoofed_nd,
            GuardDrop::NdLimit => &self.drop_nd_limit,
        };
        inc(c, 1);
    }
}

pub(super) fn inc(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}
