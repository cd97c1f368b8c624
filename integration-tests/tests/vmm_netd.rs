//! vmm-shim on a netd network: `--net netd=lan` asks netd's control socket for a `vm`
//! port, opens the TAP netd created, and a guest program's ARP request crosses netd's
//! switch to a test host on another port (a TAP in its own namespace) and is answered.
//! On exit vmm-shim removes its port again.

mod netd_common;
mod vmm_guest;

use std::path::Path;
use std::time::Duration;

use netd_common::{network, root_tempdir, start_netd, TapHost};
use vmm_guest::{arp_guest, assemble, run_guest, run_kernel};

/// vmm-shim's arguments for a NIC on the netd network `net` (`netd=NAME[,mac=M]`),
/// asked of netd's control socket `control`.
fn netd_nic<'a>(net: &'a str, control: &'a Path) -> [&'a str; 4] {
    let control = control.to_str().expect("UTF-8 control path");
    ["--net", net, "--netd-control", control]
}

#[test]
fn guest_on_a_netd_vm_port_reaches_a_test_host() {
    let dir = root_tempdir();
    let peer = TapHost::new("vdp").unwrap();
    let lan = network("lan", "internal", "subnet = \"10.6.0.0/24\"\n") + &peer.port("peer");
    let (host, netd) = start_netd(dir.path(), "vdh", &lan).unwrap();
    let tp = &peer.tap;
    peer.sh(&format!("sysctl -qw net.ipv6.conf.{tp}.disable_ipv6=1"))
        .unwrap();
    peer.addr("10.6.0.2/24").unwrap();
    peer.exec(&["ip", "link", "set", tp, "up"]).unwrap();

    let elf = assemble(dir.path(), "netd", &arp_guest([10, 6, 0, 9], [10, 6, 0, 2])).unwrap();
    let nic = netd_nic("netd=lan,mac=52:54:00:12:34:56", &netd.control);
    let r = run_guest(&host.exec_prefix(), &elf, &nic, Duration::from_secs(90));
    assert_eq!(r.serial, "NET OK\n", "{r}\nnetd log: {}", netd.log());
    r.assert_clean_exit("NET OK\n");
    // The port was removed on exit: only the peer port is left.
    let ports = netd.cli(&["port", "list", "lan"]).unwrap();
    assert!(ports.contains("peer"), "{ports}");
    assert!(!ports.contains("vs"), "vm port left behind: {ports}");
}

#[test]
fn unknown_netd_network_is_a_clear_error() {
    let dir = root_tempdir();
    let lan = network("lan", "internal", "subnet = \"10.7.0.0/24\"\n");
    let (host, netd) = start_netd(dir.path(), "vdx", &lan).unwrap();
    let elf = assemble(dir.path(), "x", "_start: jmp reboot\n").unwrap();
    let nic = netd_nic("netd=nosuchnet", &netd.control);
    run_kernel(&host.exec_prefix(), &elf, &nic, Duration::from_secs(30))
        .assert_exit(1, "netd refused");
}
