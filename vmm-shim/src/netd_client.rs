//! Asking netd for a `vm` port, through netd's control API (`fabric_api::netd`):
//! a typed `port_add` request with a port of kind `vm`, the TAP name and the guest's
//! MAC, one answer line back (`{"ok":true}` or `{"ok":false,"error":..}`). netd
//! creates the TAP and reaches the guest through AF_PACKET on the TAP's kernel side;
//! the VMM opens the TAP by name as its queue. On shutdown the VMM removes the port
//! (`port_del`). The client bounds the wait (10 s) and the answer (64 KiB): a VMM
//! starting up must not hang on, or buffer without end from, a broken netd.
//!
//! Offloads. netd's AF_PACKET socket on a vm port carries a virtio-net header before
//! every frame both ways (PACKET_VNET_HDR), so checksum and segmentation metadata
//! crosses it: a guest's offloaded frames reach netd with what it needs to finish
//! them for ports that cannot take them, and netd can hand the guest super-frames.
//! Whether the guest is offered those offloads is the VMM's choice per NIC, made
//! where the NIC is built (`vmm.rs`).

use std::path::Path;
use std::time::Duration;

use fabric_api::netd::{PortConfig, PortKind, Request};
use fabric_api::{Client, ClientError};

/// How long the VMM waits for netd, to connect and to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line read from netd.
const MAX_ANSWER: usize = 64 << 10;

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
        source: ClientError,
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

fn call(control: &Path, network: &str, req: &Request) -> Result<(), NetdError> {
    let client = Client::new(control).timeout(TIMEOUT).max_reply(MAX_ANSWER);
    match client.call(req) {
        Ok(_) => Ok(()),
        Err(
            e @ (ClientError::Connect { .. } | ClientError::Io(_) | ClientError::TimedOut { .. }),
        ) => Err(NetdError::Io {
            path: control.display().to_string(),
            source: e,
        }),
        Err(e) => Err(NetdError::Refused {
            network: network.to_string(),
            message: fabric_util::error_chain(&e),
        }),
    }
}

/// Adds a `vm` port named `ifname` (netd creates the TAP) on `network` for a guest
/// with this MAC. The caller then opens the TAP by that name.
pub fn add_vm_port(
    control: &Path,
    network: &str,
    ifname: &str,
    mac: &str,
) -> Result<(), NetdError> {
    let port = PortConfig {
        name: None,
        kind: PortKind::Vm,
        ifname: Some(ifname.to_string()),
        mac: Some(mac.to_string()),
        netns: None,
        path: None,
        persistent: false,
        guard: None,
        vxlan: Default::default(),
    };
    let req = Request::PortAdd {
        net: network.to_string(),
        port,
    };
    call(control, network, &req)
}

/// Removes the port again (on VM shutdown).
pub fn del_port(control: &Path, network: &str, name: &str) -> Result<(), NetdError> {
    let req = Request::PortDel {
        net: network.to_string(),
        name: name.to_string(),
    };
    call(control, network, &req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::serve_one;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::thread::JoinHandle;

    /// A scripted netd: its control socket, and the thread that answers the first
    /// client with `serve` (see [`serve_one`]).
    fn fake_netd<T: Send + 'static>(
        serve: impl FnOnce(UnixStream) -> T + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, JoinHandle<T>) {
        serve_one("ctl.sock", serve)
    }

    #[test]
    fn an_endless_answer_is_cut_off_not_buffered() {
        let (_dir, path, t) = fake_netd(|mut s| {
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

    #[test]
    fn the_request_is_a_typed_port_add() {
        let (_dir, path, t) = fake_netd(|mut s| {
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            s.write_all(b"{\"ok\":false,\"error\":\"no network named \\\"lab\\\"\"}\n")
                .unwrap();
            line
        });
        let err = add_vm_port(&path, "lab", "vs1n0", "52:54:00:00:00:01").unwrap_err();
        assert_eq!(
            err.to_string(),
            "netd refused a vm port on network \"lab\": no network named \"lab\""
        );
        let v: serde_json::Value = serde_json::from_str(&t.join().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cmd": "port_add", "net": "lab", "port": {
                "name": null, "kind": "vm", "ifname": "vs1n0", "mac": "52:54:00:00:00:01",
                "netns": null, "path": null, "persistent": false}})
        );
    }
}
