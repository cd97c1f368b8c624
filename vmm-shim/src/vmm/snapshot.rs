//! Snapshot and restore: `PUT /snapshot {"dir": PATH}` writes `DIR/memory` (guest
//! RAM, byte for byte) and `DIR/state` (see [`super::state`]); `vmm-shim --restore DIR`
//! builds the same machine and goes on where it stopped.
//!
//! Taking a snapshot ([`Machine::snapshot`]): pause the vCPUs (each one, as it parks,
//! first re-enters KVM_RUN with `immediate_exit` set so that KVM completes a port or
//! MMIO access it handed us, then records its registers: see [`save_vcpu`]); wait
//! until no virtio-blk request is in flight and flush every disk ([`Machine::drain`]);
//! read the devices' transports and queues, the UART, the in-kernel irqchips, PIT and
//! clock; write memory (with its CRC-32 in the state) and the state, each to a
//! temporary name renamed into place. The VM stays paused unless asked to resume.
//! The i8042 keeps no state here (it only takes the reset command). A NIC's state is
//! its transport's (acked features, queues, the MAC in its config space); its TAP's
//! offloads follow from the acked features when it is activated again. A frame
//! parked for want of guest receive buffers is not kept: to the guest it is a frame
//! lost on the wire. Once paused, no NIC receive thread writes guest memory (see
//! [`Machine::drain`]).
//!
//! Restoring ([`load`], then `vmm::run`): the state file is read and checked first
//! (version, checksum, shape against `--mem`, `--cpus` and the `--disk`/`--net` list),
//! before any disk is connected; memory is read back and its CRC checked; each
//! device's state goes back on its transport (refused if the device differs, see
//! `MmioTransport::restore`), the VM's interrupt controllers, PIT and clock are set,
//! and each vCPU gets its registers before any runs.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_irqchip, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::state::{self, SerialSnap, VcpuState, VmState};
use super::vcpu::VcpuShared;
use super::{ExitReason, Session, VmmError};
use crate::config::VmConfig;
use crate::legacy::SerialDev;
use crate::nbd::Request;
use crate::sys;

/// How long a snapshot or migration waits for in-flight disk requests.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a vCPU's state. A port or MMIO exit KVM handed us is completed first
/// (KVM_RUN with `immediate_exit`), so the saved RIP is past the instruction and a
/// restored guest does not repeat it. MSRs KVM lists but cannot read are left out.
pub(super) fn save_vcpu(vcpu: &mut VcpuFd, msr_list: &[u32]) -> Result<VcpuState, String> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() != libc::EINTR => return Err(format!("completing I/O: {e}")),
        _ => {}
    }
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(e("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        xsave: vcpu
            .get_xsave()
            .map_err(e("KVM_GET_XSAVE"))?
            .region
            .to_vec(),
        xcrs: vcpu.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
        msrs: read_msrs(vcpu, msr_list)?,
        lapic: vcpu.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        events: vcpu.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
        debugregs: vcpu.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
    })
}

/// Every MSR of `list` KVM can read: KVM_GET_MSRS stops at the first it cannot, so
/// that one is skipped and the rest asked again.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|m| (m.index, m.data)));
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    Ok(out)
}

/// Puts a saved state on a vCPU that has not run (in the order Firecracker uses:
/// special registers before the LAPIC, which depends on the APIC base; events last).
pub(super) fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    vcpu.set_mp_state(s.mp_state)
        .map_err(e("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    let mut xsave = kvm_bindings::kvm_xsave::default();
    if s.xsave.len() != xsave.region.len() {
        return Err(format!("XSAVE area of {} words", s.xsave.len()));
    }
    xsave.region.copy_from_slice(&s.xsave);
    // SAFETY: `xsave` is a whole `kvm_xsave` (the 4 KiB legacy area); KVM_CAP_XSAVE2
    // is never enabled here, so KVM reads no more than that.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
    let n = vcpu.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
    if n != entries.len() {
        let at = entries.get(n).map_or(0, |m| m.index);
        return Err(format!(
            "KVM_SET_MSRS took {n} of {} MSRs (refused {at:#x})",
            entries.len()
        ));
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The in-kernel irqchips (PIC master, PIC slave, IOAPIC), PIT and clock.
fn save_vm(
    vm: &VmFd,
) -> Result<
    (
        Vec<kvm_irqchip>,
        kvm_bindings::kvm_pit_state2,
        kvm_bindings::kvm_clock_data,
    ),
    String,
> {
    let mut chips = Vec::new();
    for id in 0..3 {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|e| format!("KVM_GET_IRQCHIP {id}: {e}"))?;
        chips.push(c);
    }
    let pit = vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?;
    let clock = vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
    Ok((chips, pit, clock))
}

/// Sets the VM-wide state of `s` (irqchips, PIT, clock).
pub(super) fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), VmmError> {
    let err = |m: String| VmmError::Restore(m);
    for c in &s.irqchips {
        vm.set_irqchip(c)
            .map_err(|e| err(format!("KVM_SET_IRQCHIP {}: {e}", c.chip_id)))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| err(format!("KVM_SET_PIT2: {e}")))?;
    // The clock goes on from the saved value (no jump for the time the VM was away).
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock)
        .map_err(|e| err(format!("KVM_SET_CLOCK: {e}")))?;
    Ok(())
}

