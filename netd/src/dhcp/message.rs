//! DHCP messages (RFC 2131 BOOTP layout, options RFC 2132): [`DhcpMessage::parse`]
//! turns a UDP payload into a checked struct (the fixed BOOTP fields plus a bounded
//! list of options) or refuses it with a [`ParseError`]; [`DhcpMessage::emit`] writes
//! one back, every byte of it. Nothing past the parser looks at raw bytes.

use std::net::Ipv4Addr;

/// Most options a message may carry (bounds work on a hostile packet).
pub const MAX_OPTIONS: usize = 128;
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
    /// Domain name (RFC 2132 3.17).
    pub const DOMAIN_NAME: u8 = 15;
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A client message of type `t` from MAC 02:00:00:00:00:`mac`.
    pub(in crate::dhcp) fn msg(t: MsgType, mac: u8, options: Vec<(u8, Vec<u8>)>) -> DhcpMessage {
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

    #[test]
    fn emit_writes_every_byte_and_roundtrips() {
        let m = msg(
            MsgType::Request,
            7,
            vec![
                (opt::REQUESTED_IP, vec![10, 9, 0, 5]),
                (opt::HOSTNAME, b"vm1".to_vec()),
            ],
        );
        let mut buf = vec![0xa5u8; m.buffer_len()];
        m.emit(&mut buf);
        assert_eq!(DhcpMessage::parse(&buf).unwrap(), m);
        assert!(buf.len() >= 300);
    }
}
