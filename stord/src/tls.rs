//! TLS for NBD (the spec's STARTTLS): credentials, the OpenSSL server context,
//! and who a peer proved to be, for the per-disk `allow` lists.
//!
//! Theory of operation. At startup [`Tls::load`] reads the credentials the
//! config names (`tls_psk_file`, a GnuTLS psktool file of `identity:hexkey`
//! lines, as qemu, nbdkit and libnbd read it; and/or `tls_cert` + `tls_key`,
//! with `tls_ca` to require and verify client certificates) into one
//! [`SslContext`]; any unreadable or malformed file stops the daemon with the
//! file (and line) named. The context is built by hand, not from OpenSSL's
//! "mozilla" presets, whose cipher lists exclude PSK: TLS 1.2 and 1.3 only, no
//! compression, renegotiation, session tickets or session cache (a resumed
//! session would be a second way in that the access lists must then also
//! cover), AES-GCM preferred in the server's order (with the legacy PSK
//! callback only SHA-256 TLS 1.3 suites are usable, and GnuTLS clients list
//! ChaCha20 before AES-128-GCM: their order would cost throughput on AES-NI
//! machines).
//!
//! A PSK client's identity is captured in the PSK callback (OpenSSL's
//! `SSL_get_psk_identity` returns nothing under TLS 1.3) and stored in the
//! connection's ex-data; a certificate client is known by its verified
//! certificate's common name and subject DN. [`Tls::allowed`] checks a disk's
//! `allow` list against that [`PeerId`].
//!
//! The connection side (the in-place upgrade of a socket after STARTTLS and the
//! blocking stream the transmission phase uses) is `nbd::starttls`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::nid::Nid;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions, SslRef,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::{X509NameRef, X509};

use crate::config::{Config, TlsMode};

/// Why the TLS credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file cannot be read.
    #[error("key `{key}`: cannot read {path}")]
    Read {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line of the PSK file is not `identity:hexkey`.
    #[error("key `tls_psk_file`: {path} line {line}: {expected}")]
    PskLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was expected there.
        expected: String,
    },
    /// The PSK file holds no key.
    #[error("key `tls_psk_file`: {path} holds no `identity:hexkey` line")]
    PskEmpty {
        /// The file.
        path: PathBuf,
    },
    /// OpenSSL refused a certificate, key or CA file.
    #[error("key `{key}`: {path}: {what}")]
    Pem {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        what: &'static str,
        /// OpenSSL's errors.
        #[source]
        source: ErrorStack,
    },
    /// OpenSSL failed to set up a context.
    #[error("cannot set up the TLS context")]
    Context(#[source] ErrorStack),
}

/// Longest PSK accepted (OpenSSL's PSK_MAX_PSK_LEN is 512 bytes; psktool
/// writes 32).
const MAX_PSK_LEN: usize = 256;
/// Longest PSK identity (RFC 4279: at most 2^16 bytes; OpenSSL: 128).
const MAX_IDENTITY_LEN: usize = 128;

/// The keys of a psktool file. Never printed (see the Debug impl).
#[derive(Clone, Default)]
pub struct PskKeys {
    keys: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        write!(f, "PskKeys({ids:?})")
    }
}

