//! Guest names in DNS (issue 17): a guest's DHCP hostname (busybox udhcpc `-x
//! hostname:NAME`) and a static `[[network.host]]` entry are answered by the
//! network's own DNS, A and PTR, under its domain and as bare labels, by busybox
//! nslookup from another guest; other names are forwarded to the host's resolver
//! (a dnsmasq in netd's namespace, on its loopback). Hostile input: a hostname that
//! is not a DNS label is not published, a malformed query is dropped; both are
//! counted (`netd dns NET --stats`) and the honest guests keep resolving. A
//! reservation's `hostname` is sent to its client (option 12, read back from
//! udhcpc) and published instead of the name the client sent, and a runtime
//! change of it reaches DNS at once.
//!
//! Three fronts: a NAT network (the router's 10.0.2.3), a hostonly network with
//! `dns` at its gateway (a host socket on the host TAP), an internal network with
//! `dns` at an address of its own (a service port of the switch).
//!
//! DNS over TCP: on the NAT network and the hostonly gateway, glibc's resolver with
//! `options use-vc` (every query over TCP, `getent`) gets the same answers: names,
//! the static entry, PTR, NXDOMAIN, and forwarded names (dnsmasq answers over TCP
//! too); `getent ahosts` sends A and AAAA pipelined on one connection; on NAT,
//! through `fd00::3` as well. Hostile TCP clients (a huge length prefix, garbage, a
//! connection held idle) are closed and counted while glibc keeps resolving, and
//! the loopback listener netd rewrites the NAT guests' connections to is not
//! reachable through the gateway.

mod netd_common;

use anyhow::{Context, Result};
use integration_tests::netd::{dnsmasq_argv, global6, ping6};
use integration_tests::{ChildGuard, Netns};
use netd_common::*;

/// What the upstream resolver answers for [`UP_NAME`].
const UP_ADDR: &str = "198.19.0.10";
const UP_NAME: &str = "www.fabric.test";

