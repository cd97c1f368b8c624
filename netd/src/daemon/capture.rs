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
//! takes every frame waiting, encodes their blocks into one [`Batch`] (the frames'
//! bytes are referred to, not copied) and writes it; after a batch that emptied
//! the queue it waits [`GATHER`] before it looks again, so that a busy network
//! wakes it (and the writer) once per many frames. When the client reads slowly,
//! the write waits, the queue fills, and the switch counts what does not fit as
//! lost, per port; the switching path never waits here.
//!
//! The capture ends when the client shuts down its side (the CLI does on Ctrl-C)
//! or goes away, after `count` frames, or when the network is removed (`netd net
//! del`: the frames already queued are written first). The tap leaves the network at once, and
//! then, if the client still reads, one Interface Statistics Block per interface
//! says how many frames the capture saw there (`isb_ifrecv`) and lost
//! (`isb_ifdrop`); then the connection closes.
//!
//! With `pass_fd` the client hands over its output file after the answer, and the
//! same stream is written there instead (see `capture_out.rs`); the connection
//! then carries one last line, the summary: frames written, the ports in interface
//! order, per interface (index, seen, lost), whether the output was closed by its
//! reader, and an error if writing failed.

use std::collections::HashMap;
use std::sync::Arc;

use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use fabric_api::netd::Response;
use fabric_util::error_chain;

use super::capture_out::{Batch, FileSink, Sink};
use super::{Daemon, DaemonError};
use crate::pcapng::{self, Packet, Stats, MAX_SNAPLEN};
use crate::switch::{now_ns, Capture, CapturedPort, PortId, Record};

/// Bytes of the stream gathered before one write to the client (the frames in it
/// are not copied, see [`Batch`]).
const WRITE_BATCH: usize = 1 << 20;
/// How long the task waits, after a batch that emptied the queue, before it takes
/// the next: frames gather meanwhile, so that a busy network costs one wake-up
/// (and one write) per this many frames, not one per frame.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);
/// How long the client has to send its file after the answer (`pass_fd`).
const PASS_FD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The capture request's arguments: network, ports, count, snaplen, pass_fd.
pub(super) type CaptureArgs = (String, Vec<String>, Option<u64>, Option<u32>, bool);
/// The read side of a control connection, as the control loop holds it.
pub(super) type ConnReader = BufReader<tokio::io::Take<OwnedReadHalf>>;

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
    /// The interfaces' names, in order.
    names: Vec<String>,
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
        self.names.push(name);
        i
    }
}

/// Appends one frame's EPB (and its interface's IDB, if new): the block around
/// the frame encoded, the frame's bytes as they are (see [`Batch`]).
fn encode(out: &mut Batch, ifs: &mut Interfaces, cap: &Capture, rec: &Record) {
    let port = (!ifs.index.contains_key(&rec.port))
        .then(|| cap.port(rec.port))
        .flatten();
    let i = ifs.of(out.meta(), rec.port, port);
    let comment = rec.drop.map(|why| format!("dropped: {why}"));
    let p = Packet {
        interface: i,
        ts_ns: rec.ts_ns,
        orig_len: rec.orig_len,
        flags: rec.flags,
        comment: comment.as_deref(),
        data: &rec.data,
    };
    pcapng::emit_epb_head(out.meta(), &p);
    out.frame(&rec.data);
    pcapng::emit_epb_tail(out.meta(), &p);
    ifs.written[i as usize].1 += 1;
}

/// Receives the client's output file (`pass_fd`): one byte carrying it.
async fn receive_fd(r: &ConnReader) -> std::io::Result<OwnedFd> {
    if !r.buffer().is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "data after the capture request",
        ));
    }
    let sock: &tokio::net::UnixStream = r.get_ref().get_ref().as_ref();
    let fd = sock.as_raw_fd();
    let recv = sock.async_io(tokio::io::Interest::READABLE, || crate::sys::recv_fd(fd));
    tokio::time::timeout(PASS_FD_WAIT, recv)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no file descriptor sent"))?
}

