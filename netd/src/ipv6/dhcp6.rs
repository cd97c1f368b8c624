//! DHCPv6 (RFC 8415) of a network with `subnet6`: stateless (an Information-request
//! is answered with the DNS servers, option 23) and, with `dhcp6_range`, stateful
//! IA_NA leases: Solicit / Advertise (or Reply at once with Rapid Commit) /
//! Request / Reply, Renew, Rebind, Release, Decline, Confirm.
//!
//! The server's DUID is DUID-LL of the service MAC, so it stays the same across
//! restarts. A lease is keyed by the client's DUID and IAID and also remembers the
//! MAC that asked (the frame's source: the port guard binds the leased address to
//! it); a client gets its old address back. Leases live at most
//! [`crate::dhcp::MAX_CLIENTS`] at once and are written to
//! `leases6-<network>.json` atomically ([`fabric_util::fs::write_durable`]), as the
//! IPv4 leases are, before the Reply that grants them leaves.
//!
//! Parsing is strict: the message is at least 4 bytes, every option's length fits,
//! at most [`MAX_OPTIONS`] options, a client DUID of 1 to 130 bytes is required
//! (RFC 8415 11.1), and a message that fails is dropped and counted (`malformed`).

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::wire::{self, Ipv6, IPPROTO_UDP};
use crate::config::Ipv6Spec;
use crate::wire::Ethernet;

/// Most options read from one message.
pub const MAX_OPTIONS: usize = 64;
/// Longest DUID accepted (RFC 8415 11.1: 128 bytes after the 2-byte type).
const MAX_DUID: usize = 130;

/// DHCPv6 message types.
mod msg {
    pub const SOLICIT: u8 = 1;
    pub const ADVERTISE: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const CONFIRM: u8 = 4;
    pub const RENEW: u8 = 5;
    pub const REBIND: u8 = 6;
    pub const REPLY: u8 = 7;
    pub const RELEASE: u8 = 8;
    pub const DECLINE: u8 = 9;
    pub const INFORMATION_REQUEST: u8 = 11;
}

/// DHCPv6 option codes.
mod code {
    pub const CLIENTID: u16 = 1;
    pub const SERVERID: u16 = 2;
    pub const IA_NA: u16 = 3;
    pub const IAADDR: u16 = 5;
    pub const STATUS: u16 = 13;
    pub const RAPID_COMMIT: u16 = 14;
    pub const DNS_SERVERS: u16 = 23;
}

/// Status codes.
const NO_ADDRS_AVAIL: u16 = 2;
const NO_BINDING: u16 = 3;
const NOT_ON_LINK: u16 = 4;

/// One DHCPv6 lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease6 {
    /// The client's DUID, hex.
    pub duid: String,
    /// The IA_NA's IAID.
    pub iaid: u32,
    /// The MAC that asked (the frame's source).
    pub mac: String,
    /// The address.
    pub ip: Ipv6Addr,
    /// Unix time the lease ends.
    pub expires: u64,
}

/// The leases of a network, with the file they are kept in.
#[derive(Debug, Default)]
pub struct Lease6Db {
    path: Option<PathBuf>,
    leases: Vec<Lease6>,
    changed: bool,
}

/// A lease file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Lease6Error {
    /// The lease file could not be read.
    #[error("cannot read the DHCPv6 lease file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The lease file is not a lease list.
    #[error("the DHCPv6 lease file {0} is not a lease list")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// The lease file could not be written.
    #[error("cannot write the DHCPv6 lease file {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

impl Lease6Db {
    /// Loads `path` (missing: no leases); None keeps leases in memory only.
    pub fn load(path: Option<PathBuf>) -> Result<Self, Lease6Error> {
        let leases = match &path {
            Some(p) => match std::fs::read(p) {
                Ok(b) => {
                    serde_json::from_slice(&b).map_err(|e| Lease6Error::Parse(p.clone(), e))?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(Lease6Error::Read(p.clone(), e)),
            },
            None => Vec::new(),
        };
        Ok(Lease6Db {
            path,
            leases,
            changed: false,
        })
    }

    /// Whether a lease changed since the last save.
    pub fn is_changed(&self) -> bool {
        self.changed
    }

    /// The leases.
    pub fn leases(&self) -> &[Lease6] {
        &self.leases
    }

    fn save(&mut self) -> Result<(), Lease6Error> {
        if !std::mem::take(&mut self.changed) {
            return Ok(());
        }
        let Some(p) = &self.path else { return Ok(()) };
        let data = serde_json::to_vec_pretty(&self.leases).unwrap_or_default();
        fabric_util::fs::write_durable(Path::new(p), &data, 0o644)
            .map_err(|e| Lease6Error::Write(p.clone(), e))
    }
}

/// A parsed DHCPv6 message (client to server).
struct Message<'a> {
    kind: u8,
    xid: [u8; 3],
    client: &'a [u8],
    server: Option<&'a [u8]>,
    /// IA_NA: (IAID, the addresses asked for).
    ia: Option<(u32, Vec<Ipv6Addr>)>,
    rapid: bool,
}

