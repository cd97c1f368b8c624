//! In-process services (the DHCP server, the NAT router) attached to a network as
//! ports. A service port's transmit side is a bounded channel to the service that
//! also holds at most [`SERVICE_QUEUE_BYTES`] ([`crate::budget`]); a frame that does
//! not fit is a counted drop (`drop_full`), never a wait on the switching path.
//! Frames from the service enter the switch either through a channel and a thread of
//! the switch ([`Network::attach_service`]) or on the service's own thread
//! ([`Network::attach_service_direct`], [`SwitchIn`]).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Network, Port, PortClass, PortTx, SwitchError, TxError, VnetTx};
use crate::budget::ByteBudget;
use crate::offload::{VnetHdr, VNET_HDR_LEN};

/// An in-process service attached to a network as a port: frames the service
/// sends on `to_switch` enter the switch, frames the switch forwards to the service
/// arrive on `from_switch`. Both are bounded; when `from_switch` is full the
/// switch drops the frame and counts it (`drop_full`) on the service's port. The
/// port goes away when the service drops `to_switch`.
pub struct ServicePort {
    /// Frames into the switch.
    pub to_switch: mpsc::Sender<Bytes>,
    /// Frames out of the switch.
    pub from_switch: mpsc::Receiver<Bytes>,
}

/// The ingress side of a direct service port: switches a frame on the caller's
/// thread. The port leaves the switch when removed by name (the service then sees
/// its `from_switch` channel close).
pub struct SwitchIn {
    net: Arc<Network>,
    port: Arc<Port>,
}

impl SwitchIn {
    /// The service's port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// Switches one frame from the service.
    pub fn send(&self, frame: &[u8]) {
        self.net.ingress(&self.port, frame);
    }

    /// Switches one offloaded frame (a TCP super-frame with its virtio-net header):
    /// vnet ports take it as is, the others get it segmented in software.
    pub fn send_vnet(&self, hdr: &VnetHdr, frame: &[u8]) {
        self.net.ingress_vnet(&self.port, hdr, frame);
    }
}

/// Most bytes waiting in the channel from the switch to one service, besides its
/// bound in frames: a channel of 4096 frames would otherwise hold 4096 TCP
/// super-frames of 64 KiB (see [`crate::budget`]).
pub const SERVICE_QUEUE_BYTES: usize = 16 << 20;

/// Channel transmit of a direct service that takes offloaded frames: each message
/// is the virtio-net header followed by the frame.
struct VnetChannelTx(mpsc::Sender<Bytes>, Arc<ByteBudget>);

impl VnetTx for VnetChannelTx {
    fn send_with_hdr(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let msg = self.1.charge(&[hdr, frame]).ok_or(TxError::Full)?;
        channel_send(&self.0, msg)
    }
}

struct ChannelTx(mpsc::Sender<Bytes>, Arc<ByteBudget>);

impl PortTx for ChannelTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        let msg = self.1.charge(&[frame]).ok_or(TxError::Full)?;
        channel_send(&self.0, msg)
    }
}

/// A service's channel takes a message now or the frame is dropped: full, or the
/// service has gone.
fn channel_send(tx: &mpsc::Sender<Bytes>, msg: Bytes) -> Result<(), TxError> {
    tx.try_send(msg).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => TxError::Full,
        mpsc::error::TrySendError::Closed(_) => TxError::Down,
    })
}

impl Network {
    /// Attaches an in-process service (DHCP server, NAT router) as a port named
    /// `name`, with channels of `capacity` frames each way.
    pub fn attach_service(
        self: &Arc<Self>,
        name: &str,
        capacity: usize,
    ) -> Result<ServicePort, SwitchError> {
        let (to_service_tx, from_switch) = mpsc::channel(capacity.max(1));
        let (to_switch, mut from_service) = mpsc::channel::<Bytes>(capacity.max(1));
        let port = self.add_port(
            name,
            PortClass::Service,
            Box::new(ChannelTx(
                to_service_tx,
                ByteBudget::new(SERVICE_QUEUE_BYTES),
            )),
        )?;
        let net = self.clone();
        let id = port.id;
        std::thread::Builder::new()
            .name(format!("svc-{name}"))
            .spawn(move || {
                while let Some(frame) = from_service.blocking_recv() {
                    net.ingress(&port, &frame);
                }
                net.remove_port_id(id);
            })
            .map_err(SwitchError::Thread)?;
        Ok(ServicePort {
            to_switch,
            from_switch,
        })
    }

    /// Like [`Network::attach_service`], but the service's frames enter the switch
    /// on the service's own thread (the returned [`SwitchIn`] switches a frame when
    /// called) instead of through a channel and a forwarding thread: one thread
    /// hand-off less per frame, for a busy service such as the NAT router. With
    /// `vnet`, every frame the service receives starts with its virtio-net header
    /// (offloaded frames reach it unfinished, as they reach a vnet TAP).
    pub fn attach_service_direct(
        self: &Arc<Self>,
        name: &str,
        capacity: usize,
        vnet: bool,
    ) -> Result<(SwitchIn, mpsc::Receiver<Bytes>), SwitchError> {
        let (to_service_tx, from_switch) = mpsc::channel(capacity.max(1));
        let tx: Box<dyn PortTx> = if vnet {
            Box::new(VnetChannelTx(
                to_service_tx,
                ByteBudget::new(SERVICE_QUEUE_BYTES),
            ))
        } else {
            Box::new(ChannelTx(
                to_service_tx,
                ByteBudget::new(SERVICE_QUEUE_BYTES),
            ))
        };
        let port = self.add_port(name, PortClass::Service, tx)?;
        Ok((
            SwitchIn {
                net: self.clone(),
                port,
            },
            from_switch,
        ))
    }
}
