//! What every port kind shares: the stop signal of a port thread ([`Stop`]), what to
//! undo when a port goes away ([`Cleanup`]), the record of a started port
//! ([`RunningPort`]) and how its thread is started.
//!
//! A port's life: its switch entry is added first (so frames can flow as soon as
//! the thread runs), then its thread starts; if the thread cannot start, the switch
//! entry is taken out again ([`finish_start`]), so a failed start leaves nothing
//! behind. [`RunningPort::shutdown`] undoes it in the other order.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::vm::delete_persistent_tap;
use super::PortError;
use crate::config::PortSpec;
use crate::switch::{Network, Port, PortClass, PortTx};
use crate::sys;

/// Tells a port thread to stop: a flag plus an eventfd that wakes its `poll`.
pub(super) struct Stop {
    flag: AtomicBool,
    pub(super) efd: OwnedFd,
}

impl Stop {
    pub(super) fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Stop {
            flag: AtomicBool::new(false),
            efd: sys::eventfd()?,
        }))
    }
    pub(super) fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        sys::eventfd_signal(self.efd.as_raw_fd());
    }
    pub(super) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// What to undo when the port goes away.
#[derive(Debug, Clone)]
pub(super) enum Cleanup {
    /// Nothing (the fd's close does it, or the TAP is to be kept).
    None,
    /// Delete the persistent TAP netd created for a `vm` port.
    DeleteTap(String),
    /// Remove the stream socket file netd bound: only while the path still is that
    /// socket (same device and inode), so a file put there since is left alone.
    RemoveSocket(PathBuf, SocketId),
}

/// Device and inode of a socket file netd bound.
pub type SocketId = (u64, u64);

/// The [`SocketId`] of what is at `path` now, if it is a socket.
pub fn socket_id(path: &std::path::Path) -> Option<SocketId> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::symlink_metadata(path).ok()?;
    md.file_type().is_socket().then(|| (md.dev(), md.ino()))
}

/// A started port: its switch entry, its thread, what to clean up.
pub struct RunningPort {
    /// The spec it was started from.
    pub spec: PortSpec,
    /// What the port is (its switch entry has the same).
    pub kind: PortClass,
    pub(super) stop: Arc<Stop>,
    pub(super) thread: Option<JoinHandle<()>>,
    /// For a port read by another thread's loop ([`InlineReader`]): disconnected
    /// once that loop has let go of the port's fd.
    pub(super) done: Option<std::sync::mpsc::Receiver<()>>,
    pub(super) cleanup: Cleanup,
    pub(super) network: Arc<Network>,
    /// A `vxlan` port's tunnel (flood list, counters).
    pub tunnel: Option<Arc<super::vxlan::Tunnel>>,
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
            Cleanup::RemoveSocket(p, id) => {
                if socket_id(p) == Some(*id) {
                    let _ = std::fs::remove_file(p);
                } else {
                    tracing::warn!(path = %p.display(), "stream socket replaced by another file; left alone");
                }
            }
        }
    }
}

/// A TAP-backed port's interface name and the MTU its device gets (the
/// network's).
pub(super) fn tap_ifname_mtu(net: &Network, spec: &PortSpec) -> (String, u32) {
    (spec.ifname.clone().unwrap_or_default(), net.mtu() as u32)
}

pub(super) fn spawn_thread(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, PortError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(PortError::Thread)
}

/// The first step of every start: the port's stop signal, then its switch entry.
pub(super) fn attach(
    net: &Network,
    spec: &PortSpec,
    kind: PortClass,
    tx: Box<dyn PortTx>,
) -> Result<(Arc<Port>, Arc<Stop>), PortError> {
    let stop = Stop::new().map_err(PortError::Thread)?;
    let port = net
        .add_port_with(&spec.name, kind, tx, spec.guard, spec.mac)
        .map_err(PortError::Switch)?;
    Ok((port, stop))
}

/// What a port start produced: its receive thread, if it has one, and for a port
/// read by another thread's loop the channel that says that loop let go of it.
pub(super) type Started = (
    Option<JoinHandle<()>>,
    Option<std::sync::mpsc::Receiver<()>>,
);

/// The record of a port whose switch entry `spec.name` was added; if `started`
/// failed, that entry is taken out of the switch again and the error returned.
pub(super) fn finish_start(
    net: &Arc<Network>,
    spec: &PortSpec,
    kind: PortClass,
    stop: Arc<Stop>,
    started: Result<Started, PortError>,
    cleanup: Cleanup,
) -> Result<RunningPort, PortError> {
    match started {
        Ok((thread, done)) => Ok(RunningPort {
            spec: spec.clone(),
            kind,
            stop,
            thread,
            done,
            cleanup,
            network: net.clone(),
            tunnel: None,
        }),
        Err(e) => {
            let _ = net.remove_port(&spec.name);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{sink, spec};
    use super::*;
    use crate::config::PortKind;

    #[test]
    fn stop_wakes_a_waiting_thread() {
        let stop = Stop::new().unwrap();
        assert!(!stop.is_set());
        let s2 = stop.clone();
        let idle = sys::eventfd().unwrap();
        let t = std::thread::spawn(move || sys::poll2(idle.as_raw_fd(), s2.efd.as_raw_fd(), 5000));
        std::thread::sleep(Duration::from_millis(20));
        stop.set();
        assert!(t.join().unwrap().unwrap(), "woken by the stop eventfd");
        assert!(stop.is_set());
    }

    #[test]
    fn a_failed_start_takes_the_switch_entry_out_again() {
        let (net, _, _) = sink();
        let s = spec("p", PortKind::Tap);
        net.add_port("p", PortClass::Tap, Box::new(NoTx)).unwrap();
        let failed = Err(PortError::Thread(io::Error::other("no thread")));
        let r = finish_start(
            &net,
            &s,
            PortClass::Tap,
            Stop::new().unwrap(),
            failed,
            Cleanup::None,
        );
        assert!(matches!(r, Err(PortError::Thread(_))));
        assert!(net.port("p").is_none());

        // A started one keeps it, and shutdown removes it and its socket file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.sock");
        // The port "p", started with its socket file `file` (inode `id`) to remove.
        let started = |id| {
            net.add_port("p", PortClass::Tap, Box::new(NoTx)).unwrap();
            finish_start(
                &net,
                &s,
                PortClass::Tap,
                Stop::new().unwrap(),
                Ok((None, None)),
                Cleanup::RemoveSocket(file.clone(), id),
            )
            .unwrap()
        };
        drop(std::os::unix::net::UnixListener::bind(&file).unwrap());
        let id = socket_id(&file).unwrap();
        let rp = started(id);
        assert!(net.port("p").is_some());
        rp.shutdown();
        assert!(net.port("p").is_none());
        assert!(!file.exists());

        // Regression (issue 11, item 12): a file put where the socket was is not
        // netd's to remove.
        drop(std::os::unix::net::UnixListener::bind(&file).unwrap());
        let id = socket_id(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::fs::write(&file, b"precious").unwrap();
        assert_eq!(socket_id(&file), None);
        let rp = started(id);
        rp.shutdown();
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }

    struct NoTx;
    impl crate::switch::PortTx for NoTx {
        fn send(&self, _: &[u8]) -> Result<(), crate::switch::TxError> {
            Ok(())
        }
    }
}
