//! netd's daemon surface: strict config errors, the control CLI changing ports at
//! runtime, readiness notification and SIGTERM cleanup.

mod netd_common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use integration_tests::{bin, has_item, run_failing, unique_name, wait_until, Netns};
use netd_common::*;

#[test]
fn bad_config_names_file_key_and_expectation() -> Result<()> {
    let dir = tempdir();
    let cases = [
        ("[[network]]\nname = \"a\"\nmode = \"internal\"\ncolour = \"red\"\n", "colour"),
        ("[[network]]\nname = \"a\"\nmode = \"internal\"\nsubnet = \"10.0.0.0/40\"\n", "network[0].subnet"),
        // nat and bridged are built (issue 4); a bridged network needs its uplink.
        ("[[network]]\nname = \"a\"\nmode = \"bridged\"\n", "network[0].uplink"),
        ("[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network.port]]\nkind = \"vm\"\nifname = \"this-name-is-far-too-long\"\n", "network[0].port[0].ifname"),
        ("[[network]]\nname = \"a\"\nmode = \"hostonly\"\n[[network.reservation]]\nmac = \"nope\"\nip = \"192.168.56.9\"\n", "network[0].reservation[0].mac"),
    ];
    for (body, want) in cases {
        let cfg = write_config(dir.path(), body);
        // A bad config must fail, with exit status 1.
        let err = run_failing(
            Command::new(bin("netd")).args(["serve", "--config", cfg.to_str().unwrap()]),
            1,
        );
        assert!(
            err.contains("netd.toml") && err.contains(want),
            "error names file and {want:?}: {err}"
        );
    }
    Ok(())
}

