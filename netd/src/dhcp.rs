//! The DHCP server of a network (RFC 2131, options RFC 2132), as an in-process
//! service port of the switch.
//!
//! Theory of operation. [`DhcpMessage::parse`] turns the UDP payload into a checked
//! struct (fixed BOOTP fields plus a bounded list of options) or refuses it;
//! [`DhcpServer::handle_frame`] takes a whole Ethernet frame from the switch and
//! returns the frames to send back (a reply, an ARP answer for the server's own
//! address, or nothing). It is pure logic over a [`LeaseDb`] and a clock value, so
//! unit tests drive it without sockets; [`run`] wires it to a [`ServicePort`].
//!
//! Allocation order for a client: its reservation; else the address it held before
//! (a lease, live or expired, keeps its MAC so a VM gets the same address back);
//! else the address it asks for, if free; else the lowest free address of the
//! range. An OFFER holds the address for [`OFFER_HOLD_SECS`]. Offers, live leases
//! and declined addresses are each capped at [`MAX_CLIENTS`] (new clients past that are
//! refused and counted in `refused_full`), so made-up MACs cannot grow them with the range. ACKed leases are
//! written to `leases-<network>.json` under the state directory atomically (write
//! to a temporary file, fsync, rename, fsync the directory) before the ACK leaves,
//! so a lease a client heard about survives a crash or restart of netd.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{fmt_mac, parse_mac, DhcpSpec, Ipv4Spec};
use crate::wire::{
    self, Arp, Ethernet, Ipv4, Udp, BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_UDP,
};

/// Seconds an offered address is held for the client.
pub const OFFER_HOLD_SECS: u64 = 60;
/// Seconds a DECLINEd address is kept out of use.
pub const DECLINE_HOLD_SECS: u64 = 600;
/// Most options a message may carry (bounds work on a hostile packet).
pub const MAX_OPTIONS: usize = 128;
/// Most outstanding offers, most live leases and most declined addresses the server
/// keeps. The range alone does not bound them usefully: a /8 subnet's range has 16M
/// addresses, and a guest that sends DISCOVERs (or REQUESTs, or DECLINEs) from made-up
/// MACs would otherwise grow the tables, the lease file and the cost of every
/// allocation with it. Past this, new clients are refused (and counted).
pub const MAX_CLIENTS: usize = 1024;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const FIXED_LEN: usize = 236;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    /// 1
    Discover = 1,
    /// 2
    Offer = 2,
    /// 3
    Request = 3,
    /// 4
    Decline = 4,
    /// 5
    Ack = 5,
    /// 6
    Nak = 6,
    /// 7
    Release = 7,
    /// 8
    Inform = 8,
}

impl MsgType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
}

/// Option codes used here.
pub mod opt {
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Router.
    pub const ROUTER: u8 = 3;
    /// DNS servers.
    pub const DNS: u8 = 6;
    /// Host name.
    pub const HOSTNAME: u8 = 12;
    /// Broadcast address.
    pub const BROADCAST: u8 = 28;
    /// Requested IP.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time.
    pub const LEASE_TIME: u8 = 51;
    /// Message type.
    pub const MSG_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Renewal (T1).
    pub const RENEWAL: u8 = 58;
    /// Rebinding (T2).
    pub const REBINDING: u8 = 59;
    /// End.
    pub const END: u8 = 255;
    /// Pad.
    pub const PAD: u8 = 0;
}

/// Why a DHCP payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// shorter than the fixed BOOTP header and magic cookie
    #[error("shorter than the fixed BOOTP header and magic cookie")]
    Truncated,
    /// bad magic cookie
    #[error("bad magic cookie")]
    BadMagic,
    /// not an Ethernet (htype 1, hlen 6) message
    #[error("not an Ethernet (htype 1, hlen 6) message")]
    NotEthernet,
    /// an option runs past the end of the packet
    #[error("an option runs past the end of the packet")]
    OptionOverrun,
    /// too many options
    #[error("too many options")]
    TooManyOptions,
    /// missing or unknown message type option
    #[error("missing or unknown message type option")]
    NoMsgType,
}

/// A parsed DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpMessage {
    /// 1 request, 2 reply.
    pub op: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds elapsed.
    pub secs: u16,
    /// Flags (bit 15: broadcast).
    pub flags: u16,
    /// Client address.
    pub ciaddr: Ipv4Addr,
    /// Your address.
    pub yiaddr: Ipv4Addr,
    /// Server address.
    pub siaddr: Ipv4Addr,
    /// Relay address.
    pub giaddr: Ipv4Addr,
    /// Client MAC.
    pub chaddr: [u8; 6],
    /// Message type.
    pub msg_type: MsgType,
    /// Options other than message type, in order.
    pub options: Vec<(u8, Vec<u8>)>,
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

