//! VM configuration: one strict schema shared by the TOML file and the command line.
//!
//! The CLI flags (`--kernel`, `--net tap=IF,mac=..`, `--disk nbd://..`) are parsed into
//! the same [`VmConfig`] that `--config vm.toml` deserializes (`deny_unknown_fields`), and
//! both then go through [`VmConfig::validate`], whose errors name the offending key. Device
//! specs given as strings (`tap=IF,mac=M`, NBD URIs) are parsed here once into checked
//! types; nothing later re-parses them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fabric_util::toml_file::{self, TomlFileError};
use fabric_util::{MacAddr, Size};
use serde::Deserialize;

use crate::nbd::TlsCreds;

/// A configuration error; the message names the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// the file could not be read or is not the TOML of a VM
    #[error(transparent)]
    File(#[from] TomlFileError),
    /// a key holds a bad value
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `mem` or `net[0].mac`.
        key: String,
        /// What was expected.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// The process's standard output.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
}

/// A network device backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// An existing or new TAP interface of this name.
    Tap(String),
    /// Ask netd (through its control socket) for a `vm` port on this network.
    Netd(String),
}

/// One virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Where frames go.
    pub backend: NetBackend,
    /// The guest's MAC address; generated when absent.
    pub mac: Option<[u8; 6]>,
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP host and port.
    Tcp(String, u16),
    /// A unix socket path.
    Unix(PathBuf),
}

/// One virtio-blk device, backed by an NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The server.
    pub addr: NbdAddr,
    /// The export name.
    pub export: String,
    /// Present the disk read-only even if the export is writable.
    pub read_only: bool,
    /// How long a failed connection is retried before requests fail (`reconnect_delay`
    /// option, as QEMU's `reconnect-delay`; 0: they fail at once).
    pub reconnect_delay: Duration,
    /// TLS credentials (`nbds://`); None: plain NBD.
    pub tls: Option<TlsCreds>,
}

/// The raw, file-shaped configuration (all strings), as TOML or the CLI give it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: Option<PathBuf>,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line.
    pub cmdline: Option<String>,
    /// Guest memory, e.g. "256M", "1G".
    pub mem: Option<String>,
    /// vCPU count.
    pub cpus: Option<u8>,
    /// NICs: `tap=IF[,mac=MAC]` or `netd=NET[,mac=MAC]`.
    #[serde(default)]
    pub net: Vec<String>,
    /// Disks: `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`, then
    /// options: `,ro`, `,reconnect_delay=SECONDS`.
    #[serde(default)]
    pub disk: Vec<String>,
    /// `stdio` or a file path.
    pub console: Option<String>,
    /// netd's control socket (for `netd=` NICs).
    pub netd_control: Option<PathBuf>,
    /// `ADDR:PORT` to serve Prometheus metrics on (`GET /metrics`); off when absent.
    pub metrics: Option<String>,
    /// Unix socket to serve the control API on; off when absent.
    pub api_sock: Option<PathBuf>,
    /// A snapshot directory (`PUT /snapshot`'s) to go on from instead of booting.
    pub restore: Option<PathBuf>,
    /// `tcp:ADDR:PORT` to wait on for an incoming migration instead of booting.
    pub incoming: Option<String>,
}

/// The checked configuration of one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line (devices are appended by the VMM).
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub cpus: u8,
    /// NICs, in order.
    pub nets: Vec<NetSpec>,
    /// Disks, in order.
    pub disks: Vec<DiskSpec>,
    /// Console.
    pub console: Console,
    /// netd control socket.
    pub netd_control: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where to serve the control API, if anywhere.
    pub api_sock: Option<PathBuf>,
    /// Go on from this snapshot directory instead of booting.
    pub restore: Option<PathBuf>,
    /// Wait for an incoming migration on this address instead of booting.
    pub incoming: Option<std::net::SocketAddr>,
}