impl PskKeys {
    /// Reads and parses a psktool file.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            key: "tls_psk_file",
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses psktool's format: `identity:hexkey` per line; blank lines and
    /// `#` comments are skipped. The identity is everything before the last
    /// `:` (psktool refuses `:` in identities, so this is the same split).
    pub fn parse(text: &str, path: &Path) -> Result<Self, TlsError> {
        let mut keys = HashMap::new();
        let bad = |line: usize, expected: String| TlsError::PskLine {
            path: path.to_path_buf(),
            line,
            expected,
        };
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((id, hex)) = line.rsplit_once(':') else {
                return Err(bad(n, "`identity:hexkey` (no `:` found)".into()));
            };
            if id.is_empty() || id.len() > MAX_IDENTITY_LEN || id.contains('\0') {
                return Err(bad(
                    n,
                    format!("an identity of 1 to {MAX_IDENTITY_LEN} bytes before the `:`"),
                ));
            }
            let key = hex_decode(hex.trim()).ok_or_else(|| {
                bad(
                    n,
                    "a key of hexadecimal digit pairs after the `:` (as psktool writes it)".into(),
                )
            })?;
            if key.is_empty() || key.len() > MAX_PSK_LEN {
                return Err(bad(
                    n,
                    format!("a key of 1 to {MAX_PSK_LEN} bytes (got {})", key.len()),
                ));
            }
            if keys.insert(id.to_string(), key).is_some() {
                return Err(bad(
                    n,
                    format!("an identity not used before (`{id}` repeats)"),
                ));
            }
        }
        if keys.is_empty() {
            return Err(TlsError::PskEmpty {
                path: path.to_path_buf(),
            });
        }
        Ok(PskKeys { keys })
    }

    /// The key of `identity`.
    pub fn get(&self, identity: &str) -> Option<&[u8]> {
        self.keys.get(identity).map(Vec::as_slice)
    }

    /// How many identities.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Who the peer proved to be in the TLS handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerId {
    /// Not over TLS, or TLS without a client identity (X.509 without
    /// `tls_ca`).
    Anonymous,
    /// A PSK identity.
    Psk(String),
    /// A verified client certificate: its subject DN (RFC 4514 order, as
    /// GnuTLS prints it) and common name.
    Cert {
        /// Subject DN, e.g. `CN=client1,O=Test,C=GB`.
        dn: String,
        /// Common name.
        cn: Option<String>,
    },
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerId::Anonymous => write!(f, "anonymous"),
            PeerId::Psk(id) => write!(f, "psk:{id}"),
            PeerId::Cert { dn, .. } => write!(f, "cert:{dn}"),
        }
    }
}

/// The connection's ex-data slot the PSK callback fills with the identity it
/// accepted.
fn psk_identity_index() -> Result<Index<Ssl, String>, ErrorStack> {
    static IDX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    if let Some(i) = IDX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index()?;
    Ok(*IDX.get_or_init(|| i))
}

/// What a TLS peer proved in the handshake.
pub fn peer_id(ssl: &SslRef) -> PeerId {
    if let Some(id) = psk_identity_index().ok().and_then(|i| ssl.ex_data(i)) {
        return PeerId::Psk(id.clone());
    }
    // Present only when the server asked for it (tls_ca), and then verified.
    match ssl.peer_certificate() {
        Some(cert) => cert_id(&cert),
        None => PeerId::Anonymous,
    }
}

fn cert_id(cert: &X509) -> PeerId {
    let name = cert.subject_name();
    PeerId::Cert {
        dn: dn_string(name),
        cn: name
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok()),
    }
}

/// The RFC 4514 form (most significant RDN last), e.g. `CN=client1,O=Test,C=GB`.
fn dn_string(name: &X509NameRef) -> String {
    let mut parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let val = e.data().to_string().unwrap_or_default();
            format!("{key}={}", escape_rdn(&val))
        })
        .collect();
    parts.reverse();
    parts.join(",")
}

