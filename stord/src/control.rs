//! The control API's server side: JSON over a unix socket, one request per line,
//! one response line each (the protocol, its types and the client that the CLI
//! uses are in `fabric_api::stord`).
//!
//! ```text
//! {"cmd":"list"}
//! {"cmd":"create","name":"d1","size":"64MiB","alloc":"dynamic"}
//! {"cmd":"resize","name":"d1","size":134217728}
//! {"cmd":"delete","name":"d1"}
//! {"cmd":"status"}
//! {"cmd":"import","name":"golden","from":"/srv/images/debian.qcow2"}
//! {"cmd":"clone","base":"golden","name":"vm1"}
//! {"cmd":"snapshot","name":"vm1","snap":"vm1-s1"}  (also snapshots, revert, flatten)
//! ```
//! `import` reads a file the daemon can read: the control socket is the
//! daemon's user and `control_group` only, so that is theirs to ask.
//! Responses are `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Requests
//! tagged `"op"`, as before this release, are still accepted.
//!
//! Catalog changes do file I/O (fsync, fallocate) and run on tokio's blocking
//! pool, so a slow disk never stalls the NBD connections' tasks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fabric_api::stord::{Request, Response, StatusInfo};
use fabric_api::MAX_REQUEST;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::nbd::Stats;

/// Executes one request against the catalog.
pub async fn handle(catalog: &Arc<Catalog>, stats: &Stats, req: Request) -> Response {
    let cat = catalog.clone();
    let res = match req {
        Request::Status {} => {
            let mut r = Response::ok();
            r.status = Some(StatusInfo {
                connections: stats.connections.load(Ordering::Relaxed),
                refused: stats.refused.load(Ordering::Relaxed),
                invalid_requests: stats.invalid_requests.load(Ordering::Relaxed),
                protocol_errors: stats.protocol_errors.load(Ordering::Relaxed),
                requests: stats.requests.load(Ordering::Relaxed),
                timeouts: stats.timeouts.load(Ordering::Relaxed),
                handshake_timeouts: stats.handshake_timeouts.load(Ordering::Relaxed),
                idle_closed: stats.idle_closed.load(Ordering::Relaxed),
                refused_per_client: stats.refused_per_client.load(Ordering::Relaxed),
                flush_failures: catalog.disks().iter().map(|d| d.flush_failures()).sum(),
                tls_handshakes_ok: stats.tls_handshakes_ok.load(Ordering::Relaxed),
                tls_handshakes_failed: stats.tls_handshakes_failed.load(Ordering::Relaxed),
                tls_allow_refused: stats.tls_allow_refused.load(Ordering::Relaxed),
                tls_plain_refused: stats.tls_plain_refused.load(Ordering::Relaxed),
            });
            return r;
        }
        Request::List {} => tokio::task::spawn_blocking(move || Ok(Some(cat.list()))).await,
        Request::Create {
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
        Request::Resize { name, size } => {
            tokio::task::spawn_blocking(move || cat.resize(&name, size.0).map(|_| None)).await
        }
        Request::Delete { name } => {
            tokio::task::spawn_blocking(move || cat.delete(&name).map(|_| None)).await
        }
        Request::Import { name, from, format } => {
            tokio::task::spawn_blocking(move || {
                cat.import(&name, std::path::Path::new(&from), format)
                    .map(|_| None)
            })
            .await
        }
        Request::Clone { base, name } => {
            tokio::task::spawn_blocking(move || cat.clone_disk(&base, &name).map(|_| None)).await
        }
        Request::Snapshot { name, snap } => {
            tokio::task::spawn_blocking(move || cat.snapshot(&name, &snap).map(|_| None)).await
        }
        Request::Snapshots { name } => {
            tokio::task::spawn_blocking(move || cat.snapshots(&name).map(Some)).await
        }
        Request::Revert { name, snap } => {
            tokio::task::spawn_blocking(move || cat.revert(&name, &snap).map(|_| None)).await
        }
        Request::Flatten { name } => {
            tokio::task::spawn_blocking(move || cat.flatten(&name).map(|_| None)).await
        }
    };
    match res {
        Ok(Ok(disks)) => {
            let mut r = Response::ok();
            r.disks = disks;
            r
        }
        Ok(Err(e)) => Response::fail(crate::error_chain(&e)),
        Err(e) => Response::fail(format!("internal error: {e}")),
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
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST {
            // A line this long is not a request: answer once and hang up.
            let r = Response::fail(format!("request longer than {MAX_REQUEST} bytes"));
            wr.write_all(&fabric_api::encode_line(&r, b"")).await?;
            return Ok(());
        }
        let resp = match fabric_api::decode_request::<Request>(&line) {
            Ok(req) => handle(&catalog, &stats, req).await,
            Err(e) => Response::fail(e),
        };
        wr.write_all(&fabric_api::encode_line(&resp, b"")).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one control session on a socket pair; returns the answer lines.
    async fn session(lines: &[&str]) -> Vec<serde_json::Value> {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(dir.path(), &[]).unwrap());
        let (client, server) = UnixStream::pair().unwrap();
        let task = tokio::spawn(client_session(server, catalog, Arc::new(Stats::default())));
        let (rd, mut wr) = client.into_split();
        for l in lines {
            wr.write_all(format!("{l}\n").as_bytes()).await.unwrap();
        }
        drop(wr);
        let mut out = Vec::new();
        let mut rd = BufReader::new(rd).lines();
        while let Some(l) = rd.next_line().await.unwrap() {
            out.push(serde_json::from_str(&l).unwrap());
        }
        task.await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn old_op_and_new_cmd_requests_are_both_served() {
        let r = session(&[
            r#"{"op":"create","name":"a","size":"1MiB","alloc":"fixed"}"#,
            r#"{"cmd":"create","name":"b","size":4096,"alloc":"dynamic"}"#,
            r#"{"op":"list"}"#,
            r#"{"cmd":"list"}"#,
            r#"{"cmd":"explode"}"#,
        ])
        .await;
        assert_eq!(r.len(), 5);
        assert_eq!(r[0]["ok"], true, "{}", r[0]);
        assert_eq!(r[1]["ok"], true, "{}", r[1]);
        assert_eq!(r[2], r[3]);
        let names: Vec<&str> = r[3]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(r[4]["ok"], false);
        assert!(r[4]["error"].as_str().unwrap().starts_with("bad request"));
    }
}
