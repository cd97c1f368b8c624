//! Packet capture inside the switch (`netd capture`): the taps of a network
//! ([`Taps`]) and one capture's side of them ([`Capture`]).
//!
//! Theory of operation. Every frame enters the switch through
//! [`Network::ingress`](super::Network::ingress) and its siblings, whatever the port
//! kind (tap, vm, stream, vxlan, uplink, the services' ports), so that is where a
//! capture looks: each frame is recorded once, *inbound* on the port it came in
//! by, after the switch decided on it, and a frame the switch dropped there (bounds
//! checks, the port guard, the MAC limits, a hairpin) is recorded with the reason
//! (`dropped: spoofed_mac`, the counter's name without `drop_`). A capture of named
//! ports (`--port P`) also records what the switch sent *out* of those ports
//! (outbound, egress drops marked the same way), so a port's capture shows both
//! directions, as tcpdump on an interface does.
//!
//! Cost. With no capture, the switching path pays one relaxed atomic load per
//! frame ([`Taps::on`], or [`Network::capturing`] where the port looks itself).
//! With captures, a recorded frame becomes a message charged to the capture's
//! [`ByteBudget`] (its length, up to the snaplen, and a fixed cost, refunded when
//! the reader takes it) and is put on its bounded channel with `try_send`: a
//! capture whose reader is slow loses frames (counted per port, reported at the
//! end), it never makes a port wait.
//! The message is the frame's own buffer when the port gave it
//! ([`Network::ingress_rx`]: `tap`, `vm` and `uplink` ports, which then read on
//! into another buffer of their pool) and the frame is at least [`SHARE_MIN`]
//! long, so the large frames that make up most of the bytes are never copied on
//! the switching path; other frames are copied (up to the snaplen). The reader
//! takes many frames per wake-up and hands them to `writev` as they are (see
//! `daemon/capture.rs` and `daemon/capture_out.rs`), so a recorded frame is not
//! copied in user space at all on its way to the capture's file.
//!
//! A capture ends when its [`Capture`] is dropped (the control connection that
//! drains it closed, or reached its `--count`): the tap leaves the network at once.
//! When the network is removed (`netd net del`), [`Taps::end_all`] takes every tap
//! off and signals [`Capture::ended`], so that the reader ends its stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::guard::GuardDrop;
use super::{Network, Port, PortClass, PortId, SwitchError};
use crate::budget::{ByteBudget, Charge};
use crate::pcapng::{
    FLAG_BROADCAST, FLAG_INBOUND, FLAG_MULTICAST, FLAG_OUTBOUND, FLAG_UNICAST, MAX_SNAPLEN,
};

/// Most captures at once on one network.
pub const MAX_CAPTURES: usize = 8;
/// Most bytes of frames waiting in one capture's queue.
pub const CAPTURE_QUEUE_BYTES: usize = 8 << 20;
/// Most frames waiting in one capture's queue.
pub const CAPTURE_QUEUE_FRAMES: usize = 16384;
/// The shortest recorded frame that refers to the port's receive buffer instead
/// of being copied (when the port gives it, see [`Network::ingress_rx`]): half a
/// receive buffer (one largest frame), so that what a queue holds is at most
/// twice what it is charged.
pub const SHARE_MIN: usize = 32 << 10;

/// One recorded frame.
#[derive(Debug)]
pub struct Record {
    /// The port it was recorded on.
    pub port: PortId,
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Its whole length (`data` is cut at the snaplen).
    pub orig_len: u32,
    /// pcapng `epb_flags`: direction and reception type.
    pub flags: u32,
    /// Why the switch dropped it, if it did (a counter's name without `drop_`).
    pub drop: Option<&'static str>,
    /// The captured bytes.
    pub data: Bytes,
    /// Its charge on the capture's budget: refunded when the reader takes the
    /// frame (drops the record), even if `data` is kept longer (until written).
    pub charge: Charge,
}

/// One capture's tap: which ports, how much of each frame, and its queue.
struct Tap {
    /// Named ports (both directions), or None: every port, inbound.
    ports: Option<Vec<String>>,
    snaplen: usize,
    tx: mpsc::Sender<Record>,
    budget: Arc<ByteBudget>,
    /// Frames lost (queue full), by port.
    lost: Mutex<HashMap<PortId, u64>>,
    /// Signalled when the network goes away ([`Taps::end_all`]).
    end: tokio::sync::Notify,
}