/// A dnsmasq on `host`'s loopback that knows only [`UP_NAME`]; returns it and the
/// resolv.conf that names it.
fn upstream(host: &Netns, dir: &std::path::Path) -> Result<(ChildGuard, String)> {
    let argv = dnsmasq_argv("127.0.0.1", &dir.join("dnsmasq.pid"), UP_NAME, UP_ADDR);
    let g = host.spawn(&argv.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok((g, loopback_resolv_conf(dir)?.display().to_string()))
}

/// `busybox nslookup [-type=T] NAME SERVER` in `ns`: (success, output).
fn nslookup(ns: &Netns, qtype: Option<&str>, name: &str, server: &str) -> (bool, String) {
    let t = qtype.map(|t| format!("-type={t}"));
    let mut argv = vec!["busybox", "nslookup"];
    argv.extend(t.as_deref());
    argv.extend([name, server]);
    match ns.command(&argv).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Asserts `name` resolves to `ip` through `server` from `ns` (type A: the
/// upstream dnsmasq refuses AAAA for its one name).
fn resolves(ns: &Netns, name: &str, server: &str, ip: &str) {
    let (ok, out) = nslookup(ns, Some("A"), name, server);
    assert!(
        ok && out.contains(&format!("Address: {ip}")),
        "{name} via {server}: want {ip}:\n{out}"
    );
}

/// Asserts `name` is NXDOMAIN through `server`.
fn nxdomain(ns: &Netns, name: &str, server: &str) {
    let (ok, out) = nslookup(ns, None, name, server);
    assert!(
        !ok && out.contains("NXDOMAIN"),
        "{name}: want NXDOMAIN:\n{out}"
    );
}

/// The network's DNS counters.
fn stats(netd: &Netd, net: &str) -> Result<serde_json::Value> {
    netd.cli_json(&["dns", net, "--stats"])
}

/// The common proof on one network: guest `a` took the name `alpha` by DHCP (at
/// `a_ip`), a static `files` entry is at `files_ip`; `b` asks `server`.
fn prove_names(
    netd: &Netd,
    net: &str,
    domain: &str,
    b: &Netns,
    server: &str,
    (a_ip, files_ip): (&str, &str),
) -> Result<()> {
    resolves(b, &format!("alpha.{domain}"), server, a_ip);
    resolves(b, &format!("ALPHA.{domain}"), server, a_ip);
    resolves(b, "alpha", server, a_ip);
    resolves(b, &format!("files.{domain}"), server, files_ip);
    resolves(b, "files", server, files_ip);
    // PTR of the guest and of the static entry.
    for (ip, name) in [(a_ip, "alpha"), (files_ip, "files")] {
        let (ok, out) = nslookup(b, None, ip, server);
        assert!(
            ok && out.contains(&format!("name = {name}.{domain}")),
            "PTR {ip}:\n{out}"
        );
    }
    // A known name has no IPv6: an empty answer, not NXDOMAIN.
    let (_, out) = nslookup(b, Some("AAAA"), &format!("alpha.{domain}"), server);
    assert!(
        !out.contains("NXDOMAIN") && !out.contains("Address: "),
        "AAAA of alpha: want an empty NOERROR answer:\n{out}"
    );
    nxdomain(b, &format!("nobody.{domain}"), server);
    nxdomain(b, "nobody", server);
    // The rest goes to the host's resolver.
    resolves(b, UP_NAME, server, UP_ADDR);
    // A malformed query (not DNS at all) is dropped and counted; DNS goes on.
    let before = stats(netd, net)?["malformed"]
        .as_u64()
        .context("malformed")?;
    b.sh(&format!(
        "echo 'not a dns query' | socat -u - UDP4-SENDTO:{server}:53"
    ))?;
    let counted = integration_tests::wait_until(std::time::Duration::from_secs(3), || {
        stats(netd, net).is_ok_and(|s| s["malformed"].as_u64() > Some(before))
    });
    assert!(counted, "malformed query counted: {}", stats(netd, net)?);
    resolves(b, "alpha", server, a_ip);
    let s = stats(netd, net)?;
    assert!(s["answered"].as_u64() >= Some(10), "{s}");
    assert!(s["nxdomain"].as_u64() >= Some(2), "{s}");
    assert!(s["forwarded"].as_u64() >= Some(1), "{s}");
    // The table, through the CLI.
    let names = netd.cli(&["dns", net])?;
    assert!(
        names.contains(&format!("alpha.{domain}")) && names.contains(&format!("files.{domain}")),
        "{names}"
    );
    Ok(())
}

/// DHCP with a hostname; returns (address, the domain option the client got).
fn dhcp_named(g: &TapHost, dir: &std::path::Path, name: &str) -> Result<(String, String)> {
    let hostname = format!("hostname:{name}");
    let ip = dhcp_with(g, &g.tap, dir, &["-x", &hostname])?;
    let lease = std::fs::read_to_string(dir.join(format!("lease-{}", g.tap)))?;
    let domain = lease
        .split_whitespace()
        .find_map(|w| w.strip_prefix("domain="))
        .unwrap_or_default()
        .to_string();
    Ok((ip, domain))
}

#[test]
fn nat_guests_resolve_each_other_through_the_router() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("dh")?;
    let (_up, resolv) = upstream(&host, dir.path())?;
    let [a, b, c] = TapHost::each(["da", "db", "dc"])?;
    let keys = format!(
        "resolv_conf = \"{resolv}\"\n[[network.host]]\nname = \"files\"\nip = \"10.0.2.9\"\n"
    );
    let cfg = [
        network("nat0", "nat", &keys),
        a.port("a"),
        b.port("b"),
        c.port("c"),
    ]
    .concat();
    let netd = Netd::start_with(&host, dir.path(), &cfg)?;
    let (a_ip, domain) = dhcp_named(&a, dir.path(), "alpha")?;
    assert_eq!(domain, "nat0.lab", "option 15: the default domain");
    let (b_ip, _) = dhcp_named(&b, dir.path(), "beta")?;
    // A hostile guest: a hostname that is not a label, then one that takes a
    // static entry's name. Neither is published.
    dhcp_named(&c, dir.path(), "evil_name")?;
    let refused = stats(&netd, "nat0")?["hostname_refused"].as_u64();
    assert_eq!(refused, Some(1), "{}", stats(&netd, "nat0")?);
    dhcp_named(&c, dir.path(), "files")?;
    assert_eq!(stats(&netd, "nat0")?["hostname_refused"].as_u64(), Some(2));
    nxdomain(&b, "evil_name.nat0.lab", "10.0.2.3");
    prove_names(
        &netd,
        "nat0",
        "nat0.lab",
        &b,
        "10.0.2.3",
        (&a_ip, "10.0.2.9"),
    )?;
    // And the other way round: A resolves B.
    resolves(&a, "beta.nat0.lab", "10.0.2.3", &b_ip);
    assert!(netd.stop(), "netd exits cleanly");
    Ok(())
}

/// netd with one network and two guests that took the names `alpha` and `beta`
/// by DHCP, the upstream dnsmasq in netd's namespace (fields drop in order:
/// netd first, the namespaces last).
struct TwoGuests {
    netd: Netd,
    a: TapHost,
    b: TapHost,
    a_ip: String,
    b_ip: String,
    /// The domain `alpha` got (option 15).
    domain: String,
    _up: ChildGuard,
    _host: Netns,
    dir: tempfile::TempDir,
}

/// [`TwoGuests`] on the network `net` (`mode`, `keys` after the resolver's), with
/// the static `files` at `files_ip`.
fn start_two(net: &str, mode: &str, keys: &str, files_ip: &str) -> Result<TwoGuests> {
    let dir = root_tempdir();
    let host = Netns::new("dh")?;
    let (up, resolv) = upstream(&host, dir.path())?;
    let [a, b] = TapHost::each(["da", "db"])?;
    let keys = format!(
        "resolv_conf = \"{resolv}\"\n{keys}[[network.host]]\nname = \"files\"\nip = \"{files_ip}\"\n"
    );
    let cfg = [network(net, mode, &keys), a.port("a"), b.port("b")].concat();
    let netd = Netd::start_with(&host, dir.path(), &cfg)?;
    let (a_ip, domain) = dhcp_named(&a, dir.path(), "alpha")?;
    let (b_ip, _) = dhcp_named(&b, dir.path(), "beta")?;
    Ok(TwoGuests {
        netd,
        a,
        b,
        a_ip,
        b_ip,
        domain,
        _up: up,
        _host: host,
        dir,
    })
}

/// Two guests `alpha` and `beta` on the network `net` (`mode`, `keys` after the
/// resolver's): `beta` proves the names through `server` (and over TCP if `tcp`);
/// the static `files` is at `files_ip`. Returns the lease line `beta` got.
fn two_guests(
    net: &str,
    mode: &str,
    keys: &str,
    (domain, server, files_ip): (&str, &str, &str),
    tcp: bool,
) -> Result<String> {
    let lab = start_two(net, mode, keys, files_ip)?;
    let (netd, b, a_ip) = (&lab.netd, &lab.b, &lab.a_ip);
    assert_eq!(lab.domain, domain, "option 15");
    let lease = std::fs::read_to_string(lab.dir.path().join(format!("lease-{}", b.tap)))?;
    prove_names(netd, net, domain, b, server, (a_ip, files_ip))?;
    if tcp {
        let _conf = TcpResolvConf::new(b, server)?;
        prove_names_tcp(netd, net, domain, b, (a_ip, files_ip))?;
        let malformed = stat(netd, net, "malformed");
        let (closed, secs) = hostile_tcp(b, server, "huge")?;
        assert!(closed && secs < 3.0, "huge: closed after {secs} s");
        assert_eq!(stat(netd, net, "malformed"), malformed + 1);
        getent_resolves(b, &format!("alpha.{domain}"), a_ip);
    }
    assert!(lab.netd.stop(), "netd exits cleanly");
    Ok(lease)
}

#[test]
fn hostonly_serves_names_on_the_gateway() -> Result<()> {
    let hif = integration_tests::unique_name("vh");
    let keys =
        format!("host_ifname = \"{hif}\"\ndns = \"192.168.56.1\"\ndomain = \"Lab.Example.\"\n");
    let lease = two_guests(
        "ho",
        "hostonly",
        &keys,
        ("lab.example", "192.168.56.1", "192.168.56.9"),
        true,
    )?;
    assert!(
        lease.contains(" 192.168.56.1 "),
        "option 6 is the gateway: {lease}"
    );
    Ok(())
}

#[test]
fn internal_serves_names_on_an_address_of_its_own() -> Result<()> {
    let keys = "subnet = \"10.77.0.0/24\"\ndhcp = true\ndns = \"10.77.0.53\"\n";
    let lease = two_guests(
        "in0",
        "internal",
        keys,
        ("in0.lab", "10.77.0.53", "10.77.0.9"),
        false,
    )?;
    assert!(lease.contains(" 10.77.0.53 "), "option 6: {lease}");
    Ok(())
}

/// The `hostname=` the client got (option 12) in its last lease.
fn sent_hostname(g: &TapHost, dir: &std::path::Path) -> Result<String> {
    let lease = std::fs::read_to_string(dir.join(format!("lease-{}", g.tap)))?;
    Ok(lease
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hostname="))
        .unwrap_or_default()
        .to_string())
}

#[test]
fn a_reservation_hostname_is_sent_and_resolves_from_another_guest() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("dh")?;
    let (_up, resolv) = upstream(&host, dir.path())?;
    let [a, b] = TapHost::each(["da", "db"])?;
    let mac = "52:54:00:aa:00:61";
    let keys = format!(
        "resolv_conf = \"{resolv}\"\n[[network.reservation]]\nmac = \"{mac}\"\nip = \"10.0.2.60\"\nhostname = \"db1\"\n"
    );
    let cfg = [
        network("nat0", "nat", &keys),
        a.port("a"),
        format!("mac = \"{mac}\"\n"),
        b.port("b"),
    ]
    .concat();
    let netd = Netd::start_with(&host, dir.path(), &cfg)?;
    // The reserved client sends a name of its own; the reservation's wins.
    let (a_ip, _) = dhcp_named(&a, dir.path(), "alpha")?;
    assert_eq!(a_ip, "10.0.2.60", "the reserved address");
    assert_eq!(sent_hostname(&a, dir.path())?, "db1", "option 12");
    let (b_ip, _) = dhcp_named(&b, dir.path(), "beta")?;
    assert_eq!(
        sent_hostname(&b, dir.path())?,
        "",
        "no option 12 unreserved"
    );
    resolves(&b, "db1.nat0.lab", "10.0.2.3", "10.0.2.60");
    resolves(&b, "db1", "10.0.2.3", "10.0.2.60");
    nxdomain(&b, "alpha.nat0.lab", "10.0.2.3");
    let (ok, out) = nslookup(&b, None, "10.0.2.60", "10.0.2.3");
    assert!(ok && out.contains("name = db1.nat0.lab"), "PTR:\n{out}");
    // Changed at runtime: DNS has the new name at once, the client gets it at
    // its next lease.
    netd.cli(&[
        "reservation",
        "add",
        "nat0",
        mac,
        "10.0.2.60",
        "--hostname",
        "db2",
    ])?;
    resolves(&b, "db2.nat0.lab", "10.0.2.3", "10.0.2.60");
    nxdomain(&b, "db1.nat0.lab", "10.0.2.3");
    dhcp_named(&a, dir.path(), "alpha")?;
    assert_eq!(sent_hostname(&a, dir.path())?, "db2");
    // The other guest's own name is untouched.
    resolves(&a, "beta.nat0.lab", "10.0.2.3", &b_ip);
    let names = netd.cli(&["dns", "nat0"])?;
    assert!(
        names.contains("db2.nat0.lab") && !names.contains("alpha"),
        "{names}"
    );
    assert!(netd.stop(), "netd exits cleanly");
    Ok(())
}

/// `/etc/netns/NS/resolv.conf` for the namespace `ns` (bind-mounted over
/// `/etc/resolv.conf` by `ip netns exec`): glibc asks `server` over TCP only.
struct TcpResolvConf(std::path::PathBuf);

impl TcpResolvConf {
    fn new(ns: &Netns, server: &str) -> Result<Self> {
        let dir = std::path::Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {server}\noptions use-vc timeout:2 attempts:1\n"),
        )?;
        Ok(TcpResolvConf(dir))
    }
}

