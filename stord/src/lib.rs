//! stord: an NBD block service.
//!
//! A lab host runs `stord serve --config FILE`; every disk of its catalog is an
//! NBD export (fixed newstyle, structured replies, `base:allocation`, multi-conn)
//! over TCP and/or a unix socket, one host file per disk. A JSON control socket
//! creates, lists, resizes and deletes disks; the same binary is its CLI.
//!
//! Modules, from the wire up:
//! - [`wire`]: NBD message parse / emit, pure functions (fuzzed);
//! - [`disk`]: one host file as a disk (fixed / dynamic), blocking I/O;
//! - [`catalog`]: the set of disks, persisted atomically;
//! - [`nbd`]: one connection, handshake and concurrent transmission;
//! - [`control`]: the JSON control API's server side (its types and client are
//!   in the `fabric-api` crate, shared with netd);
//! - [`server`]: listeners, limits, systemd, signals, shutdown;
//! - [`config`]: the strict TOML configuration;
//! - [`sys`]: the few raw Linux calls (all `unsafe` lives there).

pub mod catalog;
pub mod config;
pub mod control;
pub mod disk;
pub mod nbd;
pub mod poll;
pub mod server;
pub mod sys;
pub mod wire;

pub use fabric_util::error_chain;

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn until_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
