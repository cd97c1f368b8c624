//! The DHCP server of a network (RFC 2131, options RFC 2132), as an in-process
//! service port of the switch.
//!
//! Theory of operation. [`DhcpMessage::parse`] (`message.rs`) turns the UDP payload
//! into a checked struct or refuses it; [`DhcpServer::handle_frame`] (`server.rs`)
//! takes a whole Ethernet frame from the switch and returns the frame to send back (a
//! reply, an ARP answer for the server's own address, or nothing). It is pure logic
//! over a [`LeaseDb`] (`leases.rs`) and a clock value, so unit tests drive it without
//! sockets; [`run`] wires it to a [`crate::switch::ServicePort`].
//!
//! Allocation (see `server.rs`) prefers a client's reservation, then its old address,
//! then the one it asks for, then the lowest free one; offers, leases and declines are
//! each bounded by [`MAX_CLIENTS`]. ACKed leases are written to
//! `leases-<network>.json` under the state directory atomically before the ACK
//! leaves (by a writer thread, in groups: see `server.rs`), so a lease a client
//! heard about survives a crash or restart of netd. Messages are trusted only for
//! the MAC that sent them (see `server.rs`).

mod leases;
mod message;
mod server;

pub use self::leases::{Lease, LeaseDb, LeaseError};
pub use self::message::{opt, DhcpMessage, MsgType, ParseError, MAX_OPTIONS};
pub use self::server::{
    run, unix_now, DhcpServer, LeaseWriter, Routed, SharedStats, DECLINE_HOLD_SECS, MAX_CLIENTS,
    OFFER_HOLD_SECS,
};
