//! IPv6 on NAT networks (issue 16, second half), end to end: guests are namespaces
//! on TAP ports of a NAT network whose kernels do SLAAC from the router's Router
//! Advertisements (`fd00::/64`); `rdisc6` (ndisc6) reads the RDNSS option; they
//! `ping -6` the gateway, `curl -6` the host's `[::1]` through `fd00::2`
//! (`host_loopback`) and a web server in the lab's "internet" namespace at
//! 2001:db8:19::10 (routed from the host namespace, see `nat_common`), resolve an
//! AAAA record through `fd00::3` (the lab's dnsmasq behind netd's forwarder); scapy
//! sends a rogue RA and spoofed NAs for the gateway, which the guard drops and
//! counts while the other guests keep their default route, their neighbour entry
//! for the gateway and their connectivity. `netd flows` lists the IPv6 flows beside
//! the IPv4 ones. Namespace prefixes `n6`.

mod nat_common;

use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::netd::{global6, link_local_ready, ping6, run_scapy, TapHost};
use integration_tests::wait_until;
use nat_common::{Lab, INET_NAME, INET_SERVER6, PAGE};

/// A guest's default IPv6 route (`via fe80::... dev TAP ...`), waiting up to 10 s
/// for it.
fn default_route6(g: &TapHost) -> String {
    let mut r = String::new();
    wait_until(Duration::from_secs(10), || {
        r = g.sh("ip -6 route show default").unwrap_or_default();
        r.contains("via fe80")
    });
    r
}

/// The MAC of a guest's TAP.
fn mac_of(g: &TapHost) -> Result<String> {
    Ok(g.sh(&format!("cat /sys/class/net/{}/address", g.tap))?
        .trim()
        .to_string())
}

/// `curl -6` of `url` from `g`, the page's text.
fn curl6(g: &TapHost, url: &str) -> Result<String> {
    let out = g.sh(&format!("curl -6 -sS --max-time 10 {url}"))?;
    Ok(out.trim().to_string())
}