fn options(mut p: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !p.is_empty() {
        let h = p.get(..4)?;
        let c = u16::from_be_bytes([h[0], h[1]]);
        let l = usize::from(u16::from_be_bytes([h[2], h[3]]));
        out.push((c, p.get(4..4 + l)?));
        if out.len() > MAX_OPTIONS {
            return None;
        }
        p = &p[4 + l..];
    }
    Some(out)
}

impl<'a> Message<'a> {
    fn parse(p: &'a [u8]) -> Option<Self> {
        let kind = *p.first()?;
        let xid = p.get(1..4)?.try_into().ok()?;
        let opts = options(p.get(4..)?)?;
        let one = |c| opts.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
        let client = one(code::CLIENTID).filter(|d| (3..=MAX_DUID).contains(&d.len()))?;
        let ia = match one(code::IA_NA) {
            None => None,
            Some(b) => {
                let iaid = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
                let inner = options(b.get(12..)?)?;
                let mut asked = Vec::new();
                for (c, v) in inner {
                    if c == code::IAADDR {
                        let a: [u8; 16] = v.get(..16)?.try_into().ok()?;
                        asked.push(Ipv6Addr::from(a));
                    }
                }
                Some((iaid, asked))
            }
        };
        Some(Message {
            kind,
            xid,
            client,
            server: one(code::SERVERID),
            ia,
            rapid: one(code::RAPID_COMMIT).is_some(),
        })
    }
}

