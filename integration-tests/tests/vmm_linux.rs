//! Boots the Debian kernel from the guest assets under vmm-shim with a busybox
//! initramfs that loads the virtio modules (the devices are found through vmm-shim's
//! ACPI tables), gets a DHCP lease from netd over the virtio-net NIC (a netd `vm`
//! port), writes a marker to its virtio-blk disk (a stord export), then reboots; the
//! test checks the lease in netd and the bytes in stord's disk file.
//!
//! Where this host's KVM cannot run a stock Linux kernel (KVM backed by `kvm_pvm`, or
//! no VMX/SVM at all), the boot prints `NOT RUN: <reason>`: the probe is the same one a
//! human would do (`/proc/cpuinfo` flags, `/sys/module/kvm_pvm`). This file has its own
//! `main` (`harness = false`) so a boot that did not run is never counted as a passed
//! test. `VMM_LINUX_FORCE=1` runs it anyway (on kvm_pvm it then fails at the KVM
//! internal error, after the whole setup has been exercised).

mod netd_common;
mod stord_common;
mod vmm_guest;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{guest_assets, require_root, workspace_root};

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
udhcpc -i eth0 -n -q -t 20 -T 1 && echo "DHCP OK $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
printf 'linux-wrote-this' | dd of=/dev/vda bs=512 seek=9 conv=sync,notrunc 2>/dev/null && sync && echo "DISK OK"
echo "LINUX DONE"
reboot -f
"#;

fn main() {
    probe_matches_this_host();
    println!("vmm_linux: probe_matches_this_host ... ok");
    let name = "linux_boots_gets_a_lease_and_writes_its_disk";
    let runnable =
        probe_linux_capable_kvm().and_then(
            |()| match integration_tests::guest_assets_unavailable() {
                Some(reason) => Err(format!("guest assets unavailable: {reason}")),
                None => Ok(()),
            },
        );
    match runnable {
        Err(reason) if std::env::var_os("VMM_LINUX_FORCE").is_none() => {
            println!("vmm_linux: {name} ... NOT RUN: {reason}");
        }
        _ => {
            linux_boots_gets_a_lease_and_writes_its_disk();
            println!("vmm_linux: {name} ... ok");
        }
    }
}

fn linux_boots_gets_a_lease_and_writes_its_disk() {
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

    let stord = stord_common::Stord::start(&[stord_common::dynamic("root", "8M")]).unwrap();
    let (host, netd) = netd_common::start_netd(
        dir.path(),
        "vlh",
        r#"
[[network]]
name = "lan"
mode = "internal"
subnet = "10.8.0.0/24"
dhcp = true
dhcp_range = "10.8.0.100-10.8.0.150"
"#,
    )
    .unwrap();
    let control = dir.path().join("control.sock");

    let console = dir.path().join("console.log");
    let kernel = assets.join("vmlinux");
    // vmm-shim runs in netd's namespace: reach stord (root namespace) by its unix socket.
    let disk = stord.unix_uri("root");
    let r = vmm_guest::run_kernel(
        &["ip", "netns", "exec", host.name()],
        &kernel,
        &[
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 rdinit=/init",
            "--mem",
            "512M",
            "--net",
            "netd=lan,mac=52:54:00:ab:cd:01",
            "--netd-control",
            control.to_str().unwrap(),
            "--disk",
            &disk,
            "--console",
            console.to_str().unwrap(),
        ],
        Duration::from_secs(180),
    );
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(r.code, Some(0), "stderr: {}\nconsole: {log}", r.stderr);
    for want in ["INIT STARTED", "DHCP OK 10.8.0.1", "DISK OK", "LINUX DONE"] {
        assert!(
            log.contains(want),
            "{want} missing from the console:\n{log}"
        );
    }
    let leases = netd.cli(&["leases", "lan"]).unwrap();
    assert!(leases.contains("52:54:00:ab:cd:01"), "{leases}");
    let bytes = std::fs::read(stord.state().join("disks/root.img")).unwrap();
    assert_eq!(&bytes[9 * 512..9 * 512 + 16], b"linux-wrote-this");
}

fn probe_matches_this_host() {
    // The probe's answer must agree with what the host says about itself.
    let r = probe_linux_capable_kvm();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    if !Path::new("/dev/kvm").exists() {
        assert!(r.unwrap_err().contains("/dev/kvm"));
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(r.unwrap_err().contains("kvm_pvm"));
    } else if hw {
        assert_eq!(r, Ok(()));
    } else {
        assert!(r.unwrap_err().contains("neither vmx nor svm"));
    }
}
