//! The one control client: connect to a daemon's unix socket, send one request
//! line, read one answer line, turn `"ok": false` into an error.
//!
//! Bounds. A daemon that hangs (or a socket file whose listener has stopped
//! accepting) must not hang its CLI or a VMM starting up, and a peer that answers
//! with an endless line must not grow the client's memory: connecting, sending and
//! waiting for the answer are each bounded by [`Client::timeout`] (a unix socket's
//! connect waits for room in the listener's backlog under the send timeout), and
//! at most [`Client::max_reply`] bytes of answer are read.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long the client waits by default to connect, to send, and for the answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest answer read by default: netd's flow and lease lists are the largest
/// answers, well under this at their bounds (4096 flows).
pub const DEFAULT_MAX_REPLY: usize = 16 << 20;

/// A request type of one daemon's API.
pub trait Call: Serialize {
    /// The daemon's answer type.
    type Reply: Reply + DeserializeOwned;
    /// The daemon's name, for messages.
    const DAEMON: &'static str;
}

/// An answer that says whether the request succeeded.
pub trait Reply {
    /// What a successful answer gives the caller.
    type Data;
    /// The result, or the daemon's error message.
    fn into_result(self) -> Result<Self::Data, String>;
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// cannot connect to the control socket
    #[error("cannot connect to control socket {} (is {daemon} running?)", path.display())]
    Connect {
        /// The daemon.
        daemon: &'static str,
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the request could not be sent or the answer read
    #[error("control socket I/O failed")]
    Io(#[source] std::io::Error),
    /// no answer in time
    #[error("no answer from {daemon} within {} s", timeout.as_secs_f32())]
    TimedOut {
        /// The daemon.
        daemon: &'static str,
        /// How long the client waited.
        timeout: Duration,
    },
    /// an answer longer than the bound
    #[error("{daemon}'s answer is longer than {max} bytes")]
    TooLong {
        /// The daemon.
        daemon: &'static str,
        /// The bound.
        max: usize,
    },
    /// an answer that is not the API's JSON
    #[error("bad response from {daemon}")]
    Malformed {
        /// The daemon.
        daemon: &'static str,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// the daemon refused: its message
    #[error("{message}")]
    Refused {
        /// The daemon.
        daemon: &'static str,
        /// The daemon's message (with its cause chain).
        message: String,
    },
}

/// A client of one control socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    max_reply: usize,
}

impl Client {
    /// A client of the socket at `path`, with the default bounds.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
            max_reply: DEFAULT_MAX_REPLY,
        }
    }

