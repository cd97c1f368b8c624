//! netd's DHCP server against busybox udhcpc in test-host namespaces: leases,
//! reservations, and leases surviving a restart of netd.

mod netd_common;

use anyhow::Result;
use integration_tests::{has_item, items};
use netd_common::*;

#[test]
fn udhcpc_gets_leases_that_survive_restart() -> Result<()> {
    let dir = root_tempdir();
    let [a, b, r] = TapHost::each(["da", "db", "dr"])?;
    let lan = network(
        "lan",
        "internal",
        r#"subnet = "10.2.0.0/24"
dhcp = true
dhcp_range = "10.2.0.50-10.2.0.60"
lease_time = 600
dhcp_dns = ["10.2.0.1"]

[[network.reservation]]
mac = "02:00:00:00:0b:77"
ip = "10.2.0.77"
"#,
    );
    let ports = [
        a.port("a") + "mac = \"02:00:00:00:0a:01\"\n",
        b.port("b") + "mac = \"02:00:00:00:0a:02\"\n",
        r.port("r") + "mac = \"02:00:00:00:0b:77\"\n",
    ];
    let (host, netd) = start_netd(dir.path(), "dh", &(lan + &ports.concat()))?;
    let ip_a = dhcp(&a, &a.tap, dir.path())?;
    let ip_b = dhcp(&b, &b.tap, dir.path())?;
    assert_eq!(ip_a, "10.2.0.50");
    assert_eq!(ip_b, "10.2.0.51");
    let lease_line = std::fs::read_to_string(dir.path().join(format!("lease-{}", b.tap)))?;
    assert!(
        lease_line.contains(" 24 ") && lease_line.contains("10.2.0.1"),
        "mask and DNS given: {lease_line}"
    );
    assert_eq!(
        dhcp(&r, &r.tap, dir.path())?,
        "10.2.0.77",
        "reservation honoured"
    );
    assert!(
        ping_retry(&a, &ip_b, 3),
        "DHCP-configured hosts reach each other"
    );

    let leases = netd.cli_json(&["leases", "lan"])?;
    assert_eq!(items(&leases).len(), 3, "{leases}");

    // A datagram to port 67 that is not DHCP is dropped and counted.
    let stats = netd.cli_json(&["leases", "lan", "--stats"])?;
    assert_eq!(stats["malformed"], 0, "{stats}");
    a.sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1); \
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'{tap}'); \
         s.sendto(b'not a DHCP message', ('255.255.255.255', 67))\"",
        tap = a.tap
    ))?;
    assert!(
        integration_tests::wait_until(std::time::Duration::from_secs(5), || {
            netd.cli_json(&["leases", "lan", "--stats"])
                .is_ok_and(|s| s["malformed"] == 1)
        }),
        "malformed datagram counted: {}",
        netd.cli(&["leases", "lan", "--stats"])?
    );
    let stats = netd.cli_json(&["leases", "lan", "--stats"])?;
    assert_eq!(stats["leases"], 3, "{stats}");
    assert_eq!(stats["refused_full"], 0, "{stats}");
    let table = netd.cli(&["leases", "lan", "--stats"])?;
    assert!(
        table.contains("malformed") && table.contains("COUNTER"),
        "{table}"
    );

    // Restart: the leases come back from disk.
    let cfg = netd.config.clone();
    assert!(netd.stop(), "clean exit");
    assert!(
        dir.path().join("state/leases-lan.json").exists(),
        "leases persisted under state_dir"
    );
    let netd = Netd::start(&host, dir.path(), &cfg)?;
    let leases = netd.cli_json(&["leases", "lan"])?;
    assert!(
        has_item(&leases, |l| l["mac"] == "02:00:00:00:0a:01"
            && l["ip"] == "10.2.0.50"),
        "a's lease survived the restart: {leases}"
    );
    // A new client does not get a's or b's address; a gets its own back.
    netd.cli(&["port", "del", "lan", "b"])?;
    let c = TapHost::new("dc")?;
    add_tap_port(&netd, "lan", &c.tap, &c, "c")?;
    let ip_c = dhcp(&c, &c.tap, dir.path())?;
    assert_eq!(ip_c, "10.2.0.52", "restart kept .50 and .51 leased");
    assert_eq!(
        dhcp(&a, &a.tap, dir.path())?,
        "10.2.0.50",
        "same address after restart"
    );
    // RELEASE from a real client: udhcpc -R releases when it is stopped while bound.
    let script = udhcpc_script(dir.path());
    let _ = std::fs::remove_file(dir.path().join(format!("lease-{}", c.tap)));
    let mut client = c.spawn(&[
        "busybox",
        "udhcpc",
        "-i",
        &c.tap,
        "-s",
        script.to_str().unwrap(),
        "-f",
        "-R",
        "-t",
        "5",
        "-T",
        "1",
    ])?;
    assert!(integration_tests::wait_until(
        std::time::Duration::from_secs(10),
        || dir.path().join(format!("lease-{}", c.tap)).exists()
    ));
    client.signal(libc::SIGTERM);
    client.wait_timeout(std::time::Duration::from_secs(5));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let released = || {
        netd.cli_json(&["leases", "lan"])
            .ok()
            .and_then(|v| {
                v.as_array()?.iter().find(|l| l["ip"] == "10.2.0.52")?["expires"].as_u64()
            })
            .is_some_and(|e| e <= now + 1)
    };
    // The RELEASE is unicast to the server (after ARP for it), so allow a moment.
    assert!(
        integration_tests::wait_until(std::time::Duration::from_secs(3), released),
        "released lease has ended: {}",
        netd.cli(&["leases", "lan"])?
    );
    assert!(netd.stop());
    Ok(())
}
