//! The VMM proper: builds the VM from a [`VmConfig`], runs the vCPUs and ends it.
//!
//! Threads: one per vCPU (KVM_RUN loop; port and MMIO exits are served on that thread,
//! including virtio queue processing, so a kick returns when its requests are done),
//! one RX thread per NIC (waits on the TAP and the device's wake eventfd), and one that
//! waits for SIGTERM/SIGINT. Every thread reports how the VM should end on one channel;
//! the first report wins. The main thread then sets the stop flag, kicks the vCPU
//! threads out of KVM_RUN with a signal until they are gone, flushes and disconnects
//! every NBD backend and returns the reason, which `main` turns into the exit status:
//! guest reset or SIGTERM -> 0; triple fault, KVM internal error, entry failure -> 1.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot;
use crate::config::{Console, NetBackend as NetKind, VmConfig};
use crate::layout;
use crate::legacy::{ConsoleOut, IrqEvt, PioAction, PioBus, SerialDev};
use crate::nbd::NbdClient;
use crate::sys::{self, Tap};
use crate::virtio::blk::Block;
use crate::virtio::mmio::{BusDevice, MmioTransport};
use crate::virtio::net::Net;
use crate::virtio::{Counters, IrqLine, VirtioDevice};

/// An error while building the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// a KVM ioctl failed
    #[error("KVM: {what} failed")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// guest memory could not be allocated
    #[error("could not allocate {bytes} bytes of guest memory")]
    Memory {
        /// Size.
        bytes: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// the kernel could not be loaded
    #[error("could not load the guest kernel")]
    Boot(#[from] boot::BootError),
    /// an NBD disk could not be opened
    #[error("disk {index}: could not open the NBD export")]
    Disk {
        /// Which disk.
        index: usize,
        /// Why.
        #[source]
        source: crate::nbd::NbdError,
    },
    /// a TAP could not be opened
    #[error("net {index}: could not open TAP {name}")]
    Tap {
        /// Which NIC.
        index: usize,
        /// TAP name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// netd did not give us a port
    #[error("net {index}: netd port")]
    Netd {
        /// Which NIC.
        index: usize,
        /// Why.
        #[source]
        source: crate::netd_client::NetdError,
    },
    /// the console file could not be opened
    #[error("could not open console file {path}")]
    Console {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// an OS resource (eventfd, thread, signal) could not be set up
    #[error("{what}")]
    Os {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}
fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

/// How long shutdown waits for vCPU threads and busy disks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 0xfe, or KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// A signal asked us to stop.
    Signal(i32),
    /// The guest died: triple fault, internal error, bad state. The message says which.
    Crash(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Signal(_) => 0,
            ExitReason::Crash(_) => 1,
        }
    }
}

/// The MMIO bus: virtio-mmio windows at fixed addresses.
struct MmioBus {
    devices: Vec<Arc<Mutex<dyn BusDevice>>>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&Arc<Mutex<dyn BusDevice>>, u64)> {
        let off = addr.checked_sub(layout::MMIO_BASE)?;
        let i = usize::try_from(off / layout::MMIO_SIZE).ok()?;
        self.devices.get(i).map(|d| (d, off % layout::MMIO_SIZE))
    }
    fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((d, off)) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bus_read(off, data),
            None => data.fill(0xff),
        }
    }
    fn write(&self, addr: u64, data: &[u8]) {
        if let Some((d, off)) = self.find(addr) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .bus_write(off, data)
        }
    }
}

type BlockDev = Arc<Mutex<MmioTransport<Block<NbdClient>>>>;
type NetDev = Arc<Mutex<MmioTransport<Net<Tap>>>>;

