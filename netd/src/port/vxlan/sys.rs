//! What std and socket2 do not offer: the path MTU of a connected UDP socket
//! (IP_MTU, the MTU of the route's interface unless the kernel learned a smaller
//! one), and UDP segmentation offload both ways: one `sendmsg` of many equal
//! datagrams (UDP_SEGMENT) and one `recvmsg` of many coalesced ones (UDP_GRO),
//! with the destination address of what was received (IP_PKTINFO: the group, or
//! the port's own address).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
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

/// `UDP_SEGMENT` (linux/udp.h): send one buffer as datagrams of this size.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams, with their size.
const UDP_GRO: libc::c_int = 104;

fn sockaddr_in(to: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The header of a one-datagram `sendmsg` / `recvmsg`: the peer address `addr`
/// and the one buffer `iov`, no control data yet. It points at both, which must
/// stay where they are until the call is made.
fn msghdr(addr: &mut libc::sockaddr_in, iov: &mut libc::iovec) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr as *mut libc::sockaddr_in as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg
}

/// Sends `buf` to `to` as datagrams of `seg` bytes each (the last may be shorter)
/// in one call: UDP GSO, the kernel cuts it (or hands it whole to a veth peer).
/// `seg` of `buf.len()` or more sends one plain datagram.
pub fn send_segmented(
    sock: &impl AsRawFd,
    buf: &[u8],
    seg: u16,
    to: SocketAddrV4,
) -> io::Result<()> {
    let mut addr = sockaddr_in(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsg with a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    let mut msg = msghdr(&mut addr, &mut iov);
    if usize::from(seg) < buf.len() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
        // SAFETY: msg_control points at `control` (32 bytes, aligned), which holds
        // CMSG_SPACE(2) bytes, so the first header and its 2 data bytes lie inside.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
        }
    }
    // SAFETY: `msg` points at live `addr`, `iov` (over `buf`) and `control` for the
    // duration of the call; the kernel only reads them.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for coalesced datagrams on `sock` (UDP_GRO); see [`recv_coalesced`].
pub fn set_udp_gro(sock: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    crate::sys::set_socket_option(sock.as_raw_fd(), libc::SOL_UDP, UDP_GRO, &one)
}

/// Asks for the destination address of each datagram on `sock` (IP_PKTINFO);
/// see [`recv_coalesced`].
pub fn set_pktinfo(sock: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    crate::sys::set_socket_option(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, &one)
}

/// What one read brought.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The sender.
    pub from: Option<SocketAddrV4>,
    /// With UDP_GRO: the size of each of the datagrams the buffer holds back to
    /// back (None: one datagram).
    pub seg: Option<usize>,
    /// With IP_PKTINFO: the address the datagram(s) were sent to (a batch is of
    /// one flow, so of one destination). None when not asked for or cut off.
    pub to: Option<Ipv4Addr>,
}

/// Receives into `buf`: the length, the sender, with UDP_GRO the size of each
/// coalesced datagram, and with IP_PKTINFO their destination address.
pub fn recv_coalesced(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: an all-zero sockaddr_in / msghdr is valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for UDP_GRO (an int) and IP_PKTINFO (in_pktinfo), each with its header.
    let mut control = [0u64; 16];
    let mut msg = msghdr(&mut addr, &mut iov);
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at live `addr`, `iov` (over `buf`) and `control`, each
    // with its true size; the kernel writes at most those sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut seg = None;
    let mut to = None;
    // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay within it. A UDP_GRO cmsg carries one int, an IP_PKTINFO
    // one in_pktinfo; each is read only when its length says it holds that much.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let len = (*c).cmsg_len as usize;
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::SOL_UDP
                && kind == UDP_GRO
                && len >= libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                seg = usize::try_from(v).ok().filter(|s| *s > 0);
            } else if level == libc::IPPROTO_IP
                && kind == libc::IP_PKTINFO
                && len >= libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize
            {
                let p = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                to = Some(Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // Cut control data: the destination is not known (never "the group").
        to = None;
    }
    let from = (msg.msg_namelen as usize >= std::mem::size_of::<libc::sockaddr_in>()
        && addr.sin_family == libc::AF_INET as libc::sa_family_t)
        .then(|| {
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            )
        });
    Ok(Received {
        len: n as usize,
        from,
        seg,
        to,
    })
}