#[test]
fn nat_guests_slaac_reach_host_internet_dns_and_a_rogue_router_is_dropped() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.ipv6()?;
    let [a, b, x] = TapHost::each(["n6a", "n6b", "n6x"])?;
    let net = lab.nat_network("n6", "host_loopback = true\n")
        + &a.port("a")
        + &b.port("b")
        + &x.port("x");
    lab.start_netd(&net)?;

    // SLAAC from the router's RAs; RDNSS names fd00::3.
    let a_ip = global6(&a, &a.tap, "fd00:")?;
    let b_ip = global6(&b, &b.tap, "fd00:")?;
    assert_ne!(a_ip, b_ip);
    let ra = a.sh(&format!("rdisc6 -1 -w 2000 {}", a.tap))?;
    assert!(ra.contains("fd00::3"), "RDNSS in the RA: {ra}");
    assert!(ra.contains("fd00::/64"), "the prefix in the RA: {ra}");
    let routes = [default_route6(&a), default_route6(&b)];
    for r in &routes {
        assert!(r.contains("via fe80"), "default route from the RA: {r}");
    }

    // The gateway, the host's [::1] through it, the internet.
    assert!(ping6(&a, "fd00::2"), "a pings the gateway");
    assert!(ping6(&b, "fd00::2"), "b pings the gateway");
    assert_eq!(
        curl6(&a, "http://[fd00::2]:8080/index.html")?,
        format!("{PAGE} (host)")
    );
    assert_eq!(
        curl6(&b, &format!("http://[{INET_SERVER6}]/index.html"))?,
        format!("{PAGE} (internet)")
    );

    // DNS: AAAA through fd00::3, A through 10.0.2.3 (a has IPv4 from DHCP too,
    // with the hostname "alpha").
    let lease = lab.dhcp_with(&a, &["-x", "hostname:alpha"])?;
    assert!(lease.contains("ip=10.0.2.15"), "lease: {lease}");
    let out = a.sh(&format!("busybox nslookup -type=aaaa {INET_NAME} fd00::3"))?;
    assert!(out.contains(INET_SERVER6), "AAAA through fd00::3: {out}");
    let out = a.sh(&format!("busybox nslookup -type=a {INET_NAME} 10.0.2.3"))?;
    assert!(out.contains(nat_common::INET_SERVER), "A: {out}");
    // The guest's own name: AAAA is its SLAAC address (bound by the guard), asked
    // from another guest over IPv6 and by itself over IPv4; A is its lease.
    for (g, server) in [(&b, "fd00::3"), (&a, "10.0.2.3")] {
        let out = g.sh(&format!(
            "busybox nslookup -type=aaaa alpha.n6.lab {server}"
        ))?;
        assert!(out.contains(&a_ip), "AAAA of alpha from {server}: {out}");
    }
    let out = b.sh("busybox nslookup -type=a alpha fd00::3")?;
    assert!(out.contains("10.0.2.15"), "A of alpha: {out}");

    // `netd flows`: the DNS flows of both families, side by side.
    let flows: serde_json::Value = serde_json::from_str(&lab.cli(&["flows", "n6", "--json"])?)?;
    let has = |pre: &str| {
        integration_tests::has_item(&flows, |f| {
            f["proto"] == "udp" && f["guest"].as_str().is_some_and(|g| g.starts_with(pre))
        })
    };
    assert!(has("[fd00:") && has("10.0.2.15"), "flows of both: {flows}");
    let table = lab.cli(&["flows", "n6"])?;
    assert!(
        table.contains(&a_ip) && table.contains("10.0.2.15"),
        "{table}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&lab.cli(&["flows", "n6", "--stats", "--json"])?)?;
    assert!(stats["frames_in6"].as_u64().unwrap_or(0) > 0, "{stats}");

    // A rogue router: RAs with a prefix of its own, NAs claiming the gateway (to all
    // nodes and to a), an RA claiming to be the router's link-local.
    let x_mac = mac_of(&x)?;
    let x_ll = link_local_ready(&x, &x.tap);
    let router_ll = routes[0]
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .context("router address")?
        .to_string();
    run_scapy(
        &x,
        lab.dir.path(),
        &format!(
            "e = Ether(src='{x_mac}', dst='33:33:00:00:00:01')\n\
             ip = IPv6(src='{x_ll}', dst='ff02::1', hlim=255)\n\
             sendp(e / ip / ICMPv6ND_RA(routerlifetime=9000) / ICMPv6NDOptPrefixInfo(prefix='2001:db8:bad::', prefixlen=64) / ICMPv6NDOptSrcLLAddr(lladdr='{x_mac}'), iface='{tap}', count=5)\n\
             sendp(e / IPv6(src='{router_ll}', dst='ff02::1', hlim=255) / ICMPv6ND_RA(routerlifetime=0), iface='{tap}', count=3)\n\
             sendp(e / ip / ICMPv6ND_NA(tgt='fd00::2', R=1, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr='{x_mac}'), iface='{tap}', count=5)\n\
             sendp(e / IPv6(src='{x_ll}', dst='{a_ip}', hlim=255) / ICMPv6ND_NA(tgt='fd00::2', R=1, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr='{x_mac}'), iface='{tap}', count=5)\n",
            tap = x.tap
        ),
    )?;
    let ok = wait_until(Duration::from_secs(5), || {
        lab.port_drops("n6", "x", "drop_rogue_router") >= 8
            && lab.port_drops("n6", "x", "drop_spoofed_nd") >= 10
    });
    assert!(
        ok,
        "rogue RAs and spoofed NAs counted:\n{}",
        lab.cli(&["port", "list", "n6", "--drops"])?
    );
    let table = lab.cli(&["port", "list", "n6", "--drops"])?;
    assert!(
        table.contains("ROGUE-ROUTER") && table.contains("SPOOFED-ND"),
        "{table}"
    );

    // The others keep their route, the gateway's MAC and their connectivity.
    for (g, before) in [&a, &b].into_iter().zip(&routes) {
        let addrs = g.sh("ip -6 addr")?;
        assert!(
            !addrs.contains("2001:db8:bad"),
            "rogue prefix taken: {addrs}"
        );
        let now = g.sh("ip -6 route show default")?;
        let via = |r: &str| r.split_whitespace().take(5).collect::<Vec<_>>().join(" ");
        assert_eq!(via(&now), via(before), "default route changed: {now}");
        let neigh = g.sh("ip -6 neigh show fd00::2")?;
        assert!(!neigh.contains(&x_mac), "gateway taken over: {neigh}");
        assert!(ping6(g, "fd00::2"), "still pings the gateway");
        assert_eq!(
            curl6(g, &format!("http://[{INET_SERVER6}]/index.html"))?,
            format!("{PAGE} (internet)")
        );
    }
    assert!(ping6(&a, &b_ip), "a still reaches b");
    Ok(())
}

