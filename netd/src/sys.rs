//! Thin, checked wrappers over the Linux calls netd needs: AF_PACKET sockets,
//! eventfd, poll, rtnetlink, network-namespace switching and the CLI's stop signals here; TAP devices
//! (`/dev/net/tun`) and interface ioctls (up, MTU, IPv4 address, MAC), which
//! vmm-shim needs too, in [`fabric_util::sys`], re-exported below, with netd's
//! choice of TAP offloads in [`tap_open`].
//!
//! Every `unsafe` block of the crate lives here or in `fabric_util::sys`. Each wrapper takes and returns
//! owned, typed values (`OwnedFd`, `Ipv4Addr`), so callers never see a raw pointer.
//! Interface names are validated (1..=15 bytes, no NUL, no `/`) before they reach
//! the kernel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use fabric_util::sys::{self as tap, TapHeader};
pub use fabric_util::sys::{
    check_ifname, if_exists, if_index, if_set_ipv4, if_set_mac, if_set_mtu, if_up, tap_set_persist,
};

/// Linux `PACKET_VNET_HDR` socket option.
const PACKET_VNET_HDR: libc::c_int = 15;
/// Linux `PACKET_IGNORE_OUTGOING` socket option (since 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sets socket option `level`/`name` of `fd` to `value` (the option's C type:
/// an int, a `packet_mreq`, ...).
pub fn set_socket_option<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: the option value points to a live, initialized T and the length
    // passed is its size; a bad fd or option is an error return, not UB.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Opens the TAP `ifname` (creating it if missing), non-blocking. With `vnet`,
/// every frame read or written carries a 10-byte virtio-net header and the kernel
/// side is told netd takes partial checksums and TCP segmentation offload
/// (TSO4/6), so the kernel hands over 64 KiB super-frames instead of MTU-sized
/// segments ([`crate::offload`] finishes them where a port cannot take them).
pub fn tap_open(ifname: &str, vnet: bool) -> io::Result<OwnedFd> {
    if !vnet {
        return tap::tap_open(ifname, TapHeader::None);
    }
    let fd = tap::tap_open(ifname, TapHeader::Vnet { len: 10 })?;
    tap::tap_set_offload(
        fd.as_fd(),
        tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6,
    )?;
    Ok(fd)
}

/// Best-effort: disables IPv6 on `ifname` so the kernel side of a switch port does
/// not chatter (router solicitations, DAD) into the network.
pub fn if_disable_ipv6(ifname: &str) {
    if check_ifname(ifname).is_ok() {
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
            "1",
        );
    }
}

/// Turns IPv4 and IPv6 forwarding off for frames received on `ifname`
/// (`/proc/sys/net/ipv{4,6}/conf/IF/forwarding = 0`), so a host with
/// `ip_forward = 1` still routes nothing from that interface elsewhere. IPv6 is
/// skipped when the kernel has none for the interface (no conf directory).
///
/// Caveat: a later write to the global `net.ipv4.ip_forward` (or `conf/all`) sets
/// every interface's value again (the daemon checks and sets it again).
pub fn if_disable_forwarding(ifname: &str) -> io::Result<()> {
    check_ifname(ifname)?;
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"), "0")?;
    let v6 = format!("/proc/sys/net/ipv6/conf/{ifname}/forwarding");
    match std::fs::write(&v6, "0") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The kernel's `struct in6_ifreq`: the address, its prefix length, the interface.
#[repr(C)]
struct In6Ifreq {
    addr: [u8; 16],
    prefixlen: u32,
    ifindex: libc::c_int,
}

/// Gives `ifname` the IPv6 address `addr`/`prefix` (`SIOCSIFADDR` on an AF_INET6
/// socket), and stops it from taking addresses from Router Advertisements on it
/// (the host TAP of a hostonly network hears netd's own RAs). An address it has
/// already is fine.
pub fn if_add_ipv6(ifname: &str, addr: std::net::Ipv6Addr, prefix: u8) -> io::Result<()> {
    let index = if_index(ifname)?;
    let ra = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra");
    std::fs::write(&ra, "0")?;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = In6Ifreq {
        addr: addr.octets(),
        prefixlen: u32::from(prefix),
        ifindex: libc::c_int::try_from(index).map_err(|_| io::ErrorKind::InvalidInput)?,
    };
    // SAFETY: `req` is a valid, writable `struct in6_ifreq` for the duration of the
    // call, which is what SIOCSIFADDR takes on an AF_INET6 socket.
    let r = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFADDR as _,
            &mut req as *mut In6Ifreq,
        )
    };
    match cvt(r) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Whether forwarding is off for `ifname` (IPv4, and IPv6 where it exists).
