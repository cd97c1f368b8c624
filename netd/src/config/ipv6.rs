//! The IPv6 keys of one `[[network]]` table: `subnet6` (a /64), `gateway6`,
//! `dns6`, `dhcp6_range` and `ipv6`. IPv6 is served on hostonly and internal
//! networks when `subnet6` is set. A NAT network has IPv6 by default, laid out as
//! slirp4netns `--enable-ipv6` does: `fd00::/64`, gateway `fd00::2`, DNS `fd00::3`
//! (`ipv6 = false` turns it off); its addresses come from SLAAC, so `dhcp6_range` is
//! refused there. A bridged network's IPv6 is the LAN's router's, so it refuses the
//! keys by name.

use std::net::Ipv6Addr;

use super::{ConfigError, Ctx, Ipv6Spec, Mode, NetworkConfig};

/// A NAT network's prefix when `subnet6` is not set (slirp4netns' layout).
pub const NAT_SUBNET6: &str = "fd00::/64";

/// Parses "ADDR/64" into the prefix with its host bits cleared.
fn parse_prefix64(s: &str) -> Option<Ipv6Addr> {
    let (a, p) = s.split_once('/')?;
    let a: Ipv6Addr = a.trim().parse().ok()?;
    if p.trim() != "64" {
        return None;
    }
    let mut o = a.octets();
    o[8..].fill(0);
    let prefix = Ipv6Addr::from(o);
    // Multicast, link-local and loopback prefixes cannot be a network's.
    let first = u16::from_be_bytes([o[0], o[1]]);
    if first & 0xff00 == 0xff00 || first & 0xffc0 == 0xfe80 || prefix.is_unspecified() {
        return None;
    }
    Some(prefix)
}

/// The address `::n` inside `prefix`.
fn host(prefix: Ipv6Addr, n: u64) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix) | u128::from(n))
}

