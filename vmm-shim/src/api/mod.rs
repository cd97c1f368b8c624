//! The control API (`--api-sock PATH`): HTTP/1.1 with JSON bodies on a unix socket,
//! as Firecracker and cloud-hypervisor serve theirs, so `curl --unix-socket PATH`
//! drives it; `vmm-shim ctl` ([`client`]) is a client of it.
//!
//! Routes: `GET /vm` answers the VM's state (`running` / `paused`), vCPUs, memory and
//! devices with their counters, plus the API's own counters (`api`: requests served,
//! refusals by reason); `PATCH /vm` with `{"state": "paused" | "running"}` pauses or
//! resumes the vCPUs and answers as `GET /vm` does; `PUT /snapshot` with
//! `{"dir": PATH, "resume": false}` writes a snapshot (see `vmm::snapshot`) and
//! answers its files and size; `PUT /migrate` with `{"to": "tcp:HOST:PORT",
//! "max_downtime_ms": 50, "auto_converge": true, "max_bandwidth_mib": 0}`
//! live-migrates the VM (see `vmm::migrate`; `auto_converge` false never throttles
//! the vCPUs; `max_bandwidth_mib` caps pre-copy's rate, 0 for no cap) and answers
//! `{"downtime_ms", "total_ms", "rounds", "bytes", "mode", "dirty_logged_pages",
//! "device_written_pages", "throttle_pct", "converged"}` when it is done, after
//! which this vmm-shim exits 0. Errors are JSON:
//! `{"error": MESSAGE}` with a 4xx (the request) or 5xx (the VM could not do it).
//!
//! Every request is bounded, so a client can neither hurt the guest nor the VMM: at
//! most [`MAX_CONNECTIONS`] connections at once (503), a head of [`MAX_HEAD`] bytes
//! (431), a body of [`MAX_BODY`] bytes with a `Content-Length` (413, 411 without
//! one), the whole request within [`READ_TIMEOUT`] (408), one request per
//! connection. The server runs on threads of its own (an accept thread, one per
//! connection); the guest's threads never wait for it. The bounded reading is
//! [`fabric_util::http`]'s, shared with the `/metrics` server.

pub mod client;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_util::http::{self, Head, Refusal};
use serde::Deserialize;
use serde_json::{json, Value};

/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest request head.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 16 * 1024;
/// Time a client has to send its whole request (head and body).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take its answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API asks of the VM.
pub trait Vm: Send + Sync + 'static {
    /// `GET /vm`: the state, vCPUs, memory and devices.
    fn describe(&self) -> Value;
    /// `PATCH /vm`: pause (`true`) or resume; the error says why it could not.
    fn set_paused(&self, paused: bool) -> Result<(), String>;
    /// `PUT /snapshot`: writes a snapshot to `dir`; stays paused unless `resume`.
    fn snapshot(&self, dir: &Path, resume: bool) -> Result<Value, String>;
    /// `PUT /migrate`: moves the VM as `m` says; the answer is the migration's
    /// figures.
    fn migrate(&self, m: &Migration) -> Result<Value, String>;
    /// Called once the answer to a successful `PUT /migrate` is sent: the VM ends.
    fn migrated(&self);
}

/// The API's own counters.
#[derive(Default)]
struct Stats {
    served: AtomicU64,
    failed: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    open: AtomicUsize,
}

impl Stats {
    fn json(&self) -> Value {
        let refused: serde_json::Map<String, Value> = Refusal::ALL
            .iter()
            .map(|&r| {
                let n = self.refused[r as usize].load(Ordering::Relaxed);
                (r.reason().to_string(), json!(n))
            })
            .collect();
        json!({
            "served": self.served.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "refused": refused,
        })
    }
}

/// An error from binding the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process answers on the path.
    #[error("{0} is in use by another process")]
    InUse(String),
    /// The socket could not be made.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Listens on `path` (replacing a stale socket file nobody answers on) and serves
/// the API for `vm` on threads of its own.
pub fn serve(path: &Path, vm: Arc<dyn Vm>) -> Result<(), ApiError> {
    let shown = path.display().to_string();
    let bind_err = |source| ApiError::Bind {
        path: shown.clone(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(shown));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)?
        }
        Err(e) => return Err(bind_err(e)),
    };
    let stats = Arc::new(Stats::default());
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || accept_loop(listener, vm, stats))
        .map_err(bind_err)?;
    Ok(())
}

