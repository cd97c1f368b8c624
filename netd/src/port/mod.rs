//! Port kinds: how frames get in and out of a [`Network`].
//!
//! Theory of operation. Every port kind is a [`PortTx`](crate::switch::PortTx) (the switch calls it to send
//! a frame) plus a receive thread that reads frames and calls
//! [`Network::ingress`]. All fds are non-blocking: the receive thread reads until
//! `EAGAIN`, and only then waits in `poll(2)` on the fd and the port's stop eventfd.
//! Under load that is one `read` per frame and no `poll`; idle it sleeps in `poll`.
//! Transmit never blocks the caller (the receive thread of the ingress port, which
//! holds the network's port list): on fd-based ports it is one non-blocking `write`
//! per frame, so a frame crosses netd with one read, one write and no copy in
//! userspace besides the kernel's, and the kernel's queue of that device is the
//! port's own bound (full: `drop_full`). A `stream` port's peer is a program that
//! may not read, so its frames go into a queue of its own, bounded in bytes, that a
//! writer thread drains; full, the frame is dropped and counted on that port only.
//! Frames carry a virtio-net header between fd-based ports; ports without one get
//! frames finished in software, within the bounds of [`crate::offload::check_gso`],
//! which every vnet port applies to what it reads (`drop_gso`).
//!
//! One exception: the only guest port (`tap` or `vm`) of a NAT network has no
//! receive thread. Its fd goes to the NAT router as an [`InlineReader`], and the
//! router reads it on its own thread: a frame for the router then crosses no thread
//! and no channel, and is handed over in the buffer it was read into. If the device
//! goes away there, the port gets its receive thread after all (which reopens it).
//!
//! The kinds, one file each:
//!
//! - `tap` (`tap.rs`): netd opens the TAP queue (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR,
//!   with checksum and TCP segmentation offload accepted: see [`crate::offload`]).
//!   With `netns` the queue is opened in netd's namespace and the device then moved
//!   and renamed into the target, so that deleting the namespace deletes the TAP
//!   (the port reopens it once the namespace is back) instead of netd keeping a dead
//!   namespace alive.
//! - `host` (`tap.rs`): the hostonly network's own TAP in netd's namespace, given the
//!   gateway address and forwarding off on it (IPv4 and IPv6, for that interface):
//!   the host is an end, not a router, even where `ip_forward = 1`.
//! - `vm` (`vm.rs`): a VMM holds the TAP queue. netd creates the TAP (persistent) if
//!   missing, brings its kernel side up and moves frames through an AF_PACKET socket
//!   bound to it (PACKET_IGNORE_OUTGOING so netd does not read back its own frames;
//!   PACKET_VNET_HDR so offloaded frames keep their metadata). When the VMM goes away
//!   the TAP stays, sends count as `drop_down`, and traffic resumes when a VMM
//!   attaches again; if the TAP itself disappears the thread recreates it.
//! - `stream` (`stream.rs`): a unix socket netd listens on, QEMU `-netdev stream`
//!   framing (4-byte big-endian length, then the frame). One peer at a time; after it
//!   leaves, the next connection is accepted. A length above [`MAX_FRAME`] is a
//!   protocol violation: that connection is closed and counted, netd carries on.
//!   netd never unlinks a path that is not a stale socket of its own.
//! - `uplink` (`uplink.rs`): a bridged network's host NIC, through a promiscuous
//!   AF_PACKET socket with virtio-net headers.
//! - `vxlan` (`vxlan.rs`): a VXLAN tunnel (RFC 7348) to remote VTEPs over UDP,
//!   learning which remote each MAC lives behind.
//!
//! # Files
//!
//! `common.rs` what every kind shares (stop signal, clean-up, the started port),
//! `fd.rs` ports on a vnet-header descriptor (transmit, receive loop, reopening),
//! `inline.rs` such a port read by another loop, and one file per kind: `tap.rs`
//! (with the hostonly `host` TAP), `vm.rs`, `stream.rs`, `uplink.rs`, `vxlan.rs`
//! (with its submodules); `sys.rs` holds
//! the uplink's one raw socket option.

mod common;
mod fd;
mod inline;
mod rxpool;
mod stream;
mod sys;
mod tap;
#[cfg(test)]
mod testing;
mod uplink;
mod vm;
pub mod vxlan;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub use self::common::{socket_id, RunningPort, SocketId};
pub use self::inline::{InlineReader, SharedFd, StopFd, INLINE_READ_MAX};
pub use self::stream::claim_socket_path;
pub use self::tap::start_host_port;
pub use self::uplink::start_uplink;
use crate::config::{PortKind, PortSpec};
use crate::switch::{Network, Port, SwitchError};

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
    /// cannot set up the VXLAN tunnel
    #[error("cannot set up the VXLAN tunnel")]
    Vxlan(#[source] vxlan::VxlanError),
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
        PortKind::Tap => tap::start_tap_port(net, spec, inline),
        PortKind::Vm => vm::start_vm_port(net, spec, inline),
        PortKind::Stream => stream::start_stream_port(net, spec),
        PortKind::Vxlan => vxlan::start_vxlan_port(net, spec),
    }
}
