//! netd switch end to end: test hosts in namespaces on `tap` ports; ping within a
//! network, isolation between networks, counters, MAC table and MTU drops.

mod netd_common;

use anyhow::Result;
use integration_tests::{has_item, items};
use netd_common::*;

#[test]
fn ping_within_network_not_across_and_counters() -> Result<()> {
    let dir = root_tempdir();
    let [a, b, c] = TapHost::each(["na", "nb", "nc"])?;
    let (_host, netd) = start_netd(
        dir.path(),
        "nh",
        &[
            network("lan", "internal", "mtu = 1500\n"),
            a.port("a") + "mac = \"02:00:00:00:0a:01\"\n",
            b.port("b"),
            network("other", "internal", ""),
            c.port("c"),
        ]
        .concat(),
    )?;
    a.addr("10.1.0.1/24")?;
    b.addr("10.1.0.2/24")?;
    c.addr("10.1.0.3/24")?;

    assert!(
        ping_retry(&a, "10.1.0.2", 5),
        "a reaches b on the same network"
    );
    assert!(ping(&b, "10.1.0.1"), "b reaches a");
    assert!(
        !ping(&a, "10.1.0.3"),
        "a must not reach c on another network"
    );
    assert!(
        !ping(&c, "10.1.0.2"),
        "c must not reach b on another network"
    );

    // Counters and MAC table.
    let ca = netd.counters("lan", "a")?;
    let cb = netd.counters("lan", "b")?;
    assert!(ca["rx_frames"].as_u64().unwrap() >= 2, "{ca}");
    assert!(ca["rx_bytes"].as_u64().unwrap() > 100, "{ca}");
    assert!(cb["tx_frames"].as_u64().unwrap() >= 2, "{cb}");
    let macs = netd.cli_json(&["mac", "lan"])?;
    assert!(
        has_item(&macs, |e| e["mac"] == "02:00:00:00:0a:01"
            && e["port"] == "a"),
        "a's MAC learned on port a: {macs}"
    );
    // The other network saw none of lan's frames (only c's own).
    let other_macs = netd.cli_json(&["mac", "other"])?;
    assert!(
        items(&other_macs).iter().all(|e| e["port"] == "c"),
        "{other_macs}"
    );
    let nets = netd.cli_json(&["net", "list"])?;
    assert_eq!(items(&nets).len(), 2, "{nets}");

    // MTU: a full 1500-byte packet passes; a host that raised its own MTU past the
    // network's sees its big frames dropped and counted.
    assert!(
        a.command(&["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1472", "10.1.0.2"])
            .status()?
            .success(),
        "1500-byte packet fits"
    );
    a.exec(&["ip", "link", "set", "dev", &a.tap, "mtu", "9000"])?;
    let before = netd.counters("lan", "a")?["drop_mtu"].as_u64().unwrap();
    assert!(
        !a.command(&["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "3000", "10.1.0.2"])
            .status()?
            .success(),
        "oversized frame must not cross"
    );
    let after = netd.counters("lan", "a")?["drop_mtu"].as_u64().unwrap();
    assert!(after > before, "MTU drop counted ({before} -> {after})");

    assert!(netd.stop(), "clean exit on SIGTERM");
    // netd's TAPs went with it.
    assert!(!a.tap_exists(), "TAP removed on exit");
    Ok(())
}

#[test]
fn tap_port_comes_back_with_its_namespace() -> Result<()> {
    let dir = root_tempdir();
    let (_host, netd, [a, b]) = lan_of_two(dir.path(), ["nh", "na", "nb"], "10.1.1")?;
    assert!(ping_retry(&a, "10.1.1.2", 5));

    // The container goes away: its namespace (and the TAP's kernel side) with it.
    // netd does not keep the namespace alive; when a namespace of that name is back,
    // so is the port.
    integration_tests::sh(&format!("ip netns del {}", b.name()))?;
    // The kernel tears a deleted namespace down asynchronously: its TAP may answer for
    // a moment after `ip netns del` returns.
    assert!(
        integration_tests::wait_until(std::time::Duration::from_secs(10), || !ping(&a, "10.1.1.2")),
        "b's address still answers after its namespace is gone"
    );
    integration_tests::sh(&format!(
        "ip netns add {0} && ip -n {0} link set lo up",
        b.name()
    ))?;
    assert!(
        integration_tests::wait_until(std::time::Duration::from_secs(5), || b.tap_exists()),
        "netd recreated the TAP in the new namespace"
    );
    b.addr("10.1.1.2/24")?;
    // The new TAP has a new MAC: a forgets the old one, as after any host change.
    a.exec(&["ip", "neigh", "flush", "dev", &a.tap])?;
    assert!(
        ping_retry(&a, "10.1.1.2", 5),
        "traffic flows again: {}\n{}",
        netd.cli(&["port", "list", "lan"])?,
        netd.log()
    );
    assert!(netd.stop());
    Ok(())
}
