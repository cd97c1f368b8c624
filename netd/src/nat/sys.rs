//! The one unsafe call of the NAT router: registering an owned socket with tokio.

use std::io;

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
