//! What stord exports on `/metrics` (the `metrics` key of the config).
//!
//! Per disk, [`DiskIo`]: requests, bytes and errors by NBD command and a latency
//! histogram per command, recorded by the transmission workers with relaxed
//! atomic adds only (`nbd/transmit.rs`, `nbd/request.rs`). The latency is the
//! service time: from the request read in full to its reply ready to be written
//! (for a READ sent from the disk file's mapping: its pages made resident); the
//! time the client takes to read the reply is not in it. Bytes are the request's
//! length: data moved for READ and WRITE, the range covered for TRIM,
//! WRITE_ZEROES, CACHE and BLOCK_STATUS (FLUSH has none).
//!
//! Per server: connections, TLS handshakes, refusals and closes by reason, read
//! from the counters `stord status` shows ([`crate::nbd::Stats`]). Everything is
//! read at scrape time; the names are listed in the README ("Metrics").

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fabric_util::metrics::{Histogram, Labels, Out, Source};
use nbd_proto::Command;

use crate::catalog::Catalog;
use crate::nbd::Stats;

/// The commands counted, by their `cmd` label (DISC has no reply and is not).
const COMMANDS: [(Command, &str); 7] = [
    (Command::Read, "read"),
    (Command::Write, "write"),
    (Command::Flush, "flush"),
    (Command::Trim, "trim"),
    (Command::Cache, "cache"),
    (Command::WriteZeroes, "write_zeroes"),
    (Command::BlockStatus, "block_status"),
];

/// Slots: one per NBD command number (0..=7).
const SLOTS: usize = 8;

/// One disk's request counters (see the module doc).
#[derive(Debug, Default)]
pub struct DiskIo {
    ops: [AtomicU64; SLOTS],
    bytes: [AtomicU64; SLOTS],
    errors: [AtomicU64; SLOTS],
    latency: [Histogram; SLOTS],
}

fn slot(cmd: Command) -> usize {
    (cmd as usize).min(SLOTS - 1)
}

impl DiskIo {
    /// Counts one request served: its length and how long it took.
    pub fn record(&self, cmd: Command, len: u32, took: Duration) {
        let i = slot(cmd);
        self.ops[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(u64::from(len), Ordering::Relaxed);
        self.latency[i].record(took);
    }

    /// Counts a request the disk failed (an I/O error answered to the client).
    pub fn error(&self, cmd: Command) {
        self.errors[slot(cmd)].fetch_add(1, Ordering::Relaxed);
    }
}

/// The daemon as a metrics [`Source`].
pub struct Metrics {
    /// The disks.
    pub catalog: Arc<Catalog>,
    /// The server's counters.
    pub stats: Arc<Stats>,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Source for Metrics {
    fn collect(&self, out: &mut Out<'_>) -> fmt::Result {
        let disks = self.catalog.disks();
        let dl = |d: &crate::disk::Disk| -> Labels { vec![("disk", d.name().to_string())] };
        let by_cmd = |f: &dyn Fn(&DiskIo, usize) -> u64| -> Vec<(Labels, u64)> {
            disks
                .iter()
                .flat_map(|d| {
                    COMMANDS.iter().map(move |(c, n)| {
                        let mut l = dl(d);
                        l.push(("cmd", n.to_string()));
                        (l, f(d.io(), slot(*c)))
                    })
                })
                .collect()
        };
        out.counter(
            "stord_disk_requests",
            "NBD requests served, by disk and command",
            &by_cmd(&|io, i| load(&io.ops[i])),
        )?;
        out.counter(
            "stord_disk_bytes",
            "Bytes of the requests served (data for read/write, range for the others)",
            &by_cmd(&|io, i| load(&io.bytes[i])),
        )?;
        out.counter(
            "stord_disk_errors",
            "Requests the disk failed (I/O errors answered to the client)",
            &by_cmd(&|io, i| load(&io.errors[i])),
        )?;
        let hist: Vec<_> = disks
            .iter()
            .flat_map(|d| {
                COMMANDS.iter().map(move |(c, n)| {
                    let mut l = dl(d);
                    l.push(("cmd", n.to_string()));
                    (l, d.io().latency[slot(*c)].snapshot())
                })
            })
            .collect();
        out.histogram(
            "stord_disk_request_duration_seconds",
            "Service time of a request, read in full to reply ready",
            &hist,
        )?;
        let gauge = |f: &dyn Fn(&crate::disk::Disk) -> i64| -> Vec<(Labels, i64)> {
            disks.iter().map(|d| (dl(d), f(d))).collect()
        };
        out.gauge(
            "stord_disk_connections",
            "NBD connections open on the disk",
            &gauge(&|d| d.connections() as i64),
        )?;
        out.gauge(
            "stord_disk_size_bytes",
            "Size of the disk",
            &gauge(&|d| i64::try_from(d.size()).unwrap_or(i64::MAX)),
        )?;
        out.gauge(
            "stord_disk_failed",
            "1 when a flush failed since the disk was opened (flushes fail until restart)",
            &gauge(&|d| i64::from(d.failed())),
        )?;
        let flush: Vec<(Labels, u64)> = disks.iter().map(|d| (dl(d), d.flush_failures())).collect();
        out.counter("stord_disk_flush_failures", "Syncs that failed", &flush)?;
        server(out, &self.stats)
    }
}

/// The per-server families.
fn server(out: &mut Out<'_>, s: &Stats) -> fmt::Result {
    let one = |v: u64| vec![(Labels::new(), v)];
    let by = |rows: &[(&str, &AtomicU64)]| -> Vec<(Labels, u64)> {
        rows.iter()
            .map(|(r, a)| (vec![("reason", r.to_string())], load(a)))
            .collect()
    };
    out.counter(
        "stord_connections",
        "NBD connections accepted",
        &one(load(&s.connections)),
    )?;
    out.counter(
        "stord_requests",
        "NBD requests served, all disks",
        &one(load(&s.requests)),
    )?;
    out.counter(
        "stord_invalid_requests",
        "Requests answered with an error because they were invalid",
        &one(load(&s.invalid_requests)),
    )?;
    out.counter(
        "stord_tls_handshakes",
        "STARTTLS handshakes, by result",
        &[
            (vec![("result", "ok".into())], load(&s.tls_handshakes_ok)),
            (
                vec![("result", "failed".into())],
                load(&s.tls_handshakes_failed),
            ),
        ],
    )?;
    out.counter(
        "stord_rejects",
        "Connections or exports refused, by reason",
        &by(&[
            ("max_connections", &s.refused),
            ("max_connections_per_client", &s.refused_per_client),
            ("tls_required", &s.tls_plain_refused),
            ("tls_allow", &s.tls_allow_refused),
        ]),
    )?;
    out.counter(
        "stord_connections_closed",
        "Connections closed by the server, by reason",
        &by(&[
            ("protocol_error", &s.protocol_errors),
            ("request_timeout", &s.timeouts),
            ("handshake_timeout", &s.handshake_timeouts),
            ("idle", &s.idle_closed),
        ]),
    )
}