/// The UART's state.
pub(super) fn save_serial(serial: &Mutex<SerialDev>) -> SerialSnap {
    let s = serial.lock().unwrap_or_else(|e| e.into_inner()).state();
    SerialSnap {
        regs: [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ],
        in_buffer: s.in_buffer,
    }
}

/// The UART state vm-superio takes back.
pub(super) fn serial_state(s: &SerialSnap) -> vm_superio::serial::SerialState {
    let r = s.regs;
    vm_superio::serial::SerialState {
        baud_divisor_low: r[0],
        baud_divisor_high: r[1],
        interrupt_enable: r[2],
        interrupt_identification: r[3],
        line_control: r[4],
        line_status: r[5],
        modem_control: r[6],
        modem_status: r[7],
        scratch: r[8],
        in_buffer: s.in_buffer.clone(),
    }
}

/// One disk as a snapshot sees it: its session, and how to tell that its I/O
/// thread is idle (the kick eventfd is not pending and `busy` is clear).
pub(super) struct DiskRef {
    pub(super) session: Session,
    pub(super) kick: EventFd,
    pub(super) busy: Arc<AtomicBool>,
}

/// What a snapshot or a migration works on: the running VM's parts, shared with its
/// threads.
pub(super) struct Machine {
    pub(super) vm: Arc<VmFd>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) mem_bytes: u64,
    pub(super) shared: Arc<VcpuShared>,
    pub(super) serial: Arc<Mutex<SerialDev>>,
    pub(super) disks: Vec<DiskRef>,
    /// Where a migrated VM reports that it is done (the source exits).
    pub(super) exit: Mutex<mpsc::Sender<ExitReason>>,
    /// One snapshot or migration at a time.
    pub(super) busy: Mutex<()>,
}

impl Machine {
    /// Waits (at most [`DRAIN_TIMEOUT`]) until no disk request is in flight, then
    /// flushes every disk; and waits for a NIC's receive thread that is delivering a
    /// frame (it takes the device's lock, and checks the pause under it, before it
    /// writes guest memory). The vCPUs must be paused (so no new request comes).
    pub(super) fn drain(&self) -> Result<(), String> {
        for d in self.shared.bus.devices() {
            drop(d.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for (i, d) in self.disks.iter().enumerate() {
            loop {
                // The kick first, then the flag: the I/O thread sets `busy` before
                // it reads the kick (see `disk_io_loop`).
                let pending = sys::poll_readable(&[d.kick.as_raw_fd()], 0)
                    .map(|r| r.first() == Some(&true))
                    .unwrap_or(true);
                if !pending && !d.busy.load(Ordering::SeqCst) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "disk {i}: requests still in flight after {} s",
                        DRAIN_TIMEOUT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let flushed = d
                .session
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .submit(&[Request::Flush]);
            match flushed {
                Ok(mut o) => {
                    if let Some(Err(e)) = o.pop() {
                        return Err(format!("disk {i}: flush failed: {e:?}"));
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "disk {i}: flush failed: {}",
                        crate::error_chain(&e)
                    ))
                }
            }
        }
        Ok(())
    }

    /// Everything but memory, of a paused and drained VM.
    pub(super) fn capture(&self, mem_crc32: u32) -> Result<VmState, String> {
        let vcpus = self.shared.control.vcpu_states()?;
        let (irqchips, pit, clock) = save_vm(&self.vm)?;
        let devices = self
            .shared
            .bus
            .devices()
            .iter()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect();
        Ok(VmState {
            mem_bytes: self.mem_bytes,
            mem_crc32,
            vcpus,
            irqchips,
            pit,
            clock,
            devices,
            serial: save_serial(&self.serial),
        })
    }

    /// `PUT /snapshot`: see the module doc. The answer names the files and how long
    /// the VM was being saved.
    pub(super) fn snapshot(&self, dir: &Path, resume: bool) -> Result<Value, String> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let was_paused = self.shared.control.pausing();
        self.shared.control.pause()?;
        let r = self.write_snapshot(dir);
        if resume || (r.is_err() && !was_paused) {
            self.shared.control.resume();
        }
        let (mem_file, state_bytes) = r?;
        Ok(json!({
            "dir": dir.display().to_string(),
            "memory": mem_file.display().to_string(),
            "memory_bytes": self.mem_bytes,
            "state_bytes": state_bytes,
            "snapshot_ms": t0.elapsed().as_millis() as u64,
            "state": if resume { "running" } else { "paused" },
        }))
    }

    fn write_snapshot(&self, dir: &Path) -> Result<(PathBuf, usize), String> {
        self.drain()?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mem_path = dir.join("memory");
        let mut crc = crc32fast::Hasher::new();
        write_atomically(&mem_path, |f| {
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < self.mem_bytes {
                let n = (self.mem_bytes - at).min(buf.len() as u64) as usize;
                self.mem
                    .read_slice(&mut buf[..n], GuestAddress(at))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                crc.update(&buf[..n]);
                f.write_all(&buf[..n])?;
                at += n as u64;
            }
            Ok(())
        })?;
        let state = state::encode(&self.capture(crc.finalize())?);
        write_atomically(&dir.join("state"), |f| f.write_all(&state))?;
        Ok((mem_path, state.len()))
    }
}

/// Writes `path` through `fill` under a temporary name, syncs it and renames it into
/// place, so a snapshot that fails half-way never leaves a half-written file.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let shown = |e: std::io::Error| format!("{}: {e}", path.display());
    let f = std::fs::File::create(&tmp).map_err(shown)?;
    let mut w = std::io::BufWriter::new(&f);
    fill(&mut w).map_err(shown)?;
    w.flush().map_err(shown)?;
    drop(w);
    f.sync_all().map_err(shown)?;
    std::fs::rename(&tmp, path).map_err(shown)
}

