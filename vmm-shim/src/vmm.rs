//! The VMM proper: builds the VM from a [`VmConfig`], runs the vCPUs and ends it.
//!
//! [`run`] reads top-down as the VM's life: create the VM, guest RAM, the serial
//! console, the disks and NICs (each in its own virtio-mmio window and IRQ, announced
//! on the kernel command line and in the ACPI tables), load the kernel, start the
//! vCPUs and the helper threads, wait, shut down. Each step is one function below.
//!
//! Threads: one per vCPU (KVM_RUN loop, in `vmm/vcpu.rs`; port and MMIO exits are served on
//! that thread, including virtio-net TX), one I/O thread per disk (KVM_IOEVENTFD turns the
//! guest's QueueNotify into a signal on its eventfd; it runs the queue and holds the
//! device lock only to pop and to complete, never while the NBD server answers, so a
//! slow, stalled or reconnecting server stalls that disk's requests, not the vCPU),
//! one RX thread per NIC (waits on the TAP and the device's wake eventfd),
//! one that waits for SIGTERM/SIGINT and, with `--console stdio`, one that feeds
//! standard input to the UART. Every vCPU thread and the signal thread report how the
//! VM should end on one channel; the first report wins. The main thread then sets the
//! stop flag, kicks the vCPU threads out of KVM_RUN with a signal until they are gone,
//! stops the RX and disk threads, flushes and disconnects every NBD backend, hands netd's ports
//! back and returns the reason, which `main` turns into the exit status: guest reset,
//! power-off or SIGTERM -> 0; triple fault, KVM internal error, entry failure -> 1.

mod announce;
mod control;
mod io;
mod migrate;
mod snapshot;
pub mod state;
mod vcpu;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::control::{ApiVm, Control};
use self::io::{console_input, disk_io_loop, net_rx_loop};
use self::snapshot::{device_types, snapshot_start, DiskRef, Machine, Start};
use self::state::VmState;
use self::vcpu::{start_vcpus, stop_vcpus, MmioBus, VcpuShared, VcpuStart};
use crate::boot;
use crate::config::{Console, NetBackend as NetKind, VmConfig};
use crate::layout;
use crate::legacy::{ConsoleOut, ConsoleSink, IrqEvt, PioBus, SerialDev};
use crate::metrics::{Device, Metrics, VcpuExits};
use crate::nbd::NbdSession;
use crate::sys::{self, Tap};
use crate::virtio::blk::Block;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::Net;
use crate::virtio::{Counters, VirtioDevice};

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
    /// the control API could not listen
    #[error("control API (--api-sock)")]
    Api(#[from] crate::api::ApiError),
    /// the metrics server could not listen
    #[error("cannot serve metrics on {addr} (--metrics)")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// a snapshot (--restore) or an incoming migration (--incoming) could not be used
    #[error("restore: {0}")]
    Restore(String),
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
    /// The VM went on on another host (`PUT /migrate` succeeded).
    Migrated,
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset
            | ExitReason::PowerOff
            | ExitReason::Signal(_)
            | ExitReason::Migrated => 0,
            ExitReason::Crash(_) => 1,
        }
    }
}

/// A disk's NBD session, shared by its device and its I/O thread.
type Session = Arc<Mutex<NbdSession>>;
type BlockDev = Arc<Mutex<MmioTransport<Block<Session>>>>;

/// The disks' side of shutdown: each device, its session and its I/O thread, and the
/// eventfd that stops the threads.
struct Disks {
    disks: Vec<(BlockDev, Session, JoinHandle<()>)>,
    stop: Arc<EventFd>,
    /// Each disk as a snapshot drains it.
    refs: Vec<DiskRef>,
}
/// A NIC: its device behind its transport, shared with its receive thread.
pub(super) type NetDev = Arc<Mutex<MmioTransport<Net<Tap>>>>;

/// The NICs' side of shutdown: their receive threads, the eventfd that stops them, and
/// the netd ports to hand back.
struct Nics {
    rx_threads: Vec<JoinHandle<()>>,
    stop_rx: Arc<EventFd>,
    /// (network, port name) of every port netd gave us.
    netd_ports: Vec<(String, String)>,
    /// Each NIC's counters, for the metrics server.
    counters: Vec<Arc<Counters>>,
    /// Each NIC, for the announce after a move.
    devs: Vec<NetDev>,
}

/// What a running VM is made of, as far as ending it goes.
struct Running {
    vcpu_threads: Vec<JoinHandle<()>>,
    shared: Arc<VcpuShared>,
    disks: Disks,
    nics: Nics,
    serial: Arc<Mutex<SerialDev>>,
}

