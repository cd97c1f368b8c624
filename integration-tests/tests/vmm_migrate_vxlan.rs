//! vmm-shim's live migration between two hosts, each with its own netd, joined by
//! VXLAN (issue 14's proof): host A and host B are namespaces of the VXLAN lab
//! (`vxlan_common`), each netd has the network `lan` with a `vxlan` port towards the
//! other. A counting guest (it dirties a working set, writes each number to its disk
//! on stord, sends it in a broadcast frame through its NIC, then prints it) starts
//! on host A with `--net netd=lan` (a `vm` port of A's netd); a peer namespace on a
//! TAP port of B's netd watches its frames with tshark (before the move they come
//! through the tunnel). `vmm-shim --incoming tcp:B:PORT` waits in host B (its own
//! port of B's netd, its own NBD connection over stord's unix socket) and
//! `ctl migrate` moves the VM there over the hosts' underlay addresses.
//!
//! After the move: the count goes on with no gap and no repeat on the serial port
//! (both vmm-shims append to one console file), in the frames the peer saw (the
//! tunnel's, then RARP from B's vmm-shim, then B's port's) and on the disk; netd B
//! has the MAC on the destination's vm port, netd A behind B's VTEP on its vxlan
//! port, the source's port on A is gone, and the peer saw the five RARPs.
//!
//! ```text
//!  vmm-shim (source) --vm port-- [netd A] ==vxlan== [netd B] --vm port-- vmm-shim (--incoming)
//!                                                       '--TAP-- peer ns (tshark)
//!       \____________________ stord (NBD, unix socket) ____________________/
//! ```

mod stord_common;
mod vmm_guest;
mod vxlan_common;

use std::path::Path;
use std::time::Duration;

use integration_tests::wait_until;
use serde_json::Value;
use stord_common::{dynamic, Stord};
use vmm_guest::capture::Capture;
use vmm_guest::counter::{
    assert_consecutive, assert_disk_counts, assert_moved_and_announced, counter_net_program,
    counts, ctl, device, frame_counts, wait_count,
};
use vmm_guest::{setup, vmm_command, LiveVm};
use vxlan_common::netd_common::network;
use vxlan_common::{vxlan_port, Lab, Netd, TapHost};

const VNI: u32 = 1415;
const MAC: &str = "52:54:00:14:00:0f";
const MAC_BYTES: [u8; 6] = [0x52, 0x54, 0, 0x14, 0, 0x0f];
const MIGRATION_PORT: u16 = 4445;

/// The entry of `MAC` in `netd`'s table of `lan` (`netd mac lan --json`).
fn entry(netd: &Netd) -> Option<Value> {
    let t = netd.cli_json(&["mac", "lan"]).ok()?;
    t.as_array()?.iter().find(|e| e["mac"] == MAC).cloned()
}

/// Whether `netd` has `MAC` on a port whose name contains `port`, behind the VTEP
/// `remote` if given; waits up to 10 s for it.
fn mac_on(netd: &Netd, port: &str, remote: Option<&str>) -> bool {
    wait_until(Duration::from_secs(10), || {
        entry(netd).is_some_and(|e| {
            e["port"].as_str().is_some_and(|p| p.contains(port))
                && e.get("remote").and_then(Value::as_str) == remote
        })
    })
}

/// The port names of `lan` on `netd` (`netd port list lan`).
fn ports(netd: &Netd) -> String {
    netd.cli(&["port", "list", "lan"]).unwrap_or_default()
}

/// vmm-shim's NIC arguments: a `vm` port of `netd`'s `lan` with the guest's MAC.
fn nic(netd: &Netd) -> Vec<String> {
    let control = netd.control.to_str().expect("UTF-8 control path");
    [
        "--net".to_string(),
        format!("netd=lan,mac={MAC}"),
        "--netd-control".to_string(),
        control.to_string(),
    ]
    .to_vec()
}

/// Both netds' tables, for a failure's message.
fn tables(na: &Netd, nb: &Netd) -> String {
    format!(
        "A:\n{}\nB:\n{}",
        na.cli(&["mac", "lan"]).unwrap_or_default(),
        nb.cli(&["mac", "lan"]).unwrap_or_default()
    )
}