#[test]
fn ipv6_port_forwards_from_the_hosts_loopback_reach_a_guest() -> Result<()> {
    let mut lab = Lab::new()?;
    let g = TapHost::new("n6f")?;
    // A forward in the config file to the guest's configured address; the
    // others, to its SLAAC address, are added at runtime.
    let net = lab.nat_network("n6f", "")
        + &g.port("g")
        + "\n[[network.forward]]\nproto = \"tcp\"\nhost = \"[::1]:2222\"\nguest = \"[fd00::15]:8000\"\n";
    lab.start_netd(&net)?;
    let slaac = global6(&g, &g.tap, "fd00:")?;
    g.sh(&format!("ip addr add fd00::15/64 dev {} nodad", g.tap))?;
    let www = lab.path("www-host");
    let srv = g.spawn(&["busybox", "httpd", "-f", "-p", "[::]:8000", "-h", &www])?;
    lab.keep(srv);
    // Bound to the SLAAC address, so that the replies come from it.
    let echo = g.spawn(&[
        "socat",
        &format!("UDP6-RECVFROM:7777,bind=[{slaac}],fork"),
        "EXEC:/bin/cat",
    ])?;
    lab.keep(echo);
    wait_until(Duration::from_secs(5), || {
        g.sh("curl -sSf --max-time 2 http://[fd00::15]:8000/ >/dev/null")
            .is_ok()
    });

    // The config file's forward: [::1]:2222 to [fd00::15]:8000.
    let host_page = format!("{PAGE} (host)");
    let page = lab
        .host
        .sh("curl -sS --max-time 10 http://[::1]:2222/index.html")?;
    assert_eq!(page.trim(), host_page);

    // Runtime forwards to the SLAAC address, TCP and UDP.
    let guest_tcp = format!("[{slaac}]:8000");
    let done = lab.cli(&["forward", "add", "n6f", "tcp", "[::1]:2223", &guest_tcp])?;
    assert_eq!(
        done,
        format!("added tcp forward [::1]:2223 -> {guest_tcp} on n6f\n")
    );
    let page = lab
        .host
        .sh("curl -sS --max-time 10 http://[::1]:2223/index.html")?;
    assert_eq!(page.trim(), host_page);
    lab.cli(&[
        "forward",
        "add",
        "n6f",
        "udp",
        "[::1]:2253",
        &format!("[{slaac}]:7777"),
    ])?;
    let (ok, echoed) = lab.udp_round_trip("UDP6:[::1]:2253", "via-forward6");
    assert!(ok, "udp forward: {echoed:?}");
    let list = lab.cli(&["forward", "list", "n6f"])?;
    assert!(
        list.contains(&guest_tcp) && list.contains("[fd00::15]:8000"),
        "{list}"
    );
    let flows: serde_json::Value = serde_json::from_str(&lab.cli(&["flows", "n6f", "--json"])?)?;
    assert!(
        integration_tests::has_item(&flows, |f| f["forward"] == true
            && f["guest"].as_str().is_some_and(|a| a.starts_with("[fd00:"))),
        "the forwards' flows: {flows}"
    );

    // Guest addresses outside the prefix, or the router's own, are refused.
    for bad in ["[2001:db8::15]:22", "[fd00::2]:22", "[fe80::1]:22"] {
        let e = lab
            .cli(&["forward", "add", "n6f", "tcp", "[::1]:2299", bad])
            .unwrap_err();
        assert!(e.to_string().contains("not in the network"), "{bad}: {e}");
    }
    // After the deletion nothing answers there.
    lab.cli(&["forward", "del", "n6f", "tcp", "[::1]:2223"])?;
    assert!(lab
        .host
        .sh("curl -sS --max-time 3 http://[::1]:2223/")
        .is_err());
    let page = lab
        .host
        .sh("curl -sS --max-time 10 http://[::1]:2222/index.html")?;
    assert_eq!(page.trim(), host_page, "the other forward stays");
    Ok(())
}

