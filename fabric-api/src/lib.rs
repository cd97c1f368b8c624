//! fabric-api: the control APIs of netd and stord, and the one client both CLIs and
//! vmm-shim use.
//!
//! Protocol. A control socket is a unix stream socket. The client writes one request
//! as a JSON object on one line; the daemon answers with one JSON line; the client
//! may send more requests on the same connection. Requests are tagged the same way
//! for both daemons: `{"cmd": "<snake_case name>", ...fields}` (stord's requests were
//! tagged `"op"` before; stord still accepts that tag for one release, see
//! [`stord::Request`]). Unknown fields and names are refused, not ignored.
//! A request longer than [`MAX_REQUEST`] bytes is answered with an error.
//!
//! Answers carry `"ok"`: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`, where
//! the error is the daemon's message with its whole cause chain. netd puts its
//! result under `"data"` ([`netd::Response`]); stord names it by request (`"disks"`,
//! `"status"`: [`stord::Response`]).
//!
//! [`client::Client`] is blocking (no runtime needed: the CLIs and vmm-shim's device
//! set-up are plain threads), bounds how long it waits to connect and for an answer,
//! and how many bytes of answer it reads, so a hung or hostile peer can neither
//! block nor exhaust its caller.
//!
//! The daemons' server loops are async (tokio) and stay in the daemons; they share
//! [`decode_request`] and [`encode_line`] from here so both speak the same framing
//! and say the same things about a bad line.

/// Gives a fieldless enum its names from one table (`Variant => "name"`): `as_str`,
/// `Display` and `FromStr` (whose error is `$err`, built from the text it got, bound
/// to `$got`). Config files, the API (serde's lowercase names) and the CLIs all
/// spell a value the same way.
macro_rules! named_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? } else |$got:ident| $err:expr) => {
        impl $ty {
            /// The name the config file, the API and the CLI use.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str($got: &str) -> Result<Self, String> {
                match $got {
                    $($name => Ok($ty::$variant),)+
                    _ => Err($err),
                }
            }
        }
    };
}

pub mod client;
pub mod netd;
pub mod stord;

pub use client::{Call, Client, ClientError, Reply};

/// Longest request line a daemon reads, in bytes, its newline included.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Parses one request line as a daemon receives it (newline included, if any),
/// or says why not, in the words the answer's `"error"` carries.
pub fn decode_request<R: serde::de::DeserializeOwned>(line: &[u8]) -> Result<R, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// One JSON line: `v` serialized, then `\n`. `fallback` stands in when `v` cannot be
/// serialized (a map with non-string keys; none of this crate's types), so the peer
/// always gets a line.
pub fn encode_line<T: serde::Serialize>(v: &T, fallback: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| fallback.to_vec());
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_bounded_and_checked() {
        let r: Result<netd::Request, String> = decode_request(b"{\"cmd\":\"net_list\"}\n");
        assert!(matches!(r, Ok(netd::Request::NetList)));
        let long = vec![b' '; MAX_REQUEST + 1];
        let e = decode_request::<netd::Request>(&long).unwrap_err();
        assert_eq!(e, format!("request longer than {MAX_REQUEST} bytes"));
        let e = decode_request::<netd::Request>(b"{\"cmd\":\"explode\"}").unwrap_err();
        assert!(
            e.starts_with("bad request: ") && e.contains("explode"),
            "{e}"
        );
        assert_eq!(
            encode_line(&netd::Response::ok(serde_json::Value::Null), b""),
            b"{\"ok\":true,\"data\":null}\n"
        );
    }
}