/// Builds and runs the VM until it ends; returns why.
///
/// The steps, in order: the KVM VM with its in-kernel interrupt controllers and PIT
/// (`create_vm`), guest RAM (`guest_memory`), the serial console
/// (`serial_console`), the disks and then the NICs, each in the next virtio-mmio
/// window (`attach_disks`, `attach_nics`), the kernel (`load_kernel`), the vCPU
/// threads (`start_vcpus`) and the signal and console threads (`start_helpers`).
/// Then the first exit report decides the reason and `shutdown` ends the VM. An error
/// before the vCPUs start returns at once; what was set up is released as it drops.
pub fn run(cfg: VmConfig) -> Result<ExitReason, VmmError> {
    sys::block_term_signals();
    sys::install_kick_handler().map_err(os_err("installing the vCPU kick handler"))?;

    // A snapshot to restore is read and checked (shape included) before anything is
    // connected; an incoming migration's port listens from the start.
    let start = snapshot_start(&cfg)?;
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = Arc::new(create_vm(&kvm)?);
    // `mem` lives until this function returns, after the vCPU threads are joined (see
    // the SAFETY comment of `register_memory`).
    let mem = guest_memory(&vm, cfg.mem_bytes)?;

    let control = Arc::new(Control::default());
    let mut cmdline = cfg.cmdline.clone();
    let mut bus = MmioBus::default();
    let mut board = Board {
        vm: &vm,
        mem: &mem,
        bus: &mut bus,
        cmdline: &mut cmdline,
    };
    let macs = start.saved_macs();
    let mut disks = attach_disks(&mut board, &cfg)?;
    let nics = attach_nics(&mut board, &cfg, &control, &macs)?;
    let (entry, saved, mut incoming) = match start {
        Start::Boot => (load_kernel(&mem, &cfg, &bus, &cmdline)?, None, None),
        Start::Restore(dir, s) => {
            snapshot::load_memory(&dir, &mem, &s)?;
            (0, Some(*s), None)
        }
        Start::Incoming(l) => {
            let (s, conn) =
                migrate::receive(&l, &mem, cfg.mem_bytes, cfg.cpus, &device_types(&cfg))?;
            (0, Some(s), Some(conn))
        }
    };
    let serial = serial_console(&vm, &cfg.console, saved.as_ref())?;
    if let Some(s) = &saved {
        let restored =
            snapshot::restore_devices(&bus, s).and_then(|()| snapshot::restore_vm(&vm, s));
        migrate::told(&mut incoming, restored)?;
    }

    let (tx, rx) = mpsc::channel::<ExitReason>();
    let exits = Arc::new((0..cfg.cpus).map(|_| VcpuExits::default()).collect());
    serve_metrics(&cfg, &exits, &disks, &nics)?;
    let shared = Arc::new(VcpuShared {
        stop: AtomicBool::new(false),
        pio: PioBus::new(serial.clone()),
        bus,
        exits,
        control: control.clone(),
        msrs: kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default(),
    });
    let machine = Arc::new(Machine {
        vm: vm.clone(),
        mem: mem.clone(),
        mem_bytes: cfg.mem_bytes,
        shared: shared.clone(),
        serial: serial.clone(),
        disks: std::mem::take(&mut disks.refs),
        exit: Mutex::new(tx.clone()),
        busy: Mutex::new(()),
    });
    migrate::told(
        &mut incoming,
        serve_api(&cfg, &control, &disks, &nics, &machine),
    )?;
    // A restored or migrated VM goes on from its vCPUs' states; a booted one starts
    // at the kernel's entry.
    let vstart = match &saved {
        Some(s) => VcpuStart::Restore(&s.vcpus),
        None => VcpuStart::Boot(entry),
    };
    // A migrated VM runs only once the source has handed it over; a VM that arrives
    // is announced on its NICs before it runs.
    let gate = || {
        if let Some(c) = incoming.as_mut() {
            c.commit()?;
        }
        if saved.is_some() {
            announce::start(&nics.devs, &control);
        }
        Ok(())
    };
    let vcpu_threads = start_vcpus(&kvm, &vm, cfg.cpus, vstart, &shared, &tx, gate);
    let vcpu_threads = migrate::told(&mut incoming, vcpu_threads)?;
    control.started(vcpu_threads.iter().map(|h| h.as_pthread_t()).collect());
    if let Some(conn) = incoming {
        migrate::accepted(conn);
        tracing::info!("incoming migration done; the VM runs here");
    }
    start_helpers(&cfg, &serial, tx)?;
    sys::sd_notify_ready();

    let reason = rx
        .recv()
        .unwrap_or_else(|_| ExitReason::Crash("all vCPU threads ended without a reason".into()));
    tracing::info!(?reason, "stopping the VM");
    shutdown(
        Running {
            vcpu_threads,
            shared,
            disks,
            nics,
            serial,
        },
        &cfg,
    );
    if let Some(p) = &cfg.api_sock {
        let _ = std::fs::remove_file(p);
    }
    drop(mem);
    Ok(reason)
}

