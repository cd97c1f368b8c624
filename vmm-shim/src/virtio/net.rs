//! virtio-net, backed by a TAP device with `IFF_VNET_HDR`.
//!
//! Theory of operation: the guest's `virtio_net_hdr_v1` (12 bytes) and the TAP's vnet
//! header (size set to 12 with TUNSETVNETHDRSZ) have the same layout, so a TX chain is
//! copied to the TAP as one write, header included, and a frame read from the TAP is
//! copied into an RX chain as is (`num_buffers` set to 1). Checksum offload and TSO are
//! offered to the guest; once the driver acks its features, the matching TAP offloads
//! (TUNSETOFFLOAD) are switched on so the kernel hands us only what the guest accepts.
//! In the other direction, a driver that did not ack VIRTIO_NET_F_CSUM gets its TX
//! header cleared (a plain frame): it may not ask for checksum or segmentation offload.
//!
//! Receive is driven from two sides: a back-end thread waits for the TAP to be readable
//! and calls [`Net::rx_pump`]; the guest's kick of the RX queue also pumps. When a frame
//! is read but the guest has no free RX buffer, it is parked in `pending` (the deferred
//! RX path) and the back-end thread stops polling the TAP until a kick of the RX queue
//! (which writes `rx_wake`) delivers it: ingress never spins and never freezes.
//! A hard receive error (a deleted TAP reads EBADFD and polls POLLERR forever) is
//! counted in `io_errors` and also keeps the TAP out of the poll set; receive is then
//! retried on the thread's poll timeout, so a dead TAP costs a few reads a second.
//! Malformed TX chains (device-writable buffers, header missing, oversized) are dropped,
//! counted and returned to the guest with a zero length.
//!
//! The config space is the MAC and the status field (link up, and
//! `VIRTIO_NET_S_ANNOUNCE` while an announce waits for the guest's ack). The third
//! queue is the control queue, whose only command is the announce ack; announcing the
//! NIC after a move (RARP from the host side, and asking the guest) is described in
//! [`super::announce`].

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::announce::{self, F_CTRL_VQ, F_GUEST_ANNOUNCE, F_STATUS, S_ANNOUNCE, S_LINK_UP};
use super::chain::ChainView;
use super::{read_config_bytes, Counters, VirtioDevice};

/// Device ID of virtio-net.
pub const DEVICE_ID: u32 = 1;
/// Size of `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (with header) we move: a 64 KiB GSO frame plus headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// VIRTIO_NET_F_CSUM.
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_GUEST_TSO4.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_HOST_TSO4.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6.
pub const F_HOST_TSO6: u64 = 1 << 12;

/// The TAP offload flags the guest's features map to: defined once, with the TAP
/// ioctls, in fabric-util.
pub use fabric_util::sys::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

/// Where frames go: a TAP in production, a mock in unit tests.
pub trait NetBackend: Send {
    /// Sends one frame (vnet header included).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame (vnet header included); `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sets the offloads the guest accepts (TUN_F_*).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// The virtio-net device.
pub struct Net<T: NetBackend> {
    backend: T,
    mac: [u8; 6],
    /// The features the driver acked (at activation).
    acked: u64,
    /// VIRTIO_NET_S_ANNOUNCE is set: the guest was asked to announce itself.
    announce: bool,
    counters: std::sync::Arc<Counters>,
    pending: Option<Vec<u8>>,
    rx_wake: Option<EventFd>,
    buf: Vec<u8>,
    offloads: bool,
    rx_failed: bool,
    /// The guest acked VIRTIO_NET_F_CSUM: its TX headers may ask for offloads.
    tx_offloads: bool,
}

const RX: u16 = 0;
const TX: u16 = 1;
const CTRL: u16 = 2;

impl<T: NetBackend> Net<T> {
    /// Creates the device; `rx_wake` is written when the guest adds RX buffers;
    /// `offloads` offers checksum offload and TSO (off for backends that carry plain
    /// frames only, such as a netd `vm` port).
    pub fn new(backend: T, mac: [u8; 6], rx_wake: Option<EventFd>, offloads: bool) -> Self {
        Net {
            backend,
            mac,
            acked: 0,
            announce: false,
            counters: std::sync::Arc::default(),
            pending: None,
            rx_wake,
            buf: vec![0u8; MAX_FRAME],
            offloads,
            rx_failed: false,
            tx_offloads: false,
        }
    }

