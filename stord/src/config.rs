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
//! tls = "require"                    # optional: "off" (default), "on", "require"
//! tls_psk_file = "/etc/stord/keys.psk"  # PSK (psktool `identity:hexkey` lines)
//! tls_cert = "/etc/stord/server-cert.pem"  # and/or X.509: chain and key
//! tls_key = "/etc/stord/server-key.pem"
//! tls_ca = "/etc/stord/ca-cert.pem"  # optional: require client certificates
//!
//! [[disk]]
//! name = "scratch"
//! size = "64MiB"                     # or a number of bytes
//! alloc = "dynamic"                  # or "fixed"
//! read_only = false                  # optional
//! allow = ["alice", "client1"]       # optional: PSK identities / cert names
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fabric_util::toml_file;
use serde::Deserialize;

pub use fabric_api::stord::{Alloc, Format};
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
    /// Size in bytes (required unless `base` is given: a clone has its
    /// base's size).
    #[serde(default)]
    pub size: Size,
    /// Allocation policy (raw disks; default `dynamic`).
    #[serde(default = "dynamic")]
    pub alloc: Alloc,
    /// Serve read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Who may open it (over TLS): PSK identities, client certificate common
    /// names or subject DNs. `None`: everyone the server lets in.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// A linked clone of this read-only disk (a qcow2 overlay on it),
    /// created when the disk does not exist yet.
    #[serde(default)]
    pub base: Option<String>,
}

fn dynamic() -> Alloc {
    Alloc::Dynamic
}