impl Drop for TcpResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `getent DB KEY` in `ns`: (success, output).
fn getent(ns: &Netns, db: &str, key: &str) -> (bool, String) {
    match ns.command(&["getent", db, key]).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Asserts glibc in `ns` resolves `name` to `ip` (`getent hosts`).
fn getent_resolves(ns: &Netns, name: &str, ip: &str) {
    let (ok, out) = getent(ns, "hosts", name);
    assert!(
        ok && out.split_whitespace().next() == Some(ip),
        "getent hosts {name}: want {ip}: {out}"
    );
}

/// The network's counter `key`.
fn stat(netd: &Netd, net: &str, key: &str) -> u64 {
    stats(netd, net)
        .ok()
        .and_then(|s| s[key].as_u64())
        .unwrap_or(0)
}

/// The proof over TCP on one network, from `b` (whose resolv.conf names `server`
/// with `use-vc`): `a_ip` is `alpha`, `files_ip` the static `files`.
fn prove_names_tcp(
    netd: &Netd,
    net: &str,
    domain: &str,
    b: &Netns,
    (a_ip, files_ip): (&str, &str),
) -> Result<()> {
    let before = stats(netd, net)?;
    getent_resolves(b, &format!("alpha.{domain}"), a_ip);
    getent_resolves(b, &format!("files.{domain}"), files_ip);
    // PTR, glibc's way.
    let (ok, out) = getent(b, "hosts", a_ip);
    assert!(
        ok && out.contains(&format!("alpha.{domain}")),
        "getent hosts {a_ip}: {out}"
    );
    // A and AAAA pipelined on one connection (getaddrinfo, AF_UNSPEC).
    let (ok, out) = getent(b, "ahosts", &format!("alpha.{domain}"));
    assert!(ok && out.contains(a_ip), "getent ahosts alpha: {out}");
    // Unknown in the domain: NXDOMAIN, no forward.
    let (ok, out) = getent(b, "hosts", &format!("nobody.{domain}"));
    assert!(!ok, "nobody.{domain} must not resolve: {out}");
    // Outside the domain: forwarded to the host's resolver (over TCP).
    getent_resolves(b, UP_NAME, UP_ADDR);
    let after = stats(netd, net)?;
    let grew = |k: &str, n: u64| {
        let (x, y) = (before[k].as_u64(), after[k].as_u64());
        assert!(
            y >= x.map(|x| x + n),
            "{k}: want {n} more: {before} -> {after}"
        );
    };
    grew("tcp_connections", 6);
    grew("answered", 6);
    grew("nxdomain", 1);
    grew("forwarded", 1);
    Ok(())
}

/// A hostile TCP client of `server`:53: each case prints `CASE closed SECONDS`
/// when the server closed the connection, `CASE open` if it still held it.
const HOSTILE_TCP: &str = r#"
import socket, sys, time
server, case = sys.argv[1], sys.argv[2]
s = socket.create_connection((server, 53), timeout=5)
if case == "huge":
    s.sendall(b"\xff\xff")
elif case == "garbage":
    s.sendall(b"\x00\x14" + b"not a dns query!!!!!")
start = time.time()
s.settimeout(15)
try:
    closed = s.recv(100) == b""
except ConnectionResetError:
    closed = True
except socket.timeout:
    closed = False
print(case, "closed" if closed else "open", round(time.time() - start, 1))
"#;

/// Runs [`HOSTILE_TCP`] in `ns`: whether the server closed, and after how long.
fn hostile_tcp(ns: &Netns, server: &str, case: &str) -> Result<(bool, f64)> {
    let out = ns
        .command(&["python3", "-c", HOSTILE_TCP, server, case])
        .output()?;
    hostile_result(&out)
}

/// What a run of [`HOSTILE_TCP`] printed: whether it was closed, after how long.
fn hostile_result(out: &std::process::Output) -> Result<(bool, f64)> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut w = text.split_whitespace().skip(1);
    let closed = w.next() == Some("closed");
    let secs = w
        .next()
        .and_then(|t| t.parse().ok())
        .context(text.clone())?;
    Ok((closed, secs))
}

