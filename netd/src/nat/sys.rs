//! The unsafe calls of the NAT router: registering descriptors with tokio.

use std::io;
use std::os::fd::AsRawFd;

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Registers `sock` (owned) with the tokio reactor for readability.
pub fn register(sock: Socket) -> io::Result<AsyncFd<Socket>> {
    // SAFETY: `Socket` owns its descriptor and closes it only when dropped; the
    // AsyncFd takes ownership of the Socket, so the descriptor stays open and refers
    // to the same socket for the AsyncFd's whole lifetime, and `as_raw_fd` always
    // returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Registers the descriptor that `owner` keeps open (an inline port's fd or stop
/// eventfd, see [`crate::port::InlineReader`]) with the tokio reactor for
/// readability.
pub fn register_fd<T: AsRawFd>(owner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: the owners passed here ([`crate::port::SharedFd`],
    // [`crate::port::StopFd`]) hold an `Arc` of the owned descriptor, so it stays
    // open and refers to the same file for the AsyncFd's whole lifetime, and
    // `as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(owner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
