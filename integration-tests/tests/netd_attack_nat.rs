//! Attacks on the NAT router (issue 11), end to end: hostile guests on a NAT network
//! send what used to kill the router or reach too far, while an honest guest on the
//! same network and a guest on a hostonly network keep working.
//!
//! ```text
//!   atk, bh, hon --TAPs-- [natk: NAT 10.0.2.0/24]  [netd, lab host ns]  -- inet ns
//!   ho ----------TAP----- [hoatk: hostonly 192.168.56.0/24, host TAP .1]
//! ```
//!
//! - `atk` (scapy frames from its namespace, Debian's python3-scapy under /usr/bin/python3): a SYN from 0.0.0.0 to the DNS address
//!   (smoltcp's `assert!(!dst.is_unspecified())` ended the router's thread), a SYN
//!   from port 0 (left a LISTEN socket that adopted the next guest's connection), a
//!   SYN straight to 127.0.0.1:8080; then through its kernel: a UDP flood beyond
//!   `max_flows_per_guest` (the excess gets ICMP unreachables), connects to the
//!   gateway (no `host_loopback`), to a host address, to the hostonly guest.
//! - `bh`: connects to a black hole beyond `max_pending_per_guest` (RSTs at once).
//! - `hon`: DHCP, ping of the gateway, a download from the "internet" namespace,
//!   before and after, and after the router was made to panic (the supervisor's
//!   test: the `nat_fault` request, allowed by `NETD_FAULT_INJECTION=1`).
//! - `ho` (hostonly): its web server is reached from the host and it pings the host
//!   throughout.
//! - the port supervisor: a test-only fault frame (ethertype 0x88b6, "netd-fault",
//!   honoured only with `NETD_FAULT_INJECTION=1`) panics `atk`'s receive thread; it
//!   is restarted and counted in the port's `restarts`.
//!
//! Every refusal is checked in `netd flows natk --stats`. The attackers' ports have
//! `guard = "off"`: these are the router's own checks, which hold behind the port
//! guard too (netd_attack_guard proves the guard).

mod nat_common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::netd::{network, TapHost};
use integration_tests::wait_until;
use nat_common::{Lab, INET_SERVER};

/// The router's counters.
fn stats(lab: &Lab) -> Result<serde_json::Value> {
    let out = lab.cli(&["--json", "flows", "natk", "--stats"])?;
    serde_json::from_str(&out).with_context(|| format!("stats: {out}"))
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {v}"))
}

/// The address in a lease line of `Lab::dhcp` (`ip=A.B.C.D ...`); `what` names
/// the lease in the error.
fn lease_ip(lease: &str, what: &str) -> Result<String> {
    lease
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .map(str::to_string)
        .with_context(|| format!("{what}: {lease}"))
}

/// The router's MAC as the guest `g` learns it (a ping to 10.0.2.2, then its
/// neighbour table): where crafted frames must go.
fn router_mac(g: &TapHost) -> Result<String> {
    g.sh("ping -c 1 -W 5 10.0.2.2")?;
    let neigh = g.sh(&format!("ip neigh show 10.0.2.2 dev {}", g.tap))?;
    neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_string)
        .context("router MAC")
}

/// Python that opens `flows` UDP sockets to the internet's echo server, each
/// sending one datagram, `gap` seconds apart; the script goes on with them in
/// `socks`.
fn udp_flood(flows: u32, gap: f64) -> String {
    format!(
        r#"
import socket, time
socks = []
for n in range({flows}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("{INET_SERVER}", 7777))
    s.send(b"flood")
    socks.append(s)
    time.sleep({gap})"#
    )
}

/// The honest guest's checks: ping the gateway, download a file from the internet
/// namespace byte for byte.
fn honest_works(lab: &Lab, hon: &TapHost, sum: &str) -> Result<()> {
    hon.sh("ping -c 1 -W 5 10.0.2.2")
        .with_context(|| format!("honest guest pings the gateway\n{}", lab.netd_log()))?;
    let got = hon
        .sh(&format!(
            "curl -sS --max-time 20 http://{INET_SERVER}/big.bin | sha256sum"
        ))
        .with_context(|| format!("honest download\n{}", lab.netd_log()))?;
    ensure!(got == sum, "download corrupted: {got} vs {sum}");
    Ok(())
}

