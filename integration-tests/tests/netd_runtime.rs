//! Networks changed at runtime, driven through the CLI as a user would: a network
//! added with `netd net add` serves DHCP to a namespace guest (busybox udhcpc) at
//! once; after a restart of netd the network, its port, its forward (proven with a
//! real HTTP connection through it) and its reservation (proven by the address
//! udhcpc leases) are all back; `net del` is refused while a guest port is
//! attached and then forced; a bad `--from` file is refused naming the key; a
//! corrupt state file is reported and set aside, the config file's networks
//! start; a network in both the config file and the state is a conflict shown in
//! `net list` and the log, the config file's winning. A vxlan flood list changed
//! at runtime is back after a restart (`netd vxlan show`), and an outbound deny
//! added at runtime still refuses a guest's curl to a server in another namespace
//! (busybox httpd) after a restart, and stays lifted once removed. `net del` lifts
//! the deleted network's subnet from the other NAT network's deny list at once and
//! ends a capture running on it: the CLI reports the statistics, tshark reads the
//! file.

mod netd_common;

use anyhow::{Context, Result};
use integration_tests::{free_port, wait_until, Netns};
use netd_common::*;

/// The `net list --json` row of `name`.
fn net_row(netd: &Netd, name: &str) -> Result<Option<serde_json::Value>> {
    let v = netd.cli_json(&["net", "list"])?;
    Ok(v.as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name).cloned()))
}

/// The MAC of `guest`'s TAP.
fn mac_of(guest: &TapHost) -> Result<String> {
    Ok(guest
        .sh(&format!("cat /sys/class/net/{}/address", guest.tap))?
        .trim()
        .to_string())
}

#[test]
fn a_runtime_network_serves_dhcp_at_once_and_all_of_it_survives_a_restart() -> Result<()> {
    let dir = root_tempdir();
    let guest = TapHost::new("rg")?;
    let resolv = loopback_resolv_conf(dir.path())?;
    let (host, netd) = start_netd(dir.path(), "rh", &network("base", "internal", ""))?;

    let out = netd.cli(&[
        "net",
        "add",
        "lab",
        "--mode",
        "nat",
        "--resolv-conf",
        resolv.to_str().unwrap(),
    ])?;
    assert_eq!(out, "added network lab\n");
    // A fixed MAC, as a VM's: the TAP netd makes again after the restart has it too.
    let mac = "52:54:00:12:34:77";
    netd.cli(&port_add(
        "lab",
        "tap",
        &guest.tap,
        &["--netns", guest.ns.name(), "--name", "g", "--mac", mac],
    ))?;
    let ip = dhcp(&guest, &guest.tap, dir.path())?;
    assert_eq!(ip, "10.0.2.15", "the runtime network serves DHCP at once");
    assert_eq!(mac_of(&guest)?, mac);

    let out = netd.cli(&[
        "reservation",
        "add",
        "lab",
        mac,
        "10.0.2.77",
        "--hostname",
        "web",
    ])?;
    assert_eq!(out, format!("reserved 10.0.2.77 for {mac} on lab\n"));
    let port = free_port().to_string();
    let host_addr = format!("127.0.0.1:{port}");
    netd.cli(&["forward", "add", "lab", "tcp", &host_addr, "10.0.2.77:80"])?;
    let row = net_row(&netd, "lab")?.context("lab listed")?;
    assert_eq!(row["source"], "api", "{row}");
    let base = net_row(&netd, "base")?.context("base listed")?;
    assert_eq!(base["source"], "config", "{base}");
    let table = netd.cli(&["net", "list"])?;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("lab ") && l.ends_with("api")),
        "{table}"
    );
    let state = std::fs::read_to_string(dir.path().join("state/runtime.json"))?;
    assert!(
        state.contains("10.0.2.77") && state.contains(&host_addr),
        "{state}"
    );

    let cfg = netd.config.clone();
    assert!(netd.stop(), "clean exit on SIGTERM");
    assert!(!guest.tap_exists(), "netd removed the guest's TAP on exit");

    // Restarted: the network, its port, its forward and its reservation are back.
    let netd = Netd::start(&host, dir.path(), &cfg)?;
    let row = net_row(&netd, "lab")?.context("lab is back")?;
    assert_eq!(row["source"], "api", "{row}");
    assert!(row.get("conflict").is_none(), "{row}");
    assert!(guest.tap_exists(), "the runtime port's TAP is back");
    assert_eq!(mac_of(&guest)?, mac, "with its MAC");
    let ports = netd.cli(&["port", "list", "lab"])?;
    assert!(ports.lines().any(|l| l.starts_with("g ")), "{ports}");
    let fwds = netd.cli(&["forward", "list", "lab"])?;
    assert!(
        fwds.lines().any(|l| l
            .split_whitespace()
            .eq(["tcp", host_addr.as_str(), "10.0.2.77:80"])),
        "{fwds}"
    );
    let res = netd.cli(&["reservation", "list", "lab"])?;
    assert!(
        res.lines()
            .any(|l| l.split_whitespace().eq([mac, "10.0.2.77", "web", "api"])),
        "{res}"
    );
    // The reservation, proven by the address a real client leases.
    let ip = dhcp(&guest, &guest.tap, dir.path())?;
    assert_eq!(ip, "10.0.2.77", "udhcpc leases the reserved address");
    // The forward, proven by a real connection through it.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "runtime-forward\n")?;
    let _httpd = guest.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        "10.0.2.77:80",
        "-h",
        www.to_str().unwrap(),
    ])?;
    let url = format!("http://{host_addr}/index.html");
    let mut page = String::new();
    let ok = wait_until(std::time::Duration::from_secs(10), || {
        page = host
            .sh(&format!("curl -sS --max-time 3 {url}"))
            .unwrap_or_default();
        page.trim() == "runtime-forward"
    });
    assert!(
        ok,
        "the restored forward reaches the guest: {page:?}\n{}",
        netd.log()
    );

    // A reservation removed at runtime stays removed.
    netd.cli(&["reservation", "del", "lab", mac])?;
    let e = cli_fails(&netd, &["reservation", "del", "lab", mac]);
    assert!(e.contains("no reservation"), "{e}");
    let netd = netd.restart(&host)?;
    let res = netd.cli_json(&["reservation", "list", "lab"])?;
    assert_eq!(res, serde_json::json!([]), "{res}");
    assert!(netd.stop());
    Ok(())
}