impl DhcpMessage {
    /// Parses a UDP payload.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        let fixed = b.get(..FIXED_LEN + 4).ok_or(ParseError::Truncated)?;
        if fixed.get(FIXED_LEN..FIXED_LEN + 4) != Some(&MAGIC[..]) {
            return Err(ParseError::BadMagic);
        }
        let t = ParseError::Truncated;
        if fixed.get(1) != Some(&1) || fixed.get(2) != Some(&6) {
            return Err(ParseError::NotEthernet);
        }
        let be32 = |at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(fixed.get(at..at + 4)?.try_into().ok()?))
        };
        let be16 = |at: usize| -> Option<u16> {
            Some(u16::from_be_bytes(fixed.get(at..at + 2)?.try_into().ok()?))
        };
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(fixed.get(28..34).ok_or(t.clone())?);
        let mut options = Vec::new();
        let mut msg_type = None;
        let mut rest = b.get(FIXED_LEN + 4..).unwrap_or_default();
        while let Some((&code, tail)) = rest.split_first() {
            match code {
                opt::PAD => rest = tail,
                opt::END => break,
                _ => {
                    let (&len, tail) = tail.split_first().ok_or(ParseError::OptionOverrun)?;
                    let data = tail
                        .get(..usize::from(len))
                        .ok_or(ParseError::OptionOverrun)?;
                    rest = tail.get(usize::from(len)..).unwrap_or_default();
                    if code == opt::MSG_TYPE {
                        msg_type = data.first().and_then(|&v| MsgType::from_u8(v));
                    } else {
                        if options.len() >= MAX_OPTIONS {
                            return Err(ParseError::TooManyOptions);
                        }
                        options.push((code, data.to_vec()));
                    }
                }
            }
        }
        Ok(DhcpMessage {
            op: *fixed.first().ok_or(t.clone())?,
            xid: be32(4).ok_or(t.clone())?,
            secs: be16(8).ok_or(t.clone())?,
            flags: be16(10).ok_or(t.clone())?,
            ciaddr: ip_at(fixed, 12).ok_or(t.clone())?,
            yiaddr: ip_at(fixed, 16).ok_or(t.clone())?,
            siaddr: ip_at(fixed, 20).ok_or(t.clone())?,
            giaddr: ip_at(fixed, 24).ok_or(t)?,
            chaddr,
            msg_type: msg_type.ok_or(ParseError::NoMsgType)?,
            options,
        })
    }

    /// The first option `code`.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// An option holding one IPv4 address.
    pub fn option_ip(&self, code: u8) -> Option<Ipv4Addr> {
        let v: [u8; 4] = self.option(code)?.try_into().ok()?;
        Some(Ipv4Addr::from(v))
    }

    /// Length of [`emit`](Self::emit)'s output.
    pub fn buffer_len(&self) -> usize {
        let opts: usize = self.options.iter().map(|(_, v)| 2 + v.len().min(255)).sum();
        (FIXED_LEN + 4 + 3 + opts + 1).max(300)
    }

    /// Writes the message (padded to the BOOTP minimum of 300 bytes) into `out`,
    /// which must be [`buffer_len`](Self::buffer_len) long. Every byte is written.
    pub fn emit(&self, out: &mut [u8]) {
        out.fill(0);
        let mut w = Writer { out, at: 0 };
        w.put(&[self.op, 1, 6, 0]);
        w.put(&self.xid.to_be_bytes());
        w.put(&self.secs.to_be_bytes());
        w.put(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            w.put(&a.octets());
        }
        w.put(&self.chaddr);
        w.at = FIXED_LEN;
        w.put(&MAGIC);
        w.put(&[opt::MSG_TYPE, 1, self.msg_type as u8]);
        for (code, v) in &self.options {
            let v = v.get(..v.len().min(255)).unwrap_or_default();
            w.put(&[*code, v.len() as u8]);
            w.put(v);
        }
        w.put(&[opt::END]);
    }

    /// Emits into a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(&mut v);
        v
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        if let Some(d) = self.out.get_mut(self.at..self.at + b.len()) {
            d.copy_from_slice(b);
        }
        self.at += b.len();
    }
}

/// One lease, as stored and as the control API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Client MAC.
    pub mac: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Unix time the lease ends.
    pub expires: u64,
    /// Host name the client sent, if any.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Lease file errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// cannot read lease file {path}
    #[error("cannot read lease file {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// lease file {path} is not valid JSON lease list
    #[error("lease file {path} is not a valid JSON lease list")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// cannot write lease file {path}
    #[error("cannot write lease file {path}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The leases of one network, by MAC.
#[derive(Debug, Default)]
pub struct LeaseDb {
    by_mac: HashMap<[u8; 6], Lease>,
    offers: HashMap<[u8; 6], (Ipv4Addr, u64)>,
    declined: HashMap<Ipv4Addr, u64>,
    path: Option<PathBuf>,
}