/// The hostonly guest's checks: the host reaches its server, it pings the host.
fn hostonly_works(lab: &Lab, ho: &TapHost, ho_ip: &str) -> Result<()> {
    let page = lab.host.sh(&format!(
        "curl -sS --max-time 10 http://{ho_ip}:8000/index.html"
    ))?;
    ensure!(page.contains("hostonly guest"), "hostonly page: {page}");
    ho.sh("ping -c 1 -W 5 192.168.56.1")?;
    Ok(())
}

/// How long a command takes and whether it failed.
fn fails_fast(ns: &TapHost, line: &str) -> (bool, Duration) {
    let t = Instant::now();
    let failed = ns.sh(line).is_err();
    (failed, t.elapsed())
}

#[test]
fn nat_attacks_are_dropped_counted_and_others_keep_working() -> Result<()> {
    let mut lab = Lab::new()?;
    let [atk, bh, hon, ho] = TapHost::each(["xatk", "xbh", "xhon", "xho"])?;
    // A file to download from the internet namespace, and the hostonly guest's page.
    let big: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(lab.dir.path().join("www-inet/big.bin"), &big)?;
    let sum = lab
        .host
        .sh(&format!("sha256sum < {}", lab.path("www-inet/big.bin")))?;
    let ho_root = lab.dir.path().join("www-ho");
    std::fs::create_dir_all(&ho_root)?;
    std::fs::write(ho_root.join("index.html"), "hostonly guest\n")?;

    let config = lab.nat_network(
        "natk",
        "max_flows_per_guest = 16\nmax_pending_per_guest = 4\n",
    ) + &atk.port("atk")
        // The router's own checks, behind the port guard (which would drop the
        // 0.0.0.0 SYN first: netd_attack_guard proves it); an operator may turn it off.
        + "guard = \"off\"\n"
        + &bh.port("bh")
        + &hon.port("hon")
        + &network("hoatk", "hostonly", "host_ifname = \"vh-xatk\"\n")
        + &ho.port("ho");
    lab.start_netd_env(&config, &[("NETD_FAULT_INJECTION", "1")])?;

    // netd raised its open-file limit to the hard limit.
    let pid = lab.netd_pid().context("netd pid")?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open files limit")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    ensure!(f[3] == f[4], "soft limit not raised: {line}");

    // Everyone gets a lease.
    let atk_lease = lab.dhcp(&atk)?;
    lab.dhcp(&bh)?;
    let hon_lease = lab.dhcp(&hon)?;
    ensure!(hon_lease.contains("router=10.0.2.2"), "{hon_lease}");
    let ho_lease = lab.dhcp(&ho)?;
    let ho_ip = lease_ip(&ho_lease, "hostonly lease")?;
    let g = ho.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        "8000",
        "-h",
        ho_root.to_str().context("path")?,
    ])?;
    lab.keep(g);
    ensure!(
        wait_until(Duration::from_secs(5), || hostonly_works(&lab, &ho, &ho_ip)
            .is_ok()),
        "hostonly guest not reachable from the host"
    );
    honest_works(&lab, &hon, &sum)?;
    let before = stats(&lab)?;
    assert_eq!(counter(&before, "restarts"), 0);

    // 1. Crafted frames from the attacker (scapy): a SYN from 0.0.0.0 to the DNS
    // address, port 53 (the resolver listens: the connect succeeds), a SYN from
    // port 0 to the internet's web server, and a SYN straight to 127.0.0.1:8080.
    let atk_ip = lease_ip(&atk_lease, "attacker lease")?;
    let rmac = router_mac(&atk)?;
    let script = format!(
        r#"
from scapy.all import Ether, IP, TCP, sendp, get_if_hwaddr
import time
i = "{tap}"
me = get_if_hwaddr(i)
e = Ether(src=me, dst="{rmac}")
for _ in range(3):
    sendp(e / IP(src="0.0.0.0", dst="10.0.2.3") / TCP(sport=4242, dport=53, flags="S", seq=1000), iface=i, verbose=False)
    time.sleep(0.2)
sendp(e / IP(src="{atk_ip}", dst="{INET_SERVER}") / TCP(sport=0, dport=80, flags="S", seq=2000), iface=i, verbose=False)
sendp(e / IP(src="{atk_ip}", dst="127.0.0.1") / TCP(sport=4343, dport=8080, flags="S", seq=3000), iface=i, verbose=False)
"#,
        tap = atk.tap
    );
    std::fs::write(lab.dir.path().join("frames.py"), script)?;
    atk.sh(&format!("/usr/bin/python3 {}", lab.path("frames.py")))?;
    std::thread::sleep(Duration::from_millis(500));
    let s = stats(&lab)?;
    ensure!(
        counter(&s, "bad_source") >= 3,
        "SYN from 0.0.0.0 not dropped: {s}"
    );
    ensure!(counter(&s, "port_zero") >= 1, "port-0 SYN not dropped: {s}");
    ensure!(
        counter(&s, "denied_loopback") >= 1,
        "SYN to 127.0.0.1 not refused: {s}"
    );
    assert_eq!(counter(&s, "restarts"), 0, "the router died: {s}");
    let flows = lab.cli(&["--json", "flows", "natk"])?;
    ensure!(
        !flows.contains(&format!("{atk_ip}:0\"")),
        "a port-0 flow exists: {flows}"
    );
    // The honest guest's connection to the same server is its own.
    honest_works(&lab, &hon, &sum)?;

    // 2. A UDP flood from 40 source ports to the internet's echo server: 16 flows
    // (max_flows_per_guest) get their echo, the rest an ICMP unreachable at once.
    let flood = format!(
        r#"{}
time.sleep(1)
ok = err = 0
for s in socks:
    s.settimeout(0.5)
    try:
        s.recv(100)
        ok += 1
    except OSError:
        err += 1
print(ok, err)
"#,
        udp_flood(40, 0.005)
    );
    std::fs::write(lab.dir.path().join("flood.py"), flood)?;
    let out = atk.sh(&format!("python3 {}", lab.path("flood.py")))?;
    let counts: Vec<u32> = out
        .split_whitespace()
        .map(|w| w.parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(counts, [16, 24], "echoes and errors: {out}");
    let s = stats(&lab)?;
    ensure!(
        counter(&s, "guest_quota") >= 24,
        "quota refusals not counted: {s}"
    );
    let flows: serde_json::Value = serde_json::from_str(&lab.cli(&["--json", "flows", "natk"])?)?;
    let mine = integration_tests::items(&flows)
        .iter()
        .filter(|f| {
            f["guest"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("{atk_ip}:"))
        })
        .count();
    assert_eq!(mine, 16, "the attacker's flows: {flows}");
    honest_works(&lab, &hon, &sum)?;

    // 3. Black-hole connects from `bh` (198.19.99.1 is routed to the internet
    // namespace, which drops it): 4 stay pending, the others get a RST at once.
    let bh_script = r#"
import socket, errno, time
socks = []
fast = 0
for n in range(10):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("198.19.99.1", 80))
    socks.append(s)
