//! NAT network, end to end: a guest namespace on netd's NAT network gets a lease from
//! netd (busybox udhcpc), reaches the host's loopback through 10.0.2.2 (curl), reaches
//! a server in the "internet" namespace (curl), resolves a name through 10.0.2.3 (UDP
//! and TCP, to a dnsmasq in the internet namespace named by netd's resolv.conf),
//! pings it, exchanges UDP with it (socat), and gets a RST for a closed port.

mod nat_common;

use integration_tests::netd::TapHost;
use nat_common::{Lab, INET_NAME, INET_SERVER, PAGE};

fn nat_lab(isolated: bool) -> anyhow::Result<(Lab, TapHost)> {
    let mut lab = Lab::new()?;
    let guest = lab.start_one_guest_nat(
        "nat0",
        &format!("isolated = {isolated}\nhost_loopback = true"),
    )?;
    Ok((lab, guest))
}

#[test]
fn nat_guest_reaches_host_internet_dns_ping_udp() -> anyhow::Result<()> {
    let (mut lab, guest) = nat_lab(false)?;

    // DHCP from netd: address from .15, router 10.0.2.2, DNS 10.0.2.3.
    let lease = lab.dhcp(&guest)?;
    assert!(lease.contains("ip=10.0.2.15"), "lease: {lease}");
    assert!(lease.contains("router=10.0.2.2"), "lease: {lease}");
    assert!(lease.contains("dns=10.0.2.3"), "lease: {lease}");

    // The host's loopback through the gateway address.
    let page = guest.sh("curl -sS --max-time 10 http://10.0.2.2:8080/index.html")?;
    assert_eq!(page.trim(), format!("{PAGE} (host)"));

    // The internet, routed from the host namespace.
    let page = guest.sh(&format!(
        "curl -sS --max-time 10 http://{INET_SERVER}/index.html"
    ))?;
    assert_eq!(page.trim(), format!("{PAGE} (internet)"));

    // A bigger download, byte for byte (window scaling, many segments).
    let sum_host = lab
        .host
        .sh(&format!("sha256sum < {}", lab.path("www-host/big.bin")))?;
    let sum_guest = guest.sh("curl -sS --max-time 30 http://10.0.2.2:8080/big.bin | sha256sum")?;
    assert_eq!(sum_host, sum_guest);

    // An upload, guest to host, ended by the guest's FIN (half-close): the host
    // side sees EOF only after every byte.
    let got = lab.path("upload.sha");
    let g = lab.host.spawn(&[
        "socat",
        "-u",
        "TCP-LISTEN:9000,bind=127.0.0.1,reuseaddr",
        &format!("SYSTEM:sha256sum > {got}"),
    ])?;
    lab.keep(g);
    std::thread::sleep(std::time::Duration::from_millis(300));
    guest.sh(&format!(
        "socat -u FILE:{} TCP:10.0.2.2:9000",
        lab.path("www-host/big.bin")
    ))?;
    let ok = integration_tests::wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&got)
            .map(|s| s.len() > 64)
            .unwrap_or(false)
    });
    assert!(ok, "upload did not complete");
    assert_eq!(std::fs::read_to_string(&got)?, sum_host, "upload corrupted");

    // DNS through 10.0.2.3, over UDP (busybox nslookup) and TCP (a hand-made query).
    let out = guest.sh(&format!("busybox nslookup -type=a {INET_NAME} 10.0.2.3"))?;
    assert!(out.contains(INET_SERVER), "nslookup: {out}");
    let tcp_dns = format!(
        r#"
import socket, struct
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
for part in "{INET_NAME}".split("."):
    q += bytes([len(part)]) + part.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.create_connection(("10.0.2.3", 53), timeout=10)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
print(".".join(str(b) for b in r[-4:]))
"#
    );
    std::fs::write(lab.dir.path().join("tcpdns.py"), tcp_dns)?;
    let out = guest.sh(&format!("python3 {}", lab.path("tcpdns.py")))?;
    assert_eq!(out.trim(), INET_SERVER, "DNS over TCP");

    // ICMP echo to the internet host, real replies (and to the gateway itself).
    guest.sh(&format!("ping -c 2 -W 5 {INET_SERVER}"))?;
    guest.sh("ping -c 1 -W 5 10.0.2.2")?;

    // UDP exchange with the internet's echo server.
    let out = guest.sh(&format!(
        "echo udp-hello | socat -T 5 - UDP4:{INET_SERVER}:7777"
    ))?;
    assert_eq!(out.trim(), "udp-hello");

    // A closed port answers with a RST at once (curl fails fast, not by timeout).
    let t = std::time::Instant::now();
    let r = guest.sh(&format!("curl -sS --max-time 20 http://{INET_SERVER}:81/"));
    assert!(r.is_err(), "connect to a closed port succeeded");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "refused connect was not reset"
    );

    // The flows are listed (ICMP through a raw socket: ping sockets are not allowed
    // in this namespace, net.ipv4.ping_group_range is "1 0").
    let flows = lab.cli(&["flows", "nat0", "--json"])?;
    assert!(flows.contains("\"udp\""), "flows: {flows}");
    assert!(flows.contains("\"RAW\""), "flows: {flows}");
    assert!(flows.contains("10.0.2.15"), "flows: {flows}");
    // The same flows as a table: one row each, the state a plain word.
    let table = lab.cli(&["flows", "nat0"])?;
    assert!(
        table.starts_with("PROTO") && table.contains("HOST-PEER"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("udp ") && l.contains("10.0.2.15")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().any(|c| c == "RAW")),
        "{table}"
    );
    let stats = lab.cli(&["flows", "nat0", "--stats"])?;
    assert!(stats.contains("connect_failed"), "stats: {stats}");
    Ok(())
}