pub fn if_forwarding_off(ifname: &str) -> io::Result<bool> {
    check_ifname(ifname)?;
    let off = |p: String| -> io::Result<bool> {
        match std::fs::read_to_string(p) {
            Ok(s) => Ok(s.trim() == "0"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    };
    Ok(off(format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"))?
        && off(format!("/proc/sys/net/ipv6/conf/{ifname}/forwarding"))?)
}

/// The gid of group `name` (through the C library, so NSS groups count too), or
/// `name` itself when it is a number. None when there is no such group.
pub fn group_gid(name: &str) -> Option<u32> {
    fabric_util::sys::group_id(name).ok()
}

/// netd's effective uid and gid.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid(2) and getegid(2) take no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// `SIOCETHTOOL`.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_GDRVINFO`.
const ETHTOOL_GDRVINFO: u32 = 3;

/// `struct ethtool_drvinfo` (196 bytes).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// What kind of device an existing interface is, as far as a `vm` port cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfKind {
    /// A TAP (the tun driver, in TAP mode).
    Tap,
    /// Anything else: the driver's name and bus info (`tun`/`tun` for a TUN device,
    /// `veth`, `dummy`, a NIC's driver).
    Other(String),
}

/// Asks the driver of `ifname` what it is (`ethtool -i`): a TAP is driver `tun`
/// with bus info `tap`. Works in the caller's network namespace, with no sysfs.
pub fn if_kind(ifname: &str) -> io::Result<IfKind> {
    check_ifname(ifname)?;
    // SAFETY: plain socket(2) call; the result is checked.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` was just created and is owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: both are plain old data; all-zero is a valid value of each.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = &mut info as *mut EthtoolDrvinfo as *mut libc::c_char;
    // SAFETY: `ifr` is a valid `struct ifreq` whose name is NUL-terminated (checked
    // to at most 15 bytes, the rest zero) and whose data pointer points to a live,
    // writable `struct ethtool_drvinfo`, as SIOCETHTOOL with ETHTOOL_GDRVINFO expects;
    // both outlive the call.
    let r = cvt(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            SIOCETHTOOL as _,
            &mut ifr as *mut libc::ifreq,
        )
    });
    match r {
        // Devices without driver information (`lo`) are no TAP either.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            return Ok(IfKind::Other("no driver information".into()))
        }
        r => r?,
    };
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(b.get(..end).unwrap_or_default()).into_owned()
    };
    let (driver, bus) = (text(&info.driver), text(&info.bus_info));
    Ok(if driver == "tun" && bus == "tap" {
        IfKind::Tap
    } else {
        IfKind::Other(format!("driver {driver:?}, bus {bus:?}"))
    })
}

