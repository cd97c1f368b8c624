//! The control server: the unix socket (bound 0660 and group-owned, never placed
//! over somebody else's file), a bounded number of connections with an idle
//! timeout, back-off on failed accepts, and one JSON request per line, each served
//! by [`Daemon::handle`] on a blocking thread, except `capture`, which turns its
//! connection into a pcapng stream (`daemon/capture.rs`; no idle timeout then). The counters of all this are
//! [`ControlStats`](fabric_api::netd::ControlStats).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use fabric_api::netd::{Request, Response};
use fabric_api::MAX_REQUEST;
use fabric_util::error_chain;

use super::{Daemon, DaemonError};
use crate::config::ControlSpec;
use crate::port::{self as ports, SocketId};

/// Binds the control socket at `spec.path` with mode 0660 and group `spec.gid`
/// (owner: netd's user). It is bound under a temporary name in the same directory,
/// given its mode and group, and only then renamed into place, so it is never
/// reachable with the umask's mode. What is at the path already must be a stale
/// socket of netd's user (nobody listening); anything else is refused and kept.
fn bind_control(
    spec: &ControlSpec,
) -> std::io::Result<(std::os::unix::net::UnixListener, SocketId)> {
    use std::os::unix::fs::PermissionsExt;
    let path = &spec.path;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    ports::claim_socket_path(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = (|| {
        std::os::unix::fs::chown(&tmp, None, Some(spec.gid))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let id =
        ports::socket_id(path).ok_or_else(|| std::io::Error::other("control socket vanished"))?;
    listener.set_nonblocking(true)?;
    Ok((listener, id))
}

/// Serves the control socket until `shutdown` resolves.
///
/// Bounded: at most `spec.max_connections` connections at once (one more is told
/// so and closed, counted `refused_full`); a connection that sends no request for
/// `spec.idle_timeout` is closed (`closed_idle`). Each connection's peer
/// credentials (SO_PEERCRED: pid, uid, gid) are logged.
pub async fn serve_control(
    daemon: Arc<Daemon>,
    spec: ControlSpec,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let path = spec.path.clone();
    let (std_listener, id) =
        bind_control(&spec).map_err(|e| DaemonError::Control(path.clone(), e))?;
    let listener =
        UnixListener::from_std(std_listener).map_err(|e| DaemonError::Control(path.clone(), e))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(spec.max_connections));
    daemon
        .control
        .max
        .store(spec.max_connections, Ordering::Relaxed);
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    backoff.reset();
                    let cred = stream.peer_cred().ok();
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        daemon.control.refused_full.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = ?cred, max = spec.max_connections, "control connection refused: too many open");
                        tokio::spawn(refuse_conn(stream, spec.max_connections));
                        continue;
                    };
                    tracing::info!(
                        pid = ?cred.as_ref().and_then(|c| c.pid()),
                        uid = cred.as_ref().map(|c| c.uid()),
                        gid = cred.as_ref().map(|c| c.gid()),
                        "control connection"
                    );
                    let d = daemon.clone();
                    let idle = spec.idle_timeout;
                    tokio::spawn(async move {
                        d.control.open.fetch_add(1, Ordering::Relaxed);
                        serve_conn(&d, stream, idle).await;
                        d.control.open.fetch_sub(1, Ordering::Relaxed);
                        drop(slot);
                    });
                }
                Err(e) => {
                    // A pending connection stays pending while accept fails (EMFILE
                    // above all): retrying at once spins. Wait, longer each time.
                    let (wait, log) = backoff.failed();
                    if log {
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, failures = backoff.failures, "control accept failed; backing off");
                    }
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
    if ports::socket_id(&path) == Some(id) {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// The wait after a failed accept: 10 ms doubling to 1 s, reset by a success; a
/// log line for the first failure and every 100th.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u64,
    wait: Duration,
}

impl AcceptBackoff {
    fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.wait = (self.wait * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        (self.wait, self.failures % 100 == 1)
    }

    fn reset(&mut self) {
        self.wait = Duration::ZERO;
    }
}

/// Tells a connection over the cap why it is closed, reading (for at most a
/// second) the request it sends meanwhile, so that the client gets the answer
/// rather than a broken pipe.
async fn refuse_conn(mut stream: tokio::net::UnixStream, max: usize) {
    let resp = Response::fail(format!(
        "too many control connections (at most {max} at once); try again"
    ));
    let out = fabric_api::encode_line(&resp, b"{\"ok\":false}");
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&out).await?;
        let mut line = String::new();
        BufReader::new((&mut stream).take(MAX_REQUEST as u64))
            .read_line(&mut line)
            .await
    })
    .await;
}

async fn serve_conn(d: &Arc<Daemon>, stream: tokio::net::UnixStream, idle: Duration) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        match tokio::time::timeout(idle, lines.read_line(&mut line)).await {
            Err(_) => {
                d.control.closed_idle.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    idle_secs = idle.as_secs(),
                    "control connection idle; closed"
                );
                let resp = Response::fail(format!(
                    "no request for {} s; connection closed",
                    idle.as_secs()
                ));
                let out = fabric_api::encode_line(&resp, b"{\"ok\":false}");
                let _ = tokio::time::timeout(Duration::from_secs(1), w.write_all(&out)).await;
                return;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
        let resp = match fabric_api::decode_request::<Request>(line.as_bytes()) {
            Err(e) => Response::fail(e),
            // The connection becomes the capture's pcapng stream, to its end.
            Ok(Request::Capture {
                net,
                ports,
                count,
                snaplen,
                pass_fd,
            }) => {
                let args = (net, ports, count, snaplen, pass_fd);
                return super::capture::serve_capture(d, args, w, lines).await;
            }
            Ok(req) => {
                let d2 = d.clone();
                match tokio::task::spawn_blocking(move || d2.handle(req)).await {
                    Ok(Ok(data)) => Response::ok(data),
                    Ok(Err(e)) => Response::fail(error_chain(&e)),
                    Err(e) => Response::fail(format!("internal error: {e}")),
                }
            }
        };
        let out = fabric_api::encode_line(&resp, b"{\"ok\":false}");
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
