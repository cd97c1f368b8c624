//! The daemon's TOML configuration: strict (unknown keys are errors), parsed into
//! serde structs and then checked by [`Config::validate`], whose errors name the
//! file, the key and what was expected.
//!
//! ```toml
//! listen = "127.0.0.1:10809"        # optional NBD over TCP
//! unix = "/run/stord/nbd.sock"       # optional NBD over a unix socket
//! control = "/run/stord/control.sock"
//! state_dir = "/var/lib/stord"
//! max_connections = 128              # optional
//! default_export = "scratch"         # optional: what the empty export name means
//! busy_poll_us = 200                 # optional: poll idle connections (0: off)
//! handshake_timeout = 10             # optional, seconds to finish option haggling
//! request_timeout = 30               # optional, seconds for a payload / a reply
//! idle_timeout = 600                 # optional, seconds; default: never
//! max_connections_per_client = 16    # optional: per source address / unix uid
//! socket_group = "kvm"               # optional: group of the unix sockets (0660)
//!
//! [[disk]]
//! name = "scratch"
//! size = "64MiB"                     # or a number of bytes
//! alloc = "dynamic"                  # or "fixed"
//! read_only = false                  # optional
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fabric_util::toml_file::{self, InvalidKey};
use serde::Deserialize;

pub use fabric_api::stord::Alloc;
pub use fabric_util::Size;

/// Default bound on simultaneous NBD connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Largest disk size accepted (2^60 bytes: far beyond any host file system,
/// small enough that offset arithmetic never overflows).
pub const MAX_DISK_SIZE: u64 = 1 << 60;
/// Largest `busy_poll_us` accepted.
pub const MAX_BUSY_POLL_US: u32 = 1000;

/// A config problem, naming the file, the key and what was expected.
pub use fabric_util::toml_file::ConfigError;

/// One `[[disk]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Export name and catalog key.
    pub name: String,
    /// Size in bytes.
    pub size: Size,
    /// Allocation policy.
    pub alloc: Alloc,
    /// Serve read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NBD over TCP, e.g. "127.0.0.1:10809".
    pub listen: Option<String>,
    /// NBD over a unix socket.
    pub unix: Option<PathBuf>,
    /// Control socket path.
    pub control: PathBuf,
    /// Where disk files and the catalog live.
    pub state_dir: PathBuf,
    /// Bound on simultaneous NBD connections.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The export served for the empty export name.
    #[serde(default)]
    pub default_export: Option<String>,
    /// Longest a reader polls an idle connection before sleeping, in
    /// microseconds (0: never poll). See `crate::poll`.
    #[serde(default)]
    pub busy_poll_us: Option<u32>,
    /// Seconds a client may take to finish option haggling (default 10).
    #[serde(default)]
    pub handshake_timeout: Option<f64>,
    /// Seconds a started request may take to arrive in full, and a reply to be
    /// taken by the client (default 30); past it the connection is closed.
    #[serde(default)]
    pub request_timeout: Option<f64>,
    /// Seconds a connection with nothing in flight may stay silent before it
    /// is closed (default: forever).
    #[serde(default)]
    pub idle_timeout: Option<f64>,
    /// Bound on simultaneous NBD connections from one client: one source IP
    /// address over TCP, one user id over the unix socket (default: none
    /// beyond `max_connections`).
    #[serde(default)]
    pub max_connections_per_client: Option<usize>,
    /// Group (name or number) given the unix sockets (NBD and control), which
    /// are created 0660.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Disks to create when missing.
    #[serde(default)]
    pub disk: Vec<DiskConfig>,
}

/// Largest timeout accepted, in seconds (a day).
pub const MAX_TIMEOUT_S: f64 = 86400.0;

/// Checks a disk name: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with a dot
/// (it becomes a file name under the state directory).
pub fn check_disk_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a name of 1 to 64 characters from A-Z a-z 0-9 . _ - not starting with a dot (got {name:?})"
        ))
    }
}

