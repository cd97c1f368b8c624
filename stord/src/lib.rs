//! stord: an NBD block service.
//!
//! A lab host runs `stord serve --config FILE`; every disk of its catalog is an
//! NBD export (fixed newstyle, structured replies, `base:allocation`, multi-conn)
//! over TCP and/or a unix socket, one host file per disk. A JSON control socket
//! creates, lists, resizes and deletes disks; the same binary is its CLI.
//!
//! Modules, from the wire up (the NBD wire format itself, parse and emit, is
//! the `nbd-proto` crate, shared with vmm-shim's client and fuzzed there):
//! - [`disk`]: one host file as a disk (fixed / dynamic raw, or qcow2),
//!   blocking I/O;
//! - [`qcow2`]: qcow2 v3 images read and written by stord itself: the
//!   checked header and tables, the backing chain, allocation, the flush
//!   order that keeps an image consistent through a crash;
//! - [`catalog`]: the set of disks, persisted atomically; layered disks
//!   (import, clone, snapshot, revert, flatten) in `catalog/layers.rs`;
//! - [`nbd`]: one connection: the handshake on tokio, then the transmission
//!   phase on the connection's own worker threads;
//! - [`poll`]: busy polling of idle connections;
//! - [`control`]: the JSON control API's server side (its types and client are
//!   in the `fabric-api` crate, shared with netd);
//! - [`server`]: listeners, limits, systemd, signals, shutdown;
//! - [`metrics`]: per-disk request counters and what `/metrics` exports;
//! - [`config`]: the strict TOML configuration;
//! - [`tls`]: TLS credentials, the OpenSSL context, peer identities and the
//!   disks' access lists (the STARTTLS upgrade itself is `nbd::starttls`);
//! - [`sys`]: the few raw Linux calls (all `unsafe` lives there).
//!
//! # The path of an NBD READ
//!
//! Five files, in this order:
//!
//! 1. `nbd/transmit.rs`: one of the connection's worker threads, holding the
//!    read lock, reads the 28-byte header (`next`), parses it
//!    (`nbd_proto::Request::parse`) and validates it (`request::validate`,
//!    which returns the typed `Command::Read`). A small READ while more
//!    requests wait is tried from the page cache on this thread
//!    (`read_cached`); any other READ lets go of the read lock first, so the
//!    next request is read while this one runs.
//! 2. `nbd/request.rs`: `read_plan` picks the strategy, in one place: one header
//!    and the data (simple replies, DF, fixed disks, or below 64 KiB) is sent
//!    from the disk file's mapping from 64 KiB on, and pread into a buffer
//!    below; anything else becomes OFFSET_DATA / OFFSET_HOLE chunks as
//!    SEEK_DATA / SEEK_HOLE find them. `read` carries the plan out; the reply
//!    headers are emitted there by
//! 3. `nbd-proto/src/transmission.rs` (simple reply, chunk headers).
//! 4. `disk.rs`: the disk file's shared mapping (`Disk::mapping`), `pread`
//!    (`Disk::read`, `Disk::read_cached`), holes (`Disk::segments`), over
//! 5. `sys.rs`: `FileMap` (mmap, made resident with madvise before the write
//!    lock is taken, then written with one writev from the mapping: one copy,
//!    page cache to socket), `pread_vec`, `pread_cached` (RWF_NOWAIT), `seek`.
//!
//! Back in `nbd/transmit.rs`, the reply goes out under the write lock in one
//! vectored write (`write_segs`, or `write_mapped` for a mapped reply); READ
//! data held in memory counts against the connection's payload budget
//! (`request::Budget`) while it is produced. No request allocates beyond its
//! reply header and its data. The socket halves are std sockets behind the
//! `SockRead` / `SockWrite` traits of `nbd/transmit.rs` (made once per
//! connection in `nbd/sock.rs`; their per-request methods are std's).
//!
//! Under TLS the same five files run with three differences: the connection
//! has one worker (one TLS stream is one state machine), `read_plan` never
//! picks the mapping (`Session::mapped_reads` is off: every byte must be
//! encrypted), so the data is `pread` (`Disk::read`, `sys::pread_vec`) and
//! its data chunk carries DONE itself; and the reply is written into the TLS
//! stream's handle (`TlsWrite` in `nbd/starttls.rs`, the one file TLS adds),
//! which gathers it into 64 KiB for OpenSSL to encrypt as 16 KiB records.

pub mod catalog;
pub mod config;
pub mod control;
pub mod disk;
pub mod metrics;
pub mod nbd;
pub mod poll;
pub mod qcow2;
pub mod server;
pub mod sys;
pub mod tls;

pub use fabric_util::error_chain;

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn until_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