impl NetworkConfig {
    /// Checks the IPv6 keys; `key` turns a key name into its dotted path.
    pub(super) fn validate_ipv6(
        &self,
        ctx: &Ctx<'_>,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Option<Ipv6Spec>, ConfigError> {
        if self.ipv6.is_some() && self.mode != Mode::Nat {
            return Err(ctx.err(
                key("ipv6"),
                "only on a nat network (others have IPv6 when `subnet6` is set)",
            ));
        }
        if self.ipv6 == Some(false) {
            if self.subnet6.is_some() {
                return Err(ctx.err(key("subnet6"), "no subnet6 with `ipv6 = false`"));
            }
            return Ok(None);
        }
        let nat_default =
            (self.mode == Mode::Nat && self.subnet6.is_none()).then(|| NAT_SUBNET6.to_string());
        let Some(subnet6) = self.subnet6.as_ref().or(nat_default.as_ref()) else {
            let set = [
                ("gateway6", self.gateway6.is_some()),
                ("dns6", self.dns6.is_some()),
                ("dhcp6_range", self.dhcp6_range.is_some()),
            ];
            if let Some((k, _)) = set.iter().find(|(_, s)| *s) {
                return Err(ctx.err(key(k), "no such key without `subnet6`"));
            }
            return Ok(None);
        };
        match self.mode {
            Mode::Hostonly | Mode::Internal => {}
            Mode::Nat => {
                if self.dhcp6_range.is_some() {
                    return Err(ctx.err(
                        key("dhcp6_range"),
                        "no stateful DHCPv6 on a nat network (guests take SLAAC addresses)",
                    ));
                }
            }
            Mode::Bridged => {
                return Err(ctx.err(
                    key("subnet6"),
                    "no subnet6 on a bridged network (the LAN's router serves IPv6)",
                ))
            }
        }
        let prefix = parse_prefix64(subnet6).ok_or_else(|| {
            ctx.err(
                key("subnet6"),
                "a unicast IPv6 /64 such as \"fd42:0:0:1::/64\"",
            )
        })?;
        let v6 = |a: Ipv6Addr| a.octets()[..8] == prefix.octets()[..8];
        let nat = self.mode == Mode::Nat;
        let gateway = self
            .gateway6
            .unwrap_or_else(|| host(prefix, if nat { 2 } else { 1 }));
        if !v6(gateway) || gateway == prefix {
            return Err(ctx.err(
                key("gateway6"),
                format!("a host address inside {prefix}/64"),
            ));
        }
        // The NAT router answers DNS at its own address, inside the prefix.
        let dns6 = match self.dns6 {
            None if nat => Some(host(prefix, 3)),
            d => d,
        };
        if let Some(d) = dns6 {
            let o = d.octets();
            if d.is_unspecified() || d.is_loopback() || o[0] == 0xff {
                return Err(ctx.err(key("dns6"), "a unicast IPv6 address"));
            }
            if nat && (!v6(d) || d == prefix || d == gateway) {
                return Err(ctx.err(
                    key("dns6"),
                    format!("a host address inside {prefix}/64 other than the gateway"),
                ));
            }
        }
        let range = match &self.dhcp6_range {
            None => None,
            Some(r) => {
                let (a, b) = ctx.range::<Ipv6Addr>(
                    r,
                    key("dhcp6_range"),
                    "\"A-B\" with two IPv6 addresses",
                )?;
                let g = u128::from(gateway);
                if !v6(a)
                    || !v6(b)
                    || u128::from(a) > u128::from(b)
                    || a == prefix
                    || (u128::from(a)..=u128::from(b)).contains(&g)
                {
                    return Err(ctx.err(
                        key("dhcp6_range"),
                        format!(
                            "an ascending range of host addresses inside {prefix}/64, \
                             without the gateway {gateway}"
                        ),
                    ));
                }
                Some((a, b))
            }
        };
        let lease_time = self.lease_time.unwrap_or(86_400).max(60);
        Ok(Some(Ipv6Spec {
            prefix,
            gateway,
            dns: dns6,
            range,
            lease_time,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn v(extra: &str, mode: &str) -> Result<Option<Ipv6Spec>, ConfigError> {
        let text =
            format!("control='/c'\nstate_dir='/s'\n[[network]]\nname='h'\nmode='{mode}'\n{extra}");
        let cfg = super::super::Config::parse(&text, Path::new("t.toml"))?;
        cfg.validate(Path::new("t.toml"))
            .map(|mut n| n.remove(0).ipv6)
    }

    #[test]
    fn defaults_and_checks_name_the_key() {
        let s = v("subnet6='fd42:0:0:1::5/64'\n", "hostonly")
            .unwrap()
            .unwrap();
        assert_eq!(s.prefix, "fd42:0:0:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(s.gateway, "fd42:0:0:1::1".parse::<Ipv6Addr>().unwrap());
        assert!(s.range.is_none() && s.dns.is_none());
        assert!(v("", "hostonly").unwrap().is_none());
        let s = v(
            "subnet6='fd42::/64'\ndns6='fd42::53'\ndhcp6_range='fd42::100-fd42::1ff'\n",
            "internal",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.range.unwrap().1, "fd42::1ff".parse::<Ipv6Addr>().unwrap());
        // NAT: IPv6 by default, slirp4netns' layout; `ipv6 = false` turns it off.
        let s = v("", "nat").unwrap().unwrap();
        let a = |t: &str| t.parse::<Ipv6Addr>().unwrap();
        assert_eq!((s.prefix, s.gateway), (a("fd00::"), a("fd00::2")));
        assert_eq!(s.dns, Some(a("fd00::3")));
        assert!(v("ipv6=false\n", "nat").unwrap().is_none());
        let s = v("subnet6='fd42:1::/64'\n", "nat").unwrap().unwrap();
        assert_eq!((s.gateway, s.dns), (a("fd42:1::2"), Some(a("fd42:1::3"))));
        for (extra, mode, k) in [
            ("subnet6='fd42::/48'\n", "hostonly", "network[0].subnet6"),
            ("subnet6='fe80::/64'\n", "hostonly", "network[0].subnet6"),
            (
                "subnet6='fd42::/64'\ndhcp6_range='fd42::100-fd42::1ff'\n",
                "nat",
                "network[0].dhcp6_range",
            ),
            (
                "subnet6='fd42::/64'\ndns6='fd43::3'\n",
                "nat",
                "network[0].dns6",
            ),
            ("ipv6=false\n", "hostonly", "network[0].ipv6"),
            (
                "ipv6=false\nsubnet6='fd42::/64'\n",
                "nat",
                "network[0].subnet6",
            ),
            ("gateway6='fd42::1'\n", "hostonly", "network[0].gateway6"),
            (
                "subnet6='fd42::/64'\ngateway6='fd43::1'\n",
                "internal",
                "network[0].gateway6",
            ),
            (
                "subnet6='fd42::/64'\ndhcp6_range='fd42::1-fd42::9'\n",
                "internal",
                "network[0].dhcp6_range",
            ),
            (
                "subnet6='fd42::/64'\ndhcp6_range='fd42::9-fd42::5'\n",
                "internal",
                "network[0].dhcp6_range",
            ),
            (
                "subnet6='fd42::/64'\ndns6='ff02::1'\n",
                "internal",
                "network[0].dns6",
            ),
        ] {
            let e = v(extra, mode).unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains(k), "{extra}: {e}");
        }
    }
}
