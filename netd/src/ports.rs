//! Port kinds: how frames get in and out of a [`Network`].
//!
//! Theory of operation. Every port kind is a [`PortTx`] (the switch calls it to send
//! a frame) plus a receive thread that reads frames and calls
//! [`Network::ingress`]. All fds are non-blocking: the receive thread reads until
//! `EAGAIN`, and only then waits in `poll(2)` on the fd and the port's stop eventfd.
//! Under load that is one `read` per frame and no `poll`; idle it sleeps in `poll`.
//! Transmit is one `write` per frame on the caller's thread (the receive thread of
//! the ingress port), so a frame crosses netd with one read, one write and no copy
//! in userspace besides the kernel's. Frames carry a virtio-net header between
//! fd-based ports; ports without one get frames finished in software.
//!
//! One exception: the only guest port (`tap` or `vm`) of a NAT network has no
//! receive thread. Its fd goes to the NAT router as an [`InlineReader`], and the
//! router reads it on its own thread: a frame for the router then crosses no thread
//! and no channel, and is handed over in the buffer it was read into. If the device
//! goes away there, the port gets its receive thread after all (which reopens it).
//!
//! - `tap`: netd opens the TAP queue (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, with checksum
//!   and TCP segmentation offload accepted: see [`crate::offload`]). With `netns` the
//!   TAP is created by a short-lived thread that entered the namespace, so the
//!   kernel side lives there from the start; the fd keeps working from netd's
//!   namespace.
//! - `host`: the hostonly network's own TAP in netd's namespace, given the gateway
//!   address. netd never enables forwarding: the host is an end, not a router.
//! - `vm`: a VMM holds the TAP queue. netd creates the TAP (persistent) if missing,
//!   brings its kernel side up and moves frames through an AF_PACKET socket bound to
//!   it (PACKET_IGNORE_OUTGOING so netd does not read back its own frames;
//!   PACKET_VNET_HDR so offloaded frames keep their metadata). When the
//!   VMM goes away the TAP stays, sends count as `drop_down`, and traffic resumes
//!   when a VMM attaches again; if the TAP itself disappears the thread recreates it.
//! - `stream`: a unix socket netd listens on, QEMU `-netdev stream` framing (4-byte
//!   big-endian length, then the frame). One peer at a time; after it leaves, the
//!   next connection is accepted. A length above the maximum frame size is a
//!   protocol violation: that connection is closed and counted, netd carries on.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{PortKind, PortSpec};
use crate::offload::{VnetHdr, VNET_HDR_LEN};
use crate::switch::{Network, Port, PortTx, SwitchError, TxError};
use crate::sys;

/// Largest frame any port reads: a 65535-byte IP packet plus Ethernet and VLAN
/// headers. Anything larger is truncated by the kernel and then dropped by MTU.
pub const MAX_FRAME: usize = 65535 + 18;

