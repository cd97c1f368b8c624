//! vmm-shim on a netd network: `--net netd=lan` asks netd's control socket for a `vm`
//! port, opens the TAP netd created, and a guest program's ARP request crosses netd's
//! switch to a test host on another port (a TAP in its own namespace) and is answered.
//! On exit vmm-shim removes its port again. A VM live-migrated to another vmm-shim
//! on the network gets a port of its own there, the source's is removed, and netd
//! has the guest's MAC on the new port from the destination's RARP announce, before
//! the guest sends anything.

mod netd_common;
mod vmm_guest;

use std::path::Path;
use std::time::Duration;

use integration_tests::Netns;
use integration_tests::{free_port, wait_until};
use netd_common::{network, root_tempdir, start_netd, Netd, TapHost};
use vmm_guest::capture::Capture;
use vmm_guest::counter::{
    assert_consecutive, counter_quiet_net_program, counts, ctl, device, frame_counts, wait_count,
};
use vmm_guest::{arp_guest, assemble, run_guest, run_kernel, vmm_command, LiveVm};

/// vmm-shim's arguments for a NIC on the netd network `net` (`netd=NAME[,mac=M]`),
/// asked of netd's control socket `control`.
fn netd_nic<'a>(net: &'a str, control: &'a Path) -> [&'a str; 4] {
    let control = control.to_str().expect("UTF-8 control path");
    ["--net", net, "--netd-control", control]
}

/// netd, in a fresh host namespace, with the network `lan` of `subnet` and a port
/// `peer`: a TAP in a namespace of its own, up, without IPv6 (no chatter), at
/// `addr` if given.
fn lan_with_peer(dir: &Path, subnet: &str, addr: Option<&str>) -> (TapHost, Netns, Netd) {
    let peer = TapHost::new("vdp").unwrap();
    let subnet = format!("subnet = \"{subnet}\"\n");
    let lan = network("lan", "internal", &subnet) + &peer.port("peer");
    let (host, netd) = start_netd(dir, "vdh", &lan).unwrap();
    let tp = &peer.tap;
    peer.sh(&format!("sysctl -qw net.ipv6.conf.{tp}.disable_ipv6=1"))
        .unwrap();
    if let Some(a) = addr {
        peer.addr(a).unwrap();
    }
    peer.exec(&["ip", "link", "set", tp, "up"]).unwrap();
    (peer, host, netd)
}

#[test]
fn guest_on_a_netd_vm_port_reaches_a_test_host() {
    let dir = root_tempdir();
    let (_peer, host, netd) = lan_with_peer(dir.path(), "10.6.0.0/24", Some("10.6.0.2/24"));

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

/// The port netd's table of `lan` has `mac` on (`netd mac lan --json`).
fn mac_port(netd: &Netd, mac: &str) -> Option<String> {
    let t = netd.cli_json(&["mac", "lan"]).ok()?;
    t.as_array()?
        .iter()
        .find(|e| e["mac"] == mac)
        .and_then(|e| e["port"].as_str().map(str::to_string))
}

#[test]
fn a_vm_migrated_to_another_netd_port_is_announced_there_before_it_speaks() {
    const MAC: &str = "52:54:00:14:00:0d";
    let dir = root_tempdir();
    let (peer, host, netd) = lan_with_peer(dir.path(), "10.8.0.0/24", None);
    let cap = Capture::start(&peer.ns, &peer.tap, dir.path());

    let elf = assemble(
        dir.path(),
        "quiet",
        &counter_quiet_net_program([0x52, 0x54, 0, 0x14, 0, 0x0d]),
    )
    .unwrap();
    let (console, sock, dsock) = (
        dir.path().join("console"),
        dir.path().join("src.sock"),
        dir.path().join("dst.sock"),
    );
    let net = format!("netd=lan,mac={MAC}");
    let nic = netd_nic(&net, &netd.control);
    let src = LiveVm::guest(
        &host.exec_prefix(),
        &elf,
        &[
            &nic[..],
            &["--api-sock", sock.to_str().unwrap()],
            &["--console", console.to_str().unwrap()],
        ]
        .concat(),
    );
    wait_count(&console, 20);
    // `ip netns exec` runs vmm-shim in its own process: its port is named after it.
    let src_port = format!("vs{:x}n0", src.pid());
    let on = |p: &str| {
        wait_until(Duration::from_secs(5), || {
            mac_port(&netd, MAC).is_some_and(|q| q.contains(p))
        })
    };
    assert!(on(&src_port), "{:?}", netd.cli(&["mac", "lan"]));

    // The destination, on the same host here, asks netd for a port of its own.
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let dargs = [
        &["--incoming", to.as_str(), "--mem", "64M"][..],
        &["--console", console.to_str().unwrap()],
        &["--api-sock", dsock.to_str().unwrap()],
        &nic[..],
    ]
    .concat();
    let dst = LiveVm::spawn(vmm_command(&host.exec_prefix(), &dargs)).unwrap();
    let dst_port = format!("vs{:x}n0", dst.pid());
    assert!(
        wait_until(Duration::from_secs(10), || netd
            .cli(&["port", "list", "lan"])
            .is_ok_and(|p| p.contains(&dst_port))),
        "{:?}",
        netd.cli(&["port", "list", "lan"])
    );
    let listening = wait_until(Duration::from_secs(10), || {
        host.sh(&format!("ss -Hltn 'sport = :{port}'"))
            .is_ok_and(|o| !o.trim().is_empty())
    });
    assert!(listening, "the destination does not listen");
    let (code, out) = ctl(&sock, &["migrate", &to]);
    assert_eq!(code, Some(0), "{out}");
    let r = src.finish(Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "{r}");

    // netd has the MAC on the new port, though the guest has sent nothing there:
    // the RARP announce moved it.
    assert!(on(&dst_port), "{:?}", netd.cli(&["mac", "lan"]));
    let n = counts(&console).len();
    assert_consecutive(&wait_count(&console, n + 30));
    let net0 = device(&dsock, "net0");
    assert_eq!(net0["tx_packets"], 0, "the guest said nothing here: {net0}");
    assert!(net0["announce_frames"].as_u64().unwrap() >= 1, "{net0}");
    let ports = netd.cli(&["port", "list", "lan"]).unwrap();
    assert!(
        !ports.contains(&src_port),
        "the source left its port: {ports}"
    );
    // The peer saw the guest's one frame, then the announces (netd floods them).
    assert!(
        wait_until(Duration::from_secs(5), || cap
            .from(MAC)
            .iter()
            .filter(|s| s.ethertype == 0x8035)
            .count()
            == 5),
        "{:?}",
        cap.from(MAC)
    );
    assert_eq!(frame_counts(&cap.from(MAC)), [1], "{:?}", cap.from(MAC));
    let r = dst.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    let ports = netd.cli(&["port", "list", "lan"]).unwrap();
    assert!(!ports.contains(&dst_port), "{ports}");
}
