//! Which senders a vxlan port takes datagrams from.
//!
//! The tunnel is as untrusted as a guest port. A datagram is accepted when
//! `accept_any = true`, when its sender is a listed remote (the flood list as it is
//! now), or, on a port with a `group`, when its sender is in the multicast group.
//! Nobody can list a group's members in advance, so "in the group" is proved by
//! sending to it: a datagram whose destination address (IP_PKTINFO) is the group
//! is accepted and its sender becomes a known member ([`Members`]); a unicast
//! datagram straight to the port's own address is accepted only from a known
//! member (the unicast of a learned MAC goes to the remote it was learned
//! behind, so a member's replies arrive that way). Anything else is dropped as
//! `drop_sender`: a host that can reach the port's address but is neither listed
//! nor on the group cannot inject frames.
//!
//! A member is remembered once it sent a valid VXLAN datagram of the port's VNI to
//! the group; the table is bounded ([`MAX_MEMBERS`]) and forgets the member heard
//! from longest ago when full. A port announces itself to the group when it starts
//! and when it hears a new member (an 8-byte VXLAN header of its VNI with no inner
//! frame, which carries no frame and is not switched), so that the members know it
//! before its first unicast reply reaches them.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Most members a port remembers.
pub const MAX_MEMBERS: usize = 1024;

/// What to do with a datagram, by its sender and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accept it.
    Accept,
    /// Accept it: it was sent to the group (its sender is a member once the
    /// datagram proves to be VXLAN of the port's VNI).
    Group,
    /// Drop it (`drop_sender`).
    Drop,
}

/// The settings the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// `accept_any`.
    pub accept_any: bool,
    /// The multicast group, if any.
    pub group: Option<Ipv4Addr>,
    /// The flood list now.
    pub remotes: &'a [Ipv4Addr],
}

impl Policy<'_> {
    /// The verdict on a datagram from `from` sent to `to` (None: the destination
    /// is not known, which never counts as the group).
    pub fn verdict(&self, from: Ipv4Addr, to: Option<Ipv4Addr>, members: &Members) -> Verdict {
        if self.accept_any || self.remotes.contains(&from) {
            return Verdict::Accept;
        }
        match self.group {
            Some(g) if to == Some(g) => Verdict::Group,
            Some(_) if members.contains(from) => Verdict::Accept,
            _ => Verdict::Drop,
        }
    }
}

/// The senders heard on the group, with when each was heard from last.
#[derive(Debug, Default)]
pub struct Members {
    last: HashMap<Ipv4Addr, u64>,
    clock: u64,
}

impl Members {
    /// Whether `ip` is a known member.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.last.contains_key(&ip)
    }

    /// Records that `ip` was heard (on the group, or as an accepted member);
    /// returns whether it is new. When the table is full the member heard from
    /// longest ago is forgotten.
    pub fn heard(&mut self, ip: Ipv4Addr) -> bool {
        self.clock += 1;
        if let Some(t) = self.last.get_mut(&ip) {
            *t = self.clock;
            return false;
        }
        if self.last.len() >= MAX_MEMBERS {
            if let Some(old) = self.last.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                self.last.remove(&old);
            }
        }
        self.last.insert(ip, self.clock);
        true
    }

    /// How many members are known.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether no member is known.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 42);
    const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
    const LISTED: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 3);

    #[test]
    fn unlisted_unicast_is_dropped_unless_the_sender_was_heard_on_the_group() {
        let remotes = [LISTED];
        let p = Policy {
            accept_any: false,
            group: Some(G),
            remotes: &remotes,
        };
        let mut m = Members::default();
        // A listed remote: either way.
        assert_eq!(p.verdict(LISTED, Some(ME), &m), Verdict::Accept);
        assert_eq!(p.verdict(LISTED, Some(G), &m), Verdict::Accept);
        // An unlisted host straight to our address: dropped; unknown destination too.
        assert_eq!(p.verdict(OTHER, Some(ME), &m), Verdict::Drop);
        assert_eq!(p.verdict(OTHER, None, &m), Verdict::Drop);
        // Another group than ours is not ours.
        let g2 = Ipv4Addr::new(239, 1, 1, 43);
        assert_eq!(p.verdict(OTHER, Some(g2), &m), Verdict::Drop);
        // To the group: accepted, and once heard there its unicast is too.
        assert_eq!(p.verdict(OTHER, Some(G), &m), Verdict::Group);
        assert!(m.heard(OTHER));
        assert!(!m.heard(OTHER));
        assert_eq!(p.verdict(OTHER, Some(ME), &m), Verdict::Accept);
        // Without a group, membership means nothing.
        let p = Policy { group: None, ..p };
        assert_eq!(p.verdict(OTHER, Some(ME), &m), Verdict::Drop);
        assert_eq!(p.verdict(OTHER, Some(G), &m), Verdict::Drop);
        // accept_any takes everyone.
        let p = Policy {
            accept_any: true,
            ..p
        };
        assert_eq!(p.verdict(OTHER, None, &Members::default()), Verdict::Accept);
    }

    #[test]
    fn the_member_table_is_bounded_and_forgets_the_stalest() {
        let mut m = Members::default();
        let ip = |i: usize| Ipv4Addr::from(0x0a00_0000 + i as u32);
        for i in 0..MAX_MEMBERS {
            assert!(m.heard(ip(i)));
        }
        // Member 0 is heard again, so member 1 is now the stalest.
        assert!(!m.heard(ip(0)));
        assert!(m.heard(ip(MAX_MEMBERS)));
        assert_eq!(m.len(), MAX_MEMBERS);
        assert!(m.contains(ip(0)) && !m.contains(ip(1)) && m.contains(ip(MAX_MEMBERS)));
    }
}