impl Tap {
    fn wants(&self, port: &Port, outbound: bool) -> bool {
        match &self.ports {
            None => !outbound,
            Some(names) => names.contains(&port.name),
        }
    }

    fn record(
        &self,
        port: &Port,
        frame: &[u8],
        shared: Option<&Bytes>,
        flags: u32,
        ts_ns: u64,
        drop: Option<&'static str>,
    ) {
        let cut = frame.len().min(self.snaplen);
        let sent = self.budget.charge_len(cut).is_some_and(|charge| {
            let data = match shared {
                // The same bytes, charged the same, not copied.
                Some(b) if cut >= SHARE_MIN && b.len() == frame.len() => b.slice(..cut),
                _ => Bytes::copy_from_slice(&frame[..cut]),
            };
            self.tx
                .try_send(Record {
                    port: port.id,
                    ts_ns,
                    orig_len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
                    flags,
                    drop,
                    data,
                    charge,
                })
                .is_ok()
        });
        if !sent {
            let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            *lost.entry(port.id).or_default() += 1;
        }
    }
}

/// The captures of one network.
#[derive(Default)]
pub struct Taps {
    on: AtomicBool,
    /// Whether any capture names its ports (and so records outbound frames).
    outbound_on: AtomicBool,
    list: RwLock<Vec<Arc<Tap>>>,
    /// The network was removed: no capture starts any more.
    closed: AtomicBool,
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The reception type bits of `epb_flags`, from the destination MAC.
fn reception(frame: &[u8]) -> u32 {
    match frame.get(0..6) {
        Some([0xff, 0xff, 0xff, 0xff, 0xff, 0xff]) => FLAG_BROADCAST,
        Some(d) if d[0] & 1 != 0 => FLAG_MULTICAST,
        Some(_) => FLAG_UNICAST,
        None => 0,
    }
}

impl Taps {
    /// Whether any capture runs: the one check the switching path makes.
    #[inline]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Records a frame that `port` delivered into the switch (`drop`: why the
    /// switch dropped it); `shared`: the same bytes as a [`Bytes`], when the port
    /// read them into a buffer it can give away. Call only when [`Taps::on`].
    pub(super) fn inbound(
        &self,
        port: &Port,
        frame: &[u8],
        shared: Option<&Bytes>,
        drop: Option<&'static str>,
    ) {
        self.record(port, frame, shared, FLAG_INBOUND, false, drop);
    }

    /// Records a frame the switch sent (or, with `drop`, failed to send) out of
    /// `port` (`shared` as for [`Taps::inbound`]). Call only when [`Taps::on`].
    pub(super) fn outbound(
        &self,
        port: &Port,
        frame: &[u8],
        shared: Option<&Bytes>,
        drop: Option<&'static str>,
    ) {
        if !self.outbound_on.load(Ordering::Relaxed) {
            return;
        }
        self.record(port, frame, shared, FLAG_OUTBOUND, true, drop);
    }

    fn record(
        &self,
        port: &Port,
        frame: &[u8],
        shared: Option<&Bytes>,
        dir: u32,
        outbound: bool,
        drop: Option<&'static str>,
    ) {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        let mut ts = None;
        for tap in list.iter().filter(|t| t.wants(port, outbound)) {
            let ts_ns = *ts.get_or_insert_with(now_ns);
            tap.record(port, frame, shared, dir | reception(frame), ts_ns, drop);
        }
    }

    /// Ends every capture of the network (it is being removed): each tap leaves,
    /// and its [`Capture::ended`] fires, so its reader writes the statistics and
    /// closes. A capture started after this ends at once.
    pub fn end_all(&self) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Relaxed);
        for t in list.drain(..) {
            t.end.notify_one();
        }
        self.set_flags(&list);
    }

    fn remove(&self, tap: &Arc<Tap>) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        list.retain(|t| !Arc::ptr_eq(t, tap));
        self.set_flags(&list);
    }

    fn set_flags(&self, list: &[Arc<Tap>]) {
        self.on.store(!list.is_empty(), Ordering::Relaxed);
        let named = list.iter().any(|t| t.ports.is_some());
        self.outbound_on.store(named, Ordering::Relaxed);
    }
}

