//! TAP devices and the interface ioctls around them: the Linux calls both netd (which
//! holds TAP queues and sets up their kernel side) and vmm-shim (which opens a TAP
//! as a NIC's backend) make.
//!
//! Every `unsafe` block of the crate lives here, each an `ioctl(2)` on a descriptor
//! the caller owns (and one group lookup, `getgrnam_r(3)`, for the daemons' control
//! sockets: [`group_id`]; and the signal mask calls behind the daemons' stop signals:
//! [`block_signals`], [`wait_signal`]). Interface names are checked ([`check_ifname`]) before they reach
//! the kernel, and the wrappers take and return owned, typed values (`OwnedFd`,
//! `Ipv4Addr`, [`MacAddr`](crate::MacAddr) bytes), so callers never see a pointer.
//!
//! A TAP is opened non-blocking and close-on-exec, without the packet-information
//! prefix. With a virtio-net header ([`TapHeader::Vnet`]) every frame read or written
//! starts with that header, which carries checksum and segmentation metadata; which
//! offloads the kernel may then hand over is a separate choice
//! ([`tap_set_offload`]), made by netd at open and by vmm-shim when the guest has
//! negotiated its features.

use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `TUNSETIFF` ioctl number (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST` ioctl number (`_IOW('T', 203, int)`).
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `TUNSETOFFLOAD` ioctl number (`_IOW('T', 208, unsigned int)`).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` ioctl number (`_IOW('T', 216, int)`).
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUN_F_CSUM`: the reader accepts frames with a partial checksum.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: the reader accepts TCP/IPv4 super-frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: the reader accepts TCP/IPv6 super-frames.
pub const TUN_F_TSO6: u32 = 0x04;

/// Size of the kernel's `struct ifreq` on x86_64 / aarch64.
const IFREQ_SIZE: usize = 40;

/// `struct ifreq`: the name, then a 24-byte union whose interpretation depends on
/// the ioctl (flags, MTU, address...).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; IFREQ_SIZE - libc::IFNAMSIZ],
}

impl IfReq {
    fn new(ifname: &str) -> io::Result<Self> {
        check_ifname(ifname)?;
        let mut name = [0u8; libc::IFNAMSIZ];
        // check_ifname bounds the name to IFNAMSIZ - 1 bytes: the NUL stays.
        name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        Ok(IfReq {
            name,
            data: [0; IFREQ_SIZE - libc::IFNAMSIZ],
        })
    }
    fn set_short(&mut self, v: libc::c_short) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    fn set_sockaddr_in(&mut self, addr: Ipv4Addr) {
        // struct sockaddr_in: family (u16, native), port (u16 BE), addr (4 bytes BE).
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[2..4].copy_from_slice(&[0, 0]);
        self.data[4..8].copy_from_slice(&addr.octets());
    }
    fn set_hwaddr(&mut self, mac: [u8; 6]) {
        // struct sockaddr: family ARPHRD_ETHER, then the 6 address bytes.
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

/// Checks a Linux interface name: 1 to 15 bytes, no NUL, `/` or whitespace.
pub fn check_ifname(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?} (1 to 15 bytes, no '/', no spaces)"),
        ))
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ioctl_ifreq(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, writable 40-byte `struct ifreq` for the duration of
    // the call; every ioctl passed here (private to this module) takes a
    // `struct ifreq *`.
    cvt(unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) })?;
    Ok(())
}

/// How frames on a TAP queue begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapHeader {
    /// Plain Ethernet frames.
    None,
    /// A virtio-net header of `len` bytes before every frame: 10 (the kernel's
    /// default, `struct virtio_net_hdr`) or 12 (with `num_buffers`, as virtio 1.0
    /// devices use it).
    Vnet {
        /// Header length in bytes.
        len: u8,
    },
}

/// Opens `/dev/net/tun` and attaches to (creating if missing) the TAP `ifname`,
/// without the packet information prefix, with the frame `header` given.
/// Non-blocking and close-on-exec.
pub fn tap_open(ifname: &str, header: TapHeader) -> io::Result<OwnedFd> {
    let mut ifr = IfReq::new(ifname)?;
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?
        .into();
    let vnet = match header {
        TapHeader::None => 0,
        TapHeader::Vnet { .. } => IFF_VNET_HDR,
    };
    ifr.set_short(IFF_TAP | IFF_NO_PI | vnet);
    ioctl_ifreq(fd.as_raw_fd(), TUNSETIFF, &mut ifr)?;
    if let TapHeader::Vnet { len } = header {
        let len = libc::c_int::from(len);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to
        // a live c_int for the duration of the call.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                TUNSETVNETHDRSZ as _,
                &len as *const libc::c_int,
            )
        })?;
    }
    Ok(fd)
}

/// Tells the kernel which offloads (`TUN_F_*`) the reader of this TAP queue takes:
/// with [`TUN_F_CSUM`] and TSO it hands over partial checksums and 64 KiB
/// super-frames instead of MTU-sized, checksummed segments.
pub fn tap_set_offload(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (a flag word), no pointer.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TUNSETOFFLOAD as _,
            libc::c_ulong::from(flags),
        )
    })?;
    Ok(())
}

/// Sets or clears the persist flag of the TAP attached to `fd`.
pub fn tap_set_persist(fd: &impl AsFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value (an int flag), no pointer.
    cvt(unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            TUNSETPERSIST as _,
            libc::c_ulong::from(persist),
        )
    })?;
    Ok(())
}

/// Whether an interface of that name exists in the current network namespace.
pub fn if_exists(ifname: &str) -> bool {
    if_index(ifname).is_ok()
}

/// The interface index of `ifname`.
pub fn if_index(ifname: &str) -> io::Result<u32> {
    check_ifname(ifname)?;
    let c = std::ffi::CString::new(ifname).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

/// An unbound AF_INET datagram socket: the handle interface ioctls go through.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings `ifname` up (IFF_UP), in the calling thread's network namespace.
pub fn if_up(ifname: &str) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = IfReq::new(ifname)?;
    ioctl_ifreq(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr)?;
    let flags = ifr.short() | libc::IFF_UP as libc::c_short;
    ifr.set_short(flags);
    ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr)
}

/// Sets the MTU of `ifname`.
pub fn if_set_mtu(ifname: &str, mtu: u32) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = IfReq::new(ifname)?;
    let mtu = libc::c_int::try_from(mtu).map_err(|_| io::ErrorKind::InvalidInput)?;
    ifr.set_int(mtu);
    ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFMTU, &mut ifr)
}

/// Sets the MAC address of `ifname`.
pub fn if_set_mac(ifname: &str, mac: [u8; 6]) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = IfReq::new(ifname)?;
    ifr.set_hwaddr(mac);
    ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFHWADDR, &mut ifr)
}

/// Gives `ifname` the IPv4 address `addr` with netmask `mask`.
pub fn if_set_ipv4(ifname: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> io::Result<()> {
    let s = inet_socket()?;
    let mut ifr = IfReq::new(ifname)?;
    ifr.set_sockaddr_in(addr);
    ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFADDR, &mut ifr)?;
    let mut ifr = IfReq::new(ifname)?;
    ifr.set_sockaddr_in(mask);
    ioctl_ifreq(s.as_raw_fd(), libc::SIOCSIFNETMASK, &mut ifr)
}

/// The id of group `name` (a name, or a number), through the C library so NSS
/// groups count too; NotFound when there is no such group.
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in group name"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: group is plain old data; all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the C string, `grp`, the
    // buffer with its true length, and `out`.
    let r = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    if out.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named {name:?}"),
        ));
    }
    Ok(grp.gr_gid)
}

/// `signals` as a signal set.
fn sigset(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for &sig in signals {
        // SAFETY: `set` is a valid, initialized sigset_t; a bad number is refused
        // with EINVAL, not undefined behaviour.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Blocks `signals` in the calling thread (and so in the threads it starts
/// afterwards), so that [`wait_signal`] takes them instead of their default
/// action. Call before starting threads.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals)?;
    // SAFETY: `set` is a valid, initialized sigset_t; the old mask is not asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits for one of `signals` (blocked by [`block_signals`]); returns it.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals)?;
    let mut sig = 0;
    // SAFETY: `set` is a valid sigset_t and `sig` a valid out-pointer.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_taken_by_wait_signal() {
        // SIGUSR2 is not used by the test harness; blocked in this thread only.
        block_signals(&[libc::SIGUSR2]).unwrap();
        // SAFETY: raise(3) sends a valid signal to the calling thread.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert_eq!(wait_signal(&[libc::SIGUSR2]).unwrap(), libc::SIGUSR2);
        assert!(sigset(&[-1]).is_err(), "a bad signal number is refused");
    }

    #[test]
    fn ifnames_are_checked_before_the_kernel_sees_them() {
        assert!(check_ifname("tap0").is_ok());
        assert!(check_ifname("fifteen-bytes-x").is_ok());
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "a\0b"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
            assert_eq!(
                tap_open(bad, TapHeader::None).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ifreq_layout_is_the_kernels() {
        assert_eq!(std::mem::size_of::<IfReq>(), IFREQ_SIZE);
        let mut r = IfReq::new("eth0").unwrap();
        assert_eq!(&r.name[..5], b"eth0\0");
        r.set_sockaddr_in(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(&r.data[4..8], &[10, 0, 2, 15]);
        r.set_short(0x1234);
        assert_eq!(r.short(), 0x1234);
    }

    #[test]
    fn a_missing_interface_has_no_index() {
        assert!(!if_exists("nosuchif-xyz"));
    }
}
