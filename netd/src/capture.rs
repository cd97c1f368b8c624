//! `netd capture NET [--port P]... [-w FILE | -w -] [--count N] [--snaplen N]`:
//! the CLI's side of a capture ([`run`]).
//!
//! The CLI opens the file (or takes stdout for `-w -`, the default; never a
//! terminal), sends the `capture` request with `pass_fd`, reads the answer (an
//! error is shown like any other) and hands the file's descriptor to the daemon
//! (SCM_RIGHTS), which writes the pcapng there itself, each batch as it comes, so a
//! reader such as `tshark -r -` or `wireshark -k -i -` sees each frame at once and
//! no byte of the capture passes through the CLI. The CLI then waits for the
//! daemon's summary line.
//!
//! A daemon that predates `pass_fd` refuses the field; the CLI then asks again
//! without it and relays the pcapng stream that follows on the connection, block
//! by block, flushing whenever it has caught up, each block's lengths checked
//! ([`crate::pcapng::read_block`]) before it is written on.
//!
//! Ctrl-C (SIGINT) or SIGTERM does not kill the CLI: it shuts down its side of
//! the connection, the daemon ends the capture and writes its statistics (one
//! Interface Statistics Block per port), and the CLI says on stderr how many
//! frames the capture wrote and lost. A second signal exits at once. When the
//! output closes (`tshark -c N` done), the CLI stops quietly.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fabric_api::netd::Request;
use fabric_api::{Client, ClientError};

use crate::pcapng::{self, Block, PcapngError};

/// The output's buffer: flushed whenever the CLI has caught up with the daemon.
const OUT_BUF: usize = 256 << 10;

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// the daemon refused or could not be reached
    #[error(transparent)]
    Client(#[from] ClientError),
    /// the output cannot be opened or written
    #[error("cannot write the capture to {0}")]
    Output(String, #[source] std::io::Error),
    /// stdout is a terminal
    #[error(
        "-w -: stdout is a terminal; pipe it (netd capture NET | tshark -r -) or give -w FILE"
    )]
    Terminal,
    /// the stream is not pcapng
    #[error("netd sent a bad capture stream")]
    Stream(#[source] PcapngError),
    /// the signal handling could not be set up
    #[error("cannot set up Ctrl-C handling")]
    Signals(#[source] std::io::Error),
}

/// What a capture wrote, as the CLI reports it on stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The ports captured, in interface order.
    pub ports: Vec<String>,
    /// Frames written.
    pub frames: u64,
    /// Per interface (index, frames seen, frames lost), from the statistics at
    /// the end; empty if the stream ended without them.
    pub stats: Vec<(u32, u64, u64)>,
}

impl Summary {
    /// Frames lost because the reader was slow.
    pub fn lost(&self) -> u64 {
        self.stats.iter().map(|s| s.2).sum()
    }

    /// The report line(s) for stderr.
    pub fn report(&self, net: &str) -> String {
        let mut out = format!("capture of {net}: {} frames written", self.frames);
        if self.stats.is_empty() {
            out.push_str(" (ended without statistics)\n");
            return out;
        }
        out.push_str(&format!(", {} lost (reader too slow)\n", self.lost()));
        for (i, seen, lost) in self.stats.iter().filter(|s| s.2 > 0) {
            let name = self.ports.get(*i as usize).map_or("?", String::as_str);
            out.push_str(&format!("  port {name}: {seen} seen, {lost} lost\n"));
        }
        out
    }
}

/// The capture's output, as opened by the CLI.
enum Output {
    File(std::fs::File),
    Stdout,
}

impl Output {
    /// Its descriptor, to hand to the daemon.
    fn raw_fd(&self) -> RawFd {
        match self {
            Output::File(f) => f.as_raw_fd(),
            Output::Stdout => std::io::stdout().as_raw_fd(),
        }
    }

    /// A buffered writer over it, for relaying the stream.
    fn writer(self) -> Box<dyn Write> {
        match self {
            Output::File(f) => Box::new(BufWriter::new(f)),
            Output::Stdout => Box::new(BufWriter::with_capacity(OUT_BUF, std::io::stdout().lock())),
        }
    }
}