/// Opens an AF_PACKET raw socket bound to interface `ifindex`, receiving every
/// protocol but not the frames the host itself sends out of that interface, with
/// a virtio-net header before every frame both ways (so offloaded frames of a VMM
/// using vnet headers arrive with the metadata needed to finish them).
/// Non-blocking.
pub fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            proto as libc::c_int,
        )
    })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    set_socket_option(
        fd.as_raw_fd(),
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        &one,
    )?;
    set_socket_option(fd.as_raw_fd(), libc::SOL_PACKET, PACKET_VNET_HDR, &one)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a caller-owned fd with integer arguments only.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    Ok(())
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// read(2) of at most `max` bytes appended to `buf` (its spare capacity is grown to
/// `max` first, without zeroing it): one frame from a TAP or packet socket, read in
/// place into a buffer whose frames can then be split off and handed on with no copy.
pub fn read_append(fd: RawFd, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    // SAFETY: `spare` is valid for writes of `len` bytes (it is at least that long);
    // the kernel writes at most `len` bytes into it.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr() as *mut libc::c_void, len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (n as usize).min(len);
    // SAFETY: the first `n` bytes of the spare capacity were just initialized by
    // read(2), which returned `n`.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// write(2) of `buf`; one call, one frame for TAP and packet sockets.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// writev(2) of two buffers (a vnet header and a frame): one call, one frame.
pub fn writev2(fd: RawFd, a: &[u8], b: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // SAFETY: both iovecs point into live slices of the given lengths; writev only
    // reads through them.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends one byte on the unix stream socket `sock` with `fd` attached
/// (SCM_RIGHTS): the capture CLI hands its output to the daemon this way.
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // A cmsghdr followed by one int, aligned as the kernel wants (u64 alignment
    // covers cmsghdr's).
    let mut space = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    if cmsg_space > std::mem::size_of_val(&space) {
        return Err(io::Error::other("control message buffer too small"));
    }
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = cmsg_space as _;
    // SAFETY: msg_control points at `space`, at least `cmsg_space` bytes, so the
    // first header and its data (one int) lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
    }
    // SAFETY: `msg` points at live buffers (`byte`, `space`) for the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    match n {
        1 => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("short sendmsg")),
    }
}

/// Receives one byte from the unix stream socket `sock` (without waiting) and the
/// file descriptor sent with it. WouldBlock when nothing is there yet;
/// UnexpectedEof when the peer closed; InvalidData when the byte came without
/// exactly one descriptor (any descriptors that did come are closed).
pub fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // Room for a few descriptors, so that a peer sending more is seen (and its
    // extra descriptors closed) rather than truncated silently.
    let mut space = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&space) as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: `msg` points at live, writable buffers (`byte`, `space`) of the
    // lengths it gives.
    let n = unsafe { libc::recvmsg(sock, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control up to msg_controllen; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay inside it and every header they return is complete.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const u8;
                let head = data.offset_from(c as *const u8) as usize;
                let count =
                    ((*c).cmsg_len as usize).saturating_sub(head) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let p = data.add(i * std::mem::size_of::<RawFd>()) as *const RawFd;
                    // Each received descriptor is new in this process and ours.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    match (fds.len(), truncated) {
        (1, false) => Ok(fds.remove(0)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected one file descriptor, got {}", fds.len()),
        )),
    }
}

