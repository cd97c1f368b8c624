//! Announcing a NIC where it now is, after a live migration or a restore: the pieces
//! of virtio-net that do it (the device in [`super::net`] uses them).
//!
//! Two ways, as QEMU does both:
//!
//! - **From the host side**: RARP requests (ethertype 0x8035) from the guest's MAC to
//!   the broadcast address, written to the NIC's TAP as if the guest had sent them
//!   ([`rarp_frame`], the layout of QEMU's `qemu_announce_self`). Every switch on the
//!   way (netd's, a kernel bridge) learns the MAC on its new port from the first one,
//!   before the guest has run an instruction; the next ones follow at increasing
//!   spacing ([`RARP_GAPS`]) in case a frame is lost.
//! - **By the guest** (virtio 1.2, 5.1.6.5.4 "Gratuitous Packet Sending"): the device
//!   offers `VIRTIO_NET_F_GUEST_ANNOUNCE` (which needs `VIRTIO_NET_F_CTRL_VQ`) and
//!   `VIRTIO_NET_F_STATUS`. A driver that acked both gets `VIRTIO_NET_S_ANNOUNCE` in
//!   the config's status field and a configuration change interrupt; it sends its
//!   own gratuitous packets (Linux: a gratuitous ARP and IPv6 NAs) and acks with the
//!   control command `VIRTIO_NET_CTRL_ANNOUNCE_ACK` on the control queue, which
//!   clears the bit ([`ctrl_command`]).
//!
//! The control queue takes no other command (none of the features that would bring
//! one are offered): anything else is answered `VIRTIO_NET_ERR`. A malformed chain
//! (no header, no writable ack byte) is counted in `bad_chains` and returned with a
//! zero length.

use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::chain::ChainView;
use super::Counters;

/// VIRTIO_NET_F_STATUS: the config space has a status field.
pub const F_STATUS: u64 = 1 << 16;
/// VIRTIO_NET_F_CTRL_VQ: the device has a control queue.
pub const F_CTRL_VQ: u64 = 1 << 17;
/// VIRTIO_NET_F_GUEST_ANNOUNCE: the guest can send gratuitous packets when asked.
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;
/// VIRTIO_NET_S_LINK_UP.
pub const S_LINK_UP: u16 = 1;
/// VIRTIO_NET_S_ANNOUNCE.
pub const S_ANNOUNCE: u16 = 2;
/// VIRTIO_NET_CTRL_ANNOUNCE (command class).
pub const CTRL_ANNOUNCE: u8 = 3;
/// VIRTIO_NET_CTRL_ANNOUNCE_ACK (command).
pub const CTRL_ANNOUNCE_ACK: u8 = 0;
/// VIRTIO_NET_OK.
pub const CTRL_OK: u8 = 0;
/// VIRTIO_NET_ERR.
pub const CTRL_ERR: u8 = 1;
/// The RARP ethertype.
pub const ETH_P_RARP: u16 = 0x8035;

/// The waits between the RARP rounds after the first (QEMU's defaults: 50 ms first,
/// 100 ms more each time): five frames in 0.8 s.
pub const RARP_GAPS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(150),
    Duration::from_millis(250),
    Duration::from_millis(350),
];

/// A RARP request announcing `mac`, as QEMU's `announce_self_create` builds it (60
/// bytes: broadcast destination, `mac` as the source and as both hardware addresses,
/// zero protocol addresses, zero padding), behind a zeroed `virtio_net_hdr_v1`.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; super::net::VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    // Ethernet, IPv4, lengths 6 and 4, opcode 3 (reverse request).
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(super::net::VNET_HDR_LEN + 60, 0);
    f
}

/// Serves every available chain of the control queue `q`. Returns whether any was
/// used and whether the guest acked an announce.
pub fn ctrl_command(q: &mut Queue, mem: &GuestMemoryMmap, counters: &Counters) -> (bool, bool) {
    let (mut any, mut acked) = (false, false);
    loop {
        let (table, qsize) = (GuestAddress(q.desc_table()), q.size());
        let Ok(mut iter) = q.iter(mem) else {
            Counters::bump(&counters.bad_chains);
            return (any, acked);
        };
        let Some(chain) = iter.next() else {
            return (any, acked);
        };
        any = true;
        let head = chain.head_index();
        let mut len = 0;
        match ChainView::parse(mem, table, qsize, head) {
            Ok(v) if v.readable_len >= 2 && v.writable_len >= 1 => {
                let ack = match v.read(mem, 0, 2).as_deref() {
                    Some([CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK]) => {
                        acked = true;
                        CTRL_OK
                    }
                    _ => CTRL_ERR,
                };
                match v.write(mem, 0, &[ack]) {
                    Some(()) => {
                        Counters::bump(&counters.completed);
                        len = 1;
                    }
                    None => Counters::bump(&counters.bad_chains),
                }
            }
            _ => Counters::bump(&counters.bad_chains),
        }
        let _ = q.add_used(mem, head, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rarp_frame_is_qemus() {
        let mac = [0x52, 0x54, 0, 0x14, 0, 1];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 12 + 60);
        let e = &f[12..];
        assert_eq!(e[..6], [0xff; 6]);
        assert_eq!(e[6..12], mac);
        assert_eq!(e[12..14], [0x80, 0x35]);
        assert_eq!(e[14..22], [0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(e[22..28], mac);
        assert_eq!(e[28..32], [0; 4]);
        assert_eq!(e[32..38], mac);
        assert!(e[38..].iter().all(|&b| b == 0));
    }
}
