//! `netd capture` on the daemon's side: a `capture` request turns its control
//! connection into a pcapng stream ([`serve_capture`]).
//!
//! Theory of operation. The request is answered with one JSON line as usual (an
//! error ends there, the connection stays a control connection); on success the
//! answer names the captured ports, and from then on the connection carries
//! pcapng only: a Section Header, an Interface Description Block per port captured
//! (in the order the answer lists them; a port added later gets its IDB before
//! its first frame), then an Enhanced Packet Block per frame, timestamped in the
//! switch (ns), with its direction in `epb_flags` and, for a frame the switch
//! dropped, `dropped: REASON` as its comment.
//!
//! This task is the only reader of the capture's queue ([`Capture::frames`]): it
//! takes every frame waiting, encodes them into one buffer and writes it. When the
//! client reads slowly, the write waits, the queue fills, and the switch counts
//! what does not fit as lost, per port; the switching path never waits here.
//!
//! The capture ends when the client shuts down its side (the CLI does on Ctrl-C)
//! or goes away, after `count` frames, or when the network is removed (`netd net
//! del`: the frames already queued are written first). The tap leaves the network at once, and
//! then, if the client still reads, one Interface Statistics Block per interface
//! says how many frames the capture saw there (`isb_ifrecv`) and lost
//! (`isb_ifdrop`); then the connection closes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use fabric_api::netd::Response;
use fabric_util::error_chain;

use super::{Daemon, DaemonError};
use crate::pcapng::{self, Packet, Stats, MAX_SNAPLEN};
use crate::switch::{now_ns, Capture, CapturedPort, PortId, Record};

/// Bytes of encoded frames gathered before one write to the client.
const WRITE_BATCH: usize = 256 << 10;

impl Daemon {
    /// Starts a capture of the ports `ports` (empty: every port) of `net`.
    pub fn capture_start(
        &self,
        net: &str,
        ports: &[String],
        snaplen: u32,
    ) -> Result<Capture, DaemonError> {
        let n = self.with_net(net, |st| st.net.clone())?;
        n.capture(ports, snaplen)
            .map_err(|e| DaemonError::Capture(net.to_string(), e))
    }
}

/// The interfaces of one capture's stream, in IDB order.
struct Interfaces {
    net: String,
    snaplen: u32,
    index: HashMap<PortId, u32>,
    /// (port id, frames written) per interface.
    written: Vec<(PortId, u64)>,
}

impl Interfaces {
    /// The interface of `port`, emitting its IDB into `out` if it is new.
    fn of(&mut self, out: &mut Vec<u8>, id: PortId, port: Option<CapturedPort>) -> u32 {
        if let Some(&i) = self.index.get(&id) {
            return i;
        }
        let (name, desc) = match port {
            Some(p) => (
                p.name.clone(),
                format!("netd network {} port {} ({})", self.net, p.name, p.kind),
            ),
            None => (
                format!("port-{id}"),
                format!("netd network {}, a port since removed", self.net),
            ),
        };
        pcapng::emit_idb(out, self.snaplen, &name, &desc);
        let i = self.written.len() as u32;
        self.index.insert(id, i);
        self.written.push((id, 0));
        i
    }
}

/// Appends one frame's EPB (and its interface's IDB, if new).
fn encode(out: &mut Vec<u8>, ifs: &mut Interfaces, cap: &Capture, rec: &Record) {
    let port = (!ifs.index.contains_key(&rec.port))
        .then(|| cap.port(rec.port))
        .flatten();
    let i = ifs.of(out, rec.port, port);
    let comment = rec.drop.map(|why| format!("dropped: {why}"));
    pcapng::emit_epb(
        out,
        &Packet {
            interface: i,
            ts_ns: rec.ts_ns,
            orig_len: rec.orig_len,
            flags: rec.flags,
            comment: comment.as_deref(),
            data: &rec.data,
        },
    );
    ifs.written[i as usize].1 += 1;
}