impl LeaseDb {
    /// Loads `path` (a missing file is an empty db).
    pub fn load(path: Option<PathBuf>) -> Result<Self, LeaseError> {
        let mut db = LeaseDb {
            path: path.clone(),
            ..Default::default()
        };
        if let Some(p) = &path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    let leases: Vec<Lease> =
                        serde_json::from_slice(&bytes).map_err(|source| LeaseError::Parse {
                            path: p.clone(),
                            source,
                        })?;
                    for l in leases {
                        if let Some(mac) = parse_mac(&l.mac) {
                            db.by_mac.insert(mac, l);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LeaseError::Read {
                        path: p.clone(),
                        source,
                    })
                }
            }
        }
        Ok(db)
    }

    /// Every lease, sorted by address.
    pub fn leases(&self) -> Vec<Lease> {
        let mut v: Vec<_> = self.by_mac.values().cloned().collect();
        v.sort_by_key(|l| l.ip);
        v
    }

    fn save(&self) -> Result<(), LeaseError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let werr = |source| LeaseError::Write {
            path: path.clone(),
            source,
        };
        let data = serde_json::to_vec_pretty(&self.leases())
            .map_err(|e| werr(std::io::Error::other(e)))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&data).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(werr)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
        Ok(())
    }

    /// Every address held at `now` by somebody other than `mac` (see
    /// [`taken_by_other`](Self::taken_by_other)).
    fn taken_by_others(&self, mac: &[u8; 6], now: u64) -> HashSet<Ipv4Addr> {
        let leases = self
            .by_mac
            .iter()
            .filter(|(m, l)| *m != mac && l.expires > now)
            .map(|(_, l)| l.ip);
        let offers = self
            .offers
            .iter()
            .filter(|(m, (_, until))| *m != mac && *until > now)
            .map(|(_, (ip, _))| *ip);
        let declined = self
            .declined
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(ip, _)| *ip);
        leases.chain(offers).chain(declined).collect()
    }

    /// Who holds `ip` at `now` (an unexpired lease or offer), other than `mac`.
    fn taken_by_other(&self, ip: Ipv4Addr, mac: &[u8; 6], now: u64) -> bool {
        self.by_mac
            .iter()
            .any(|(m, l)| m != mac && l.ip == ip && l.expires > now)
            || self
                .offers
                .iter()
                .any(|(m, (o, until))| m != mac && *o == ip && *until > now)
            || self.declined.get(&ip).is_some_and(|until| *until > now)
    }
}

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
    use super::*;

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

    fn msg(t: MsgType, mac: u8, options: Vec<(u8, Vec<u8>)>) -> DhcpMessage {
        DhcpMessage {
            op: 1,
            xid: 0x1234_5678,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, mac],
            msg_type: t,
            options,
        }
    }

    fn sid() -> (u8, Vec<u8>) {
        (opt::SERVER_ID, vec![10, 9, 0, 1])
    }
    fn req_ip(ip: [u8; 4]) -> (u8, Vec<u8>) {
        (opt::REQUESTED_IP, ip.to_vec())
    }

    #[test]
    fn emit_writes_every_byte_and_roundtrips() {
        let m = msg(
            MsgType::Request,
            7,
            vec![req_ip([10, 9, 0, 5]), (opt::HOSTNAME, b"vm1".to_vec())],
        );
        let mut buf = vec![0xa5u8; m.buffer_len()];
        m.emit(&mut buf);
        assert_eq!(DhcpMessage::parse(&buf).unwrap(), m);
        assert!(buf.len() >= 300);
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
        let nak = s
            .handle(
                &msg(MsgType::Request, 8, vec![sid(), req_ip([10, 9, 0, 100])]),
                1002,
            )
            .unwrap();
        assert_eq!(nak.msg_type, MsgType::Nak);
        // Out-of-subnet request (init-reboot from another network): NAK.
        let nak = s
            .handle(
                &msg(MsgType::Request, 9, vec![req_ip([192, 168, 1, 5])]),
                1002,
            )
            .unwrap();
        assert_eq!(nak.msg_type, MsgType::Nak);
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
        assert_eq!(s.handle(&renew, 1200).unwrap().msg_type, MsgType::Ack);
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
        let f = wire::emit_udp_frame(
            BROADCAST_MAC,
            [2, 0, 0, 0, 0, 7],
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            &d,
        );
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
        let junk = wire::emit_udp_frame(
            BROADCAST_MAC,
            [2, 0, 0, 0, 0, 7],
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            b"not dhcp",
        );
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
                assert_eq!(s.handle(&r, now).unwrap().msg_type, MsgType::Ack);
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
            if s.handle(&r, 1000).unwrap().msg_type == MsgType::Ack {
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
        assert_eq!(s.handle(&r, 1000 + 3601).unwrap().msg_type, MsgType::Ack);
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
            let f = wire::emit_udp_frame(
                BROADCAST_MAC,
                [2, 0, 0, 0, 0, 7],
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                68,
                67,
                &r,
            );
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
            let f = wire::emit_udp_frame(
                BROADCAST_MAC,
                [2, 0, 0, 0, 0, 7],
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                68,
                67,
                &b,
            );
            let _ = s.handle_frame(&f, 100 + i);
            let _ = s.handle_frame(&b, 100 + i);
        }
    }
}
