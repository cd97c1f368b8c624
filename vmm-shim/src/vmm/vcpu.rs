//! The vCPU side of the VM: creating and setting up the vCPUs, one thread per vCPU
//! running KVM_RUN, the buses its exits are served on, and stopping the threads.
//!
//! Port I/O exits go to the [`PioBus`] (UART, i8042), MMIO exits to the [`MmioBus`]
//! (virtio-mmio windows); both are served on the vCPU's own thread (a disk's kicks
//! only signal its I/O thread, when KVM_IOEVENTFD does not take them first). An exit that ends
//! the VM (reset, power-off, triple fault, KVM internal error, failed entry) becomes the
//! thread's [`ExitReason`]; a thread told to stop returns none. The stop flag is read
//! after every exit; [`stop_vcpus`] sets it and kicks each thread out of KVM_RUN with a
//! signal until the thread is gone.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{kvm_err, os_err, ExitReason, VmmError};
use crate::boot;
use crate::layout;
use crate::legacy::{PioAction, PioBus};
use crate::metrics::{Exit, VcpuExits};
use crate::sys;
use crate::virtio::mmio::{BusDevice, MmioTransport};
use crate::virtio::{IrqLine, VirtioDevice};

/// What every vCPU thread shares: the buses its exits are served on, and the flag that
/// tells it to leave its loop (checked after each exit; shutdown kicks the threads out
/// of KVM_RUN to get there).
pub(super) struct VcpuShared {
    pub(super) stop: AtomicBool,
    pub(super) pio: PioBus,
    pub(super) bus: MmioBus,
    /// Exits by reason, one entry per vCPU (the metrics server reads them).
    pub(super) exits: Arc<Vec<VcpuExits>>,
    /// Pause and resume (a vCPU parks between exits while a pause is wanted).
    pub(super) control: Arc<super::control::Control>,
    /// The MSRs a parked vCPU saves (KVM's index list).
    pub(super) msrs: Vec<u32>,
}

/// The MMIO bus: virtio-mmio windows at fixed addresses.
#[derive(Default)]
pub(super) struct MmioBus {
    devices: Vec<Arc<Mutex<dyn BusDevice>>>,
}

impl MmioBus {
    /// The device whose window holds `addr`, and the offset into that window.
    fn find(&self, addr: u64) -> Option<(&Arc<Mutex<dyn BusDevice>>, u64)> {
        let off = addr.checked_sub(layout::MMIO_BASE)?;
        let i = usize::try_from(off / layout::MMIO_SIZE).ok()?;
        self.devices.get(i).map(|d| (d, off % layout::MMIO_SIZE))
    }
    /// An MMIO read; outside every window it reads all ones, like an empty bus.
    fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((d, off)) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bus_read(off, data),
            None => data.fill(0xff),
        }
    }
    /// An MMIO write; outside every window it is dropped.
    fn write(&self, addr: u64, data: &[u8]) {
        if let Some((d, off)) = self.find(addr) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .bus_write(off, data)
        }
    }

    /// The guest address of the next free window.
    pub(super) fn next_window(&self) -> u64 {
        layout::mmio_addr(self.devices.len())
    }

    /// Wraps `dev` in a virtio-mmio transport for the next free window, with that
    /// window's IRQ wired to KVM (irqfd).
    pub(super) fn transport<D: VirtioDevice>(
        &self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        dev: D,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, VmmError> {
        let i = self.devices.len();
        let evt = EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?;
        vm.register_irqfd(&evt, layout::mmio_irq(i))
            .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        let irq = Arc::new(IrqLine::new(evt));
        Ok(Arc::new(Mutex::new(MmioTransport::new(
            dev,
            mem.clone(),
            irq,
        ))))
    }

    /// Puts a transport in the next window and announces the window on the kernel
    /// command line (`virtio_mmio.device=4K@ADDR:IRQ`).
    pub(super) fn attach(&mut self, dev: Arc<Mutex<dyn BusDevice>>, cmdline: &mut String) {
        let i = self.devices.len();
        self.devices.push(dev);
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            layout::mmio_addr(i),
            layout::mmio_irq(i)
        ));
    }

    /// The devices, in window order.
    pub(super) fn devices(&self) -> &[Arc<Mutex<dyn BusDevice>>] {
        &self.devices
    }

    /// The windows, for the ACPI tables (a second way for the guest to find them).
    pub(super) fn acpi_devices(&self) -> Vec<crate::acpi::MmioDevice> {
        (0..self.devices.len())
            .map(|i| crate::acpi::MmioDevice {
                addr: layout::mmio_addr(i),
                irq: layout::mmio_irq(i),
            })
            .collect()
    }
}

/// How the vCPUs start: vCPU 0 at a kernel's entry point in long mode (the others
/// wait for INIT/SIPI from the guest), or every vCPU where a saved state left it.
pub(super) enum VcpuStart<'a> {
    /// Boot a kernel at this entry point.
    Boot(u64),
    /// Go on from these states (one per vCPU, checked against `cpus` before).
    Restore(&'a [super::state::VcpuState]),
}

