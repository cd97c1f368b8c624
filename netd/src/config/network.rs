//! The checks of one `[[network]]` table and of one port: the keys the network's
//! mode allows ([`crate::modes`]), its addresses, DHCP range and reservations, the
//! defaults of its mode, and every port's kind-specific keys. The control API
//! validates a runtime port with [`validate_port`] and the same error text as the
//! file.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use super::{
    offset, parse_cidr, parse_mac, prefix_mask, valid_name, Bound, ConfigError, Ctx, DhcpSpec,
    Ipv4Spec, Mode, NetworkConfig, NetworkSpec, PortConfig, PortKind, PortSpec,
};

/// `mtu`: payload bytes, as `ip link` shows them.
const MTU: Bound<u32> = Bound(1500, 68..=65521, "an MTU between 68 and 65521");
/// `max_macs`.
const MAX_MACS: Bound<usize> = Bound(4096, 1..=1_000_000, "between 1 and 1000000");
/// `max_macs_per_port`.
const MAX_MACS_PER_PORT: Bound<usize> = Bound(256, 1..=1_000_000, "between 1 and 1000000");
/// `mac_ageing`, seconds.
const MAC_AGEING: Bound<u64> = Bound(300, 1..=86_400, "between 1 and 86400 seconds");

impl NetworkConfig {
    /// Validates this network alone (the control API uses `<api>` as path).
    pub fn validate_at(&self, p: &str, at: &str) -> Result<NetworkSpec, ConfigError> {
        let ctx = Ctx { path: p };
        let key = |k: &str| sub_key(at, k);
        if !valid_name(&self.name) {
            return Err(ctx.err(key("name"), "1 to 64 characters of [A-Za-z0-9._-]"));
        }
        let hostonly = self.mode == Mode::Hostonly;
        let nat = self.mode == Mode::Nat;
        crate::modes::check_mode_keys(self).map_err(|(k, e)| ctx.err(key(k), e))?;
        let subnet = match (&self.subnet, hostonly) {
            (None, false) if nat => Some(crate::modes::NAT_SUBNET),
            (Some(s), _) => Some(parse_cidr(s).ok_or_else(|| {
                ctx.err(
                    key("subnet"),
                    "an IPv4 CIDR such as \"192.168.56.0/24\" (prefix 1..30)",
                )
            })?),
            (None, true) => Some((Ipv4Addr::new(192, 168, 56, 0), 24)),
            (None, false) => None,
        };
        let ipv4 = match subnet {
            Some((a, prefix)) => {
                let mask = prefix_mask(prefix);
                let network = Ipv4Addr::from(u32::from(a) & u32::from(mask));
                let first = if nat { 2 } else { 1 };
                let gateway = match self.gateway {
                    Some(g) => g,
                    None => offset(network, first).ok_or_else(|| {
                        ctx.err(key("subnet"), "a subnet with room for the gateway")
                    })?,
                };
                let spec = Ipv4Spec {
                    network,
                    prefix,
                    gateway,
                };
                if !spec.contains(gateway) || gateway == network || gateway == spec.broadcast() {
                    return Err(ctx.err(
                        key("gateway"),
                        format!("a host address inside {}/{}", network, prefix),
                    ));
                }
                Some(spec)
            }
            None => {
                if self.gateway.is_some() {
                    return Err(ctx.err(key("subnet"), "a subnet when `gateway` is set"));
                }
                None
            }
        };
        let dhcp_on = self.dhcp.unwrap_or(hostonly || nat);
        let dhcp = if dhcp_on {
            let Some(v4) = &ipv4 else {
                return Err(ctx.err(key("subnet"), "a subnet when `dhcp = true`"));
            };
            let (start, end) = match &self.dhcp_range {
                Some(r) => {
                    ctx.range::<Ipv4Addr>(r, key("dhcp_range"), "\"A-B\" with two IPv4 addresses")?
                }
                None => {
                    let net = u32::from(v4.network);
                    let bcast = u32::from(v4.broadcast());
                    // VirtualBox: .101 up to .254 on a /24; on smaller subnets the upper half.
                    // Checked arithmetic: a subnet at the top of the address space
                    // must not wrap (or panic) its way to a range.
                    let size = bcast.checked_sub(net);
                    let start = size.and_then(|size| {
                        if nat && size > 32 {
                            // VirtualBox NAT: guests from .15.
                            net.checked_add(15)
                        } else if size > 200 {
                            net.checked_add(101)
                        } else {
                            net.checked_add(size / 2)
                        }
                    });
                    match (start, bcast.checked_sub(1)) {
                        (Some(a), Some(b)) => (Ipv4Addr::from(a), Ipv4Addr::from(b)),
                        _ => {
                            return Err(ctx.err(
                                key("subnet"),
                                "a subnet with room for a DHCP range (give `dhcp_range`)",
                            ))
                        }
                    }
                }
            };
            if !v4.contains(start)
                || !v4.contains(end)
                || u32::from(start) > u32::from(end)
                || start == v4.network
                || end == v4.broadcast()
            {
                return Err(ctx.err(
                    key("dhcp_range"),
                    format!(
                        "an ascending range of host addresses inside {}/{}",
                        v4.network, v4.prefix
                    ),
                ));
            }
            let server = match self.dhcp_server {
                Some(s) => s,
                None if hostonly => match offset(v4.network, 100) {
                    Some(hundred)
                        if v4.prefix <= 24
                            && !(u32::from(start)..=u32::from(end))
                                .contains(&u32::from(hundred))
                            && hundred != v4.gateway =>
                    {
                        hundred
                    }
                    _ => v4.gateway,
                },
                None => v4.gateway,
            };
            if !v4.contains(server)
                || server == v4.network
                || server == v4.broadcast()
                || (u32::from(start)..=u32::from(end)).contains(&u32::from(server))
            {
                return Err(ctx.err(
                    key("dhcp_server"),
                    format!(
                        "a host address inside {}/{} outside dhcp_range",
                        v4.network, v4.prefix
                    ),
                ));
            }
            let mut reservations = Vec::new();
            for (k, r) in self.reservation.iter().enumerate() {
                let mac = parse_mac(&r.mac).ok_or_else(|| {
                    ctx.err(
                        key(&format!("reservation[{k}].mac")),
                        "a MAC such as \"52:54:00:12:34:56\"",
                    )
                })?;
                if !v4.contains(r.ip)
                    || r.ip == v4.gateway
                    || r.ip == v4.network
                    || r.ip == v4.broadcast()
                {
                    return Err(ctx.err(
                        key(&format!("reservation[{k}].ip")),
                        format!("a free host address inside {}/{}", v4.network, v4.prefix),
                    ));
                }
                if r.hostname.as_deref().is_some_and(|h| !valid_hostname(h)) {
                    return Err(ctx.err(
                        key(&format!("reservation[{k}].hostname")),
                        "a host name: labels of 1 to 63 letters, digits or '-', 253 bytes at most",
                    ));
                }
                reservations.push(super::DhcpReservation {
                    mac,
                    ip: r.ip,
                    hostname: r.hostname.clone(),
                });
            }
            let lease_time = self.lease_time.unwrap_or(86_400);
            if lease_time < 60 {
                return Err(ctx.err(key("lease_time"), "at least 60 seconds"));
            }
            Some(DhcpSpec {
                server,
                start,
                end,
                lease_time,
                dns: crate::modes::dhcp_dns(self, v4),
                // Internal and host-only networks route nowhere: no router option;
                // a NAT network's router is the gateway.
                router: nat.then_some(v4.gateway),
                reservations,
                domain: None,
            })
        } else {
            if self.dhcp_range.is_some()
                || self.dhcp_server.is_some()
                || !self.reservation.is_empty()
            {
                return Err(ctx.err(
                    key("dhcp"),
                    "true when `dhcp_range` or reservations are given",
                ));
            }
            None
        };
        let mtu = ctx.bounded(key("mtu"), self.mtu, &MTU)?;
        let max_macs = ctx.bounded(key("max_macs"), self.max_macs, &MAX_MACS)?;
        let mac_ageing = ctx.bounded(key("mac_ageing"), self.mac_ageing, &MAC_AGEING)?;
        let max_macs_per_port = ctx.bounded(
            key("max_macs_per_port"),
            self.max_macs_per_port,
            &MAX_MACS_PER_PORT,
        )?;
        let host_ifname = if hostonly {
            let h = self.host_ifname.clone().unwrap_or_else(|| {
                let mut s = format!("vh-{}", self.name);
                s.truncate(15);
                s
            });
            crate::sys::check_ifname(&h)
                .map_err(|_| ctx.err(key("host_ifname"), "an interface name of 1 to 15 bytes"))?;
            Some(h)
        } else {
            if self.host_ifname.is_some() {
                return Err(ctx.err(
                    key("host_ifname"),
                    "no host_ifname outside mode \"hostonly\"",
                ));
            }
            None
        };
        let mut ports = Vec::new();
        let mut pnames = HashSet::new();
        for (j, pc) in self.port.iter().enumerate() {
            let ps = validate_port(pc, p, &key(&format!("port[{j}]")))?;
            if !pnames.insert(ps.name.clone()) {
                return Err(ctx.err(
                    key(&format!("port[{j}].name")),
                    format!(
                        "a port name unique in the network ({:?} is used twice)",
                        ps.name
                    ),
                ));
            }
            ports.push(ps);
        }
        let services = self.services.unwrap_or(true);
        if !services && self.dhcp == Some(true) {
            return Err(ctx.err(
                key("dhcp"),
                "false or absent when `services = false` (another host serves the network)",
            ));
        }
        let mut dhcp = dhcp;
        let dns = crate::modes::dns_spec(self, ipv4.as_ref(), dhcp.as_ref())
            .map_err(|(k, e)| ctx.err(key(&k), e))?;
        if let (Some(d), Some(z)) = (dhcp.as_mut(), &dns) {
            d.domain = Some(z.zone.domain.clone());
        }
        let nat_spec = match (&ipv4, nat) {
            (Some(v4), true) => Some(
                crate::modes::router_config(self, v4, mtu).map_err(|(k, e)| ctx.err(key(&k), e))?,
            ),
            _ => None,
        };
        let ipv6 = self.validate_ipv6(&ctx, &key)?;
        // A pure switch here: the services of a network that spans hosts run on one.
        let mut nat_spec = nat_spec;
        if let Some(n) = nat_spec.as_mut() {
            n.ipv6 = ipv6.clone();
            for (i, f) in n.forwards.iter().enumerate() {
                if f.guest.is_ipv6() {
                    n.check_forward(f).map_err(|e| {
                        ctx.err(
                            key(&format!("forward[{i}].guest")),
                            format!("an address of the network's IPv6 prefix ({e})"),
                        )
                    })?;
                }
            }
        }
        let (dhcp, nat_spec, host_ifname, dns, ipv6) = if services {
            (dhcp, nat_spec, host_ifname, dns, ipv6)
        } else {
            (None, None, None, None, None)
        };
        Ok(NetworkSpec {
            ipv6,
            dns,
            services,
            nat: nat_spec,
            uplink: self.uplink.clone(),
            isolated: self.isolated.unwrap_or(false),
            name: self.name.clone(),
            mode: self.mode,
            ipv4,
            dhcp,
            mtu,
            max_macs,
            mac_ageing,
            guard: self.guard.unwrap_or_default(),
            max_macs_per_port,
            host_ifname,
            ports,
        })
    }
}

