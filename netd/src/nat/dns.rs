//! DNS at the router's DNS addresses (10.0.2.3 and `fd00::3` by default).
//!
//! # Theory of operation
//!
//! A UDP query to the DNS address, port 53, is first offered to the network's
//! names ([`crate::dns::LocalNames::answer`]): a guest's DHCP hostname, a static
//! `[[network.host]]` entry, a PTR of the subnet, or NXDOMAIN for an unknown name
//! of the domain is answered here, from the DNS address, with no flow. A malformed
//! datagram is dropped (counted in `netd dns NET --stats`). Everything else takes
//! the ordinary path: the flow machinery rewrites its destination to the host's
//! first resolver ([`crate::dns::Resolvers`]) and carries the bytes both ways, over
//! UDP or TCP. DNS over TCP is always forwarded: the router does not read TCP
//! streams, and the local answers are small enough for UDP.

use std::net::{IpAddr, SocketAddr};

use smoltcp::wire::EthernetAddress;

use super::frame6::udp_frame_any;
use super::Router;
use crate::dns::Answer;

impl Router {
    /// Answers a guest's datagram to `dst` from the network's names if it is a
    /// query they answer (or drops it if it is malformed); false: not handled, a
    /// flow takes it.
    pub(super) fn dns_local(
        &mut self,
        mac: EthernetAddress,
        guest: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> bool {
        let dns6 = self.cfg.ipv6.as_ref().and_then(|v| v.dns).map(IpAddr::V6);
        if dst.port() != 53 || (dst.ip() != IpAddr::V4(self.cfg.dns) && Some(dst.ip()) != dns6) {
            return false;
        }
        let Some(names) = &self.cfg.names else {
            return false;
        };
        match names.0.answer(payload, crate::dns::unix_now()) {
            Answer::Forward => false,
            Answer::Drop => {
                self.stats.dropped += 1;
                true
            }
            Answer::Local(reply) => {
                if let Some(f) = udp_frame_any(self.mac, mac, dst, guest, &reply) {
                    self.dev.tx.push_back(f.into());
                }
                true
            }
        }
    }
}
