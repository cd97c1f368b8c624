//! A port as the switch sees it: what kind it is ([`PortClass`]), its transmit side
//! ([`PortTx`], or [`VnetTx`] for a port whose every frame carries a virtio-net
//! header), and [`Port::send`], the egress step of the switch: the port's MTU check
//! (for a TCP super-frame, its segments'), then the frame goes out with its header to
//! a port that takes one, or finished in software ([`crate::offload`]) to one that
//! does not, and the outcome is counted on the port.
//!
//! Kept apart from the switching itself so that every port implementation (TAP, vm,
//! stream, vxlan, the services' channels) depends on this small surface only.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::counters::{inc, Counters};
use super::guard::PortGuard;
use super::{PortId, ETH_HLEN};
use crate::offload::{finish, segment_payload_len, VnetHdr, VNET_HDR_LEN};

/// What a port is, as the switch and the control API see it (`kind` in `netd port
/// list`): a guest port by its kind, the hostonly network's host TAP, a bridged
/// network's uplink, or an in-process service (DHCP, the NAT router). Isolation
/// (NAT `isolated = true`) tells services from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortClass {
    /// A TAP queue netd holds.
    Tap,
    /// A TAP a VMM holds, reached through AF_PACKET.
    Vm,
    /// A QEMU `-netdev stream` unix socket.
    Stream,
    /// The hostonly network's own TAP.
    Host,
    /// A bridged network's host NIC.
    Uplink,
    /// An in-process service.
    Service,
    /// A VXLAN tunnel to remote VTEPs.
    Vxlan,
}

impl PortClass {
    /// The name shown for it (the same as its JSON form).
    pub fn as_str(self) -> &'static str {
        match self {
            PortClass::Tap => "tap",
            PortClass::Vm => "vm",
            PortClass::Stream => "stream",
            PortClass::Host => "host",
            PortClass::Uplink => "uplink",
            PortClass::Service => "service",
            PortClass::Vxlan => "vxlan",
        }
    }
}

impl std::fmt::Display for PortClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frame could not be sent on a port.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// the port's queue is full
    #[error("the port's queue is full")]
    Full,
    /// the port has no peer right now
    #[error("the port has no peer right now")]
    Down,
    /// I/O error sending on the port
    #[error("I/O error sending on the port")]
    Io(#[source] std::io::Error),
}

/// The transmit side of a port.
pub trait PortTx: Send + Sync {
    /// Sends one complete Ethernet frame (no vnet header).
    fn send(&self, frame: &[u8]) -> Result<(), TxError>;

    /// Sends a frame to the remote the destination MAC was learned behind (a
    /// vxlan port; `None`: flood to every remote). Other ports ignore `remote`.
    fn send_to(&self, frame: &[u8], remote: Option<Ipv4Addr>) -> Result<(), TxError> {
        let _ = remote;
        self.send(frame)
    }

    /// Whether the port takes frames with a virtio-net header (and so offloaded,
    /// unfinished frames: partial checksums, TCP super-frames).
    fn vnet(&self) -> bool {
        false
    }

    /// Sends a frame preceded by its virtio-net header. Only called when
    /// [`vnet`](Self::vnet) is true.
    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let _ = hdr;
        self.send(frame)
    }

    /// [`send_vnet`](Self::send_vnet) to the remote the destination was learned
    /// behind (see [`send_to`](Self::send_to)).
    fn send_vnet_to(
        &self,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
        remote: Option<Ipv4Addr>,
    ) -> Result<(), TxError> {
        let _ = remote;
        self.send_vnet(hdr, frame)
    }
}

/// The transmit side of a port whose every frame goes with a virtio-net header (a
/// vnet TAP, an AF_PACKET socket with PACKET_VNET_HDR, a service that takes
/// offloaded frames); a plain frame goes with an all-zero header. Every such type is
/// a [`PortTx`] that takes offloaded frames.
pub trait VnetTx: Send + Sync {
    /// Sends `frame` preceded by `hdr`.
    fn send_with_hdr(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError>;
}

impl<T: VnetTx> PortTx for T {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.send_with_hdr(&[0; VNET_HDR_LEN], frame)
    }

    fn vnet(&self) -> bool {
        true
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        self.send_with_hdr(hdr, frame)
    }
}

thread_local! {
    /// Per-thread buffer for frames finished in software (see [`crate::offload`]).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A port as the switch sees it.
pub struct Port {
    /// Id, unique in the network.
    pub id: PortId,
    /// Name, unique in the network.
    pub name: String,
    /// What the port is.
    pub kind: PortClass,
    /// Largest payload (frame minus Ethernet header, minus a VLAN tag if any).
    pub mtu: usize,
    /// Counters.
    pub counters: Counters,
    /// Whether the port takes virtio-net headers.
    pub vnet: bool,
    /// The port guard (off on everything but a guarded guest port).
    pub guard: PortGuard,
    pub(super) tx: Box<dyn PortTx>,
}

impl Port {
    /// Counts the outcome of one send; a failure's reason (the counter's name
    /// without `drop_`, as a capture marks it).
    pub(super) fn account(&self, r: Result<(), TxError>, len: usize) -> Option<&'static str> {
        let (c, why) = match r {
            Ok(()) => {
                inc(&self.counters.tx_frames, 1);
                inc(&self.counters.tx_bytes, len as u64);
                return None;
            }
            Err(TxError::Full) => (&self.counters.drop_full, "full"),
            Err(TxError::Down) => (&self.counters.drop_down, "down"),
            Err(TxError::Io(_)) => (&self.counters.drop_io, "io"),
        };
        inc(c, 1);
        Some(why)
    }

    /// Sends a frame out of the port (the egress step); why it was dropped, if it
    /// was (for a frame finished in software: its first failed segment's reason).
    pub(super) fn send(
        &self,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
        remote: Option<Ipv4Addr>,
    ) -> Option<&'static str> {
        if frame_payload(frame, hdr) > self.mtu {
            inc(&self.counters.drop_mtu, 1);
            return Some("mtu");
        }
        if self.vnet {
            let h = hdr.map(|h| h.to_bytes()).unwrap_or([0; VNET_HDR_LEN]);
            return self.account(self.tx.send_vnet_to(&h, frame, remote), frame.len());
        }
        match hdr.filter(|h| !h.is_plain()) {
            None => self.account(self.tx.send_to(frame, remote), frame.len()),
            Some(h) => SCRATCH.with(|s| {
                let mut scratch = s.borrow_mut();
                let mut why = None;
                let r = finish(h, frame, &mut scratch, &mut |seg| {
                    if let Some(w) = self.account(self.tx.send_to(seg, remote), seg.len()) {
                        why.get_or_insert(w);
                    }
                });
                if r.is_err() {
                    inc(&self.counters.drop_offload, 1);
                    return Some("offload");
                }
                why
            }),
        }
    }
}

/// Payload size that counts against an MTU: for a TCP super-frame, its largest
/// segment's.
pub(super) fn frame_payload(frame: &[u8], hdr: Option<&VnetHdr>) -> usize {
    match hdr {
        Some(h) if h.is_gso() => segment_payload_len(h, frame),
        _ => payload_len(frame),
    }
}

/// Payload length of a frame, not counting one 802.1Q tag.
fn payload_len(frame: &[u8]) -> usize {
    let base = frame.len().saturating_sub(ETH_HLEN);
    match frame.get(12..14) {
        Some([0x81, 0x00]) => base.saturating_sub(4),
        _ => base,
    }
}
