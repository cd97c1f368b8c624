//! A hostonly network: netd (in a namespace standing for the host) creates the host
//! TAP with the gateway address and serves DHCP with VirtualBox's defaults; a test
//! host reaches the host and nothing beyond it, because netd never routes.

mod netd_common;

use anyhow::Result;
use integration_tests::{unique_name, Netns};
use netd_common::*;

#[test]
fn hostonly_reaches_host_not_beyond() -> Result<()> {
    let dir = root_tempdir();
    let host = Netns::new("hh")?;
    let vm = TapHost::new("hv")?;
    // The host has another link, to a "beyond" network, and does not forward.
    let beyond = link_beyond(&host, "hb", "172.16.9")?;
    beyond.exec(&["ip", "route", "add", "192.168.56.0/24", "via", "172.16.9.1"])?;
    host.sh("echo 0 > /proc/sys/net/ipv4/ip_forward")?;

    let hif = unique_name("vh");
    let ho = network("ho", "hostonly", &format!("host_ifname = \"{hif}\"\n"));
    let netd = Netd::start_with(&host, dir.path(), &(ho + &vm.port("vm")))?;
    let addr = host.sh(&format!("ip -4 -o addr show dev {hif}"))?;
    assert!(
        addr.contains("192.168.56.1/24"),
        "host TAP has the gateway address: {addr}"
    );

    let ip = dhcp(&vm, &vm.tap, dir.path())?;
    assert_eq!(ip, "192.168.56.101", "VirtualBox default range");
    let lease = std::fs::read_to_string(dir.path().join(format!("lease-{}", vm.tap)))?;
    assert!(
        lease.contains(" 192.168.56.100"),
        "VirtualBox's DHCP server address: {lease}"
    );
    // The server answers ARP for its own address (so unicast renewals reach it).
    assert!(
        vm.command(&[
            "busybox",
            "arping",
            "-c",
            "1",
            "-w",
            "2",
            "-I",
            &vm.tap,
            "192.168.56.100"
        ])
        .stdout(std::process::Stdio::null())
        .status()?
        .success(),
        "DHCP server answers ARP"
    );
    vm.exec(&["ip", "route", "add", "default", "via", "192.168.56.1"])?;
    assert!(
        ping_retry(&vm, "192.168.56.1", 3),
        "VM reaches the host's address"
    );
    assert!(
        ping(&vm, "172.16.9.1"),
        "VM reaches the host (its other address)"
    );
    assert!(!ping(&vm, "172.16.9.2"), "nothing beyond the host");
    assert!(!ping(&beyond, &ip), "and nothing beyond reaches the VM");
    let fwd = host.sh("cat /proc/sys/net/ipv4/ip_forward")?;
    assert_eq!(fwd.trim(), "0", "netd did not turn on forwarding");

    assert!(netd.stop());
    assert!(
        host.exec(&["ip", "link", "show", &hif]).is_err(),
        "host TAP removed on exit"
    );
    Ok(())
}
