//! The bounded HTTP/1.1 pieces the daemons' small servers share: the `/metrics`
//! server (TCP, [`crate::metrics::serve`]) and vmm-shim's control API (a unix
//! socket). One request per connection, so there is no keep-alive to get wrong.
//!
//! Everything a client sends is bounded: the request head by a byte limit and a
//! deadline ([`read_head`]), a body by the same deadline and its own limit
//! ([`read_body`]), and what is drained after a refusal ([`drain`]) by both. A
//! client that sends too much, too slowly or garbage gets an error status and the
//! connection is closed; nothing it sends is trusted further than these functions
//! check it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A connection the servers serve: TCP or a unix socket.
pub trait Conn: Read + Write {
    /// `set_read_timeout` of the socket.
    fn read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// `set_write_timeout` of the socket.
    fn write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Shuts the sending side (the client then reads end of file).
    fn shutdown_write(&self);
}

/// [`Conn`] for a std socket type, whose methods of the same names it calls.
macro_rules! conn_for {
    ($t:ty) => {
        impl Conn for $t {
            fn read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
                self.set_read_timeout(t)
            }
            fn write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
                self.set_write_timeout(t)
            }
            fn shutdown_write(&self) {
                let _ = self.shutdown(std::net::Shutdown::Write);
            }
        }
    };
}
conn_for!(TcpStream);
conn_for!(UnixStream);

/// Why a server refused a request (each server counts them by [`Refusal::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// More connections than the server serves at once (503).
    TooManyConnections,
    /// A request head over the limit (431).
    TooLarge,
    /// A body over the limit (413).
    BodyTooLarge,
    /// The request did not all come in time (408).
    Timeout,
    /// Not a request, or a body that is not what the route takes (400).
    BadRequest,
    /// A body without a `Content-Length` (411).
    NoLength,
    /// No such path (404).
    NotFound,
    /// A method the path does not take (405).
    BadMethod,
}

impl Refusal {
    /// Every refusal, in the order servers index their counters by (`r as usize`).
    pub const ALL: [Refusal; 8] = [
        Refusal::TooManyConnections,
        Refusal::TooLarge,
        Refusal::BodyTooLarge,
        Refusal::Timeout,
        Refusal::BadRequest,
        Refusal::NoLength,
        Refusal::NotFound,
        Refusal::BadMethod,
    ];

    /// Its name as counted (`too_large`...).
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooLarge => "too_large",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::Timeout => "timeout",
            Refusal::BadRequest => "bad_request",
            Refusal::NoLength => "no_length",
            Refusal::NotFound => "not_found",
            Refusal::BadMethod => "bad_method",
        }
    }

    /// Its HTTP status line.
    pub fn status(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "503 Service Unavailable",
            Refusal::TooLarge => "431 Request Header Fields Too Large",
            Refusal::BodyTooLarge => "413 Content Too Large",
            Refusal::Timeout => "408 Request Timeout",
            Refusal::BadRequest => "400 Bad Request",
            Refusal::NoLength => "411 Length Required",
            Refusal::NotFound => "404 Not Found",
            Refusal::BadMethod => "405 Method Not Allowed",
        }
    }
}

/// What reading a request head gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// The whole head (up to and with its empty line) and what came after it.
    Complete {
        /// The request line and the headers.
        head: Vec<u8>,
        /// Bytes read past the head (the start of a body).
        rest: Vec<u8>,
    },
    /// More than the limit without an end of head.
    TooLarge,
    /// The deadline passed first.
    Timeout,
    /// The client went away (or the socket failed) before a whole head.
    Gone,
}

/// One read within `deadline`: `Ok(0)` at end of file, `Err(true)` on a timeout,
/// `Err(false)` on another error.
fn read_until<S: Conn>(s: &mut S, buf: &mut [u8], deadline: Instant) -> Result<usize, bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.read_timeout(Some(left)).is_err() {
            return Err(true);
        }
        match s.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(true)
            }
            Err(_) => return Err(false),
        }
    }
}

