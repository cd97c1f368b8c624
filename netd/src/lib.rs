//! netd: virtual networks for lab hosts.
//!
//! Each configured network is a learning L2 switch ([`switch`]) with ports of
//! several kinds ([`port`]: TAP queues netd holds, TAPs a VMM holds reached through
//! AF_PACKET, QEMU `-netdev stream` unix sockets) and in-process services attached
//! as ports (the DHCP server, [`dhcp`]). [`daemon`] owns the running networks and
//! serves the JSON control API (its types and client are in the `fabric-api`
//! crate, shared with stord and vmm-shim); [`config`] reads and validates the TOML
//! file.
//!
//! Data path: one thread per fd-based port reads a frame and switches it on that
//! thread, writing it straight to the destination port's fd. Services talk to the
//! switch through bounded tokio channels.

pub mod budget;
pub mod capture;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dhcp;
pub mod dns;
pub mod ipv6;
pub mod modes;
pub mod nat;
pub mod offload;
pub mod pcapng;
pub mod port;
pub mod switch;
pub mod sys;
#[cfg(test)]
mod test_util;
pub mod wire;

pub use fabric_util::error_chain;