/// Creates the vCPUs and starts a thread for each that runs [`vcpu_loop`] and reports
/// its exit reason on `tx` (see [`VcpuStart`]).
pub(super) fn start_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cpus: u8,
    start: VcpuStart<'_>,
    shared: &Arc<VcpuShared>,
    tx: &mpsc::Sender<ExitReason>,
    gate: impl FnOnce() -> Result<(), VmmError>,
) -> Result<Vec<JoinHandle<()>>, VmmError> {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok();
    // Every vCPU exists before any runs: the boot CPU may send INIT/SIPI at once, and an
    // IPI to an APIC that does not exist yet is lost.
    let mut vcpus = Vec::new();
    for id in 0..cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        match &start {
            VcpuStart::Boot(entry) => {
                setup_vcpu(&vcpu, id, cpuid.as_ref(), (id == 0).then_some(*entry))?
            }
            VcpuStart::Restore(states) => {
                setup_vcpu(&vcpu, id, cpuid.as_ref(), None)?;
                let s = states
                    .get(usize::from(id))
                    .ok_or_else(|| VmmError::Restore(format!("no saved state for vCPU {id}")))?;
                super::snapshot::restore_vcpu(&vcpu, s)
                    .map_err(|e| VmmError::Restore(format!("vCPU {id}: {e}")))?;
            }
        }
        vcpus.push(vcpu);
    }
    // Every vCPU has its state; none runs before `gate` says so (an incoming
    // migration's hand-over).
    gate()?;
    let mut threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let id = id as u8;
        let (tx, shared) = (tx.clone(), shared.clone());
        threads.push(
            thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let r = vcpu_loop(vcpu, id, &shared);
                    if let Some(r) = r {
                        let _ = tx.send(r);
                    }
                })
                .map_err(os_err("spawning a vCPU thread"))?,
        );
    }
    Ok(threads)
}

/// Sets the stop flag and kicks each vCPU thread out of KVM_RUN until it ends.
pub(super) fn stop_vcpus(threads: Vec<JoinHandle<()>>, stop: &AtomicBool, deadline: Instant) {
    stop.store(true, Ordering::SeqCst);
    // A vCPU thread could be stuck outside KVM_RUN in a device it serves inline (a TAP
    // stopped answering, bounded by the NBD I/O timeout); don't wait on it forever.
    for (id, h) in threads.into_iter().enumerate() {
        while !h.is_finished() && Instant::now() < deadline {
            sys::kick_thread(h.as_pthread_t());
            thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!(vcpu = id, "vCPU thread did not stop in time; leaving it");
        }
    }
}

/// Gives a new vCPU its CPUID (with its own APIC ID), the LAPIC's LINT pins as firmware
/// leaves them and, for the boot vCPU (`entry` given), the 64-bit boot state.
fn setup_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: Option<&kvm_bindings::CpuId>,
    entry: Option<u64>,
) -> Result<(), VmmError> {
    if let Some(c) = cpuid {
        let mut c = c.clone();
        for e in c.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
                0xb => e.edx = u32::from(id),
                _ => {}
            }
        }
        if let Err(e) = vcpu.set_cpuid2(&c) {
            tracing::warn!(error = %e, "KVM_SET_CPUID2 failed; the guest sees the default CPUID");
        }
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware would leave them.
    if let Ok(mut lapic) = vcpu.get_lapic() {
        let set = |regs: &mut [libc::c_char], off: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | mode;
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *x as libc::c_char;
            }
        };
        set(&mut lapic.regs, 0x350, 0x700);
        set(&mut lapic.regs, 0x360, 0x400);
        let _ = vcpu.set_lapic(&lapic);
    }
    if let Some(entry) = entry {
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot::boot_regs(entry))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&boot::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
    }
    Ok(())
}

/// The vCPU's instruction pointer, for crash messages.
fn rip(vcpu: &VcpuFd) -> String {
    vcpu.get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "?".into())
}

/// Runs one vCPU until the VM ends; returns a reason unless it was told to stop.
fn vcpu_loop(mut vcpu: VcpuFd, id: u8, shared: &VcpuShared) -> Option<ExitReason> {
    let VcpuShared {
        stop,
        pio,
        bus,
        exits,
        control,
        msrs,
    } = shared;
    let unused = VcpuExits::default();
    let exits = exits.get(usize::from(id)).unwrap_or(&unused);
    // When this vCPU last napped under a migration's throttle.
    let mut napped = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        if control.pausing() {
            control.park(stop, usize::from(id), || {
                super::snapshot::save_vcpu(&mut vcpu, msrs)
            });
            continue;
        }
        control.throttle_nap(&mut napped);
        let run = vcpu.run();
        exits.count(match &run {
            Ok(VcpuExit::IoIn(..)) => Exit::IoIn,
            Ok(VcpuExit::IoOut(..)) => Exit::IoOut,
            Ok(VcpuExit::MmioRead(..)) => Exit::MmioRead,
            Ok(VcpuExit::MmioWrite(..)) => Exit::MmioWrite,
            Ok(VcpuExit::Intr) => Exit::Intr,
            Ok(VcpuExit::SystemEvent(..)) => Exit::SystemEvent,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Intr,
            _ => Exit::Fatal,
        });
        let exit = match run {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(port, data);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if pio.write(port, data) == PioAction::Reset {
                    return Some(ExitReason::Reset);
                }
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.read(addr, data);
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.write(addr, data);
                continue;
            }
            Ok(VcpuExit::Intr) => continue,
            Ok(VcpuExit::Hlt) => {
                "halted with no interrupt controller to wake it (KVM_EXIT_HLT)".to_string()
            }
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::InternalError) => {
                let sub = sys::internal_error_suberror(&mut vcpu);
                format!("KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {sub})")
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("VM entry failed (hardware reason {reason:#x}, cpu {cpu})")
            }
            Ok(VcpuExit::SystemEvent(ty, _)) => match ty {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => return Some(ExitReason::Reset),
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return Some(ExitReason::PowerOff),
                t => format!("unexpected system event {t}"),
            },
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        return Some(ExitReason::Crash(format!(
            "vCPU {id}: {exit} at rip={}",
            rip(&vcpu)
        )));
    }
}