time.sleep(1)
for s in socks:
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
        fast += 1
print(fast)
"#;
    std::fs::write(lab.dir.path().join("bh.py"), bh_script)?;
    let before_q = counter(&stats(&lab)?, "guest_quota");
    let out = bh.sh(&format!("python3 {}", lab.path("bh.py")))?;
    assert_eq!(out.trim(), "6", "connects refused at once");
    let s = stats(&lab)?;
    assert_eq!(counter(&s, "guest_quota") - before_q, 6, "{s}");
    honest_works(&lab, &hon, &sum)?;

    // 4. Reaching too far, each refused at once with a RST and counted: the
    // gateway (no host_loopback: the host's 127.0.0.1:8080 httpd is behind it), a
    // host address (198.18.0.1, with a server on it), the hostonly guest.
    let g = lab.host.spawn(&[
        "socat",
        "TCP-LISTEN:9090,bind=198.18.0.1,reuseaddr,fork",
        "EXEC:/bin/echo host-service",
    ])?;
    lab.keep(g);
    ensure!(
        wait_until(Duration::from_secs(5), || lab
            .host
            .sh("socat -T 2 - TCP:198.18.0.1:9090 </dev/null")
            .map(|o| o.contains("host-service"))
            .unwrap_or(false)),
        "host service not up"
    );
    let s0 = stats(&lab)?;
    for (target, what) in [
        ("http://10.0.2.2:8080/index.html", "the gateway"),
        ("http://198.18.0.1:9090/", "a host address"),
        (
            &format!("http://{ho_ip}:8000/index.html") as &str,
            "the hostonly guest",
        ),
    ] {
        let (failed, took) = fails_fast(&atk, &format!("curl -sS --max-time 10 {target}"));
        ensure!(failed, "{what} was reached");
        ensure!(took < Duration::from_secs(5), "{what}: no RST ({took:?})");
    }
    let s = stats(&lab)?;
    assert_eq!(
        counter(&s, "denied_host") - counter(&s0, "denied_host"),
        2,
        "{s}"
    );
    assert_eq!(
        counter(&s, "denied_policy") - counter(&s0, "denied_policy"),
        1,
        "{s}"
    );
    // The deny list holds the hostonly subnet and link-local; it changes at runtime.
    let list = lab.cli(&["outbound", "natk", "list"])?;
    ensure!(
        list.contains("169.254.0.0/16") && list.contains("192.168.56.0/24"),
        "{list}"
    );
    lab.cli(&[
        "outbound",
        "natk",
        "deny",
        "add",
        &format!("{INET_SERVER}/32"),
    ])?;
    let (failed, _) = fails_fast(
        &hon,
        &format!("curl -sS --max-time 10 http://{INET_SERVER}/"),
    );
    ensure!(failed, "denied destination reached");
    lab.cli(&[
        "outbound",
        "natk",
        "deny",
        "del",
        &format!("{INET_SERVER}/32"),
    ])?;
    // A bad CIDR is refused with a reason, and changes nothing.
    let err = lab
        .cli(&["outbound", "natk", "deny", "add", "198.19.0.10/8"])
        .expect_err("a CIDR with host bits was taken");
    ensure!(format!("{err:#}").contains("198.0.0.0/8"), "{err:#}");
    ensure!(
        !lab.cli(&["outbound", "natk", "list"])?.contains("/8"),
        "the bad CIDR was added"
    );
    honest_works(&lab, &hon, &sum)?;
    hostonly_works(&lab, &ho, &ho_ip)?;

    // 5. The supervisor: the router panics (fault injection) and is restarted, its
    // flows dropped and counted; the honest guest and the hostonly guest go on.
    let before = counter(&stats(&lab)?, "frames_in");
    send_fault(&lab)?;
    ensure!(
        wait_until(Duration::from_secs(5), || stats(&lab)
            .map(|s| counter(&s, "restarts") == 1)
            .unwrap_or(false)),
        "no restart counted"
    );
    ensure!(
        lab.netd_log().contains("NAT router panicked"),
        "restart not logged"
    );
    ensure!(
        counter(&stats(&lab)?, "frames_in") >= before,
        "counters kept"
    );
    honest_works(&lab, &hon, &sum)?;
    let lease = lab.dhcp(&hon)?;
    ensure!(lease.contains("ip=10.0.2."), "{lease}");
    hostonly_works(&lab, &ho, &ho_ip)?;

    // 6. The port supervisor: the fault frame (test-only, same variable) panics the
    // attacker port's receive thread; it is restarted and counted, and that port
    // and the others go on.
    let fault = format!(
        r#"
from scapy.all import Ether, Raw, sendp
sendp(Ether(dst="ff:ff:ff:ff:ff:ff", type=0x88b6) / Raw(b"netd-fault"), iface="{}", verbose=False)
"#,
        atk.tap
    );
    std::fs::write(lab.dir.path().join("fault.py"), fault)?;
    atk.sh(&format!("/usr/bin/python3 {}", lab.path("fault.py")))?;
    let restarts = |port: &str| -> Result<u64> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.cli(&["--json", "port", "list", "natk"])?)?;
        integration_tests::items(&v)
            .iter()
            .find(|p| p["name"] == port)
            .and_then(|p| p["counters"]["restarts"].as_u64())
            .with_context(|| format!("no port {port}: {v}"))
    };
    ensure!(
        wait_until(Duration::from_secs(5), || restarts("atk").ok() == Some(1)),
        "port restart not counted\n{}",
        lab.netd_log()
    );
    assert_eq!(restarts("hon")?, 0);
    ensure!(
        lab.netd_log().contains("port receive thread panicked"),
        "port restart not logged"
    );
    atk.sh("ping -c 1 -W 5 10.0.2.2")
        .context("the restarted port carries frames")?;
    honest_works(&lab, &hon, &sum)?;
    Ok(())
}

