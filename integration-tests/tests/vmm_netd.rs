//! vmm-shim on a netd network: `--net netd=lan` asks netd's control socket for a `vm`
//! port, opens the TAP netd created, and a guest program's ARP request crosses netd's
//! switch to a test host on another port (a TAP in its own namespace) and is answered.
//! On exit vmm-shim removes its port again.

mod netd_common;
mod vmm_guest;

use std::time::Duration;

use integration_tests::{require_root, unique_name, Netns};
use netd_common::{tempdir, write_config, Netd};
use vmm_guest::{arp_guest, assemble, run_vmm};

#[test]
fn guest_on_a_netd_vm_port_reaches_a_test_host() {
    require_root();
    let dir = tempdir();
    let host = Netns::new("vdh").unwrap();
    let peer = Netns::new("vdp").unwrap();
    let tp = unique_name("tp");
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[[network]]
name = "lan"
mode = "internal"
subnet = "10.6.0.0/24"

[[network.port]]
name = "peer"
kind = "tap"
ifname = "{tp}"
netns = "{np}"
"#,
            np = peer.name()
        ),
    );
    let netd = Netd::start(&host, dir.path(), &cfg).unwrap();
    peer.sh(&format!("sysctl -qw net.ipv6.conf.{tp}.disable_ipv6=1"))
        .unwrap();
    peer.exec(&["ip", "addr", "add", "10.6.0.2/24", "dev", &tp])
        .unwrap();
    peer.exec(&["ip", "link", "set", &tp, "up"]).unwrap();

    let elf = assemble(dir.path(), "netd", &arp_guest([10, 6, 0, 9], [10, 6, 0, 2])).unwrap();
    let control = dir.path().join("control.sock");
    let r = run_vmm(
        &["ip", "netns", "exec", host.name()],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64M",
            "--net",
            "netd=lan,mac=52:54:00:12:34:56",
            "--netd-control",
            control.to_str().unwrap(),
        ],
        Duration::from_secs(90),
    )
    .unwrap();
    assert_eq!(
        r.serial,
        "NET OK\n",
        "stderr: {}\nnetd log: {}",
        r.stderr,
        netd.log()
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    // The port was removed on exit: only the peer port is left.
    let ports = netd.cli(&["port", "list", "lan"]).unwrap();
    assert!(ports.contains("peer"), "{ports}");
    assert!(!ports.contains("vs"), "vm port left behind: {ports}");
}

#[test]
fn unknown_netd_network_is_a_clear_error() {
    require_root();
    let dir = tempdir();
    let host = Netns::new("vdx").unwrap();
    let cfg = write_config(
        dir.path(),
        "[[network]]\nname = \"lan\"\nmode = \"internal\"\nsubnet = \"10.7.0.0/24\"\n",
    );
    let _netd = Netd::start(&host, dir.path(), &cfg).unwrap();
    let elf = assemble(dir.path(), "x", "_start: jmp reboot\n").unwrap();
    let control = dir.path().join("control.sock");
    let r = run_vmm(
        &["ip", "netns", "exec", host.name()],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--net",
            "netd=nosuchnet",
            "--netd-control",
            control.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("netd refused"), "{}", r.stderr);
}
