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
//!
//! A reservation with a `hostname` gives the client that name: option 12 in its
//! OFFER and ACK (as dnsmasq does for `dhcp-host` names), and the name published
//! in the network's DNS for as long as the client's lease lasts, instead of the
//! name the client sent (which the lease still records, as `netd leases` shows).
//! Runtime reservation changes ([`DhcpServer::set_reservations`]) reach DNS at
//! once.
//!
//! Trust (RFC 2131 4.3.2, and the guest is hostile): a message counts only for the
//! MAC that sent it (`chaddr` must be the frame's source, else `spoofed_chaddr`); a
//! REQUEST is ACKed only for the address offered to that client, its own lease
//! (INIT-REBOOT, RENEWING, REBINDING) or its reservation, else NAKed
//! (`nak_unoffered`); RELEASE and DECLINE act only on the sender's own lease or
//! offer (else `foreign_release`). An address a static guest is using (bound by
//! the port guard) is not handed out.
//!
//! Durability without blocking: [`DhcpServer::handle_frame`] only changes memory.
//! [`run`] hands every lease change, with the ACK that announces it, to a writer
//! thread ([`LeaseWriter`]), which writes the lease file (fsync, rename, directory
//! fsync) and only then sends the ACKs. Changes queued while a write is under way go
//! out together in the next one (group commit), so a REQUEST flood costs one write
//! per fsync time, not one per REQUEST, and never stalls the switch, the NAT router
//! (which hands unicast DHCP to the server's queue and returns) or the runtime. A
//! failed write sends no ACK (`save_failed`): the client asks again.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{opt, DhcpMessage, Lease, LeaseDb, MsgType};
use crate::config::{fmt_mac, DhcpReservation, DhcpSpec, Ipv4Spec};
use crate::switch::IpGuard;
use crate::wire::{
    self, Ethernet, Ipv4, Udp, BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_UDP,
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
    /// Messages whose `chaddr` was not the frame's source MAC (ignored).
    pub spoofed_chaddr: u64,
    /// RELEASEs and DECLINEs for an address that is not the sender's (ignored).
    pub foreign_release: u64,
    /// REQUESTs for an address not offered or leased to the client (NAKed).
    pub nak_unoffered: u64,
    /// Counters kept outside the server's lock (the writer thread, the router).
    pub shared: Arc<SharedStats>,
    /// The port guard's address bindings, kept in step with the leases.
    ip_guard: Option<Arc<IpGuard>>,
    /// Leases changed since the last [`DhcpServer::take_changed`].
    changed: bool,
    /// The network's DNS names, kept in step with the leases' hostnames.
    names: Option<Arc<crate::dns::LocalNames>>,
}

