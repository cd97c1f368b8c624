//! The little of the DNS wire format (RFC 1035) that netd's own answers need: a
//! query's header and its one question, parsed into a checked [`Query`], and a
//! reply to it with A or PTR records.
//!
//! The parser refuses rather than guesses: fewer than 12 bytes, a response (QR
//! set), a question count other than one, a compression pointer or an over-long
//! label or name in the question, a truncated question. What follows the question
//! (an EDNS OPT record, say) is not read: netd's answers are small and carry no
//! OPT, which RFC 6891 allows (the client then knows EDNS was not understood).

use std::net::Ipv4Addr;

/// Header length.
pub const HEADER_LEN: usize = 12;
/// Most bytes of a name on the wire (RFC 1035 2.3.4).
pub const MAX_NAME: usize = 255;
/// Most bytes of a label.
pub const MAX_LABEL: usize = 63;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type PTR.
pub const TYPE_PTR: u16 = 12;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Query type ANY.
pub const TYPE_ANY: u16 = 255;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Response code: no error.
pub const RCODE_NOERROR: u8 = 0;
/// Response code: the name does not exist.
pub const RCODE_NXDOMAIN: u8 = 3;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// Why a datagram is not a query netd can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// shorter than a DNS header
    #[error("shorter than a DNS header")]
    Short,
    /// a response, not a query
    #[error("a response, not a query")]
    Response,
    /// not exactly one question
    #[error("not exactly one question")]
    Questions,
    /// the question's name is truncated, compressed or too long
    #[error("the question's name is truncated, compressed or too long")]
    Name,
    /// the question's type and class are missing
    #[error("the question's type and class are missing")]
    Truncated,
}

/// A parsed query: its header fields and its one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    /// Message id.
    pub id: u16,
    /// Header flags (QR clear).
    pub flags: u16,
    /// The question's labels, ASCII letters lowercased (no root label).
    pub labels: Vec<Vec<u8>>,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// The question as sent (name, type, class), echoed in the reply so the
    /// client's letter case is kept.
    question: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl<'a> Query<'a> {
    /// Parses a query datagram.
    pub fn parse(b: &'a [u8]) -> Result<Self, ParseError> {
        let (Some(id), Some(flags), Some(qd)) = (be16(b, 0), be16(b, 2), be16(b, 4)) else {
            return Err(ParseError::Short);
        };
        if b.len() < HEADER_LEN {
            return Err(ParseError::Short);
        }
        if flags & FLAG_QR != 0 {
            return Err(ParseError::Response);
        }
        if qd != 1 {
            return Err(ParseError::Questions);
        }
        let mut at = HEADER_LEN;
        let mut labels = Vec::new();
        loop {
            let len = usize::from(*b.get(at).ok_or(ParseError::Name)?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > MAX_LABEL || at - HEADER_LEN + len > MAX_NAME {
                return Err(ParseError::Name);
            }
            let label = b.get(at..at + len).ok_or(ParseError::Name)?;
            labels.push(label.to_ascii_lowercase());
            at += len;
        }
        let (Some(qtype), Some(qclass)) = (be16(b, at), be16(b, at + 2)) else {
            return Err(ParseError::Truncated);
        };
        let question = b.get(HEADER_LEN..at + 4).ok_or(ParseError::Truncated)?;
        Ok(Query {
            id,
            flags,
            labels,
            qtype,
            qclass,
            question,
        })
    }

    /// The opcode (0: a standard query).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
}

/// The data of one answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdata {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(std::net::Ipv6Addr),
    /// A name, as labels.
    Ptr(Vec<Vec<u8>>),
}

/// An authoritative reply to `q` with `rcode` and `answers` (each for the question's
/// name, TTL `ttl`), as a whole datagram.
pub fn reply(q: &Query<'_>, rcode: u8, answers: &[Rdata], ttl: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + 64);
    let flags = FLAG_QR | FLAG_AA | (q.flags & FLAG_RD) | FLAG_RA | u16::from(rcode & 0xf);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(q.question);
    for a in answers {
        // The owner name: a pointer to the question's name, right after the header.
        out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        let (rtype, data) = match a {
            Rdata::A(ip) => (TYPE_A, ip.octets().to_vec()),
            Rdata::Aaaa(ip) => (TYPE_AAAA, ip.octets().to_vec()),
            Rdata::Ptr(labels) => (TYPE_PTR, encode_name(labels)),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    out
}

/// A name in wire form (labels of at most 63 bytes, as netd's validated names are).
fn encode_name(labels: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in labels {
        let l = l.get(..l.len().min(MAX_LABEL)).unwrap_or_default();
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` of type `qtype`, id 0x1234, RD set.
    pub(crate) fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut b = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.').filter(|l| !l.is_empty()) {
            b.push(l.len() as u8);
            b.extend_from_slice(l.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&CLASS_IN.to_be_bytes());
        b
    }

    #[test]
    fn parses_a_query_and_lowercases_its_labels() {
        let b = query("Alpha.Lab0.lab", TYPE_A);
        let q = Query::parse(&b).unwrap();
        assert_eq!((q.id, q.qtype, q.qclass, q.opcode()), (0x1234, 1, 1, 0));
        assert_eq!(
            q.labels,
            [b"alpha".to_vec(), b"lab0".to_vec(), b"lab".to_vec()]
        );
    }

    #[test]
    fn refuses_what_is_not_one_plain_question() {
        let good = query("a.b", TYPE_A);
        assert_eq!(Query::parse(&good[..5]), Err(ParseError::Short));
        let mut r = good.clone();
        r[2] |= 0x80;
        assert_eq!(Query::parse(&r), Err(ParseError::Response));
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(Query::parse(&two), Err(ParseError::Questions));
        let mut ptr = good.clone();
        ptr[12] = 0xc0;
        assert_eq!(Query::parse(&ptr), Err(ParseError::Name));
        assert_eq!(
            Query::parse(&good[..good.len() - 2]),
            Err(ParseError::Truncated)
        );
        // A name that never ends, and one past 255 bytes.
        assert_eq!(Query::parse(&good[..14]), Err(ParseError::Name));
        let long = query(&vec!["a".repeat(63); 5].join("."), TYPE_A);
        assert_eq!(Query::parse(&long), Err(ParseError::Name));
        let mut b = vec![0u8; 12];
        b[5] = 1;
        b.extend_from_slice(&[64]);
        b.extend_from_slice(&[b'x'; 64]);
        assert_eq!(Query::parse(&b), Err(ParseError::Name), "label over 63");
    }

    #[test]
    fn reply_echoes_the_question_and_points_answers_at_it() {
        let b = query("Alpha.lab", TYPE_A);
        let q = Query::parse(&b).unwrap();
        let r = reply(
            &q,
            RCODE_NOERROR,
            &[Rdata::A(Ipv4Addr::new(10, 0, 2, 15))],
            0,
        );
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), 0x8580, "QR AA RD RA");
        assert_eq!(&r[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&r[12..b.len()], &b[12..], "question as sent");
        assert_eq!(
            &r[b.len()..],
            &[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 10, 0, 2, 15]
        );
        let nx = reply(&q, RCODE_NXDOMAIN, &[], 0);
        assert_eq!(nx[3] & 0xf, 3);
        assert_eq!(nx.len(), b.len());
        let p = reply(
            &q,
            0,
            &[Rdata::Ptr(vec![b"a".to_vec(), b"lab".to_vec()])],
            0,
        );
        assert_eq!(&p[p.len() - 7..], &[1, b'a', 3, b'l', b'a', b'b', 0]);
    }
}
