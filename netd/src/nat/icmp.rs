//! ICMP echo (ping) through the NAT router.
//!
//! # Theory of operation
//!
//! A flow is (guest address, destination, echo identifier). Each flow owns a host
//! ICMP socket connected to the destination:
//!
//! - preferably an unprivileged "ping socket" (`SOCK_DGRAM`, `IPPROTO_ICMP`, allowed
//!   when the process's group is in `net.ipv4.ping_group_range`): the kernel replaces
//!   the echo identifier with the socket's own and hands back only the replies meant
//!   for it, so the router restores the guest's identifier (and the checksum) on the
//!   way back;
//! - else, when ping sockets are not allowed but the process may open raw sockets
//!   (root), a raw ICMP socket: the request goes out unchanged, and the socket sees
//!   every ICMP packet from that destination, so only echo replies carrying the flow's
//!   identifier are passed on.
//!
//! IPv6 echo (ICMPv6 128/129) takes the same path with `IPPROTO_ICMPV6` sockets; a
//! raw ICMPv6 socket returns the message without the IPv6 header.
//!
//! Echo requests to the router's own addresses never get here: smoltcp answers them
//! (IPv4), or the router's IPv6 service (`frame6.rs`).
//! Flows expire after `icmp_timeout` idle.
//!
//! As for UDP (`udp.rs`), each flow's socket wakes the router with a waker of its
//! own (`wake.rs`): a step reads only the flows that woke, and the housekeeping sweep
//! re-arms every flow once a second.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use smoltcp::wire::{EthernetAddress, Icmpv4Message, Icmpv4Packet, Ipv4Packet};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::frame::{icmp_frame, GuestEcho};
use super::router::GuestCounts;
use super::udp::FLOW_COST;
use super::wake::Ready;
use super::{FlowInfo, Router};

type Key = (IpAddr, IpAddr, u16);

struct Flow {
    fd: AsyncFd<Socket>,
    raw: bool,
    mac: EthernetAddress,
    target: IpAddr,
    last: Instant,
    /// Marks this flow ready when its socket is (see `wake.rs`).
    waker: Waker,
    /// On this step's work list already.
    queued: bool,
}

impl Flow {
    /// Clears the socket's readiness before a read (registering the flow's waker if
    /// there was none to clear).
    fn arm_clear(&self) {
        let mut cx = Context::from_waker(&self.waker);
        if let Poll::Ready(Ok(mut guard)) = self.fd.poll_read_ready(&mut cx) {
            guard.clear_ready();
        }
    }

    /// Registers the flow's waker for its socket's next readability; if the socket
    /// is readable already, clears that (the read that follows takes what is there;
    /// data after it raises a new edge) and marks the flow ready now.
    fn arm(&self) {
        let mut cx = Context::from_waker(&self.waker);
        if let Poll::Ready(r) = self.fd.poll_read_ready(&mut cx) {
            if let Ok(mut guard) = r {
                guard.clear_ready();
            }
            self.waker.wake_by_ref();
        }
    }
}

/// ICMP echo flows.
#[derive(Default)]
pub struct IcmpTable {
    flows: HashMap<Key, Flow>,
    /// The flows whose sockets woke since the last step.
    ready: Ready<Key>,
    /// The work list of a step (kept for its allocation).
    woken: Vec<Key>,
}

impl IcmpTable {
    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Registers interest; true if a flow's socket woke.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> bool {
        self.ready.poll(cx.waker())
    }

    /// Re-arms every flow (the once-a-second safety net for a lost wake-up).
    pub fn rearm(&self) {
        for f in self.flows.values() {
            f.arm();
        }
    }

    /// The flows, for `netd flows`.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = Instant::now();
        self.flows
            .iter()
            .map(|((guest, dst, ident), f)| {
                let guest = format!("{guest} id {ident}");
                FlowInfo {
                    state: if f.raw { "RAW" } else { "PING" }.into(),
                    ..FlowInfo::open("icmp", guest, dst, f.target, now - f.last)
                }
            })
            .collect()
    }

    /// Removes flows idle longer than `timeout` (taking them off their guests'
    /// `counts`).
    pub fn expire(&mut self, timeout: Duration, counts: &mut GuestCounts) {
        let now = Instant::now();
        self.flows.retain(|(guest, _, _), f| {
            let keep = now.duration_since(f.last) <= timeout;
            if !keep {
                counts.dec(*guest);
            }
            keep
        });
    }
}

fn open(target: IpAddr) -> std::io::Result<(Socket, bool)> {
    let (domain, proto) = match target {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let (sock, raw) = match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => (s, false),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => {
            (Socket::new(domain, Type::RAW, Some(proto))?, true)
        }
        Err(e) => return Err(e),
    };
    sock.connect(&SocketAddr::new(target, 0).into())?;
    sock.set_nonblocking(true)?;
    Ok((sock, raw))
}