fn put(out: &mut Vec<u8>, c: u16, v: &[u8]) {
    out.extend_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The DHCPv6 server of one network.
pub struct Dhcp6Server {
    spec: Ipv6Spec,
    mac: [u8; 6],
    ll: Ipv6Addr,
    duid: Vec<u8>,
    /// The leases.
    pub db: Lease6Db,
    /// Messages dropped: not a valid DHCPv6 client message.
    pub malformed: u64,
    /// Stateful requests refused: no address free, or [`crate::dhcp::MAX_CLIENTS`].
    pub refused_full: u64,
}

impl Dhcp6Server {
    /// The server for `spec`, answering from `mac` and its link-local `ll`.
    pub fn new(spec: Ipv6Spec, mac: [u8; 6], ll: Ipv6Addr, db: Lease6Db) -> Self {
        let mut duid = vec![0, 3, 0, 1];
        duid.extend_from_slice(&mac);
        Dhcp6Server {
            spec,
            mac,
            ll,
            duid,
            db,
            malformed: 0,
            refused_full: 0,
        }
    }

    /// Writes the lease file if a lease changed.
    pub fn save_if_changed(&mut self) -> Result<(), Lease6Error> {
        self.db.save()
    }

    /// Answers a UDP datagram to port 547 (other UDP is ignored).
    pub fn handle(&mut self, eth: &Ethernet<'_>, ip: &Ipv6<'_>, unix: u64) -> Option<Vec<u8>> {
        let u = ip.payload;
        let h = u.get(..8)?;
        if h[2..4] != [2, 0x23] {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
        let body = match u.get(8..len.max(8)) {
            Some(b) if len >= 8 && ip.checksum_ok() && wire::is_link_local(ip.src) => b,
            _ => {
                self.malformed += 1;
                return None;
            }
        };
        let Some(m) = Message::parse(body) else {
            self.malformed += 1;
            return None;
        };
        if m.server.is_some_and(|s| s != self.duid.as_slice()) {
            return None;
        }
        let stateful = self.spec.range.is_some();
        let mut out = Vec::new();
        let mut kind = msg::REPLY;
        match m.kind {
            msg::INFORMATION_REQUEST => {}
            msg::SOLICIT if stateful => {
                if !m.rapid {
                    kind = msg::ADVERTISE;
                }
                self.ia_reply(&m, eth.src, unix, m.rapid, &mut out);
                if m.rapid {
                    put(&mut out, code::RAPID_COMMIT, &[]);
                }
            }
            msg::REQUEST | msg::RENEW | msg::REBIND if stateful => {
                if m.kind == msg::REQUEST && m.server.is_none() {
                    self.malformed += 1;
                    return None;
                }
                self.ia_reply(&m, eth.src, unix, true, &mut out);
            }
            msg::RELEASE | msg::DECLINE if stateful => {
                let (iaid, _) = m.ia.clone()?;
                let duid = hex(m.client);
                let mac = crate::config::fmt_mac(&eth.src);
                self.db
                    .leases
                    .retain(|l| !(l.duid == duid && l.iaid == iaid && l.mac == mac));
                self.db.changed = true;
                status(&mut out, 0, "released");
            }
            msg::CONFIRM => {
                let on =
                    m.ia.as_ref()
                        .is_none_or(|(_, a)| a.iter().all(|x| self.spec.contains(*x)));
                status(&mut out, if on { 0 } else { NOT_ON_LINK }, "");
            }
            _ => return None,
        }
        put(&mut out, code::CLIENTID, m.client);
        put(&mut out, code::SERVERID, &self.duid);
        if let Some(d) = self.spec.dns {
            put(&mut out, code::DNS_SERVERS, &d.octets());
        }
        let mut b = vec![2, 0x23, 2, 0x22, 0, 0, 0, 0, kind];
        b.extend_from_slice(&m.xid);
        b.extend_from_slice(&out);
        let l = (b.len() as u16).to_be_bytes();
        b[4..6].copy_from_slice(&l);
        Some(wire::emit_frame(
            eth.src,
            self.mac,
            self.ll,
            ip.src,
            IPPROTO_UDP,
            64,
            b,
            6,
        ))
    }

    /// Appends the IA_NA of a lease for the client (committing it when `commit`).
    fn ia_reply(
        &mut self,
        m: &Message<'_>,
        mac: [u8; 6],
        unix: u64,
        commit: bool,
        out: &mut Vec<u8>,
    ) {
        let Some((iaid, asked)) = &m.ia else { return };
        let duid = hex(m.client);
        let mac_s = crate::config::fmt_mac(&mac);
        let t = self.spec.lease_time;
        let mine = |l: &Lease6| l.duid == duid && l.iaid == *iaid;
        if (m.kind == msg::RENEW || m.kind == msg::REBIND)
            && !self.db.leases.iter().any(|l| mine(l) && l.mac == mac_s)
        {
            return ia(out, *iaid, None, t, Some(NO_BINDING));
        }
        let addr = match self.db.leases.iter().find(|l| mine(l)) {
            Some(l) => Some(l.ip),
            None => self.pick(asked, unix),
        };
        let Some(addr) = addr else {
            self.refused_full += 1;
            return ia(out, *iaid, None, t, Some(NO_ADDRS_AVAIL));
        };
        if commit {
            self.db.leases.retain(|l| !mine(l) && l.ip != addr);
            self.db.leases.push(Lease6 {
                duid,
                iaid: *iaid,
                mac: mac_s,
                ip: addr,
                expires: unix + u64::from(t),
            });
            self.db.changed = true;
        }
        ia(out, *iaid, Some(addr), t, None)
    }

    /// A free address of the range: the one asked for if free, else the lowest.
    fn pick(&mut self, asked: &[Ipv6Addr], unix: u64) -> Option<Ipv6Addr> {
        let (a, b) = self.spec.range?;
        let before = self.db.leases.len();
        self.db.leases.retain(|l| l.expires > unix);
        self.db.changed |= before != self.db.leases.len();
        if self.db.leases.len() >= crate::dhcp::MAX_CLIENTS {
            return None;
        }
        let in_range = |x: &Ipv6Addr| (u128::from(a)..=u128::from(b)).contains(&u128::from(*x));
        let free = |x: &Ipv6Addr| !self.db.leases.iter().any(|l| l.ip == *x);
        if let Some(x) = asked.iter().find(|x| in_range(x) && free(x)) {
            return Some(*x);
        }
        // Leases are bounded by MAX_CLIENTS, so this looks at most that many + 1.
        (u128::from(a)..=u128::from(b))
            .map(Ipv6Addr::from)
            .find(|x| free(x))
    }
}

fn status(out: &mut Vec<u8>, code_v: u16, text: &str) {
    let mut v = code_v.to_be_bytes().to_vec();
    v.extend_from_slice(text.as_bytes());
    put(out, code::STATUS, &v);
}

fn ia(out: &mut Vec<u8>, iaid: u32, addr: Option<Ipv6Addr>, t: u32, st: Option<u16>) {
    let mut v = iaid.to_be_bytes().to_vec();
    v.extend_from_slice(&(t / 2).to_be_bytes());
    v.extend_from_slice(&(t / 5 * 4).to_be_bytes());
    if let Some(a) = addr {
        let mut x = a.octets().to_vec();
        x.extend_from_slice(&t.to_be_bytes());
        x.extend_from_slice(&t.to_be_bytes());
        put(&mut v, code::IAADDR, &x);
    }
    if let Some(s) = st {
        status(&mut v, s, "");
    }
    put(out, code::IA_NA, &v);
}
