//! The ingress path of the switch, steps 1 to 4 of the module doc of
//! [`crate::switch`]: check the frame, run the port guard on a guarded port, learn
//! the source MAC (bounded, pinned service MACs, per-port caps), then forward to the
//! learned port or flood; step 5 is [`Port::send`] on each egress port. Every entry
//! point (`ingress`, `ingress_vnet`, `ingress_remote`, `ingress_local`) ends in
//! `ingress_inner`, so every frame gets the same checks and counters, and a running
//! capture (see [`super::capture`]) sees every frame there: inbound once it is
//! decided on (marked if dropped), outbound per egress port.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

use super::counters::inc;
use super::guard::{self, GuardDrop};
use super::port::frame_payload;
use super::{Learn, Network, Port, PortClass, PortId, ETH_HLEN};
use crate::offload::VnetHdr;

/// What the caller of `ingress_inner` knows of a capture.
#[derive(Clone, Copy)]
enum Seen<'a> {
    /// Nothing: the switch checks.
    Unknown,
    /// The port checked: no capture ran.
    Off,
    /// The port checked: a capture ran; the frame is also this.
    Shared(&'a Bytes),
}

impl Network {
    /// Switches one complete frame that arrived on `from`. See the module doc.
    pub fn ingress(&self, from: &Port, frame: &[u8]) {
        self.ingress_with(from, frame, None)
    }

    /// Switches one frame (offloaded with `hdr`, if given) that a vxlan port
    /// `from` received from `remote`: the source MAC is learned behind that remote.
    pub fn ingress_remote(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        remote: Option<Ipv4Addr>,
    ) {
        self.ingress_inner(from, frame, hdr, None, remote, Seen::Unknown);
    }

    /// Switches one frame that arrived on `from` with a virtio-net header.
    pub fn ingress_vnet(&self, from: &Port, hdr: &VnetHdr, frame: &[u8]) {
        self.ingress_with(from, frame, Some(hdr))
    }

    /// Like [`Network::ingress`] / [`Network::ingress_vnet`] (every check, learning
    /// and counter the same), except that a frame the switch would send to `local`
    /// alone is not sent: it is counted as sent on `local` and `true` says the caller
    /// (the thread that owns `local`, which read the frame itself) takes it as is. Any
    /// other frame is switched as usual and the answer is `false`.
    pub fn ingress_local(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        local: &Port,
    ) -> bool {
        self.ingress_inner(from, frame, hdr, Some(local), None, Seen::Unknown)
    }

    /// [`Network::ingress`] (or [`Network::ingress_vnet`] with `hdr`) for a port
    /// that looked at [`Network::capturing`] itself, the one check of a frame:
    /// `shared` is None when no capture ran, else the frame as a [`Bytes`] (in a
    /// buffer the port gives away), which a capture keeps instead of a copy (see
    /// [`super::capture`]).
    pub fn ingress_rx(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        shared: Option<&Bytes>,
    ) {
        let seen = shared.map_or(Seen::Off, Seen::Shared);
        self.ingress_inner(from, frame, hdr, None, None, seen);
    }

    fn ingress_with(&self, from: &Port, frame: &[u8], hdr: Option<&VnetHdr>) {
        self.ingress_inner(from, frame, hdr, None, None, Seen::Unknown);
    }