#[test]
fn nat_port_forward_reaches_guest_and_removal_cuts_it() -> anyhow::Result<()> {
    let (mut lab, guest) = nat_lab(false)?;
    lab.dhcp(&guest)?;
    let www = lab.path("www-host");
    let g = guest.spawn(&["busybox", "httpd", "-f", "-p", "10.0.2.15:80", "-h", &www])?;
    lab.keep(g);
    integration_tests::wait_until(std::time::Duration::from_secs(5), || {
        guest
            .sh("busybox wget -q -O /dev/null http://10.0.2.15/")
            .is_ok()
    });

    // With no forward, nothing outside reaches the guest: not the host, not the
    // internet (no route, and netd never routes in).
    assert!(lab
        .host
        .sh("curl -sS --max-time 3 http://10.0.2.15/")
        .is_err());
    assert!(lab
        .inet
        .sh("curl -sS --max-time 3 http://10.0.2.15/")
        .is_err());
    assert!(lab
        .host
        .sh("curl -sS --max-time 3 http://127.0.0.1:2280/")
        .is_err());

    let done = lab.cli(&[
        "forward",
        "add",
        "nat0",
        "tcp",
        "127.0.0.1:2280",
        "10.0.2.15:80",
    ])?;
    assert_eq!(
        done,
        "added tcp forward 127.0.0.1:2280 -> 10.0.2.15:80 on nat0\n"
    );
    let list = lab.cli(&["forward", "list", "nat0"])?;
    assert!(
        list.lines().any(|l| l
            .split_whitespace()
            .eq(["tcp", "127.0.0.1:2280", "10.0.2.15:80"])),
        "{list}"
    );
    let json = lab.cli(&["forward", "list", "nat0", "--json"])?;
    let json: serde_json::Value = serde_json::from_str(&json)?;
    assert!(
        json.as_array()
            .is_some_and(|a| a.iter().any(|f| f["host"] == "127.0.0.1:2280")),
        "{json}"
    );
    let page = lab
        .host
        .sh("curl -sS --max-time 10 http://127.0.0.1:2280/index.html")?;
    assert_eq!(page.trim(), format!("{PAGE} (host)"));

    // UDP forward to a guest echo server.
    let g = guest.spawn(&[
        "socat",
        "UDP4-RECVFROM:5353,bind=10.0.2.15,fork",
        "EXEC:/bin/cat",
    ])?;
    lab.keep(g);
    lab.cli(&[
        "forward",
        "add",
        "nat0",
        "udp",
        "127.0.0.1:2253",
        "10.0.2.15:5353",
    ])?;
    let (ok, echoed) = lab.udp_round_trip("UDP4:127.0.0.1:2253", "via-forward");
    assert!(ok, "udp forward: {echoed:?}");

    let done = lab.cli(&["forward", "del", "nat0", "tcp", "127.0.0.1:2280"])?;
    assert_eq!(done, "removed tcp forward 127.0.0.1:2280 on nat0\n");
    assert!(lab
        .host
        .sh("curl -sS --max-time 3 http://127.0.0.1:2280/")
        .is_err());
    let list = lab.cli(&["forward", "list", "nat0"])?;
    assert!(!list.contains("2280"), "{list}");
    // Deleting it again is a clear error.
    let e = lab
        .cli(&["forward", "del", "nat0", "tcp", "127.0.0.1:2280"])
        .unwrap_err();
    assert!(e.to_string().contains("no tcp forward"), "{e}");
    // A bad forward is refused with the reason.
    let e = lab
        .cli(&["forward", "add", "nat0", "tcp", "2282", "192.168.7.7:80"])
        .unwrap_err();
    assert!(e.to_string().contains("not in the network's subnet"), "{e}");

    // SIGTERM: clean exit; the forwards' host sockets close with the router.
    lab.cli(&["forward", "add", "nat0", "tcp", "2283", "10.0.2.15:80"])?;
    lab.host
        .sh("curl -sS --max-time 10 -o /dev/null http://127.0.0.1:2283/index.html")?;
    let st = lab.stop_netd().expect("netd exits on SIGTERM");
    assert!(st.success(), "exit status {st:?}");
    assert!(
        lab.host
            .sh("curl -sS --max-time 3 http://127.0.0.1:2283/")
            .is_err(),
        "forward socket still open"
    );
    Ok(())
}

