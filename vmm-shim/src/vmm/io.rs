//! The VM's I/O threads: each disk's (runs its queue when the guest kicks it, without
//! holding the device lock while the NBD server answers), each NIC's receive thread
//! and the console input thread (see the module doc of [`super`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::control::Control;
use super::{BlockDev, NetDev, Session};
use crate::legacy::SerialDev;
use crate::sys;

/// A disk's I/O thread: waits for a kick, then runs rounds until the avail ring is
/// empty. A round takes the device lock to pop and parse chains, lets go of it while
/// the NBD server answers (so the vCPUs' register accesses, the guest's other
/// devices and a stalled or reconnecting server never wait on each other), and takes
/// it again to complete, unless the driver reset or failed the device meanwhile (then
/// the answers are dropped: the rings they belonged to are gone).
///
/// `busy` is set from the wake-up (before the kick is read) until the thread waits
/// again with the ring empty, so a snapshot can tell when no request is in flight
/// (see `snapshot::Machine::drain`).
pub(super) fn disk_io_loop(
    t: BlockDev,
    session: Session,
    kick: EventFd,
    stop: Arc<EventFd>,
    busy: Arc<AtomicBool>,
) {
    let fds = [stop.as_raw_fd(), kick.as_raw_fd()];
    loop {
        busy.store(false, Ordering::SeqCst);
        match sys::poll_readable(&fds, -1) {
            Ok(r) if r.first() == Some(&true) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "poll failed; disk I/O stops");
                return;
            }
        }
        busy.store(true, Ordering::SeqCst);
        // Reset the counter; EAGAIN (already read) is fine.
        let _ = kick.read();
        loop {
            let (round, resets) = {
                let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
                if !g.active() || !g.queue_ready(0) {
                    break;
                }
                let resets = g.resets();
                let (dev, queues, mem, irq) = g.parts();
                let Some(q) = queues.get_mut(0) else { break };
                let (round, popped) = dev.collect(q, mem);
                if !popped {
                    break;
                }
                let Some(round) = round else {
                    // Only malformed chains, answered already.
                    irq.signal_used();
                    continue;
                };
                (round, resets)
            };
            let outcomes = if round.requests().is_empty() {
                Ok(Vec::new())
            } else {
                session
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .submit(round.requests())
            };
            let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
            if g.resets() != resets || !g.active() {
                tracing::debug!("device reset during a round; its answers are dropped");
                continue;
            }
            let (dev, queues, mem, irq) = g.parts();
            if let Some(q) = queues.get_mut(0) {
                dev.complete(round, outcomes, q, mem);
                irq.signal_used();
            }
        }
    }
}

/// A NIC's receive thread: waits for frames on the TAP (unless a frame is parked for
/// want of guest buffers) or for the guest to add buffers, then pumps. While the VM
/// is paused it delivers nothing: frames wait in the TAP.
pub(super) fn net_rx_loop(
    t: NetDev,
    tap_fd: i32,
    wake: EventFd,
    stop: Arc<EventFd>,
    control: Arc<Control>,
) {
    let stop_fd = stop.as_raw_fd();
    let wake_fd = wake.as_raw_fd();
    loop {
        if control.pausing() {
            match sys::poll_readable(&[stop_fd], 20) {
                Ok(r) if r.first() == Some(&true) => return,
                _ => continue,
            }
        }
        let parked = {
            let g = t.lock().unwrap_or_else(|e| e.into_inner());
            // Nothing can be received into an RX queue the driver has not made ready
            // (and it is never served), so the TAP is not polled then either: a frame
            // waiting in it would keep poll returning at once.
            g.device().rx_blocked() || !g.active() || !g.queue_ready(0)
        };
        let fds = if parked {
            vec![stop_fd, wake_fd]
        } else {
            vec![stop_fd, wake_fd, tap_fd]
        };
        // A timeout bounds the wait for a driver that activates without kicking.
        let ready = match sys::poll_readable(&fds, 200) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "poll failed; NIC receive stops");
                return;
            }
        };
        if ready.first() == Some(&true) {
            return;
        }
        if ready.get(1) == Some(&true) {
            // Reset the counter; EAGAIN (already read) is fine.
            let _ = wake.read();
        }
        let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
        // The pause is checked again under the device lock: a snapshot or migration
        // takes every device's lock once after pausing (`Machine::drain`), so no frame
        // lands in guest memory after that (it would be missing from what is saved).
        if g.active() && !control.pausing() {
            let (dev, queues, mem, irq) = g.parts();
            // An RX queue the driver never made ready has unchecked ring addresses.
            if let Some(q) = queues
                .get_mut(0)
                .filter(|q| virtio_queue::QueueT::ready(&**q))
            {
                if dev.rx_pump(q, mem) {
                    irq.signal_used();
                }
            }
        }
    }
}

/// Feeds standard input to the UART's receive FIFO (the guest's console input), waiting
/// while the FIFO is full; ends at EOF.
pub(super) fn console_input(serial: &Mutex<SerialDev>) {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let took = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_raw_bytes(rest)
                .unwrap_or(0);
            rest = &rest[took..];
            if !rest.is_empty() {
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
