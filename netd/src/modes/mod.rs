//! The `nat` and `bridged` network modes: their config rules (the uplink port itself
//! is [`crate::port::start_uplink`]), and the DNS of every mode that serves one
//! (`dns.rs`: the responder of hostonly and internal networks).
//!
//! # Theory of operation
//!
//! A mode is a preset of ports and services on the same learning switch:
//!
//! - `nat`: a NAT router ([`crate::nat`]) attached as a service port, the DHCP server
//!   handing out the router as gateway and the router's DNS forwarder as resolver.
//!   Defaults follow VirtualBox: 10.0.2.0/24, router .2, DNS .3, guests from .15.
//!   `isolated = true` makes the switch forward a port's frames only to the services,
//!   so each VM is alone with the router (VirtualBox "NAT"); otherwise VMs on the
//!   network see each other ("NAT Network").
//! - `bridged`: an `uplink` port on a host NIC, through an AF_PACKET socket in
//!   promiscuous mode: VMs' frames go out on the LAN with their own MACs, the LAN's
//!   frames for them come in, and the LAN's DHCP server gives them addresses. Frames
//!   between VMs on this host stay in the switch (the uplink is just another port
//!   that learns the LAN's MACs). The host keeps using the NIC: the AF_PACKET socket
//!   ignores the host's own outgoing frames, and the kernel still receives what is
//!   addressed to the host. The socket carries virtio-net headers, so a frame whose
//!   checksum was left to "hardware" (a veth or bridge peer) or a coalesced TCP
//!   super-frame arrives with what is needed to finish it (see [`crate::offload`]).
//!
//! - `hostonly`, `internal` with `dns`: a small DNS responder ([`dns`]) on that
//!   address answers the network's guest names and forwards the rest to the host's
//!   resolver, as the NAT router's DNS address does (see [`crate::dns`]).
//!
//! Keys that belong to one mode are refused on the others with an error naming the
//! key, so a typo'd mode does not silently run without its router or uplink.

use std::net::Ipv4Addr;

use crate::config::{refuse_set_keys, DhcpSpec, DnsSpec, Ipv4Spec, Mode, NetworkConfig};
use crate::nat::{Cidr, Limits, RouterConfig};
use fabric_api::netd::PolicyList;

pub mod dns;

/// Default subnet of a NAT network (VirtualBox's).
pub const NAT_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 0, 2, 0), 24);

/// Refuses keys that make no sense in the network's mode: `(key, expected)`.
pub fn check_mode_keys(n: &NetworkConfig) -> Result<(), (&'static str, String)> {
    let nat = n.mode == Mode::Nat;
    let bridged = n.mode == Mode::Bridged;
    if !nat {
        let only_nat = [
            ("forward", !n.forward.is_empty()),
            ("isolated", n.isolated.is_some()),
            ("max_flows", n.max_flows.is_some()),
            ("max_flow_memory", n.max_flow_memory.is_some()),
            ("max_flows_per_guest", n.max_flows_per_guest.is_some()),
            ("max_pending_per_guest", n.max_pending_per_guest.is_some()),
            ("host_loopback", n.host_loopback.is_some()),
            ("outbound_allow", n.outbound_allow.is_some()),
            ("outbound_deny", n.outbound_deny.is_some()),
        ];
        refuse_set_keys(&only_nat, "no such key outside mode \"nat\"")?;
    }
    if bridged && n.dns.is_some() {
        return Err((
            "dns",
            "no dns on a bridged network (the LAN's DNS serves its VMs)".into(),
        ));
    }
    if !nat && n.dns.is_none() {
        let need_dns = [
            ("resolv_conf", n.resolv_conf.is_some()),
            ("domain", n.domain.is_some()),
            ("host", !n.host.is_empty()),
        ];
        refuse_set_keys(
            &need_dns,
            "no such key without `dns` (the address the network serves DNS on)",
        )?;
    }
    if bridged {
        match &n.uplink {
            None => {
                return Err((
                    "uplink",
                    "the host NIC of a bridged network, e.g. uplink = \"eth0\"".into(),
                ))
            }
            Some(u) => {
                if crate::sys::check_ifname(u).is_err() {
                    return Err(("uplink", "an interface name of 1 to 15 bytes".into()));
                }
            }
        }
        if n.dhcp == Some(true) {
            return Err((
                "dhcp",
                "false on a bridged network (the LAN's DHCP server serves its VMs)".into(),
            ));
        }
        if n.subnet.is_some() || n.gateway.is_some() {
            return Err((
                "subnet",
                "no subnet or gateway on a bridged network (the LAN's)".into(),
            ));
        }
    } else if n.uplink.is_some() {
        return Err(("uplink", "no uplink outside mode \"bridged\"".into()));
    }
    Ok(())
}

