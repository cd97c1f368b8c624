//! `vmm-shim ctl --api-sock PATH status|pause|resume|snapshot DIR|migrate tcp:HOST:PORT`:
//! a client of the control API
//! ([`super`]). It sends one request, prints the JSON answer on standard output and
//! fails (with the API's error message) on anything but 200.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// A `ctl` verb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GET /vm`.
    Status,
    /// `PATCH /vm {"state": "paused"}`.
    Pause,
    /// `PATCH /vm {"state": "running"}`.
    Resume,
    /// `PUT /snapshot {"dir": DIR, "resume": RESUME}`.
    Snapshot {
        /// Where.
        dir: std::path::PathBuf,
        /// Resume afterwards.
        resume: bool,
    },
    /// `PUT /migrate` with this body.
    Migrate(super::Migration),
}

/// Why a `ctl` call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The socket could not be reached or the exchange broke off.
    #[error("control API at {path}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not HTTP with a JSON body.
    #[error("control API at {path}: malformed answer")]
    Malformed {
        /// The socket.
        path: String,
    },
    /// The API refused or failed the request.
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// The API's error message.
        message: String,
    },
}

/// Largest answer read.
const MAX_ANSWER: u64 = 1 << 20;
/// How long the API has to answer (a migration of a large, busy guest takes a while).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends `method path` with `body` (JSON) to the API at `sock`; returns the status
/// code and the JSON answer.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), CtlError> {
    let shown = sock.display().to_string();
    let io = |source| CtlError::Io {
        path: shown.clone(),
        source,
    };
    let mut s = UnixStream::connect(sock).map_err(io)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(io)?;
    let malformed = || CtlError::Malformed {
        path: shown.clone(),
    };
    let end = fabric_util::http::head_end(&raw).ok_or_else(malformed)?;
    let line = std::str::from_utf8(raw.split(|&b| b == b'\n').next().unwrap_or_default())
        .map_err(|_| malformed())?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(malformed)?;
    let v = serde_json::from_slice(&raw[end..]).map_err(|_| malformed())?;
    Ok((status, v))
}

/// Runs a `ctl` verb: the API's answer on success, its error otherwise.
pub fn run(sock: &Path, action: &Action) -> Result<Value, CtlError> {
    let state = |s: &str| serde_json::json!({ "state": s });
    let (status, v) = match action {
        Action::Status => request(sock, "GET", "/vm", None)?,
        Action::Pause => request(sock, "PATCH", "/vm", Some(&state("paused")))?,
        Action::Resume => request(sock, "PATCH", "/vm", Some(&state("running")))?,
        Action::Snapshot { dir, resume } => {
            let body = serde_json::json!({ "dir": dir, "resume": resume });
            request(sock, "PUT", "/snapshot", Some(&body))?
        }
        Action::Migrate(m) => {
            let body = serde_json::json!({
                "to": m.to,
                "max_downtime_ms": m.max_downtime_ms,
                "auto_converge": m.auto_converge,
                "max_bandwidth_mib": m.max_bandwidth_mib,
            });
            request(sock, "PUT", "/migrate", Some(&body))?
        }
    };
    if status != 200 {
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no message")
            .to_string();
        return Err(CtlError::Refused { status, message });
    }
    Ok(v)
}
