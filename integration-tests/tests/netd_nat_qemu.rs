//! A real VMM on a NAT network: QEMU (TCG) boots the Debian kernel with a busybox
//! initramfs through a `vm` port of netd's NAT network; the guest takes a lease from
//! netd and downloads a 4 MiB file from an HTTP server on the host's 127.0.0.1
//! through 10.0.2.2, and a page from the "internet" namespace by name (DNS through
//! 10.0.2.3). The guest prints the file's SHA-256, compared with the host's.

mod nat_common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integration_tests::{guest_assets, unique_name, workspace_root, ChildGuard};
use nat_common::{Lab, INET_NAME, PAGE};

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
/load-modules
ip link set lo up
ip link set eth0 up
if udhcpc -i eth0 -q -n -t 10 -T 1 -s /usr/share/udhcpc/default.script > /dev/console 2>&1; then
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

#[test]
fn qemu_guest_on_nat_gets_lease_and_downloads_from_host() -> Result<()> {
    let assets = guest_assets();
    let mut lab = Lab::new()?;
    let tap = unique_name("nq");
    let resolv = lab.path("resolv.conf");
    lab.start_netd(&format!(
        r#"
[[network]]
name = "natvm"
mode = "nat"
resolv_conf = "{resolv}"

[[network.port]]
kind = "vm"
ifname = "{tap}"
"#
    ))?;

    let init = lab.dir.path().join("init");
    std::fs::write(&init, INIT.replace("NAME", INET_NAME))?;
    let initrd = lab.dir.path().join("initrd.gz");
    integration_tests::run(
        std::process::Command::new(workspace_root().join("scripts/mk-initramfs.sh"))
            .arg(&initrd)
            .arg(&init)
            .env("FABRIC_ASSETS", &assets),
    )?;

    let qemu = assets.join("bin/qemu-system-x86_64");
    let serial = lab.dir.path().join("serial.log");
    let mut cmd = lab.host.command(&[
        qemu.to_str().context("path")?,
        "-M",
        "microvm",
        "-m",
        "256",
        "-smp",
        "1",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        &format!("file:{}", serial.display()),
        "-kernel",
        assets.join("vmlinux").to_str().context("path")?,
        "-initrd",
        initrd.to_str().context("path")?,
        "-append",
        "console=ttyS0 tsc_early_khz=2000000 panic=-1 quiet",
        // vnet_hdr=off: netd's AF_PACKET side carries plain frames.
        "-netdev",
        &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vnet_hdr=off"),
        "-device",
        "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
    ]);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut vm = ChildGuard::new(cmd.spawn().context("spawn qemu")?);

    let start = Instant::now();
    let mut out = String::new();
    while start.elapsed() < Duration::from_secs(120) {
        out = std::fs::read_to_string(&serial).unwrap_or_default();
        if out.contains("GUEST-DONE") {
            break;
        }
        if let Ok(Some(_)) = vm.child().try_wait() {
            out = std::fs::read_to_string(&serial).unwrap_or_default();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !out.contains("GUEST-DONE") {
        let mut err = String::new();
        if let Some(mut e) = vm.child().stderr.take() {
            let _ = vm.child().kill();
            let _ = e.read_to_string(&mut err);
        }
        bail!("guest did not finish in time:\n{out}\nqemu stderr:\n{err}");
    }
    let _ = vm.wait_timeout(Duration::from_secs(10));

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