/// The file status flags of `fd` (F_GETFL).
pub fn status_flags(fd: RawFd) -> io::Result<i32> {
    // SAFETY: fcntl on a caller-owned fd with integer arguments only.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// Sets the file status flags of `fd` (F_SETFL).
pub fn set_status_flags(fd: RawFd, flags: i32) -> io::Result<()> {
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(|_| ())
}

/// Whether `fd` is a regular file (whose writes never wait on a reader).
pub fn is_regular_file(fd: RawFd) -> io::Result<bool> {
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// Waits up to `timeout_ms` for `fd` to be writable; true if it is (or in error,
/// which the next write reports).
pub fn poll_out(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(p.revents != 0)
}

/// A non-blocking eventfd, used to wake a port thread that waits in `poll`.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2) call; the result is checked.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signals an eventfd.
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64, as eventfd requires.
    unsafe {
        libc::write(fd, &one as *const u64 as *const libc::c_void, 8);
    }
}

/// Waits until `fd` is readable or `wake` is signalled (or `timeout_ms` passes,
/// -1 for ever). Returns true when `wake` fired.
pub fn poll2(fd: RawFd, wake: RawFd, timeout_ms: i32) -> io::Result<bool> {
    poll2_ready(fd, wake, timeout_ms).map(|(_, woken)| woken)
}

/// Like [`poll2`] but reports whether `fd` is ready (readable, hung up or in
/// error) as the first value, and whether `wake` fired as the second.
pub fn poll2_ready(fd: RawFd, wake: RawFd, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of 2 pollfd for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e);
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

/// Moves the calling thread into the network namespace `name` (as `ip netns`
/// names it, a file under /run/netns). Only call this on a thread made for it.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = open_netns(name)?;
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    cvt(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// `IFLA_IFNAME` attribute type.
const IFLA_IFNAME: u16 = 3;
/// `IFLA_NET_NS_FD` attribute type.
const IFLA_NET_NS_FD: u16 = 28;

fn push_attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    while !msg.len().is_multiple_of(4) {
        msg.push(0);
    }
}

/// Moves interface `ifindex` into the network namespace open as `netns` and
/// renames it `new_name` there, in one RTM_NEWLINK request over rtnetlink.
pub fn link_move_rename(ifindex: u32, netns: &std::fs::File, new_name: &str) -> io::Result<()> {
    check_ifname(new_name)?;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg = Vec::with_capacity(64);
    // struct nlmsghdr: len (filled below), type, flags, seq, pid.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(
        &mut msg,
        IFLA_NET_NS_FD,
        &(netns.as_raw_fd() as u32).to_ne_bytes(),
    );
    let mut name = new_name.as_bytes().to_vec();
    name.push(0);
    push_attr(&mut msg, IFLA_IFNAME, &name);
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: sockaddr_nl is plain old data; all-zero addresses the kernel.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `msg` and `sa` are live for the call, lengths given are theirs.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    let n = read(sock.as_raw_fd(), &mut buf)?;
    // The ack: nlmsghdr (16 bytes, type NLMSG_ERROR) then struct nlmsgerr whose
    // first field is the (negative) errno, 0 for success.
    let reply = buf.get(..n).unwrap_or_default();
    let kind = reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let err = reply
        .get(16..20)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, err) {
        (Some(t), Some(0)) if t == libc::NLMSG_ERROR as u16 => Ok(()),
        (Some(t), Some(e)) if t == libc::NLMSG_ERROR as u16 => {
            Err(io::Error::from_raw_os_error(-e))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected rtnetlink reply",
        )),
    }
}

/// Opens the namespace `name` (a file under /run/netns) for setns / IFLA_NET_NS_FD.
pub fn open_netns(name: &str) -> io::Result<std::fs::File> {
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad namespace name {name:?}"),
        ));
    }
    std::fs::File::open(format!("/run/netns/{name}"))
        .or_else(|_| std::fs::File::open(format!("/var/run/netns/{name}")))
}

/// The signals that end netd's long-running CLI commands.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Blocks SIGINT and SIGTERM in the calling thread (and so in the threads it
/// starts afterwards), so that [`wait_stop_signal`] takes them instead of their
/// default action. Call before starting threads.
pub fn block_stop_signals() -> io::Result<()> {
    fabric_util::sys::block_signals(&STOP_SIGNALS)
}

/// Waits for SIGINT or SIGTERM (blocked by [`block_stop_signals`]); returns it.
pub fn wait_stop_signal() -> io::Result<i32> {
    fabric_util::sys::wait_signal(&STOP_SIGNALS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drvinfo_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<EthtoolDrvinfo>(), 196);
    }

    /// Regression (issue 11, item 12): a `vm` port took any existing interface.
    #[test]
    fn only_a_tap_is_a_tap() {
        assert!(matches!(if_kind("lo"), Ok(IfKind::Other(_))));
        assert!(if_kind("ndnosuchif0").is_err());
        assert!(if_kind("bad/name").is_err());
        // With the rights to make one (root), a TAP is recognised as such; the
        // end-to-end test netd_attack_bounds covers veth and TAP with a real daemon.
        if let Ok(fd) = tap_open("ndkindtest0", false) {
            assert_eq!(if_kind("ndkindtest0").unwrap(), IfKind::Tap);
            drop(fd);
        }
    }
}
