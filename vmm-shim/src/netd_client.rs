//! Asking netd for a `vm` port: one JSON request line on its control socket
//! (`{"cmd":"port_add","net":..,"port":{"kind":"vm","ifname":..,"mac":..}}`), one
//! response line back (`{"ok":true}` or `{"ok":false,"error":..}`). netd creates the
//! TAP and reaches the guest through AF_PACKET on the TAP's kernel side; the VMM opens
//! the TAP by name as its queue. On shutdown the VMM removes the port (`port_del`).
//!
//! netd's AF_PACKET side moves plain frames, without GSO metadata, so a NIC on a netd
//! port offers the guest no checksum or segmentation offloads.

use std::io::{BufRead, BufReader, Read, Write};
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

/// Longest answer line read from netd.
const MAX_ANSWER: u64 = 64 << 10;

fn call(control: &Path, req: serde_json::Value) -> Result<serde_json::Value, NetdError> {
    let io = |source| NetdError::Io {
        path: control.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(control).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    // One answer line is small; a peer that streams bytes without a newline must not
    // grow this buffer without bound (the read timeout alone does not stop it).
    let mut resp = String::new();
    BufReader::new(&s)
        .take(MAX_ANSWER)
        .read_line(&mut resp)
        .map_err(io)?;
    let network = req
        .get("net")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string();
    let refused = |message: String| NetdError::Refused {
        network: network.clone(),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_str(resp.trim()).map_err(|e| refused(format!("bad answer: {e}")))?;
    if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        return Err(refused(msg.to_string()));
    }
    Ok(v.get("data").cloned().unwrap_or(serde_json::Value::Null))
}

/// Adds a `vm` port named `ifname` (netd creates the TAP) on `network` for a guest
/// with this MAC. The caller then opens the TAP by that name.
pub fn add_vm_port(
    control: &Path,
    network: &str,
    ifname: &str,
    mac: &str,
) -> Result<(), NetdError> {
    call(
        control,
        serde_json::json!({
            "cmd": "port_add",
            "net": network,
            "port": { "kind": "vm", "ifname": ifname, "mac": mac },
        }),
    )
    .map(|_| ())
}

/// Removes the port again (on VM shutdown).
pub fn del_port(control: &Path, network: &str, name: &str) -> Result<(), NetdError> {
    call(
        control,
        serde_json::json!({ "cmd": "port_del", "net": network, "name": name }),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_endless_answer_is_cut_off_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let chunk = vec![b'x'; 64 << 10];
            // Up to 8 MiB without a newline; the client must stop reading long before.
            let mut sent = 0;
            for _ in 0..128 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let err = add_vm_port(&path, "lab", "tap0", "52:54:00:00:00:01").unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        let sent = t.join().unwrap();
        assert!(sent < 8 << 20, "the client read all {sent} bytes");
    }
}