/// Every device with its counters, as the metrics server and the control API show
/// them: the disks (`blk0`...), then the NICs (`net0`...).
fn devices(disks: &Disks, nics: &Nics) -> Vec<Device> {
    let blk = disks.disks.iter().enumerate().map(|(i, (t, _, _))| Device {
        name: format!("blk{i}"),
        kind: "virtio-blk",
        counters: t
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .counters_handle(),
    });
    let net = nics.counters.iter().enumerate().map(|(i, c)| Device {
        name: format!("net{i}"),
        kind: "virtio-net",
        counters: c.clone(),
    });
    blk.chain(net).collect()
}

/// Starts the metrics server when `--metrics` asks for one: every vCPU's exits and
/// every device's counters (see [`crate::metrics`]).
fn serve_metrics(
    cfg: &VmConfig,
    exits: &Arc<Vec<VcpuExits>>,
    disks: &Disks,
    nics: &Nics,
) -> Result<(), VmmError> {
    let Some(addr) = cfg.metrics else {
        return Ok(());
    };
    let src = Arc::new(Metrics {
        vcpus: exits.clone(),
        devices: devices(disks, nics),
    });
    let srv = fabric_util::metrics::serve(addr, "vmm_shim", src)
        .map_err(|source| VmmError::Metrics { addr, source })?;
    tracing::info!(metrics = %srv.local_addr(), "serving /metrics");
    Ok(())
}

/// Starts the control API when `--api-sock` asks for it (see [`crate::api`]).
fn serve_api(
    cfg: &VmConfig,
    control: &Arc<Control>,
    disks: &Disks,
    nics: &Nics,
    machine: &Arc<Machine>,
) -> Result<(), VmmError> {
    let Some(path) = &cfg.api_sock else {
        return Ok(());
    };
    let vm = ApiVm {
        control: control.clone(),
        cpus: cfg.cpus,
        mem_bytes: cfg.mem_bytes,
        devices: devices(disks, nics),
        machine: machine.clone(),
    };
    crate::api::serve(path, Arc::new(vm))?;
    tracing::info!(api = %path.display(), "serving the control API");
    Ok(())
}

/// Creates the VM: TSS and identity-map pages, the in-kernel PIC/IOAPIC/LAPICs and the
/// in-kernel PIT (speaker port ignored).
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
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
    Ok(vm)
}

/// Allocates guest RAM (one region from guest address 0) and registers it with KVM.
fn guest_memory(vm: &VmFd, bytes: u64) -> Result<GuestMemoryMmap, VmmError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| VmmError::Memory { bytes, source })?;
    register_memory(vm, &mem)?;
    Ok(mem)
}

/// The 8250 UART at 0x3f8: output to stdout or appended to a file, its IRQ an irqfd;
/// its registers and FIFO from `saved` when the VM is restored.
fn serial_console(
    vm: &VmFd,
    console: &Console,
    saved: Option<&VmState>,
) -> Result<Arc<Mutex<SerialDev>>, VmmError> {
    let out = match console {
        Console::Stdio => ConsoleSink::Stdout,
        Console::File(p) => ConsoleSink::File(
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
    let (irq, out) = (IrqEvt(serial_evt), ConsoleOut::new(out));
    let dev = match saved {
        None => SerialDev::new(irq, out),
        Some(s) => SerialDev::from_state(
            &snapshot::serial_state(&s.serial),
            irq,
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| VmmError::Restore(format!("serial: {e:?}")))?,
    };
    Ok(Arc::new(Mutex::new(dev)))
}

/// What the devices are put on while the VM is built: the VM (irqfds, ioeventfds),
/// guest memory, the virtio-mmio bus and the kernel command line that announces
/// each window.
struct Board<'a> {
    vm: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    bus: &'a mut MmioBus,
    cmdline: &'a mut String,
}

impl Board<'_> {
    /// Puts `dev` in the next window behind a virtio-mmio transport, its IRQ wired
    /// to KVM and the window on the command line; returns the transport.
    fn plug<D: VirtioDevice + 'static>(
        &mut self,
        dev: D,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, VmmError> {
        let t = self.bus.transport(self.vm, self.mem, dev)?;
        self.bus.attach(t.clone(), self.cmdline);
        Ok(t)
    }
}

