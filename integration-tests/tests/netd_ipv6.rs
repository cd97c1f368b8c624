//! IPv6 on internal and hostonly networks (issue 16, first half): guests are
//! namespaces on TAP ports whose kernels do SLAAC from netd's Router
//! Advertisements; `rdisc6` (ndisc6) reads the RDNSS option; `dhclient -6`
//! (isc-dhcp-client) takes a stateful DHCPv6 lease; scapy sends a rogue RA, a
//! DHCPv6 Advertise and spoofed NAs, which the guard must drop and count while the
//! other guests keep their addresses, their (absent) default route and their
//! neighbour entry for the gateway. Namespace prefixes `v6`.

mod netd_common;

use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::netd::{global6, link_local_ready, ping6, run_scapy};
use integration_tests::unique_name;
use netd_common::*;

#[test]
fn internal_slaac_rdnss_and_a_rogue_router_is_dropped() -> Result<()> {
    let dir = root_tempdir();
    let [a, b, x] = TapHost::each(["v6a", "v6b", "v6x"])?;
    let net = network(
        "v6int",
        "internal",
        "subnet6 = \"fd42:16::/64\"\ndns6 = \"fd42:16::53\"\n",
    ) + &a.port("a")
        + &b.port("b")
        + &x.port("x");
    let (_host, netd) = start_netd(dir.path(), "v6i", &net)?;
    let a_ip = global6(&a, &a.tap, "fd42:16:")?;
    let b_ip = global6(&b, &b.tap, "fd42:16:")?;
    assert!(ping6(&a, "fd42:16::1"), "a pings netd's gateway address");
    assert!(ping6(&b, &a_ip), "b reaches a over IPv6");
    let ra = a.sh(&format!("rdisc6 -1 -w 2000 {}", a.tap))?;
    assert!(ra.contains("fd42:16::53"), "RDNSS in the RA: {ra}");
    assert!(ra.contains("fd42:16::/64"), "the prefix in the RA: {ra}");

    let x_mac = x.sh(&format!("cat /sys/class/net/{}/address", x.tap))?;
    let x_mac = x_mac.trim();
    let x_ll = link_local_ready(&x, &x.tap);
    run_scapy(
        &x,
        dir.path(),
        &format!(
            "e = Ether(src='{x_mac}', dst='33:33:00:00:00:01')\n\
             ip = IPv6(src='{x_ll}', dst='ff02::1', hlim=255)\n\
             sendp(e / ip / ICMPv6ND_RA(routerlifetime=1800) / ICMPv6NDOptPrefixInfo(prefix='2001:db8:bad::', prefixlen=64) / ICMPv6NDOptSrcLLAddr(lladdr='{x_mac}'), iface='{tap}', count=5)\n\
             sendp(e / ip / ICMPv6ND_NA(tgt='fd42:16::1', R=1, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr='{x_mac}'), iface='{tap}', count=5)\n\
             sendp(e / ip / ICMPv6ND_NA(tgt='{a_ip}', R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr='{x_mac}'), iface='{tap}', count=5)\n\
             sendp(e / IPv6(src='{x_ll}', dst='ff02::1') / UDP(sport=547, dport=546) / DHCP6_Advertise(), iface='{tap}', count=3)\n\
             sendp(e / IPv6(src='fd42:16::1', dst='{a_ip}') / ICMPv6EchoRequest(), iface='{tap}', count=5)\n\
             sendp(e / IPv6(src='{x_ll}', dst='ff02::2', hlim=64) / ICMPv6ND_RS(), iface='{tap}', count=3)\n",
            tap = x.tap
        ),
    )?;
    let ok = integration_tests::wait_until(Duration::from_secs(5), || {
        drops(&netd, "v6int", "x", "drop_rogue_router") >= 8
            && drops(&netd, "v6int", "x", "drop_spoofed_nd") >= 10
            && drops(&netd, "v6int", "x", "drop_spoofed_ip6") >= 5
    });
    assert!(
        ok,
        "rogue RA, DHCPv6 Advertise, spoofed NAs and source counted:\n{}",
        netd.cli(&["port", "list", "v6int", "--drops"])?
    );
    let stat = |k: &str| {
        netd.cli_json(&["leases", "v6int", "--stats"])
            .ok()
            .and_then(|v| v[k].as_u64())
            .unwrap_or(0)
    };
    assert!(
        integration_tests::wait_until(Duration::from_secs(5), || stat("ipv6_malformed") >= 3),
        "off-link RSs counted as malformed"
    );
    assert!(stat("ipv6_ra_sent") >= 1 && stat("ipv6_rs") >= 1);
    let table = netd.cli(&["port", "list", "v6int", "--drops"])?;
    assert!(table.contains("ROGUE-ROUTER"), "{table}");
    for g in [&a, &b] {
        let addrs = g.sh("ip -6 addr")?;
        assert!(
            !addrs.contains("2001:db8:bad"),
            "rogue prefix taken: {addrs}"
        );
        let routes = g.sh("ip -6 route show default")?;
        assert!(
            routes.trim().is_empty(),
            "a default route appeared: {routes}"
        );
        let neigh = g.sh("ip -6 neigh show fd42:16::1")?;
        assert!(!neigh.contains(x_mac), "gateway taken over: {neigh}");
    }
    assert!(ping6(&a, "fd42:16::1"), "a still pings the gateway");
    assert!(ping6(&a, &b_ip), "a still reaches b");
    assert!(netd.stop());
    Ok(())
}