/// Port setup errors.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// cannot set up TAP {ifname}
    #[error("cannot set up TAP {ifname}")]
    Tap {
        /// TAP name.
        ifname: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// cannot enter network namespace {netns}
    #[error("cannot enter network namespace {netns}")]
    Netns {
        /// Namespace.
        netns: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// cannot open AF_PACKET socket on {ifname}
    #[error("cannot open AF_PACKET socket on {ifname}")]
    Packet {
        /// TAP name.
        ifname: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// cannot listen on unix socket {path}
    #[error("cannot listen on unix socket {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// cannot attach the port to the switch
    #[error("cannot attach the port to the switch")]
    Switch(#[source] SwitchError),
    /// cannot start the port thread
    #[error("cannot start the port thread")]
    Thread(#[source] io::Error),
}

/// Tells a port thread to stop: a flag plus an eventfd that wakes its `poll`.
struct Stop {
    flag: AtomicBool,
    efd: OwnedFd,
}

impl Stop {
    fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Stop {
            flag: AtomicBool::new(false),
            efd: sys::eventfd()?,
        }))
    }
    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        sys::eventfd_signal(self.efd.as_raw_fd());
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// What to undo when the port goes away.
#[derive(Debug, Clone)]
enum Cleanup {
    /// Nothing (the fd's close does it, or the TAP is to be kept).
    None,
    /// Delete the persistent TAP netd created for a `vm` port.
    DeleteTap(String),
    /// Remove the stream socket file.
    RemoveSocket(PathBuf),
}

/// A started port: its switch entry, its thread, what to clean up.
pub struct RunningPort {
    /// The spec it was started from.
    pub spec: PortSpec,
    /// Kind name for display.
    pub kind: &'static str,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
    /// For a port read by another thread's loop ([`InlineReader`]): disconnected
    /// once that loop has let go of the port's fd.
    done: Option<std::sync::mpsc::Receiver<()>>,
    cleanup: Cleanup,
    network: Arc<Network>,
}

impl RunningPort {
    /// Stops the thread, detaches from the switch, removes what netd created.
    pub fn shutdown(mut self) {
        self.stop.set();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(done) = self.done.take() {
            // The reading loop wakes on the stop eventfd and drops the reader; a
            // loop that has ended already dropped it too.
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                done.recv_timeout(Duration::from_secs(5))
            {
                tracing::warn!(port = %self.spec.name, "port reader did not stop in 5 s");
            }
        }
        let _ = self.network.remove_port(&self.spec.name);
        match &self.cleanup {
            Cleanup::None => {}
            Cleanup::DeleteTap(ifname) => delete_persistent_tap(ifname),
            Cleanup::RemoveSocket(p) => {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Deletes a persistent TAP: clears its persist flag through a fresh queue (closing
/// that queue then removes it); if a VMM still holds it, falls back to
/// `ip link delete`.
fn delete_persistent_tap(ifname: &str) {
    match sys::tap_open(ifname, false).and_then(|fd| sys::tap_set_persist(&fd, false)) {
        Ok(()) => tracing::info!(ifname, "deleted TAP"),
        Err(e) => {
            tracing::debug!(ifname, error = %e, "TAP busy, deleting with ip link");
            let ok = std::process::Command::new("ip")
                .args(["link", "delete", ifname])
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                tracing::warn!(ifname, "could not delete TAP");
            }
        }
    }
}

fn classify(e: io::Error) -> TxError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => TxError::Full,
        Some(libc::ENETDOWN) | Some(libc::EIO) | Some(libc::ENXIO) | Some(libc::EBADFD) => {
            TxError::Down
        }
        _ => TxError::Io(e),
    }
}

/// Transmit on a fd whose every write is one frame preceded by a virtio-net
/// header (TAP with IFF_VNET_HDR, AF_PACKET with PACKET_VNET_HDR). The fd can be
/// replaced when a `vm` port's TAP is recreated.
struct FdTx(Arc<RwLock<Option<Arc<OwnedFd>>>>);

impl PortTx for FdTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.send_vnet(&[0; VNET_HDR_LEN], frame)
    }

    fn vnet(&self) -> bool {
        true
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), TxError> {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        let fd = guard.as_ref().ok_or(TxError::Down)?;
        match sys::writev2(fd.as_raw_fd(), hdr, frame) {
            Ok(_) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }
}

/// Size of the receive buffer of fd-based ports: a vnet header and a frame.
const RX_BUF: usize = VNET_HDR_LEN + MAX_FRAME;

/// Reads frames (each after its virtio-net header) from `fd` into the switch until
/// stopped or a hard error.
fn rx_loop(net: &Network, port: &Port, fd: RawFd, stop: &Stop, buf: &mut [u8]) -> io::Result<()> {
    loop {
        if stop.is_set() {
            return Ok(());
        }
        match sys::read(fd, buf) {
            Ok(0) => {
                // A TAP never returns 0; treat it as "nothing now".
                if sys::poll2(fd, stop.efd.as_raw_fd(), 100)? {
                    return Ok(());
                }
            }
            Ok(n) => {
                let got = buf.get(..n).unwrap_or_default();
                match (VnetHdr::parse(got), got.get(VNET_HDR_LEN..)) {
                    (Some(h), Some(frame)) if h.is_plain() => net.ingress(port, frame),
                    (Some(h), Some(frame)) => net.ingress_vnet(port, &h, frame),
                    // Shorter than a header: counted as malformed by the switch.
                    _ => net.ingress(port, &[]),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if sys::poll2(fd, stop.efd.as_raw_fd(), -1)? {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Creates (or attaches to) TAP `ifname` and configures its kernel side, in the
/// namespace `netns` if given. Returns the queue fd.
fn open_tap(spec: &PortSpec, ifname: &str, mtu: u32) -> Result<OwnedFd, PortError> {
    let mac = spec.mac;
    let configure = move |name: &str| -> io::Result<()> {
        if let Some(m) = mac {
            sys::if_set_mac(name, m)?;
        }
        sys::if_set_mtu(name, mtu)?;
        sys::if_up(name)
    };
    let tap_err = |source| PortError::Tap {
        ifname: ifname.to_string(),
        source,
    };
    let Some(ns) = &spec.netns else {
        let fd = sys::tap_open(ifname, true).map_err(tap_err)?;
        if spec.persistent {
            sys::tap_set_persist(&fd, true).map_err(tap_err)?;
        }
        configure(ifname).map_err(tap_err)?;
        return Ok(fd);
    };
    let netns_err = |source| PortError::Netns {
        netns: ns.clone(),
        source,
    };
    // The queue is opened in netd's own namespace (under a temporary name) and the
    // device then moved and renamed into the target: a TAP queue pins the namespace
    // it was opened in, and this way that is netd's, so deleting the target
    // namespace deletes the TAP (netd sees it and waits for the namespace to come
    // back) instead of keeping a dead namespace alive.
    let nsfile = sys::open_netns(ns).map_err(netns_err)?;
    let tmp = temp_ifname();
    let fd = sys::tap_open(&tmp, true).map_err(tap_err)?;
    let index = sys::if_index(&tmp).map_err(tap_err)?;
    sys::link_move_rename(index, &nsfile, ifname).map_err(tap_err)?;
    if spec.persistent {
        sys::tap_set_persist(&fd, true).map_err(tap_err)?;
    }
    let ns2 = ns.clone();
    let name = ifname.to_string();
    let h = std::thread::Builder::new()
        .name("netns-setup".into())
        .spawn(move || -> Result<io::Result<()>, io::Error> {
            sys::enter_netns(&ns2)?;
            Ok(configure(&name))
        })
        .map_err(PortError::Thread)?;
    match h.join() {
        Ok(Ok(r)) => r.map_err(tap_err)?,
        Ok(Err(source)) => return Err(netns_err(source)),
        Err(_) => {
            return Err(PortError::Thread(io::Error::other(
                "namespace setup thread panicked",
            )))
        }
    }
    Ok(fd)
}

/// A short interface name unique in this process, for a TAP before it is moved.
fn temp_ifname() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("ndt{:x}.{:x}", std::process::id() & 0xffff, n & 0xffff)
}

fn spawn_thread(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, PortError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(PortError::Thread)
}

/// Starts a port of `spec` on `net`.
pub fn start_port(net: &Arc<Network>, spec: &PortSpec) -> Result<RunningPort, PortError> {
    start_port_with(net, spec, None)
}

/// Hands an [`InlineReader`] to the loop that will read it; gives it back if that
/// loop cannot take it (the port then gets a receive thread of its own).
pub type GiveReader<'a> = &'a mut dyn FnMut(InlineReader) -> Result<(), InlineReader>;

/// Like [`start_port`]; with `inline`, a `tap` or `vm` port gets no receive thread:
/// its fd is handed (as an [`InlineReader`]) to the loop of the service port given,
/// the NAT router, which reads it on its own thread. Other kinds ignore `inline`.
pub fn start_port_with(
    net: &Arc<Network>,
    spec: &PortSpec,
    inline: Option<(Arc<Port>, GiveReader<'_>)>,
) -> Result<RunningPort, PortError> {
    match spec.kind {
        PortKind::Tap => {
            let ifname = spec.ifname.clone().unwrap_or_default();
            let mtu = net.mtu() as u32;
            let fd = open_tap(spec, &ifname, mtu)?;
            // If the TAP goes away (its namespace was deleted), make it again once
            // the namespace is back.
            let spec2 = spec.clone();
            let reopen = move || {
                open_tap(&spec2, &ifname, mtu).map_err(|e| io::Error::other(crate::error_chain(&e)))
            };
            start_reopening_port(
                net,
                spec,
                "tap",
                fd,
                Box::new(reopen),
                Cleanup::None,
                inline,
            )
        }
        PortKind::Vm => start_vm_port(net, spec, inline),
        PortKind::Stream => start_stream_port(net, spec),
    }
}

/// Starts the host TAP of a hostonly network: kernel side in netd's namespace,
/// with `addr`/`mask`.
pub fn start_host_port(
    net: &Arc<Network>,
    ifname: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> Result<RunningPort, PortError> {
    let spec = PortSpec {
        name: ifname.to_string(),
        kind: PortKind::Tap,
        ifname: Some(ifname.to_string()),
        mac: None,
        netns: None,
        path: None,
        persistent: false,
    };
    let fd = open_tap(&spec, ifname, net.mtu() as u32)?;
    sys::if_set_ipv4(ifname, addr, mask).map_err(|source| PortError::Tap {
        ifname: ifname.to_string(),
        source,
    })?;
    start_fd_port(net, &spec, "host", fd, Cleanup::None)
}

/// Starts a port on an fd whose every read and write is one frame (the `bridged`
/// mode's uplink uses it with an AF_PACKET socket); nothing to clean up after.
pub fn start_fd_port_pub(
    net: &Arc<Network>,
    spec: &PortSpec,
    kind: &'static str,
    fd: OwnedFd,
) -> Result<RunningPort, PortError> {
    start_fd_port(net, spec, kind, fd, Cleanup::None)
}

fn start_fd_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    kind: &'static str,
    fd: OwnedFd,
    cleanup: Cleanup,
) -> Result<RunningPort, PortError> {
    let fd = Arc::new(fd);
    let slot = Arc::new(RwLock::new(Some(fd.clone())));
    let port = net
        .add_port(&spec.name, kind, Box::new(FdTx(slot)))
        .map_err(PortError::Switch)?;
    let stop = Stop::new().map_err(PortError::Thread)?;
    let (n2, s2) = (net.clone(), stop.clone());
    let name = spec.name.clone();
    let thread = spawn_thread(format!("rx-{}", spec.name), move || {
        let mut buf = vec![0u8; RX_BUF];
        if let Err(e) = rx_loop(&n2, &port, fd.as_raw_fd(), &s2, &mut buf) {
            tracing::warn!(port = %name, error = %e, "port receive stopped");
        }
    });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            let _ = net.remove_port(&spec.name);
            return Err(e);
        }
    };
    Ok(RunningPort {
        spec: spec.clone(),
        kind,
        stop,
        thread: Some(thread),
        done: None,
        cleanup,
        network: net.clone(),
    })
}

/// Makes sure the persistent TAP `ifname` exists and is up; returns whether netd
/// created it now.
fn ensure_vm_tap(ifname: &str, mtu: u32) -> io::Result<bool> {
    let created = if sys::if_exists(ifname) {
        false
    } else {
        let fd = sys::tap_open(ifname, false)?;
        sys::tap_set_persist(&fd, true)?;
        true
    };
    if created {
        sys::if_set_mtu(ifname, mtu)?;
    }
    sys::if_disable_ipv6(ifname);
    sys::if_up(ifname)?;
    Ok(created)
}

/// Reopens a port's fd after its device went away.
type Reopen = Box<dyn Fn() -> io::Result<OwnedFd> + Send>;

fn start_vm_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    inline: Option<(Arc<Port>, GiveReader<'_>)>,
) -> Result<RunningPort, PortError> {
    let ifname = spec.ifname.clone().unwrap_or_default();
    let mtu = net.mtu() as u32;
    let created = ensure_vm_tap(&ifname, mtu).map_err(|source| PortError::Tap {
        ifname: ifname.clone(),
        source,
    })?;
    let open = |ifname: &str| -> io::Result<OwnedFd> { sys::packet_socket(sys::if_index(ifname)?) };
    let fd = open(&ifname).map_err(|source| PortError::Packet {
        ifname: ifname.clone(),
        source,
    })?;
    let cleanup = if created && !spec.persistent {
        Cleanup::DeleteTap(ifname.clone())
    } else {
        Cleanup::None
    };
    let reopen = move || ensure_vm_tap(&ifname, mtu).and_then(|_| open(&ifname));
    start_reopening_port(net, spec, "vm", fd, Box::new(reopen), cleanup, inline)
}

/// Starts a port on a vnet-header fd whose device may disappear: when reading fails
/// for good, the thread retries `reopen` every half second until it succeeds (or the
/// port is stopped), and carries on with the new fd. Meanwhile sends count as
/// `drop_down`. With `inline`, the fd is first offered to another loop as an
/// [`InlineReader`]; the thread only starts if that loop declines it or, later, when
/// a read fails for good there.
fn start_reopening_port(
    net: &Arc<Network>,
    spec: &PortSpec,
    kind: &'static str,
    fd: OwnedFd,
    reopen: Reopen,
    cleanup: Cleanup,
    inline: Option<(Arc<Port>, GiveReader<'_>)>,
) -> Result<RunningPort, PortError> {
    let fd = Arc::new(fd);
    let slot = Arc::new(RwLock::new(Some(fd.clone())));
    let port = net
        .add_port(&spec.name, kind, Box::new(FdTx(slot.clone())))
        .map_err(PortError::Switch)?;
    let stop = Stop::new().map_err(PortError::Thread)?;
    let reader = ReopeningReader {
        net: net.clone(),
        port,
        slot,
        stop: stop.clone(),
        reopen,
        name: spec.name.clone(),
    };
    let running = |thread, done| RunningPort {
        spec: spec.clone(),
        kind,
        stop: stop.clone(),
        thread,
        done,
        cleanup: cleanup.clone(),
        network: net.clone(),
    };
    if let Some((local, give)) = inline {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let r = InlineReader {
            fd,
            local,
            inner: reader,
            done: done_tx,
        };
        match give(r) {
            Ok(()) => return Ok(running(None, Some(done_rx))),
            Err(r) => {
                tracing::debug!(port = %spec.name, "no inline reader; port thread instead");
                return match r.fall_back() {
                    Ok(()) => Ok(running(None, Some(done_rx))),
                    Err(e) => {
                        let _ = net.remove_port(&spec.name);
                        Err(e)
                    }
                };
            }
        }
    }
    match reader.spawn(None) {
        Ok(t) => Ok(running(Some(t), None)),
        Err(e) => {
            let _ = net.remove_port(&spec.name);
            Err(e)
        }
    }
}

/// What the receive thread of a reopening port works with.
struct ReopeningReader {
    net: Arc<Network>,
    port: Arc<Port>,
    slot: Arc<RwLock<Option<Arc<OwnedFd>>>>,
    stop: Arc<Stop>,
    reopen: Reopen,
    name: String,
}

impl ReopeningReader {
    /// Starts the receive thread; `done` is dropped when it ends.
    fn spawn(self, done: Option<std::sync::mpsc::Sender<()>>) -> Result<JoinHandle<()>, PortError> {
        spawn_thread(format!("rx-{}", self.name), move || {
            let _done = done;
            self.run();
        })
    }

    fn run(self) {
        let ReopeningReader {
            net,
            port,
            slot,
            stop,
            reopen,
            name,
        } = self;
        let mut buf = vec![0u8; RX_BUF];
        while !stop.is_set() {
            let cur = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(fd) = cur {
                match rx_loop(&net, &port, fd.as_raw_fd(), &stop, &mut buf) {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::info!(port = %name, error = %e, "port lost its device; will reopen")
                    }
                }
            }
            *slot.write().unwrap_or_else(|e| e.into_inner()) = None;
            // Wait a little (stoppably), then try again.
            if let Ok(d) = sys::eventfd() {
                if sys::poll2(d.as_raw_fd(), stop.efd.as_raw_fd(), 500).unwrap_or(true) {
                    return;
                }
            }
            match reopen() {
                Ok(fd) => {
                    tracing::info!(port = %name, "port reopened");
                    *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fd));
                }
                Err(e) => tracing::debug!(port = %name, error = %e, "device not back yet"),
            }
        }
    }
}

/// A `tap` or `vm` port read by the event loop of a service on the same network
/// (the NAT router's thread) instead of a receive thread of its own: with one guest
/// behind a router, every frame the guest sends is read on the thread that handles
/// it, so it crosses no thread and no channel, and a frame for that service is
/// handed over in the buffer it was read into (no copy).
///
/// The loop registers [`InlineReader::fd`] and [`InlineReader::stop_fd`] with its
/// reactor, calls [`InlineReader::read`] while the fd is readable and hands each
/// frame to [`InlineReader::switch`]. When a read fails for good (the TAP went
/// away), [`InlineReader::fall_back`] gives the port a receive thread, which reopens
/// the device as for any port. Dropping the reader (the port was stopped, or the
/// loop ended) lets [`RunningPort::shutdown`] go on.
pub struct InlineReader {
    fd: Arc<OwnedFd>,
    local: Arc<Port>,
    inner: ReopeningReader,
    done: std::sync::mpsc::Sender<()>,
}

/// Most bytes one [`InlineReader::read`] takes: a virtio-net header and a frame.
pub const INLINE_READ_MAX: usize = RX_BUF;

/// A shared descriptor, for registering with a reactor.
pub struct SharedFd(Arc<OwnedFd>);

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The stop eventfd of an inline port, for registering with a reactor.
pub struct StopFd(Arc<Stop>);

impl AsRawFd for StopFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.efd.as_raw_fd()
    }
}

impl InlineReader {
    /// The port's fd (non-blocking; each read is a virtio-net header and a frame).
    pub fn fd(&self) -> SharedFd {
        SharedFd(self.fd.clone())
    }

    /// Readable once the port is to stop (see [`InlineReader::stopped`]).
    pub fn stop_fd(&self) -> StopFd {
        StopFd(self.inner.stop.clone())
    }

    /// Whether the port is being removed: drop the reader.
    pub fn stopped(&self) -> bool {
        self.inner.stop.is_set()
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Reads one message (virtio-net header, then the frame) appended to `buf`;
    /// returns its length. `WouldBlock` when there is none now.
    pub fn read(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        sys::read_append(self.fd.as_raw_fd(), buf, RX_BUF)
    }

    /// Switches one message read by [`InlineReader::read`]; `true` when it is for the
    /// reading service itself (counted as delivered to it; the caller takes it as
    /// is), `false` when it was switched elsewhere or dropped.
    pub fn switch(&self, msg: &[u8]) -> bool {
        let (net, port) = (&self.inner.net, &self.inner.port);
        match (VnetHdr::parse(msg), msg.get(VNET_HDR_LEN..)) {
            (Some(h), Some(frame)) => {
                let hdr = (!h.is_plain()).then_some(&h);
                net.ingress_local(port, frame, hdr, &self.local)
            }
            // Shorter than a header: counted as malformed by the switch.
            _ => {
                net.ingress(port, &[]);
                false
            }
        }
    }

    /// Gives the port a receive thread of its own (after a hard read error here, or
    /// when no loop takes the reader); that thread reopens the device if it is gone.
    pub fn fall_back(self) -> Result<(), PortError> {
        let InlineReader { inner, done, .. } = self;
        inner.spawn(Some(done)).map(|_| ())
    }
}

/// The current stream peer, with a reusable buffer for length + frame.
struct StreamConn {
    stream: UnixStream,
    buf: Vec<u8>,
}

struct StreamTx(Arc<Mutex<Option<StreamConn>>>);

impl PortTx for StreamTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let conn = guard.as_mut().ok_or(TxError::Down)?;
        let len = u32::try_from(frame.len())
            .map_err(|_| TxError::Io(io::ErrorKind::InvalidInput.into()))?;
        conn.buf.clear();
        conn.buf.extend_from_slice(&len.to_be_bytes());
        conn.buf.extend_from_slice(frame);
        if let Err(e) = conn.stream.write_all(&conn.buf) {
            // A partial write would desynchronise the framing: drop this peer.
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            *guard = None;
            return Err(TxError::Io(e));
        }
        Ok(())
    }
}

fn start_stream_port(net: &Arc<Network>, spec: &PortSpec) -> Result<RunningPort, PortError> {
    let path = spec.path.clone().unwrap_or_default();
    let listen_err = |source| PortError::Listen {
        path: path.clone(),
        source,
    };
    // A socket file left by an earlier run is stale: nobody can listen on it now.
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let conn: Arc<Mutex<Option<StreamConn>>> = Arc::new(Mutex::new(None));
    let port = net
        .add_port(&spec.name, "stream", Box::new(StreamTx(conn.clone())))
        .map_err(PortError::Switch)?;
    let stop = Stop::new().map_err(PortError::Thread)?;
    let (n2, s2) = (net.clone(), stop.clone());
    let name = spec.name.clone();
    let thread = spawn_thread(format!("st-{}", spec.name), move || {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    tracing::info!(port = %name, "stream peer connected");
                    if let Err(e) = serve_stream(&n2, &port, stream, &conn, &s2, &mut buf) {
                        tracing::info!(port = %name, error = %e, "stream peer left");
                    }
                    *conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sys::poll2(listener.as_raw_fd(), s2.efd.as_raw_fd(), -1).unwrap_or(true) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(port = %name, error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if s2.is_set() {
                return;
            }
        }
    });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            let _ = net.remove_port(&spec.name);
            return Err(e);
        }
    };
    Ok(RunningPort {
        spec: spec.clone(),
        kind: "stream",
        stop,
        thread: Some(thread),
        done: None,
        cleanup: Cleanup::RemoveSocket(path),
        network: net.clone(),
    })
}