/// Connects every disk's NBD export, puts a virtio-blk device for it on the bus, in
/// command-line order, and starts its I/O thread ([`disk_io_loop`]). The guest's
/// QueueNotify writes to the window signal the thread's eventfd straight from KVM
/// (KVM_IOEVENTFD); where KVM refuses that, the transport signals it.
fn attach_disks(board: &mut Board<'_>, cfg: &VmConfig) -> Result<Disks, VmmError> {
    let mut disks = Disks {
        disks: Vec::new(),
        stop: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?),
        refs: Vec::new(),
    };
    for (index, d) in cfg.disks.iter().enumerate() {
        let session = NbdSession::connect(d).map_err(|source| VmmError::Disk { index, source })?;
        tracing::info!(
            disk = index,
            export = %d.export,
            size = session.size(),
            read_only = session.read_only() || d.read_only,
            structured = session.structured(),
            tls = d.tls.is_some(),
            reconnect_delay_s = d.reconnect_delay.as_secs(),
            "NBD export connected"
        );
        let session: Session = Arc::new(Mutex::new(session));
        let kick = EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?;
        let notify_addr = board.bus.next_window() + crate::virtio::mmio::QUEUE_NOTIFY;
        if let Err(e) =
            board
                .vm
                .register_ioevent(&kick, &IoEventAddress::Mmio(notify_addr), NoDatamatch)
        {
            tracing::warn!(disk = index, error = %e, "KVM_IOEVENTFD failed; kicks go through the transport");
        }
        let dev = Block::new(session.clone(), d.read_only, &format!("nbd{index}"))
            .with_kick(kick.try_clone().map_err(os_err("eventfd"))?);
        let t = board.plug(dev)?;
        let busy = Arc::new(AtomicBool::new(false));
        disks.refs.push(DiskRef {
            session: session.clone(),
            kick: kick.try_clone().map_err(os_err("eventfd"))?,
            busy: busy.clone(),
        });
        let (t2, s2, stop) = (t.clone(), session.clone(), disks.stop.clone());
        let h = thread::Builder::new()
            .name(format!("disk{index}-io"))
            .spawn(move || disk_io_loop(t2, s2, kick, stop, busy))
            .map_err(os_err("spawning a disk thread"))?;
        disks.disks.push((t, session, h));
    }
    Ok(disks)
}

/// Opens every NIC's TAP (asking netd for a `vm` port first where the NIC names a netd
/// network), puts a virtio-net device for it on the bus and starts its receive thread
/// ([`net_rx_loop`]). Offloads are offered on plain TAPs only: a netd port's AF_PACKET
/// side carries plain frames. A NIC without a MAC takes its `saved` one (a restored
/// snapshot's), else one made from the pid.
fn attach_nics(
    board: &mut Board<'_>,
    cfg: &VmConfig,
    control: &Arc<Control>,
    saved: &[Option<[u8; 6]>],
) -> Result<Nics, VmmError> {
    let mut nics = Nics {
        rx_threads: Vec::new(),
        stop_rx: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?),
        netd_ports: Vec::new(),
        counters: Vec::new(),
        devs: Vec::new(),
    };
    for (index, n) in cfg.nets.iter().enumerate() {
        let mac = n
            .mac
            .or_else(|| saved.get(index).copied().flatten())
            .unwrap_or_else(|| random_mac(index));
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
                nics.netd_ports.push((network.clone(), ifname.clone()));
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
        let dev = Net::new(tap, mac, Some(wake), offloads);
        nics.counters.push(dev.counters_handle());
        let t: NetDev = board.plug(dev)?;
        nics.devs.push(t.clone());
        tracing::info!(net = index, tap = %name, mac = %format_mac(mac), "NIC attached");
        let (stop, control) = (nics.stop_rx.clone(), control.clone());
        nics.rx_threads.push(
            thread::Builder::new()
                .name(format!("net{index}-rx"))
                .spawn(move || net_rx_loop(t, tap_fd, wake_rx, stop, control))
                .map_err(os_err("spawning a NIC thread"))?,
        );
    }
    Ok(nics)
}