    /// Whether a received frame waits for guest buffers (the deferred RX path).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the back-end thread should leave the TAP out of its poll set: a frame
    /// is parked, or the last receive failed hard. A TAP whose interface was deleted
    /// polls readable (POLLERR) forever while every read fails with EBADFD; polling it
    /// would spin the thread, so after a hard error receive is only retried on the
    /// thread's poll timeout or a guest kick.
    pub fn rx_blocked(&self) -> bool {
        self.pending.is_some() || self.rx_failed
    }

    fn rx_error(&mut self, e: &io::Error) {
        Counters::bump(&self.counters.io_errors);
        if !self.rx_failed {
            tracing::warn!(error = %e, "TAP receive failed; retrying slowly");
            self.rx_failed = true;
        }
    }

    /// The NIC's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Sends one RARP announce of the guest's MAC through the backend, as if the
    /// guest had sent it (see [`super::announce`]); counted in `announce_frames`.
    pub fn send_rarp(&mut self) {
        match self.backend.send(&announce::rarp_frame(self.mac)) {
            Ok(()) => Counters::bump(&self.counters.announce_frames),
            Err(e) => {
                Counters::bump(&self.counters.dropped);
                tracing::debug!(error = %e, "RARP announce not sent");
            }
        }
    }

    /// Asks the guest to announce itself (sets VIRTIO_NET_S_ANNOUNCE) where its
    /// driver acked VIRTIO_NET_F_GUEST_ANNOUNCE with the control queue and the status
    /// field. Returns whether it did: the caller then raises a configuration change
    /// interrupt.
    pub fn ask_guest_announce(&mut self) -> bool {
        let need = F_GUEST_ANNOUNCE | F_CTRL_VQ | F_STATUS;
        self.announce = self.acked & need == need;
        self.announce
    }

    /// Whether an announce waits for the guest's ack.
    pub fn announce_pending(&self) -> bool {
        self.announce
    }

    /// The config space: the MAC, then the status field.
    fn config(&self) -> [u8; 8] {
        let status = S_LINK_UP | if self.announce { S_ANNOUNCE } else { 0 };
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..].copy_from_slice(&status.to_le_bytes());
        c
    }

    /// The backend (tests inspect mocks through this).
    pub fn backend(&self) -> &T {
        &self.backend
    }

    /// The device's counters, shared (the metrics server reads them).
    pub fn counters_handle(&self) -> std::sync::Arc<Counters> {
        self.counters.clone()
    }