/// Sends the test-only `nat_fault` request for `natk` over the control socket.
fn send_fault(lab: &Lab) -> Result<()> {
    send_fault_to(lab, "natk")
}

/// Sends the test-only `nat_fault` request for `net` over the control socket.
fn send_fault_to(lab: &Lab, net: &str) -> Result<()> {
    let req = format!(r#"{{"cmd":"nat_fault","net":"{net}"}}"#);
    let out = lab.host.sh(&format!(
        "echo '{req}' | socat -t 5 - UNIX-CONNECT:{}",
        lab.control.display()
    ))?;
    ensure!(out.contains("\"ok\":true"), "nat_fault: {out}");
    Ok(())
}

/// Out of file descriptors (issue 11, finding 2): netd's soft limit is lowered at
/// run time (prlimit) to a few descriptors above what it holds; a guest's UDP flood
/// then finds no descriptors: those flows fail and are counted (`no_fds`), the
/// control socket's accept fails with EMFILE and backs off (a handful of log lines,
/// not a spin), and once descriptors are back the waiting CLI call is answered and
/// the honest guest's download works.
#[test]
fn nat_out_of_descriptors_fails_flows_cleanly_and_accept_backs_off() -> Result<()> {
    let mut lab = Lab::new()?;
    let [atk, hon] = TapHost::each(["xfa", "xfh"])?;
    let config = lab.nat_network("natf", "max_flows_per_guest = 1000\n")
        + &atk.port("atk")
        + &hon.port("hon");
    lab.start_netd(&config)?;
    lab.dhcp(&atk)?;
    lab.dhcp(&hon)?;
    let page = format!("curl -sS --max-time 10 http://{INET_SERVER}/index.html");
    hon.sh(&page)?;
    let pid = lab.netd_pid().context("netd pid")?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .context("no open files limit")?
        .to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let low = open + 20;
    integration_tests::sh(&format!("prlimit --pid {pid} --nofile={low}:{hard}"))?;

    // 200 UDP flows: about 20 get a socket, the rest find none.
    let flood = format!("{}\ntime.sleep(0.5)\n", udp_flood(200, 0.0));
    std::fs::write(lab.dir.path().join("fdflood.py"), flood)?;
    atk.sh(&format!("python3 {}", lab.path("fdflood.py")))?;

    // A CLI call now waits in the listener's backlog while accept fails.
    let answer = lab.path("stats.json");
    let netd = integration_tests::bin("netd");
    let g = lab.host.spawn(&[
        "sh",
        "-c",
        &format!(
            "{} --control {} --json flows natf --stats > {answer}.tmp && mv {answer}.tmp {answer}",
            netd.display(),
            lab.control.display()
        ),
    ])?;
    lab.keep(g);
    std::thread::sleep(Duration::from_secs(2));
    let spins = lab.netd_log().matches("control accept failed").count();
    ensure!(
        (1..=3).contains(&spins),
        "accept failures logged {spins} times in 2 s (want 1 to 3)\n{}",
        lab.netd_log()
    );
    ensure!(
        !std::path::Path::new(&answer).exists(),
        "answered without descriptors?"
    );

    // Descriptors back: the waiting call is answered, counting the failed flows.
    integration_tests::sh(&format!("prlimit --pid {pid} --nofile={hard}:{hard}"))?;
    ensure!(
        wait_until(Duration::from_secs(5), || std::path::Path::new(&answer)
            .exists()),
        "the CLI call was never answered\n{}",
        lab.netd_log()
    );
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&answer)?)?;
    ensure!(
        counter(&s, "no_fds") >= 150,
        "flows without descriptors: {s}"
    );
    hon.sh(&page)
        .with_context(|| format!("honest guest after the flood\n{}", lab.netd_log()))?;
    Ok(())
}