/// Counters updated without the server's lock.
#[derive(Debug, Default)]
pub struct SharedStats {
    /// ACKs withheld because the lease file could not be written.
    pub save_failed: AtomicU64,
    /// Lease file writes done.
    pub commits: AtomicU64,
    /// Frames the router could not queue for the server.
    pub dropped_busy: AtomicU64,
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
            spoofed_chaddr: 0,
            foreign_release: 0,
            nak_unoffered: 0,
            shared: Arc::default(),
            ip_guard: None,
            changed: false,
            names: None,
        }
    }

    /// Publishes the leases' hostnames in `names` (the network's DNS), from now.
    pub fn set_names(&mut self, names: Arc<crate::dns::LocalNames>) {
        self.names = Some(names);
        self.sync_guard();
    }

    /// Keeps `g` (the port guard's address table) in step with the leases, from now.
    pub fn set_ip_guard(&mut self, g: Arc<IpGuard>) {
        self.ip_guard = Some(g);
        self.sync_guard();
    }

    /// Brings the port guard's bindings and the DNS names in step with the leases.
    fn sync_guard(&self) {
        if let Some(g) = &self.ip_guard {
            g.set_leases(self.db.by_mac.iter().map(|(m, l)| (*m, l.ip, l.expires)));
        }
        if let Some(n) = &self.names {
            n.set_guest_leases(self.db.by_mac.iter().filter_map(|(mac, l)| {
                Some((self.published_name(mac, l)?, l.ip, l.expires, Some(*mac)))
            }));
        }
    }

    /// The name a lease is published under in DNS: its reservation's hostname,
    /// else the one the client sent.
    fn published_name<'a>(&'a self, mac: &[u8; 6], l: &'a Lease) -> Option<&'a str> {
        self.reserved_hostname(mac).or(l.hostname.as_deref())
    }

    /// The hostname of `mac`'s reservation, if it has one.
    fn reserved_hostname(&self, mac: &[u8; 6]) -> Option<&str> {
        self.spec
            .reservations
            .iter()
            .find(|r| r.mac == *mac)
            .and_then(|r| r.hostname.as_deref())
    }

    /// Replaces the reservations (`netd reservation add|del`), in the port guard's
    /// table too, and publishes their hostnames in DNS for the leases they cover at
    /// once. A client whose reservation changed gets its reserved address at its
    /// next DISCOVER.
    pub fn set_reservations(&mut self, reservations: Vec<DhcpReservation>) {
        if let Some(g) = &self.ip_guard {
            let pairs: Vec<([u8; 6], Ipv4Addr)> =
                reservations.iter().map(|r| (r.mac, r.ip)).collect();
            g.set_reserved(&pairs);
        }
        self.spec.reservations = reservations;
        self.sync_guard();
    }

    /// Whether the leases changed since the last call (they are then to be saved).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Whether a static guest is using `ip` (so it is not to be handed out).
    fn bound_elsewhere(&self, ip: Ipv4Addr, mac: &[u8; 6]) -> bool {
        self.ip_guard
            .as_ref()
            .is_some_and(|g| g.bound_to_other(ip, mac, Instant::now()))
    }

    /// The counters, as the control API shows them.
    pub fn stats(&self) -> fabric_api::netd::DhcpStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        fabric_api::netd::DhcpStats {
            leases: self.db.leases().len(),
            malformed: self.malformed,
            refused_full: self.refused_full,
            spoofed_chaddr: self.spoofed_chaddr,
            foreign_release: self.foreign_release,
            nak_unoffered: self.nak_unoffered,
            save_failed: r(&self.shared.save_failed),
            dropped_busy: r(&self.shared.dropped_busy),
            commits: r(&self.shared.commits),
        }
    }

    fn reserved_for(&self, mac: &[u8; 6]) -> Option<Ipv4Addr> {
        self.spec
            .reservations
            .iter()
            .find(|r| r.mac == *mac)
            .map(|r| r.ip)
    }

    fn reserved_for_other(&self, ip: Ipv4Addr, mac: &[u8; 6]) -> bool {
        self.spec
            .reservations
            .iter()
            .any(|r| r.ip == ip && r.mac != *mac)
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
            && !self.bound_elsewhere(ip, mac)
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
                && !self.bound_elsewhere(*ip, mac)
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
            if let Some(d) = &self.spec.domain {
                options.push((opt::DOMAIN_NAME, d.as_bytes().to_vec()));
            }
            // A reserved client is told its name, as dnsmasq does for dhcp-host.
            if let Some(h) = self.reserved_hostname(&req.chaddr) {
                options.push((opt::HOSTNAME, h.as_bytes().to_vec()));
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
    /// Lease changes are made in memory only and flagged ([`Self::take_changed`]):
    /// the caller saves them before the reply leaves ([`run`] does).
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
                // SELECTING asks for what it was offered; INIT-REBOOT, RENEWING and
                // REBINDING for what it holds. Anything else was never this
                // client's to ask for (RFC 2131 4.3.2: NAK).
                let offered = self
                    .db
                    .offers
                    .get(&mac)
                    .is_some_and(|(ip, until)| *ip == wanted && *until > now);
                let own = self.db.by_mac.get(&mac).is_some_and(|l| l.ip == wanted);
                let reserved = self.reserved_for(&mac) == Some(wanted);
                if !(offered || own || reserved) {
                    self.nak_unoffered += 1;
                    return Some(self.reply(m, MsgType::Nak, Ipv4Addr::UNSPECIFIED, false));
                }
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
                let hostname: Option<String> = m.option(opt::HOSTNAME).map(|h| {
                    String::from_utf8_lossy(h)
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(64)
                        .collect()
                });
                // Kept in the lease as sent (shown by `netd leases`); published in
                // DNS only if it is a name (counted otherwise, once per name a client
                // sends: a renewal with the same name is not counted again), and only
                // when the client has no reservation hostname (that one is published).
                let renewed = self
                    .db
                    .by_mac
                    .get(&mac)
                    .is_some_and(|l| l.hostname == hostname);
                if let (Some(n), Some(h), None, false) = (
                    &self.names,
                    &hostname,
                    self.reserved_hostname(&mac),
                    renewed,
                ) {
                    n.check_hostname(h);
                }
                self.db.by_mac.insert(
                    mac,
                    Lease {
                        mac: fmt_mac(&mac),
                        ip: wanted,
                        expires: now + u64::from(self.spec.lease_time),
                        hostname,
                    },
                );
                self.changed = true;
                Some(self.reply(m, MsgType::Ack, wanted, true))
            }
            MsgType::Release => {
                match self.db.by_mac.get_mut(&mac) {
                    Some(l) if l.ip == m.ciaddr => {
                        // Keep the record (the client gets the same address back if it
                        // is still free), but the address is free for others now.
                        l.expires = now;
                        self.changed = true;
                    }
                    _ => self.foreign_release += 1,
                }
                None
            }
            MsgType::Decline => {
                let ip = requested?;
                let mine = self.db.offers.get(&mac).is_some_and(|(o, _)| *o == ip)
                    || self.db.by_mac.get(&mac).is_some_and(|l| l.ip == ip);
                if !mine {
                    // Somebody else's address: declining it would take it from them.
                    self.foreign_release += 1;
                    return None;
                }
                if self.in_range(ip) {
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
                        self.changed = true;
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
                wire::arp_answer(eth.payload, self.mac, self.spec.server)
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
                // A client speaks for itself only (a relay, with giaddr, for others).
                if msg.giaddr.is_unspecified() && msg.chaddr != eth.src {
                    self.spoofed_chaddr += 1;
                    return None;
                }
                let reply = self.handle(&msg, now);
                if self.changed {
                    // Before the reply can leave: the guard lets the new address in.
                    self.sync_guard();
                }
                let reply = reply?;
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

/// The lease file writer of one server: a thread that saves the newest lease list
/// it was given, then sends the replies that waited for it (see the module doc).
pub struct LeaseWriter {
    q: Arc<(Mutex<Pending>, Condvar)>,
}

/// How the writer saves a lease list (the lease file; tests slow it down).
pub type Saver = Box<dyn FnMut(&[Lease]) -> Result<(), super::LeaseError> + Send>;

/// The saver of the lease file `path` (None: nothing to write).
pub fn file_saver(path: Option<PathBuf>) -> Saver {
    Box::new(move |leases: &[Lease]| match &path {
        None => Ok(()),
        Some(p) => super::leases::save_leases(p, leases),
    })
}

#[derive(Default)]
struct Pending {
    leases: Option<Vec<Lease>>,
    replies: Vec<Bytes>,
    closed: bool,
}

impl LeaseWriter {
    /// Starts the writer that saves with `save`, sending replies on `out`.
    pub fn spawn(
        save: Saver,
        out: mpsc::Sender<Bytes>,
        stats: Arc<SharedStats>,
    ) -> std::io::Result<Self> {
        let q: Arc<(Mutex<Pending>, Condvar)> = Arc::default();
        let q2 = q.clone();
        std::thread::Builder::new()
            .name("dhcp-leases".into())
            .spawn(move || writer_loop(&q2, save, &out, &stats))?;
        Ok(LeaseWriter { q })
    }

    /// Queues `leases` (the whole list after a change) to be saved, and `reply` to be
    /// sent once they are.
    pub fn submit(&self, leases: Vec<Lease>, reply: Option<Bytes>) {
        let (m, cv) = &*self.q;
        let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
        p.leases = Some(leases);
        p.replies.extend(reply);
        cv.notify_one();
    }
}

impl Drop for LeaseWriter {
    fn drop(&mut self) {
        let (m, cv) = &*self.q;
        m.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        cv.notify_one();
    }
}

fn writer_loop(
    q: &(Mutex<Pending>, Condvar),
    mut save: Saver,
    out: &mpsc::Sender<Bytes>,
    stats: &SharedStats,
) {
    let (m, cv) = q;
    loop {
        let (leases, replies) = {
            let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
            while p.leases.is_none() && !p.closed {
                p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            match p.leases.take() {
                Some(l) => (l, std::mem::take(&mut p.replies)),
                None => return,
            }
        };
        match save(&leases) {
            Ok(()) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                for r in replies {
                    if out.blocking_send(r).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                stats
                    .save_failed
                    .fetch_add(replies.len().max(1) as u64, Ordering::Relaxed);
                tracing::error!(error = %crate::error_chain(&e), "lease not saved; ACK withheld");
            }
        }
    }
}

/// Frames the NAT router hands the server (unicast DHCP to the router's own
/// addresses), with the router's MAC to answer from.
pub struct Routed {
    /// The frames.
    pub rx: mpsc::Receiver<Bytes>,
    /// The router's MAC: replies leave from it (the client sent to it).
    pub mac: [u8; 6],
}

/// Serves DHCP on a service port (and the frames the NAT router hands over) until
/// the switch side goes away.
///
/// A frame is handled on the task itself (memory only, no I/O); lease changes and
/// the ACKs that announce them go through the [`LeaseWriter`] thread.
pub async fn run(
    server: Arc<Mutex<DhcpServer>>,
    port: crate::switch::ServicePort,
    routed: Option<Routed>,
) {
    let path = {
        let s = server.lock().unwrap_or_else(|e| e.into_inner());
        s.db.path().map(|p| p.to_path_buf())
    };
    run_with(server, port, routed, file_saver(path)).await
}

/// [`run`] with the lease list saved by `save`.
pub async fn run_with(
    server: Arc<Mutex<DhcpServer>>,
    port: crate::switch::ServicePort,
    routed: Option<Routed>,
    save: Saver,
) {
    let crate::switch::ServicePort {
        to_switch,
        mut from_switch,
    } = port;
    let stats = server
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shared
        .clone();
    let writer = match LeaseWriter::spawn(save, to_switch.clone(), stats) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the lease writer; DHCP not served");
            return;
        }
    };
    let (mut routed_rx, router_mac) = match routed {
        Some(r) => (Some(r.rx), Some(r.mac)),
        None => (None, None),
    };
    loop {
        let (frame, via_router) = tokio::select! {
            f = from_switch.recv() => match f {
                Some(f) => (f, false),
                None => return,
            },
            f = async { routed_rx.as_mut()?.recv().await }, if routed_rx.is_some() => match f {
                Some(f) => (f, true),
                None => { routed_rx = None; continue; }
            },
        };
        let (reply, changed) = {
            let mut s = server.lock().unwrap_or_else(|e| e.into_inner());
            let r = s.handle_frame(&frame, unix_now());
            let changed = s.take_changed().then(|| s.db.leases());
            (r, changed)
        };
        let reply = reply.map(|mut r| {
            if let (true, Some(mac), Some(src)) = (via_router, router_mac, r.get_mut(6..12)) {
                // Answer from the MAC the client sent to (the router's, by ARP).
                src.copy_from_slice(&mac);
            }
            Bytes::from(r)
        });
        match (changed, reply) {
            (Some(leases), reply) => writer.submit(leases, reply),
            (None, Some(r)) => {
                if to_switch.send(r).await.is_err() {
                    return;
                }
            }
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests;