/// Builds and runs the VM until it ends; returns why.
pub fn run(cfg: VmConfig) -> Result<ExitReason, VmmError> {
    sys::block_term_signals();
    sys::install_kick_handler().map_err(os_err("installing the vCPU kick handler"))?;

    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), cfg.mem_bytes as usize)])
        .map_err(|source| VmmError::Memory {
            bytes: cfg.mem_bytes,
            source,
        })?;
    register_memory(&vm, &mem)?;

    // Serial console.
    let out = match &cfg.console {
        Console::Stdio => ConsoleOut::Stdout,
        Console::File(p) => ConsoleOut::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmmError::Console {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
    };
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?;
    vm.register_irqfd(&serial_evt, layout::SERIAL_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial: Arc<Mutex<SerialDev>> =
        Arc::new(Mutex::new(SerialDev::new(IrqEvt(serial_evt), out)));

    // Devices: disks first, then NICs, each in its own 4 KiB window and IRQ.
    let mut cmdline = cfg.cmdline.clone();
    let mut bus = MmioBus {
        devices: Vec::new(),
    };
    let mut blocks: Vec<BlockDev> = Vec::new();
    let irq_for = |vm: &VmFd, i: usize| -> Result<Arc<IrqLine>, VmmError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?;
        vm.register_irqfd(&evt, layout::mmio_irq(i))
            .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        Ok(Arc::new(IrqLine::new(evt)))
    };
    let announce = |cmdline: &mut String, i: usize| {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            layout::mmio_addr(i),
            layout::mmio_irq(i)
        ));
    };
    for (index, d) in cfg.disks.iter().enumerate() {
        let client = NbdClient::connect(&d.addr, &d.export)
            .map_err(|source| VmmError::Disk { index, source })?;
        tracing::info!(
            disk = index,
            export = %d.export,
            size = client.size(),
            read_only = client.read_only() || d.read_only,
            structured = client.structured(),
            "NBD export connected"
        );
        let i = bus.devices.len();
        let dev = Block::new(client, d.read_only, &format!("nbd{index}"));
        let t = Arc::new(Mutex::new(MmioTransport::new(
            dev,
            mem.clone(),
            irq_for(&vm, i)?,
        )));
        bus.devices.push(t.clone());
        blocks.push(t);
        announce(&mut cmdline, i);
    }
    let stop_rx = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?);
    let mut rx_threads = Vec::new();
    let mut netd_ports: Vec<(String, String)> = Vec::new();
    for (index, n) in cfg.nets.iter().enumerate() {
        let mac = n.mac.unwrap_or_else(|| random_mac(index));
        let (name, offloads) = match &n.backend {
            NetKind::Tap(name) => (name.clone(), true),
            NetKind::Netd(network) => {
                let ifname = format!("vs{:x}n{index}", std::process::id());
                crate::netd_client::add_vm_port(
                    &cfg.netd_control,
                    network,
                    &ifname,
                    &format_mac(mac),
                )
                .map_err(|source| VmmError::Netd { index, source })?;
                netd_ports.push((network.clone(), ifname.clone()));
                (ifname, false)
            }
        };
        let tap = Tap::open(&name).map_err(|source| VmmError::Tap {
            index,
            name: name.clone(),
            source,
        })?;
        let tap_fd = tap.as_raw_fd();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?;
        let wake_rx = wake.try_clone().map_err(os_err("eventfd"))?;
        let i = bus.devices.len();
        let dev = Net::new(tap, mac, Some(wake), offloads);
        let t: NetDev = Arc::new(Mutex::new(MmioTransport::new(
            dev,
            mem.clone(),
            irq_for(&vm, i)?,
        )));
        bus.devices.push(t.clone());
        announce(&mut cmdline, i);
        tracing::info!(net = index, tap = %name, mac = %format_mac(mac), "NIC attached");
        let stop = stop_rx.clone();
        rx_threads.push(
            thread::Builder::new()
                .name(format!("net{index}-rx"))
                .spawn(move || net_rx_loop(t, tap_fd, wake_rx, stop))
                .map_err(os_err("spawning a NIC thread"))?,
        );
    }

    let acpi_devices: Vec<crate::acpi::MmioDevice> = (0..bus.devices.len())
        .map(|i| crate::acpi::MmioDevice {
            addr: layout::mmio_addr(i),
            irq: layout::mmio_irq(i),
        })
        .collect();
    let kernel = boot::load(
        &mem,
        cfg.mem_bytes,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        &cmdline,
        cfg.cpus,
        &acpi_devices,
    )?;
    tracing::info!(entry = format_args!("{:#x}", kernel.entry), cmdline = %cmdline, "kernel loaded");

    // vCPUs.
    let (tx, rx) = mpsc::channel::<ExitReason>();
    let stop = Arc::new(AtomicBool::new(false));
    let pio = Arc::new(PioBus::new(serial.clone()));
    let bus = Arc::new(bus);
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok();
    // Every vCPU exists before any runs: the boot CPU may send INIT/SIPI at once, and an
    // IPI to an APIC that does not exist yet is lost.
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        setup_vcpu(&vcpu, id, cpuid.as_ref(), (id == 0).then_some(kernel.entry))?;
        vcpus.push(vcpu);
    }
    let mut vcpu_threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let id = id as u8;
        let (tx, stop, pio, bus) = (tx.clone(), stop.clone(), pio.clone(), bus.clone());
        vcpu_threads.push(
            thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let r = vcpu_loop(vcpu, id, &stop, &pio, &bus);
                    if let Some(r) = r {
                        let _ = tx.send(r);
                    }
                })
                .map_err(os_err("spawning a vCPU thread"))?,
        );
    }
    {
        let tx = tx.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = sys::wait_term_signal();
                let _ = tx.send(ExitReason::Signal(sig));
            })
            .map_err(os_err("spawning the signal thread"))?;
    }
    if cfg.console == Console::Stdio {
        let serial = serial.clone();
        thread::Builder::new()
            .name("console-in".into())
            .spawn(move || console_input(&serial))
            .map_err(os_err("spawning the console input thread"))?;
    }
    drop(tx);
    sys::sd_notify_ready();

    let reason = rx
        .recv()
        .unwrap_or_else(|_| ExitReason::Crash("all vCPU threads ended without a reason".into()));
    tracing::info!(?reason, "stopping the VM");

    stop.store(true, Ordering::SeqCst);
    // A vCPU thread can only be stuck outside KVM_RUN in device I/O (an NBD server that
    // stopped answering, bounded by the NBD I/O timeout); don't wait on it forever.
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    for (id, h) in vcpu_threads.into_iter().enumerate() {
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
    let _ = stop_rx.write(1);
    for h in rx_threads {
        let _ = h.join();
    }
    for (i, b) in blocks.iter().enumerate() {
        let mut t = loop {
            match b.try_lock() {
                Ok(t) => break Some(t),
                Err(std::sync::TryLockError::Poisoned(e)) => break Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        let Some(t) = t.as_mut() else {
            tracing::warn!(disk = i, "disk busy in a stuck request; not flushed");
            continue;
        };
        let c = t.device().counters();
        tracing::info!(
            disk = i,
            completed = Counters::get(&c.completed),
            io_errors = Counters::get(&c.io_errors),
            bad_chains = Counters::get(&c.bad_chains),
            "disk closing"
        );
        if let Err(e) = t.device_mut().close() {
            tracing::warn!(disk = i, error = %crate::error_chain(&e), "NBD close failed");
        }
    }
    for (network, port) in &netd_ports {
        if let Err(e) = crate::netd_client::del_port(&cfg.netd_control, network, port) {
            tracing::warn!(port = %port, error = %crate::error_chain(&e), "netd port removal failed");
        }
    }
    let _ = serial.lock().map(|mut s| {
        let _ = std::io::Write::flush(s.writer_mut());
    });
    Ok(reason)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, r) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|_| VmmError::Os {
                what: "guest memory has no host mapping",
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().0,
            memory_size: vm_memory::GuestMemoryRegion::len(r),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the range is `r`'s own mapping (host address and length from `mem`).
        // The mapping lives as long as any clone of `mem` (the regions are shared
        // Arcs): `run` holds `mem` until the vCPU threads are joined, and a vCPU thread
        // that does not stop still holds the MMIO bus, whose devices hold clones.
        unsafe { sys::set_user_memory_region(vm, region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

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

fn rip(vcpu: &VcpuFd) -> String {
    vcpu.get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|_| "?".into())
}

/// Runs one vCPU until the VM ends; returns a reason unless it was told to stop.
fn vcpu_loop(
    mut vcpu: VcpuFd,
    id: u8,
    stop: &AtomicBool,
    pio: &PioBus,
    bus: &MmioBus,
) -> Option<ExitReason> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        let exit = match vcpu.run() {
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

/// Feeds standard input to the UART's receive FIFO (the guest's console input), waiting
/// while the FIFO is full; ends at EOF.
fn console_input(serial: &Mutex<SerialDev>) {
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

/// A NIC's receive thread: waits for frames on the TAP (unless a frame is parked for
/// want of guest buffers) or for the guest to add buffers, then pumps.
fn net_rx_loop(t: NetDev, tap_fd: i32, wake: EventFd, stop: Arc<EventFd>) {
    let stop_fd = stop.as_raw_fd();
    let wake_fd = wake.as_raw_fd();
    loop {
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
        if g.active() {
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

/// A locally administered MAC derived from the pid and the NIC index.
fn random_mac(index: usize) -> [u8; 6] {
    let p = std::process::id().to_be_bytes();
    [0x52, 0x54, p[2], p[3], p[1] ^ 0x5a, index as u8]
}

/// "52:54:00:12:34:56".
pub fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Total guest RAM (for logs).
pub fn guest_ram(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}