fn escape_rdn(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
        {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// TLS 1.2 PSK suites, forward-secret ones first (GnuTLS clients also offer
/// plain PSK). TLS 1.3 suites are set apart: with the legacy PSK callback
/// OpenSSL needs a SHA-256 suite, and AES-128-GCM leads.
const PSK_CIPHERS_12: &str = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";
/// TLS 1.2 certificate suites.
const CERT_CIPHERS_12: &str = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL";
/// TLS 1.3 suites, in the server's order of preference.
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// The server's TLS policy and credentials.
pub struct Tls {
    /// off / on / require.
    pub mode: TlsMode,
    /// `None` when `mode` is off.
    ctx: Option<SslContext>,
    /// Disk name -> the identities allowed to open it.
    allow: HashMap<String, Vec<String>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// No TLS and no access lists.
    pub fn off() -> Self {
        Tls {
            mode: TlsMode::Off,
            ctx: None,
            allow: HashMap::new(),
        }
    }

    /// Loads the credentials a (validated) config names.
    pub fn load(cfg: &Config) -> Result<Arc<Self>, TlsError> {
        let allow = cfg
            .disk
            .iter()
            .filter_map(|d| d.allow.clone().map(|a| (d.name.clone(), a)))
            .collect();
        let ctx = match cfg.tls {
            TlsMode::Off => None,
            TlsMode::On | TlsMode::Require => {
                let psk = match &cfg.tls_psk_file {
                    Some(p) => Some(Arc::new(PskKeys::load(p)?)),
                    None => None,
                };
                let cert = match (&cfg.tls_cert, &cfg.tls_key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path(), cfg.tls_ca.as_deref())),
                    _ => None,
                };
                Some(server_context(psk, cert)?)
            }
        };
        Ok(Arc::new(Tls {
            mode: cfg.tls,
            ctx,
            allow,
        }))
    }

    /// A fresh server-side `Ssl` for one connection (`None`: TLS is off).
    pub fn ssl(&self) -> Option<Result<Ssl, ErrorStack>> {
        self.ctx.as_ref().map(|c| Ssl::new(c))
    }

    /// Whether STARTTLS is offered.
    pub fn enabled(&self) -> bool {
        self.ctx.is_some()
    }

    /// Whether `disk` has an access list (and so needs TLS).
    pub fn restricted(&self, disk: &str) -> bool {
        self.allow.contains_key(disk)
    }

    /// Whether `peer` may open `disk`: no list, or the peer's PSK identity,
    /// certificate common name or full subject DN is on it.
    pub fn allowed(&self, disk: &str, peer: &PeerId) -> bool {
        let Some(list) = self.allow.get(disk) else {
            return true;
        };
        match peer {
            PeerId::Anonymous => false,
            PeerId::Psk(id) => list.iter().any(|a| a == id),
            PeerId::Cert { dn, cn } => list.iter().any(|a| a == dn || Some(a) == cn.as_ref()),
        }
    }
}

fn pem_err(
    key: &'static str,
    path: &Path,
    what: &'static str,
) -> impl FnOnce(ErrorStack) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Pem {
        key,
        path,
        what,
        source,
    }
}

/// Checks a file is readable, for an error that names it (OpenSSL's own
/// "system lib" message does not say which file or why).
fn readable(key: &'static str, path: &Path) -> Result<(), TlsError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| TlsError::Read {
            key,
            path: path.to_path_buf(),
            source,
        })
}

fn common(b: &mut SslContextBuilder) -> Result<(), ErrorStack> {
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_options(
        SslOptions::NO_COMPRESSION
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_TICKET,
    );
    // Not RELEASE_BUFFERS: it frees and reallocates the record buffers
    // around every write, and a connection's ~34 KiB of buffers are cheap.
    b.set_ciphersuites(TLS13_SUITES)?;
    b.set_num_tickets(0)?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    // OpenSSL treats an external TLS 1.3 PSK as a session: with peer
    // verification on (tls_ca) it then needs a session id context, even
    // with resumption off.
    b.set_session_id_context(b"stord-nbd")?;
    Ok(())
}

/// The server context: PSK (`psk`), X.509 (`cert`: certificate chain, key,
/// optional CA for client certificates), or both (a PSK client then uses
/// its key, any other the certificate).
fn server_context(
    psk: Option<Arc<PskKeys>>,
    cert: Option<(&Path, &Path, Option<&Path>)>,
) -> Result<SslContext, TlsError> {
    let mut b = SslContext::builder(SslMethod::tls_server()).map_err(TlsError::Context)?;
    common(&mut b).map_err(TlsError::Context)?;
    let ciphers = match (&psk, &cert) {
        (Some(_), Some(_)) => format!("{PSK_CIPHERS_12}:{CERT_CIPHERS_12}"),
        (Some(_), None) => PSK_CIPHERS_12.to_string(),
        _ => CERT_CIPHERS_12.to_string(),
    };
    b.set_cipher_list(&ciphers).map_err(TlsError::Context)?;
    if let Some(keys) = psk {
        let idx = psk_identity_index().map_err(TlsError::Context)?;
        b.set_psk_server_callback(move |ssl, identity, out| {
            // Unknown identity or unusable key: 0 fails the handshake.
            let Some(id) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                return Ok(0);
            };
            match keys.get(id) {
                Some(key) if key.len() <= out.len() => {
                    out[..key.len()].copy_from_slice(key);
                    ssl.set_ex_data(idx, id.to_string());
                    Ok(key.len())
                }
                _ => Ok(0),
            }
        });
    }
    if let Some((chain, key, ca)) = cert {
        readable("tls_cert", chain)?;
        b.set_certificate_chain_file(chain).map_err(pem_err(
            "tls_cert",
            chain,
            "not a PEM certificate chain",
        ))?;
        readable("tls_key", key)?;
        b.set_private_key_file(key, SslFiletype::PEM)
            .map_err(pem_err("tls_key", key, "not a PEM private key"))?;
        b.check_private_key().map_err(pem_err(
            "tls_key",
            key,
            "does not match the certificate in tls_cert",
        ))?;
        match ca {
            Some(ca) => {
                readable("tls_ca", ca)?;
                let bad_ca = || pem_err("tls_ca", ca, "not a PEM CA certificate file");
                b.set_ca_file(ca).map_err(bad_ca())?;
                let names = openssl::x509::X509Name::load_client_ca_file(ca).map_err(bad_ca())?;
                b.set_client_ca_list(names);
                b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            }
            None => b.set_verify(SslVerifyMode::NONE),
        }
    }
    Ok(b.build())
}

