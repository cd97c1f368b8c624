//! Asking netd for a `vm` port: one JSON request line on its control socket, one
//! response line back. netd creates the TAP, attaches its kernel side to the network
//! and answers with the interface name, which the VMM then opens as a TAP queue.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A netd control error.
#[derive(Debug, thiserror::Error)]
pub enum NetdError {
    /// netd's control socket could not be reached
    #[error("could not talk to netd at {path}")]
    Io {
        /// Socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// netd refused the request
    #[error("netd refused a vm port on network {network:?}: {message}")]
    Refused {
        /// Network name.
        network: String,
        /// netd's error, or what was wrong with its answer.
        message: String,
    },
}

/// Requests a `vm` port on `network` (with this guest MAC) and returns its TAP name.
pub fn request_vm_port(control: &Path, network: &str, mac: &str) -> Result<String, NetdError> {
    let io = |source| NetdError::Io {
        path: control.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(control).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let req = serde_json::json!({
        "cmd": "port.add",
        "network": network,
        "kind": "vm",
        "mac": mac,
    });
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).map_err(io)?;
    let refused = |message: String| NetdError::Refused {
        network: network.to_string(),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_str(resp.trim()).map_err(|e| refused(format!("bad answer: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(refused(err.to_string()));
    }
    let r = v.get("result").unwrap_or(&v);
    let name = r
        .get("ifname")
        .or_else(|| r.get("tap"))
        .or_else(|| r.get("port").and_then(|p| p.get("ifname")))
        .and_then(|n| n.as_str())
        .ok_or_else(|| refused(format!("answer without an interface name: {resp}")))?;
    Ok(name.to_string())
}
