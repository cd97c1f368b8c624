//! The `/metrics` HTTP/1.1 server: one accept thread, one thread per connection
//! (at most [`MAX_CONNECTIONS`]), one request per connection, every read and write
//! bounded in size and time (see the module doc of [`super`]).

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::{Labels, Out, Source};
use crate::http::{self, Head, Refusal};

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

/// The refusals this server makes (and exports), each counted.
const REFUSALS: [Refusal; 6] = [
    Refusal::TooManyConnections,
    Refusal::TooLarge,
    Refusal::Timeout,
    Refusal::BadRequest,
    Refusal::NotFound,
    Refusal::BadMethod,
];

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
        let refused: Vec<(Labels, u64)> = REFUSALS
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
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(REFUSE_TIMEOUT));
            respond(&mut stream, Refusal::TooManyConnections.status(), "", false);
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
fn read_head(stream: &mut TcpStream) -> Option<Asked> {
    match http::read_head(stream, MAX_REQUEST, Instant::now() + READ_TIMEOUT) {
        Head::Complete { head, .. } => Some(parse_head(&head)),
        Head::TooLarge => Some(Asked::Refused(Refusal::TooLarge)),
        Head::Timeout => Some(Asked::Refused(Refusal::Timeout)),
        // The client went away before a whole request: nothing to answer.
        Head::Gone => None,
    }
}

/// Parses the request line of a complete head.
fn parse_head(head: &[u8]) -> Asked {
    let Some((method, target)) = http::request_line(head) else {
        return Asked::Refused(Refusal::BadRequest);
    };
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

fn connection(mut stream: TcpStream, reg: &Registry, stats: &Stats) {
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    match read_head(&mut stream) {
        None => {}
        Some(Asked::Refused(r)) => {
            stats.refuse(r);
            respond(&mut stream, r.status(), "", false);
            http::drain(&mut stream);
        }
        Some(Asked::Metrics { head }) => {
            stats.scrapes.fetch_add(1, Ordering::Relaxed);
            respond(&mut stream, "200 OK", &encode(reg), head);
        }
    }
}

/// Writes one answer and closes (errors: the client is gone, nothing to do).
fn respond(stream: &mut TcpStream, status: &str, body: &str, head_only: bool) {
    let ctype = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
    http::respond(stream, status, ctype, body.as_bytes(), head_only);
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
}