/// Where the capture goes: `-w FILE`, or stdout for `-w -` or no `-w`.
fn open_output(write: Option<&PathBuf>) -> Result<(String, Output), CaptureError> {
    use std::io::IsTerminal;
    match write.filter(|p| p.as_os_str() != "-") {
        Some(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| CaptureError::Output(p.display().to_string(), e))?;
            Ok((p.display().to_string(), Output::File(f)))
        }
        None if std::io::stdout().is_terminal() => Err(CaptureError::Terminal),
        None => Ok(("stdout".into(), Output::Stdout)),
    }
}

/// Takes SIGINT and SIGTERM on a thread of its own: the first shuts down the
/// write side of the capture's connection (the daemon then ends the capture and
/// sends its statistics), the second exits.
fn on_stop(conn: Arc<Mutex<Option<UnixStream>>>) -> Result<(), CaptureError> {
    crate::sys::block_stop_signals().map_err(CaptureError::Signals)?;
    std::thread::Builder::new()
        .name("capture-signals".into())
        .spawn(move || {
            let mut asked = false;
            while crate::sys::wait_stop_signal().is_ok() {
                let c = conn.lock().unwrap_or_else(|e| e.into_inner());
                match c.as_ref() {
                    Some(s) if !asked => {
                        asked = true;
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                    _ => std::process::exit(130),
                }
            }
        })
        .map_err(CaptureError::Signals)?;
    Ok(())
}

/// `req` with `pass_fd` set to `on`.
fn with_pass_fd(req: &Request, on: bool) -> Request {
    let mut req = req.clone();
    if let Request::Capture { pass_fd, .. } = &mut req {
        *pass_fd = on;
    }
    req
}

/// Runs `netd capture` (`req` is a [`Request::Capture`]): the daemon writes the
/// capture to `write` (or the CLI relays it, see the module doc) until it ends;
/// returns what it wrote.
pub fn run(
    client: &Client,
    req: &Request,
    write: Option<&PathBuf>,
) -> Result<Summary, CaptureError> {
    let (what, out) = open_output(write)?;
    let conn = Arc::new(Mutex::new(None));
    on_stop(conn.clone())?;
    let (answer, reader) = match client.open_stream(&with_pass_fd(req, true)) {
        // A daemon from before `pass_fd`: the stream comes on the connection.
        Err(ClientError::Refused { message, .. }) if message.contains("pass_fd") => {
            client.open_stream(&with_pass_fd(req, false))?
        }
        r => r?,
    };
    if let Ok(s) = reader.get_ref().try_clone() {
        *conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }
    let ports: Vec<String> = answer["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "capturing on {}: {} (to {what}; Ctrl-C ends it)",
        answer["network"].as_str().unwrap_or("?"),
        if ports.is_empty() {
            "no port yet".to_string()
        } else {
            ports.join(", ")
        }
    );
    if answer["pass_fd"].as_bool() == Some(true) {
        crate::sys::send_fd(reader.get_ref().as_raw_fd(), out.raw_fd())
            .map_err(|e| CaptureError::Client(ClientError::Io(e)))?;
        return wait_summary(reader, &what);
    }
    relay(reader, out.writer(), &what)
}

/// The longest summary line the CLI reads.
const MAX_SUMMARY: u64 = 1 << 20;

/// Waits for the daemon's summary line at the end of a `pass_fd` capture.
fn wait_summary(r: BufReader<UnixStream>, what: &str) -> Result<Summary, CaptureError> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    r.take(MAX_SUMMARY)
        .read_until(b'\n', &mut line)
        .map_err(|e| CaptureError::Client(ClientError::Io(e)))?;
    if line.is_empty() {
        // The daemon went away before the end.
        return Ok(Summary::default());
    }
    let v: serde_json::Value = serde_json::from_slice(&line).map_err(|source| {
        CaptureError::Client(ClientError::Malformed {
            daemon: "netd",
            source,
        })
    })?;
    if v["ok"].as_bool() != Some(true) {
        return Err(CaptureError::Client(ClientError::Refused {
            daemon: "netd",
            message: v["error"].as_str().unwrap_or("capture failed").to_string(),
        }));
    }
    let d = &v["data"];
    if let Some(e) = d["error"].as_str() {
        return Err(CaptureError::Output(
            what.to_string(),
            std::io::Error::other(e.to_string()),
        ));
    }
    let ports = d["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    let stats = d["stats"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    let n = |i: usize| s.get(i).and_then(serde_json::Value::as_u64);
                    Some((u32::try_from(n(0)?).ok()?, n(1)?, n(2)?))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Summary {
        ports,
        frames: d["frames"].as_u64().unwrap_or(0),
        stats,
    })
}

