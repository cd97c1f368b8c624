//! The plain connection's two blocking socket halves for the transmission
//! phase (TCP, unix socket, or stdin / stdout under `--stdin`), made once per
//! connection: the [`SockRead`] / [`SockWrite`] implementations for std
//! sockets and files. Under TLS the halves are `starttls`'s handles on the
//! TLS stream instead.

use super::transmit::{SockRead, SockWrite, SHUTDOWN_POLL};
use super::*;

/// SO_RCVTIMEO / SO_SNDTIMEO for the std sockets.
macro_rules! socket_halves {
    ($($t:ty),*) => {$(
        impl SockRead for $t {
            fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
                self.set_read_timeout(t)
            }
        }
        impl SockWrite for $t {
            fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
                self.set_write_timeout(t)
            }
        }
    )*};
}
socket_halves!(std::net::TcpStream, std::os::unix::net::UnixStream);

/// stdin (`--stdin` mode): a pipe or socket that cannot take SO_RCVTIMEO, so
/// reads wait in poll(2) with the same period instead.
struct PolledFile(std::fs::File);

impl Read for PolledFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !crate::sys::poll_readable(self.0.as_raw_fd(), SHUTDOWN_POLL)? {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.0.read(buf)
    }
}

impl AsRawFd for PolledFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl SockRead for PolledFile {
    fn set_timeout(&self, _t: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

impl SockWrite for std::fs::File {}

pub(super) type Halves = (Box<dyn SockRead>, Box<dyn SockWrite>);

pub(super) fn blocking_halves(conn: Conn) -> std::io::Result<Halves> {
    match conn {
        Conn::Tcp(s) => {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok((Box::new(s.try_clone()?), Box::new(s)))
        }
        Conn::Unix(s) => {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok((Box::new(s.try_clone()?), Box::new(s)))
        }
        Conn::Stdio => {
            use std::os::fd::AsFd;
            let r = std::io::stdin().as_fd().try_clone_to_owned()?;
            let w = std::io::stdout().as_fd().try_clone_to_owned()?;
            Ok((
                Box::new(PolledFile(std::fs::File::from(r))),
                Box::new(std::fs::File::from(w)),
            ))
        }
    }
}
