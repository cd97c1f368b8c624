//! The `/metrics` HTTP/1.1 server: one accept thread, one thread per connection
//! (at most [`MAX_CONNECTIONS`]), one request per connection, every read and write
//! bounded in size and time (see the module doc of [`super`]).

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::{Labels, Out, Source};

/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head (request line and headers); larger is answered 431.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its whole request head; later is answered 408.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the whole answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection is given to take its 503.
const REFUSE_TIMEOUT: Duration = Duration::from_millis(100);

/// A running metrics server (its threads live as long as the process).
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
}

impl Server {
    /// The address it listens on (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Why a request was not answered with metrics, each counted.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    TooManyConnections,
    TooLarge,
    Timeout,
    BadRequest,
    NotFound,
    BadMethod,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::TooManyConnections,
        Refusal::TooLarge,
        Refusal::Timeout,
        Refusal::BadRequest,
        Refusal::NotFound,
        Refusal::BadMethod,
    ];

    fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooLarge => "too_large",
            Refusal::Timeout => "timeout",
            Refusal::BadRequest => "bad_request",
            Refusal::NotFound => "not_found",
            Refusal::BadMethod => "bad_method",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "503 Service Unavailable",
            Refusal::TooLarge => "431 Request Header Fields Too Large",
            Refusal::Timeout => "408 Request Timeout",
            Refusal::BadRequest => "400 Bad Request",
            Refusal::NotFound => "404 Not Found",
            Refusal::BadMethod => "405 Method Not Allowed",
        }
    }
}

/// The server's own counters, exported with the daemon's.
#[derive(Default)]
struct Stats {
    prefix: String,
    scrapes: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    open: AtomicUsize,
}

impl Stats {
    fn refuse(&self, r: Refusal) {
        self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Source for Stats {
    fn collect(&self, out: &mut Out<'_>) -> fmt::Result {
        let p = &self.prefix;
        out.counter(
            &format!("{p}_scrapes"),
            "Scrapes of /metrics answered",
            &[(Labels::new(), self.scrapes.load(Ordering::Relaxed))],
        )?;
        let refused: Vec<(Labels, u64)> = Refusal::ALL
            .iter()
            .map(|&r| {
                let n = self.refused[r as usize].load(Ordering::Relaxed);
                (vec![("reason", r.reason().to_string())], n)
            })
            .collect();
        out.counter(
            &format!("{p}_scrape_refused"),
            "Metrics requests refused, by reason",
            &refused,
        )?;
        out.gauge(
            &format!("{p}_scrape_connections"),
            "Metrics connections open",
            &[(Labels::new(), self.open.load(Ordering::Relaxed) as i64)],
        )
    }
}

/// A [`Source`] as `prometheus-client` takes it.
struct Adapter<S: ?Sized + Source>(Arc<S>);

impl<S: ?Sized + Source> fmt::Debug for Adapter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("metrics source")
    }
}

impl<S: ?Sized + Source> Collector for Adapter<S> {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        self.0.collect(&mut Out { enc })
    }
}

fn registry(src: Arc<dyn Source>, stats: Option<Arc<Stats>>) -> Registry {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Adapter(src)));
    if let Some(s) = stats {
        reg.register_collector(Box::new(Adapter(s)));
    }
    reg
}

fn encode(reg: &Registry) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut s, reg) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    s
}

/// The text of one scrape of `src`.
pub(super) fn render(src: Arc<dyn Source>) -> String {
    encode(&registry(src, None))
}

/// Binds `addr` and serves `GET /metrics` from `src` on threads of its own;
/// `prefix` (`netd`, `stord`, `vmm_shim`) names the server's own counters.
pub fn serve(addr: SocketAddr, prefix: &str, src: Arc<dyn Source>) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(Stats {
        prefix: prefix.to_string(),
        ..Stats::default()
    });
    let reg = Arc::new(registry(src, Some(stats.clone())));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, reg, stats))?;
    Ok(Server { addr })
}