#[test]
fn net_del_is_refused_with_guest_ports_then_forced() -> Result<()> {
    let dir = root_tempdir();
    let guest = TapHost::new("dg")?;
    let (x, y) = unique_subnet();
    let (host, netd) = start_netd(dir.path(), "dh", &network("base", "internal", ""))?;
    let subnet = format!("10.{x}.{y}.0/24");
    netd.cli(&[
        "net", "add", "lab2", "--mode", "internal", "--subnet", &subnet, "--dhcp",
    ])?;
    add_tap_port(&netd, "lab2", &guest.tap, &guest.ns, "g")?;
    // A port added at runtime to a network of the config file lasts too.
    let other = TapHost::new("do")?;
    add_tap_port(&netd, "base", &other.tap, &other.ns, "o")?;

    let e = cli_fails(&netd, &["net", "del", "lab2"]);
    assert!(
        e.contains("guest ports (g)") && e.contains("--force"),
        "{e}"
    );
    assert!(net_row(&netd, "lab2")?.is_some(), "still there");
    assert!(guest.tap_exists());
    // A network of the config file is not the API's to remove.
    let e = cli_fails(&netd, &["net", "del", "base"]);
    assert!(
        e.contains("config file") && e.contains(netd.config.to_str().unwrap()),
        "{e}"
    );
    let e = cli_fails(&netd, &["net", "del", "nosuch"]);
    assert!(e.contains("no network named"), "{e}");

    let out = netd.cli(&["net", "del", "lab2", "--force"])?;
    assert_eq!(out, "removed network lab2\n");
    assert!(net_row(&netd, "lab2")?.is_none(), "gone");
    assert!(!guest.tap_exists(), "its port's TAP is removed");
    let netd = netd.restart(&host)?;
    assert!(net_row(&netd, "lab2")?.is_none(), "and stays gone");
    let ports = netd.cli(&["port", "list", "base"])?;
    assert!(ports.lines().any(|l| l.starts_with("o ")), "{ports}");
    assert!(
        other.tap_exists(),
        "the config network's runtime port is back"
    );
    // Removed at runtime, it stays removed.
    netd.cli(&["port", "del", "base", "o"])?;
    let netd = netd.restart(&host)?;
    let ports = netd.cli(&["port", "list", "base"])?;
    assert!(!ports.lines().any(|l| l.starts_with("o ")), "{ports}");
    assert!(netd.stop());
    Ok(())
}