/// Loads the kernel (and initrd), writes the boot structures and the ACPI tables that
/// list the bus's windows; returns the 64-bit entry point.
fn load_kernel(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    bus: &MmioBus,
    cmdline: &str,
) -> Result<u64, VmmError> {
    let kernel = boot::load(
        mem,
        cfg.mem_bytes,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        cmdline,
        cfg.cpus,
        &bus.acpi_devices(),
    )?;
    tracing::info!(entry = format_args!("{:#x}", kernel.entry), cmdline = %cmdline, "kernel loaded");
    Ok(kernel.entry)
}

/// Starts the thread that turns SIGTERM/SIGINT into an exit report and, with
/// `--console stdio`, the one that feeds standard input to the UART. Takes the last
/// sender, so the channel closes when every reporting thread is gone.
fn start_helpers(
    cfg: &VmConfig,
    serial: &Arc<Mutex<SerialDev>>,
    tx: mpsc::Sender<ExitReason>,
) -> Result<(), VmmError> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = sys::wait_term_signal();
            let _ = tx.send(ExitReason::Signal(sig));
        })
        .map_err(os_err("spawning the signal thread"))?;
    if cfg.console == Console::Stdio {
        let serial = serial.clone();
        thread::Builder::new()
            .name("console-in".into())
            .spawn(move || console_input(&serial))
            .map_err(os_err("spawning the console input thread"))?;
    }
    Ok(())
}

/// Ends a running VM: stops the vCPUs, then the NICs' receive threads, flushes and
/// disconnects every disk, hands netd's ports back and flushes the console. Waits at
/// most [`SHUTDOWN_GRACE`] in all for vCPU threads and busy disks.
fn shutdown(vm: Running, cfg: &VmConfig) {
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    // The stop flag before the pause is let go: a parked vCPU (a VM that migrated
    // away) must leave, not run the guest once more.
    vm.shared.stop.store(true, Ordering::SeqCst);
    vm.shared.control.stopping();
    stop_vcpus(vm.vcpu_threads, &vm.shared.stop, deadline);
    let _ = vm.nics.stop_rx.write(1);
    for h in vm.nics.rx_threads {
        let _ = h.join();
    }
    let _ = vm.disks.stop.write(1);
    close_disks(vm.disks.disks, deadline);
    for (network, port) in &vm.nics.netd_ports {
        if let Err(e) = crate::netd_client::del_port(&cfg.netd_control, network, port) {
            tracing::warn!(port = %port, error = %crate::error_chain(&e), "netd port removal failed");
        }
    }
    let _ = vm.serial.lock().map(|mut s| {
        let out = s.writer_mut();
        let _ = std::io::Write::flush(out);
        tracing::info!(
            serial_dropped = out.dropped().load(std::sync::atomic::Ordering::Relaxed),
            "console closing"
        );
    });
}

/// Waits for each disk's I/O thread, logs the disk's counters and flushes and
/// disconnects its NBD export. A disk still busy in a stuck request at `deadline`
/// (a server that stopped answering, or a reconnect under way) is left as it is.
fn close_disks(disks: Vec<(BlockDev, Session, JoinHandle<()>)>, deadline: Instant) {
    for (i, (t, session, h)) in disks.into_iter().enumerate() {
        while !h.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        }
        let mut s = loop {
            match session.try_lock() {
                Ok(s) => break Some(s),
                Err(TryLockError::Poisoned(e)) => break Some(e.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(TryLockError::WouldBlock) => break None,
            }
        };
        let Some(s) = s.as_mut() else {
            tracing::warn!(disk = i, "disk busy in a stuck request; not flushed");
            continue;
        };
        {
            let g = t.lock().unwrap_or_else(|e| e.into_inner());
            let c = g.device().counters();
            let stats = s.stats();
            tracing::info!(
                disk = i,
                completed = Counters::get(&c.completed),
                io_errors = Counters::get(&c.io_errors),
                bad_chains = Counters::get(&c.bad_chains),
                refused_mmio = Counters::get(&c.refused_mmio),
                reconnects = stats.reconnects,
                short_reads = stats.short_reads,
                "disk closing"
            );
        }
        if let Err(e) = s.close() {
            tracing::warn!(disk = i, error = %crate::error_chain(&e), "NBD close failed");
        }
    }
}

/// Tells KVM where each region of guest RAM is mapped in this process.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    set_memory_flags(vm, mem, 0)
}

/// (Re-)registers guest RAM with these `flags` (0, or KVM_MEM_LOG_DIRTY_PAGES to
/// turn dirty logging on for a migration).
fn set_memory_flags(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), VmmError> {
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
            flags,
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
