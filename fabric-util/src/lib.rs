//! fabric-util: the small pieces netd, stord and vmm-shim all need, written once.
//!
//! - [`error_chain`]: an error with its whole `source()` chain on one line, for logs
//!   and control-API answers (a bare `{e}` would drop the cause);
//! - [`sd_notify`]: systemd's readiness protocol (`NOTIFY_SOCKET`), best effort;
//! - [`init_logging`]: `tracing` to stderr, filtered by each daemon's own variable;
//! - [`Size`]: a byte count as people write it (`1GiB`, `1G`, `1g`, `4096`), one
//!   parser for stord's disk sizes and vmm-shim's `--mem`;
//! - [`MacAddr`]: an Ethernet address, parsed and printed as `52:54:00:12:34:56`;
//! - [`toml_file`]: strict TOML config files whose errors name the file;
//! - [`fs`]: state files replaced atomically and durably ([`fs::write_durable`]);
//! - [`sys`]: TAP devices and interface ioctls, the only `unsafe` of the crate;
//! - [`cli`]: the daemons' `serve --config` arguments and their exit status;
//! - [`http`]: the bounded HTTP/1.1 request reading and answering the small servers
//!   share (`/metrics`, vmm-shim's control API);
//! - [`metrics`]: Prometheus metrics and the bounded `/metrics` HTTP server.
//!
//! Nothing here but [`metrics::serve`] starts threads, and nothing needs a runtime: the daemons use it from tokio
//! tasks, the VMM from plain threads.

pub mod cli;
pub mod fs;
pub mod http;
mod mac;
pub mod metrics;
mod size;
pub mod sys;
pub mod toml_file;

pub use mac::{MacAddr, MacParseError};
pub use size::{Size, SizeError};

/// Formats an error with its whole `source()` chain: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`) to systemd's notify socket when
/// `NOTIFY_SOCKET` is set; an abstract socket is written `@name`. Failures are
/// logged only: a daemon runs the same with or without a supervisor.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "sd_notify: no socket");
            return;
        }
    };
    let res = if let Some(abs) = path.as_encoded_bytes().strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Sends `READY=1` (see [`sd_notify`]).
pub fn sd_notify_ready() {
    sd_notify("READY=1");
}

/// Sends `tracing` events to stderr, filtered by the environment variable `env_var`
/// (`RUST_LOG` syntax), or at `default` when it is unset or unreadable. Stderr,
/// because stdout carries data (NBD in `stord serve --stdin`, the guest console of
/// vmm-shim, CLI answers). Colour only for a person at a terminal: under systemd
/// stderr is the journal, which would store the escape codes verbatim.
pub fn init_logging(env_var: &str, default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env_var)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn error_chain_prints_every_cause() {
        let e = Outer(Inner(std::io::Error::other("root")));
        assert_eq!(error_chain(&e), "outer: inner: root");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }

    #[test]
    fn sd_notify_reaches_a_datagram_socket() {
        let dir = std::env::temp_dir().join(format!("fabric-util-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The only test of this crate that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        sd_notify("READY=1\nSTATUS=testing");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=testing");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
