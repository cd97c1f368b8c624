//! Boots the Debian kernel from the guest assets under vmm-shim with a busybox
//! initramfs that loads the virtio modules, gets a DHCP lease over the virtio-net NIC
//! (from dnsmasq on the TAP's kernel side in a namespace) and writes a marker to its
//! virtio-blk disk (an NBD export), then reboots.
//!
//! Where this host's KVM cannot run a stock Linux kernel (KVM backed by `kvm_pvm`, or
//! no VMX/SVM at all), the test prints `not run: <reason>` and returns: the probe is
//! the same one a human would do (`/proc/cpuinfo` flags, `/sys/module/kvm_pvm`).

mod vmm_guest;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{
    free_port, guest_assets, require_root, unique_name, wait_until, workspace_root, ChildGuard,
    Netns,
};

/// Whether this host's KVM can run a stock Linux guest; `Err(reason)` if not.
fn probe_linux_capable_kvm() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm on this host".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "KVM here is kvm_pvm (pagetable-based VM): a stock Linux kernel dies with \
             KVM internal errors under it (see shared/GUEST-LAB.md)"
                .into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == f))
    };
    if !has("vmx") && !has("svm") {
        return Err("the CPU shows neither vmx nor svm: no hardware virtualization".into());
    }
    Ok(())
}

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "INIT STARTED"
/load-modules
ip link set lo up
udhcpc -i eth0 -n -q -t 20 -T 1 && echo "DHCP OK"
printf 'linux-wrote-this' | dd of=/dev/vda bs=512 seek=9 conv=sync,notrunc 2>/dev/null && sync && echo "DISK OK"
echo "LINUX DONE"
reboot -f
"#;

#[test]
fn linux_boots_gets_a_lease_and_writes_its_disk() {
    if let Err(reason) = probe_linux_capable_kvm() {
        println!("not run: {reason}");
        eprintln!("vmm_linux: not run: {reason}");
        return;
    }
    require_root();
    let assets = guest_assets();
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    std::fs::write(&init, INIT).unwrap();
    let initrd = dir.path().join("initrd.cpio.gz");
    let st = Command::new(workspace_root().join("scripts/mk-initramfs.sh"))
        .arg(&initrd)
        .arg(&init)
        .env("FABRIC_ASSETS", &assets)
        .status()
        .unwrap();
    assert!(st.success(), "mk-initramfs.sh failed");

    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let port = free_port();
    let _nbd = ChildGuard::new(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "root",
                "-t",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .arg(&img)
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));

    let ns = Netns::new("vml").unwrap();
    let tap = unique_name("vl");
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && ip addr add 10.0.2.2/24 dev {tap} && \
         ip link set {tap} up"
    ))
    .unwrap();
    let _dhcp = ns
        .spawn(&[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--port=0",
            &format!("--interface={tap}"),
            "--bind-interfaces",
            "--dhcp-range=10.0.2.15,10.0.2.50,255.255.255.0,1h",
            &format!("--dhcp-leasefile={}", dir.path().join("leases").display()),
            &format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()),
        ])
        .unwrap();

    let console = dir.path().join("console.log");
    let kernel = assets.join("vmlinux");
    let net = format!("tap={tap},mac=52:54:00:ab:cd:01");
    let disk = format!("nbd://127.0.0.1:{port}/root");
    let r = vmm_guest::run_vmm(
        &["ip", "netns", "exec", ns.name()],
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 rdinit=/init",
            "--mem",
            "512M",
            "--net",
            &net,
            "--disk",
            &disk,
            "--console",
            console.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    )
    .unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(r.code, Some(0), "stderr: {}\nconsole: {log}", r.stderr);
    for want in ["INIT STARTED", "DHCP OK", "DISK OK", "LINUX DONE"] {
        assert!(
            log.contains(want),
            "{want} missing from the console:\n{log}"
        );
    }
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[9 * 512..9 * 512 + 16], b"linux-wrote-this");
}

#[test]
fn probe_matches_this_host() {
    // On these machines the probe must say no, and say why; elsewhere it may say yes.
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let r = probe_linux_capable_kvm();
    if pvm {
        assert!(r.unwrap_err().contains("kvm_pvm"));
    }
}