#[test]
fn bad_tables_are_refused_naming_the_file_and_the_key() -> Result<()> {
    let dir = root_tempdir();
    let guest = TapHost::new("bg")?;
    let (x, y) = unique_subnet();
    let (_host, netd) = start_netd(dir.path(), "bh", &network("base", "internal", ""))?;
    let file = dir.path().join("lab.toml");
    let from = file.to_str().unwrap();

    // A value the config file would refuse, with the same words.
    std::fs::write(
        &file,
        format!("mode = \"internal\"\nsubnet = \"10.{x}.{y}.0/24\"\ndhcp = true\ndhcp_range = \"10.{x}.{y}.200-10.{x}.{y}.100\"\n"),
    )?;
    let e = cli_fails(&netd, &["net", "add", "lab", "--from", from]);
    assert!(e.contains(from) && e.contains("key `dhcp_range`"), "{e}");
    // An unknown key, in a nested table.
    std::fs::write(
        &file,
        "mode = \"internal\"\n[[port]]\nkind = \"tap\"\nifname = \"x\"\nbogus = 1\n",
    )?;
    let e = cli_fails(&netd, &["net", "add", "lab", "--from", from]);
    assert!(e.contains(from) && e.contains("bogus"), "{e}");
    // The file's name disagrees with the command line's.
    std::fs::write(&file, "name = \"other\"\nmode = \"internal\"\n")?;
    let e = cli_fails(&netd, &["net", "add", "lab", "--from", from]);
    assert!(e.contains("key `name`"), "{e}");
    assert!(net_row(&netd, "lab")?.is_none(), "nothing was added");

    // The daemon's own checks: a name in use, an interface in use.
    let e = cli_fails(&netd, &["net", "add", "base", "--mode", "internal"]);
    assert!(e.contains("already exists"), "{e}");
    add_tap_port(&netd, "base", &guest.tap, &guest.ns, "g")?;
    std::fs::write(
        &file,
        format!(
            "mode = \"internal\"\n[[port]]\nkind = \"tap\"\nifname = \"{}\"\n",
            guest.tap
        ),
    )?;
    let e = cli_fails(&netd, &["net", "add", "lab", "--from", from]);
    assert!(e.contains("already used"), "{e}");
    // A good file, with a flag on top.
    std::fs::write(&file, "mode = \"internal\"\nmtu = 1400\n")?;
    netd.cli(&["net", "add", "lab", "--from", from, "--mtu", "1300"])?;
    let row = net_row(&netd, "lab")?.context("added")?;
    assert_eq!(row["mtu"], 1300, "{row}");
    // And a reservation on a network without DHCP is refused.
    let e = cli_fails(
        &netd,
        &["reservation", "add", "lab", "52:54:00:00:00:01", "10.1.1.1"],
    );
    assert!(e.contains("dhcp"), "{e}");
    assert!(netd.stop());
    Ok(())
}