/// Copies the stream's blocks from `r` to `out`, following them (see [`run`]).
fn relay(
    mut r: BufReader<UnixStream>,
    mut out: Box<dyn Write>,
    what: &str,
) -> Result<Summary, CaptureError> {
    let mut sum = Summary::default();
    let mut block = Vec::new();
    let mut first = true;
    loop {
        if r.buffer().is_empty() {
            match out.flush() {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(sum),
                r => r.map_err(|e| CaptureError::Output(what.to_string(), e))?,
            }
        }
        if !pcapng::read_block(&mut r, &mut block).map_err(CaptureError::Stream)? {
            break;
        }
        if std::mem::take(&mut first) && !pcapng::is_shb(&block) {
            return Err(CaptureError::Stream(PcapngError::NotPcapng));
        }
        if let Some(b) = Block::parse(&block) {
            match b.kind {
                pcapng::IDB => {
                    let name = b.options(8).into_iter().find(|o| o.0 == pcapng::IF_NAME);
                    sum.ports.push(
                        name.map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default(),
                    );
                }
                pcapng::EPB => sum.frames += 1,
                _ => sum.stats.extend(b.stats()),
            }
        }
        match out.write_all(&block) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(sum),
            r => r.map_err(|e| CaptureError::Output(what.to_string(), e))?,
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(sum),
        r => r
            .map(|()| sum)
            .map_err(|e| CaptureError::Output(what.to_string(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_ports_that_lost_frames() {
        let s = Summary {
            ports: vec!["a".into(), "b".into()],
            frames: 10,
            stats: vec![(0, 4, 0), (1, 9, 3)],
        };
        assert_eq!(s.lost(), 3);
        assert_eq!(
            s.report("lab"),
            "capture of lab: 10 frames written, 3 lost (reader too slow)\n  port b: 9 seen, 3 lost\n"
        );
        let none = Summary::default();
        assert!(none.report("lab").contains("without statistics"));
    }

    #[test]
    fn a_stream_is_relayed_block_by_block_and_summed_up() {
        let (mut daemon, cli) = UnixStream::pair().unwrap();
        let mut s = Vec::new();
        pcapng::emit_shb(&mut s, "t");
        pcapng::emit_idb(&mut s, 64, "p0", "d");
        let frame = [0xffu8; 60];
        for _ in 0..3 {
            pcapng::emit_epb(
                &mut s,
                &pcapng::Packet {
                    interface: 0,
                    ts_ns: 5,
                    orig_len: 60,
                    flags: 0,
                    comment: None,
                    data: &frame,
                },
            );
        }
        pcapng::emit_isb(
            &mut s,
            &pcapng::Stats {
                interface: 0,
                received: 5,
                dropped: 2,
                ..Default::default()
            },
        );
        let sent = s.clone();
        let t = std::thread::spawn(move || daemon.write_all(&sent).unwrap());
        let file = tempfile::NamedTempFile::new().unwrap();
        let out = Box::new(file.reopen().unwrap());
        let sum = relay(BufReader::new(cli), out, "f").unwrap();
        t.join().unwrap();
        assert_eq!(sum.frames, 3);
        assert_eq!(sum.ports, ["p0"]);
        assert_eq!(sum.stats, [(0, 5, 2)]);
        assert_eq!(std::fs::read(file.path()).unwrap(), s);

        // Not pcapng: refused at the first block.
        let (mut daemon, cli) = UnixStream::pair().unwrap();
        let mut idb = Vec::new();
        pcapng::emit_idb(&mut idb, 64, "p0", "d");
        daemon.write_all(&idb).unwrap();
        drop(daemon);
        let e = relay(BufReader::new(cli), Box::new(std::io::sink()), "f").unwrap_err();
        assert!(
            matches!(e, CaptureError::Stream(PcapngError::NotPcapng)),
            "{e}"
        );
    }
}
