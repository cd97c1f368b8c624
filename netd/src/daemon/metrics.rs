//! What netd exports on `/metrics` (the `metrics` key of the config): at scrape
//! time, the same counters the control API shows (`netd port list --drops`,
//! `netd leases --stats`, `netd flows --stats`, `netd control`), read from the
//! ports' atomics and asked of the DHCP servers and NAT routers. Nothing is added
//! to the switching path. The metric names and labels are listed in the README
//! ("Metrics").
//!
//! The daemon's lock is held only to copy out each network's handles; the NAT
//! routers are asked afterwards, on the scrape's own thread.

use std::fmt;
use std::sync::Arc;

use fabric_api::netd::DhcpStats;
use fabric_util::metrics::{Labels, Out, Source};

use super::Daemon;
use crate::switch::{CountersSnapshot, PortInfo};

/// The daemon as a metrics [`Source`].
pub struct Metrics(pub Arc<Daemon>);

/// One network, copied out under the daemon's lock.
struct NetRow {
    name: String,
    mode: String,
    ports: Vec<PortInfo>,
    dhcp: Option<DhcpStats>,
    nat: Option<crate::nat::RouterHandle>,
}

type Field = fn(&CountersSnapshot) -> u64;

/// Every per-port drop counter, by the `reason` label it is exported with.
const DROPS: [(&str, Field); 17] = [
    ("malformed", |c| c.drop_malformed),
    ("mtu", |c| c.drop_mtu),
    ("full", |c| c.drop_full),
    ("down", |c| c.drop_down),
    ("io", |c| c.drop_io),
    ("hairpin", |c| c.drop_hairpin),
    ("offload", |c| c.drop_offload),
    ("gso", |c| c.drop_gso),
    ("spoofed_mac", |c| c.drop_spoofed_mac),
    ("spoofed_ip", |c| c.drop_spoofed_ip),
    ("spoofed_arp", |c| c.drop_spoofed_arp),
    ("spoofed_dhcp", |c| c.drop_spoofed_dhcp),
    ("mac_limit", |c| c.drop_mac_limit),
    ("spoofed_ip6", |c| c.drop_spoofed_ip6),
    ("rogue_router", |c| c.drop_rogue_router),
    ("spoofed_nd", |c| c.drop_spoofed_nd),
    ("nd_limit", |c| c.drop_nd_limit),
];

/// The drops of [`DROPS`] that the port guard makes.
const GUARD_DROPS: [&str; 9] = [
    "spoofed_mac",
    "spoofed_ip",
    "spoofed_arp",
    "spoofed_dhcp",
    "mac_limit",
    "spoofed_ip6",
    "rogue_router",
    "spoofed_nd",
    "nd_limit",
];

type DhcpField = fn(&DhcpStats) -> u64;

/// DHCP messages refused or ignored, by `reason`.
const DHCP_REFUSED: [(&str, DhcpField); 7] = [
    ("malformed", |d| d.malformed),
    ("refused_full", |d| d.refused_full),
    ("spoofed_chaddr", |d| d.spoofed_chaddr),
    ("foreign_release", |d| d.foreign_release),
    ("nak_unoffered", |d| d.nak_unoffered),
    ("save_failed", |d| d.save_failed),
    ("dropped_busy", |d| d.dropped_busy),
];

type NatField = fn(&crate::nat::Stats) -> u64;

/// Guest packets the NAT router dropped, by `reason`.
const NAT_DROPPED: [(&str, NatField); 5] = [
    ("malformed", |s| s.malformed),
    ("bad_source", |s| s.bad_source),
    ("martian_dst", |s| s.martian_dst),
    ("port_zero", |s| s.port_zero),
    ("send_failed", |s| s.dropped),
];

/// Flows the NAT router refused, by `reason`.
const NAT_REFUSED: [(&str, NatField); 7] = [
    ("table_full", |s| s.flows_refused),
    ("connect_failed", |s| s.connect_failed),
    ("denied_loopback", |s| s.denied_loopback),
    ("denied_host", |s| s.denied_host),
    ("denied_policy", |s| s.denied_policy),
    ("guest_quota", |s| s.guest_quota),
    ("no_fds", |s| s.no_fds),
];

