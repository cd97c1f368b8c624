//! The server logic: [`DhcpServer::handle`] answers one parsed message from the
//! lease database and a clock value, [`DhcpServer::handle_frame`] wraps it for whole
//! Ethernet frames (and answers ARP for the server's own address), and [`run`] wires
//! it to a service port of the switch.
//!
//! Allocation order for a client: its reservation; else the address it held before
//! (a lease, live or expired, keeps its MAC so a VM gets the same address back);
//! else the address it asks for, if free; else the lowest free address of the
//! range. An OFFER holds the address for [`OFFER_HOLD_SECS`]. Offers, live leases
//! and declined addresses are each capped at [`MAX_CLIENTS`] (new clients past that
//! are refused and counted in `refused_full`), so made-up MACs cannot grow them with
//! the range.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use super::{opt, DhcpMessage, Lease, LeaseDb, MsgType};
use crate::config::{fmt_mac, DhcpSpec, Ipv4Spec};
use crate::wire::{
    self, Arp, Ethernet, Ipv4, Udp, BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_UDP,
};

/// Seconds an offered address is held for the client.
pub const OFFER_HOLD_SECS: u64 = 60;
/// Seconds a DECLINEd address is kept out of use.
pub const DECLINE_HOLD_SECS: u64 = 600;
/// Most outstanding offers, most live leases and most declined addresses the server
/// keeps. The range alone does not bound them usefully: a /8 subnet's range has 16M
/// addresses, and a guest that sends DISCOVERs (or REQUESTs, or DECLINEs) from made-up
/// MACs would otherwise grow the tables, the lease file and the cost of every
/// allocation with it. Past this, new clients are refused (and counted).
pub const MAX_CLIENTS: usize = 1024;

/// The server of one network.
pub struct DhcpServer {
    spec: DhcpSpec,
    v4: Ipv4Spec,
    mac: [u8; 6],
    answer_arp: bool,
    /// The leases.
    pub db: LeaseDb,
    /// Messages refused because a table was at [`MAX_CLIENTS`].
    pub refused_full: u64,
    /// UDP datagrams to port 67 that were not a valid DHCP message (dropped).
    pub malformed: u64,
}

impl DhcpServer {
    /// A server for `v4`/`spec`, sending from `mac`. With `answer_arp` it answers ARP
    /// for its own address (`spec.server`) itself; without, somebody else owns it (the
    /// host on a hostonly network whose server address is the gateway).
    pub fn new(v4: Ipv4Spec, spec: DhcpSpec, mac: [u8; 6], answer_arp: bool, db: LeaseDb) -> Self {
        DhcpServer {
            spec,
            v4,
            mac,
            answer_arp,
            db,
            refused_full: 0,
            malformed: 0,
        }
    }

    fn reserved_for(&self, mac: &[u8; 6]) -> Option<Ipv4Addr> {
        self.spec
            .reservations
            .iter()
            .find(|(m, _)| m == mac)
            .map(|(_, ip)| *ip)
    }

