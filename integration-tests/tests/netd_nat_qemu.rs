//! A real VMM on a NAT network: QEMU (TCG) boots the Debian kernel with a busybox
//! initramfs through a `vm` port of netd's NAT network; the guest takes a lease from
//! netd and downloads a 4 MiB file from an HTTP server on the host's 127.0.0.1
//! through 10.0.2.2, and a page from the "internet" namespace by name (DNS through
//! 10.0.2.3). The guest prints the file's SHA-256, compared with the host's.

mod nat_common;
mod netd_common;

use std::time::Duration;

use anyhow::Result;
use integration_tests::{guest_assets, unique_name};
use nat_common::{Lab, INET_NAME, PAGE};
use netd_common::{boot_guest, initramfs};

/// The guest's init after the common start: a lease, the file from the host's
/// loopback and the page by name (NAME), each reported on the console.
const INIT: &str = r#"if udhcpc -i eth0 -q -n -t 10 -T 1 -s /usr/share/udhcpc/default.script > /dev/console 2>&1; then
  echo "DHCP-OK $(ip -4 addr show eth0 | awk '/inet /{print $2}')" > /dev/console
fi
ip addr > /dev/console; ip route > /dev/console
if wget -q -O /tmp/big http://10.0.2.2:8080/big.bin; then
  echo "SHA $(sha256sum /tmp/big | cut -d' ' -f1)" > /dev/console
fi
echo "PAGE $(wget -q -O - http://NAME/index.html)" > /dev/console
echo "GUEST-DONE" > /dev/console
poweroff -f
"#;

// Its own `main` (`harness = false`): where the guest assets could not be fetched the
// boot says NOT RUN instead of counting as passed.
integration_tests::guest_tests_main!(
    "netd_nat_qemu",
    qemu_guest_on_nat_gets_lease_and_downloads_from_host
);

fn qemu_guest_on_nat_gets_lease_and_downloads_from_host() -> Result<()> {
    // Missing guest assets fail the test here, before the lab is built.
    guest_assets();
    let mut lab = Lab::new()?;
    let tap = unique_name("nq");
    let port = format!("\n[[network.port]]\nkind = \"vm\"\nifname = \"{tap}\"\n");
    lab.start_netd(&(lab.nat_network("natvm", "host_loopback = true") + &port))?;

    let initrd = initramfs(lab.dir.path(), &INIT.replace("NAME", INET_NAME))?;
    // vnet_hdr=off: netd's AF_PACKET side carries plain frames.
    let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no,vnet_hdr=off");
    let out = boot_guest(
        &lab.host,
        lab.dir.path(),
        &initrd,
        &netdev,
        "52:54:00:12:34:56",
        Duration::from_secs(120),
    )?;

    assert!(
        out.contains("DHCP-OK 10.0.2.15/24"),
        "lease from netd:\n{out}"
    );
    let want = lab.host.sh(&format!(
        "sha256sum {} | cut -d' ' -f1",
        lab.path("www-host/big.bin")
    ))?;
    assert!(
        out.contains(&format!("SHA {}", want.trim())),
        "download through 10.0.2.2:\n{out}"
    );
    assert!(
        out.contains(&format!("PAGE {PAGE} (internet)")),
        "page by name:\n{out}"
    );
    Ok(())
}
