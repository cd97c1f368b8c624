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
//! first resolver ([`crate::dns::Resolvers`]) and carries the bytes both ways.
//!
//! DNS over TCP gets the same answers. A network with names has a
//! [`crate::dns::tcp::TcpDns`] front, listening on `127.0.0.1` at an ephemeral
//! port, started with the router on the router's own thread. A guest's TCP
//! connection to the DNS address (either family), port 53, is a flow like any other
//! whose host side connects to that listener instead of the resolver
//! ([`Router::dns_tcp_target`], the one line `tcp.rs` asks before
//! `map_dst`); the front reads the RFC 7766 framed queries, answers the local ones
//! and forwards the rest to the resolver over TCP. Why a listener and not a
//! reader of the guest's stream in the router: the flow machinery already
//! terminates the guest's TCP (windows, retransmits, offload, quotas, timeouts),
//! and the front is the same code the hostonly responder serves TCP with; the
//! router stays a splicer of byte streams. Why it is not reachable in a way that
//! matters: a guest cannot name the host's loopback (a flow to `127.0.0.0/8` is
//! refused, and the gateway stands for the loopback only with `host_loopback`,
//! which opens every loopback port anyway), and whatever else reaches it gets only
//! what the guests' DNS answers. The per-guest bound on such connections is the
//! flow quota (`max_flows_per_guest`, `max_pending_per_guest`), each being a flow;
//! the front itself takes at most `max_flows` at once. The gateway's port 53 is
//! left as it was (forwarded as is, over UDP and TCP), as it is for UDP. Without
//! names (a router built without a table, as in unit tests) TCP to port 53 is
//! forwarded to the resolver.

use std::net::{IpAddr, SocketAddr};

use smoltcp::wire::EthernetAddress;

use super::frame6::udp_frame_any;
use super::{Router, RouterConfig};
use crate::dns::tcp::{Listener, TcpDns};
use crate::dns::Answer;

/// Starts the DNS-over-TCP front of a router whose network has names; must be
/// called inside the router's runtime. None without names, or if it cannot
/// listen (logged: TCP to port 53 is then forwarded to the resolver).
pub(super) fn tcp_front(cfg: &RouterConfig) -> Option<Listener> {
    let names = cfg.names.as_ref()?;
    let max = cfg.limits.max_flows;
    let front = TcpDns::new(names.0.clone(), cfg.resolv_conf.clone(), max, max);
    match front.spawn_loopback() {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS over TCP for the network's names: TCP to port 53 is forwarded");
            None
        }
    }
}

impl Router {
    /// Whether `dst` is port 53 of one of the router's DNS addresses.
    fn is_dns(&self, dst: SocketAddr) -> bool {
        let dns6 = self.cfg.ipv6.as_ref().and_then(|v| v.dns).map(IpAddr::V6);
        dst.port() == 53 && (dst.ip() == IpAddr::V4(self.cfg.dns) || Some(dst.ip()) == dns6)
    }

    /// Where the host side of a guest's TCP connection to `dst` goes when it is
    /// DNS to the DNS address and the network's names are served over TCP: the
    /// front's listener. None: the ordinary mapping (`map_dst`) applies.
    pub(super) fn dns_tcp_target(&self, dst: SocketAddr) -> Option<SocketAddr> {
        if !self.is_dns(dst) {
            return None;
        }
        self.dns_tcp.as_ref().map(Listener::addr)
    }

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
        if !self.is_dns(dst) {
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