    /// Sends every available TX chain. Returns whether any was used.
    pub fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        loop {
            let (table, qsize) = (GuestAddress(q.desc_table()), q.size());
            let Ok(mut iter) = q.iter(mem) else {
                Counters::bump(&self.counters.bad_chains);
                return any;
            };
            let Some(chain) = iter.next() else {
                return any;
            };
            any = true;
            let head = chain.head_index();
            let frame = match ChainView::parse(mem, table, qsize, head) {
                Ok(v)
                    if v.writable.is_empty()
                        && (v.readable_len as usize) > VNET_HDR_LEN
                        && (v.readable_len as usize) <= MAX_FRAME =>
                {
                    v.read(mem, 0, v.readable_len)
                }
                _ => None,
            };
            match frame {
                Some(mut f) => {
                    if !self.tx_offloads {
                        // A driver that did not negotiate checksum offload may not ask
                        // for it (or for segmentation): send its frame as a plain one
                        // rather than hand the host a job the guest was never offered.
                        if let Some(h) = f.get_mut(..10) {
                            h.fill(0);
                        }
                    }
                    self.send_frame(&f)
                }
                None => Counters::bump(&self.counters.bad_chains),
            }
            let _ = q.add_used(mem, head, 0);
        }
    }

    fn send_frame(&mut self, f: &[u8]) {
        match self.backend.send(f) {
            Ok(()) => {
                Counters::bump(&self.counters.completed);
                Counters::bump(&self.counters.tx_packets);
                let len = f.len().saturating_sub(VNET_HDR_LEN) as u64;
                Counters::add(&self.counters.tx_bytes, len);
            }
            Err(e) => {
                Counters::bump(&self.counters.dropped);
                tracing::debug!(error = %e, "TAP write failed; frame dropped");
            }
        }
    }

    /// Moves frames from the backend into RX buffers until one side runs dry.
    /// Returns whether any chain was used.
    pub fn rx_pump(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut any = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.backend.recv(&mut self.buf) {
                    Ok(0) => {
                        // End of file: no frame will ever come; treat as a hard error.
                        self.rx_error(&io::ErrorKind::UnexpectedEof.into());
                        return any;
                    }
                    Ok(n) if n > VNET_HDR_LEN => {
                        self.rx_failed = false;
                        let mut f = self.buf[..n].to_vec();
                        // num_buffers = 1 (no mergeable buffers).
                        f[10] = 1;
                        f[11] = 0;
                        f
                    }
                    Ok(_) => {
                        Counters::bump(&self.counters.dropped);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rx_failed = false;
                        return any;
                    }
                    Err(e) => {
                        self.rx_error(&e);
                        return any;
                    }
                },
            };
            let (table, qsize) = (GuestAddress(q.desc_table()), q.size());
            let Ok(mut iter) = q.iter(mem) else {
                Counters::bump(&self.counters.bad_chains);
                self.pending = Some(frame);
                return any;
            };
            let Some(chain) = iter.next() else {
                // Guest queue full: park the frame, wait for a kick.
                self.pending = Some(frame);
                return any;
            };
            any = true;
            let head = chain.head_index();
            let len = match ChainView::parse(mem, table, qsize, head) {
                Ok(v) if v.readable.is_empty() && v.writable_len as usize >= frame.len() => {
                    match v.write(mem, 0, &frame) {
                        Some(()) => {
                            Counters::bump(&self.counters.completed);
                            Counters::bump(&self.counters.rx_packets);
                            let len = frame.len().saturating_sub(VNET_HDR_LEN) as u64;
                            Counters::add(&self.counters.rx_bytes, len);
                            frame.len() as u32
                        }
                        None => {
                            Counters::bump(&self.counters.bad_chains);
                            0
                        }
                    }
                }
                Ok(v) if v.readable.is_empty() => {
                    // A well-formed buffer too small for this frame: drop the frame.
                    Counters::bump(&self.counters.dropped);
                    0
                }
                _ => {
                    Counters::bump(&self.counters.bad_chains);
                    self.pending = Some(frame);
                    0
                }
            };
            let _ = q.add_used(mem, head, len);
        }
    }
}

