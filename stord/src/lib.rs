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
//! - [`control`]: the JSON control API and its client;
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

/// Formats an error with its whole `source()` chain: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn until_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