#[test]
fn a_corrupt_state_file_is_reported_and_the_config_networks_start() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("ch")?;
    let cfg = write_config(dir.path(), &network("base", "internal", ""));
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    let file = state.join("runtime.json");
    std::fs::write(&file, b"{\"version\":1,\"networks\":[{\"name\":\"x\",")?;
    let netd = Netd::start(&host, dir.path(), &cfg)?;
    assert!(net_row(&netd, "base")?.is_some(), "the config network runs");
    let log = netd.log();
    assert!(
        log.contains("the runtime state cannot be read")
            && log.contains(&format!("runtime state {} is corrupt", file.display())),
        "{log}"
    );
    let aside = state.join("runtime.json.corrupt");
    assert_eq!(
        std::fs::read(&aside)?,
        b"{\"version\":1,\"networks\":[{\"name\":\"x\",",
        "kept aside, whole"
    );
    // The state works again from here.
    netd.cli(&["net", "add", "lab", "--mode", "internal"])?;
    assert!(netd.stop());

    // The config file now has a network of the same name: it wins, and says so.
    let both = [
        network("base", "internal", ""),
        network("lab", "internal", "mtu = 1400\n"),
    ]
    .concat();
    let netd = Netd::start_with(&host, dir.path(), &both)?;
    let row = net_row(&netd, "lab")?.context("lab")?;
    assert_eq!(row["source"], "config", "{row}");
    assert_eq!(row["mtu"], 1400, "the config file's lab: {row}");
    let conflict = row["conflict"].as_str().unwrap_or_default();
    assert!(conflict.contains("added through the API"), "{row}");
    let table = netd.cli(&["net", "list"])?;
    assert!(
        table.contains("config!") && table.contains("lab: a network"),
        "{table}"
    );
    let log = netd.log();
    assert!(
        log.contains("WARN")
            && log.contains("the config file's network of that name wins")
            && log.contains(netd.config.to_str().unwrap())
            && log.contains(file.to_str().unwrap()),
        "the warning names both files: {log}"
    );
    // Dropping the API copy settles it.
    let out = netd.cli(&["net", "del", "lab"])?;
    assert!(out.contains("removed the API copy"), "{out}");
    let netd = netd.restart(&host)?;
    let row = net_row(&netd, "lab")?.context("lab")?;
    assert!(row.get("conflict").is_none(), "{row}");
    assert!(netd.stop());
    Ok(())
}

/// Whether `guest` fetches `url` (curl, short timeout).
fn fetches(guest: &TapHost, url: &str, want: &str) -> bool {
    guest
        .sh(&format!("curl -sS --max-time 3 {url}"))
        .is_ok_and(|p| p.trim() == want)
}

/// Leases an address for `guest` on a NAT network and routes through the router.
fn nat_dhcp(guest: &TapHost, dir: &std::path::Path) -> Result<()> {
    dhcp(guest, &guest.tap, dir)?;
    guest.sh(&format!(
        "ip route replace default via 10.0.2.2 dev {}",
        guest.tap
    ))?;
    Ok(())
}

/// The remotes `netd vxlan show NET PORT` lists.
fn flood_list(netd: &Netd, net: &str, port: &str) -> Result<serde_json::Value> {
    Ok(netd.cli_json(&["vxlan", "show", net, port])?["remotes"].clone())
}

#[test]
fn flood_list_and_outbound_changes_survive_a_restart() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("fh")?;
    let guest = TapHost::new("fg")?;
    let beyond = link_beyond(&host, "fb", "172.16.177")?;
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "beyond\n")?;
    let _httpd = beyond.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        "172.16.177.2:80",
        "-h",
        www.to_str().unwrap(),
    ])?;
    let keys = loopback_resolv_key(dir.path())?;
    let vx = format!(
        "\n[[network.port]]\nname = \"vx\"\nkind = \"vxlan\"\nvni = 42\nlocal = \"127.0.0.1\"\nport = {}\nremotes = [\"127.0.0.2\"]\n",
        free_port()
    );
    let cfg = [network("lab", "nat", &keys), guest.port("g"), vx].concat();
    let url = "http://172.16.177.2/index.html";

    let netd = Netd::start_with(&host, dir.path(), &cfg)?;
    nat_dhcp(&guest, dir.path())?;
    assert!(
        wait_until(std::time::Duration::from_secs(10), || fetches(
            &guest, url, "beyond"
        )),
        "the guest reaches the server beyond the host first: {}",
        netd.log()
    );
    netd.cli(&["vxlan", "remote", "add", "lab", "vx", "127.0.0.3"])?;
    netd.cli(&["vxlan", "remote", "del", "lab", "vx", "127.0.0.2"])?;
    assert_eq!(
        flood_list(&netd, "lab", "vx")?,
        serde_json::json!(["127.0.0.3"])
    );
    netd.cli(&["outbound", "lab", "deny", "add", "172.16.177.2/32"])?;
    assert!(!fetches(&guest, url, "beyond"), "denied at once");
    let state = std::fs::read_to_string(dir.path().join("state/runtime.json"))?;
    assert!(
        state.contains("127.0.0.3") && state.contains("172.16.177.2/32"),
        "{state}"
    );

    // Restarted: the flood list and the deny are as the API left them.
    let netd = netd.restart(&host)?;
    assert_eq!(
        flood_list(&netd, "lab", "vx")?,
        serde_json::json!(["127.0.0.3"]),
        "the runtime flood list is back"
    );
    let list = netd.cli(&["outbound", "lab", "list"])?;
    assert!(list.contains("172.16.177.2/32"), "{list}");
    nat_dhcp(&guest, dir.path())?;
    assert!(
        ping_retry(&guest, "10.0.2.2", 5),
        "the guest is on the network again"
    );
    assert!(
        !fetches(&guest, url, "beyond"),
        "the deny added at runtime holds after the restart"
    );
    // Lifted at runtime, it stays lifted.
    netd.cli(&["outbound", "lab", "deny", "del", "172.16.177.2/32"])?;
    let netd = netd.restart(&host)?;
    nat_dhcp(&guest, dir.path())?;
    assert!(
        wait_until(std::time::Duration::from_secs(10), || fetches(
            &guest, url, "beyond"
        )),
        "the lifted deny stays lifted: {}",
        netd.cli(&["outbound", "lab", "list"])?
    );
    assert!(netd.stop());
    Ok(())
}

