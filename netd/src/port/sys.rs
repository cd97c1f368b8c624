//! Promiscuous mode on an AF_PACKET socket (the uplink port's one raw call).

use std::io;
use std::os::fd::RawFd;

/// Puts interface `ifindex` in promiscuous mode for as long as socket `fd` is open
/// (PACKET_ADD_MEMBERSHIP with PACKET_MR_PROMISC: the kernel drops the membership
/// when the socket closes, so a crashed netd leaves the NIC as it was).
pub fn set_promiscuous(fd: RawFd, ifindex: u32) -> io::Result<()> {
    let mreq = libc::packet_mreq {
        mr_ifindex: ifindex as libc::c_int,
        mr_type: libc::PACKET_MR_PROMISC as libc::c_ushort,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    // SAFETY: `mreq` is a live packet_mreq and the length passed is its size; `fd`
    // is a socket the caller owns.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq as *const libc::packet_mreq as *const libc::c_void,
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
