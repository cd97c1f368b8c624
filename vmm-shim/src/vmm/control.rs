//! Pausing and resuming a running VM, and the VM as the control API sees it.
//!
//! [`Control`] is shared by the vCPU threads, the NICs' receive threads and the API's
//! connection threads. Pausing sets a flag and kicks every vCPU thread out of KVM_RUN
//! (the same signal shutdown uses, repeated, since a kick that lands just before
//! KVM_RUN is entered is lost) until each has parked in [`Control::park`]; a parked
//! vCPU thread waits there, outside KVM_RUN, until the flag is cleared or the VM
//! stops. While paused, the NICs' receive threads deliver nothing (frames wait in the
//! TAP), so guest memory does not change under a paused guest but for disk requests
//! that were already in flight. Shutdown first takes the vCPU threads' handles
//! away ([`Control::stopping`]), so the API never signals a thread being joined.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::state::VcpuState;
use crate::metrics::Device;
use crate::sys;
use crate::virtio::Counters;

/// How long a pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The vCPU threads as pausing sees them.
enum Threads {
    /// Not started yet.
    Starting,
    /// Running: their pthread handles, to kick them.
    Running(Vec<libc::pthread_t>),
    /// Shutdown has begun.
    Stopping,
}

/// Pause and resume of the vCPUs (see the module doc).
pub struct Control {
    /// A pause is wanted (vCPU threads park, receive threads hold off).
    want: AtomicBool,
    /// vCPU threads parked now.
    parked: Mutex<usize>,
    cv: Condvar,
    threads: Mutex<Threads>,
    /// One pause or resume at a time.
    op: Mutex<()>,
    /// Each vCPU's state as it parked (or why it could not be read), for a snapshot
    /// or a migration of the paused VM.
    states: Mutex<Vec<Option<Result<VcpuState, String>>>>,
    /// The share of the time the vCPU threads sleep (percent), set by a
    /// migration's auto-converge (see `migrate::converge`).
    throttle: AtomicU8,
    /// Shutdown has begun (a napping vCPU thread wakes).
    ending: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            want: AtomicBool::new(false),
            parked: Mutex::new(0),
            cv: Condvar::new(),
            threads: Mutex::new(Threads::Starting),
            op: Mutex::new(()),
            states: Mutex::new(Vec::new()),
            throttle: AtomicU8::new(0),
            ending: AtomicBool::new(false),
        }
    }
}

impl Control {
    /// Whether a pause is wanted (checked by the vCPU and receive threads).
    pub fn pausing(&self) -> bool {
        self.want.load(Ordering::SeqCst)
    }

    /// The vCPU threads are running; these are their handles.
    pub(super) fn started(&self, threads: Vec<libc::pthread_t>) {
        *self.states.lock().unwrap_or_else(|e| e.into_inner()) =
            (0..threads.len()).map(|_| None).collect();
        *self.threads.lock().unwrap_or_else(|e| e.into_inner()) = Threads::Running(threads);
    }

    /// Shutdown begins: no more kicks from here, and parked vCPUs are let go.
    pub(super) fn stopping(&self) {
        *self.threads.lock().unwrap_or_else(|e| e.into_inner()) = Threads::Stopping;
        self.ending.store(true, Ordering::SeqCst);
        self.want.store(false, Ordering::SeqCst);
        self.wake();
    }