impl Router {
    /// An echo request from a guest to a non-router address (`frame`: the whole
    /// frame it came in, quoted by an unreachable). With no IPv6 route on the host
    /// the guest gets an ICMPv6 unreachable at once; an IPv4 echo then times out.
    pub(super) fn icmp_input<A: Into<IpAddr>>(&mut self, echo: GuestEcho<'_, A>, frame: &[u8]) {
        let GuestEcho {
            src_mac: mac,
            src,
            dst,
            ident,
            icmp,
        } = echo;
        let (src, dst): (IpAddr, IpAddr) = (src.into(), dst.into());
        self.guest_macs.insert(src, mac);
        let key = (src, dst, ident);
        if !self.icmp.flows.contains_key(&key) {
            let target = match self.map_dst(SocketAddr::new(dst, 0)) {
                Ok(t) if t.is_ipv6() == dst.is_ipv6() => t,
                Ok(_) => {
                    self.stats.dropped += 1;
                    return;
                }
                Err(d) => {
                    self.count_denied(d, |s| &mut s.dropped);
                    return;
                }
            };
            if !self.guest_fits(src, false) {
                return;
            }
            if !self.flow_fits(FLOW_COST) {
                self.stats.flows_refused += 1;
                return;
            }
            let (sock, raw) = match open(target.ip()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%dst, error = %e, "icmp socket failed");
                    self.stats.host_socket_failed(&e);
                    let no_route = matches!(
                        e.raw_os_error(),
                        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)
                    );
                    if no_route && dst.is_ipv6() {
                        if let Some(f) = self.unreachable6(mac, frame, 0) {
                            self.dev.tx.push_back(f.into());
                        }
                    }
                    return;
                }
            };
            let fd = match super::sys::register(sock) {
                Ok(fd) => fd,
                Err(_) => {
                    self.stats.dropped += 1;
                    return;
                }
            };
            self.guest_flows.inc(src);
            let flow = Flow {
                fd,
                raw,
                mac,
                target: target.ip(),
                last: Instant::now(),
                waker: self.icmp.ready.waker(key),
                queued: false,
            };
            flow.arm();
            self.icmp.flows.insert(key, flow);
        }
        if let Some(f) = self.icmp.flows.get_mut(&key) {
            f.last = Instant::now();
            f.mac = mac;
            if f.fd.get_ref().send(icmp).is_err() {
                self.stats.dropped += 1;
            }
        }
    }

    /// Echo replies back to guests, for the flows whose sockets woke.
    pub(super) fn icmp_pump(&mut self) {
        let mut woken = std::mem::take(&mut self.icmp.woken);
        self.icmp.ready.take(&mut woken);
        // A key may be woken more than once a step: each flow is read once.
        woken.retain(|k| match self.icmp.flows.get_mut(k) {
            Some(f) if !f.queued => {
                f.queued = true;
                true
            }
            _ => false,
        });
        let mut buf = self.take_scratch();
        for key in woken.drain(..) {
            let (guest, dst, ident) = (&key.0, &key.1, &key.2);
            let Some(f) = self.icmp.flows.get_mut(&key) else {
                continue;
            };
            f.queued = false;
            // Readiness is cleared before the reads: an echo that arrives after
            // the last read raises a new edge and wakes the flow again.
            f.arm_clear();
            let (max, v6) = match (guest, dst) {
                (IpAddr::V6(g), IpAddr::V6(d)) => (
                    self.cfg.mtu.saturating_sub(super::frame6::IPV6_HDR),
                    Some((*g, *d)),
                ),
                _ => (self.cfg.mtu.saturating_sub(super::frame::IPV4_HDR), None),
            };
            for _ in 0..64 {
                let n = match f.fd.get_ref().read(&mut buf) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                let Some(data) = buf.get(..n) else { break };
                let msg = if let Some((g, d)) = v6 {
                    // Ping and raw ICMPv6 sockets both return the bare message; a
                    // raw one sees every ICMPv6 message from the target.
                    let ours = data.first() == Some(&129)
                        && (!f.raw || data.get(4..6) == Some(&ident.to_be_bytes()[..]));
                    if ours && data.len() <= max {
                        f.last = Instant::now();
                        let r = super::frame6::echo6_reply(self.mac, f.mac, d, g, data, *ident);
                        if let Some(frame) = r {
                            self.dev.tx.push_back(frame.into());
                        }
                    }
                    continue;
                } else if f.raw {
                    // Raw sockets return the IP header too; keep only echo replies
                    // from the target carrying this flow's identifier.
                    let Ok(ip) = Ipv4Packet::new_checked(data) else {
                        continue;
                    };
                    if IpAddr::V4(ip.src_addr()) != f.target {
                        continue;
                    }
                    let Ok(icmp) = Icmpv4Packet::new_checked(ip.payload()) else {
                        continue;
                    };
                    if icmp.msg_type() != Icmpv4Message::EchoReply || icmp.echo_ident() != *ident {
                        continue;
                    }
                    let hl = usize::from(ip.header_len());
                    let tl = usize::from(ip.total_len()).min(data.len());
                    match data.get(hl..tl) {
                        Some(m) => m,
                        None => continue,
                    }
                } else {
                    match Icmpv4Packet::new_checked(data) {
                        Ok(p) if p.msg_type() == Icmpv4Message::EchoReply => data,
                        _ => continue,
                    }
                };
                if msg.len() > max {
                    self.stats.dropped += 1;
                    continue;
                }
                f.last = Instant::now();
                let (IpAddr::V4(dst), IpAddr::V4(guest)) = (dst, guest) else {
                    continue;
                };
                if let Some(frame) = icmp_frame(self.mac, f.mac, *dst, *guest, msg, *ident) {
                    self.dev.tx.push_back(frame.into());
                }
            }
            f.arm();
        }
        self.icmp.woken = woken;
        self.scratch = buf;
    }
}
