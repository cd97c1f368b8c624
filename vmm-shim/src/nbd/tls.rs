//! TLS for the NBD client (NBD_OPT_STARTTLS): credentials as libnbd takes them, and
//! the OpenSSL client context.
//!
//! Theory of operation: a `nbds://` disk carries a [`TlsCreds`], checked when the
//! configuration is validated: a PSK (identity and key from a GnuTLS psktool file,
//! `identity:hexkey` per line) or an X.509 directory in libnbd's layout (`ca-cert.pem`
//! to verify the server, and optionally `client-cert.pem` + `client-key.pem` to prove
//! ourselves). At each connection the client asks for STARTTLS right after the flags;
//! anything but an ACK fails the connection (a server that refuses TLS never gets
//! our data in clear), then [`handshake`] runs TLS (1.2 at least) on the socket and the
//! rest of the NBD handshake goes over it. With X.509 the server certificate must
//! chain to the CA and name the host of the URI (IP or DNS name). With a PSK no
//! certificate is trusted (no CA store): a server that answers with one instead of
//! using the key fails verification.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use openssl::error::ErrorStack;
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslFiletype, SslMethod, SslMode, SslOptions, SslStream,
    SslVerifyMode, SslVersion,
};

/// A TLS credential error (found while validating the configuration).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// a credential file could not be read
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// a PSK file line is malformed
    #[error("{path}: line {line}: {what}")]
    PskLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// the identity is not in the PSK file
    #[error("{path}: no key for identity {identity:?}")]
    NoIdentity {
        /// The file.
        path: PathBuf,
        /// The identity asked for.
        identity: String,
    },
    /// OpenSSL refused a setting or a file
    #[error("TLS setup: {what}")]
    Ssl {
        /// Which step.
        what: String,
        /// OpenSSL's errors.
        #[source]
        source: ErrorStack,
    },
}

/// What a `nbds://` disk proves itself with.
#[derive(Clone, PartialEq, Eq)]
pub enum TlsCreds {
    /// A pre-shared key.
    Psk {
        /// The identity sent to the server.
        identity: String,
        /// The key.
        key: Vec<u8>,
    },
    /// X.509 certificates in libnbd's layout.
    X509 {
        /// The directory.
        dir: PathBuf,
    },
}

impl fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never the key.
            TlsCreds::Psk { identity, .. } => write!(f, "Psk({identity:?})"),
            TlsCreds::X509 { dir } => write!(f, "X509({})", dir.display()),
        }
    }
}

/// Longest PSK accepted (psktool makes 32 bytes; OpenSSL's buffer is 512).
const MAX_PSK: usize = 256;

