//! DHCP on a NAT network against a real client: busybox udhcpc in a guest namespace
//! gets its lease from netd (server identifier 10.0.2.2, the gateway, as in
//! VirtualBox and QEMU), then renews it by *unicast* to that identifier (RENEWING
//! state) and is answered at once, without falling back to a broadcast REBIND.
//!
//! The server identifier is the NAT router's own address, so the renewal reaches the
//! router (it answers ARP for 10.0.2.2); the router hands it to the DHCP server. The
//! renewal is triggered with SIGUSR1, which puts a bound udhcpc into the same
//! unicast-renew path as T1 does (the smallest lease netd allows is 60 s, so waiting
//! for T1 would cost 30 s of test time).

mod netd_common;

use std::io::Seek;
use std::time::Duration;

use anyhow::{Context, Result};
use integration_tests::{spawn_logged, wait_until};
use netd_common::*;

/// The lease netd holds for `ip` on `net`: its expiry (Unix seconds).
fn lease_expiry(netd: &Netd, net: &str, ip: &str) -> Option<u64> {
    let v = netd.cli_json(&["leases", net]).ok()?;
    v.as_array()?.iter().find(|l| l["ip"] == ip)?["expires"].as_u64()
}

#[test]
fn nat_unicast_renewal_to_the_gateway_is_acked() -> Result<()> {
    let dir = root_tempdir();
    let guest = TapHost::new("ng")?;
    let tap = &guest.tap;
    let keys = "lease_time = 60\n".to_string() + &loopback_resolv_key(dir.path())?;
    let nat0 = network("nat0", "nat", &keys) + &guest.unnamed_port();
    let (_host, netd) = start_netd(dir.path(), "nh", &nat0)?;

    // A long-running client, verbose, logging to a file. -T 10: a renewal that goes
    // unanswered is retried only after 10 s, so an answer within a few seconds can
    // only be the answer to the first unicast REQUEST.
    let script = udhcpc_script(dir.path());
    let lease_file = dir.path().join(format!("lease-{tap}"));
    let log_path = dir.path().join("udhcpc.log");
    let mut udhcpc = guest.command(&[
        "busybox",
        "udhcpc",
        "-i",
        tap,
        "-s",
        script.to_str().unwrap(),
        "-f",
        "-v",
        "-t",
        "5",
        "-T",
        "10",
    ]);
    // `ip netns exec` execs the command: the child's pid is udhcpc's.
    let client = spawn_logged(&mut udhcpc, &log_path)?;
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    assert!(
        wait_until(Duration::from_secs(15), || lease_file.exists()),
        "no lease; udhcpc:\n{}\nnetd:\n{}",
        read_log(),
        netd.log()
    );
    let lease = std::fs::read_to_string(&lease_file)?;
    let fields: Vec<&str> = lease.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"10.0.2.15"), "lease: {lease}");
    assert_eq!(fields.get(2), Some(&"10.0.2.2"), "server id: {lease}");
    let first = lease_expiry(&netd, "nat0", "10.0.2.15").context("netd holds the lease")?;

    // Renew (unicast to the server identifier), a couple of seconds later so that
    // the renewed lease ends visibly later.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_file(&lease_file)?;
    let mark = {
        let mut f = std::fs::File::open(&log_path)?;
        f.seek(std::io::SeekFrom::End(0))? as usize
    };
    client.signal(libc::SIGUSR1);
    let renewed = wait_until(Duration::from_secs(5), || {
        lease_file.exists()
            && read_log()
                .get(mark..)
                .is_some_and(|s| s.contains("obtained"))
    });
    let after = read_log().get(mark..).unwrap_or_default().to_string();
    assert!(
        renewed,
        "unicast renewal not answered within 5 s; udhcpc since SIGUSR1:\n{after}\nnetd:\n{}",
        netd.log()
    );
    assert!(
        after.contains("sending renew to server 10.0.2.2"),
        "the renewal was unicast to the server id: {after}"
    );
    assert!(
        !after.contains("0.0.0.0") && !after.contains("rebinding"),
        "answered without a broadcast rebind: {after}"
    );
    assert!(after.contains("lease of 10.0.2.15 obtained"), "{after}");
    let second = lease_expiry(&netd, "nat0", "10.0.2.15").context("lease after renewal")?;
    assert!(
        second > first,
        "netd extended the lease on the renewal ({first} -> {second})"
    );

    drop(client);
    assert!(netd.stop(), "netd stops cleanly");
    Ok(())
}
