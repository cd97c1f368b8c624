//! The checked settings of a `kind = "vxlan"` port, from the raw keys of its
//! `[[network.port]]` table ([`VxlanKeys`]). Errors are `(key, expected)`; the
//! config module adds the file and the key's path.

use std::net::Ipv4Addr;

use fabric_api::netd::{PortKind, VxlanKeys};

use super::wire::MAX_VNI;

/// IANA's VXLAN port.
pub const DEFAULT_PORT: u16 = 4789;

/// A validated vxlan port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// VXLAN network identifier, 1..=16777215.
    pub vni: u32,
    /// Underlay address to send from and listen on (None: any, the route's).
    pub local: Option<Ipv4Addr>,
    /// Remote VTEPs at start (the list can change at runtime).
    pub remotes: Vec<Ipv4Addr>,
    /// IPv4 multicast group.
    pub group: Option<Ipv4Addr>,
    /// UDP port, local and remote.
    pub port: u16,
    /// Outer TTL (None: 64 unicast, 1 to a group).
    pub ttl: Option<u8>,
    /// Learn the remote VTEP of each MAC.
    pub learning: bool,
    /// Accept datagrams from senders that are not listed.
    pub accept_any: bool,
}

/// Checks a remote's address: a unicast host address.
pub fn check_remote(ip: Ipv4Addr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Err(format!(
            "a unicast IPv4 address ({ip} is not; a multicast group goes in `group`)"
        ));
    }
    Ok(())
}

/// Validates the vxlan keys of a port of `kind`: the settings of a vxlan port,
/// `None` for another kind (which must not have any of these keys).
pub fn validate(
    kind: PortKind,
    k: &VxlanKeys,
) -> Result<Option<VxlanSpec>, (&'static str, String)> {
    if kind != PortKind::Vxlan {
        let set = [
            ("vni", k.vni.is_some()),
            ("local", k.local.is_some()),
            ("remotes", !k.remotes.is_empty()),
            ("group", k.group.is_some()),
            ("port", k.port.is_some()),
            ("ttl", k.ttl.is_some()),
            ("learning", k.learning.is_some()),
            ("accept_any", k.accept_any.is_some()),
        ];
        crate::config::refuse_set_keys(&set, "no such key except for kind \"vxlan\"")?;
        return Ok(None);
    }
    let vni = match k.vni {
        Some(v) if (1..=MAX_VNI).contains(&v) => v,
        _ => return Err(("vni", "a VXLAN network identifier, 1..16777215".into())),
    };
    if let Some(l) = k.local {
        if l.is_multicast() || l.is_broadcast() {
            return Err(("local", "a unicast address of this host".into()));
        }
    }
    let mut remotes: Vec<Ipv4Addr> = Vec::new();
    for r in &k.remotes {
        check_remote(*r).map_err(|e| ("remotes", e))?;
        if remotes.contains(r) {
            return Err(("remotes", format!("each remote once ({r} is listed twice)")));
        }
        remotes.push(*r);
    }
    if let Some(g) = k.group {
        if !g.is_multicast() {
            return Err(("group", format!("an IPv4 multicast group ({g} is not)")));
        }
    }
    if remotes.is_empty() && k.group.is_none() && !k.accept_any.unwrap_or(false) {
        // Without a remote, a group or accept_any the port could never exchange
        // a frame; remotes may still be added at runtime, so say how.
        return Err((
            "remotes",
            "at least one remote VTEP (or a `group`, or `accept_any = true`; \
             `netd vxlan remote add` adds more at runtime)"
                .into(),
        ));
    }
    let port = k.port.unwrap_or(DEFAULT_PORT);
    if port == 0 {
        return Err(("port", "a UDP port, 1..65535".into()));
    }
    if k.ttl == Some(0) {
        return Err(("ttl", "a TTL of 1..255".into()));
    }
    Ok(Some(VxlanSpec {
        vni,
        local: k.local,
        remotes,
        group: k.group,
        port,
        ttl: k.ttl,
        learning: k.learning.unwrap_or(true),
        accept_any: k.accept_any.unwrap_or(false),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> VxlanKeys {
        VxlanKeys {
            vni: Some(42),
            remotes: vec![Ipv4Addr::new(192, 0, 2, 2)],
            ..VxlanKeys::default()
        }
    }

    #[test]
    fn defaults_follow_the_issue() {
        let s = validate(PortKind::Vxlan, &keys()).unwrap().unwrap();
        assert_eq!(s.port, 4789);
        assert!(s.learning);
        assert!(!s.accept_any);
        assert_eq!(s.vni, 42);
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = |f: &dyn Fn(&mut VxlanKeys)| {
            let mut k = keys();
            f(&mut k);
            validate(PortKind::Vxlan, &k).unwrap_err().0
        };
        assert_eq!(bad(&|k| k.vni = Some(0)), "vni");
        assert_eq!(bad(&|k| k.vni = Some(1 << 24)), "vni");
        assert_eq!(bad(&|k| k.vni = None), "vni");
        assert_eq!(
            bad(&|k| k.remotes = vec![Ipv4Addr::new(239, 1, 1, 1)]),
            "remotes"
        );
        assert_eq!(
            bad(&|k| k.remotes.push(Ipv4Addr::new(192, 0, 2, 2))),
            "remotes"
        );
        assert_eq!(bad(&|k| k.remotes.clear()), "remotes");
        assert_eq!(
            bad(&|k| k.group = Some(Ipv4Addr::new(192, 0, 2, 9))),
            "group"
        );
        assert_eq!(bad(&|k| k.port = Some(0)), "port");
        assert_eq!(bad(&|k| k.ttl = Some(0)), "ttl");
        // A group alone is enough.
        let mut k = keys();
        k.remotes.clear();
        k.group = Some(Ipv4Addr::new(239, 1, 1, 1));
        assert!(validate(PortKind::Vxlan, &k).is_ok());
        // Vxlan keys on another kind are refused by name.
        let e = validate(PortKind::Tap, &keys()).unwrap_err();
        assert_eq!(e.0, "vni");
        assert!(validate(PortKind::Tap, &VxlanKeys::default())
            .unwrap()
            .is_none());
    }
}