/// The summary line that ends a `pass_fd` capture.
fn summary_line(
    ifs: &Interfaces,
    total: u64,
    lost: &HashMap<PortId, u64>,
    result: std::io::Result<()>,
) -> Vec<u8> {
    let stats: Vec<[u64; 3]> = ifs
        .written
        .iter()
        .enumerate()
        .map(|(i, (id, written))| {
            let dropped = lost.get(id).copied().unwrap_or(0);
            [i as u64, written + dropped, dropped]
        })
        .collect();
    let closed = matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
    let error = match result {
        Err(e) if !closed => Some(format!("cannot write the capture: {e}")),
        _ => None,
    };
    let v = serde_json::json!({
        "frames": total,
        "ports": ifs.names,
        "stats": stats,
        "output_closed": closed,
        "error": error,
    });
    fabric_api::encode_line(&Response::ok(v), b"{\"ok\":false}")
}

/// Serves a `capture` request on its connection (`w` its write half, `r` what is
/// left of its read half): the answer line, then the pcapng stream (see the module
/// doc), on the connection or, with `pass_fd`, to the client's file. Returns when
/// the capture is over; the connection is done then.
pub(super) async fn serve_capture(
    d: &Arc<Daemon>,
    (net, ports, count, snaplen, pass_fd): CaptureArgs,
    mut w: OwnedWriteHalf,
    mut r: ConnReader,
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
    let mut answer = serde_json::json!({
        "network": net,
        "ports": initial.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        "snaplen": snaplen,
        "count": count,
    });
    if pass_fd {
        answer["pass_fd"] = true.into();
    }
    let line = fabric_api::encode_line(&Response::ok(answer), b"{\"ok\":false}");
    let mut buf = Batch::default();
    pcapng::emit_shb(buf.meta(), concat!("netd ", env!("CARGO_PKG_VERSION")));
    let mut ifs = Interfaces {
        net: net.clone(),
        snaplen,
        index: HashMap::new(),
        written: Vec::new(),
        names: Vec::new(),
    };
    for p in initial {
        ifs.of(buf.meta(), p.id, Some(p));
    }
    let mut sink = if pass_fd {
        if w.write_all(&line).await.is_err() {
            return;
        }
        let file = receive_fd(&r).await.and_then(FileSink::start);
        match file {
            Ok(f) => Sink::File(f, w),
            Err(e) => {
                tracing::info!(network = %net, error = %e, "capture: no output file from the client");
                let fail = Response::fail(format!("capture: no output file: {e}"));
                let _ = w
                    .write_all(&fabric_api::encode_line(&fail, b"{\"ok\":false}"))
                    .await;
                return;
            }
        }
    } else {
        // No frame in the batch yet: the line goes first.
        buf.meta().splice(0..0, line);
        Sink::Stream(w)
    };
    tracing::info!(network = %net, ?ports, ?count, snaplen, pass_fd, "capture started");
    let limit = count.unwrap_or(u64::MAX);
    let mut total = 0u64;
    let mut junk = [0u8; 512];
    let mut output_gone = !sink.put(&mut buf).await;
    let mut ended = false;
    let gone = cap.ended();
    tokio::pin!(gone);
    while total < limit && !ended && !output_gone {
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
        let full = buf.len() >= WRITE_BATCH;
        if !sink.put(&mut buf).await {
            tracing::info!(network = %net, frames = total, "capture reader went away");
            output_gone = true;
        }
        if !full && !ended {
            tokio::time::sleep(GATHER).await;
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
        ifs.of(buf.meta(), *id, port);
    }
    drop(cap);
    let mut lost_total = 0;
    for (i, (id, written)) in ifs.written.iter().enumerate() {
        let dropped = lost.get(id).copied().unwrap_or(0);
        lost_total += dropped;
        pcapng::emit_isb(
            buf.meta(),
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
    if !output_gone {
        sink.put(&mut buf).await;
    }
    match sink {
        Sink::Stream(mut w) => {
            let _ = w.shutdown().await;
        }
        Sink::File(mut f, mut w) => {
            let result = f.finish().await;
            let line = summary_line(&ifs, total, &lost, result);
            let _ = w.write_all(&line).await;
            let _ = w.shutdown().await;
        }
    }
}