/// A NAT network with a single guest port, which the router reads on its own
/// thread (issue 11, finding 1: the port's receive side died with the router): the
/// SYN from 0.0.0.0 is dropped and counted, and after an injected panic the
/// restarted router still reads that port, so the guest keeps working.
#[test]
fn single_port_nat_survives_the_killer_syn_and_a_router_panic() -> Result<()> {
    let mut lab = Lab::new()?;
    let g = TapHost::new("xsg")?;
    // Unguarded, so that the 0.0.0.0 SYN reaches the router (see above).
    let config = lab.nat_network("nats", "") + &g.port("g") + "guard = \"off\"\n";
    lab.start_netd_env(&config, &[("NETD_FAULT_INJECTION", "1")])?;
    let lease = lab.dhcp(&g)?;
    ensure!(
        lab.netd_log()
            .contains("router reads the port on its thread"),
        "not an inline port"
    );
    let page = format!("curl -sS --max-time 10 http://{INET_SERVER}/index.html");
    g.sh(&page)?;
    let ip = lease_ip(&lease, "lease")?;
    let rmac = router_mac(&g)?;
    let script = format!(
        r#"
from scapy.all import Ether, IP, TCP, sendp, get_if_hwaddr
i = "{tap}"
e = Ether(src=get_if_hwaddr(i), dst="{rmac}")
for n in range(3):
    sendp(e / IP(src="0.0.0.0", dst="10.0.2.3") / TCP(sport=4242 + n, dport=53, flags="S"), iface=i, verbose=False)
sendp(e / IP(src="{ip}", dst="10.0.2.3") / TCP(sport=0, dport=53, flags="S"), iface=i, verbose=False)
"#,
        tap = g.tap
    );
    std::fs::write(lab.dir.path().join("killer.py"), script)?;
    g.sh(&format!("/usr/bin/python3 {}", lab.path("killer.py")))?;
    std::thread::sleep(Duration::from_millis(300));
    let s: serde_json::Value =
        serde_json::from_str(&lab.cli(&["--json", "flows", "nats", "--stats"])?)?;
    ensure!(counter(&s, "bad_source") >= 3, "{s}");
    ensure!(counter(&s, "port_zero") >= 1, "{s}");
    assert_eq!(counter(&s, "restarts"), 0, "{s}");
    g.sh(&page).context("guest after the killer SYN")?;

    send_fault_to(&lab, "nats")?;
    ensure!(
        wait_until(Duration::from_secs(5), || lab
            .cli(&["--json", "flows", "nats", "--stats"])
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .is_some_and(|v| counter(&v, "restarts") == 1)),
        "no restart"
    );
    g.sh("ping -c 1 -W 5 10.0.2.2")
        .with_context(|| format!("guest pings after the restart\n{}", lab.netd_log()))?;
    g.sh(&page).context("guest downloads after the restart")?;
    ensure!(
        !lab.netd_log().contains("giving it a thread"),
        "the port left the router"
    );
    Ok(())
}