fn accept_loop(listener: UnixListener, vm: Arc<dyn Vm>, stats: Arc<Stats>) {
    for conn in listener.incoming() {
        let mut s = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning.
                tracing::warn!(error = %e, "api: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stats.open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            stats.open.fetch_sub(1, Ordering::AcqRel);
            let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
            refuse(
                &mut s,
                &stats,
                Refusal::TooManyConnections,
                "too many connections",
            );
            continue;
        }
        let (vm, st) = (vm.clone(), stats.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                connection(s, &*vm, &st);
                st.open.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            stats.open.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "api: cannot start a connection thread");
        }
    }
}

/// Counts and answers a refusal, then drains what the client still sends.
fn refuse(s: &mut UnixStream, stats: &Stats, r: Refusal, msg: &str) {
    stats.refused[r as usize].fetch_add(1, Ordering::Relaxed);
    tracing::debug!(reason = r.reason(), msg, "api: request refused");
    answer(s, r.status(), &json!({ "error": msg }));
    http::drain(s);
}

fn answer(s: &mut UnixStream, status: &str, body: &Value) {
    let mut b = body.to_string().into_bytes();
    b.push(b'\n');
    http::respond(s, status, "application/json", &b, false);
}

/// A request as read: method, path, body.
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Reads one request within the bounds of the module doc.
fn read_request(s: &mut UnixStream) -> Result<Option<Request>, (Refusal, String)> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let timeout = || (Refusal::Timeout, "request not received in time".to_string());
    let (head, rest) = match http::read_head(s, MAX_HEAD, deadline) {
        Head::Complete { head, rest } => (head, rest),
        Head::TooLarge => {
            return Err((
                Refusal::TooLarge,
                format!("request head over {MAX_HEAD} bytes"),
            ))
        }
        Head::Timeout => return Err(timeout()),
        Head::Gone => return Ok(None),
    };
    let bad = |m: &str| (Refusal::BadRequest, m.to_string());
    let (method, target) =
        http::request_line(&head).ok_or_else(|| bad("malformed request line"))?;
    let (method, path) = (
        method.to_string(),
        target.split('?').next().unwrap_or("").to_string(),
    );
    if http::header(&head, "transfer-encoding").is_some() {
        return Err((
            Refusal::NoLength,
            "chunked bodies are not taken; send Content-Length".into(),
        ));
    }
    let len = match http::header(&head, "content-length") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?,
    };
    if len > MAX_BODY {
        return Err((Refusal::BodyTooLarge, format!("body over {MAX_BODY} bytes")));
    }
    if len == 0 && matches!(method.as_str(), "PUT" | "PATCH") {
        return Err((Refusal::NoLength, format!("{method} needs a JSON body")));
    }
    let body = match http::read_body(s, rest, len, deadline) {
        Ok(b) => b,
        Err(Head::Timeout) => return Err(timeout()),
        Err(_) => return Ok(None),
    };
    Ok(Some(Request { method, path, body }))
}

/// `PATCH /vm`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: String,
}

/// `PUT /snapshot`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: std::path::PathBuf,
    #[serde(default)]
    resume: bool,
}

/// `PUT /migrate`'s body: where to and how.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    /// `tcp:HOST:PORT`, a `vmm-shim --incoming`.
    pub to: String,
    /// The longest pause pre-copy aims for (1 to 60000).
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Throttle the vCPUs where the dirty set does not shrink (default on).
    #[serde(default = "default_auto_converge")]
    pub auto_converge: bool,
    /// The most pre-copy sends while the VM runs, in MiB/s (0, the default: as
    /// fast as the connection goes), as QEMU's `max-bandwidth` and `virsh migrate
    /// --bandwidth`; the paused last part goes at full speed.
    #[serde(default)]
    pub max_bandwidth_mib: u64,
}

/// The largest `max_bandwidth_mib` (1 TiB/s).
pub const MAX_BANDWIDTH_MIB: u64 = 1 << 20;

