//! The NAT router of a `mode = "nat"` network: a slirp-style userspace router.
//!
//! # Theory of operation
//!
//! The router is a port of the network's switch (a *service port*: two channels of
//! Ethernet frames). It owns a smoltcp interface in any-IP mode with the gateway and
//! DNS addresses (10.0.2.2 and 10.0.2.3 by default) and a default route through itself,
//! so it accepts IPv4 packets to *any* destination. Every flow a guest opens is
//! terminated here and re-originated from an ordinary host socket, owned by this one
//! task; there is no iptables, no `ip_forward` and no kernel NAT, and nothing beyond
//! the TAP needs privileges.
//!
//! - TCP (`tcp.rs`): a guest SYN starts a host `connect`; only when it succeeds does a
//!   smoltcp socket listen on the destination and receive the SYN, so a refused or
//!   unreachable destination answers the guest with a RST, as a real host would. Bytes
//!   are then copied between the smoltcp socket buffers and the host socket with no
//!   intermediate buffer. Large socket buffers give a scaled window.
//! - UDP (`udp.rs`) and ICMP echo (`icmp.rs`): flows of connected host sockets, built
//!   and parsed with smoltcp's wire types, with idle timeouts.
//! - DNS (`dns.rs`): a UDP query to the DNS address, port 53, for one of the
//!   network's names ([`crate::dns`]: guests' DHCP hostnames, static entries) is
//!   answered by the router itself; a TCP connection to it goes to the network's
//!   DNS-over-TCP front ([`crate::dns::tcp`]), which answers the same names; other
//!   flows to port 53 go to the host's resolver.
//! - The gateway address maps to the host's loopback (127.0.0.1), as in VirtualBox,
//!   only with `host_loopback`; without it (the default) only its DNS port is a flow.
//! - DHCP: the network's DHCP server is a port of its own, but its identifier is the
//!   gateway address (10.0.2.2, as in VirtualBox's NAT and QEMU's user networking),
//!   which the router owns: broadcasts reach the server on the switch, but a client's
//!   unicast renewal (RENEWING state, at T1) is addressed to the router's MAC. So UDP
//!   to port 67 of the router's own addresses goes to the server through a
//!   [`LocalService`] the daemon plugs in, never to the host's loopback, and the
//!   answer leaves from the router's MAC (the address the client sent to).
//! - IPv6 (`v6.rs`, `frame6.rs`): on a network with `subnet6` (every NAT network by
//!   default: `fd00::/64`, gateway `fd00::2`, DNS `fd00::3`) the router is the IPv6
//!   router too: it runs the network's RAs, NDP and stateless DHCPv6 and carries
//!   TCP, UDP and ICMPv6 echo flows through host sockets as for IPv4.
//! - Port forwards: a host listener (TCP) or socket (UDP) whose connections or
//!   datagrams the router originates to a guest address, from the gateway address.
//!   Nothing else from outside reaches a guest: host sockets are only ever connected
//!   by the router on a guest's behalf.
//!
//! # The loop
//!
//! In the daemon the router runs on a thread of its own with a single-threaded tokio
//! runtime ([`Router::spawn_thread`]): its host sockets are registered with that
//! thread's reactor, and its frames enter the switch on that thread
//! ([`ToSwitch::Offload`]), TCP ones as offloaded frames with a virtio-net header
//! (64 KiB super-frames, partial checksums; see `tcp.rs`, "Offload"). Tests and the
//! fuzz target feed it through plain channels instead.
//!
//! When the network has one guest port (`tap` or `vm`), the router also reads that
//! port itself ([`crate::port::InlineReader`]): the port's fd is registered with the
//! router's reactor, frames are read into a large buffer and switched on this thread
//! ([`crate::switch::Network::ingress_local`]); those for the router are split off
//! the buffer into the inbox with no copy (small ones are copied, so that a held SYN
//! never pins the buffer). Before, a receive thread read the frame, copied it into a
//! channel message and woke this thread: a copy and a thread hand-off per frame. The
//! guest's frames and the router's answers now share one thread (figures in
//! bench/README-nat.md).
//!
//! One task runs [`Router::run`]: wait until anything is ready (a frame, a control
//! request, a finished connect, a readable/writable host socket, a smoltcp timer),
//! then do one *step*: classify frames (`frame.rs`), feed smoltcp (ingress only), pump
//! the flows that have work with non-blocking reads and writes, let smoltcp emit, and
//! send the frames to the switch. A TCP flow has work when a frame for it came in,
//! its host socket woke its own waker (`wake.rs`), or its smoltcp timer is due; each
//! has a socket set of its own (`ring.rs`), so neither the router nor smoltcp looks
//! at idle flows (the cost of a step follows the traffic, not the flow count). smoltcp emits after the pumps so that its ACKs advertise
//! the window as it is once the batch went on to the host (it sends a separate
//! window update only when the window doubles). The wait registers interest only where progress is possible (a host socket
//! is polled for reading only while its smoltcp send buffer has room), which is the
//! back-pressure in both directions.
//!
//! # Bounds
//!
//! The flow table is bounded by count (`max_flows`) and by memory (`max_flow_memory`,
//! counting each TCP flow's two smoltcp buffers); a flow over the bound is refused (a
//! RST for TCP, a drop for UDP/ICMP) and counted. UDP and ICMP flows expire when idle;
//! TCP flows when closed, or after `tcp_idle_timeout` without traffic. Each guest
//! address has its own quota (`max_flows_per_guest`, `max_pending_per_guest` for
//! connects in progress), so one guest cannot take the table from the others: over
//! it, a RST for TCP and an ICMP unreachable for UDP.
//!
//! # Hostile guests
//!
//! Every packet is checked before smoltcp sees it (`frame.rs`, "Validation"): a
//! packet smoltcp would assert on never gets there. A flow's destination passes
//! `Router::map_dst` (`router.rs`): never 127.0.0.0/8 directly, the host itself only with
//! `host_loopback`, others through the outbound lists ([`outbound_allows`]). And if
//! a panic happens anyway, the thread's supervisor (`router.rs`, `supervise`)
//! restarts the router without its flows, logs the cause and counts it.
//!
//! # Files
//!
//! `config.rs` the settings and their checks, `router.rs` the router's state and its
//! loop, `supervise.rs` its restart after a panic, `v6.rs` its IPv6, `inline.rs` the
//! guest port it reads itself, `handle.rs` the control handle, and one file per
//! protocol (`tcp.rs`, `udp.rs`, `icmp.rs`, `dns.rs`); `frame.rs` classifies frames
//! (`frame6.rs` IPv6 ones), `device.rs` is smoltcp's view of the switch port.
//! `ring.rs` holds a TCP flow's smoltcp socket (a socket set and ring memory of its
//! own), `wake.rs` the per-flow wakers, `tcp_wire.rs` the TCP header work (offload,
//! segment keys, IPv4 and IPv6).

