//! The daemon: listeners, connection limit, control socket, systemd
//! integration, signals and graceful shutdown.
//!
//! Theory of operation: `run` opens the catalog (creating configured disks),
//! binds its sockets (or adopts systemd's `LISTEN_FDS`), tells systemd it is
//! ready, and runs one accept loop per listener. Every connection holds a
//! permit of the connection semaphore (beyond `max_connections` a client is
//! closed at once), a slot of its client's share (beyond
//! `max_connections_per_client` from one source address, or one uid on the
//! unix socket, it is closed at once and counted) and a clone of `done_tx`; shutdown (SIGTERM / SIGINT) flips a
//! watch channel, accept loops stop, connections finish their in-flight work and
//! close (see `nbd`), and when the last `done_tx` clone is gone every disk is
//! flushed and `run` returns.
//!
//! Unix sockets (NBD and control) are bound, given mode 0660 and the
//! `socket_group`, and only then listened on, so no client ever connects to a
//! socket with other permissions; failing to set them stops the daemon.
//!
//! `--stdin` mode serves exactly one connection on stdin/stdout and binds
//! nothing, for `nbdinfo -- [ stord serve --stdin ... ]` style use.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric_util::sd_notify;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::catalog::{Catalog, CatalogError};
use crate::config::Config;
use crate::nbd::{self, Ctx, Stats};
use crate::sys;

/// Longest shutdown waits for connections to finish before flushing and exiting.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// cannot open the catalog
    #[error("cannot open the catalog")]
    Catalog(#[from] CatalogError),
    /// cannot listen on {addr}
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address or path.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// bad systemd socket activation (LISTEN_FDS)
    #[error("bad systemd socket activation (LISTEN_FDS): {0}")]
    Activation(String),
    /// cannot install signal handlers
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// serving stdin/stdout failed
    #[error("serving stdin/stdout failed")]
    Stdin(#[source] nbd::ConnError),
    /// cannot find the socket_group
    #[error("cannot find the socket_group `{group}`")]
    Group {
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the TLS credentials cannot be used
    #[error("the TLS credentials cannot be used")]
    Tls(#[from] crate::tls::TlsError),
}

/// Sockets' file mode: the owner and `socket_group` may connect.
const SOCKET_MODE: u32 = 0o660;

/// How `serve` runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve one connection on stdin/stdout and exit.
    pub stdin: bool,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, Option<PathBuf>),
}

/// Sockets systemd passed, if any and if they are meant for us.
fn activated_sockets() -> Result<Vec<OwnedFd>, ServerError> {
    let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(sys::getpid()) {
        return Ok(Vec::new());
    }
    let n: i32 = n
        .trim()
        .parse()
        .map_err(|_| ServerError::Activation(format!("LISTEN_FDS={n:?} is not a number")))?;
    if !(0..=64).contains(&n) {
        return Err(ServerError::Activation(format!(
            "LISTEN_FDS={n} out of range"
        )));
    }
    // The variables are for this process only; children must not see them.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    (0..n)
        .map(|i| {
            sys::adopt_fd(3 + i).map_err(|e| ServerError::Activation(format!("fd {}: {e}", 3 + i)))
        })
        .collect()
}

fn adopt_listener(fd: OwnedFd) -> Result<Listener, ServerError> {
    let raw = fd.as_raw_fd();
    let family =
        sys::socket_family(raw).map_err(|e| ServerError::Activation(format!("fd {raw}: {e}")))?;
    let bad = |e: std::io::Error| ServerError::Activation(format!("fd {raw}: {e}"));
    if family == libc::AF_UNIX {
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true).map_err(bad)?;
        Ok(Listener::Unix(
            UnixListener::from_std(l).map_err(bad)?,
            None,
        ))
    } else {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true).map_err(bad)?;
        Ok(Listener::Tcp(TcpListener::from_std(l).map_err(bad)?))
    }
}

fn bind_unix(path: &Path, gid: Option<u32>) -> Result<UnixListener, std::io::Error> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    // A socket file left by a previous run (crash, SIGKILL) would make bind fail.
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?
        }
        _ => {}
    }
    UnixListener::from_std(sys::listen_unix(path, SOCKET_MODE, gid)?)
}

