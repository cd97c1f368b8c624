//! netd's DHCP server against busybox udhcpc in test-host namespaces: leases,
//! reservations, and leases surviving a restart of netd.

mod netd_common;

use anyhow::Result;
use integration_tests::{require_root, unique_name, Netns};
use netd_common::*;

#[test]
fn udhcpc_gets_leases_that_survive_restart() -> Result<()> {
    require_root();
    let dir = tempdir();
    let host = Netns::new("dh")?;
    let a = Netns::new("da")?;
    let b = Netns::new("db")?;
    let r = Netns::new("dr")?;
    let (ta, tb, tr) = (unique_name("ta"), unique_name("tb"), unique_name("tr"));
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[[network]]
name = "lan"
mode = "internal"
subnet = "10.2.0.0/24"
dhcp = true
dhcp_range = "10.2.0.50-10.2.0.60"
lease_time = 600
dhcp_dns = ["10.2.0.1"]

[[network.reservation]]
mac = "02:00:00:00:0b:77"
ip = "10.2.0.77"

[[network.port]]
name = "a"
kind = "tap"
ifname = "{ta}"
netns = "{na}"
mac = "02:00:00:00:0a:01"

[[network.port]]
name = "b"
kind = "tap"
ifname = "{tb}"
netns = "{nb}"
mac = "02:00:00:00:0a:02"

[[network.port]]
name = "r"
kind = "tap"
ifname = "{tr}"
netns = "{nr}"
mac = "02:00:00:00:0b:77"
"#,
            na = a.name(),
            nb = b.name(),
            nr = r.name()
        ),
    );
    let netd = Netd::start(&host, dir.path(), &cfg)?;
    let ip_a = dhcp(&a, &ta, dir.path())?;
    let ip_b = dhcp(&b, &tb, dir.path())?;
    assert_eq!(ip_a, "10.2.0.50");
    assert_eq!(ip_b, "10.2.0.51");
    let lease_line = std::fs::read_to_string(dir.path().join(format!("lease-{tb}")))?;
    assert!(
        lease_line.contains(" 24 ") && lease_line.contains("10.2.0.1"),
        "mask and DNS given: {lease_line}"
    );
    assert_eq!(
        dhcp(&r, &tr, dir.path())?,
        "10.2.0.77",
        "reservation honoured"
    );
    assert!(
        ping_retry(&a, &ip_b, 3),
        "DHCP-configured hosts reach each other"
    );

    let leases = netd.cli_json(&["leases", "lan"])?;
    assert_eq!(leases.as_array().unwrap().len(), 3, "{leases}");

    // A datagram to port 67 that is not DHCP is dropped and counted.
    let stats = netd.cli_json(&["leases", "lan", "--stats"])?;
    assert_eq!(stats["malformed"], 0, "{stats}");
    a.sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1); \
         s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'{ta}'); \
         s.sendto(b'not a DHCP message', ('255.255.255.255', 67))\""
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
    assert!(netd.stop(), "clean exit");
    assert!(
        dir.path().join("state/leases-lan.json").exists(),
        "leases persisted under state_dir"
    );
    let netd = Netd::start(&host, dir.path(), &cfg)?;
    let leases = netd.cli_json(&["leases", "lan"])?;
    let list = leases.as_array().unwrap();
    assert!(
        list.iter()
            .any(|l| l["mac"] == "02:00:00:00:0a:01" && l["ip"] == "10.2.0.50"),
        "a's lease survived the restart: {leases}"
    );
    // A new client does not get a's or b's address; a gets its own back.
    netd.cli(&["port", "del", "lan", "b"])?;
    let c = Netns::new("dc")?;
    let tc = unique_name("tc");
    netd.cli(&[
        "port",
        "add",
        "lan",
        "--kind",
        "tap",
        "--ifname",
        &tc,
        "--netns",
        c.name(),
        "--name",
        "c",
    ])?;
    let ip_c = dhcp(&c, &tc, dir.path())?;
    assert_eq!(ip_c, "10.2.0.52", "restart kept .50 and .51 leased");
    assert_eq!(
        dhcp(&a, &ta, dir.path())?,
        "10.2.0.50",
        "same address after restart"
    );
    // RELEASE from a real client: udhcpc -R releases when it is stopped while bound.
    let script = udhcpc_script(dir.path());
    let _ = std::fs::remove_file(dir.path().join(format!("lease-{tc}")));
    let mut client = c.spawn(&[
        "busybox",
        "udhcpc",
        "-i",
        &tc,
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
        || dir.path().join(format!("lease-{tc}")).exists()
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