fn net_labels(n: &NetRow) -> Labels {
    vec![("net", n.name.clone())]
}

fn port_labels(n: &NetRow, p: &PortInfo) -> Labels {
    let kind = serde_json::to_value(p.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    vec![
        ("net", n.name.clone()),
        ("port", p.name.clone()),
        ("kind", kind),
    ]
}

fn with(mut l: Labels, k: &'static str, v: &str) -> Labels {
    l.push((k, v.to_string()));
    l
}

impl Metrics {
    fn rows(&self) -> Vec<NetRow> {
        self.0
            .lock()
            .values()
            .map(|st| NetRow {
                name: st.spec.name.clone(),
                mode: serde_json::to_value(st.spec.mode)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                ports: st.net.port_infos(),
                dhcp: st
                    .dhcp
                    .as_ref()
                    .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).stats()),
                nat: st.nat.clone(),
            })
            .collect()
    }
}

/// Per-port families: traffic, drops by reason, receive-thread restarts.
fn ports(out: &mut Out<'_>, nets: &[NetRow]) -> fmt::Result {
    let each = |f: Field| -> Vec<(Labels, u64)> {
        nets.iter()
            .flat_map(|n| {
                n.ports
                    .iter()
                    .map(move |p| (port_labels(n, p), f(&p.counters)))
            })
            .collect()
    };
    out.counter(
        "netd_port_rx_frames",
        "Frames received from the port and accepted into the switch",
        &each(|c| c.rx_frames),
    )?;
    out.counter(
        "netd_port_rx_bytes",
        "Bytes of the frames received from the port",
        &each(|c| c.rx_bytes),
    )?;
    out.counter(
        "netd_port_tx_frames",
        "Frames the switch sent out of the port",
        &each(|c| c.tx_frames),
    )?;
    out.counter(
        "netd_port_tx_bytes",
        "Bytes of the frames sent out of the port",
        &each(|c| c.tx_bytes),
    )?;
    let drops: Vec<(Labels, u64)> = nets
        .iter()
        .flat_map(|n| {
            n.ports.iter().flat_map(move |p| {
                DROPS
                    .iter()
                    .map(move |(r, f)| (with(port_labels(n, p), "reason", r), f(&p.counters)))
            })
        })
        .collect();
    out.counter(
        "netd_port_dropped_frames",
        "Frames dropped on the port, by reason (guard, bounds, egress)",
        &drops,
    )?;
    out.counter(
        "netd_port_restarts",
        "Times the port's receive thread panicked and was restarted",
        &each(|c| c.restarts),
    )
}

/// Per-network families: ports, guard drops, DHCP.
fn networks(out: &mut Out<'_>, nets: &[NetRow]) -> fmt::Result {
    let info: Vec<(Labels, i64)> = nets
        .iter()
        .map(|n| (with(net_labels(n), "mode", &n.mode), 1))
        .collect();
    out.gauge(
        "netd_network_info",
        "A network and its mode (always 1)",
        &info,
    )?;
    let ports: Vec<(Labels, i64)> = nets
        .iter()
        .map(|n| (net_labels(n), n.ports.len() as i64))
        .collect();
    out.gauge(
        "netd_network_ports",
        "Ports of the network, services included",
        &ports,
    )?;
    let guard: Vec<(Labels, u64)> = nets
        .iter()
        .flat_map(|n| {
            GUARD_DROPS.iter().map(move |r| {
                let f = DROPS.iter().find(|(d, _)| d == r).map(|(_, f)| *f);
                let sum = n
                    .ports
                    .iter()
                    .map(|p| f.map_or(0, |f| f(&p.counters)))
                    .sum();
                (with(net_labels(n), "reason", r), sum)
            })
        })
        .collect();
    out.counter(
        "netd_network_guard_dropped_frames",
        "Frames the port guard dropped on the network's ports, by reason",
        &guard,
    )?;
    let dhcp: Vec<(&NetRow, &DhcpStats)> = nets
        .iter()
        .filter_map(|n| n.dhcp.as_ref().map(|d| (n, d)))
        .collect();
    let leases: Vec<(Labels, i64)> = dhcp
        .iter()
        .map(|(n, d)| (net_labels(n), d.leases as i64))
        .collect();
    out.gauge("netd_dhcp_leases", "DHCP leases held", &leases)?;
    let commits: Vec<(Labels, u64)> = dhcp
        .iter()
        .map(|(n, d)| (net_labels(n), d.commits))
        .collect();
    out.counter(
        "netd_dhcp_lease_commits",
        "Lease file writes (each commits every change queued before it)",
        &commits,
    )?;
    let refused: Vec<(Labels, u64)> = dhcp
        .iter()
        .flat_map(|(n, d)| {
            DHCP_REFUSED
                .iter()
                .map(move |(r, f)| (with(net_labels(n), "reason", r), f(d)))
        })
        .collect();
    out.counter(
        "netd_dhcp_refused",
        "DHCP messages dropped, ignored or NAKed, by reason",
        &refused,
    )
}

