//! The port guard and DHCP trust against a hostile guest (issue #11 items 3, 4, 6,
//! 8): an attacker namespace sends crafted frames with scapy (its own TAP, raw
//! AF_PACKET) while an honest guest, with a lease from busybox udhcpc, pings and
//! downloads over TCP through the same network. Every attack must be dropped or
//! refused, counted (`netd port list --drops`, `netd leases --stats`), and leave the
//! honest guest's lease, ping and download working.
//!
//! One test on a NAT network (the router's MAC, unicast DHCP to the gateway that the
//! router hands to the server, a REQUEST flood during a download), one on an
//! internal network with DHCP (the DHCP server's MAC, ARP claims, an unguarded
//! port's MAC flood against `max_macs_per_port`). Namespace prefixes `ag`.

mod netd_common;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::{has_item, Netns};
use netd_common::*;

const HONEST_MAC: &str = "02:00:00:00:a9:01";

/// Writes the scapy program `body` (with `IFACE` bound to `iface` and helpers) to a
/// file under `dir`; returns its path.
fn scapy_file(dir: &Path, iface: &str, body: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("scapy-{}.py", integration_tests::unique_name("s")));
    let text = format!(
        "import logging\nlogging.getLogger('scapy.runtime').setLevel(logging.ERROR)\n\
         from scapy.all import *\nconf.verb = 0\nIFACE = '{iface}'\n\
         def mac_bytes(m):\n    return bytes.fromhex(m.replace(':', '')) + b'\\x00' * 10\n\
         def arp_claim(mac, ip):\n    \
         return Ether(src=mac, dst='ff:ff:ff:ff:ff:ff') / ARP(op=2, hwsrc=mac, psrc=ip, pdst=ip)\n\
         def dhcp(src_mac, dst_mac, src_ip, dst_ip, chaddr, ciaddr, opts):\n    \
         return (Ether(src=src_mac, dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / \
         UDP(sport=68, dport=67) / BOOTP(chaddr=mac_bytes(chaddr), ciaddr=ciaddr, \
         xid=RandInt()) / DHCP(options=opts + ['end']))\n{body}\n"
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Runs the scapy program `body` in the test host `guest`, sending on its TAP (see
/// [`scapy_file`]).
fn scapy(guest: &TapHost, dir: &Path, body: &str) -> Result<String> {
    let path = scapy_file(dir, &guest.tap, body)?;
    // Debian's python3-scapy is for the system interpreter.
    guest.sh(&format!("/usr/bin/python3 {}", path.display()))
}

/// A web server in `ns` on `addr`:`port` serving `file`, `mib` MiB of random bytes
/// under `dir`/www; returns it (killed when dropped) and the file's sha256sum.
fn web_server(
    ns: &Netns,
    dir: &Path,
    file: &str,
    mib: u32,
    addr: &str,
    port: &str,
) -> Result<(integration_tests::ChildGuard, String)> {
    let www = dir.join("www");
    std::fs::create_dir(&www)?;
    let path = www.join(file);
    ns.sh(&format!(
        "head -c {} /dev/urandom > {}",
        u64::from(mib) << 20,
        path.display()
    ))?;
    let sum = ns.sh(&format!("sha256sum < {}", path.display()))?;
    let www = www.to_str().context("www path")?;
    let httpd = ns.spawn(&[
        "python3",
        "-m",
        "http.server",
        "--bind",
        addr,
        port,
        "--directory",
        www,
    ])?;
    Ok((httpd, sum))
}

/// The MAC of `iface` in `ns`.
fn mac_of(ns: &Netns, iface: &str) -> Result<String> {
    Ok(ns
        .sh(&format!("cat /sys/class/net/{iface}/address"))?
        .trim()
        .to_string())
}

/// The MAC the switch has pinned to the service port `port` (`nat`, `dhcp`).
fn service_mac(netd: &Netd, net: &str, port: &str) -> Result<String> {
    let t = netd.cli_json(&["mac", net])?;
    t.as_array()
        .and_then(|a| a.iter().find(|e| e["port"] == port))
        .and_then(|e| e["mac"].as_str().map(str::to_string))
        .with_context(|| format!("no MAC of {port} in {t}"))
}

/// A counter of `leases --stats`.
fn dhcp_stat(netd: &Netd, net: &str, key: &str) -> u64 {
    netd.cli_json(&["leases", net, "--stats"])
        .ok()
        .and_then(|v| v[key].as_u64())
        .unwrap_or(0)
}

/// Waits (up to 5 s) until `f` holds; panics with `what` and the port table if not.
fn eventually(netd: &Netd, net: &str, what: &str, f: impl FnMut() -> bool) {
    eventually_for(Duration::from_secs(5), netd, net, what, f)
}

/// [`eventually`], waiting up to `limit`.
fn eventually_for(limit: Duration, netd: &Netd, net: &str, what: &str, f: impl FnMut() -> bool) {
    let ok = integration_tests::wait_until(limit, f);
    assert!(
        ok,
        "{what}\n{}",
        netd.cli(&["port", "list", net, "--drops"])
            .unwrap_or_default()
    );
}

/// The lease of `mac` on `net`: (ip, expires).
fn lease_of(netd: &Netd, net: &str, mac: &str) -> Option<(String, u64)> {
    let v = netd.cli_json(&["leases", net]).ok()?;
    let l = v.as_array()?.iter().find(|l| l["mac"] == mac)?;
    Some((l["ip"].as_str()?.to_string(), l["expires"].as_u64()?))
}

#[test]
fn nat_guard_drops_spoofing_and_dhcp_abuse_while_an_honest_guest_works() -> Result<()> {
    let dir = root_tempdir();
    let [hon, atk] = TapHost::each(["agh", "aga"])?;
    let keys = loopback_resolv_key(dir.path())? + "host_loopback = true\n";
    let net = network("agnat", "nat", &keys)
        + &hon.port("hon")
        + &format!("mac = \"{HONEST_MAC}\"\n")
        + &atk.port("atk");
    let (host, netd) = start_netd(dir.path(), "agn", &net)?;
    // The "host loopback" 10.0.2.2 stands for: a web server with a big file.
    let (_httpd, want) = web_server(&host, dir.path(), "big.bin", 64, "127.0.0.1", "18089")?;

    let hon_ip = dhcp(&hon, &hon.tap, dir.path())?;
    let atk_ip = dhcp(&atk, &atk.tap, dir.path())?;
    let atk_mac = mac_of(&atk, &atk.tap)?;
    assert!(
        ping_retry(&hon, "10.0.2.2", 3),
        "honest guest pings the gateway"
    );
    let (_, hon_expires) = lease_of(&netd, "agnat", HONEST_MAC).context("honest lease")?;
    let router = service_mac(&netd, "agnat", "nat")?;
    let ports = netd.cli_json(&["port", "list", "agnat"])?;
    assert!(
        has_item(&ports, |p| p["name"] == "atk"
            && p["guard"] == "clean"
            && p["locked_mac"] == atk_mac.as_str()),
        "atk is guarded and locked to its MAC: {ports}"
    );

    // 1. Frames from the router's MAC and from the honest guest's MAC; a flood of
    //    made-up source MACs.
    scapy(
        &atk,
        dir.path(),
        &format!(
            "sendp(arp_claim('{router}', '10.0.2.2'), iface=IFACE, count=5)\n\
             sendp(Ether(src='{HONEST_MAC}', dst='{router}') / IP(src='{hon_ip}', dst='10.0.2.2') / ICMP(), iface=IFACE, count=5)\n\
             sendp([Ether(src=RandMAC('02:*:*:*:*:*'), dst='ff:ff:ff:ff:ff:ff') / IP(src='{atk_ip}', dst='10.0.2.255') / UDP(dport=9) for _ in range(2000)], iface=IFACE)"
        ),
    )?;
    eventually(&netd, "agnat", "spoofed MACs counted", || {
        drops(&netd, "agnat", "atk", "drop_spoofed_mac") >= 2010
    });
    let table = netd.cli_json(&["mac", "agnat"])?;
    assert!(
        table.as_array().map_or(0, |a| a.len()) <= 4,
        "the flood learned nothing: {table}"
    );
    assert!(
        has_item(&table, |e| e["mac"] == router.as_str()
            && e["port"] == "nat"),
        "the router's MAC stays on the router's port: {table}"
    );
    assert!(
        !has_item(&table, |e| e["mac"] == HONEST_MAC && e["port"] == "atk"),
        "the honest MAC never moved to atk: {table}"
    );

    // 2. IP sources that are not its lease; ARP claiming the gateway, the DNS
    //    address and the honest guest's address.
    let (ip0, arp0) = (
        drops(&netd, "agnat", "atk", "drop_spoofed_ip"),
        drops(&netd, "agnat", "atk", "drop_spoofed_arp"),
    );
    scapy(
        &atk,
        dir.path(),
        &format!(
            "sendp(Ether(src='{atk_mac}', dst='{router}') / IP(src='10.0.2.99', dst='10.0.2.2') / ICMP(), iface=IFACE, count=5)\n\
             sendp(Ether(src='{atk_mac}', dst='{router}') / IP(src='{hon_ip}', dst='10.0.2.2') / TCP(dport=80, flags='S'), iface=IFACE, count=5)\n\
             sendp(arp_claim('{atk_mac}', '10.0.2.2'), iface=IFACE, count=5)\n\
             sendp(Ether(src='{atk_mac}', dst='ff:ff:ff:ff:ff:ff') / ARP(op=1, hwsrc='{atk_mac}', psrc='10.0.2.3', pdst='10.0.2.2'), iface=IFACE, count=5)\n\
             sendp(arp_claim('{atk_mac}', '{hon_ip}'), iface=IFACE, count=5)"
        ),
    )?;
    eventually(&netd, "agnat", "spoofed IPs counted", || {
        drops(&netd, "agnat", "atk", "drop_spoofed_ip") >= ip0 + 10
    });
    eventually(&netd, "agnat", "spoofed ARP counted", || {
        drops(&netd, "agnat", "atk", "drop_spoofed_arp") >= arp0 + 15
    });

    // 3. DHCP in the honest guest's name (dropped by the guard), RELEASE and DECLINE
    //    of its address in the attacker's own name (refused by the server), and a
    //    REQUEST without DISCOVER.
    scapy(
        &atk,
        dir.path(),
        &format!(
            "sendp(dhcp('{atk_mac}', '{router}', '{atk_ip}', '10.0.2.2', '{HONEST_MAC}', '{hon_ip}', [('message-type', 'release'), ('server_id', '10.0.2.2')]), iface=IFACE, count=3)\n\
             sendp(dhcp('{atk_mac}', 'ff:ff:ff:ff:ff:ff', '0.0.0.0', '255.255.255.255', '{HONEST_MAC}', '0.0.0.0', [('message-type', 'decline'), ('requested_addr', '{hon_ip}'), ('server_id', '10.0.2.2')]), iface=IFACE, count=3)\n\
             sendp(dhcp('{atk_mac}', '{router}', '{atk_ip}', '10.0.2.2', '{atk_mac}', '{hon_ip}', [('message-type', 'release'), ('server_id', '10.0.2.2')]), iface=IFACE, count=1)\n\
             sendp(dhcp('{atk_mac}', 'ff:ff:ff:ff:ff:ff', '0.0.0.0', '255.255.255.255', '{atk_mac}', '0.0.0.0', [('message-type', 'decline'), ('requested_addr', '{hon_ip}'), ('server_id', '10.0.2.2')]), iface=IFACE, count=1)\n\
             sendp(dhcp('{atk_mac}', 'ff:ff:ff:ff:ff:ff', '0.0.0.0', '255.255.255.255', '{atk_mac}', '0.0.0.0', [('message-type', 'request'), ('requested_addr', '10.0.2.77')]), iface=IFACE, count=1)"
        ),
    )?;
    eventually(&netd, "agnat", "spoofed chaddr counted", || {
        drops(&netd, "agnat", "atk", "drop_spoofed_dhcp") >= 6
    });
    eventually(&netd, "agnat", "foreign RELEASE/DECLINE counted", || {
        dhcp_stat(&netd, "agnat", "foreign_release") >= 2
    });
    eventually(&netd, "agnat", "REQUEST without DISCOVER NAKed", || {
        dhcp_stat(&netd, "agnat", "nak_unoffered") >= 1
    });
    let leases = netd.cli_json(&["leases", "agnat"])?;
    assert!(
        !has_item(&leases, |l| l["ip"] == "10.0.2.77"),
        "no lease for the undiscovered REQUEST: {leases}"
    );
    assert_eq!(
        lease_of(&netd, "agnat", HONEST_MAC),
        Some((hon_ip.clone(), hon_expires)),
        "the honest lease is untouched"
    );

    // 4. A flood of unicast REQUESTs (renewals of its own lease, each one a lease
    //    write) to the gateway while the honest guest downloads 64 MiB through the
    //    router.
    let dl = |what: &str| -> Result<f64> {
        let file = dir.path().join(format!("dl-{what}.bin"));
        let t = hon.sh(&format!(
            "curl -sS --max-time 60 -o {} -w '%{{time_total}}' http://10.0.2.2:18089/big.bin",
            file.display()
        ))?;
        let sum = hon.sh(&format!("sha256sum < {}", file.display()))?;
        assert_eq!(sum, want, "{what}: the honest guest's download is intact");
        std::fs::remove_file(&file)?;
        Ok(t.trim().parse()?)
    };
    let alone = dl("alone")?;
    let commits_before = dhcp_stat(&netd, "agnat", "commits");
    let flood = scapy_file(
        dir.path(),
        &atk.tap,
        &format!(
            "p = [dhcp('{atk_mac}', '{router}', '{atk_ip}', '10.0.2.2', '{atk_mac}', '{atk_ip}', [('message-type', 'request')]) for _ in range(3000)]\n\
             sendp(p, iface=IFACE, loop=1, count=3)"
        ),
    )?;
    let mut flooder = atk.spawn(&["/usr/bin/python3", flood.to_str().unwrap()])?;
    // Download once the flood is under way (the server is writing leases); scapy
    // takes a while to build 3000 frames on a loaded host.
    eventually_for(
        Duration::from_secs(60),
        &netd,
        "agnat",
        "the REQUEST flood reaches the server",
        || dhcp_stat(&netd, "agnat", "commits") > commits_before + 20,
    );
    let during = dl("during")?;
    let still_flooding = flooder.child().try_wait()?.is_none();
    let ping = hon.sh("ping -c 5 -i 0.1 -W 1 10.0.2.2 | tail -1")?;
    flooder
        .wait_timeout(Duration::from_secs(60))
        .context("the flood ended")?;
    let commits = dhcp_stat(&netd, "agnat", "commits") - commits_before;
    eprintln!(
        "figures: 64 MiB download alone {alone}s, during a 9000-REQUEST flood {during}s \
         (flood still running at its end: {still_flooding}); ping during the flood: {ping}; \
         lease writes for the flood: {commits}; stats: {}",
        netd.cli(&["leases", "agnat", "--stats"])?
    );
    assert!(commits >= 1, "the renewals were written");
    assert!(
        commits < 9000,
        "group commit: fewer writes than ACKs ({commits})"
    );

    // The honest guest: same lease, ping and a fresh renewal still work.
    assert_eq!(
        lease_of(&netd, "agnat", HONEST_MAC).map(|l| l.0),
        Some(hon_ip.clone())
    );
    assert!(ping_retry(&hon, "10.0.2.2", 3), "honest guest still pings");
    assert_eq!(dhcp(&hon, &hon.tap, dir.path())?, hon_ip, "and renews");
    let table = netd.cli(&["port", "list", "agnat", "--drops"])?;
    assert!(table.contains("SPOOFED-MAC"), "{table}");
    assert_eq!(drops(&netd, "agnat", "hon", "drop_spoofed_mac"), 0);
    assert_eq!(drops(&netd, "agnat", "hon", "drop_spoofed_ip"), 0);
    assert!(netd.stop());
    Ok(())
}

#[test]
fn internal_dhcp_guard_drops_spoofing_and_caps_an_unguarded_port() -> Result<()> {
    let dir = root_tempdir();
    let [hon, srv, atk, off] = TapHost::each(["agih", "agis", "agia", "agio"])?;
    let net = network(
        "agint",
        "internal",
        "subnet = \"10.77.0.0/24\"\ndhcp = true\nmax_macs_per_port = 16\n",
    ) + &hon.port("hon")
        + &format!("mac = \"{HONEST_MAC}\"\n")
        + &srv.port("srv")
        + &atk.port("atk")
        + &off.port("off")
        + "guard = \"off\"\n";
    let (_host, netd) = start_netd(dir.path(), "agi", &net)?;
    let hon_ip = dhcp(&hon, &hon.tap, dir.path())?;
    let srv_ip = dhcp(&srv, &srv.tap, dir.path())?;
    let atk_ip = dhcp(&atk, &atk.tap, dir.path())?;
    let atk_mac = mac_of(&atk, &atk.tap)?;
    let dhcp_mac = service_mac(&netd, "agint", "dhcp")?;
    let (_httpd, want) = web_server(&srv, dir.path(), "f.bin", 16, &srv_ip, "18090")?;
    assert!(ping_retry(&hon, &srv_ip, 3));

    scapy(
        &atk,
        dir.path(),
        &format!(
            "sendp(arp_claim('{dhcp_mac}', '10.77.0.1'), iface=IFACE, count=5)\n\
             sendp(Ether(src='{HONEST_MAC}', dst='ff:ff:ff:ff:ff:ff') / IP(src='{hon_ip}', dst='{srv_ip}') / ICMP(), iface=IFACE, count=5)\n\
             sendp(arp_claim('{atk_mac}', '{srv_ip}'), iface=IFACE, count=5)\n\
             sendp(arp_claim('{atk_mac}', '10.77.0.1'), iface=IFACE, count=5)\n\
             sendp(Ether(src='{atk_mac}', dst='ff:ff:ff:ff:ff:ff') / IP(src='{srv_ip}', dst='{hon_ip}') / TCP(dport=18090, flags='S'), iface=IFACE, count=5)\n\
             sendp(dhcp('{atk_mac}', 'ff:ff:ff:ff:ff:ff', '0.0.0.0', '255.255.255.255', '{HONEST_MAC}', '{hon_ip}', [('message-type', 'release'), ('server_id', '10.77.0.1')]), iface=IFACE, count=3)\n\
             sendp(dhcp('{atk_mac}', 'ff:ff:ff:ff:ff:ff', '0.0.0.0', '255.255.255.255', '{atk_mac}', '0.0.0.0', [('message-type', 'request'), ('requested_addr', '10.77.0.200')]), iface=IFACE, count=1)"
        ),
    )?;
    eventually(&netd, "agint", "spoofed MACs", || {
        drops(&netd, "agint", "atk", "drop_spoofed_mac") >= 10
    });
    eventually(&netd, "agint", "ARP claims", || {
        drops(&netd, "agint", "atk", "drop_spoofed_arp") >= 10
    });
    eventually(&netd, "agint", "spoofed IP", || {
        drops(&netd, "agint", "atk", "drop_spoofed_ip") >= 5
    });
    eventually(&netd, "agint", "spoofed chaddr", || {
        drops(&netd, "agint", "atk", "drop_spoofed_dhcp") >= 3
    });
    eventually(&netd, "agint", "undiscovered REQUEST NAKed", || {
        dhcp_stat(&netd, "agint", "nak_unoffered") >= 1
    });

    // The unguarded port floods made-up MACs: it keeps 16 at most.
    scapy(
        &off,
        dir.path(),
        "sendp([Ether(src=RandMAC('02:*:*:*:*:*'), dst='ff:ff:ff:ff:ff:ff') / IP(src='10.77.0.250', dst='10.77.0.255') / UDP(dport=9) for _ in range(1000)], iface=IFACE)",
    )?;
    eventually(&netd, "agint", "MAC cap", || {
        drops(&netd, "agint", "off", "drop_mac_limit") >= 900
    });
    let table = netd.cli_json(&["mac", "agint"])?;
    let on_off = table
        .as_array()
        .map_or(0, |a| a.iter().filter(|e| e["port"] == "off").count());
    assert!(on_off <= 16, "{on_off} MACs on the unguarded port");
    assert!(
        has_item(&table, |e| e["mac"] == HONEST_MAC && e["port"] == "hon"),
        "{table}"
    );

    // The honest guest: lease, ping, download.
    assert_eq!(
        lease_of(&netd, "agint", HONEST_MAC).map(|l| l.0),
        Some(hon_ip.clone())
    );
    assert!(
        ping_retry(&hon, &srv_ip, 3),
        "honest guest still reaches srv"
    );
    let got = hon.sh(&format!(
        "curl -sS --max-time 30 http://{srv_ip}:18090/f.bin | sha256sum"
    ))?;
    assert_eq!(got, want, "download intact");
    assert!(
        ping_retry(&hon, &atk_ip, 3),
        "the attacker's own address still works"
    );
    assert!(netd.stop());
    Ok(())
}

/// A guest with a static address (no DHCP) on a DHCP network is bound to the first
/// address it uses: another guest sending from it, or claiming it by ARP, is
/// dropped and counted; so are ARP claims of the gateway and the DHCP server; the
/// bound guest cannot move to a second address while the first is live; once it
/// has been silent for `mac_ageing` the address is free for the other guest.
#[test]
fn static_guest_is_bound_to_its_first_address_until_it_ages_out() -> Result<()> {
    let dir = root_tempdir();
    let [hon, st, thief] = TapHost::each(["agsh", "agss", "agst"])?;
    let net = network(
        "agstat",
        "internal",
        "subnet = \"10.78.0.0/24\"\ndhcp = true\ndhcp_server = \"10.78.0.2\"\nmac_ageing = 5\n",
    ) + &hon.port("hon")
        + &st.port("st")
        + &thief.port("thief");
    let (_host, netd) = start_netd(dir.path(), "ags", &net)?;
    let hon_ip = dhcp(&hon, &hon.tap, dir.path())?;
    // The static guest takes .50 (outside the DHCP range) and uses it: bound.
    st.addr("10.78.0.50/24")?;
    assert!(ping_retry(&st, &hon_ip, 3), "static guest works");
    let thief_mac = mac_of(&thief, &thief.tap)?;
    let server = "10.78.0.2";

    // The static guest keeps using .50 (a binding is live while used) while the
    // thief takes the same address (its kernel and crafted frames), and claims the
    // gateway's and the DHCP server's addresses by ARP.
    let keepalive = st.spawn(&["ping", "-q", "-i", "0.2", &hon_ip])?;
    thief.addr("10.78.0.50/24")?;
    let (ip0, arp0) = (
        drops(&netd, "agstat", "thief", "drop_spoofed_ip"),
        drops(&netd, "agstat", "thief", "drop_spoofed_arp"),
    );
    assert!(
        !ping(&thief, &hon_ip),
        "the thief's ping from a bound address"
    );
    scapy(
        &thief,
        dir.path(),
        &format!(
            "sendp(Ether(src='{thief_mac}', dst='ff:ff:ff:ff:ff:ff') / IP(src='10.78.0.50', dst='{hon_ip}') / ICMP(), iface=IFACE, count=5)\n\
             sendp(arp_claim('{thief_mac}', '10.78.0.50'), iface=IFACE, count=5)\n\
             sendp(arp_claim('{thief_mac}', '10.78.0.1'), iface=IFACE, count=5)\n\
             sendp(arp_claim('{thief_mac}', '{server}'), iface=IFACE, count=5)"
        ),
    )?;
    eventually(
        &netd,
        "agstat",
        "the bound address from another MAC",
        || drops(&netd, "agstat", "thief", "drop_spoofed_ip") >= ip0 + 5,
    );
    eventually(
        &netd,
        "agstat",
        "ARP claims of bound and service addresses",
        || drops(&netd, "agstat", "thief", "drop_spoofed_arp") >= arp0 + 15,
    );
    // The honest pair is untouched: hon still reaches the static guest at .50.
    assert!(
        ping_retry(&hon, "10.78.0.50", 3),
        "hon reaches the bound guest"
    );
    let hon_mac = mac_of(&hon, &hon.tap)?;
    let st_neigh = hon.sh(&format!("ip neigh show 10.78.0.50 dev {}", hon.tap))?;
    assert!(
        st_neigh.contains(&mac_of(&st, &st.tap)?),
        "hon's ARP entry for .50 is the static guest's: {st_neigh} (hon {hon_mac})"
    );

    // The bound guest may not move to a second address while the first is live.
    let st_ip0 = drops(&netd, "agstat", "st", "drop_spoofed_ip");
    st.exec(&["ip", "addr", "add", "10.78.0.51/24", "dev", &st.tap])?;
    assert!(!st
        .command(&["ping", "-c", "1", "-W", "1", "-I", "10.78.0.51", &hon_ip])
        .status()?
        .success());
    assert!(ping(&st, &hon_ip), "its first address still works");
    eventually(&netd, "agstat", "a second static address", || {
        drops(&netd, "agstat", "st", "drop_spoofed_ip") > st_ip0
    });

    // The static guest goes silent; after mac_ageing (5 s) its address is free.
    drop(keepalive);
    st.exec(&["ip", "link", "set", "dev", &st.tap, "down"])?;
    std::thread::sleep(Duration::from_secs(7));
    hon.exec(&["ip", "neigh", "flush", "dev", &hon.tap])?;
    assert!(
        ping_retry(&thief, &hon_ip, 5),
        "the aged-out address is the next guest's\n{}",
        netd.cli(&["port", "list", "agstat", "--drops"])?
    );
    assert!(netd.stop());
    Ok(())
}