mod config;
mod device;
mod dns;
pub mod frame;
pub mod frame6;
mod handle;
mod icmp;
mod inline;
mod ring;
mod router;
mod supervise;
mod sys;
mod tcp;
mod tcp_wire;
mod udp;
mod v6;
mod wake;

use std::net::SocketAddr;

pub use self::config::{
    outbound_allows, outbound_allows6, parse_cidr, parse_cidr_any, parse_host_addr, prefix_match,
    show_cidr, Cidr, Forward, Limits, Outbound, Proto, RouterConfig, DEFAULT_DENY, DEFAULT_DENY6,
};
pub use self::handle::{FlowInfo, NatRequest, OutboundChange, PolicyList, RouterHandle, Stats};
use self::router::{free_forward_port, FWD_PORT_FIRST, INBOX_BATCH};
pub use self::router::{FrameFn, LocalService, OffloadFn, Router, ToSwitch, DHCP_SERVER_PORT};

/// Errors of the NAT router and its control requests.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// the router has stopped (its network was removed or the daemon is shutting down)
    #[error("the NAT router has stopped")]
    Stopped,
    /// a port forward on this host address and protocol already exists
    #[error("a {proto} forward on {host} already exists")]
    ForwardExists {
        /// Protocol.
        proto: Proto,
        /// Host address.
        host: SocketAddr,
    },
    /// no such port forward
    #[error("no {proto} forward on {host}")]
    NoSuchForward {
        /// Protocol.
        proto: Proto,
        /// Host address.
        host: SocketAddr,
    },
    /// the host address of a port forward cannot be bound
    #[error("cannot bind {proto} {host} for a port forward")]
    Bind {
        /// Protocol.
        proto: Proto,
        /// Host address.
        host: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// a port forward's guest address is outside the network's subnet
    #[error("forward guest address {guest} is not in the network's subnet {subnet}")]
    GuestOutsideSubnet {
        /// The guest address given.
        guest: std::net::SocketAddr,
        /// The subnet.
        subnet: String,
    },
    /// an invalid router setting
    #[error("invalid NAT setting {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What was expected.
        reason: String,
    },
}

#[cfg(test)]
mod tests;