impl TlsCreds {
    /// Reads `identity`'s key from the psktool file at `path`.
    pub fn psk_from_file(path: &Path, identity: &str) -> Result<Self, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |line, what| TlsError::PskLine {
            path: path.to_path_buf(),
            line,
            what,
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            // The identity may not hold ':'; the key follows the last one.
            let (id, hex) = line
                .rsplit_once(':')
                .ok_or_else(|| bad(n + 1, "expected identity:hexkey"))?;
            let key = hex_decode(hex.trim()).ok_or_else(|| bad(n + 1, "key is not hex"))?;
            if key.is_empty() || key.len() > MAX_PSK {
                return Err(bad(n + 1, "key must be 1 to 256 bytes"));
            }
            if id == identity {
                return Ok(TlsCreds::Psk {
                    identity: identity.to_string(),
                    key,
                });
            }
        }
        Err(TlsError::NoIdentity {
            path: path.to_path_buf(),
            identity: identity.to_string(),
        })
    }

    /// Checks an X.509 directory: `ca-cert.pem` must exist; a client certificate
    /// and key, if any, come as a pair (checked to match when the context is built).
    pub fn x509_dir(dir: &Path) -> Result<Self, TlsError> {
        let creds = TlsCreds::X509 {
            dir: dir.to_path_buf(),
        };
        // Building the context reads and checks every file now, not at the first
        // connection.
        client_context(&creds)?;
        Ok(creds)
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// TLS 1.2 PSK suites (ECDHE-PSK first, for forward secrecy; plain PSK last, which
/// GnuTLS servers also allow). TLS 1.3 suites are set apart; OpenSSL needs a
/// SHA-256 one for its PSK callback in TLS 1.3.
const PSK_CIPHERS_12: &str = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:\
ECDHE-PSK-AES128-CBC-SHA256:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:\
PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
const X509_CIPHERS_12: &str = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!PSK";

fn ssl_err(what: impl Into<String>) -> impl FnOnce(ErrorStack) -> TlsError {
    let what = what.into();
    move |source| TlsError::Ssl { what, source }
}

/// The client context for `creds`.
pub fn client_context(creds: &TlsCreds) -> Result<SslContext, TlsError> {
    let mut b = SslContext::builder(SslMethod::tls_client()).map_err(ssl_err("context"))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(ssl_err("TLS 1.2 minimum"))?;
    b.set_options(SslOptions::NO_COMPRESSION | SslOptions::NO_RENEGOTIATION);
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_ciphersuites(TLS13_SUITES)
        .map_err(ssl_err("TLS 1.3 suites"))?;
    match creds {
        TlsCreds::Psk { identity, key } => {
            b.set_cipher_list(PSK_CIPHERS_12)
                .map_err(ssl_err("PSK ciphers"))?;
            b.set_verify(SslVerifyMode::PEER);
            let (identity, key) = (identity.clone(), key.clone());
            b.set_psk_client_callback(move |_ssl, _hint, id_out, psk_out| {
                let id = identity.as_bytes();
                if id.len() + 1 > id_out.len() || key.len() > psk_out.len() {
                    return Ok(0);
                }
                id_out[..id.len()].copy_from_slice(id);
                // OpenSSL reads the identity as a C string.
                id_out[id.len()] = 0;
                psk_out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
        }
        TlsCreds::X509 { dir } => {
            b.set_cipher_list(X509_CIPHERS_12)
                .map_err(ssl_err("X.509 ciphers"))?;
            let ca = dir.join("ca-cert.pem");
            b.set_ca_file(&ca)
                .map_err(ssl_err(format!("CA certificate {}", ca.display())))?;
            b.set_verify(SslVerifyMode::PEER);
            let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
            if cert.exists() || key.exists() {
                b.set_certificate_chain_file(&cert)
                    .map_err(ssl_err(format!("client certificate {}", cert.display())))?;
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(ssl_err(format!("client key {}", key.display())))?;
                b.check_private_key()
                    .map_err(ssl_err("client certificate and key do not match"))?;
            }
        }
    }
    Ok(b.build())
}

/// Runs the client side of TLS on `sock` (after the server ACKed STARTTLS); with
/// X.509 the server certificate must name `host`.
pub fn handshake<S: Read + Write>(
    creds: &TlsCreds,
    host: &str,
    sock: S,
) -> Result<SslStream<S>, std::io::Error> {
    let fail = |e: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e);
    let ctx = client_context(creds).map_err(|e| fail(crate::error_chain(&e)))?;
    let mut ssl = Ssl::new(&ctx).map_err(|e| fail(e.to_string()))?;
    if let TlsCreds::X509 { .. } = creds {
        let set = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ssl.param_mut().set_ip(ip),
            Err(_) => ssl
                .param_mut()
                .set_host(host)
                .and_then(|()| ssl.set_hostname(host)),
        };
        set.map_err(|e| fail(format!("server name {host:?}: {e}")))?;
    }
    ssl.connect(sock).map_err(|e| match e {
        HandshakeError::Failure(m) => {
            let verify = m.ssl().verify_result();
            fail(format!("TLS handshake failed: {} ({verify})", m.error()))
        }
        HandshakeError::SetupFailure(e) => fail(format!("TLS setup failed: {e}")),
        HandshakeError::WouldBlock(_) => fail("TLS handshake timed out".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_as_psktool_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.psk");
        std::fs::write(&p, "# comment\nalice:00ff10\n\nbob:0a0b\n").unwrap();
        let c = TlsCreds::psk_from_file(&p, "bob").unwrap();
        assert_eq!(
            c,
            TlsCreds::Psk {
                identity: "bob".into(),
                key: vec![10, 11]
            }
        );
        assert!(!format!("{c:?}").contains("0a"), "{c:?}");
        let e = TlsCreds::psk_from_file(&p, "carol").unwrap_err();
        assert!(
            e.to_string().contains("no key for identity \"carol\""),
            "{e}"
        );
        std::fs::write(&p, "alice:zz\n").unwrap();
        let e = TlsCreds::psk_from_file(&p, "alice").unwrap_err();
        assert!(e.to_string().contains("line 1: key is not hex"), "{e}");
        let e = TlsCreds::x509_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    }
}