/// Default kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 nomodule";
/// Default netd control socket.
pub const DEFAULT_NETD_CONTROL: &str = "/run/netd/control.sock";
/// Largest guest memory: RAM must stay below the MMIO hole at 3 GiB.
pub const MAX_MEM: u64 = 3 << 30;
/// Smallest guest memory that holds the boot structures and a kernel.
pub const MIN_MEM: u64 = 32 << 20;

impl RawConfig {
    /// Reads and parses a TOML file; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(toml_file::read(path)?)
    }

    /// Overlays CLI values on top of a file's (CLI wins, lists are appended).
    pub fn merge(mut self, cli: RawConfig) -> Self {
        self.kernel = cli.kernel.or(self.kernel);
        self.initrd = cli.initrd.or(self.initrd);
        self.cmdline = cli.cmdline.or(self.cmdline);
        self.mem = cli.mem.or(self.mem);
        self.cpus = cli.cpus.or(self.cpus);
        self.console = cli.console.or(self.console);
        self.netd_control = cli.netd_control.or(self.netd_control);
        self.metrics = cli.metrics.or(self.metrics);
        self.api_sock = cli.api_sock.or(self.api_sock);
        self.restore = cli.restore.or(self.restore);
        self.incoming = cli.incoming.or(self.incoming);
        self.net.extend(cli.net);
        self.disk.extend(cli.disk);
        self
    }

    /// Checks every key and builds the typed configuration.
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        if self.restore.is_some() && self.incoming.is_some() {
            return Err(invalid("restore/incoming", "give one of them, not both"));
        }
        let incoming = match self.incoming.as_deref() {
            None => None,
            Some(s) => Some(parse_tcp(s).map_err(|e| invalid("incoming", e))?),
        };
        // A restored or incoming VM has its kernel in memory already.
        let boots = self.restore.is_none() && incoming.is_none();
        let kernel = match self.kernel {
            Some(k) => k,
            None if !boots => PathBuf::new(),
            None => {
                return Err(invalid(
                    "kernel",
                    "required: path of a vmlinux (ELF) or bzImage",
                ))
            }
        };
        let mem_bytes = match &self.mem {
            Some(s) => s.parse::<Size>().map(Size::bytes).map_err(|_| {
                invalid("mem", format!("expected a size like 256M or 1G, got {s:?}"))
            })?,
            None => 256 << 20,
        };
        if !(MIN_MEM..=MAX_MEM).contains(&mem_bytes) {
            return Err(invalid(
                "mem",
                format!("must be between {}M and {}M", MIN_MEM >> 20, MAX_MEM >> 20),
            ));
        }
        let cpus = self.cpus.unwrap_or(1);
        if cpus == 0 || cpus > 32 {
            return Err(invalid("cpus", "must be between 1 and 32"));
        }
        let nets = parse_list("net", &self.net, parse_net)?;
        let disks = parse_list("disk", &self.disk, parse_disk)?;
        if nets.len() + disks.len() > crate::layout::MAX_MMIO_DEVICES {
            return Err(invalid(
                "net/disk",
                format!("at most {} devices in all", crate::layout::MAX_MMIO_DEVICES),
            ));
        }
        let console = match self.console.as_deref() {
            None | Some("stdio") => Console::Stdio,
            Some("") => return Err(invalid("console", "expected \"stdio\" or a file path")),
            Some(p) => Console::File(PathBuf::from(p)),
        };
        let cmdline = self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(invalid("cmdline", "printable ASCII only"));
        }
        let metrics = match self.metrics.as_deref() {
            None => None,
            Some(m) => Some(m.parse().map_err(|_| {
                invalid(
                    "metrics",
                    format!("expected an address and port like \"127.0.0.1:9104\", got {m:?}"),
                )
            })?),
        };
        if self.api_sock.as_deref() == Some(Path::new("")) {
            return Err(invalid("api_sock", "expected the path of a unix socket"));
        }
        Ok(VmConfig {
            metrics,
            api_sock: self.api_sock,
            restore: self.restore,
            incoming,
            kernel,
            initrd: self.initrd,
            cmdline,
            mem_bytes,
            cpus,
            nets,
            disks,
            console,
            netd_control: self
                .netd_control
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NETD_CONTROL)),
        })
    }
}