/// What a TCP connect from `g` to `[addr]:port` ends with (Python's error line, or
/// "connected"), and how long it took.
fn connect6(g: &TapHost, addr: &str, port: u16) -> (String, Duration) {
    let t = std::time::Instant::now();
    let out = g
        .sh(&format!(
            "/usr/bin/python3 -c \"import socket\ns = socket.socket(socket.AF_INET6)\n\
             s.settimeout(8)\ntry:\n    s.connect(('{addr}', {port})); print('connected')\n\
             except OSError as e:\n    print(e)\""
        ))
        .unwrap_or_else(|e| e.to_string());
    (out.trim().to_string(), t.elapsed())
}

#[test]
fn no_ipv6_route_is_an_unreachable_at_once_and_outbound_lists_take_ipv6() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.ipv6()?;
    let g = TapHost::new("n6u")?;
    let net = lab.nat_network("n6u", "outbound_deny = [\"2001:db8:19::/64\"]\n") + &g.port("g");
    lab.start_netd(&net)?;
    global6(&g, &g.tap, "fd00:")?;
    default_route6(&g);
    let stat = |k: &str| -> u64 {
        lab.cli(&["flows", "n6u", "--stats", "--json"])
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v[k].as_u64())
            .unwrap_or(0)
    };

    // The host has no route to 2001:db8:ff::/48: its connect fails with
    // ENETUNREACH, and so does the guest's, at once (an ICMPv6 unreachable, not a
    // RST, not a timeout).
    let (out, took) = connect6(&g, "2001:db8:ff::1", 80);
    assert!(out.contains("Errno 101"), "ENETUNREACH expected: {out}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(stat("connect_failed") >= 1);
    // So does a ping: the echo gets a "no route" unreachable at once.
    let t = std::time::Instant::now();
    let ping = g.sh("ping -6 -c 1 -W 5 2001:db8:ff::1 2>&1 || true")?;
    assert!(
        ping.contains("No route") || ping.contains("Unreachable"),
        "ICMPv6 unreachable expected: {ping}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );

    // The config's IPv6 deny entry; a runtime allow entry for one host in it.
    let (out, _) = connect6(&g, INET_SERVER6, 80);
    assert!(out.contains("Errno 111"), "refused by policy (RST): {out}");
    assert!(stat("denied_policy") >= 1);
    let list = lab.cli(&["outbound", "n6u", "list"])?;
    assert!(
        list.contains("2001:db8:19::/64") && list.contains("fe80::/10"),
        "{list}"
    );
    lab.cli(&[
        "outbound",
        "n6u",
        "allow",
        "add",
        &format!("{INET_SERVER6}/128"),
    ])?;
    assert_eq!(
        curl6(&g, &format!("http://[{INET_SERVER6}]/index.html"))?,
        format!("{PAGE} (internet)")
    );
    // Once an allow list has an entry, what no entry contains is denied.
    let (out, _) = connect6(&g, "2001:db8:ff::1", 80);
    assert!(out.contains("Errno 111"), "not in the allow list: {out}");
    let bad = lab
        .cli(&["outbound", "n6u", "deny", "add", "2001:db8::1/32"])
        .unwrap_err();
    assert!(bad.to_string().contains("host bits"), "{bad}");
    Ok(())
}