/// Runs the daemon until SIGTERM / SIGINT (or, with `--stdin`, until the one
/// connection ends).
pub async fn run(config: Config, opts: Options) -> Result<(), ServerError> {
    // Startup work (creating configured disks) may block briefly; nothing else
    // runs yet, so doing it on this thread is harmless.
    let tls = crate::tls::Tls::load(&config)?;
    let catalog = Arc::new(Catalog::open(&config.state_dir, &config.disk)?);
    let stats = Arc::new(Stats::default());
    // `Config::load` validated the key (naming the file); nothing is left to refuse.
    if let Some(addr) = config.metrics_addr(Path::new("<config>")).ok().flatten() {
        let src = Arc::new(crate::metrics::Metrics {
            catalog: catalog.clone(),
            stats: stats.clone(),
        });
        let srv = fabric_util::metrics::serve(addr, "stord", src).map_err(|source| {
            ServerError::Bind {
                addr: format!("{addr} (key `metrics`)"),
                source,
            }
        })?;
        tracing::info!(metrics = %srv.local_addr(), "serving /metrics");
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ctx = Ctx {
        catalog: catalog.clone(),
        default_export: config.default_export.clone(),
        shutdown: shutdown_rx.clone(),
        stats: stats.clone(),
        limits: config.limits(),
        busy_poll: Arc::new(crate::poll::BusyPoll::new(config.busy_poll_us())),
        tls,
    };

    if opts.stdin {
        // SIGTERM ends the one session the same way it ends the daemon's.
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(ServerError::Signals)?;
        let tx = shutdown_tx.clone();
        tokio::spawn(async move {
            if sigterm.recv().await.is_some() {
                tracing::info!("SIGTERM: ending the stdin session");
                let _ = tx.send(true);
            }
        });
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let r = nbd::serve(ctx, nbd::Conn::Stdio).await;
        for d in catalog.disks() {
            let _ = d.flush();
        }
        return r.map_err(ServerError::Stdin);
    }

    let gid = match &config.socket_group {
        None => None,
        Some(g) => Some(sys::group_id(g).map_err(|source| ServerError::Group {
            group: g.clone(),
            source,
        })?),
    };
    let mut listeners = Vec::new();
    let activated = activated_sockets()?;
    if !activated.is_empty() {
        tracing::info!(
            count = activated.len(),
            "using sockets from systemd (listen / unix in the config are ignored)"
        );
        for fd in activated {
            listeners.push(adopt_listener(fd)?);
        }
    } else {
        if let Some(addr) = &config.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "NBD over TCP");
            listeners.push(Listener::Tcp(l));
        }
        if let Some(path) = &config.unix {
            let l = bind_unix(path, gid).map_err(|source| ServerError::Bind {
                addr: path.display().to_string(),
                source,
            })?;
            tracing::info!(path = %path.display(), "NBD over a unix socket");
            listeners.push(Listener::Unix(l, Some(path.clone())));
        }
    }
    let control = bind_unix(&config.control, gid).map_err(|source| ServerError::Bind {
        addr: config.control.display().to_string(),
        source,
    })?;

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServerError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ServerError::Signals)?;

    let limit = Arc::new(Semaphore::new(config.max_connections()));
    let per_client = Arc::new(PerClient {
        max: config.max_connections_per_client,
        open: Mutex::new(HashMap::new()),
    });
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut loops = Vec::new();
    for l in listeners {
        loops.push(tokio::spawn(accept_loop(
            l,
            ctx.clone(),
            limit.clone(),
            per_client.clone(),
            done_tx.clone(),
        )));
    }
    let control_task = tokio::spawn(crate::control::serve(
        control,
        catalog.clone(),
        stats.clone(),
        shutdown_rx.clone(),
    ));

    sd_notify("READY=1\nSTATUS=serving");
    tracing::info!(disks = catalog.disks().len(), "stord ready");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    sd_notify("STOPPING=1");
    let _ = shutdown_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let _ = control_task.await;
    drop(done_tx);
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_TIMEOUT:?}; exiting anyway");
    }
    let cat = catalog.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for d in cat.disks() {
            if let Err(e) = d.flush() {
                tracing::error!(disk = d.name(), error = %crate::error_chain(&e), "final flush failed");
            }
        }
    })
    .await;
    let _ = std::fs::remove_file(&config.control);
    tracing::info!("stopped");
    Ok(())
}

/// Who a connection is from, for `max_connections_per_client`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    /// A TCP peer's address (any port).
    Ip(std::net::IpAddr),
    /// A unix socket peer's user id.
    Uid(u32),
}

/// Open connections per client.
struct PerClient {
    max: Option<usize>,
    open: Mutex<HashMap<ClientKey, usize>>,
}

/// A connection's slot in its client's share; freed on drop.
struct ClientSlot {
    per: Arc<PerClient>,
    key: ClientKey,
}

impl PerClient {
    /// A slot for `key`, or `None` if that client is at its limit.
    fn enter(self: &Arc<Self>, key: Option<ClientKey>) -> Option<Option<ClientSlot>> {
        let (Some(max), Some(key)) = (self.max, key) else {
            return Some(None);
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Some(ClientSlot {
            per: self.clone(),
            key,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.per.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

async fn accept_loop(
    l: Listener,
    ctx: Ctx,
    limit: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    done: mpsc::Sender<()>,
) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            _ = crate::until_shutdown(&mut shutdown) => break,
            r = accept(&l) => r,
        };
        let (conn, peer, key) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "connection limit reached; closing the new connection");
            continue;
        };
        let Some(slot) = per_client.enter(key) else {
            ctx.stats.refused_per_client.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "max_connections_per_client reached; closing the new connection");
            continue;
        };
        ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
        let ctx2 = ctx.clone();
        let done2 = done.clone();
        tokio::spawn(async move {
            tracing::debug!(%peer, "connected");
            match nbd::serve(ctx2, conn).await {
                Ok(()) => tracing::debug!(%peer, "disconnected"),
                Err(e) => {
                    tracing::info!(%peer, error = %crate::error_chain(&e), "connection ended")
                }
            }
            drop(slot);
            drop(permit);
            drop(done2);
        });
    }
    if let Listener::Unix(_, Some(path)) = &l {
        let _ = std::fs::remove_file(path);
    }
}

async fn accept(l: &Listener) -> std::io::Result<(nbd::Conn, String, Option<ClientKey>)> {
    match l {
        Listener::Tcp(t) => {
            let (s, peer) = t.accept().await?;
            s.set_nodelay(true)?;
            Ok((
                nbd::Conn::Tcp(s),
                peer.to_string(),
                Some(ClientKey::Ip(peer.ip())),
            ))
        }
        Listener::Unix(u, _) => {
            let (s, _) = u.accept().await?;
            let uid = s.peer_cred().ok().map(|c| c.uid());
            let peer = match uid {
                Some(u) => format!("unix uid {u}"),
                None => "unix".to_string(),
            };
            Ok((nbd::Conn::Unix(s), peer, uid.map(ClientKey::Uid)))
        }
    }
}