    /// Called by vCPU thread `id` between exits while a pause is wanted: records its
    /// state (`save`), then waits until the pause ends or `stop` is set.
    pub(super) fn park(
        &self,
        stop: &AtomicBool,
        id: usize,
        save: impl FnOnce() -> Result<VcpuState, String>,
    ) {
        let state = save();
        if let Some(slot) = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
        {
            *slot = Some(state);
        }
        let mut n = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        self.cv.notify_all();
        while self.pausing() && !stop.load(Ordering::SeqCst) {
            n = self
                .cv
                .wait_timeout(n, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *n -= 1;
        self.cv.notify_all();
    }

    /// Pauses the vCPUs; returns once every one has parked. On failure (the VM is
    /// not running, or a vCPU did not park in time) the VM runs on.
    pub fn pause(&self) -> Result<(), String> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        if self.pausing() {
            return Ok(());
        }
        self.want.store(true, Ordering::SeqCst);
        // Napping vCPU threads (a throttle) wake to park.
        self.wake();
        let r = self.wait_parked();
        if r.is_err() {
            self.want.store(false, Ordering::SeqCst);
            self.cv.notify_all();
        }
        r
    }

    fn wait_parked(&self) -> Result<(), String> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            {
                let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
                let list = match &*threads {
                    Threads::Running(l) => l,
                    Threads::Starting => return Err("the VM is still starting".into()),
                    Threads::Stopping => return Err("the VM is stopping".into()),
                };
                if *self.parked.lock().unwrap_or_else(|e| e.into_inner()) >= list.len() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the vCPUs did not pause within {} ms",
                        PAUSE_TIMEOUT.as_millis()
                    ));
                }
                // The handles stay valid while `threads` is held: shutdown replaces
                // them (under this lock) before it joins a thread.
                for &t in list {
                    sys::kick_thread(t);
                }
            }
            let n = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.cv.wait_timeout(n, Duration::from_millis(5));
        }
    }

    /// The vCPUs' states as they parked, by index; the VM must be paused (see
    /// [`Control::pause`]). Fails if a vCPU's state could not be read.
    pub(super) fn vcpu_states(&self) -> Result<Vec<VcpuState>, String> {
        if !self.pausing() {
            return Err("the VM is not paused".into());
        }
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i}: no state recorded")),
            })
            .collect()
    }

    /// Throttles the vCPUs by `pct` percent (0: full speed).
    pub(super) fn set_throttle(&self, pct: u8) {
        self.throttle.store(pct, Ordering::SeqCst);
        if pct == 0 {
            // Napping vCPU threads wake: the throttle is lifted.
            self.wake();
        }
    }

    /// Wakes the threads waiting on `cv`, under its lock (so that a thread between
    /// its check and its wait does not miss it).
    fn wake(&self) {
        let _n = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// Called by a vCPU thread before each KVM_RUN: under a throttle, once it has
    /// run a time slice since `since` (its last nap), sleeps its share (see
    /// `migrate::converge::nap`) and restarts `since`. A pause, the throttle's end
    /// or shutdown cut the nap short.
    pub(super) fn throttle_nap(&self, since: &mut Instant) {
        let pct = self.throttle.load(Ordering::Relaxed);
        if pct == 0 {
            *since = Instant::now();
            return;
        }
        let Some(d) = super::migrate::converge::nap(pct, since.elapsed()) else {
            return;
        };
        let n = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .cv
            .wait_timeout_while(n, d, |_| {
                !self.pausing()
                    && !self.ending.load(Ordering::SeqCst)
                    && self.throttle.load(Ordering::SeqCst) != 0
            })
            .unwrap_or_else(|e| e.into_inner());
        *since = Instant::now();
    }

    /// Kicks every running vCPU thread out of KVM_RUN once (a throttle's tick).
    pub(super) fn kick_vcpus(&self) {
        // The handles stay valid while `threads` is held (see `wait_parked`).
        if let Threads::Running(list) = &*self.threads.lock().unwrap_or_else(|e| e.into_inner()) {
            for &t in list {
                sys::kick_thread(t);
            }
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        self.want.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// The running VM as the control API serves it.
pub(super) struct ApiVm {
    pub(super) control: std::sync::Arc<Control>,
    pub(super) cpus: u8,
    pub(super) mem_bytes: u64,
    pub(super) devices: Vec<Device>,
    /// The machine, for snapshots and migrations.
    pub(super) machine: std::sync::Arc<super::snapshot::Machine>,
}

/// A device's counters as `GET /vm` shows them.
fn device_json(d: &Device) -> Value {
    let c = &d.counters;
    let g = Counters::get;
    let mut v = json!({
        "name": d.name,
        "type": d.kind,
        "completed": g(&c.completed),
        "bad_chains": g(&c.bad_chains),
        "io_errors": g(&c.io_errors),
        "dropped": g(&c.dropped),
        "refused_mmio": g(&c.refused_mmio),
    });
    let more = if d.kind == "virtio-net" {
        json!({
            "rx_packets": g(&c.rx_packets),
            "rx_bytes": g(&c.rx_bytes),
            "tx_packets": g(&c.tx_packets),
            "tx_bytes": g(&c.tx_bytes),
            "announce_frames": g(&c.announce_frames),
        })
    } else {
        json!({ "reads": g(&c.reads), "writes": g(&c.writes) })
    };
    if let (Some(o), Value::Object(m)) = (v.as_object_mut(), more) {
        o.extend(m);
    }
    v
}

impl crate::api::Vm for ApiVm {
    fn describe(&self) -> Value {
        json!({
            "state": if self.control.pausing() { "paused" } else { "running" },
            "vcpus": self.cpus,
            "memory_bytes": self.mem_bytes,
            "devices": self.devices.iter().map(device_json).collect::<Vec<_>>(),
        })
    }

    fn set_paused(&self, paused: bool) -> Result<(), String> {
        // A snapshot or migration pauses and resumes the VM itself.
        if matches!(
            self.machine.busy.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        ) {
            return Err("a snapshot or migration is under way".into());
        }
        if paused {
            self.control.pause()
        } else {
            self.control.resume();
            Ok(())
        }
    }

    fn snapshot(&self, dir: &std::path::Path, resume: bool) -> Result<Value, String> {
        self.machine.snapshot(dir, resume)
    }

    fn migrate(&self, m: &crate::api::Migration) -> Result<Value, String> {
        super::migrate::send(&self.machine, m)
    }

    fn migrated(&self) {
        let tx = self.machine.exit.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(super::ExitReason::Migrated);
    }
}