/// Reads a request head of at most `max` bytes before `deadline`.
pub fn read_head<S: Conn>(s: &mut S, max: usize, deadline: Instant) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            let rest = buf.split_off(end);
            return Head::Complete { head: buf, rest };
        }
        if buf.len() >= max {
            return Head::TooLarge;
        }
        match read_until(s, &mut chunk, deadline) {
            Ok(0) | Err(false) => return Head::Gone,
            Err(true) => return Head::Timeout,
            Ok(n) => {
                let room = max - buf.len();
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

/// Reads the rest of a body of `len` bytes (`got` holds its start) before `deadline`;
/// [`Head::Timeout`] or [`Head::Gone`] when it does not all come.
pub fn read_body<S: Conn>(
    s: &mut S,
    mut got: Vec<u8>,
    len: usize,
    deadline: Instant,
) -> Result<Vec<u8>, Head> {
    got.truncate(len);
    let mut chunk = [0u8; 4096];
    while got.len() < len {
        let want = (len - got.len()).min(chunk.len());
        match read_until(s, &mut chunk[..want], deadline) {
            Ok(0) | Err(false) => return Err(Head::Gone),
            Err(true) => return Err(Head::Timeout),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(got)
}

/// Where the head ends (after its empty line), if it is all there.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The method and target of a head's request line, when it is one (`METHOD /path
/// HTTP/1.x`, single spaces, UTF-8); `None` for anything else.
pub fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (version.starts_with("HTTP/1.") && target.starts_with('/')).then_some((method, target))
}

/// The value of header `name` (case-insensitive) in a head, trimmed; `None` when it
/// is absent or not UTF-8.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    head.split(|&b| b == b'\n').skip(1).find_map(|l| {
        let l = std::str::from_utf8(l).ok()?;
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Most bytes read and thrown away after a refusal.
const DRAIN_MAX: usize = 1024 * 1024;
/// Longest time spent on that.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads what the client still sends (bounded in bytes and time) after a refusal, so
/// that the close is a FIN and the client reads the answer: closing a socket with
/// unread input sends a RST, which may destroy the answer before it is read.
pub fn drain<S: Conn>(s: &mut S) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut left = DRAIN_MAX;
    let mut buf = [0u8; 4096];
    while left > 0 {
        match read_until(s, &mut buf, deadline) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Writes one answer (`status` such as `200 OK`) and shuts the sending side
/// (errors: the client is gone, nothing to do).
pub fn respond<S: Conn>(s: &mut S, status: &str, ctype: &str, body: &[u8], head_only: bool) {
    let hdr = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(hdr.as_bytes());
    if !head_only {
        let _ = s.write_all(body);
    }
    let _ = s.flush();
    s.shutdown_write();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn parses_request_lines_and_headers() {
        let h = b"PUT /vm?x HTTP/1.1\r\nHost: x\r\ncontent-LENGTH:  12 \r\n\r\n";
        assert_eq!(request_line(h), Some(("PUT", "/vm?x")));
        assert_eq!(header(h, "Content-Length"), Some("12"));
        assert_eq!(header(h, "Accept"), None);
        assert_eq!(request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_line(b"GET  / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_line(b"GET x HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_line(b"\xff\r\n\r\n"), None);
    }

    #[test]
    fn reads_bounded_heads_and_bodies() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let soon = || Instant::now() + Duration::from_millis(300);
        b.write_all(b"PUT / HTTP/1.1\r\n\r\nhel").unwrap();
        let Head::Complete { head, rest } = read_head(&mut a, 1024, soon()) else {
            panic!("no head");
        };
        assert_eq!(head, b"PUT / HTTP/1.1\r\n\r\n");
        b.write_all(b"lo!").unwrap();
        assert_eq!(read_body(&mut a, rest, 5, soon()).unwrap(), b"hello");
        // What is past the body stays unread; a body that never comes times out.
        assert_eq!(read_body(&mut a, Vec::new(), 9, soon()), Err(Head::Timeout));
        b.write_all(&[b'x'; 64]).unwrap();
        assert_eq!(read_head(&mut a, 32, soon()), Head::TooLarge);
        drop(b);
        assert_eq!(read_head(&mut a, 32, soon()), Head::Gone);
    }
}