/// The DNS forwarder's address: as configured, else the gateway's next address
/// (checked: past 255.255.255.255 it is the broadcast, which `router_config` refuses
/// naming `dns`).
fn dns_addr(n: &NetworkConfig, v4: &Ipv4Spec) -> Ipv4Addr {
    n.dns
        .unwrap_or_else(|| crate::config::offset(v4.gateway, 1).unwrap_or(Ipv4Addr::BROADCAST))
}

/// The DNS servers DHCP announces: as configured, else the NAT DNS forwarder on a
/// NAT network, else the network's own DNS address (`dns`) if it has one.
pub fn dhcp_dns(n: &NetworkConfig, v4: &Ipv4Spec) -> Vec<Ipv4Addr> {
    if !n.dhcp_dns.is_empty() {
        n.dhcp_dns.clone()
    } else if n.mode == Mode::Nat {
        vec![dns_addr(n, v4)]
    } else {
        n.dns.into_iter().collect()
    }
}

/// The guest-name DNS of a network that serves DNS (every NAT network; a hostonly
/// or internal one with `dns`), else None; errors are `(key, expected)`.
pub fn dns_spec(
    n: &NetworkConfig,
    v4: Option<&Ipv4Spec>,
    dhcp: Option<&DhcpSpec>,
) -> Result<Option<DnsSpec>, (String, String)> {
    let nat = n.mode == Mode::Nat;
    if !nat && n.dns.is_none() {
        return Ok(None);
    }
    let Some(v4) = v4 else {
        return Err(("subnet".into(), "a subnet when `dns` is set".into()));
    };
    let inside = format!("{}/{}", v4.network, v4.prefix);
    let addr = dns_addr(n, v4);
    if !nat {
        let host_addr = v4.contains(addr) && addr != v4.network && addr != v4.broadcast();
        let taken = dhcp.is_some_and(|d| {
            addr == d.server
                || (u32::from(d.start)..=u32::from(d.end)).contains(&u32::from(addr))
                || d.reservations.iter().any(|r| r.ip == addr)
        });
        if !host_addr || taken {
            return Err((
                "dns".into(),
                format!("a host address inside {inside}, not the DHCP server's, outside dhcp_range and reservations (e.g. the gateway, {})", v4.gateway),
            ));
        }
    }
    let domain = match &n.domain {
        Some(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        None => format!("{}.lab", n.name).to_ascii_lowercase(),
    };
    if !crate::dns::valid_domain(&domain) {
        let what = if n.domain.is_some() {
            ""
        } else {
            " (the default NAME.lab is not one here: give `domain`)"
        };
        return Err((
            "domain".into(),
            format!(
                "a DNS domain of labels of letters, digits, '-' and '_', at most 190 bytes{what}"
            ),
        ));
    }
    if n.host.len() > crate::dns::MAX_STATIC_HOSTS {
        return Err((
            "host".into(),
            format!("at most {} entries", crate::dns::MAX_STATIC_HOSTS),
        ));
    }
    let mut hosts: Vec<(String, Ipv4Addr)> = Vec::new();
    for (k, h) in n.host.iter().enumerate() {
        let name = h.name.to_ascii_lowercase();
        if !crate::dns::valid_label(&name) {
            return Err((
                format!("host[{k}].name"),
                "one DNS label: 1 to 63 letters, digits and '-', no '-' first or last".into(),
            ));
        }
        if hosts.iter().any(|(n, _)| *n == name) {
            return Err((
                format!("host[{k}].name"),
                format!("a name used once ({name:?} is used twice)"),
            ));
        }
        if !v4.contains(h.ip) || h.ip == v4.network || h.ip == v4.broadcast() {
            return Err((
                format!("host[{k}].ip"),
                format!("a host address inside {inside}"),
            ));
        }
        hosts.push((name, h.ip));
    }
    Ok(Some(DnsSpec {
        addr,
        zone: crate::dns::Zone {
            domain,
            hosts,
            subnet: (v4.network, v4.prefix),
        },
        resolv_conf: n
            .resolv_conf
            .clone()
            .unwrap_or_else(|| crate::nat::RouterConfig::defaults().resolv_conf),
    }))
}

/// The router settings of a NAT network; errors are `(key, expected)`.
pub fn router_config(
    n: &NetworkConfig,
    v4: &Ipv4Spec,
    mtu: u32,
) -> Result<RouterConfig, (String, String)> {
    let mut c = RouterConfig::defaults();
    c.subnet = (v4.network, v4.prefix);
    c.gateway = v4.gateway;
    c.dns = dns_addr(n, v4);
    c.mtu = mtu as usize;
    if let Some(p) = &n.resolv_conf {
        c.resolv_conf = p.clone();
    }
    c.forwards = n.forward.clone();
    let d = Limits::default();
    c.limits.max_flows = n.max_flows.unwrap_or(d.max_flows);
    c.limits.max_flow_memory = n.max_flow_memory.unwrap_or(d.max_flow_memory);
    if c.limits.max_flows == 0 {
        return Err(("max_flows".into(), "at least 1".into()));
    }
    c.limits.max_flows_per_guest = n.max_flows_per_guest.unwrap_or(d.max_flows_per_guest);
    c.limits.max_pending_per_guest = n.max_pending_per_guest.unwrap_or(d.max_pending_per_guest);
    for (k, v) in [
        ("max_flows_per_guest", c.limits.max_flows_per_guest),
        ("max_pending_per_guest", c.limits.max_pending_per_guest),
    ] {
        if v == 0 {
            return Err((k.into(), "at least 1".into()));
        }
    }
    c.host_loopback = n.host_loopback.unwrap_or(false);
    let cidrs = |key: &str, l: &Option<Vec<String>>| -> Result<Vec<Cidr>, (String, String)> {
        l.iter()
            .flatten()
            .enumerate()
            .map(|(i, s)| crate::nat::parse_cidr_any(s).map_err(|e| (format!("{key}[{i}]"), e)))
            .collect()
    };
    for a in cidrs("outbound_allow", &n.outbound_allow)? {
        c.outbound_edit(PolicyList::Allow, a, true);
    }
    for d in cidrs("outbound_deny", &n.outbound_deny)? {
        c.outbound_edit(PolicyList::Deny, d, true);
    }
    if c.limits.max_flow_memory < 2 * c.limits.tcp_buffer {
        return Err((
            "max_flow_memory".into(),
            format!("at least {} bytes (one TCP flow)", 2 * c.limits.tcp_buffer),
        ));
    }
    if c.dns == c.gateway || !v4.contains(c.dns) || c.dns == v4.broadcast() {
        return Err((
            "dns".into(),
            format!(
                "an address inside {}/{} other than the gateway",
                v4.network, v4.prefix
            ),
        ));
    }
    for (i, f) in c.forwards.iter().enumerate() {
        // IPv6 guests are checked once the network's IPv6 is known (`subnet6`).
        if matches!(f.guest.ip(), std::net::IpAddr::V4(a) if !v4.contains(a)) {
            return Err((
                format!("forward[{i}].guest"),
                format!("an address inside {}/{}", v4.network, v4.prefix),
            ));
        }
    }
    // IPv6 forwards are checked by the caller once the network's IPv6 is known.
    c.forwards.retain(|f| f.guest.is_ipv4());
    c.validate().map_err(|e| ("mtu".into(), e.to_string()))?;
    c.forwards = n.forward.clone();
    Ok(c)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn v(text: &str) -> Result<Vec<crate::config::NetworkSpec>, String> {
        crate::test_util::validate_config(text).map_err(|e| e.to_string())
    }

    /// The NAT hardening keys (issue 11): defaults, parsing, the subnets of the
    /// other networks denied, and errors that name the key.
    #[test]
    fn nat_policy_keys_and_other_subnets_denied() {
        let base = "control='/c'\nstate_dir='/s'\n";
        let s = v(&format!("{base}[[network]]\nname='n'\nmode='nat'\n[[network]]\nname='h'\nmode='hostonly'\n[[network]]\nname='i'\nmode='internal'\nsubnet='10.9.0.0/16'\n")).unwrap();
        let nat = s[0].nat.as_ref().unwrap();
        assert!(!nat.host_loopback);
        assert_eq!(nat.limits.max_flows_per_guest, 256);
        let deny: Vec<String> = nat
            .outbound_deny
            .iter()
            .map(crate::nat::show_cidr)
            .collect();
        assert_eq!(deny, ["169.254.0.0/16", "192.168.56.0/24", "10.9.0.0/16"]);
        let s = v(&format!("{base}[[network]]\nname='n'\nmode='nat'\nhost_loopback=true\nmax_flows_per_guest=8\nmax_pending_per_guest=2\noutbound_allow=['0.0.0.0/0']\noutbound_deny=['198.51.100.0/24']\n")).unwrap();
        let nat = s[0].nat.as_ref().unwrap();
        assert!(nat.host_loopback);
        assert_eq!(
            (
                nat.limits.max_flows_per_guest,
                nat.limits.max_pending_per_guest
            ),
            (8, 2)
        );
        assert_eq!(nat.outbound_allow.len(), 1);
        assert_eq!(nat.outbound_deny.len(), 2, "default kept, entry added");
        let e = v(&format!(
            "{base}[[network]]\nname='n'\nmode='nat'\noutbound_deny=['10.0.0.1/8']\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("t.toml") && e.contains("outbound_deny[0]") && e.contains("10.0.0.0/8"),
            "{e}"
        );
        let e = v(&format!(
            "{base}[[network]]\nname='n'\nmode='nat'\nmax_flows_per_guest=0\n"
        ))
        .unwrap_err();
        assert!(e.contains("max_flows_per_guest"), "{e}");
        let e = v(&format!(
            "{base}[[network]]\nname='n'\nmode='hostonly'\nhost_loopback=true\n"
        ))
        .unwrap_err();
        assert!(e.contains("host_loopback"), "{e}");
    }

    #[test]
    fn nat_defaults_follow_virtualbox() {
        let s = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='nat'\n").unwrap();
        let n = &s[0];
        let nat = n.nat.as_ref().unwrap();
        assert_eq!(nat.gateway.to_string(), "10.0.2.2");
        assert_eq!(nat.dns.to_string(), "10.0.2.3");
        let d = n.dhcp.as_ref().unwrap();
        assert_eq!(d.start.to_string(), "10.0.2.15");
        assert_eq!(d.router.unwrap().to_string(), "10.0.2.2");
        assert_eq!(d.dns[0].to_string(), "10.0.2.3");
        assert!(!n.isolated);
    }

    /// Guest-name DNS keys (issue 17): defaults, where they are allowed, and
    /// errors that name the key.
    #[test]
    fn dns_keys_defaults_and_errors() {
        let base = "control='/c'\nstate_dir='/s'\n[[network]]\n";
        let s = v(&format!(
            "{base}name='Nat0'\nmode='nat'\n[[network.host]]\nname='Files'\nip='10.0.2.9'\n"
        ))
        .unwrap();
        let d = s[0].dns.as_ref().unwrap();
        assert_eq!(
            (d.addr.to_string(), d.zone.domain.as_str()),
            ("10.0.2.3".into(), "nat0.lab")
        );
        assert_eq!(
            d.zone.hosts,
            [("files".to_string(), "10.0.2.9".parse().unwrap())]
        );
        assert_eq!(
            s[0].dhcp.as_ref().unwrap().domain.as_deref(),
            Some("nat0.lab")
        );
        let s = v(&format!(
            "{base}name='h'\nmode='hostonly'\ndns='192.168.56.1'\ndomain='Lab.Example.'\n"
        ))
        .unwrap();
        assert_eq!(s[0].dns.as_ref().unwrap().zone.domain, "lab.example");
        assert_eq!(
            s[0].dhcp.as_ref().unwrap().dns[0].to_string(),
            "192.168.56.1"
        );
        assert!(v(&format!("{base}name='h'\nmode='hostonly'\n")).unwrap()[0]
            .dns
            .is_none());
        for (keys, key) in [
            ("mode='hostonly'\ndomain='x.lab'", "network[0].domain"),
            ("mode='internal'\nsubnet='10.9.0.0/24'\n[[network.host]]\nname='a'\nip='10.9.0.5'", "network[0].host"),
            ("mode='hostonly'\ndns='192.168.56.100'", "network[0].dns"),
            ("mode='hostonly'\ndns='192.168.56.150'", "network[0].dns"),
            ("mode='internal'\ndns='10.9.0.53'", "network[0].subnet"),
            ("mode='bridged'\nuplink='eth0'\ndhcp=false\ndns='10.9.0.53'", "network[0].dns"),
            ("mode='nat'\ndomain='a..b'", "network[0].domain"),
            ("mode='nat'\n[[network.host]]\nname='a_b'\nip='10.0.2.9'", "network[0].host[0].name"),
            ("mode='nat'\n[[network.host]]\nname='a'\nip='10.0.3.9'", "network[0].host[0].ip"),
            ("mode='nat'\n[[network.host]]\nname='a'\nip='10.0.2.9'\n[[network.host]]\nname='A'\nip='10.0.2.8'", "network[0].host[1].name"),
        ] {
            let e = v(&format!("{base}name='n'\n{keys}\n")).unwrap_err();
            assert!(e.contains("t.toml") && e.contains(key), "{keys}: {e}");
        }
    }

    #[test]
    fn forwards_and_isolation_parse() {
        let s = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='nat'\nisolated=true\nmtu=65520\n[[network.forward]]\nproto='tcp'\nhost='2222'\nguest='10.0.2.15:22'\n").unwrap();
        let nat = s[0].nat.as_ref().unwrap();
        assert_eq!(nat.forwards[0].host.to_string(), "127.0.0.1:2222");
        assert_eq!(nat.mtu, 65520);
        assert!(s[0].isolated);
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/netd-nat.toml"
        ));
        let cfg = Config::load(path).unwrap();
        let specs = cfg.validate(path).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].nat.as_ref().unwrap().forwards.len(), 1);
        assert!(specs[1].isolated);
    }

    #[test]
    fn errors_name_the_key() {
        let e = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='nat'\n[[network.forward]]\nproto='tcp'\nhost='2222'\nguest='192.168.0.5:22'\n").unwrap_err();
        assert!(e.contains("network[0].forward[0].guest"), "{e}");
        let e = v(
            "control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='internal'\nisolated=true\n",
        )
        .unwrap_err();
        assert!(e.contains("network[0].isolated"), "{e}");
        let e =
            v("control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='bridged'\n").unwrap_err();
        assert!(e.contains("network[0].uplink"), "{e}");
        let e = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='nat'\n[[network.forward]]\nproto='sctp'\nhost='1'\nguest='10.0.2.15:1'\n").unwrap_err();
        assert!(e.contains("sctp") || e.contains("proto"), "{e}");
        let e = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\nmode='nat'\nmtu=65521\n")
            .unwrap_err();
        assert!(e.contains("mtu"), "{e}");
    }
}
