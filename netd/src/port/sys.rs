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
    crate::sys::set_socket_option(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
}
