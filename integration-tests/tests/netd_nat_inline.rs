//! The only guest port of a NAT network is read by the router on its own thread
//! (netd's inline reader, for throughput: no thread hand-off, no copy into a channel).
//! Proven end to end with a guest namespace on a TAP port at MTU 65520:
//!
//! - bulk guest->host TCP (socat, 8 MiB to a listener on the host's 127.0.0.1 through
//!   10.0.2.2) arrives byte for byte, and netd's log says the router reads the port;
//! - `port del` takes the TAP away (the router lets go of it), `port add` brings it
//!   back, read the same way, and traffic flows again;
//! - when the guest's namespace is deleted the router hands the port to a receive
//!   thread, which recreates the TAP once a namespace of that name is back: a new
//!   lease and another upload go through.

mod nat_common;

use std::time::Duration;

use anyhow::{bail, Result};
use integration_tests::{free_port, wait_until, Netns};
use nat_common::Lab;

/// Sends two copies of the lab's 4 MiB file from `guest` to a socat listener on the
/// host's loopback, through the gateway address; checks what arrived.
fn upload(lab: &Lab, guest: &Netns, tag: &str) -> Result<()> {
    let port = free_port();
    let out = lab.path(&format!("upload-{tag}.bin"));
    let mut server = lab.host.spawn(&[
        "socat",
        "-u",
        &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
        &format!("CREATE:{out}"),
    ])?;
    let listening = wait_until(Duration::from_secs(5), || {
        lab.host
            .sh(&format!("ss -ltnH 'sport = :{port}' | grep -q ."))
            .is_ok()
    });
    if !listening {
        bail!("socat did not listen on 127.0.0.1:{port}");
    }
    let big = lab.path("www-host/big.bin");
    guest.sh(&format!(
        "cat {big} {big} | socat -u - TCP:10.0.2.2:{port},connect-timeout=10"
    ))?;
    if server.wait_timeout(Duration::from_secs(20)).is_none() {
        bail!("the host side never saw the end of the upload");
    }
    let want = lab.host.sh(&format!("cat {big} {big} | sha256sum"))?;
    let got = lab.host.sh(&format!("sha256sum < {out}"))?;
    assert_eq!(want, got, "upload {tag} arrived intact");
    Ok(())
}

#[test]
fn nat_inline_port_upload_readd_and_namespace_return() -> Result<()> {
    let mut lab = Lab::new()?;
    let guest = lab.start_one_guest_nat("nat0", "mtu = 65520\nhost_loopback = true")?;
    let lease = lab.dhcp(&guest)?;
    assert!(lease.contains("ip=10.0.2.15"), "lease: {lease}");
    let inline = "router reads the port on its thread";
    assert_eq!(
        lab.netd_log().matches(inline).count(),
        1,
        "{}",
        lab.netd_log()
    );
    upload(&lab, &guest, "first")?;

    // Removed at runtime: the router lets go of the fd, so the TAP is gone.
    lab.cli(&["port", "del", "nat0", "g"])?;
    assert!(
        wait_until(Duration::from_secs(5), || !guest.tap_exists()),
        "the TAP of a removed port is gone"
    );
    // Added back (again the network's only guest port): read inline again.
    lab.cli(&[
        "port",
        "add",
        "nat0",
        "--kind",
        "tap",
        "--ifname",
        &guest.tap,
        "--netns",
        guest.name(),
        "--name",
        "g",
    ])?;
    lab.dhcp(&guest)?;
    assert_eq!(
        lab.netd_log().matches(inline).count(),
        2,
        "{}",
        lab.netd_log()
    );
    upload(&lab, &guest, "readded")?;

    // The guest's namespace goes away, and comes back under the same name.
    integration_tests::sh(&format!("ip netns del {}", guest.name()))?;
    let handed_over = "giving it a thread";
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .netd_log()
            .contains(handed_over)),
        "the router hands a port whose device is gone to a thread:\n{}",
        lab.netd_log()
    );
    integration_tests::sh(&format!(
        "ip netns add {0} && ip -n {0} link set lo up",
        guest.name()
    ))?;
    assert!(
        wait_until(Duration::from_secs(10), || guest.tap_exists()),
        "netd recreated the TAP in the new namespace:\n{}",
        lab.netd_log()
    );
    // (A new TAP, a new MAC: a new lease.)
    let lease = lab.dhcp(&guest)?;
    assert!(lease.contains("ip=10.0.2."), "lease: {lease}");
    upload(&lab, &guest, "reopened")?;
    Ok(())
}