/// Reads and checks `DIR/state` for a VM of `mem_bytes`, `cpus` and these device
/// types (disks: 2, then NICs: 1).
pub(super) fn load(
    dir: &Path,
    mem_bytes: u64,
    cpus: u8,
    types: &[u32],
) -> Result<VmState, VmmError> {
    let path = dir.join("state");
    let err = |m: String| VmmError::Restore(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
    let s = state::decode(&bytes).map_err(|e| err(e.to_string()))?;
    s.check_shape(mem_bytes, cpus, types)
        .map_err(|e| err(e.to_string()))?;
    Ok(s)
}

/// Reads `DIR/memory` into guest memory: it must be exactly the guest's size and
/// match the CRC-32 the state recorded.
pub(super) fn load_memory(dir: &Path, mem: &GuestMemoryMmap, s: &VmState) -> Result<(), VmmError> {
    use std::io::Read;
    let path = dir.join("memory");
    let err = |m: String| VmmError::Restore(format!("{}: {m}", path.display()));
    let mut f = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if len != s.mem_bytes {
        return Err(err(format!(
            "{len} bytes, the state's guest memory is {} (truncated or another VM's)",
            s.mem_bytes
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n])
            .map_err(|e| err(e.to_string()))?;
        crc.update(&buf[..n]);
        mem.write_slice(&buf[..n], GuestAddress(at))
            .map_err(|e| err(e.to_string()))?;
        at += n as u64;
    }
    if crc.finalize() != s.mem_crc32 {
        return Err(err("checksum mismatch: the memory file is corrupt".into()));
    }
    Ok(())
}

/// Puts each device's saved state back on its transport, in window order.
pub(super) fn restore_devices(bus: &super::vcpu::MmioBus, s: &VmState) -> Result<(), VmmError> {
    for (i, (d, snap)) in bus.devices().iter().zip(&s.devices).enumerate() {
        d.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(snap)
            .map_err(|e| VmmError::Restore(format!("device {i}: {e}")))?;
    }
    Ok(())
}

/// How the VM starts: boot a kernel, restore a snapshot, or take an incoming
/// migration.
pub(super) enum Start {
    /// Load and boot `--kernel`.
    Boot,
    /// Go on from this snapshot directory and its (checked) state.
    Restore(PathBuf, Box<VmState>),
    /// Wait for a source on this listener.
    Incoming(std::net::TcpListener),
}

impl Start {
    /// Each NIC's MAC as the snapshot saw it (used where `--net` gives none, so the
    /// guest keeps its address); none for a boot or a migration (whose `--net` must
    /// give the MAC, as the source's did).
    pub(super) fn saved_macs(&self) -> Vec<Option<[u8; 6]>> {
        let Start::Restore(_, s) = self else {
            return Vec::new();
        };
        s.devices
            .iter()
            .filter(|d| d.device_type == 1)
            .map(|d| d.config.get(..6).and_then(|m| m.try_into().ok()))
            .collect()
    }
}

/// The virtio device types of `cfg` in window order: disks (2), then NICs (1).
pub(super) fn device_types(cfg: &VmConfig) -> Vec<u32> {
    let disks = cfg.disks.iter().map(|_| 2);
    disks.chain(cfg.nets.iter().map(|_| 1)).collect()
}

/// Reads the snapshot of `--restore` or listens on `--incoming`'s address.
pub(super) fn snapshot_start(cfg: &VmConfig) -> Result<Start, VmmError> {
    if let Some(dir) = &cfg.restore {
        let s = load(dir, cfg.mem_bytes, cfg.cpus, &device_types(cfg))?;
        return Ok(Start::Restore(dir.clone(), Box::new(s)));
    }
    if let Some(addr) = cfg.incoming {
        let l = std::net::TcpListener::bind(addr).map_err(|source| VmmError::Os {
            what: "cannot listen on the --incoming address",
            source,
        })?;
        tracing::info!(addr = %addr, "waiting for an incoming migration");
        return Ok(Start::Incoming(l));
    }
    Ok(Start::Boot)
}

#[cfg(test)]
mod tests;
