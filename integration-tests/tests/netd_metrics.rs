//! netd's `/metrics` (the `metrics` config key) end to end: scraped with curl inside
//! netd's namespace, read back by promtool and python3-prometheus-client. Frames
//! through a port move its counters; a spoofed MAC moves the guard's drop counter
//! with its reason, on the port and on the network; a NAT network's DHCP lease and
//! its router's counters show; hostile scrapers are refused and netd keeps
//! switching.

mod netd_common;

use anyhow::Result;
use integration_tests::free_port;
use integration_tests::metrics::{
    assert_dashboard_covered, assert_hostile_scrapers_refused, get, scrape_parsed, value,
};
use netd_common::*;

#[test]
fn port_counters_and_guard_drops_move_with_traffic() -> Result<()> {
    let dir = root_tempdir();
    let [a, b] = TapHost::each(["mxa", "mxb"])?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = [
        format!("metrics = \"{addr}\"\n"),
        network("lan", "internal", ""),
        a.port("a"),
        b.port("b"),
    ]
    .concat();
    let (host, netd) = start_netd(dir.path(), "mxh", &cfg)?;
    a.addr("10.77.0.1/24")?;
    b.addr("10.77.0.2/24")?;
    let ns = host.exec_prefix();
    assert!(ping_retry(&a, "10.77.0.2", 5), "a reaches b");

    let before = scrape_parsed(&ns, &addr)?;
    let port_a = [("net", "lan"), ("port", "a")];
    let rx0 = get(&before, "netd_port_rx_frames_total", &port_a);
    let tx0 = get(
        &before,
        "netd_port_tx_frames_total",
        &[("net", "lan"), ("port", "b")],
    );
    assert!(rx0 >= 2.0 && tx0 >= 2.0, "rx {rx0} tx {tx0}");
    assert_eq!(
        get(
            &before,
            "netd_network_info",
            &[("net", "lan"), ("mode", "internal")]
        ),
        1.0
    );
    assert_eq!(get(&before, "netd_network_ports", &[("net", "lan")]), 2.0);
    // Every drop reason is there, at 0 before any attack.
    for r in [
        "malformed",
        "mtu",
        "full",
        "spoofed_mac",
        "spoofed_ip",
        "mac_limit",
        "gso",
    ] {
        let l = [("net", "lan"), ("port", "a"), ("reason", r)];
        assert_eq!(
            get(&before, "netd_port_dropped_frames_total", &l),
            0.0,
            "{r}"
        );
    }

    assert!(ping(&a, "10.77.0.2"), "a still reaches b");
    let after = scrape_parsed(&ns, &addr)?;
    let rx1 = get(&after, "netd_port_rx_frames_total", &port_a);
    let bytes = get(&after, "netd_port_rx_bytes_total", &port_a);
    assert!(
        rx1 >= rx0 + 1.0,
        "a's rx frames moved with the ping: {rx0} -> {rx1}"
    );
    assert!(bytes >= rx1 * 42.0, "bytes {bytes} for {rx1} frames");
    // The numbers are the ones the CLI shows.
    let c = netd.counters("lan", "a")?;
    assert!(c["rx_frames"].as_f64().unwrap_or(0.0) >= rx1, "{c}");

    // a is locked to its first MAC: from another one, its frames are dropped.
    let mac = a.sh(&format!("cat /sys/class/net/{}/address", a.tap))?;
    let mac = mac.trim().to_string();
    a.exec(&[
        "ip",
        "link",
        "set",
        "dev",
        &a.tap,
        "address",
        "02:00:00:77:00:99",
    ])?;
    assert!(!ping(&a, "10.77.0.2"), "a spoofed MAC must not pass");
    let spoof = scrape_parsed(&ns, &addr)?;
    let port_drop = get(
        &spoof,
        "netd_port_dropped_frames_total",
        &[("net", "lan"), ("port", "a"), ("reason", "spoofed_mac")],
    );
    assert!(port_drop >= 1.0, "spoofed_mac drops on a: {port_drop}");
    let net_drop = get(
        &spoof,
        "netd_network_guard_dropped_frames_total",
        &[("net", "lan"), ("reason", "spoofed_mac")],
    );
    assert_eq!(
        net_drop, port_drop,
        "the network sums its ports' guard drops"
    );

    // Hostile scrapers are refused, counted, and the switch keeps working.
    let after_attack = assert_hostile_scrapers_refused(&ns, "127.0.0.1", port);
    for r in ["too_large", "timeout", "too_many_connections"] {
        let n = get(&after_attack, "netd_scrape_refused_total", &[("reason", r)]);
        assert!(n >= 1.0, "{r}: {n}");
    }
    a.exec(&["ip", "link", "set", "dev", &a.tap, "address", &mac])?;
    assert!(
        ping_retry(&a, "10.77.0.2", 5),
        "a reaches b again with its own MAC"
    );
    assert!(netd.stop(), "netd exits cleanly");
    Ok(())
}