/// The key `k` under the table `at` (`network[0]` and `mtu`: `network[0].mtu`); a
/// table that is a file of its own (`netd net add --from FILE`) has `at` empty.
pub(super) fn sub_key(at: &str, k: &str) -> String {
    if at.is_empty() {
        k.to_string()
    } else {
        format!("{at}.{k}")
    }
}

/// A DNS host name: dot-separated labels of letters, digits and '-' (not at either
/// end of a label), 1 to 63 bytes each, 253 in all (RFC 1123).
pub(crate) fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Validates one port; `path` names the source, `at` the key prefix.
pub fn validate_port(port: &PortConfig, path: &str, at: &str) -> Result<PortSpec, ConfigError> {
    let ctx = Ctx { path };
    let key = |k: &str| sub_key(at, k);
    let ifname = match (&port.ifname, port.kind) {
        (Some(i), PortKind::Tap | PortKind::Vm) => {
            crate::sys::check_ifname(i).map_err(|_| {
                ctx.err(
                    key("ifname"),
                    "an interface name of 1 to 15 bytes, no '/' or spaces",
                )
            })?;
            Some(i.clone())
        }
        (None, PortKind::Tap | PortKind::Vm) => {
            return Err(ctx.err(key("ifname"), "a TAP name for kind \"tap\" or \"vm\""))
        }
        (Some(_), PortKind::Stream) => {
            return Err(ctx.err(key("ifname"), "no ifname for kind \"stream\" (use `path`)"))
        }
        (None, PortKind::Stream | PortKind::Vxlan) => None,
        (Some(_), PortKind::Vxlan) => {
            return Err(ctx.err(key("ifname"), "no ifname for kind \"vxlan\""))
        }
    };
    let vxlan = crate::port::vxlan::validate(port.kind, &port.vxlan)
        .map_err(|(k, e)| ctx.err(key(k), e))?;
    let path_v = match (&port.path, port.kind) {
        (Some(p), PortKind::Stream) => {
            if !p.is_absolute() {
                return Err(ctx.err(key("path"), "an absolute unix socket path"));
            }
            Some(p.clone())
        }
        (None, PortKind::Stream) => {
            return Err(ctx.err(key("path"), "a unix socket path for kind \"stream\""))
        }
        (Some(_), _) => return Err(ctx.err(key("path"), "no path except for kind \"stream\"")),
        (None, _) => None,
    };
    if port.netns.is_some() && port.kind != PortKind::Tap {
        return Err(ctx.err(key("netns"), "no netns except for kind \"tap\""));
    }
    if let Some(ns) = &port.netns {
        if ns.is_empty() || ns.contains('/') || ns.len() > 255 {
            return Err(ctx.err(key("netns"), "the name of a namespace under /run/netns"));
        }
    }
    let mac = match &port.mac {
        Some(m) => {
            let mac = parse_mac(m)
                .ok_or_else(|| ctx.err(key("mac"), "a MAC such as \"52:54:00:12:34:56\""))?;
            if mac[0] & 1 == 1 {
                return Err(ctx.err(
                    key("mac"),
                    "a unicast MAC (lowest bit of the first byte clear)",
                ));
            }
            Some(mac)
        }
        None => None,
    };
    let name = match &port.name {
        Some(n) => n.clone(),
        None if vxlan.is_some() => format!("vxlan{}", vxlan.as_ref().map_or(0, |v| v.vni)),
        None => ifname
            .clone()
            .or_else(|| path_v.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_default(),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(ctx.err(key("name"), "a port name of 1 to 255 characters"));
    }
    Ok(PortSpec {
        name,
        kind: port.kind,
        ifname,
        mac,
        netns: port.netns.clone(),
        path: path_v,
        persistent: port.persistent,
        guard: port.guard,
        vxlan,
    })
}
