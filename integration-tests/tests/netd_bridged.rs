//! Bridged network, end to end: a "LAN" namespace joined to netd's namespace by a
//! veth pair runs dnsmasq as the LAN's DHCP server; netd's bridged network has its
//! uplink on the host end of the veth. Guests on the network get their leases from
//! the LAN's dnsmasq (not from netd), ping a LAN host, and each other; the host keeps
//! using its NIC.

mod nat_common;

use std::time::Duration;

use integration_tests::netd::{network, TapHost};
use integration_tests::{wait_until, Netns};
use nat_common::Lab;

#[test]
fn bridged_guest_gets_lan_lease_and_pings_lan_host() -> anyhow::Result<()> {
    integration_tests::require_root();
    // The lab's host namespace is where netd runs; the LAN is a namespace of its own.
    let mut lab = Lab::new()?;
    let lan = Netns::new("nl")?;
    lab.host.veth_to("up0", "lan0", lan.name())?;
    // The host keeps its own address on the NIC the uplink uses.
    lab.host
        .sh("ip addr add 198.18.5.2/24 dev up0 && ip link set up0 up")?;
    lan.sh("ip addr add 198.18.5.1/24 dev lan0 && ip link set lan0 up")?;
    let leases = lab.path("lan.leases");
    let pid = lab.path("lan-dnsmasq.pid");
    let g = lan.spawn(&[
        "dnsmasq",
        "--keep-in-foreground",
        "--port=0",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--user=root",
        "--interface=lan0",
        "--bind-interfaces",
        "--no-ping",
        "--dhcp-range=198.18.5.100,198.18.5.150,255.255.255.0,1h",
        "--dhcp-option=option:router,198.18.5.1",
        &format!("--dhcp-leasefile={leases}"),
        &format!("--pid-file={pid}"),
    ])?;
    lab.keep(g);

    let [g1, g2] = TapHost::each(["nb", "nb"])?;
    let br0 = network("br0", "bridged", "uplink = \"up0\"\n");
    lab.start_netd(&[br0, g1.unnamed_port(), g2.unnamed_port()].concat())?;

    let l1 = lab.dhcp(&g1)?;
    let l2 = lab.dhcp(&g2)?;
    assert!(
        l1.contains("ip=198.18.5.1") && l1.contains("router=198.18.5.1"),
        "{l1}"
    );
    assert!(l2.contains("ip=198.18.5.1"), "{l2}");
    // The leases come from the LAN's server: its lease file names both guests.
    let leased_ip = |lease: &str| {
        lease
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_start_matches("ip=")
            .to_string()
    };
    let (ip1, ip2) = (leased_ip(&l1), leased_ip(&l2));
    assert!(wait_until(Duration::from_secs(3), || {
        let f = std::fs::read_to_string(&leases).unwrap_or_default();
        f.contains(&ip1) && f.contains(&ip2)
    }));

    // The guests talk to a LAN host, the LAN host to them, and to each other.
    g1.sh("ping -c 2 -W 5 198.18.5.1")?;
    lan.sh(&format!("ping -c 1 -W 5 {ip2}"))?;
    g1.sh(&format!("ping -c 1 -W 5 {ip2}"))?;
    // The host still uses its NIC.
    lab.host.sh("ping -c 1 -W 5 198.18.5.1")?;

    // The uplink port is listed with its counters.
    let ports = lab.cli(&["port", "list", "br0"])?;
    assert!(ports.contains("uplink"), "{ports}");
    Ok(())
}