#[test]
fn cli_changes_ports_at_runtime_and_sigterm_cleans_up() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("ch")?;
    let [a, b] = TapHost::each(["ca", "cb"])?;
    let (tv, tk, tp) = (unique_name("tv"), unique_name("tk"), unique_name("tp"));
    // A persistent TAP that exists before netd: a vm port on it must leave it alone.
    host.exec(&["ip", "tuntap", "add", "dev", &tk, "mode", "tap"])?;
    let cfg = write_config(dir.path(), &(network("lan", "internal", "") + &a.port("a")));
    // Readiness: netd sends READY=1 to $NOTIFY_SOCKET.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(10)))?;
    let netd = Netd::start_env(&host, dir.path(), &cfg, &[("NOTIFY_SOCKET", &notify_path)])?;
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"READY=1");

    a.addr("10.6.0.1/24")?;
    assert!(!ping(&a, "10.6.0.2"), "nobody there yet");
    add_tap_port(&netd, "lan", &b.tap, &b, "b")?;
    b.addr("10.6.0.2/24")?;
    assert!(ping_retry(&a, "10.6.0.2", 5), "port added at runtime works");
    let ports = netd.cli_json(&["port", "list", "lan"])?;
    assert!(
        has_item(&ports, |p| p["name"] == "b" && p["kind"] == "tap"),
        "{ports}"
    );

    // Errors are clear and change nothing.
    let e = add_vm_port(&netd, "nosuch", &tv, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no network named \\\"nosuch\\\"") || e.contains("no network named"),
        "{e}"
    );
    let e = add_vm_port(&netd, "lan", &tv, &["--mac", "zz"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("mac"), "{e}");
    let e = netd
        .cli(&[
            "port", "add", "lan", "--kind", "tap", "--ifname", &b.tap, "--name", "b2",
        ])
        .unwrap_err()
        .to_string();
    assert!(e.contains("already used"), "{e}");
    let e = netd
        .cli(&["port", "del", "lan", "nosuch"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no port named"), "{e}");

    netd.cli(&["port", "del", "lan", "b"])?;
    assert!(!ping(&a, "10.6.0.2"), "deleted port no longer switches");
    assert!(!b.tap_exists(), "its TAP is gone");

    // vm ports: one netd creates (removed on exit), one that existed (kept).
    add_vm_port(&netd, "lan", &tv, &[])?;
    add_vm_port(&netd, "lan", &tk, &[])?;
    // A vm TAP that disappears under netd is recreated (the port stays configured).
    host.exec(&["ip", "link", "delete", &tv])?;
    assert!(
        wait_until(Duration::from_secs(5), || host
            .exec(&["ip", "link", "show", &tv])
            .is_ok()),
        "netd recreated the vm port's TAP"
    );
    // One marked persistent survives netd's exit.
    add_vm_port(&netd, "lan", &tp, &["--persistent"])?;
    assert!(host.exec(&["ip", "link", "show", &tv]).is_ok());
    let nets = netd.cli_json(&["net", "list"])?;
    assert_eq!(nets[0]["ports"], 4, "{nets}");
    assert!(netd.stop(), "clean exit on SIGTERM");
    assert!(
        host.exec(&["ip", "link", "show", &tv]).is_err(),
        "TAP netd created is removed"
    );
    assert!(
        host.exec(&["ip", "link", "show", &tk]).is_ok(),
        "pre-existing TAP is kept"
    );
    assert!(!a.tap_exists(), "tap port removed");
    Ok(())
}

/// The column names of a table the CLI printed (its first line).
fn table_header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// The cells of the table row whose first cell is `first`.
fn table_row<'a>(table: &'a str, first: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
}

#[test]
fn cli_prints_tables_by_default_and_json_on_request() -> Result<()> {
    let dir = root_tempdir();
    let [a, b] = TapHost::each(["ta", "tb"])?;
    let (x, y) = unique_subnet();
    let lan = network(
        "lan",
        "internal",
        &format!("subnet = \"10.{x}.{y}.0/24\"\ndhcp = true\nlease_time = 600\nmtu = 1400\n"),
    );
    let port_a = a.port("a") + "mac = \"02:00:00:00:0c:01\"\n";
    let (_host, netd) = start_netd(dir.path(), "th", &(lan + &port_a))?;

    // A change prints one confirmation line; with --json, the daemon's (empty) answer.
    let out = add_tap_port(&netd, "lan", &b.tap, &b, "b")?;
    assert_eq!(out, "added tap port b to lan\n");

    // A lease, with a hostname, from a real DHCP client.
    let ip = dhcp_with(&a, &a.tap, dir.path(), &["-x", "hostname:tablehost"])?;

    // net list: header, then one aligned row; the JSON is the daemon's, unchanged.
    let nets = netd.cli(&["net", "list"])?;
    let header = table_header(&nets);
    assert_eq!(
        header,
        ["NAME", "MODE", "SUBNET", "GATEWAY", "DHCP", "PORTS", "MTU", "UPLINK", "SOURCE"],
        "{nets}"
    );
    let subnet = format!("10.{x}.{y}.0/24");
    let gateway = format!("10.{x}.{y}.1");
    let row = table_row(&nets, "lan").unwrap_or_default();
    // Ports: a, b and the DHCP server's service port.
    let json = netd.cli_json(&["net", "list"])?;
    let ports = json[0]["ports"].to_string();
    assert_eq!(
        row,
        [
            "lan",
            "internal",
            subnet.as_str(),
            gateway.as_str(),
            "yes",
            ports.as_str(),
            "1400",
            "-",
            "config"
        ],
        "{nets}"
    );
    assert_eq!(json[0]["subnet"], subnet.as_str(), "{json}");
    assert!(serde_json::from_str::<serde_json::Value>(&nets).is_err());
    // Columns line up: every header starts where its column's cells start.
    let lines: Vec<&str> = nets.lines().collect();
    let col = |l: &str, name: &str| l.find(name);
    assert_eq!(col(lines[0], "MODE"), col(lines[1], "internal"), "{nets}");
    assert_eq!(col(lines[0], "SUBNET"), col(lines[1], &subnet), "{nets}");

    // port list: a's counters are those of the JSON, its drops a total or by reason.
    let ports = netd.cli(&["port", "list", "lan"])?;
    let header = table_header(&ports);
    assert_eq!(
        header,
        [
            "NAME",
            "KIND",
            "IFNAME",
            "MAC",
            "MTU",
            "RX-FRAMES",
            "RX-BYTES",
            "TX-FRAMES",
            "TX-BYTES",
            "DROPS"
        ],
        "{ports}"
    );
    let row = table_row(&ports, "a").unwrap_or_default();
    assert_eq!(
        &row[..5],
        ["a", "tap", a.tap.as_str(), "02:00:00:00:0c:01", "1400"],
        "{ports}"
    );
    let rx: u64 = row[5].parse()?;
    assert!(
        rx >= 2,
        "udhcpc's DISCOVER and REQUEST were counted: {ports}"
    );
    let row_b = table_row(&ports, "b").unwrap_or_default();
    assert_eq!(&row_b[..3], ["b", "tap", b.tap.as_str()], "{ports}");
    assert!(table_row(&ports, "dhcp").is_some(), "{ports}");
    let by_reason = netd.cli(&["port", "list", "lan", "--drops"])?;
    assert!(
        by_reason.lines().next().unwrap_or_default().ends_with(
            "MALFORMED  TOO-BIG  FULL  DOWN  IO  HAIRPIN  OFFLOAD  GSO  \
                 SPOOFED-MAC  SPOOFED-IP  SPOOFED-ARP  SPOOFED-DHCP  MAC-LIMIT  \
                 SPOOFED-IP6  ROGUE-ROUTER  SPOOFED-ND  ND-LIMIT"
        ),
        "{by_reason}"
    );
    let json = netd.cli_json(&["port", "list", "lan"])?;
    let ja = json
        .as_array()
        .and_then(|v| v.iter().find(|p| p["name"] == "a"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ja["kind"], "tap", "{json}");
    assert!(ja["counters"]["rx_frames"].as_u64() >= Some(rx), "{json}");

    // leases: MAC, IP, time left, the client's hostname.
    let leases = netd.cli(&["leases", "lan"])?;
    let header = table_header(&leases);
    assert_eq!(header, ["MAC", "IP", "EXPIRES", "HOSTNAME"], "{leases}");
    let row = table_row(&leases, "02:00:00:00:0c:01").unwrap_or_default();
    assert_eq!(row.len(), 5, "{leases}");
    assert_eq!(row[1], ip, "{leases}");
    assert_eq!(row[2], "in", "{leases}");
    assert!(row[3].ends_with('m') || row[3].ends_with('s'), "{leases}");
    assert_eq!(row[4], "tablehost", "{leases}");
    let json = netd.cli_json(&["leases", "lan"])?;
    assert_eq!(json[0]["ip"], ip.as_str(), "{json}");
    assert_eq!(json[0]["hostname"], "tablehost", "{json}");

    // mac: the learned table.
    let macs = netd.cli(&["mac", "lan"])?;
    let row = table_row(&macs, "02:00:00:00:0c:01").unwrap_or_default();
    assert_eq!(row.get(1), Some(&"a"), "{macs}");

    // Removing the port confirms; with --json it prints the daemon's answer (none).
    assert_eq!(
        netd.cli(&["port", "del", "lan", "b"])?,
        "removed port b from lan\n"
    );
    let out = netd.cli(&port_add(
        "lan",
        "tap",
        &b.tap,
        &["--netns", b.name(), "--json"],
    ))?;
    assert_eq!(out, "");
    assert!(table_row(&netd.cli(&["port", "list", "lan"])?, &b.tap).is_some());
    assert!(netd.stop(), "clean exit on SIGTERM");
    Ok(())
}

#[test]
fn log_has_no_colour_codes_when_stderr_is_not_a_terminal() -> Result<()> {
    let dir = root_tempdir();
    let (_host, netd) = start_netd(dir.path(), "lc", &network("lan", "internal", ""))?;
    assert!(netd.stop());
    let log = std::fs::read_to_string(dir.path().join("netd.log"))?;
    assert!(log.contains("netd ready"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a non-terminal log: {log:?}"
    );
    Ok(())
}