#[test]
fn net_del_lifts_the_subnet_deny_and_ends_its_captures() -> Result<()> {
    let dir = root_tempdir();
    let guest = TapHost::new("ng")?;
    let keys = loopback_resolv_key(dir.path())?;
    let (_host, netd) = start_netd(dir.path(), "nh", &network("lab", "nat", &keys))?;
    let (x, y) = unique_subnet();
    let subnet = format!("10.{x}.{y}.0/24");
    let subnet6 = format!("fd42:{x}:{y}::/64");
    netd.cli(&[
        "net",
        "add",
        "lab2",
        "--mode",
        "internal",
        "--subnet",
        &subnet,
        "--dhcp",
        "--subnet6",
        &subnet6,
    ])?;
    add_tap_port(&netd, "lab2", &guest.tap, &guest.ns, "g")?;
    let list = netd.cli(&["outbound", "lab", "list"])?;
    assert!(list.contains(&subnet), "the NAT network denies it: {list}");
    assert!(list.contains(&subnet6), "and its IPv6 prefix: {list}");

    // A capture of lab2 to a file, while its guest leases an address.
    let file = dir.path().join("lab2.pcapng");
    let err = dir.path().join("capture.err");
    let mut cap = integration_tests::ChildGuard::new(
        std::process::Command::new(integration_tests::bin("netd"))
            .arg("--control")
            .arg(&netd.control)
            .args(["capture", "lab2", "-w"])
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()?,
    );
    assert!(
        wait_until(std::time::Duration::from_secs(5), || {
            std::fs::read_to_string(&err).is_ok_and(|s| s.contains("capturing on"))
        }),
        "{}",
        std::fs::read_to_string(&err)?
    );
    dhcp(&guest, &guest.tap, dir.path())?;

    netd.cli(&["net", "del", "lab2", "--force"])?;
    let st = cap
        .wait_timeout(std::time::Duration::from_secs(10))
        .context("the capture did not end with its network")?;
    let report = std::fs::read_to_string(&err)?;
    assert!(st.success(), "{st}: {report}");
    assert!(
        report.contains("frames written, 0 lost"),
        "the statistics came before the end: {report}"
    );
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(&file)
        .args(["-Y", "dhcp", "-T", "fields", "-e", "dhcp.option.dhcp"])
        .output()?;
    let dhcp_types = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dhcp_types.lines().any(|l| l.trim() == "5"),
        "tshark reads the ACK: {dhcp_types}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The other NAT network no longer denies the deleted network's subnet.
    let list = netd.cli(&["outbound", "lab", "list"])?;
    assert!(!list.contains(&subnet), "deny lifted at once: {list}");
    assert!(!list.contains(&subnet6), "the IPv6 one too: {list}");
    assert!(list.contains("169.254.0.0/16"), "the defaults stay: {list}");
    assert!(netd.stop());
    Ok(())
}