#[test]
fn nat_network_shows_leases_flows_and_router_counters() -> Result<()> {
    let dir = root_tempdir();
    let guest = TapHost::new("mxg")?;
    let keys = loopback_resolv_key(dir.path())?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = [
        format!("metrics = \"{addr}\"\n"),
        network("nat0", "nat", &keys),
        guest.unnamed_port(),
    ]
    .concat();
    let (host, netd) = start_netd(dir.path(), "mxh", &cfg)?;
    let ns = host.exec_prefix();

    let lease = dhcp(&guest, &guest.tap, dir.path())?;
    assert!(lease.contains("10.0.2.15"), "{lease}");
    // TCP to the host's loopback through the gateway is refused without
    // host_loopback (counted denied_host), and one ping reaches the gateway.
    let _ = guest.sh("busybox nc -w 2 10.0.2.2 9 </dev/null; true");
    let _ = ping(&guest, "10.0.2.2");

    let s = scrape_parsed(&ns, &addr)?;
    let net = [("net", "nat0")];
    assert_eq!(get(&s, "netd_dhcp_leases", &net), 1.0, "one lease");
    assert!(get(&s, "netd_dhcp_lease_commits_total", &net) >= 1.0);
    assert_eq!(
        get(
            &s,
            "netd_dhcp_refused_total",
            &[("net", "nat0"), ("reason", "spoofed_chaddr")]
        ),
        0.0
    );
    for p in ["tcp", "udp", "icmp"] {
        assert!(
            value(&s, "netd_nat_flows", &[("net", "nat0"), ("proto", p)]).is_some(),
            "flows of {p}"
        );
    }
    assert!(
        get(&s, "netd_nat_frames_in_total", &net) >= 4.0,
        "DHCP and more went in"
    );
    assert!(get(&s, "netd_nat_frames_out_total", &net) >= 2.0);
    let denied = get(
        &s,
        "netd_nat_refused_flows_total",
        &[("net", "nat0"), ("reason", "denied_host")],
    );
    assert!(denied >= 1.0, "denied_host: {denied}");
    assert_eq!(get(&s, "netd_router_restarts_total", &net), 0.0);
    // Every netd metric the Grafana dashboard shows is exported.
    assert_dashboard_covered(&s, "netd_");
    // The router's port and the guest's port are counted like any port.
    assert!(s.iter().any(|x| x.name == "netd_port_rx_frames_total"
        && x.labels.get("net").map(String::as_str) == Some("nat0")
        && x.value >= 1.0));
    assert!(netd.stop(), "netd exits cleanly");
    Ok(())
}

#[test]
fn a_bad_metrics_address_names_the_key() -> Result<()> {
    let dir = tempdir();
    let cfg = write_config(dir.path(), "metrics = \"localhost\"\n");
    let out = std::process::Command::new(integration_tests::bin("netd"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("netd.toml") && err.contains("`metrics`") && err.contains("localhost"),
        "{err}"
    );
    Ok(())
}
