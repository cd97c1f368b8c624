//! `netd capture NET [--port P]... [-w FILE | -w -] [--count N] [--snaplen N]`:
//! the CLI's side of a capture ([`run`]).
//!
//! The CLI sends the `capture` request, reads the answer (an error is shown like
//! any other), and then relays the pcapng stream that follows, block by block, to
//! the file or to stdout (`-w -`, the default; never to a terminal), flushing
//! whenever it has caught up with the daemon, so a reader such as `tshark -r -` or
//! `wireshark -k -i -` sees each frame as it comes. Each block's lengths are
//! checked ([`crate::pcapng::read_block`]) before it is written on.
//!
//! Ctrl-C (SIGINT) or SIGTERM does not kill the CLI: it shuts down its side of
//! the connection, the daemon ends the capture and sends its statistics (one
//! Interface Statistics Block per port), the CLI writes them too and says on
//! stderr how many frames the capture wrote and lost. A second signal exits at
//! once. When the output closes (`tshark -c N` done), the CLI stops quietly.

use std::io::{BufReader, BufWriter, Write};
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

/// Where the capture goes: `-w FILE`, or stdout for `-w -` or no `-w`.
fn open_output(write: Option<&PathBuf>) -> Result<(String, Box<dyn Write>), CaptureError> {
    use std::io::IsTerminal;
    match write.filter(|p| p.as_os_str() != "-") {
        Some(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| CaptureError::Output(p.display().to_string(), e))?;
            Ok((p.display().to_string(), Box::new(BufWriter::new(f))))
        }
        None if std::io::stdout().is_terminal() => Err(CaptureError::Terminal),
        None => Ok((
            "stdout".into(),
            Box::new(BufWriter::with_capacity(OUT_BUF, std::io::stdout().lock())),
        )),
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

/// Runs `netd capture` (`req` is a [`Request::Capture`]): relays the stream to
/// `write` (see the module doc) until the capture ends; returns what it wrote.
pub fn run(
    client: &Client,
    req: &Request,
    write: Option<&PathBuf>,
) -> Result<Summary, CaptureError> {
    let (what, out) = open_output(write)?;
    let conn = Arc::new(Mutex::new(None));
    on_stop(conn.clone())?;
    let (answer, reader) = client.open_stream(req)?;
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
    relay(reader, out, &what)
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