/// Parses `tcp:HOST:PORT` (a migration's address; HOST a name or an address,
/// `[v6]` in brackets) into the first address it resolves to.
pub fn parse_tcp(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let want = || format!("expected tcp:HOST:PORT, got {s:?}");
    let rest = s.strip_prefix("tcp:").ok_or_else(want)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(want)?;
    let port: u16 = port.parse().map_err(|_| want())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?}: no address"))
}

/// Parses a unicast MAC, "52:54:00:12:34:56" (a guest NIC's own address).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<MacAddr>()
        .ok()
        .filter(|m| !m.is_multicast())
        .map(MacAddr::octets)
}

/// Parses each entry of the list `key` with `parse`; an error names the entry
/// (`net[1]`, `disk[0]`).
fn parse_list<T>(
    key: &str,
    items: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, ConfigError> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| parse(s).map_err(|m| invalid(format!("{key}[{i}]"), m)))
        .collect()
}

/// Parses `tap=IF[,mac=MAC]` or `netd=NET[,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetSpec, String> {
    let mut backend = None;
    let mut mac = None;
    for item in s.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got {item:?}"))?;
        match k {
            "tap" => {
                if v.is_empty() || v.len() > 15 {
                    return Err("tap: interface name of 1 to 15 bytes".into());
                }
                backend = Some(NetBackend::Tap(v.to_string()));
            }
            "netd" => {
                if v.is_empty() {
                    return Err("netd: network name expected".into());
                }
                backend = Some(NetBackend::Netd(v.to_string()));
            }
            "mac" => {
                mac = Some(parse_mac(v).ok_or_else(|| {
                    format!("mac: expected a unicast address like 52:54:00:12:34:56, got {v:?}")
                })?)
            }
            other => return Err(format!("unknown key {other:?} (expected tap, netd, mac)")),
        }
    }
    let backend = backend.ok_or("expected tap=IFNAME or netd=NETWORK")?;
    Ok(NetSpec { backend, mac })
}

/// Most seconds `reconnect_delay` may be.
pub const MAX_RECONNECT_DELAY: u64 = 3600;

/// Parses `URI[,ro][,reconnect_delay=SECONDS][,tls-...]`, the URI
/// `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`, or with TLS
/// `nbds://[ID@]HOST:PORT/EXPORT` or `nbds+unix://[ID@]/EXPORT?socket=PATH` and
/// `tls-psk-file=PATH` (the identity from `ID@` or `tls-username=ID`) or
/// `tls-certificates=DIR` (libnbd's layout: ca-cert.pem, client-cert.pem,
/// client-key.pem). The TLS files are read here, so a bad one is a config error.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let mut items = s.split(',');
    let uri = items.next().unwrap_or_default();
    let (mut d, tls, uri_user) = parse_uri(uri)?;
    let (mut psk_file, mut username, mut certs) = (None, None, None);
    for item in items {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        let nonempty = |v: &str| {
            if v.is_empty() {
                Err(format!("{k}: a value expected"))
            } else {
                Ok(v.to_string())
            }
        };
        match k {
            "ro" if v.is_empty() => d.read_only = true,
            "reconnect_delay" => {
                d.reconnect_delay = v
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n <= MAX_RECONNECT_DELAY)
                    .map(Duration::from_secs)
                    .ok_or_else(|| {
                        format!(
                            "reconnect_delay: expected whole seconds from 0 to \
                             {MAX_RECONNECT_DELAY}, got {v:?}"
                        )
                    })?
            }
            "tls-psk-file" => psk_file = Some(PathBuf::from(nonempty(v)?)),
            "tls-username" => username = Some(nonempty(v)?),
            "tls-certificates" => certs = Some(PathBuf::from(nonempty(v)?)),
            other => {
                return Err(format!(
                    "unknown option {other:?} (expected ro, reconnect_delay=SECONDS, \
                     tls-psk-file=PATH, tls-username=ID, tls-certificates=DIR)"
                ))
            }
        }
    }
    if !tls {
        if psk_file.is_some() || username.is_some() || certs.is_some() || uri_user.is_some() {
            return Err("tls-* options and ID@ need an nbds:// or nbds+unix:// URI".into());
        }
        return Ok(d);
    }
    let identity = match (uri_user, username) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "tls-username: {b:?} differs from the URI's identity {a:?}"
            ))
        }
        (a, b) => a.or(b),
    };
    d.tls = Some(match (psk_file, certs) {
        (Some(f), None) => {
            let id = identity.ok_or(
                "tls-psk-file: the PSK identity is needed: nbds://ID@HOST/... or tls-username=ID",
            )?;
            TlsCreds::psk_from_file(&f, &id)
                .map_err(|e| format!("tls-psk-file: {}", crate::error_chain(&e)))?
        }
        (None, Some(dir)) => {
            if identity.is_some() {
                return Err("tls-username: only with tls-psk-file".into());
            }
            TlsCreds::x509_dir(&dir)
                .map_err(|e| format!("tls-certificates: {}", crate::error_chain(&e)))?
        }
        _ => {
            return Err(
                "nbds:// needs exactly one of tls-psk-file=PATH or tls-certificates=DIR".into(),
            )
        }
    });
    Ok(d)
}