/// `TLSv1.3 TLS_AES_128_GCM_SHA256`, for the log.
pub fn describe(ssl: &SslRef) -> String {
    format!(
        "{} {}",
        ssl.version_str(),
        ssl.current_cipher().map(|c| c.name()).unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/stord/keys.psk")
    }

    #[test]
    fn psktool_file_parses() {
        let k = PskKeys::parse(
            "# keys\nalice:00ff10\n\nbob:0123456789abcdefABCDEF\r\n",
            p(),
        )
        .unwrap();
        assert_eq!(k.get("alice"), Some(&[0, 0xff, 0x10][..]));
        assert_eq!(k.get("bob").map(<[u8]>::len), Some(11));
        assert_eq!(k.len(), 2);
        assert_eq!(format!("{k:?}"), "PskKeys([\"alice\", \"bob\"])");
    }

    #[test]
    fn bad_psk_lines_name_the_file_and_line() {
        for (text, line, what) in [
            ("alice:00\nnocolon\n", 2, "no `:`"),
            (":00\n", 1, "identity"),
            ("a:0g\n", 1, "hexadecimal"),
            ("a:abc\n", 1, "hexadecimal"),
            ("a:\n", 1, "1 to 256 bytes"),
            ("a:00\n#\na:01\n", 3, "repeats"),
            ("a:é0\n", 1, "hexadecimal"),
        ] {
            let e = PskKeys::parse(text, p()).unwrap_err().to_string();
            assert!(e.contains("/etc/stord/keys.psk"), "{e}");
            assert!(e.contains(&format!("line {line}:")), "{text:?}: {e}");
            assert!(e.contains(what), "{text:?}: {e}");
        }
        let e = PskKeys::parse("# nothing\n\n", p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no"), "{e}");
        let e = PskKeys::load(Path::new("/nonexistent/keys.psk")).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/keys.psk"), "{e}");
    }

    #[test]
    fn allow_lists_match_identities_and_names() {
        let mut allow = HashMap::new();
        allow.insert("d".to_string(), vec!["alice".into(), "CN=x,O=Test".into()]);
        let t = Tls {
            mode: TlsMode::On,
            ctx: None,
            allow,
        };
        assert!(t.allowed("open", &PeerId::Anonymous));
        assert!(t.restricted("d") && !t.restricted("open"));
        assert!(t.allowed("d", &PeerId::Psk("alice".into())));
        assert!(!t.allowed("d", &PeerId::Psk("bob".into())));
        assert!(!t.allowed("d", &PeerId::Anonymous));
        let cert = |dn: &str, cn: &str| PeerId::Cert {
            dn: dn.into(),
            cn: Some(cn.into()),
        };
        assert!(t.allowed("d", &cert("CN=alice,O=Other", "alice")));
        assert!(t.allowed("d", &cert("CN=x,O=Test", "x")));
        assert!(!t.allowed("d", &cert("CN=x,O=Evil", "x")));
    }

    #[test]
    fn rdn_values_are_escaped() {
        assert_eq!(escape_rdn("a,b=c"), "a\\,b\\=c");
        assert_eq!(escape_rdn("#x"), "\\#x");
    }
}