    fn ingress_inner(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        local: Option<&Port>,
        remote: Option<Ipv4Addr>,
        seen: Seen<'_>,
    ) -> bool {
        let (dst, src) = match (frame.get(0..6), frame.get(6..12)) {
            (Some(d), Some(s)) if frame.len() >= ETH_HLEN => {
                let mut dst = [0u8; 6];
                let mut src = [0u8; 6];
                dst.copy_from_slice(d);
                src.copy_from_slice(s);
                (dst, src)
            }
            _ => return self.drop_in(from, frame, &from.counters.drop_malformed, "malformed"),
        };
        if src[0] & 1 != 0 {
            return self.drop_in(from, frame, &from.counters.drop_malformed, "malformed");
        }
        if frame_payload(frame, hdr) > from.mtu {
            return self.drop_in(from, frame, &from.counters.drop_mtu, "mtu");
        }
        let now = Instant::now();
        if from.guard.on {
            if let Err(why) = self.guard_check(from, src, frame, now) {
                return self.guard_drop_in(from, frame, why);
            }
        }
        let target = {
            let mut fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            // A guarded port is locked to one MAC already.
            let cap = if from.guard.on {
                usize::MAX
            } else {
                self.max_per_port.load(Ordering::Relaxed)
            };
            let learned = match fdb.learn_remote(src, from.id, remote, now, cap) {
                Learn::Learned | Learn::TableFull => Ok(()),
                // A service may answer from another service's MAC (the DHCP server
                // replying for the router): forwarded, not learned.
                Learn::Pinned if from.kind == PortClass::Service => Ok(()),
                Learn::Pinned => Err(GuardDrop::SpoofedMac),
                Learn::PortFull => Err(GuardDrop::MacLimit),
            };
            learned.map(|()| {
                if dst[0] & 1 == 0 {
                    fdb.lookup_remote(&dst, now)
                } else {
                    None
                }
            })
        };
        let target = match target {
            Ok(t) => t,
            Err(why) => return self.guard_drop_in(from, frame, why),
        };
        inc(&from.counters.rx_frames, 1);
        inc(&from.counters.rx_bytes, frame.len() as u64);
        // The one check a frame pays when nobody captures (or its port made it).
        let (taps, shared) = match seen {
            Seen::Unknown => (self.captures.on(), None),
            Seen::Off => (false, None),
            Seen::Shared(b) => (true, Some(b)),
        };
        if taps {
            let hairpin = matches!(target, Some((id, _)) if id == from.id);
            self.captures
                .inbound(from, frame, shared, hairpin.then_some("hairpin"));
        }
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        let isolated = self.isolated.load(Ordering::Relaxed) && from.kind != PortClass::Service;
        let allowed = |p: &Port| !isolated || p.kind == PortClass::Service;
        match target {
            Some((id, _)) if id == from.id => inc(&from.counters.drop_hairpin, 1),
            Some((id, to)) => {
                if let Some(p) = ports.iter().find(|p| p.id == id && allowed(p)) {
                    match local {
                        // Same MTU check and counters as `Port::send`, no copy.
                        Some(l) if l.id == id => {
                            let why = if frame_payload(frame, hdr) > l.mtu {
                                inc(&l.counters.drop_mtu, 1);
                                Some("mtu")
                            } else {
                                l.account(Ok(()), frame.len())
                            };
                            if taps {
                                self.captures.outbound(l, frame, shared, why);
                            }
                            return why.is_none();
                        }
                        _ => {
                            let why = p.send(frame, hdr, to);
                            if taps {
                                self.captures.outbound(p, frame, shared, why);
                            }
                        }
                    }
                }
            }
            None => {
                for p in ports.iter().filter(|p| p.id != from.id && allowed(p)) {
                    let why = p.send(frame, hdr, None);
                    if taps {
                        self.captures.outbound(p, frame, shared, why);
                    }
                }
            }
        }
        false
    }

    /// Counts an ingress drop on `counter` (and records it, marked `why`, when a
    /// capture runs); always false (the frame is not the caller's to take).
    fn drop_in(
        &self,
        from: &Port,
        frame: &[u8],
        counter: &std::sync::atomic::AtomicU64,
        why: &'static str,
    ) -> bool {
        inc(counter, 1);
        if self.captures.on() {
            self.captures.inbound(from, frame, None, Some(why));
        }
        false
    }

    /// [`Network::drop_in`] for a drop by the guard or the MAC limits.
    fn guard_drop_in(&self, from: &Port, frame: &[u8], why: GuardDrop) -> bool {
        from.counters.guard_drop(why);
        if self.captures.on() {
            self.captures.inbound(from, frame, None, Some(why.as_str()));
        }
        false
    }

    /// The port guard of a guarded port (see [`guard`]).
    fn guard_check(
        &self,
        from: &Port,
        src: [u8; 6],
        frame: &[u8],
        now: Instant,
    ) -> Result<(), GuardDrop> {
        let free = || self.mac_free(src, from.id, now);
        if !from.guard.mac_ok(src, now, self.ageing, free) {
            return Err(GuardDrop::SpoofedMac);
        }
        guard::check(
            frame,
            src,
            &from.guard,
            self.ip_guard.get().map(|g| &**g),
            self.ip6_guard.get().map(|g| &**g),
            now,
        )
    }

    /// Whether a guarded port `id` may lock `mac`: it is not pinned to another
    /// port, not live in the table on another local port, and no other port holds
    /// it as its lock (configured, or learned and live). A MAC that lives behind a
    /// vxlan port (a remote VTEP) is free: that is a VM that moved here from
    /// another host (live migration), announcing itself with its first frame
    /// (QEMU's RARP, a gratuitous ARP). See the module doc of [`guard`].
    fn mac_free(&self, mac: [u8; 6], id: PortId, now: Instant) -> bool {
        let (pinned, holder) = {
            let fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            (fdb.pinned_elsewhere(&mac, id), fdb.lookup(&mac, now))
        };
        if pinned {
            return false;
        }
        // Not under the table's lock: each port's guard state has a lock of its own.
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        let remote = |p: PortId| {
            ports
                .iter()
                .any(|q| q.id == p && q.kind == PortClass::Vxlan)
        };
        if holder.is_some_and(|p| p != id && !remote(p)) {
            return false;
        }
        !ports
            .iter()
            .any(|p| p.id != id && p.guard.holds(mac, now, self.ageing))
    }
}