fn accept_loop(listener: TcpListener, reg: Arc<Registry>, stats: Arc<Stats>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics: accept failed");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        if stats.open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            stats.open.fetch_sub(1, Ordering::AcqRel);
            stats.refuse(Refusal::TooManyConnections);
            let _ = stream.set_write_timeout(Some(REFUSE_TIMEOUT));
            respond(&stream, Refusal::TooManyConnections.status(), "", false);
            continue;
        }
        let (reg, st) = (reg.clone(), stats.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                connection(stream, &reg, &st);
                st.open.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            stats.open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "metrics: cannot start a connection thread");
        }
    }
}

/// What the head of a request asked for.
enum Asked {
    /// `GET /metrics` (`head`: `HEAD`, no body).
    Metrics {
        head: bool,
    },
    Refused(Refusal),
}

/// Reads the request head within [`READ_TIMEOUT`] and [`MAX_REQUEST`].
fn read_head(mut stream: &TcpStream) -> Option<Asked> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            return Some(parse_head(&buf[..end]));
        }
        if buf.len() >= MAX_REQUEST {
            return Some(Asked::Refused(Refusal::TooLarge));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Some(Asked::Refused(Refusal::Timeout));
        }
        match stream.read(&mut chunk) {
            // The client went away before a whole request: nothing to answer.
            Ok(0) => return None,
            Ok(n) => {
                let room = MAX_REQUEST - buf.len();
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Some(Asked::Refused(Refusal::Timeout))
            }
            Err(_) => return None,
        }
    }
}

/// Where the head ends (after its empty line), if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the request line of a complete head.
fn parse_head(head: &[u8]) -> Asked {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Asked::Refused(Refusal::BadRequest);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Refused(Refusal::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Asked::Refused(Refusal::BadRequest);
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Asked::Refused(Refusal::BadMethod),
    };
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Asked::Refused(Refusal::NotFound);
    }
    Asked::Metrics { head }
}

fn connection(stream: TcpStream, reg: &Registry, stats: &Stats) {
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    match read_head(&stream) {
        None => {}
        Some(Asked::Refused(r)) => {
            stats.refuse(r);
            respond(&stream, r.status(), "", false);
            drain(&stream);
        }
        Some(Asked::Metrics { head }) => {
            stats.scrapes.fetch_add(1, Ordering::Relaxed);
            respond(&stream, "200 OK", &encode(reg), head);
        }
    }
}

/// Most bytes read and thrown away after a refusal.
const DRAIN_MAX: usize = 1024 * 1024;
/// Longest time spent on that.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads what the client still sends (bounded in bytes and time) after a refusal, so
/// that the close is a FIN and the client reads the answer: closing a socket with
/// unread input sends a RST, which may destroy the answer before it is read.
fn drain(mut stream: &TcpStream) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut left = DRAIN_MAX;
    let mut buf = [0u8; 4096];
    while left > 0 {
        let t = deadline.saturating_duration_since(Instant::now());
        if t.is_zero() || stream.set_read_timeout(Some(t)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Writes one answer and closes (errors: the client is gone, nothing to do).
fn respond(mut stream: &TcpStream, status: &str, body: &str, head_only: bool) {
    let ctype = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
    let hdr = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(hdr.as_bytes());
    if !head_only {
        let _ = stream.write_all(body.as_bytes());
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_request_line() {
        let m = |s: &str| match parse_head(s.as_bytes()) {
            Asked::Metrics { head } => format!("metrics head={head}"),
            Asked::Refused(r) => r.reason().to_string(),
        };
        assert_eq!(
            m("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            "metrics head=false"
        );
        assert_eq!(m("HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"), "metrics head=true");
        assert_eq!(m("GET / HTTP/1.1\r\n\r\n"), "not_found");
        assert_eq!(m("GET /metricsx HTTP/1.1\r\n\r\n"), "not_found");
        assert_eq!(m("POST /metrics HTTP/1.1\r\n\r\n"), "bad_method");
        assert_eq!(m("GET /metrics\r\n\r\n"), "bad_request");
        assert_eq!(m("GET /metrics SPDY/3\r\n\r\n"), "bad_request");
        assert_eq!(m("GET  /metrics HTTP/1.1\r\n\r\n"), "bad_request");
        assert_eq!(m("\u{fffd}\r\n\r\n"), "bad_request");
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