/// NAT families, from each router's counters (asked outside the daemon's lock).
fn nat(out: &mut Out<'_>, nets: &[NetRow]) -> fmt::Result {
    let stats: Vec<(&NetRow, crate::nat::Stats)> = nets
        .iter()
        .filter_map(|n| {
            let h = n.nat.as_ref()?;
            match h.request_blocking(crate::nat::NatRequest::Stats) {
                Ok(v) => serde_json::from_value(v).ok().map(|s| (n, s)),
                Err(e) => {
                    tracing::debug!(network = %n.name, error = %e, "metrics: router did not answer");
                    None
                }
            }
        })
        .collect();
    let flows: Vec<(Labels, i64)> = stats
        .iter()
        .flat_map(|(n, s)| {
            [
                ("tcp", s.flows_tcp),
                ("udp", s.flows_udp),
                ("icmp", s.flows_icmp),
            ]
            .map(|(p, v)| (with(net_labels(n), "proto", p), v as i64))
        })
        .collect();
    out.gauge("netd_nat_flows", "NAT flows open, by protocol", &flows)?;
    let each = |f: NatField| -> Vec<(Labels, u64)> {
        stats.iter().map(|(n, s)| (net_labels(n), f(s))).collect()
    };
    out.counter(
        "netd_nat_frames_in",
        "Frames the NAT router took from the switch",
        &each(|s| s.frames_in),
    )?;
    out.counter(
        "netd_nat_frames_out",
        "Frames the NAT router sent to the switch",
        &each(|s| s.frames_out),
    )?;
    let by = |table: &[(&'static str, NatField)]| -> Vec<(Labels, u64)> {
        stats
            .iter()
            .flat_map(|(n, s)| {
                table
                    .iter()
                    .map(move |(r, f)| (with(net_labels(n), "reason", r), f(s)))
            })
            .collect()
    };
    out.counter(
        "netd_nat_dropped_packets",
        "Guest packets the NAT router dropped, by reason",
        &by(&NAT_DROPPED),
    )?;
    out.counter(
        "netd_nat_refused_flows",
        "Flows the NAT router refused, by reason",
        &by(&NAT_REFUSED),
    )?;
    out.counter(
        "netd_nat_listen_reaped",
        "TCP flows removed because their socket was back in LISTEN",
        &each(|s| s.listen_reaped),
    )?;
    out.counter(
        "netd_router_restarts",
        "Times the NAT router panicked and was restarted by its supervisor",
        &each(|s| s.restarts),
    )
}

impl Source for Metrics {
    fn collect(&self, out: &mut Out<'_>) -> fmt::Result {
        let nets = self.rows();
        ports(out, &nets)?;
        networks(out, &nets)?;
        nat(out, &nets)?;
        let c = &self.0.control;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        out.gauge(
            "netd_control_connections",
            "Control connections open",
            &[(
                Labels::new(),
                c.open.load(std::sync::atomic::Ordering::Relaxed) as i64,
            )],
        )?;
        out.counter(
            "netd_control_refused",
            "Control connections refused (full) or closed (idle)",
            &[
                (vec![("reason", "full".into())], load(&c.refused_full)),
                (vec![("reason", "idle".into())], load(&c.closed_idle)),
            ],
        )
    }
}
