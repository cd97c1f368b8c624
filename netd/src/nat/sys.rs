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

/// The IPv4 and IPv6 addresses of the host's interfaces (getifaddrs(3)); empty if
/// the call fails.
pub fn host_addrs() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocates into `head`, which
    // is a valid place for one; on failure it returns -1 and we read nothing.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned, which
        // stays valid until the freeifaddrs below.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` is non-null and points to a sockaddr of the family
            // in its `sa_family` field; it is read as a sockaddr_in only when that
            // family is AF_INET, and as a sockaddr_in6 only when it is AF_INET6,
            // whose structures it then is.
            unsafe {
                let family = i32::from((*ifa.ifa_addr).sa_family);
                if family == libc::AF_INET {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let a = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    out.push(a.into());
                } else if family == libc::AF_INET6 {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` is the list getifaddrs allocated; nothing refers to it after.
    unsafe { libc::freeifaddrs(head) };
    out
}