#[test]
fn nat_config_forward_and_isolation() -> anyhow::Result<()> {
    // Two guests on an isolated NAT network: both reach the router, not each other.
    let mut lab = Lab::new()?;
    let [g1, g2] = TapHost::each(["ng", "ng"])?;
    lab.host
        .sh("echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range")?;
    let iso = lab.nat_network(
        "iso",
        r#"isolated = true

[[network.forward]]
proto = "tcp"
host = "2281"
guest = "10.0.2.15:80"
"#,
    );
    lab.start_netd(&[iso, g1.unnamed_port(), g2.unnamed_port()].concat())?;
    let l1 = lab.dhcp(&g1)?;
    let l2 = lab.dhcp(&g2)?;
    assert!(l1.contains("ip=10.0.2.15"), "{l1}");
    assert!(l2.contains("ip=10.0.2.16"), "{l2}");
    g1.sh("ping -c 1 -W 5 10.0.2.2")?;
    g2.sh("ping -c 1 -W 5 10.0.2.2")?;
    // Unprivileged ping sockets allowed in netd's namespace: ICMP goes through them.
    g1.sh(&format!("ping -c 2 -W 5 {}", nat_common::INET_SERVER))?;
    let flows = lab.cli(&["flows", "iso", "--json"])?;
    assert!(flows.contains("\"PING\""), "flows: {flows}");
    assert!(
        g1.sh("ping -c 1 -W 2 10.0.2.16").is_err(),
        "isolated guests see each other"
    );
    // The forward from the config file works.
    let www = lab.path("www-inet");
    let g = g1.spawn(&["busybox", "httpd", "-f", "-p", "10.0.2.15:80", "-h", &www])?;
    lab.keep(g);
    let mut page = String::new();
    integration_tests::wait_until(std::time::Duration::from_secs(5), || {
        page = lab
            .host
            .sh("curl -sS --max-time 3 http://127.0.0.1:2281/index.html")
            .unwrap_or_default();
        !page.is_empty()
    });
    assert_eq!(page.trim(), format!("{PAGE} (internet)"));
    Ok(())
}

#[test]
fn nat_jumbo_mtu_65520() -> anyhow::Result<()> {
    let mut lab = Lab::new()?;
    let guest = lab.start_one_guest_nat("jumbo", "mtu = 65520\nhost_loopback = true")?;
    lab.dhcp(&guest)?;
    let mtu = guest.sh(&format!("cat /sys/class/net/{}/mtu", guest.tap))?;
    assert_eq!(mtu.trim(), "65520");
    // Large ICMP echo answered by the router itself, unfragmented.
    guest.sh("ping -c 1 -W 5 -M do -s 60000 10.0.2.2")?;
    // A download with ~64 KiB segments, byte for byte.
    let sum_host = lab
        .host
        .sh(&format!("sha256sum < {}", lab.path("www-host/big.bin")))?;
    let sum_guest = guest.sh("curl -sS --max-time 30 http://10.0.2.2:8080/big.bin | sha256sum")?;
    assert_eq!(sum_host, sum_guest);
    Ok(())
}
