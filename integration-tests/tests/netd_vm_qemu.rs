//! A `vm` port proven with a real VMM: QEMU (TCG) holds the TAP queue, netd moves
//! frames through AF_PACKET on the TAP's kernel side. The Debian kernel with a
//! busybox initramfs gets a lease from netd's DHCP and pings a test host; then QEMU
//! goes away and a second QEMU on the same TAP works again (the port stayed).

mod netd_common;

use std::time::Duration;

use anyhow::Result;
use integration_tests::{has_item, unique_name, wait_until};
use netd_common::*;

// Its own `main` (`harness = false`): where the guest assets could not be fetched the
// boot says NOT RUN instead of counting as passed.
integration_tests::guest_tests_main!("netd_vm_qemu", qemu_on_vm_port_gets_lease_and_pings_twice);

fn qemu_on_vm_port_gets_lease_and_pings_twice() -> Result<()> {
    let dir = root_tempdir();
    let peer = TapHost::new("vp")?;
    let tv = unique_name("tv");
    let lan = network(
        "lan",
        "internal",
        "subnet = \"10.4.0.0/24\"\ndhcp = true\ndhcp_range = \"10.4.0.100-10.4.0.150\"\n",
    );
    let (host, netd) = start_netd(dir.path(), "vh", &(lan + &peer.port("peer")))?;
    peer.addr("10.4.0.2/24")?;
    // The VM's port is added at runtime, as a VMM launcher would.
    add_vm_port(&netd, "lan", &tv, &["--mac", "52:54:00:12:34:56"])?;
    assert!(
        host.exec(&["ip", "link", "show", &tv]).is_ok(),
        "netd created the TAP"
    );

    // Besides ping: a 2 MiB TCP stream from the guest to the test host (the
    // listener's stdin stays open so busybox nc does not hang up early).
    let initrd = guest_initramfs_with(
        dir.path(),
        "10.4.0.2",
        "dd if=/dev/zero bs=1024 count=2048 2>/dev/null | nc -w 3 10.4.0.2 5555 && echo NC-OK; sleep 4",
    )?;
    let recv = dir.path().join("recv.bin");
    let _listener = peer.spawn(&[
        "sh",
        "-c",
        &format!("sleep 120 | busybox nc -l -p 5555 > {}", recv.display()),
    ])?;
    // QEMU's defaults (vnet_hdr on, offloads negotiated with the guest): netd's
    // AF_PACKET side reads and writes virtio-net headers.
    let netdev = format!("tap,id=n0,ifname={tv},script=no,downscript=no");
    for round in 1..=2 {
        let out = boot_guest(
            &host,
            dir.path(),
            &initrd,
            &netdev,
            "52:54:00:12:34:56",
            Duration::from_secs(90),
        )?;
        assert_guest_leased_and_pinged(&out, "10.4.0.100/24", &format!("round {round}"));
        if round == 1 {
            assert!(out.contains("NC-OK"), "TCP stream sent:\n{out}");
            let got = || std::fs::metadata(&recv).map(|m| m.len()).unwrap_or(0);
            assert!(
                wait_until(Duration::from_secs(10), || got() == 2 * 1024 * 1024),
                "test host received all 2 MiB (got {})",
                got()
            );
        }
    }
    let leases = netd.cli_json(&["leases", "lan"])?;
    assert!(
        has_item(&leases, |l| l["mac"] == "52:54:00:12:34:56"),
        "{leases}"
    );
    let c = netd.counters("lan", &tv)?;
    eprintln!("vm port counters: {c}");
    assert!(
        c["rx_frames"].as_u64().unwrap() >= 6 && c["tx_frames"].as_u64().unwrap() >= 6,
        "{c}"
    );
    assert!(netd.stop());
    assert!(
        host.exec(&["ip", "link", "show", &tv]).is_err(),
        "netd removed the TAP it created"
    );
    Ok(())
}
