//! The one socket option std and socket2 do not offer: the path MTU of a
//! connected UDP socket (IP_MTU), which is the MTU of the route's interface unless
//! the kernel learned a smaller path MTU.

use std::io;
use std::os::fd::AsRawFd;

/// IP_MTU of the connected socket `sock`.
pub fn path_mtu(sock: &impl AsRawFd) -> io::Result<u32> {
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `mtu` and `len` are live locals of the sizes passed; the kernel
    // writes at most `len` bytes into `mtu`. `sock` is an open socket.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            &mut mtu as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mtu.max(0) as u32)
}
