//! stord's control API.
//!
//! ```text
//! {"cmd":"list"}
//! {"cmd":"create","name":"d1","size":"64MiB","alloc":"dynamic"}
//! {"cmd":"resize","name":"d1","size":134217728}
//! {"cmd":"delete","name":"d1"}
//! {"cmd":"status"}
//! {"cmd":"import","name":"golden","from":"/srv/images/debian.qcow2","format":"qcow2"}
//! {"cmd":"clone","base":"golden","name":"vm1"}
//! {"cmd":"snapshot","name":"vm1","snap":"vm1-before"}
//! {"cmd":"snapshots","name":"vm1"}
//! {"cmd":"revert","name":"vm1","snap":"vm1-before"}
//! {"cmd":"flatten","name":"vm1"}
//! ```
//! Responses are `{"ok":true,...}` (with `"disks"` for `list`, `"status"` for
//! `status`) or `{"ok":false,"error":"..."}`.
//!
//! Until this release stord's requests were tagged `"op"` rather than netd's `"cmd"`.
//! Both daemons now use `"cmd"`; for one release stord still accepts a request tagged
//! `"op"` (a request with both tags is refused), so scripts written against the
//! old tag keep working while they move. Clients send `"cmd"`.

use fabric_util::Size;
use serde::{Deserialize, Serialize};

use crate::client::{Call, Reply};

/// The tag every request carries.
const TAG: &str = "cmd";
/// The tag stord's requests carried before; accepted for one release.
const OLD_TAG: &str = "op";

/// A control request.
///
/// Serialized with the derive below; deserialized through the `Deserialize` impl
/// further down, which maps the old tag onto the new one first (`remote = "Self"`
/// makes the derives inherent functions that impl wraps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    remote = "Self",
    tag = "cmd",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Request {
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
    /// Copy a file into the state directory as a read-only base disk (a
    /// qcow2 with a backing chain is flattened).
    Import {
        /// Name of the new disk.
        name: String,
        /// The file, read by the daemon.
        from: String,
        /// Its format; `None`: by its magic.
        #[serde(default)]
        format: Option<Format>,
    },
    /// Make a linked clone: a qcow2 overlay on a read-only disk.
    Clone {
        /// The read-only disk under the clone.
        base: String,
        /// Name of the new disk.
        name: String,
    },
    /// Freeze a disk's current layer as the read-only disk `snap`; the disk
    /// continues in a new overlay on it (refused while attached).
    Snapshot {
        /// The disk.
        name: String,
        /// Name of the snapshot.
        snap: String,
    },
    /// List a disk's snapshots (`disks` of the answer, newest first).
    Snapshots {
        /// The disk.
        name: String,
    },
    /// Throw away what a disk got since its snapshot `snap` (refused while
    /// attached).
    Revert {
        /// The disk.
        name: String,
        /// One of its snapshots.
        snap: String,
    },
    /// Copy a disk's chain into one self-contained qcow2 (refused while
    /// attached).
    Flatten {
        /// The disk.
        name: String,
    },
}

impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Request::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut obj = serde_json::Map::deserialize(d)?;
        if let Some(op) = obj.remove(OLD_TAG) {
            if obj.contains_key(TAG) {
                return Err(D::Error::custom(format!(
                    "a request has one tag: `{TAG}` (or the old `{OLD_TAG}`), not both"
                )));
            }
            obj.insert(TAG.into(), op);
        }
        Request::deserialize(serde_json::Value::Object(obj)).map_err(D::Error::custom)
    }
}

impl Call for Request {
    type Reply = Response;
    const DAEMON: &'static str = "stord";
}

/// How a disk's host file is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alloc {
    /// Preallocated in full at creation (fallocate).
    Fixed,
    /// Sparse: grows as written; TRIM and WRITE_ZEROES punch holes.
    Dynamic,
}

named_enum! {
    Alloc {
        Fixed => "fixed",
        Dynamic => "dynamic",
    } else |s| format!("`{s}`: expected \"fixed\" or \"dynamic\"")
}

/// The format of a disk's file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A raw image (`fixed` or `dynamic`).
    #[default]
    Raw,
    /// A qcow2 (version 3) image, maybe on a backing chain.
    Qcow2,
}

named_enum! {
    Format {
        Raw => "raw",
        Qcow2 => "qcow2",
    } else |s| format!("`{s}`: expected \"raw\" or \"qcow2\"")
}