/// Reads exactly `buf.len()` bytes, waking up to check `stop`. Ok(false) on a
/// clean EOF before the first byte.
fn read_full(stream: &mut UnixStream, buf: &mut [u8], stop: &Stop) -> io::Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        if stop.is_set() {
            return Err(io::Error::other("port stopped"));
        }
        // The socket is blocking (its writer shares the file description), so
        // wait for readability first to stay stoppable.
        let (ready, woke) = sys::poll2_ready(stream.as_raw_fd(), stop.efd.as_raw_fd(), 1000)?;
        if woke {
            return Err(io::Error::other("port stopped"));
        }
        if !ready {
            continue;
        }
        match stream.read(buf.get_mut(off..).unwrap_or_default()) {
            Ok(0) if off == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn serve_stream(
    net: &Network,
    port: &Port,
    stream: UnixStream,
    conn: &Mutex<Option<StreamConn>>,
    stop: &Stop,
    buf: &mut [u8],
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // Writes happen on other ports' threads: never let a stuck peer hold them long.
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = stream.try_clone()?;
    *conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(StreamConn {
        stream,
        buf: Vec::with_capacity(MAX_FRAME + 4),
    });
    loop {
        let mut hdr = [0u8; 4];
        if !read_full(&mut reader, &mut hdr, stop)? {
            return Ok(());
        }
        let len = u32::from_be_bytes(hdr) as usize;
        if len > MAX_FRAME {
            port.counters
                .drop_malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame length {len} above {MAX_FRAME}"),
            ));
        }
        let frame = buf.get_mut(..len).unwrap_or_default();
        if !read_full(&mut reader, frame, stop)? && len > 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        net.ingress(port, frame);
    }
}