/// Checks a disk size.
pub fn check_disk_size(size: u64) -> Result<(), String> {
    if size == 0 || size > MAX_DISK_SIZE {
        Err(format!(
            "a size between 1 byte and 2^60 bytes, like \"64MiB\" (got {size})"
        ))
    } else {
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml_file::read(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Parses TOML text (no validation); `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(toml_file::parse(text, path)?)
    }

    /// Checks values serde cannot: addresses, names, sizes, uniqueness.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, expected: String| {
            ConfigError::Invalid(InvalidKey {
                path: path.display().to_string(),
                key,
                expected,
            })
        };
        if let Some(l) = &self.listen {
            l.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "listen".into(),
                    format!("an address like \"127.0.0.1:10809\" or \"[::1]:10809\" (got {l:?})"),
                )
            })?;
        }
        if let Some(u) = &self.unix {
            if u.as_os_str().is_empty() {
                return Err(invalid("unix".into(), "a socket path".into()));
            }
        }
        if self.control.as_os_str().is_empty() {
            return Err(invalid("control".into(), "a socket path".into()));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir".into(), "a directory path".into()));
        }
        if let Some(m) = self.max_connections {
            if !(1..=65536).contains(&m) {
                return Err(invalid(
                    "max_connections".into(),
                    format!("a number from 1 to 65536 (got {m})"),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.disk.iter().enumerate() {
            check_disk_name(&d.name).map_err(|e| invalid(format!("disk[{i}].name"), e))?;
            if !seen.insert(d.name.as_str()) {
                return Err(invalid(
                    format!("disk[{i}].name"),
                    format!("a name not used by another disk (`{}` is repeated)", d.name),
                ));
            }
            check_disk_size(d.size.0).map_err(|e| invalid(format!("disk[{i}].size"), e))?;
        }
        if let Some(us) = self.busy_poll_us {
            if us > MAX_BUSY_POLL_US {
                return Err(invalid(
                    "busy_poll_us".into(),
                    format!(
                        "a number of microseconds from 0 (off) to {MAX_BUSY_POLL_US} (got {us})"
                    ),
                ));
            }
        }
        if let Some(d) = &self.default_export {
            check_disk_name(d).map_err(|e| invalid("default_export".into(), e))?;
        }
        for (key, v) in [
            ("handshake_timeout", self.handshake_timeout),
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v <= MAX_TIMEOUT_S) {
                    return Err(invalid(
                        key.into(),
                        format!(
                            "a number of seconds above 0 and at most {MAX_TIMEOUT_S} (got {v})"
                        ),
                    ));
                }
            }
        }
        if let Some(m) = self.max_connections_per_client {
            if !(1..=65536).contains(&m) {
                return Err(invalid(
                    "max_connections_per_client".into(),
                    format!("a number from 1 to 65536 (got {m})"),
                ));
            }
        }
        if let Some(g) = &self.socket_group {
            if g.is_empty() || g.contains('\0') {
                return Err(invalid(
                    "socket_group".into(),
                    "a group name or number".into(),
                ));
            }
        }
        Ok(())
    }

    /// The connection deadlines in effect.
    pub fn limits(&self) -> crate::nbd::Limits {
        let secs = std::time::Duration::from_secs_f64;
        let d = crate::nbd::Limits::default();
        crate::nbd::Limits {
            handshake_timeout: self.handshake_timeout.map_or(d.handshake_timeout, secs),
            request_timeout: self.request_timeout.map_or(d.request_timeout, secs),
            idle_timeout: self.idle_timeout.map(secs),
        }
    }

    /// The connection bound in effect.
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }

    /// The busy-poll maximum in effect, in microseconds.
    pub fn busy_poll_us(&self) -> u32 {
        self.busy_poll_us.unwrap_or(crate::poll::DEFAULT_MAX_US)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/stord.toml")
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
listen = "127.0.0.1:10809"
control = "/run/stord/control.sock"
state_dir = "/var/lib/stord"
[[disk]]
name = "a"
size = "64MiB"
alloc = "dynamic"
[[disk]]
name = "b"
size = 1048576
alloc = "fixed"
read_only = true
"#,
            p(),
        )
        .unwrap();
        c.validate(p()).unwrap();
        assert_eq!(c.disk.len(), 2);
        assert_eq!(c.disk[0].size, Size(64 << 20));
        assert_eq!(c.disk[1].alloc, Alloc::Fixed);
        assert!(c.disk[1].read_only);
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/stord.toml");
        let c = Config::load(&path).unwrap();
        // Safe defaults: the unix socket only, TCP left to `tls = "require"`.
        assert_eq!(c.listen, None);
        assert!(c.unix.is_some());
        assert_eq!(c.limits().request_timeout.as_secs(), 30);
        assert_eq!(c.limits().handshake_timeout.as_secs(), 10);
        assert_eq!(c.limits().idle_timeout, None);
        assert_eq!(c.disk.len(), 1);
        assert_eq!(c.disk[0].alloc, Alloc::Dynamic);
    }

    #[test]
    fn timeouts_and_client_bound_are_checked() {
        let c = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\nrequest_timeout = 0\n",
            p(),
        )
        .unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        assert!(
            e.contains("request_timeout") && e.contains("seconds"),
            "{e}"
        );
        let c = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\nmax_connections_per_client = 0\n",
            p(),
        )
        .unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        assert!(e.contains("max_connections_per_client"), "{e}");
        let c = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\nidle_timeout = 1.5\nhandshake_timeout = 2\n",
            p(),
        )
        .unwrap();
        c.validate(p()).unwrap();
        assert_eq!(
            c.limits().idle_timeout,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(c.limits().handshake_timeout.as_secs(), 2);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\nlisten_port = 5\n",
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/etc/stord.toml"), "{e}");
        assert!(e.contains("listen_port"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let c = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\nlisten = \"nowhere\"\n",
            p(),
        )
        .unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        assert!(e.contains("key `listen`"), "{e}");

        let e = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\n[[disk]]\nname = \"x\"\nsize = \"12 parsecs\"\nalloc = \"fixed\"\n",
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("size"), "{e}");

        let e = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\n[[disk]]\nname = \"x\"\nsize = 1\nalloc = \"thick\"\n",
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("alloc") || e.contains("thick"), "{e}");

        let c = Config::parse(
            "control = \"/c\"\nstate_dir = \"/s\"\n[[disk]]\nname = \"../x\"\nsize = 1\nalloc = \"fixed\"\n",
            p(),
        )
        .unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        assert!(e.contains("disk[0].name"), "{e}");
    }
}