#[test]
fn hostonly_host_reaches_a_slaac_guest() -> Result<()> {
    let dir = root_tempdir();
    let g = TapHost::new("v6g")?;
    let hif = unique_name("vh");
    let net = network(
        "v6ho",
        "hostonly",
        &format!("host_ifname = \"{hif}\"\nsubnet6 = \"fd42:17::/64\"\n"),
    ) + &g.port("g");
    let (host, netd) = start_netd(dir.path(), "v6h", &net)?;
    let addr = host.sh(&format!("ip -6 -o addr show dev {hif}"))?;
    assert!(
        addr.contains("fd42:17::1/64"),
        "host TAP has gateway6: {addr}"
    );
    let ip = global6(&g, &g.tap, "fd42:17:")?;
    assert!(ping6(&host, &ip), "the host reaches the guest over IPv6");
    assert!(ping6(&g, "fd42:17::1"), "the guest reaches the host");
    let host_addrs = host.sh(&format!("ip -6 -o addr show dev {hif} scope global"))?;
    assert_eq!(
        host_addrs.lines().count(),
        1,
        "the host TAP takes no address from netd's RAs: {host_addrs}"
    );
    assert!(netd.stop());
    Ok(())
}

#[test]
fn dhcp6_stateful_lease_shows_in_leases_and_the_host_reaches_it() -> Result<()> {
    let dir = root_tempdir();
    let g = TapHost::new("v6d")?;
    let hif = unique_name("vh");
    let net = network(
        "v6dh",
        "hostonly",
        &format!(
            "host_ifname = \"{hif}\"\nsubnet6 = \"fd42:18::/64\"\ndns6 = \"fd42:18::1\"\n\
             dhcp6_range = \"fd42:18::100-fd42:18::1ff\"\n"
        ),
    ) + &g.port("g");
    let (host, netd) = start_netd(dir.path(), "v6l", &net)?;
    link_local_ready(&g, &g.tap);
    let d = dir.path();
    let out = g.sh(&format!(
        "timeout 30 dhclient -6 -1 -v -lf {lf} -pf {pf} {tap} 2>&1",
        lf = d.join("dh6.leases").display(),
        pf = d.join("dh6.pid").display(),
        tap = g.tap
    ))?;
    let ip = global6(&g, &g.tap, "fd42:18::1").with_context(|| format!("dhclient -6:\n{out}"))?;
    let leases = netd.cli_json(&["leases", "v6dh"])?;
    let mac = g.sh(&format!("cat /sys/class/net/{}/address", g.tap))?;
    let row = leases
        .as_array()
        .and_then(|a| a.iter().find(|l| l["ip"] == ip.as_str()))
        .with_context(|| format!("no lease of {ip} in {leases}"))?;
    assert_eq!(row["mac"], mac.trim(), "{row}");
    let stats = netd.cli_json(&["leases", "v6dh", "--stats"])?;
    assert_eq!(stats["dhcp6_leases"], 1, "{stats}");
    let table = netd.cli(&["leases", "v6dh"])?;
    assert!(table.contains(&ip), "{table}");
    let file = std::fs::read_to_string(d.join("state").join("leases6-v6dh.json"))?;
    assert!(file.contains(&ip), "the lease is on disk: {file}");
    assert!(
        ping6(&host, &ip),
        "the host reaches the leased guest over IPv6"
    );
    if let Ok(pid) = std::fs::read_to_string(d.join("dh6.pid")) {
        let _ = g.sh(&format!("kill {}", pid.trim()));
    }
    assert!(netd.stop());
    Ok(())
}
