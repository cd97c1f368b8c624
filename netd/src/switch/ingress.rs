//! The ingress path of the switch, steps 1 to 4 of the module doc of
//! [`crate::switch`]: check the frame, run the port guard on a guarded port, learn
//! the source MAC (bounded, pinned service MACs, per-port caps), then forward to the
//! learned port or flood; step 5 is [`Port::send`] on each egress port. Every entry
//! point (`ingress`, `ingress_vnet`, `ingress_remote`, `ingress_local`) ends in
//! `ingress_inner`, so every frame gets the same checks and counters.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::counters::inc;
use super::guard::{self, GuardDrop};
use super::port::frame_payload;
use super::{Learn, Network, Port, PortClass, PortId, ETH_HLEN};
use crate::offload::VnetHdr;

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
        self.ingress_inner(from, frame, hdr, None, remote);
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
        self.ingress_inner(from, frame, hdr, Some(local), None)
    }

    fn ingress_with(&self, from: &Port, frame: &[u8], hdr: Option<&VnetHdr>) {
        self.ingress_inner(from, frame, hdr, None, None);
    }

    fn ingress_inner(
        &self,
        from: &Port,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        local: Option<&Port>,
        remote: Option<Ipv4Addr>,
    ) -> bool {
        let (dst, src) = match (frame.get(0..6), frame.get(6..12)) {
            (Some(d), Some(s)) if frame.len() >= ETH_HLEN => {
                let mut dst = [0u8; 6];
                let mut src = [0u8; 6];
                dst.copy_from_slice(d);
                src.copy_from_slice(s);
                (dst, src)
            }
            _ => {
                inc(&from.counters.drop_malformed, 1);
                return false;
            }
        };
        if src[0] & 1 != 0 {
            inc(&from.counters.drop_malformed, 1);
            return false;
        }
        if frame_payload(frame, hdr) > from.mtu {
            inc(&from.counters.drop_mtu, 1);
            return false;
        }
        let now = Instant::now();
        if from.guard.on {
            if let Err(why) = self.guard_check(from, src, frame, now) {
                from.counters.guard_drop(why);
                return false;
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
            match fdb.learn_remote(src, from.id, remote, now, cap) {
                Learn::Learned | Learn::TableFull => {}
                // A service may answer from another service's MAC (the DHCP server
                // replying for the router): forwarded, not learned.
                Learn::Pinned if from.kind == PortClass::Service => {}
                Learn::Pinned => {
                    from.counters.guard_drop(GuardDrop::SpoofedMac);
                    return false;
                }
                Learn::PortFull => {
                    from.counters.guard_drop(GuardDrop::MacLimit);
                    return false;
                }
            }
            if dst[0] & 1 == 0 {
                fdb.lookup_remote(&dst, now)
            } else {
                None
            }
        };
        inc(&from.counters.rx_frames, 1);
        inc(&from.counters.rx_bytes, frame.len() as u64);
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
                            if frame_payload(frame, hdr) > l.mtu {
                                inc(&l.counters.drop_mtu, 1);
                                return false;
                            }
                            l.account(Ok(()), frame.len());
                            return true;
                        }
                        _ => p.send(frame, hdr, to),
                    }
                }
            }
            None => {
                for p in ports.iter().filter(|p| p.id != from.id && allowed(p)) {
                    p.send(frame, hdr, None);
                }
            }
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
            now,
        )
    }

    /// Whether a guarded port `id` may lock `mac`: no other port has it (learned
    /// and live, pinned, or configured).
    fn mac_free(&self, mac: [u8; 6], id: PortId, now: Instant) -> bool {
        {
            let fdb = self.fdb.lock().unwrap_or_else(|e| e.into_inner());
            if fdb.pinned_elsewhere(&mac, id) || fdb.lookup(&mac, now).is_some_and(|p| p != id) {
                return false;
            }
        }
        !self
            .ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|p| p.id != id && p.guard.configured == Some(mac))
    }
}