    /// Bounds connecting, sending and waiting for the answer to `timeout` each
    /// (zero is taken as one millisecond: the socket calls have no "no timeout").
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Reads at most `max` bytes of answer (its newline included).
    pub fn max_reply(mut self, max: usize) -> Self {
        self.max_reply = max;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `req`, returns the successful answer's data.
    pub fn call<R: Call>(&self, req: &R) -> Result<<R::Reply as Reply>::Data, ClientError> {
        self.exchange(req).map(|(data, _)| data)
    }

    /// Sends `req` and reads its answer like [`Client::call`], then hands over the
    /// connection, for what the daemon streams after a successful answer (netd's
    /// `capture`: pcapng until the capture ends). The stream has no read timeout
    /// (a capture may be quiet for long); bytes the answer's read took past its
    /// line are in the returned reader's buffer.
    pub fn open_stream<R: Call>(
        &self,
        req: &R,
    ) -> Result<(<R::Reply as Reply>::Data, BufReader<UnixStream>), ClientError> {
        let (data, reader) = self.exchange(req)?;
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(ClientError::Io)?;
        Ok((data, reader))
    }

    fn exchange<R: Call>(
        &self,
        req: &R,
    ) -> Result<(<R::Reply as Reply>::Data, BufReader<UnixStream>), ClientError> {
        let daemon = R::DAEMON;
        let timed_out = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::TimedOut {
                    daemon,
                    timeout: self.timeout,
                }
            }
            _ => ClientError::Io(e),
        };
        let mut line =
            serde_json::to_vec(req).map_err(|source| ClientError::Malformed { daemon, source })?;
        line.push(b'\n');
        let mut s = self.connect(daemon)?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(ClientError::Io)?;
        s.write_all(&line).map_err(timed_out)?;
        // One line, at most max_reply bytes: a peer that streams bytes without a
        // newline is cut off there (the read timeout alone would not stop it).
        let mut resp = Vec::new();
        let limit = u64::try_from(self.max_reply).unwrap_or(u64::MAX);
        let mut reader = BufReader::new(s);
        (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut resp)
            .map_err(timed_out)?;
        if !resp.ends_with(b"\n") && resp.len() >= self.max_reply {
            return Err(ClientError::TooLong {
                daemon,
                max: self.max_reply,
            });
        }
        let reply: R::Reply = serde_json::from_slice(&resp)
            .map_err(|source| ClientError::Malformed { daemon, source })?;
        let data = reply
            .into_result()
            .map_err(|message| ClientError::Refused { daemon, message })?;
        Ok((data, reader))
    }

    fn connect(&self, daemon: &'static str) -> Result<UnixStream, ClientError> {
        let err = |source| ClientError::Connect {
            daemon,
            path: self.path.clone(),
            source,
        };
        let addr = socket2::SockAddr::unix(&self.path).map_err(err)?;
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(err)?;
        // Linux bounds a blocking unix connect (waiting for backlog room) by the
        // send timeout; it then also bounds writing the request.
        sock.set_write_timeout(Some(self.timeout)).map_err(err)?;
        sock.connect(&addr).map_err(err)?;
        Ok(UnixStream::from(std::os::fd::OwnedFd::from(sock)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{netd, stord};
    use std::os::unix::net::UnixListener;

    /// A one-connection peer on a fresh socket that answers with `answer(request)`.
    fn peer(
        answer: impl FnOnce(String, UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut req = String::new();
            BufReader::new(&s).read_line(&mut req).unwrap();
            answer(req, s);
        });
        (dir, path, t)
    }

    #[test]
    fn one_line_each_way() {
        let (_d, path, t) = peer(|req, mut s| {
            assert_eq!(req, "{\"cmd\":\"mac\",\"net\":\"lab\"}\n");
            s.write_all(b"{\"ok\":true,\"data\":[\"x\"]}\n").unwrap();
        });
        let v = Client::new(&path)
            .call(&netd::Request::Mac { net: "lab".into() })
            .unwrap();
        assert_eq!(v, serde_json::json!(["x"]));
        t.join().unwrap();
    }

    #[test]
    fn a_refusal_is_the_daemons_message() {
        let (_d, path, t) = peer(|_, mut s| {
            s.write_all(b"{\"ok\":false,\"error\":\"disk `a` already exists\"}\n")
                .unwrap();
        });
        let e = Client::new(&path)
            .call(&stord::Request::List {})
            .unwrap_err();
        assert!(matches!(
            e,
            ClientError::Refused {
                daemon: "stord",
                ..
            }
        ));
        assert_eq!(e.to_string(), "disk `a` already exists");
        t.join().unwrap();
    }

    #[test]
    fn no_daemon_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let e = Client::new(&path)
            .call(&stord::Request::Status {})
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("none.sock") && msg.contains("is stord running"),
            "{msg}"
        );
    }

    #[test]
    fn an_endless_answer_is_cut_off_not_buffered() {
        let (_d, path, t) = peer(|_, mut s| {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..128 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let e = Client::new(&path)
            .max_reply(64 << 10)
            .call(&netd::Request::NetList)
            .unwrap_err();
        assert!(matches!(e, ClientError::TooLong { max: 65536, .. }), "{e}");
        drop(e);
        t.join().unwrap();
    }

    #[test]
    fn a_silent_daemon_times_out() {
        let (_d, path, t) = peer(|_, s| {
            std::thread::sleep(Duration::from_millis(400));
            drop(s);
        });
        let started = std::time::Instant::now();
        let e = Client::new(&path)
            .timeout(Duration::from_millis(100))
            .call(&netd::Request::NetList)
            .unwrap_err();
        assert!(matches!(e, ClientError::TimedOut { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_millis(390));
        t.join().unwrap();
    }

    #[test]
    fn a_stream_follows_its_answer_with_nothing_lost() {
        let (_d, path, t) = peer(|_, mut s| {
            s.write_all(b"{\"ok\":true,\"data\":1}\nraw bytes").unwrap();
        });
        let (v, mut r) = Client::new(&path)
            .open_stream(&netd::Request::NetList)
            .unwrap();
        assert_eq!(v, serde_json::json!(1));
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "raw bytes");
        t.join().unwrap();
    }

    #[test]
    fn garbage_is_malformed() {
        let (_d, path, t) = peer(|_, mut s| {
            s.write_all(b"hello\n").unwrap();
        });
        let e = Client::new(&path)
            .call(&netd::Request::NetList)
            .unwrap_err();
        assert_eq!(e.to_string(), "bad response from netd");
        t.join().unwrap();
    }
}
