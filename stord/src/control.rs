//! The control API: JSON over a unix socket, one request per line, one response
//! line each. The same types serve the daemon side ([`handle`]) and the CLI
//! client ([`call`]).
//!
//! ```text
//! {"op":"list"}
//! {"op":"create","name":"d1","size":"64MiB","alloc":"dynamic"}
//! {"op":"resize","name":"d1","size":134217728}
//! {"op":"delete","name":"d1"}
//! {"op":"status"}
//! ```
//! Responses are `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::catalog::{Catalog, DiskInfo};
use crate::config::{Alloc, Size};
use crate::nbd::Stats;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlRequest {
    /// List disks.
    List {},
    /// Create a disk.
    Create {
        /// Name.
        name: String,
        /// Size.
        size: Size,
        /// Allocation.
        alloc: Alloc,
        /// Read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Resize a disk.
    Resize {
        /// Name.
        name: String,
        /// New size.
        size: Size,
    },
    /// Delete a disk (refused while connected).
    Delete {
        /// Name.
        name: String,
    },
    /// Counters.
    Status {},
}

/// Server counters as reported by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused over the limit.
    pub refused: u64,
    /// Requests answered with an error because they were invalid.
    pub invalid_requests: u64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: u64,
    /// Requests served.
    pub requests: u64,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Success.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskInfo>>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusInfo>,
}

impl ControlResponse {
    fn ok() -> Self {
        ControlResponse {
            ok: true,
            error: None,
            disks: None,
            status: None,
        }
    }
    fn fail(e: String) -> Self {
        ControlResponse {
            ok: false,
            error: Some(e),
            disks: None,
            status: None,
        }
    }
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// cannot reach the control socket {path}
    #[error("cannot reach the control socket {path} (is stord running?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// control socket I/O failed
    #[error("control socket I/O failed")]
    Io(#[from] std::io::Error),
    /// the daemon sent a malformed response
    #[error("the daemon sent a malformed response")]
    Malformed(#[source] serde_json::Error),
    /// the daemon refused: {0}
    #[error("{0}")]
    Refused(String),
}

/// Executes one request against the catalog.
pub async fn handle(catalog: &Arc<Catalog>, stats: &Stats, req: ControlRequest) -> ControlResponse {
    let cat = catalog.clone();
    let res = match req {
        ControlRequest::Status {} => {
            let mut r = ControlResponse::ok();
            r.status = Some(StatusInfo {
                connections: stats.connections.load(Ordering::Relaxed),
                refused: stats.refused.load(Ordering::Relaxed),
                invalid_requests: stats.invalid_requests.load(Ordering::Relaxed),
                protocol_errors: stats.protocol_errors.load(Ordering::Relaxed),
                requests: stats.requests.load(Ordering::Relaxed),
            });
            return r;
        }
        ControlRequest::List {} => tokio::task::spawn_blocking(move || Ok(Some(cat.list()))).await,
        ControlRequest::Create {
            name,
            size,
            alloc,
            read_only,
        } => {
            tokio::task::spawn_blocking(move || {
                cat.create(&name, size.0, alloc, read_only).map(|_| None)
            })
            .await
        }
        ControlRequest::Resize { name, size } => {
            tokio::task::spawn_blocking(move || cat.resize(&name, size.0).map(|_| None)).await
        }
        ControlRequest::Delete { name } => {
            tokio::task::spawn_blocking(move || cat.delete(&name).map(|_| None)).await
        }
    };
    match res {
        Ok(Ok(disks)) => {
            let mut r = ControlResponse::ok();
            r.disks = disks;
            r
        }
        Ok(Err(e)) => ControlResponse::fail(crate::error_chain(&e)),
        Err(e) => ControlResponse::fail(format!("internal error: {e}")),
    }
}

/// Serves the control socket until shutdown.
pub async fn serve(
    listener: UnixListener,
    catalog: Arc<Catalog>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::until_shutdown(&mut shutdown) => return,
        };
        let cat = catalog.clone();
        let st = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = client_session(stream, cat, st).await {
                tracing::debug!(error = %e, "control client ended");
            }
        });
    }
}

async fn client_session(
    stream: UnixStream,
    catalog: Arc<Catalog>,
    stats: Arc<Stats>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut rd)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let resp = if line.len() > MAX_LINE {
            let r = ControlResponse::fail(format!("request longer than {MAX_LINE} bytes"));
            let mut out = serde_json::to_vec(&r).unwrap_or_default();
            out.push(b'\n');
            wr.write_all(&out).await?;
            return Ok(());
        } else {
            match serde_json::from_slice::<ControlRequest>(&line) {
                Ok(req) => handle(&catalog, &stats, req).await,
                Err(e) => ControlResponse::fail(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        wr.write_all(&out).await?;
    }
}

/// Sends one request to the daemon and returns its (successful) response.
pub async fn call(path: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(ControlError::Malformed)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut rd = BufReader::new(rd);
    let mut resp = String::new();
    rd.read_line(&mut resp).await?;
    let r: ControlResponse = serde_json::from_str(&resp).map_err(ControlError::Malformed)?;
    if !r.ok {
        return Err(ControlError::Refused(
            r.error.unwrap_or_else(|| "unknown error".into()),
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"op":"create","name":"a","size":"1MiB","alloc":"fixed"}"#)
                .unwrap();
        assert_eq!(
            r,
            ControlRequest::Create {
                name: "a".into(),
                size: Size(1 << 20),
                alloc: Alloc::Fixed,
                read_only: false
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }
}