/// Whether NBD connections use TLS (STARTTLS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS is refused.
    #[default]
    Off,
    /// Clients may upgrade; plain clients are served too (but not disks with
    /// an `allow` list).
    On,
    /// TCP clients must upgrade before any other option (unix-socket clients
    /// are treated as under `on`: the socket's permissions guard them).
    Require,
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
    pub max_connections: Option<usize>,
    /// The export served for the empty export name.
    pub default_export: Option<String>,
    /// Longest a reader polls an idle connection before sleeping, in
    /// microseconds (0: never poll). See `crate::poll`.
    pub busy_poll_us: Option<u32>,
    /// Seconds a client may take to finish option haggling (default 10).
    pub handshake_timeout: Option<f64>,
    /// Seconds a started request may take to arrive in full, and a reply to be
    /// taken by the client (default 30); past it the connection is closed.
    pub request_timeout: Option<f64>,
    /// Seconds a connection with nothing in flight may stay silent before it
    /// is closed (default: forever).
    pub idle_timeout: Option<f64>,
    /// Bound on simultaneous NBD connections from one client: one source IP
    /// address over TCP, one user id over the unix socket (default: none
    /// beyond `max_connections`).
    pub max_connections_per_client: Option<usize>,
    /// Group (name or number) given the unix sockets (NBD and control), which
    /// are created 0660.
    pub socket_group: Option<String>,
    /// TLS policy.
    #[serde(default)]
    pub tls: TlsMode,
    /// Server certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): client certificates are then required and
    /// verified against them.
    pub tls_ca: Option<PathBuf>,
    /// Pre-shared keys, GnuTLS psktool's `identity:hexkey` format.
    pub tls_psk_file: Option<PathBuf>,
    /// `ADDR:PORT` to serve Prometheus metrics on (`GET /metrics`); off when absent.
    pub metrics: Option<String>,
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

    /// The address of the metrics server, if the `metrics` key asks for one.
    pub fn metrics_addr(&self, path: &Path) -> Result<Option<SocketAddr>, ConfigError> {
        Ok(fabric_util::metrics::config_addr(
            self.metrics.as_deref(),
            path,
        )?)
    }

    /// Checks values serde cannot: addresses, names, sizes, uniqueness.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key: String, expected: String| ConfigError::invalid(path.display(), key, expected);
        if let Some(l) = &self.listen {
            l.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "listen".into(),
                    format!("an address like \"127.0.0.1:10809\" or \"[::1]:10809\" (got {l:?})"),
                )
            })?;
        }
        self.metrics_addr(path)?;
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
            match &d.base {
                None => {
                    check_disk_size(d.size.0).map_err(|e| invalid(format!("disk[{i}].size"), e))?
                }
                Some(b) => {
                    check_disk_name(b).map_err(|e| invalid(format!("disk[{i}].base"), e))?;
                    if d.size.0 != 0 {
                        return Err(invalid(
                            format!("disk[{i}].size"),
                            "no size with `base` (a clone has its base's size)".into(),
                        ));
                    }
                }
            }
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
        self.validate_tls(path)
    }

    /// The TLS keys: credentials present when TLS is on, in whole pairs, and
    /// access lists only where someone could match them. The files
    /// themselves are read at startup (`crate::tls::Tls::load`).
    fn validate_tls(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, expected: String| ConfigError::invalid(path.display(), key, expected);
        for (key, v) in [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_ca", &self.tls_ca),
            ("tls_psk_file", &self.tls_psk_file),
        ] {
            if v.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(invalid(key, "a file path".into()));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key",
                    "the private key of tls_cert (tls_cert is set, tls_key is not)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert",
                    "the certificate chain of tls_key (tls_key is set, tls_cert is not)".into(),
                ))
            }
            _ => {}
        }
        if self.tls_ca.is_some() && self.tls_cert.is_none() {
            return Err(invalid(
                "tls_ca",
                "tls_cert and tls_key as well (client certificates are checked only with a server certificate)".into(),
            ));
        }
        let has_creds = self.tls_cert.is_some() || self.tls_psk_file.is_some();
        if self.tls != TlsMode::Off && !has_creds {
            return Err(invalid(
                "tls",
                format!(
                    "credentials for tls = \"{}\": tls_cert and tls_key (X.509), or tls_psk_file (PSK), or both",
                    if self.tls == TlsMode::On { "on" } else { "require" }
                ),
            ));
        }
        let identities = self.tls_psk_file.is_some() || self.tls_ca.is_some();
        for (i, d) in self.disk.iter().enumerate() {
            let Some(list) = &d.allow else { continue };
            let key = format!("disk[{i}].allow");
            if self.tls == TlsMode::Off {
                return Err(invalid(
                    &key,
                    "tls = \"on\" or \"require\" (an access list names TLS identities)".into(),
                ));
            }
            if !identities {
                return Err(invalid(
                    &key,
                    "tls_psk_file or tls_ca as well (without them no client proves an identity)"
                        .into(),
                ));
            }
            if list.iter().any(|a| a.is_empty()) {
                return Err(invalid(
                    &key,
                    "a list of PSK identities or certificate names, none empty".into(),
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

    /// The error `validate` gives a config that parses.
    fn invalid(text: &str) -> String {
        let c = Config::parse(text, p()).unwrap();
        c.validate(p()).unwrap_err().to_string()
    }

    /// The error of a config that does not even parse.
    fn unparsable(text: &str) -> String {
        Config::parse(text, p()).unwrap_err().to_string()
    }

    #[test]
    fn metrics_key_is_an_address_and_port() {
        let base = "control = \"/c\"\nstate_dir = \"/s\"\n";
        let c = Config::parse(&format!("{base}metrics = \"[::1]:9103\"\n"), p()).unwrap();
        c.validate(p()).unwrap();
        assert_eq!(
            c.metrics_addr(p()).unwrap(),
            Some("[::1]:9103".parse().unwrap())
        );
        let off = Config::parse(base, p()).unwrap();
        assert_eq!(off.metrics_addr(p()).unwrap(), None);
        let e = invalid(&format!("{base}metrics = \"localhost:9103\"\n"));
        assert!(
            e.contains("/etc/stord.toml") && e.contains("`metrics`") && e.contains("localhost"),
            "{e}"
        );
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
        assert_eq!(
            c.tls,
            TlsMode::Off,
            "no TCP listener, so no TLS keys needed"
        );
        // Its TCP lines, uncommented, serve TCP only with TLS required.
        let text = std::fs::read_to_string(&path).unwrap();
        let tcp: String = text
            .lines()
            .map(|l| {
                for key in ["listen = ", "tls = ", "tls_psk_file = "] {
                    if let Some(rest) = l.strip_prefix("# ").filter(|r| r.starts_with(key)) {
                        return format!("{rest}\n");
                    }
                }
                format!("{l}\n")
            })
            .collect();
        let c = Config::parse(&tcp, &path).unwrap();
        c.validate(&path).unwrap();
        assert_eq!(c.listen.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(c.tls, TlsMode::Require);
        assert!(c.tls_psk_file.is_some());
    }

    #[test]
    fn timeouts_and_client_bound_are_checked() {
        let e = invalid("control = \"/c\"\nstate_dir = \"/s\"\nrequest_timeout = 0\n");
        assert!(
            e.contains("request_timeout") && e.contains("seconds"),
            "{e}"
        );
        let e = invalid("control = \"/c\"\nstate_dir = \"/s\"\nmax_connections_per_client = 0\n");
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
        let e = unparsable("control = \"/c\"\nstate_dir = \"/s\"\nlisten_port = 5\n");
        assert!(e.contains("/etc/stord.toml"), "{e}");
        assert!(e.contains("listen_port"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = invalid("control = \"/c\"\nstate_dir = \"/s\"\nlisten = \"nowhere\"\n");
        assert!(e.contains("key `listen`"), "{e}");

        let e = unparsable(
            "control = \"/c\"\nstate_dir = \"/s\"\n[[disk]]\nname = \"x\"\nsize = \"12 parsecs\"\nalloc = \"fixed\"\n",
        );
        assert!(e.contains("size"), "{e}");

        let e = unparsable(
            "control = \"/c\"\nstate_dir = \"/s\"\n[[disk]]\nname = \"x\"\nsize = 1\nalloc = \"thick\"\n",
        );
        assert!(e.contains("alloc") || e.contains("thick"), "{e}");

        let e = invalid("control = \"/c\"\nstate_dir = \"/s\"\n[[disk]]\nname = \"../x\"\nsize = 1\nalloc = \"fixed\"\n");
        assert!(e.contains("disk[0].name"), "{e}");
    }

    fn tls_err(extra: &str) -> String {
        invalid(&format!("control = \"/c\"\nstate_dir = \"/s\"\n{extra}"))
    }

    #[test]
    fn tls_keys_are_checked() {
        let e = tls_err("tls = \"require\"\n");
        assert!(
            e.contains("/etc/stord.toml") && e.contains("key `tls`"),
            "{e}"
        );
        assert!(e.contains("tls_cert") && e.contains("tls_psk_file"), "{e}");
        let e = tls_err("tls = \"on\"\ntls_cert = \"/c.pem\"\n");
        assert!(e.contains("key `tls_key`"), "{e}");
        let e = tls_err("tls = \"on\"\ntls_key = \"/k.pem\"\n");
        assert!(e.contains("key `tls_cert`"), "{e}");
        let e = tls_err("tls = \"on\"\ntls_psk_file = \"/k\"\ntls_ca = \"/ca.pem\"\n");
        assert!(e.contains("key `tls_ca`"), "{e}");
        let disk = "[[disk]]\nname = \"d\"\nsize = 1\nalloc = \"fixed\"\nallow = [\"alice\"]\n";
        let e = tls_err(disk);
        assert!(
            e.contains("key `disk[0].allow`") && e.contains("tls = "),
            "{e}"
        );
        let e = tls_err(&format!(
            "tls = \"on\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n{disk}"
        ));
        assert!(
            e.contains("key `disk[0].allow`") && e.contains("tls_ca"),
            "{e}"
        );
        let e = Config::parse("control = \"/c\"\nstate_dir = \"/s\"\ntls = \"yes\"\n", p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls"), "{e}");

        let ok = format!("control = \"/c\"\nstate_dir = \"/s\"\ntls = \"require\"\ntls_psk_file = \"/k\"\n{disk}");
        let c = Config::parse(&ok, p()).unwrap();
        c.validate(p()).unwrap();
        assert_eq!(c.tls, TlsMode::Require);
        assert_eq!(c.disk[0].allow.as_deref(), Some(&["alice".to_string()][..]));
    }
}