/// Parses the URI part of a disk spec: the spec, whether the scheme asks for TLS,
/// and the URI's user part (`ID@`, TLS only).
fn parse_uri(uri: &str) -> Result<(DiskSpec, bool, Option<String>), String> {
    let spec = |addr, export: &str| DiskSpec {
        addr,
        export: export.to_string(),
        read_only: false,
        reconnect_delay: Duration::ZERO,
        tls: None,
    };
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
        format!("expected nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH, got {uri:?}")
    })?;
    let (unix, tls) = match scheme {
        "nbd" => (false, false),
        "nbds" => (false, true),
        "nbd+unix" => (true, false),
        "nbds+unix" => (true, true),
        _ => {
            return Err(format!(
                "expected nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH \
                 (nbds:// and nbds+unix:// with TLS), got {uri:?}"
            ))
        }
    };
    // The authority ends at the first '/'; a user part is what precedes its '@'.
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, authority) = match authority.rsplit_once('@') {
        Some((u, a)) if !u.is_empty() => (Some(u.to_string()), a),
        Some(_) => return Err(format!("empty user before '@' in {uri:?}")),
        None => (None, authority),
    };
    if user.is_some() && !tls {
        return Err(format!("a user part (ID@) needs nbds:// in {uri:?}"));
    }
    if !unix {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port {p:?} in {uri:?}"))?,
            ),
            _ => (authority, 10809),
        };
        if host.is_empty() {
            return Err(format!("no host in {uri:?}"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok((spec(NbdAddr::Tcp(host.to_string(), port), path), tls, user))
    } else {
        if !authority.is_empty() {
            return Err(format!(
                "a unix URI has no host, got {authority:?} in {uri:?}"
            ));
        }
        let (export, query) = path
            .split_once('?')
            .ok_or_else(|| format!("expected ?socket=PATH in {uri:?}"))?;
        let sock = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| format!("expected ?socket=PATH in {uri:?}"))?;
        if sock.is_empty() {
            return Err(format!("empty socket path in {uri:?}"));
        }
        Ok((spec(NbdAddr::Unix(PathBuf::from(sock)), export), tls, user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(n.backend, NetBackend::Tap("tap0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(
            parse_net("netd=lab").unwrap().backend,
            NetBackend::Netd("lab".into())
        );
        assert!(parse_net("tap=x,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("mac=52:54:00:00:00:01").is_err());
        assert!(parse_net("foo=1").is_err());
    }

    #[test]
    fn disks() {
        let d = parse_disk("nbd://127.0.0.1:10809/disk0,ro").unwrap();
        assert_eq!(d.addr, NbdAddr::Tcp("127.0.0.1".into(), 10809));
        assert_eq!(d.export, "disk0");
        assert!(d.read_only);
        let d = parse_disk("nbd+unix:///e1?socket=/tmp/s.sock").unwrap();
        assert_eq!(d.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(d.export, "e1");
        assert!(!d.read_only);
        assert_eq!(d.reconnect_delay, Duration::ZERO);
        let d = parse_disk("nbd://h/e,reconnect_delay=30,ro").unwrap();
        assert_eq!(d.reconnect_delay, Duration::from_secs(30));
        assert!(d.read_only);
        let e = parse_disk("nbd://h/e,reconnect_delay=soon").unwrap_err();
        assert!(e.starts_with("reconnect_delay:"), "{e}");
        assert!(parse_disk("nbd://h/e,reconnect_delay=99999").is_err());
        assert!(parse_disk("nbd://h/e,fast").is_err());
        assert!(parse_disk("file:///x").is_err());
        assert_eq!(
            parse_disk("nbd://[::1]:99/e").unwrap().addr,
            NbdAddr::Tcp("::1".into(), 99)
        );
        assert!(parse_disk("nbd://u@h/e").is_err());
        assert!(parse_disk("nbd://h/e,tls-psk-file=/x").is_err());
        assert!(parse_disk("nbds://h/e").is_err());
        let dir = tempfile::tempdir().unwrap();
        let psk = dir.path().join("k.psk");
        std::fs::write(&psk, "alice:0102\n").unwrap();
        let p = psk.display();
        for s in [
            format!("nbds://alice@h:1/e,tls-psk-file={p}"),
            format!("nbds://h:1/e,tls-psk-file={p},tls-username=alice"),
        ] {
            let d = parse_disk(&s).unwrap();
            assert_eq!(d.addr, NbdAddr::Tcp("h".into(), 1));
            assert_eq!(d.export, "e");
            let want = TlsCreds::Psk {
                identity: "alice".into(),
                key: vec![1, 2],
            };
            assert_eq!(d.tls, Some(want));
        }
        let e = parse_disk(&format!("nbds://h/e,tls-psk-file={p}")).unwrap_err();
        assert!(e.starts_with("tls-psk-file: the PSK identity"), "{e}");
        let e = parse_disk(&format!("nbds://bob@h/e,tls-psk-file={p}")).unwrap_err();
        assert!(e.contains("no key for identity \"bob\""), "{e}");
        let e =
            parse_disk(&format!("nbds://bob@h/e,tls-psk-file={p},tls-username=al")).unwrap_err();
        assert!(e.starts_with("tls-username:"), "{e}");
        let d = parse_disk(&format!("nbds+unix://alice@/e?socket=/s,tls-psk-file={p}")).unwrap();
        assert_eq!(d.addr, NbdAddr::Unix("/s".into()));
        let e = parse_disk(&format!(
            "nbds://h/e,tls-certificates={}",
            dir.path().display()
        ))
        .unwrap_err();
        assert!(
            e.starts_with("tls-certificates:") && e.contains("ca-cert.pem"),
            "{e}"
        );
        assert!(parse_disk("nbd://:1/x").is_err());
    }

    #[test]
    fn toml_strict_and_keys_named() {
        let err = toml::from_str::<RawConfig>("kernel = \"k\"\nmemory = \"1G\"\n").unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
        let raw: RawConfig = toml::from_str("kernel = \"k\"\nmem = \"lots\"\n").unwrap();
        let err = raw.validate().unwrap_err();
        assert!(err.to_string().starts_with("mem:"), "{err}");
        let raw: RawConfig =
            toml::from_str("kernel = \"k\"\nnet = [\"tap=a\", \"tap=b,mac=zz\"]\n").unwrap();
        let err = raw.validate().unwrap_err();
        assert!(err.to_string().starts_with("net[1]:"), "{err}");
        let raw: RawConfig = toml::from_str("mem = \"64M\"\n").unwrap();
        assert!(raw
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("kernel:"));
    }
}