#[test]
fn nat_guests_resolve_each_other_over_tcp() -> Result<()> {
    let lab = start_two("nat0", "nat", "", "10.0.2.9")?;
    let (netd, a, b, a_ip, b_ip) = (&lab.netd, &lab.a, &lab.b, &lab.a_ip, &lab.b_ip);
    let host = &lab._host;
    let _conf = TcpResolvConf::new(b, "10.0.2.3")?;
    prove_names_tcp(netd, "nat0", "nat0.lab", b, (a_ip, "10.0.2.9"))?;

    // Hostile clients: a length beyond any query, then garbage, closed at once
    // and counted as malformed; the others go on resolving.
    let malformed = stat(netd, "nat0", "malformed");
    for case in ["huge", "garbage"] {
        let (closed, secs) = hostile_tcp(b, "10.0.2.3", case)?;
        assert!(closed && secs < 3.0, "{case}: closed after {secs} s");
        getent_resolves(b, "alpha.nat0.lab", a_ip);
    }
    assert_eq!(stat(netd, "nat0", "malformed"), malformed + 2);
    // A connection held idle is closed after the idle timeout (10 s), counted;
    // meanwhile glibc resolves from the other guest too.
    let timeouts = stat(netd, "nat0", "tcp_timeouts");
    let idle = b
        .command(&["python3", "-c", HOSTILE_TCP, "10.0.2.3", "idle"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    getent_resolves(b, "files.nat0.lab", "10.0.2.9");
    let _conf_a = TcpResolvConf::new(a, "10.0.2.3")?;
    getent_resolves(a, "beta.nat0.lab", b_ip);
    let (closed, secs) = hostile_result(&idle.wait_with_output()?)?;
    assert!(
        closed && (8.0..13.0).contains(&secs),
        "idle: closed {closed} after {secs} s"
    );
    assert_eq!(stat(netd, "nat0", "tcp_timeouts"), timeouts + 1);
    getent_resolves(b, "alpha.nat0.lab", a_ip);
    // IPv6: fd00::3 over TCP too. alpha's AAAA is the SLAAC address it used (the
    // guard binds it at first use); `getent hosts` asks AAAA, `ahosts` both.
    let a6 = global6(a, &a.tap, "fd00:")?;
    global6(b, &b.tap, "fd00:")?;
    assert!(ping6(a, "fd00::2"), "alpha uses its IPv6 address");
    let _conf6 = TcpResolvConf::new(b, "fd00::3")?;
    let conns = stat(netd, "nat0", "tcp_connections");
    getent_resolves(b, "alpha.nat0.lab", &a6);
    let (ok, out) = getent(b, "ahosts", "alpha.nat0.lab");
    assert!(
        ok && out.contains(a_ip.as_str()) && out.contains(&a6),
        "getent ahosts alpha via fd00::3: {out}"
    );
    getent_resolves(b, UP_NAME, UP_ADDR);
    assert!(stat(netd, "nat0", "tcp_connections") >= conns + 3);
    // The loopback listener the guests' connections are rewritten to is out of
    // their direct reach: the gateway stands for the host's loopback only with
    // `host_loopback`, so a connect to its port is refused.
    let ports = host.sh("ss -Hltn 'src 127.0.0.1' | awk '{print $4}'")?;
    let port = ports
        .lines()
        .filter_map(|l| l.rsplit(':').next()?.parse::<u16>().ok())
        .find(|p| *p != 53)
        .with_context(|| format!("netd's DNS-over-TCP listener: {ports}"))?;
    let probe = format!(
        "import socket\ntry:\n socket.create_connection(('10.0.2.2', {port}), timeout=3)\n print('open')\nexcept OSError as e:\n print('refused', e)\n"
    );
    let out = b.command(&["python3", "-c", &probe]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("refused"), "gateway:{port}: {text}");
    assert!(lab.netd.stop(), "netd exits cleanly");
    Ok(())
}
