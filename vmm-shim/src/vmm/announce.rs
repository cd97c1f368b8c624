//! Where a VM arrives (an incoming migration, a restored snapshot), its NICs are
//! announced before its vCPUs run ([`start`]): each NIC sends a RARP request from the
//! guest's MAC out of its TAP, and a guest whose driver acked
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` finds `VIRTIO_NET_S_ANNOUNCE` in its NIC's status
//! with a configuration change interrupt pending (see [`crate::virtio::announce`]).
//! So netd's switch and any kernel bridge have the MAC on its new port before the
//! guest sends its first frame here. A thread (`announce`) sends four more rounds at
//! increasing spacing, skipping a round while the VM is paused (it may be leaving
//! again).

use std::sync::Arc;
use std::thread;

use super::control::Control;
use super::NetDev;
use crate::virtio::announce::RARP_GAPS;

/// Announces every NIC of `nics` (see the module doc). The first round is sent here,
/// before the caller starts the vCPUs.
pub(super) fn start(nics: &[NetDev], control: &Arc<Control>) {
    if nics.is_empty() {
        return;
    }
    for (i, t) in nics.iter().enumerate() {
        let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
        g.device_mut().send_rarp();
        let asked = g.active() && g.device_mut().ask_guest_announce();
        if asked {
            g.config_changed();
        }
        let mac = super::format_mac(g.device().mac());
        tracing::info!(net = i, %mac, guest_asked = asked, "NIC announced (RARP)");
    }
    let (nics, control) = (nics.to_vec(), control.clone());
    let spawned = thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for gap in RARP_GAPS {
                thread::sleep(gap);
                if control.pausing() {
                    continue;
                }
                for t in &nics {
                    t.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .device_mut()
                        .send_rarp();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for the later RARP rounds; sent once");
    }
}