#[test]
fn a_counting_vm_moves_between_two_netd_hosts_joined_by_vxlan() {
    let (dir, elf) = setup("mvx", &counter_net_program(2048, true, MAC_BYTES));
    let mut lab = Lab::new(2, 1600).unwrap();
    let (a_ip, b_ip) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    let peer = TapHost::new("mvp").unwrap();
    let lan = network("lan", "internal", "");
    let a_cfg = lan.clone() + &vxlan_port("vx", VNI, &a_ip, &[&b_ip], "");
    let b_cfg = lan + &peer.port("peer") + &vxlan_port("vx", VNI, &b_ip, &[&a_ip], "");
    lab.hosts[0].start_netd(&a_cfg).unwrap();
    lab.hosts[1].start_netd(&b_cfg).unwrap();
    let (ha, hb) = (&lab.hosts[0], &lab.hosts[1]);
    let (na, nb) = (ha.netd(), hb.netd());
    let tp = &peer.tap;
    peer.sh(&format!(
        "sysctl -qw net.ipv6.conf.{tp}.disable_ipv6=1 && ip link set {tp} up"
    ))
    .unwrap();
    let cap = Capture::start(&peer.ns, tp, dir.path());

    let stord = Stord::start(&[dynamic("vm0", "1M")]).unwrap();
    let disk = stord.unix_uri("vm0");
    let console = dir.path().join("console");
    let (sock, dsock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let common = |netd: &Netd, api: &Path| {
        let mut a = nic(netd);
        a.extend([
            "--disk".into(),
            disk.clone(),
            "--api-sock".into(),
            path(api),
        ]);
        a.extend(["--console".into(), path(&console)]);
        a
    };
    let src_args = common(na, &sock);
    let src_args: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let src = LiveVm::guest(&ha.ns.exec_prefix(), &elf, &src_args);
    wait_count(&console, 20);
    // `ip netns exec` runs vmm-shim in its own process: its port is named after it.
    let src_port = format!("vs{:x}n0", src.pid());
    assert!(mac_on(na, &src_port, None), "{}", tables(na, nb));
    // B learned the MAC behind A's VTEP from the frames that came through.
    assert!(mac_on(nb, "vx", Some(&a_ip)), "{}", tables(na, nb));
    assert!(
        wait_until(Duration::from_secs(10), || !frame_counts(&cap.from(MAC))
            .is_empty()),
        "the peer saw nothing through the tunnel: {:?}\n{}",
        nb.cli(&["port", "list", "lan", "--drops"]),
        std::fs::read_to_string(dir.path().join(format!("{tp}.frames"))).unwrap_or_default()
    );

    // The destination waits on B's underlay address, on a port of B's netd.
    let to = format!("tcp:{b_ip}:{MIGRATION_PORT}");
    let mut dargs = vec![
        "--incoming".to_string(),
        to.clone(),
        "--mem".into(),
        "64M".into(),
    ];
    dargs.extend(common(nb, &dsock));
    let dargs: Vec<&str> = dargs.iter().map(String::as_str).collect();
    let dst = LiveVm::spawn(vmm_command(&hb.ns.exec_prefix(), &dargs)).unwrap();
    let dst_port = format!("vs{:x}n0", dst.pid());
    assert!(
        wait_until(Duration::from_secs(10), || ports(nb).contains(&dst_port)),
        "no port for the destination on B: {}",
        ports(nb)
    );
    let listening = wait_until(Duration::from_secs(10), || {
        hb.ns
            .sh(&format!("ss -Hltn 'sport = :{MIGRATION_PORT}'"))
            .is_ok_and(|o| !o.trim().is_empty())
    });
    assert!(listening, "the destination does not listen on {to}");

    let (code, out) = ctl(&sock, &["migrate", &to]);
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("migration A -> B over the underlay: {v}");
    assert_eq!(v["mode"], "pre-copy", "{v}");
    assert!(v["dirty_logged_pages"].as_u64().unwrap() >= 2048, "{v}");
    let r = src.finish(Duration::from_secs(20));
    assert_eq!(r.code, Some(0), "the source exits 0 after a migration: {r}");

    // Each netd has the MAC where the VM is now; the source's port is gone.
    assert!(mac_on(nb, &dst_port, None), "{}", tables(na, nb));
    assert!(mac_on(na, "vx", Some(&b_ip)), "{}", tables(na, nb));
    assert!(
        !ports(na).contains(&src_port),
        "the source left its port on A: {}",
        ports(na)
    );
    // A second of counting on B: every RARP round (0.8 s) is done.
    let n = counts(&console).len();
    assert_consecutive(&wait_count(&console, n + 100));
    let net0 = device(&dsock, "net0");
    assert_eq!(net0["announce_frames"], 5, "{net0}");
    assert!(net0["tx_packets"].as_u64().unwrap() >= 100, "{net0}");
    let r = dst.stop(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r}");
    assert!(!ports(nb).contains(&dst_port), "{}", ports(nb));

    // Serial: every number once, in order.
    let printed = counts(&console);
    assert_consecutive(&printed);
    // Frames: the peer saw every number (each is sent before it is printed), the
    // tunnel's first, then the five RARPs from B's vmm-shim before the guest's first
    // frame on B, and the guest's own announce once.
    let seen = cap.up_to(MAC, *printed.last().unwrap());
    let moved = seen
        .iter()
        .position(|s| s.ethertype == 0x8035)
        .unwrap_or_else(|| panic!("no RARP reached the peer: {seen:?}"));
    let (a, b) = seen.split_at(moved);
    // (From 1: the peer saw the guest's first frame too.)
    assert_moved_and_announced(a, b, &printed);
    // Disk: every number the guest printed is in its sector.
    let img = std::fs::read(stord.state().join("disks/vm0.img")).unwrap();
    assert_disk_counts(&img, &printed);
}