/// What `list` reports of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Allocation policy.
    pub alloc: Alloc,
    /// Served read-only.
    pub read_only: bool,
    /// Bytes allocated on the host.
    pub allocated: u64,
    /// Open NBD connections.
    pub connections: usize,
    /// A flush (fdatasync) failed: data may be lost, every later FLUSH and FUA
    /// write fails with EIO until the disk is reopened (stord restarted).
    #[serde(default)]
    pub failed: bool,
    /// The catalog names the disk but its file could not be opened: it is not
    /// served (the other disks are).
    #[serde(default)]
    pub missing: bool,
    /// The file's format.
    #[serde(default)]
    pub format: Format,
    /// The disk it is a clone or snapshot overlay of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The disks under it, nearest first (its backing chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The disk this is a snapshot of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
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
    /// Connections closed because a request's payload or a reply missed
    /// `request_timeout`.
    #[serde(default)]
    pub timeouts: u64,
    /// Connections closed because the handshake missed `handshake_timeout`.
    #[serde(default)]
    pub handshake_timeouts: u64,
    /// Connections closed after `idle_timeout` with nothing in flight.
    #[serde(default)]
    pub idle_closed: u64,
    /// Connections refused over `max_connections_per_client`.
    #[serde(default)]
    pub refused_per_client: u64,
    /// fdatasync failures (each latches its disk failed).
    #[serde(default)]
    pub flush_failures: u64,
    /// TLS handshakes completed (STARTTLS).
    #[serde(default)]
    pub tls_handshakes_ok: u64,
    /// TLS handshakes that failed (wrong key, bad or missing certificate).
    #[serde(default)]
    pub tls_handshakes_failed: u64,
    /// Refusals by a disk's `allow` list.
    #[serde(default)]
    pub tls_allow_refused: u64,
    /// Plain connections refused for not using TLS (once per connection).
    #[serde(default)]
    pub tls_plain_refused: u64,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
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

impl Response {
    /// Success, nothing to report.
    pub fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            disks: None,
            status: None,
        }
    }

    /// Failure, with the message the client shows.
    pub fn fail(e: String) -> Self {
        Response {
            ok: false,
            error: Some(e),
            disks: None,
            status: None,
        }
    }
}

impl Reply for Response {
    type Data = Response;
    fn into_result(self) -> Result<Response, String> {
        if self.ok {
            Ok(self)
        } else {
            Err(self.error.unwrap_or_else(|| "unknown error".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        // Formerly stord's control test, in the old tag; the new one is the same.
        for tag in ["op", "cmd"] {
            let r: Request = serde_json::from_str(&format!(
                r#"{{"{tag}":"create","name":"a","size":"1MiB","alloc":"fixed"}}"#
            ))
            .unwrap();
            assert_eq!(
                r,
                Request::Create {
                    name: "a".into(),
                    size: Size(1 << 20),
                    alloc: Alloc::Fixed,
                    read_only: false
                }
            );
            let list = format!(r#"{{"{tag}":"list","x":1}}"#);
            assert!(serde_json::from_str::<Request>(&list).is_err());
            let explode = format!(r#"{{"{tag}":"explode"}}"#);
            assert!(serde_json::from_str::<Request>(&explode).is_err());
        }
    }

    #[test]
    fn the_old_op_tag_is_still_accepted() {
        for (old, new) in [
            (r#"{"op":"list"}"#, Request::List {}),
            (r#"{"op":"status"}"#, Request::Status {}),
            (
                r#"{"op":"delete","name":"d1"}"#,
                Request::Delete { name: "d1".into() },
            ),
            (
                r#"{"op":"resize","name":"d1","size":134217728}"#,
                Request::Resize {
                    name: "d1".into(),
                    size: Size(128 << 20),
                },
            ),
        ] {
            assert_eq!(serde_json::from_str::<Request>(old).unwrap(), new, "{old}");
        }
        let both = serde_json::from_str::<Request>(r#"{"op":"list","cmd":"list"}"#);
        assert!(both.unwrap_err().to_string().contains("not both"));
        assert!(serde_json::from_str::<Request>(r#"{"name":"d1"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"["list"]"#).is_err());
    }

    #[test]
    fn requests_are_sent_with_the_new_tag() {
        assert_eq!(
            serde_json::to_string(&Request::List {}).unwrap(),
            r#"{"cmd":"list"}"#
        );
        let r = Request::Create {
            name: "d".into(),
            size: Size(4096),
            alloc: Alloc::Dynamic,
            read_only: true,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"create","name":"d","size":4096,"alloc":"dynamic","read_only":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
    }

    #[test]
    fn layered_disk_requests_parse_strictly() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"import","name":"g","from":"/srv/g.qcow2","format":"qcow2"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Import {
                name: "g".into(),
                from: "/srv/g.qcow2".into(),
                format: Some(Format::Qcow2)
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"import","name":"g","from":"f"}"#).unwrap();
        assert!(matches!(r, Request::Import { format: None, .. }));
        for bad in [
            r#"{"cmd":"import","name":"g","from":"f","format":"vmdk"}"#,
            r#"{"cmd":"clone","base":"g"}"#,
            r#"{"cmd":"snapshot","name":"v","snap":"s","x":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        let r = Request::Revert {
            name: "v".into(),
            snap: "s".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"cmd":"revert","name":"v","snap":"s"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        // A list answer of an older stord (no format, chain) still reads.
        let d: DiskInfo = serde_json::from_str(
            r#"{"name":"a","size":1,"alloc":"fixed","read_only":false,"allocated":0,"connections":0}"#,
        )
        .unwrap();
        assert_eq!(d.format, Format::Raw);
        assert!(d.chain.is_empty());
    }

    #[test]
    fn answers_become_results() {
        let r: Response = serde_json::from_str(r#"{"ok":false,"error":"busy"}"#).unwrap();
        assert_eq!(r.into_result(), Err("busy".into()));
        let r: Response = serde_json::from_str(r#"{"ok":true,"disks":[]}"#).unwrap();
        assert_eq!(r.into_result().unwrap().disks, Some(vec![]));
        assert_eq!(
            serde_json::to_string(&Response::ok()).unwrap(),
            r#"{"ok":true}"#
        );
    }
}