impl<T: NetBackend> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }
    fn features(&self) -> u64 {
        let base = F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE;
        if self.offloads {
            base | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6
        } else {
            base
        }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 64]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data)
    }
    fn same_config(&self, saved: &[u8], _current: &[u8]) -> bool {
        // The status field is the device's own (an announce asked for on the other
        // side is asked for again here): only the MAC must be the same.
        saved.get(..6) == Some(&self.mac[..]) && saved.iter().skip(8).all(|&b| b == 0)
    }
    fn activate(&mut self, acked: u64) {
        let acked = acked & self.features();
        self.acked = acked;
        self.tx_offloads = acked & F_CSUM != 0;
        let mut flags = 0;
        if acked & F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                flags |= TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                flags |= TUN_F_TSO6;
            }
        }
        if let Err(e) = self.backend.set_offload(flags) {
            tracing::warn!(error = %e, flags, "TUNSETOFFLOAD failed");
        }
    }
    fn reset(&mut self) {
        self.pending = None;
        self.acked = 0;
        self.announce = false;
    }
    fn notify(&mut self, index: u16, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match index {
            TX => queues
                .get_mut(usize::from(TX))
                .is_some_and(|q| self.process_tx(q, mem)),
            RX => {
                let used = queues
                    .get_mut(usize::from(RX))
                    .is_some_and(|q| self.rx_pump(q, mem));
                if let Some(w) = &self.rx_wake {
                    let _ = w.write(1);
                }
                used
            }
            CTRL => {
                let Some(q) = queues.get_mut(usize::from(CTRL)) else {
                    return false;
                };
                let (used, acked) = announce::ctrl_command(q, mem, &self.counters);
                if acked {
                    self.announce = false;
                }
                used
            }
            _ => false,
        }
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::{
        d, mem, mock_queue, random_descs, random_rounds, used, used_idx,
    };
    use std::collections::VecDeque;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    #[derive(Default)]
    struct MockTap {
        sent: Vec<Vec<u8>>,
        incoming: VecDeque<Vec<u8>>,
        offload: Option<u32>,
        /// Every recv fails with this (a deleted TAP: EBADFD).
        broken: Option<i32>,
    }

    impl NetBackend for MockTap {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if let Some(e) = self.broken {
                return Err(io::Error::from_raw_os_error(e));
            }
            match self.incoming.pop_front() {
                Some(f) => {
                    buf[..f.len()].copy_from_slice(&f);
                    Ok(f.len())
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.offload = Some(flags);
            Ok(())
        }
    }

    /// The NIC most tests use: offloads on, no RX wake eventfd, MAC 52:54:00:00:00:01.
    fn tap_net() -> Net<MockTap> {
        Net::new(MockTap::default(), [0x52, 0x54, 0, 0, 0, 1], None, true)
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(fill, n));
        f
    }

    #[test]
    fn tx_sends_header_and_frame_and_rejects_writable_buffers() {
        let m = mem();
        let (vq, q) = mock_queue(&m);
        let mut net = tap_net();
        m.write_slice(&frame(60, 0x11), GuestAddress(0x10_0000))
            .unwrap();
        vq.add_desc_chains(
            &[
                // Header and frame split over two buffers.
                d(0x10_0000, 12, NEXT, 1),
                d(0x10_000c, 60, 0, 0),
                // A TX buffer the device would write to: malformed.
                d(0x20_0000, 100, WRITE, 0),
                // Too short to hold a header.
                d(0x20_0000, 4, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut qs = [Queue::new(16).unwrap(), q];
        // Queue index 1 is TX.
        net.notify(TX, &mut qs, &m);
        assert_eq!(net.backend.sent.len(), 1);
        assert_eq!(net.backend.sent[0], frame(60, 0x11));
        assert_eq!(used_idx(&m, vq.used_addr()), 3);
        assert_eq!(Counters::get(&net.counters.bad_chains), 2);
    }

    #[test]
    fn a_broken_tap_is_not_polled_until_it_recovers() {
        let m = mem();
        let (vq, mut q) = mock_queue(&m);
        let mut net = tap_net();
        vq.add_desc_chains(&[d(0x10_0000, 2048, WRITE, 0)], 0)
            .unwrap();
        net.backend.broken = Some(libc::EBADFD);
        assert!(!net.rx_pump(&mut q, &m));
        assert!(net.rx_blocked(), "the RX thread would spin on POLLERR");
        assert_eq!(Counters::get(&net.counters.io_errors), 1);
        // A nothing-to-read (not an error) after recovery: poll the TAP again.
        net.backend.broken = None;
        assert!(!net.rx_pump(&mut q, &m));
        assert!(!net.rx_blocked());
        net.backend.incoming.push_back(frame(100, 0x44));
        assert!(net.rx_pump(&mut q, &m));
        assert_eq!(used(&m, vq.used_addr(), 0), (0, 112));
    }

    #[test]
    fn offload_requests_of_a_driver_without_csum_are_cleared() {
        let m = mem();
        for (acked, kept) in [(F_MAC, false), (F_MAC | F_CSUM | F_HOST_TSO4, true)] {
            let (vq, q) = mock_queue(&m);
            let mut net = tap_net();
            net.activate(acked);
            let mut f = frame(60, 0x11);
            // NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 100, csum 34/16.
            f[..10].copy_from_slice(&[1, 1, 54, 0, 100, 0, 34, 0, 16, 0]);
            m.write_slice(&f, GuestAddress(0x10_0000)).unwrap();
            vq.add_desc_chains(&[d(0x10_0000, f.len() as u32, 0, 0)], 0)
                .unwrap();
            let mut qs = [Queue::new(16).unwrap(), q];
            net.notify(TX, &mut qs, &m);
            let sent = &net.backend.sent[0];
            assert_eq!(sent[10..], f[10..]);
            if kept {
                assert_eq!(sent[..10], f[..10]);
            } else {
                assert_eq!(sent[..10], [0; 10]);
            }
        }
    }

    #[test]
    fn rx_delivers_sets_num_buffers_and_defers_when_the_queue_is_full() {
        let m = mem();
        let (vq, q) = mock_queue(&m);
        let wake = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut net = Net::new(
            MockTap::default(),
            [0x52, 0x54, 0, 0, 0, 1],
            Some(wake.try_clone().unwrap()),
            true,
        );
        net.backend.incoming.push_back(frame(100, 0x22));
        net.backend.incoming.push_back(frame(200, 0x33));
        let mut qs = [q, Queue::new(16).unwrap()];
        // No buffers yet: the first frame is parked, not lost, not spun on.
        assert!(!net.rx_pump(&mut qs[0], &m));
        assert!(net.has_pending());
        assert_eq!(net.backend.incoming.len(), 1);
        // The guest adds one buffer and kicks: the parked frame goes in, the next waits.
        vq.add_desc_chains(&[d(0x10_0000, 2048, WRITE, 0)], 0)
            .unwrap();
        assert!(net.notify(RX, &mut qs, &m));
        assert_eq!(wake.read().unwrap(), 1);
        assert_eq!(used(&m, vq.used_addr(), 0), (0, 112));
        let mut got = vec![0u8; 112];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[12..], &[0x22; 100][..]);
        assert!(net.has_pending());
        // A second buffer, split over two descriptors, takes the 200-byte frame.
        vq.add_desc_chains(
            &[
                d(0x20_0000, 100, WRITE | NEXT, 2),
                d(0x30_0000, 200, WRITE, 0),
            ],
            1,
        )
        .unwrap();
        assert!(net.notify(RX, &mut qs, &m));
        assert!(!net.has_pending());
        assert_eq!(used(&m, vq.used_addr(), 1), (1, 212));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x30_0000 + 111)).unwrap(),
            0x33
        );
    }

    #[test]
    fn rx_drops_frames_too_big_for_the_buffer() {
        let m = mem();
        let (vq, mut q) = mock_queue(&m);
        let mut net = tap_net();
        net.backend.incoming.push_back(frame(1500, 0x44));
        vq.add_desc_chains(&[d(0x10_0000, 64, WRITE, 0)], 0)
            .unwrap();
        assert!(net.rx_pump(&mut q, &m));
        assert_eq!(used(&m, vq.used_addr(), 0), (0, 0));
        assert_eq!(Counters::get(&net.counters.dropped), 1);
        assert!(!net.has_pending());
    }

    #[test]
    fn offloads_follow_the_acked_features() {
        let mut net = tap_net();
        net.activate(F_GUEST_CSUM | F_GUEST_TSO4);
        assert_eq!(net.backend.offload, Some(TUN_F_CSUM | TUN_F_TSO4));
        net.activate(F_GUEST_TSO4);
        assert_eq!(net.backend.offload, Some(0));
        let mut plain = Net::new(MockTap::default(), [0x52, 0x54, 0, 0, 0, 2], None, false);
        assert_eq!(
            plain.features(),
            F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE
        );
        plain.activate(F_GUEST_CSUM | F_GUEST_TSO4);
        assert_eq!(plain.backend.offload, Some(0));
        let mut mac = [0u8; 8];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [0x52, 0x54, 0, 0, 0, 1, 1, 0], "MAC, link up");
    }

    #[test]
    fn the_guest_is_asked_to_announce_until_it_acks_on_the_control_queue() {
        let m = mem();
        let (vq, q) = mock_queue(&m);
        let mut net = tap_net();
        let status = |net: &Net<MockTap>| {
            let mut st = [0u8; 2];
            net.read_config(6, &mut st);
            u16::from_le_bytes(st)
        };
        net.activate(F_MAC);
        assert!(
            !net.ask_guest_announce(),
            "the driver did not ack GUEST_ANNOUNCE"
        );
        assert_eq!(status(&net), S_LINK_UP);
        net.activate(F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE);
        assert!(net.ask_guest_announce());
        assert_eq!(status(&net), S_LINK_UP | S_ANNOUNCE);
        // A command we do not take (RX mode), the ack, and a chain with no ack byte.
        m.write_slice(&[0, 0], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&[3, 0], GuestAddress(0x10_1000)).unwrap();
        vq.add_desc_chains(
            &[
                d(0x10_0000, 2, NEXT, 1),
                d(0x10_0800, 1, WRITE, 0),
                d(0x10_1000, 2, NEXT, 3),
                d(0x10_1800, 1, WRITE, 0),
                d(0x10_2000, 2, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut qs = [Queue::new(16).unwrap(), Queue::new(16).unwrap(), q];
        assert!(net.notify(CTRL, &mut qs, &m));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_0800)).unwrap(), 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_1800)).unwrap(), 0);
        assert_eq!(used_idx(&m, vq.used_addr()), 3);
        assert_eq!(Counters::get(&net.counters.bad_chains), 1);
        assert!(!net.announce_pending());
        assert_eq!(status(&net), S_LINK_UP);
        // The host side's RARP has its own counter.
        net.send_rarp();
        assert_eq!(net.backend.sent, [announce::rarp_frame(net.mac())]);
        assert_eq!(Counters::get(&net.counters.announce_frames), 1);
        assert_eq!(Counters::get(&net.counters.tx_packets), 0);
        // A snapshot's config is this NIC's whatever its status: the MAC decides.
        let mut saved = [0u8; 64];
        net.read_config(0, &mut saved);
        saved[6] = 3;
        assert!(net.same_config(&saved, &[]));
        saved[0] ^= 2;
        assert!(!net.same_config(&saved, &[]));
    }

    #[test]
    fn randomized_chains_never_panic() {
        random_rounds(0xfeed_beef_dead_cafe, 300, |rng, m, vq, q| {
            let mut net = tap_net();
            for _ in 0..rng.next() % 3 {
                net.backend
                    .incoming
                    .push_back(frame((rng.next() % 3000) as usize, 7));
            }
            let descs = random_descs(
                rng,
                |rng| match rng.next() % 3 {
                    0 => rng.next(),
                    _ => 0x10_0000 + rng.next() % (20 << 20),
                },
                |rng| match rng.next() % 3 {
                    0 => rng.next() as u32,
                    _ => (rng.next() % 4096) as u32,
                },
            );
            let _ = vq.add_desc_chains(&descs, 0);
            match rng.next() % 3 {
                0 => {
                    net.process_tx(q, m);
                }
                1 => {
                    net.rx_pump(q, m);
                }
                _ => {
                    announce::ctrl_command(q, m, &net.counters);
                }
            }
        });
    }
}
