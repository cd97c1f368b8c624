//! The control protocol: JSON over a unix socket, one request per line, one
//! response line.
//!
//! Requests are `{"cmd": "...", ...}` ([`Request`]); responses are
//! `{"ok": true, "data": ...}` or `{"ok": false, "error": "..."}` ([`Response`]).
//! The same types serve the daemon side ([`crate::daemon`]) and the CLI client
//! ([`call`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::PortConfig;

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// List networks.
    NetList,
    /// List the ports of a network, with counters.
    PortList {
        /// Network.
        net: String,
    },
    /// Add a port at runtime.
    PortAdd {
        /// Network.
        net: String,
        /// The port, as in the config file.
        port: PortConfig,
    },
    /// Remove a port at runtime.
    PortDel {
        /// Network.
        net: String,
        /// Port name.
        name: String,
    },
    /// The learned MAC table.
    Mac {
        /// Network.
        net: String,
    },
    /// DHCP leases.
    Leases {
        /// Network.
        net: String,
    },
    /// Add a port forward to a NAT network.
    ForwardAdd {
        /// Network.
        net: String,
        /// The forward, as in the config file.
        forward: crate::nat::Forward,
    },
    /// Remove a port forward.
    ForwardDel {
        /// Network.
        net: String,
        /// Protocol.
        proto: crate::nat::Proto,
        /// Host address ("ADDR:PORT" or "PORT").
        host: String,
    },
    /// List the port forwards of a NAT network.
    ForwardList {
        /// Network.
        net: String,
    },
    /// List the NAT flows of a network.
    Flows {
        /// Network.
        net: String,
    },
    /// The NAT router's counters.
    NatStats {
        /// Network.
        net: String,
    },
    /// The DHCP server's counters.
    DhcpStats {
        /// Network.
        net: String,
    },
}

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Success.
    pub ok: bool,
    /// Result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Message (with its cause chain) on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// cannot connect to control socket {path}
    #[error("cannot connect to control socket {path}")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// control socket I/O failed
    #[error("control socket I/O failed")]
    Io(#[source] std::io::Error),
    /// bad response from netd
    #[error("bad response from netd")]
    BadResponse(#[source] serde_json::Error),
    /// netd: {0}
    #[error("netd: {0}")]
    Refused(String),
}

/// Sends one request, returns the response data.
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let mut s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line =
        serde_json::to_vec(req).map_err(|e| ClientError::Io(std::io::Error::other(e)))?;
    line.push(b'\n');
    s.write_all(&line).map_err(ClientError::Io)?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .map_err(ClientError::Io)?;
    let r: Response = serde_json::from_str(&resp).map_err(ClientError::BadResponse)?;
    if r.ok {
        Ok(r.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Refused(r.error.unwrap_or_default()))
    }
}