/// Serves a `capture` request on its connection (`w` its write half, `r` what is
/// left of its read half): the answer line, then the pcapng stream (see the module
/// doc). Returns when the capture is over; the connection is done then.
pub(super) async fn serve_capture(
    d: &Arc<Daemon>,
    (net, ports, count, snaplen): (String, Vec<String>, Option<u64>, Option<u32>),
    mut w: impl AsyncWrite + Unpin,
    mut r: impl AsyncRead + Unpin,
) {
    let snaplen = snaplen.unwrap_or(MAX_SNAPLEN);
    let mut cap = match d.capture_start(&net, &ports, snaplen) {
        Ok(c) => c,
        Err(e) => {
            let out = fabric_api::encode_line(&Response::fail(error_chain(&e)), b"{\"ok\":false}");
            let _ = w.write_all(&out).await;
            return;
        }
    };
    let start_ns = now_ns();
    let initial = cap.ports();
    let answer = serde_json::json!({
        "network": net,
        "ports": initial.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        "snaplen": snaplen,
        "count": count,
    });
    let mut buf = fabric_api::encode_line(&Response::ok(answer), b"{\"ok\":false}");
    pcapng::emit_shb(&mut buf, concat!("netd ", env!("CARGO_PKG_VERSION")));
    let mut ifs = Interfaces {
        net: net.clone(),
        snaplen,
        index: HashMap::new(),
        written: Vec::new(),
    };
    for p in initial {
        ifs.of(&mut buf, p.id, Some(p));
    }
    tracing::info!(network = %net, ?ports, ?count, snaplen, "capture started");
    let limit = count.unwrap_or(u64::MAX);
    let mut total = 0u64;
    let mut junk = [0u8; 512];
    if w.write_all(&buf).await.is_err() {
        return;
    }
    let mut ended = false;
    let gone = cap.ended();
    tokio::pin!(gone);
    while total < limit && !ended {
        buf.clear();
        tokio::select! {
            // The client shut down its side (or went away): the capture ends.
            n = r.read(&mut junk) => match n {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            // The network was removed: what is queued still goes out, then the end.
            _ = &mut gone => {
                ended = true;
                while total < limit && buf.len() < WRITE_BATCH {
                    let Ok(rec) = cap.frames.try_recv() else { break };
                    encode(&mut buf, &mut ifs, &cap, &rec);
                    total += 1;
                }
            }
            rec = cap.frames.recv() => {
                let Some(rec) = rec else { break };
                encode(&mut buf, &mut ifs, &cap, &rec);
                total += 1;
                while total < limit && buf.len() < WRITE_BATCH {
                    let Ok(rec) = cap.frames.try_recv() else { break };
                    encode(&mut buf, &mut ifs, &cap, &rec);
                    total += 1;
                }
            }
        }
        if w.write_all(&buf).await.is_err() {
            tracing::info!(network = %net, frames = total, "capture reader went away");
            return;
        }
    }
    // The tap goes first: what was lost is final once nothing more is recorded.
    cap.stop();
    let lost = cap.lost();
    let end_ns = now_ns();
    buf.clear();
    for id in lost.keys() {
        let port = (!ifs.index.contains_key(id))
            .then(|| cap.port(*id))
            .flatten();
        ifs.of(&mut buf, *id, port);
    }
    drop(cap);
    let mut lost_total = 0;
    for (i, (id, written)) in ifs.written.iter().enumerate() {
        let dropped = lost.get(id).copied().unwrap_or(0);
        lost_total += dropped;
        pcapng::emit_isb(
            &mut buf,
            &Stats {
                interface: i as u32,
                start_ns,
                end_ns,
                received: written + dropped,
                dropped,
            },
        );
    }
    tracing::info!(network = %net, frames = total, lost = lost_total, "capture ended");
    let _ = w.write_all(&buf).await;
    let _ = w.shutdown().await;
}