/// A running capture: its frames arrive on [`Capture::frames`]; dropping it ends
/// the capture.
pub struct Capture {
    net: Arc<Network>,
    tap: Arc<Tap>,
    /// The recorded frames, in order per port.
    pub frames: mpsc::Receiver<Record>,
}

/// A port as a capture names it: id, name and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPort {
    /// The port's id.
    pub id: PortId,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: PortClass,
}

impl Capture {
    /// The ports captured now (every port of the network, or the named ones).
    pub fn ports(&self) -> Vec<CapturedPort> {
        let ports = self.net.ports.read().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .filter(|p| self.tap.wants(p, self.tap.ports.is_some()))
            .map(|p| CapturedPort {
                id: p.id,
                name: p.name.clone(),
                kind: p.kind,
            })
            .collect()
    }

    /// The port `id`, if it is still on the network.
    pub fn port(&self, id: PortId) -> Option<CapturedPort> {
        let ports = self.net.ports.read().unwrap_or_else(|e| e.into_inner());
        ports.iter().find(|p| p.id == id).map(|p| CapturedPort {
            id: p.id,
            name: p.name.clone(),
            kind: p.kind,
        })
    }

    /// Frames lost so far (the queue was full), by port.
    pub fn lost(&self) -> HashMap<PortId, u64> {
        self.tap
            .lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The network's name.
    pub fn network(&self) -> &str {
        self.net.name()
    }

    /// Completes when the network's captures were ended ([`Taps::end_all`]: the
    /// network was removed); the frames already queued can still be read.
    pub fn ended(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tap = self.tap.clone();
        async move { tap.end.notified().await }
    }

    /// Takes the tap off the network: nothing more is recorded (or lost). Dropping
    /// the capture does it too.
    pub fn stop(&self) {
        self.net.captures.remove(&self.tap);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Network {
    /// Whether a capture runs on the network (one relaxed atomic load): a port
    /// that can give its receive buffer away then switches with
    /// [`Network::ingress_rx`].
    #[inline]
    pub fn capturing(&self) -> bool {
        self.captures.on()
    }

    /// Starts a capture of `ports` (every port when empty; each named one must
    /// exist), keeping at most `snaplen` bytes of each frame (1..=262144).
    pub fn capture(
        self: &Arc<Self>,
        ports: &[String],
        snaplen: u32,
    ) -> Result<Capture, SwitchError> {
        if snaplen == 0 || snaplen > MAX_SNAPLEN {
            return Err(SwitchError::BadSnaplen(snaplen));
        }
        for name in ports {
            if self.port(name).is_none() {
                return Err(SwitchError::NoSuchPort(name.clone()));
            }
        }
        let (tx, frames) = mpsc::channel(CAPTURE_QUEUE_FRAMES);
        let tap = Arc::new(Tap {
            ports: (!ports.is_empty()).then(|| ports.to_vec()),
            snaplen: snaplen as usize,
            tx,
            budget: ByteBudget::new(CAPTURE_QUEUE_BYTES),
            lost: Mutex::new(HashMap::new()),
            end: tokio::sync::Notify::new(),
        });
        {
            let mut list = self
                .captures
                .list
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if list.len() >= MAX_CAPTURES {
                return Err(SwitchError::TooManyCaptures(MAX_CAPTURES));
            }
            if self.captures.closed.load(Ordering::Relaxed) {
                // The network is going away: the capture ends at once.
                tap.end.notify_one();
            } else {
                list.push(tap.clone());
            }
            self.captures.set_flags(&list);
        }
        Ok(Capture {
            net: self.clone(),
            tap,
            frames,
        })
    }
}

impl GuardDrop {
    /// The reason as a capture marks it (the counter's name without `drop_`).
    pub fn as_str(self) -> &'static str {
        match self {
            GuardDrop::SpoofedMac => "spoofed_mac",
            GuardDrop::SpoofedIp => "spoofed_ip",
            GuardDrop::SpoofedArp => "spoofed_arp",
            GuardDrop::SpoofedDhcp => "spoofed_dhcp",
            GuardDrop::MacLimit => "mac_limit",
            GuardDrop::SpoofedIp6 => "spoofed_ip6",
            GuardDrop::RogueRouter => "rogue_router",
            GuardDrop::SpoofedNd => "spoofed_nd",
            GuardDrop::NdLimit => "nd_limit",
        }
    }
}

#[cfg(test)]
mod tests;