    fn reserved_for_other(&self, ip: Ipv4Addr, mac: &[u8; 6]) -> bool {
        self.spec
            .reservations
            .iter()
            .any(|(m, r)| *r == ip && m != mac)
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.spec.start)..=u32::from(self.spec.end)).contains(&u32::from(ip))
    }

    /// Whether `mac` may have `ip` at `now`.
    fn usable(&self, ip: Ipv4Addr, mac: &[u8; 6], now: u64) -> bool {
        if self.reserved_for(mac) == Some(ip) {
            return true;
        }
        self.v4.contains(ip)
            && self.in_range(ip)
            && ip != self.v4.gateway
            && ip != self.spec.server
            && !self.reserved_for_other(ip, mac)
            && !self.db.taken_by_other(ip, mac, now)
    }

    fn choose(&self, mac: &[u8; 6], requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        if let Some(r) = self.reserved_for(mac) {
            return Some(r);
        }
        if let Some(l) = self.db.by_mac.get(mac) {
            if self.usable(l.ip, mac, now) {
                return Some(l.ip);
            }
        }
        if let Some((o, _)) = self.db.offers.get(mac) {
            if self.usable(*o, mac, now) {
                return Some(*o);
            }
        }
        if let Some(r) = requested {
            if self.usable(r, mac, now) {
                return Some(r);
            }
        }
        // Prefer addresses never leased to anybody, then ones whose lease expired.
        // The tables are turned into sets once, so the scan costs O(range + tables)
        // rather than O(range * tables) (`usable` walks the tables on every call).
        let taken = self.db.taken_by_others(mac, now);
        let leased: HashSet<Ipv4Addr> = self.db.by_mac.values().map(|l| l.ip).collect();
        let free = |ip: &Ipv4Addr| {
            self.v4.contains(*ip)
                && *ip != self.v4.gateway
                && *ip != self.spec.server
                && !taken.contains(ip)
                && !self.reserved_for_other(*ip, mac)
        };
        let range = u32::from(self.spec.start)..=u32::from(self.spec.end);
        let never = range
            .clone()
            .map(Ipv4Addr::from)
            .find(|ip| free(ip) && !leased.contains(ip));
        never.or_else(|| range.map(Ipv4Addr::from).find(free))
    }

    fn reply(&self, req: &DhcpMessage, t: MsgType, yiaddr: Ipv4Addr, lease: bool) -> DhcpMessage {
        let mut options = vec![(opt::SERVER_ID, self.spec.server.octets().to_vec())];
        if t != MsgType::Nak {
            if lease {
                let lt = self.spec.lease_time;
                options.push((opt::LEASE_TIME, lt.to_be_bytes().to_vec()));
                options.push((opt::RENEWAL, (lt / 2).to_be_bytes().to_vec()));
                options.push((opt::REBINDING, (lt / 8 * 7).to_be_bytes().to_vec()));
            }
            options.push((opt::SUBNET_MASK, self.v4.mask().octets().to_vec()));
            options.push((opt::BROADCAST, self.v4.broadcast().octets().to_vec()));
            if let Some(r) = self.spec.router {
                options.push((opt::ROUTER, r.octets().to_vec()));
            }
            if !self.spec.dns.is_empty() {
                options.push((
                    opt::DNS,
                    self.spec.dns.iter().flat_map(|d| d.octets()).collect(),
                ));
            }
        }
        DhcpMessage {
            op: 2,
            xid: req.xid,
            secs: 0,
            flags: req.flags,
            ciaddr: if t == MsgType::Inform {
                req.ciaddr
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            yiaddr,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: req.giaddr,
            chaddr: req.chaddr,
            msg_type: t,
            options,
        }
    }

    /// Handles one DHCP message; returns the reply, if any. `now` is Unix seconds.
    /// Lease changes are persisted before this returns (errors are logged: the
    /// client is still answered, the lease is still held in memory).
    pub fn handle(&mut self, m: &DhcpMessage, now: u64) -> Option<DhcpMessage> {
        if m.op != 1 {
            return None;
        }
        let mac = m.chaddr;
        let requested = m.option_ip(opt::REQUESTED_IP);
        let server_id = m.option_ip(opt::SERVER_ID);
        match m.msg_type {
            MsgType::Discover => {
                // Keep the hostile-input maps bounded: expired holds go first.
                self.db.offers.retain(|_, (_, until)| *until > now);
                self.db.declined.retain(|_, until| *until > now);
                if self.db.offers.len() >= MAX_CLIENTS && !self.db.offers.contains_key(&mac) {
                    self.refused_full += 1;
                    return None;
                }
                let ip = self.choose(&mac, requested, now)?;
                self.db.offers.insert(mac, (ip, now + OFFER_HOLD_SECS));
                Some(self.reply(m, MsgType::Offer, ip, true))
            }
            MsgType::Request => {
                if let Some(sid) = server_id {
                    if sid != self.spec.server {
                        // The client chose another server: release our offer.
                        self.db.offers.remove(&mac);
                        return None;
                    }
                }
                let wanted = match (requested, m.ciaddr) {
                    (Some(r), _) => r,
                    (None, c) if !c.is_unspecified() => c,
                    _ => return Some(self.reply(m, MsgType::Nak, Ipv4Addr::UNSPECIFIED, false)),
                };
                let ok = match self.reserved_for(&mac) {
                    Some(r) => r == wanted,
                    None => self.usable(wanted, &mac, now),
                };
                if !ok {
                    return Some(self.reply(m, MsgType::Nak, Ipv4Addr::UNSPECIFIED, false));
                }
                if self.db.by_mac.len() >= MAX_CLIENTS && !self.db.by_mac.contains_key(&mac) {
                    // Full: forget expired leases (they only serve to give a returning
                    // client its old address), then refuse if still full.
                    self.db.by_mac.retain(|_, l| l.expires > now);
                    if self.db.by_mac.len() >= MAX_CLIENTS {
                        self.refused_full += 1;
                        return Some(self.reply(m, MsgType::Nak, Ipv4Addr::UNSPECIFIED, false));
                    }
                }
                self.db.offers.remove(&mac);
                // One record per address: an expired lease of another client on this
                // address is forgotten (bounds the table by the range size).
                self.db.by_mac.retain(|m, l| *m == mac || l.ip != wanted);
                let hostname = m.option(opt::HOSTNAME).map(|h| {
                    String::from_utf8_lossy(h)
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(64)
                        .collect()
                });
                self.db.by_mac.insert(
                    mac,
                    Lease {
                        mac: fmt_mac(&mac),
                        ip: wanted,
                        expires: now + u64::from(self.spec.lease_time),
                        hostname,
                    },
                );
                if let Err(e) = self.db.save() {
                    tracing::error!(error = %crate::error_chain(&e), "lease not persisted");
                }
                Some(self.reply(m, MsgType::Ack, wanted, true))
            }
            MsgType::Release => {
                if let Some(l) = self.db.by_mac.get_mut(&mac) {
                    if l.ip == m.ciaddr {
                        // Keep the record (the client gets the same address back if it
                        // is still free), but the address is free for others now.
                        l.expires = now;
                        if let Err(e) = self.db.save() {
                            tracing::error!(error = %crate::error_chain(&e), "lease not persisted");
                        }
                    }
                }
                None
            }
            MsgType::Decline => {
                if let Some(ip) = requested.filter(|ip| self.in_range(*ip)) {
                    if self.db.declined.len() >= MAX_CLIENTS {
                        self.db.declined.retain(|_, until| *until > now);
                    }
                    if self.db.declined.len() >= MAX_CLIENTS && !self.db.declined.contains_key(&ip)
                    {
                        self.refused_full += 1;
                        return None;
                    }
                    self.db.declined.insert(ip, now + DECLINE_HOLD_SECS);
                    self.db.offers.remove(&mac);
                    if self.db.by_mac.get(&mac).is_some_and(|l| l.ip == ip) {
                        self.db.by_mac.remove(&mac);
                        if let Err(e) = self.db.save() {
                            tracing::error!(error = %crate::error_chain(&e), "lease not persisted");
                        }
                    }
                }
                None
            }
            MsgType::Inform => Some(self.reply(m, MsgType::Ack, Ipv4Addr::UNSPECIFIED, false)),
            MsgType::Offer | MsgType::Ack | MsgType::Nak => None,
        }
    }

    /// Handles one Ethernet frame from the switch; returns frames to send.
    pub fn handle_frame(&mut self, frame: &[u8], now: u64) -> Option<Vec<u8>> {
        let eth = Ethernet::parse(frame)?;
        match eth.ethertype {
            ETHERTYPE_ARP if self.answer_arp => {
                let a = Arp::parse(eth.payload)?;
                if a.op != 1 || a.tpa != self.spec.server {
                    return None;
                }
                let mut out = Vec::with_capacity(60);
                wire::emit_ethernet(&mut out, a.sha, self.mac, ETHERTYPE_ARP);
                Arp {
                    op: 2,
                    sha: self.mac,
                    spa: self.spec.server,
                    tha: a.sha,
                    tpa: a.spa,
                }
                .emit(&mut out);
                out.resize(60, 0);
                Some(out)
            }
            ETHERTYPE_IPV4 => {
                let ip = Ipv4::parse(eth.payload)?;
                if ip.protocol != IPPROTO_UDP {
                    return None;
                }
                if !(ip.dst.is_broadcast() || ip.dst == self.spec.server) {
                    return None;
                }
                let udp = Udp::parse(ip.payload)?;
                if udp.dst_port != 67 {
                    return None;
                }
                let msg = match DhcpMessage::parse(udp.payload) {
                    Ok(m) => m,
                    Err(e) => {
                        self.malformed += 1;
                        tracing::debug!(error = %e, "malformed DHCP message dropped");
                        return None;
                    }
                };
                let reply = self.handle(&msg, now)?;
                // RFC 2131 4.1: relay -> giaddr; renewing client -> ciaddr; NAK or
                // broadcast flag -> broadcast; else unicast to yiaddr at chaddr.
                let (dst_mac, dst_ip, port) = if !msg.giaddr.is_unspecified() {
                    (eth.src, msg.giaddr, 67)
                } else if !msg.ciaddr.is_unspecified() && reply.msg_type != MsgType::Nak {
                    (msg.chaddr, msg.ciaddr, 68)
                } else if reply.msg_type == MsgType::Nak || msg.flags & 0x8000 != 0 {
                    (BROADCAST_MAC, Ipv4Addr::BROADCAST, 68)
                } else {
                    (msg.chaddr, reply.yiaddr, 68)
                };
                Some(wire::emit_udp_frame(
                    dst_mac,
                    self.mac,
                    self.spec.server,
                    dst_ip,
                    67,
                    port,
                    &reply.to_vec(),
                ))
            }
            _ => None,
        }
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves DHCP on a service port until the switch side goes away.
///
/// A frame is handled on tokio's blocking pool: an ACK writes and fsyncs the lease
/// file, and a guest that floods REQUESTs must not hold one of the daemon's two
/// runtime workers (shared with every other network's services and the control
/// socket) in fsync. Frames are still handled one at a time, in order.
pub async fn run(
    server: std::sync::Arc<std::sync::Mutex<DhcpServer>>,
    mut port: crate::switch::ServicePort,
) {
    while let Some(frame) = port.from_switch.recv().await {
        let s = server.clone();
        let reply = match tokio::task::spawn_blocking(move || {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            s.handle_frame(&frame, unix_now())
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "DHCP handler failed; frame dropped");
                None
            }
        };
        if let Some(r) = reply {
            if port.to_switch.send(bytes::Bytes::from(r)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::dhcp::message::tests::msg;

    fn server(dir: Option<&Path>) -> DhcpServer {
        let v4 = Ipv4Spec {
            network: Ipv4Addr::new(10, 9, 0, 0),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 9, 0, 1),
        };
        let spec = DhcpSpec {
            server: Ipv4Addr::new(10, 9, 0, 1),
            start: Ipv4Addr::new(10, 9, 0, 100),
            end: Ipv4Addr::new(10, 9, 0, 102),
            lease_time: 3600,
            dns: vec![Ipv4Addr::new(10, 9, 0, 1)],
            router: Some(Ipv4Addr::new(10, 9, 0, 1)),
            reservations: vec![([2, 0, 0, 0, 0, 0x99], Ipv4Addr::new(10, 9, 0, 50))],
        };
        let db = LeaseDb::load(dir.map(|d| d.join("leases.json"))).unwrap();
        DhcpServer::new(v4, spec, [2, 0, 0, 0, 0, 1], true, db)
    }

    /// A client's broadcast from 02:..:07, port 68 to 67, carrying `payload`.
    fn client_frame(payload: &[u8]) -> Vec<u8> {
        wire::emit_udp_frame(
            BROADCAST_MAC,
            [2, 0, 0, 0, 0, 7],
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            payload,
        )
    }

    /// The type of `s`'s answer to `m` at `now` (the test fails on silence).
    fn answer(s: &mut DhcpServer, m: &DhcpMessage, now: u64) -> MsgType {
        s.handle(m, now).expect("an answer").msg_type
    }

    fn sid() -> (u8, Vec<u8>) {
        (opt::SERVER_ID, vec![10, 9, 0, 1])
    }
    fn req_ip(ip: [u8; 4]) -> (u8, Vec<u8>) {
        (opt::REQUESTED_IP, ip.to_vec())
    }

    #[test]
    fn full_exchange_with_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = server(Some(dir.path()));
        let offer = s.handle(&msg(MsgType::Discover, 7, vec![]), 1000).unwrap();
        assert_eq!(offer.msg_type, MsgType::Offer);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
        assert_eq!(
            offer.option_ip(opt::SUBNET_MASK),
            Some(Ipv4Addr::new(255, 255, 255, 0))
        );
        assert_eq!(
            offer.option_ip(opt::ROUTER),
            Some(Ipv4Addr::new(10, 9, 0, 1))
        );
        assert_eq!(
            offer.option(opt::LEASE_TIME),
            Some(&3600u32.to_be_bytes()[..])
        );
        // A second client is offered a different address while the first offer holds.
        let o2 = s.handle(&msg(MsgType::Discover, 8, vec![]), 1000).unwrap();
        assert_eq!(o2.yiaddr, Ipv4Addr::new(10, 9, 0, 101));
        let ack = s
            .handle(
                &msg(MsgType::Request, 7, vec![sid(), req_ip([10, 9, 0, 100])]),
                1001,
            )
            .unwrap();
        assert_eq!(ack.msg_type, MsgType::Ack);
        assert_eq!(ack.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
        // Client 8 asking for client 7's address is refused.
        let taken = msg(MsgType::Request, 8, vec![sid(), req_ip([10, 9, 0, 100])]);
        assert_eq!(answer(&mut s, &taken, 1002), MsgType::Nak);
        // Out-of-subnet request (init-reboot from another network): NAK.
        let elsewhere = msg(MsgType::Request, 9, vec![req_ip([192, 168, 1, 5])]);
        assert_eq!(answer(&mut s, &elsewhere, 1002), MsgType::Nak);
        // Request for another server: silence.
        assert!(s
            .handle(
                &msg(
                    MsgType::Request,
                    8,
                    vec![(opt::SERVER_ID, vec![10, 9, 0, 2]), req_ip([10, 9, 0, 101])]
                ),
                1002
            )
            .is_none());
        // Restart: the lease is back, and the same client gets the same address.
        let mut s = server(Some(dir.path()));
        assert_eq!(s.db.leases().len(), 1);
        let o = s.handle(&msg(MsgType::Discover, 8, vec![]), 1100).unwrap();
        assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 101));
        let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 1100).unwrap();
        assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 100));
        // Renewal (ciaddr, no requested IP option).
        let mut renew = msg(MsgType::Request, 7, vec![]);
        renew.ciaddr = Ipv4Addr::new(10, 9, 0, 100);
        assert_eq!(answer(&mut s, &renew, 1200), MsgType::Ack);
        // Release frees it for others.
        let mut rel = msg(MsgType::Release, 7, vec![sid()]);
        rel.ciaddr = Ipv4Addr::new(10, 9, 0, 100);
        assert!(s.handle(&rel, 1300).is_none());
        assert!(s.usable(Ipv4Addr::new(10, 9, 0, 100), &[2, 0, 0, 0, 0, 8], 1300));
    }

    #[test]
    fn reservation_decline_inform_and_exhaustion() {
        let mut s = server(None);
        let o = s.handle(&msg(MsgType::Discover, 0x99, vec![]), 10).unwrap();
        assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 50));
        // Decline of .100 keeps it out of use.
        assert!(s
            .handle(&msg(MsgType::Decline, 7, vec![req_ip([10, 9, 0, 100])]), 10)
            .is_none());
        let o = s.handle(&msg(MsgType::Discover, 7, vec![]), 11).unwrap();
        assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 101));
        let o = s.handle(&msg(MsgType::Discover, 8, vec![]), 11).unwrap();
        assert_eq!(o.yiaddr, Ipv4Addr::new(10, 9, 0, 102));
        assert!(
            s.handle(&msg(MsgType::Discover, 9, vec![]), 11).is_none(),
            "pool exhausted"
        );
        let mut inf = msg(MsgType::Inform, 5, vec![]);
        inf.ciaddr = Ipv4Addr::new(10, 9, 0, 7);
        let a = s.handle(&inf, 12).unwrap();
        assert_eq!(a.msg_type, MsgType::Ack);
        assert!(a.option(opt::LEASE_TIME).is_none());
        assert_eq!(a.yiaddr, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn frame_path_and_arp() {
        let mut s = server(None);
        let d = msg(MsgType::Discover, 7, vec![]).to_vec();
        let f = client_frame(&d);
        let r = s.handle_frame(&f, 5).unwrap();
        let e = Ethernet::parse(&r).unwrap();
        assert_eq!(e.dst, [2, 0, 0, 0, 0, 7]);
        let ip = Ipv4::parse(e.payload).unwrap();
        let u = Udp::parse(ip.payload).unwrap();
        assert_eq!(u.dst_port, 68);
        assert_eq!(
            DhcpMessage::parse(u.payload).unwrap().msg_type,
            MsgType::Offer
        );
        let mut arp = vec![];
        wire::emit_ethernet(&mut arp, BROADCAST_MAC, [2, 0, 0, 0, 0, 7], ETHERTYPE_ARP);
        Arp {
            op: 1,
            sha: [2, 0, 0, 0, 0, 7],
            spa: Ipv4Addr::new(10, 9, 0, 100),
            tha: [0; 6],
            tpa: Ipv4Addr::new(10, 9, 0, 1),
        }
        .emit(&mut arp);
        let r = s.handle_frame(&arp, 5).unwrap();
        let a = Arp::parse(Ethernet::parse(&r).unwrap().payload).unwrap();
        assert_eq!(
            (a.op, a.sha, a.spa),
            (2, [2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 9, 0, 1))
        );
        // A datagram to port 67 that is not DHCP: dropped and counted.
        assert_eq!(s.malformed, 0);
        let junk = client_frame(b"not dhcp");
        assert!(s.handle_frame(&junk, 5).is_none());
        assert_eq!(s.malformed, 1);
    }

    #[test]
    fn tables_stay_bounded_under_mac_churn() {
        let mut s = server(None);
        for i in 0..2000u32 {
            let b = i.to_be_bytes();
            let mut d = msg(MsgType::Discover, 0, vec![]);
            d.chaddr = [2, 1, b[0], b[1], b[2], b[3]];
            let now = 1000 + u64::from(i) * 4000; // every lease expired by the next client
            if let Some(o) = s.handle(&d, now) {
                let mut r = msg(
                    MsgType::Request,
                    0,
                    vec![sid(), (opt::REQUESTED_IP, o.yiaddr.octets().to_vec())],
                );
                r.chaddr = d.chaddr;
                assert_eq!(answer(&mut s, &r, now), MsgType::Ack);
            }
            let _ = s.handle(
                &msg(MsgType::Decline, 7, vec![req_ip([1, 2, b[2], b[3]])]),
                now,
            );
        }
        assert!(s.db.by_mac.len() <= 3, "{}", s.db.by_mac.len());
        assert!(s.db.offers.len() <= 3);
        assert!(
            s.db.declined.is_empty(),
            "declines outside the range are ignored"
        );
    }

    #[test]
    fn a_big_range_is_not_a_big_table() {
        // A /16 with the default-sized range: made-up MACs cannot grow the tables past
        // MAX_CLIENTS, and every allocation stays cheap while they try.
        let mut s = server(None);
        s.v4.prefix = 16;
        s.spec.end = Ipv4Addr::new(10, 9, 255, 254);
        let n = MAX_CLIENTS as u32 + 10;
        let mut offered = 0;
        for i in 0..n {
            let b = i.to_be_bytes();
            let mut d = msg(MsgType::Discover, 0, vec![]);
            d.chaddr = [2, 1, b[0], b[1], b[2], b[3]];
            if s.handle(&d, 1000).is_some() {
                offered += 1;
            }
        }
        assert_eq!(offered, MAX_CLIENTS);
        assert_eq!(s.db.offers.len(), MAX_CLIENTS);
        // REQUESTs straight away (init-reboot) for addresses beyond the offers.
        let mut acked = 0;
        for i in 0..n {
            let b = i.to_be_bytes();
            let ip = [10, 9, 100 + b[2], b[3]];
            let mut r = msg(MsgType::Request, 0, vec![req_ip(ip)]);
            r.chaddr = [2, 2, b[0], b[1], b[2], b[3]];
            if answer(&mut s, &r, 1000) == MsgType::Ack {
                acked += 1;
            }
        }
        assert_eq!(acked, MAX_CLIENTS);
        assert_eq!(s.db.by_mac.len(), MAX_CLIENTS);
        for i in 0..n {
            let b = i.to_be_bytes();
            let d = msg(MsgType::Decline, 7, vec![req_ip([10, 9, 200 + b[2], b[3]])]);
            let _ = s.handle(&d, 1000);
        }
        assert_eq!(s.db.declined.len(), MAX_CLIENTS);
        assert_eq!(s.refused_full, 30);
        // Once the leases expire, new clients get in again.
        let mut r = msg(MsgType::Request, 0, vec![req_ip([10, 9, 250, 1])]);
        r.chaddr = [2, 3, 0, 0, 0, 1];
        assert_eq!(answer(&mut s, &r, 1000 + 3601), MsgType::Ack);
        assert_eq!(s.db.by_mac.len(), 1);
    }

    #[test]
    fn a_slow_lease_write_does_not_block_the_runtime() {
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};
        // The lease file's temporary is a FIFO: writing it blocks until somebody
        // opens it for reading, which a helper thread does only after 2 s.
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("leases.json.tmp");
        let st = std::process::Command::new("mkfifo")
            .arg(&tmp)
            .status()
            .unwrap();
        assert!(st.success());
        let server = Arc::new(Mutex::new(server(Some(dir.path()))));
        let unblocked = Arc::new(Mutex::new(None::<Instant>));
        let u2 = unblocked.clone();
        let helper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            *u2.lock().unwrap() = Some(Instant::now());
            let mut f = std::fs::File::open(&tmp).unwrap();
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut f, &mut sink);
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ticked = rt.block_on(async move {
            let (to_service, from_switch) = tokio::sync::mpsc::channel(4);
            let (to_switch, mut replies) = tokio::sync::mpsc::channel(4);
            let port = crate::switch::ServicePort {
                to_switch,
                from_switch,
            };
            tokio::spawn(run(server, port));
            let r = msg(MsgType::Request, 7, vec![req_ip([10, 9, 0, 100])]).to_vec();
            let f = client_frame(&r);
            to_service.send(bytes::Bytes::from(f)).await.unwrap();
            // Another task of the same runtime must get to run meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ticked = Instant::now();
            assert!(replies.recv().await.is_some(), "the ACK still goes out");
            ticked
        });
        helper.join().unwrap();
        let unblocked = unblocked.lock().unwrap().unwrap();
        assert!(
            ticked < unblocked,
            "the runtime was blocked while the lease file was written"
        );
    }

    /// Randomized robustness: mutations and truncations of valid messages, and
    /// random bytes, never panic the parser or the server, and whatever parses
    /// re-emits to something that parses to the same message.
    #[test]
    fn randomized_parse_never_panics() {
        let mut s = server(None);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = msg(
            MsgType::Request,
            7,
            vec![
                sid(),
                req_ip([10, 9, 0, 100]),
                (opt::HOSTNAME, b"x".to_vec()),
            ],
        )
        .to_vec();
        for i in 0..20_000 {
            let mut b = if i % 4 == 0 {
                (0..(rnd() % 400) as usize)
                    .map(|_| rnd() as u8)
                    .collect::<Vec<u8>>()
            } else {
                base.clone()
            };
            for _ in 0..(rnd() % 8) {
                if !b.is_empty() {
                    let at = (rnd() as usize) % b.len();
                    b[at] = rnd() as u8;
                }
            }
            if rnd() % 3 == 0 {
                let n = (rnd() as usize) % (b.len() + 1);
                b.truncate(n);
            }
            if let Ok(m) = DhcpMessage::parse(&b) {
                let again = DhcpMessage::parse(&m.to_vec()).unwrap();
                assert_eq!(again, m);
                let _ = s.handle(&m, 100 + i);
            }
            let f = client_frame(&b);
            let _ = s.handle_frame(&f, 100 + i);
            let _ = s.handle_frame(&b, 100 + i);
        }
    }
}