fn default_auto_converge() -> bool {
    true
}

/// The downtime a migration aims for unless told otherwise.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 50;

fn default_downtime() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

fn connection(mut s: UnixStream, vm: &dyn Vm, stats: &Stats) {
    if s.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let req = match read_request(&mut s) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err((r, msg)) => return refuse(&mut s, stats, r, &msg),
    };
    match route(&req, vm, stats) {
        Ok(v) => {
            stats.served.fetch_add(1, Ordering::Relaxed);
            answer(&mut s, "200 OK", &v);
            if req.path == "/migrate" {
                drop(s);
                vm.migrated();
            }
        }
        Err(Outcome::Refused(r, msg)) => refuse(&mut s, stats, r, &msg),
        Err(Outcome::Failed(msg)) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %msg, path = %req.path, "api: request failed");
            answer(
                &mut s,
                "500 Internal Server Error",
                &json!({ "error": msg }),
            );
        }
    }
}

/// Why a request was not answered with 200.
enum Outcome {
    /// The request is wrong.
    Refused(Refusal, String),
    /// The VM could not do it.
    Failed(String),
}

fn describe(vm: &dyn Vm, stats: &Stats) -> Value {
    let mut v = vm.describe();
    if let Some(o) = v.as_object_mut() {
        o.insert("api".into(), stats.json());
    }
    v
}

fn route(req: &Request, vm: &dyn Vm, stats: &Stats) -> Result<Value, Outcome> {
    let bad = |m: String| Outcome::Refused(Refusal::BadRequest, m);
    match (req.path.as_str(), req.method.as_str()) {
        ("/vm", "GET") => Ok(describe(vm, stats)),
        ("/vm", "PATCH") => {
            let b: StateBody = serde_json::from_slice(&req.body).map_err(|e| {
                bad(format!(
                    "body: expected {{\"state\": \"paused\" | \"running\"}}: {e}"
                ))
            })?;
            let paused = match b.state.as_str() {
                "paused" => true,
                "running" => false,
                other => {
                    return Err(bad(format!(
                        "state: expected \"paused\" or \"running\", got {other:?}"
                    )))
                }
            };
            vm.set_paused(paused).map_err(Outcome::Failed)?;
            Ok(describe(vm, stats))
        }
        ("/vm", m) => Err(Outcome::Refused(
            Refusal::BadMethod,
            format!("{m} /vm: only GET and PATCH"),
        )),
        ("/snapshot", "PUT") => {
            let b: SnapshotBody = serde_json::from_slice(&req.body).map_err(|e| {
                bad(format!(
                    "body: expected {{\"dir\": PATH, \"resume\": false}}: {e}"
                ))
            })?;
            if !b.dir.is_absolute() {
                return Err(bad("dir: expected an absolute path".into()));
            }
            vm.snapshot(&b.dir, b.resume).map_err(Outcome::Failed)
        }
        ("/migrate", "PUT") => {
            let b: Migration = serde_json::from_slice(&req.body).map_err(|e| {
                bad(format!(
                    "body: expected {{\"to\": \"tcp:HOST:PORT\", \"max_downtime_ms\": N, \"auto_converge\": BOOL, \"max_bandwidth_mib\": N}}: {e}"
                ))
            })?;
            if !b.to.starts_with("tcp:") {
                return Err(bad(format!("to: expected tcp:HOST:PORT, got {:?}", b.to)));
            }
            if !(1..=60_000).contains(&b.max_downtime_ms) {
                return Err(bad("max_downtime_ms: expected 1 to 60000".into()));
            }
            if b.max_bandwidth_mib > MAX_BANDWIDTH_MIB {
                return Err(bad(format!(
                    "max_bandwidth_mib: expected 0 (no limit) to {MAX_BANDWIDTH_MIB}"
                )));
            }
            vm.migrate(&b).map_err(Outcome::Failed)
        }
        ("/snapshot" | "/migrate", m) => Err(Outcome::Refused(
            Refusal::BadMethod,
            format!("{m} {}: only PUT", req.path),
        )),
        (p, _) => Err(Outcome::Refused(Refusal::NotFound, format!("no route {p}"))),
    }
}

#[cfg(test)]
mod tests;
