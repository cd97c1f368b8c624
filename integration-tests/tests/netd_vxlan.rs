//! VXLAN ports (issue 13), end to end. Hosts are namespaces on one underlay
//! segment, each running its own netd (or, for interop, only the kernel's vxlan
//! device in a Linux bridge); guests are namespaces on TAP ports of a host's netd.
//!
//! - two netds share a NAT network: host A serves it (DHCP, router, DNS), host B
//!   runs it with `services = false`; B's guest leases from A, pings, runs iperf3
//!   and downloads through A's router from an "internet" namespace;
//! - netd interoperates with the kernel's vxlan+bridge: ping and iperf3 both ways,
//!   each side learns the other's MAC behind the right VTEP;
//! - three hosts: a remote added and removed at runtime, and a MAC that moves
//!   between hosts is relearned from its next frame;
//! - junk on the tunnel (random UDP, unlisted senders, wrong VNI, truncated and
//!   flagless headers, bad inner frames) is dropped and counted while a guest keeps
//!   working;
//! - a network whose MTU does not fit the underlay is refused, naming both MTUs;
//! - on a port with a `group`, a unicast VXLAN datagram from a host that is
//!   neither listed nor on the group is dropped and counted (`drop_sender`),
//!   while the members (learned unicast replies included) keep working; the same
//!   datagram sent to the group is accepted.

mod vxlan_common;

use anyhow::Result;
use vxlan_common::{
    eventually, guest, iperf3_bps, mac_of, ping, ping_retry, tunnel, vxlan_port, Lab,
};

const VNI: u32 = 4242;
const INET_SERVER: &str = "198.19.0.10";

fn nat_net(keys: &str) -> String {
    integration_tests::netd::network("lan", "nat", &format!("mtu = 1450\n{keys}"))
}

#[test]
fn two_netds_share_a_nat_network_served_by_one() -> Result<()> {
    let mut lab = Lab::new(2, 1500)?;
    let (a_ip, b_ip) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    let ga = guest("vxga")?;
    let gb = guest("vxgb")?;
    // The "internet", routed from host A only: a web server with a 4 MiB file.
    let inet = integration_tests::Netns::new("vxi")?;
    lab.hosts[0].ns.veth_to("hv0", "iv0", inet.name())?;
    lab.hosts[0].ns.sh("ip addr add 198.18.20.1/24 dev hv0 && ip link set hv0 up && ip route add 198.19.0.0/16 via 198.18.20.2")?;
    inet.sh(&format!("ip addr add 198.18.20.2/24 dev iv0 && ip link set iv0 up && ip addr add {INET_SERVER}/32 dev lo && ip route add default via 198.18.20.1"))?;
    let www = lab.path("www");
    std::fs::create_dir_all(&www)?;
    let big: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(format!("{www}/big.bin"), &big)?;
    let _httpd = inet.spawn(&[
        "busybox",
        "httpd",
        "-f",
        "-p",
        &format!("{INET_SERVER}:80"),
        "-h",
        &www,
    ])?;

    let a_cfg = nat_net("") + &ga.port("ga") + &vxlan_port("vx", VNI, &a_ip, &[&b_ip], "");
    let b_cfg = nat_net("services = false\n")
        + &gb.port("gb")
        + &vxlan_port("vx", VNI, &b_ip, &[&a_ip], "");
    lab.hosts[0].start_netd(&a_cfg)?;
    lab.hosts[1].start_netd(&b_cfg)?;
    let (na, nb) = (lab.hosts[0].netd(), lab.hosts[1].netd());

    // services = false: B runs no DHCP server and no router for the network.
    let nets = nb.cli_json(&["net", "list"])?;
    assert_eq!(nets[0]["dhcp"], false, "{nets}");
    assert!(
        nb.cli(&["leases", "lan", "--stats"]).is_err(),
        "B has no DHCP server"
    );
    assert!(nb.cli(&["flows", "lan"]).is_err(), "B has no NAT router");
    let kinds = nb.cli_json(&["port", "list", "lan"])?;
    assert!(
        kinds
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["kind"] != "service"),
        "{kinds}"
    );

    // B's guest leases from A's netd, over the tunnel.
    let lb = lab.dhcp(&gb)?;
    assert!(
        lb.contains("router=10.0.2.2") && lb.contains("ip=10.0.2."),
        "{lb}"
    );
    let la = lab.dhcp(&ga)?;
    let ip_of = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("ip="))
            .unwrap_or_default()
            .to_string()
    };
    let (ipa, ipb) = (ip_of(&la), ip_of(&lb));
    assert_ne!(ipa, ipb);
    let leases = na.cli_json(&["leases", "lan"])?;
    assert_eq!(leases.as_array().map(Vec::len), Some(2), "{leases}");

    // Ping across, and the router from B's side.
    assert!(ping_retry(&gb, &ipa, 3), "B's guest cannot ping A's");
    assert!(
        ping_retry(&gb, "10.0.2.2", 3),
        "B's guest cannot ping A's router"
    );

    // B's netd learned A's guest behind A's address, and shows it.
    let mac_a = mac_of(&ga, &ga.tap)?;
    let table = nb.cli(&["mac", "lan"])?;
    let row = table
        .lines()
        .find(|l| l.contains(&mac_a))
        .unwrap_or_else(|| panic!("no {mac_a} in\n{table}"));
    assert!(row.contains("vx") && row.contains(&a_ip), "{table}");

    // iperf3 across the tunnel.
    let bps = iperf3_bps(&gb, &ga, &ipa)?;
    eprintln!(
        "iperf3 B guest -> A guest over vxlan: {:.0} Mbit/s",
        bps / 1e6
    );
    assert!(bps > 50e6, "{bps} bit/s");

    // The outer source port follows the inner flow: four TCP flows from A's guest
    // leave A from more than one source port (16 ports, hashed). A capture on the
    // veth sees a UDP GSO batch as one packet, so a few lines are plenty.
    let cap = lab.path("sports.txt");
    let cap_err = lab.path("sports.err");
    let _tshark = lab.hosts[0].ns.spawn(&[
        "sh", "-c",
        &format!("tshark -l -i ul0 -a duration:10 -f 'udp and dst port 4789 and src host {a_ip}' -T fields -e udp.srcport > {cap} 2>{cap_err}"),
    ])?;
    // tshark says when it is capturing (its start takes seconds on a busy host).
    assert!(
        eventually(|| std::fs::read_to_string(&cap_err).is_ok_and(|s| s.contains("Capturing on"))),
        "tshark did not start: {}",
        std::fs::read_to_string(&cap_err).unwrap_or_default()
    );
    let _srv = gb.spawn(&["iperf3", "-s", "-1", "-B", &ipb])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    ga.exec(&["iperf3", "-c", &ipb, "-t", "1", "-P", "4", "-l", "16k"])?;
    assert!(eventually(|| std::fs::read_to_string(&cap)
        .map(|s| s.lines().count() >= 8)
        .unwrap_or(false)));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ports: std::collections::HashSet<String> = std::fs::read_to_string(&cap)?
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        ports.len() >= 2,
        "one outer source port for four flows: {ports:?}"
    );
    assert!(
        ports
            .iter()
            .all(|p| p.parse::<u16>().is_ok_and(|p| p >= 49152)),
        "{ports:?}"
    );

    // A download from the internet through A's router.
    let sum = gb.sh(&format!(
        "curl -sS --max-time 30 http://{INET_SERVER}/big.bin | sha256sum"
    ))?;
    let want = lab.hosts[0].ns.sh(&format!("sha256sum < {www}/big.bin"))?;
    assert_eq!(sum, want, "download through A's NAT router corrupted");

    // The tunnel counted what it carried and dropped nothing.
    let c = tunnel(nb, "lan", "vx")?;
    assert!(c["rx_datagrams"].as_u64().unwrap() > 1000, "{c}");
    assert_eq!(c["drop_sender"], 0, "{c}");
    assert_eq!(c["drop_vni"], 0, "{c}");
    assert_eq!(c["drop_not_vxlan"], 0, "{c}");
    Ok(())
}

#[test]
fn netd_interoperates_with_the_kernel_vxlan() -> Result<()> {
    let mut lab = Lab::new(2, 1500)?;
    let (a_ip, b_ip) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    let ga = guest("vxka")?;
    let cfg = integration_tests::netd::network("lan", "internal", "mtu = 1450\n")
        + &ga.port("ga")
        + &vxlan_port("vx", VNI, &a_ip, &[&b_ip], "");
    lab.hosts[0].start_netd(&cfg)?;
    // Host B: no netd; a kernel vxlan device in a bridge with a guest's veth.
    let gb = integration_tests::Netns::new("vxkb")?;
    // A real wire carries finished packets; a veth would hand the kernel's
    // unsegmented tunnel super-frames, inner checksums unfilled, to netd's socket.
    vxlan_common::wire_offloads_off(&lab.hosts[1].ns)?;
    lab.hosts[1].ns.sh(&format!(
        "ip link add vx0 type vxlan id {VNI} local {b_ip} remote {a_ip} dstport 4789 && \
         ip link add br0 type bridge && ip link set br0 up && \
         ip link set vx0 master br0 up && \
         ip link add gv0 mtu 1450 type veth peer name eth0 netns {g} && \
         ip link set gv0 master br0 up",
        g = gb.name()
    ))?;
    gb.sh("ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0")?;
    ga.addr("10.77.0.1/24")?;
    assert!(
        ping_retry(&ga, "10.77.0.2", 5),
        "netd guest cannot ping kernel guest"
    );
    assert!(
        ping_retry(&gb, "10.77.0.1", 3),
        "kernel guest cannot ping netd guest"
    );
    // ARP learned both ways, each MAC behind the other VTEP.
    let (mac_a, mac_b) = (mac_of(&ga, &ga.tap)?, mac_of(&gb, "eth0")?);
    let fdb = lab.hosts[1].ns.sh("bridge fdb show dev vx0")?;
    assert!(
        fdb.lines().any(|l| l.contains(&mac_a) && l.contains(&a_ip)),
        "kernel did not learn {mac_a} behind {a_ip}:\n{fdb}"
    );
    let macs = lab.hosts[0].netd().cli_json(&["mac", "lan"])?;
    assert!(
        integration_tests::has_item(&macs, |e| e["mac"] == mac_b.as_str()
            && e["remote"] == b_ip.as_str()),
        "netd did not learn {mac_b} behind {b_ip}: {macs}"
    );
    let neigh = ga.sh("ip neigh show 10.77.0.2")?;
    assert!(neigh.contains(&mac_b), "{neigh}");
    let neigh = gb.sh("ip neigh show 10.77.0.1")?;
    assert!(neigh.contains(&mac_a), "{neigh}");
    // iperf3 both ways.
    let ab = iperf3_bps(&ga, &gb, "10.77.0.2")?;
    let ba = iperf3_bps(&gb, &ga, "10.77.0.1")?;
    eprintln!(
        "iperf3 netd->kernel {:.0} Mbit/s, kernel->netd {:.0} Mbit/s",
        ab / 1e6,
        ba / 1e6
    );
    assert!(ab > 50e6 && ba > 50e6, "{ab} {ba}");
    let c = tunnel(lab.hosts[0].netd(), "lan", "vx")?;
    assert_eq!(c["drop_not_vxlan"], 0, "{c}");
    assert_eq!(c["drop_vni"], 0, "{c}");
    Ok(())
}

#[test]
fn three_hosts_runtime_remotes_and_a_mac_move() -> Result<()> {
    let mut lab = Lab::new(3, 1500)?;
    let ips = lab.ips();
    let (ga, gm, gc) = (guest("vxta")?, guest("vxtm")?, guest("vxtc")?);
    let net = || integration_tests::netd::network("lan", "internal", "mtu = 1450\n");
    // A floods only to B at first; B and C know everyone.
    let a = net() + &ga.port("ga") + &vxlan_port("vx", VNI, &ips[0], &[&ips[1]], "");
    let b = net()
        + &gm.port("gm")
        + "mac = \"52:54:00:00:0d:01\"\n"
        + &vxlan_port("vx", VNI, &ips[1], &[&ips[0], &ips[2]], "");
    let c = net() + &gc.port("gc") + &vxlan_port("vx", VNI, &ips[2], &[&ips[0], &ips[1]], "");
    lab.hosts[0].start_netd(&a)?;
    lab.hosts[1].start_netd(&b)?;
    lab.hosts[2].start_netd(&c)?;
    ga.addr("10.78.0.1/24")?;
    gm.addr("10.78.0.2/24")?;
    gc.addr("10.78.0.3/24")?;
    let na = lab.hosts[0].netd();
    assert!(ping_retry(&ga, "10.78.0.2", 5), "A cannot reach B");
    // C is not on A's list: A neither floods to it nor accepts its datagrams.
    assert!(!ping(&ga, "10.78.0.3"), "A reached C without C on its list");
    assert!(
        !ping(&gc, "10.78.0.1"),
        "C reached A without being on A's list"
    );
    assert!(tunnel(na, "lan", "vx")?["drop_sender"].as_u64().unwrap() > 0);
    // Added at runtime: A and C talk, and nothing restarted (B still answers).
    na.cli(&["vxlan", "remote", "add", "lan", "vx", &ips[2]])?;
    let show = na.cli_json(&["vxlan", "show", "lan", "vx"])?;
    assert_eq!(
        show["remotes"],
        serde_json::json!([ips[1], ips[2]]),
        "{show}"
    );
    assert!(
        ping_retry(&ga, "10.78.0.3", 5),
        "A cannot reach C after remote add"
    );
    assert!(ping(&ga, "10.78.0.2"), "B lost after remote add");
    // Removed again: A drops C's datagrams and forgets C's MACs.
    na.cli(&["vxlan", "remote", "del", "lan", "vx", &ips[2]])?;
    let dropped = tunnel(na, "lan", "vx")?["drop_sender"].as_u64().unwrap();
    assert!(!ping(&ga, "10.78.0.3"), "A reached C after remote del");
    // C still lists A: what it sends now is dropped at A, and counted.
    assert!(!ping(&gc, "10.78.0.1"), "C reached A after A removed it");
    assert!(tunnel(na, "lan", "vx")?["drop_sender"].as_u64().unwrap() > dropped);
    let macs = na.cli_json(&["mac", "lan"])?;
    assert!(
        !integration_tests::has_item(&macs, |e| e["remote"] == ips[2].as_str()),
        "{macs}"
    );
    assert!(na
        .cli(&["vxlan", "remote", "del", "lan", "vx", &ips[2]])
        .is_err());
    na.cli(&["vxlan", "remote", "add", "lan", "vx", &ips[2]])?;

    // A MAC move: guest M leaves host B for host C (same namespace, same MAC).
    assert!(ping_retry(&ga, "10.78.0.2", 3));
    let mac_m = "52:54:00:00:0d:01";
    let behind = |ip: &str| {
        na.cli_json(&["mac", "lan"])
            .map(|m| integration_tests::has_item(&m, |e| e["mac"] == mac_m && e["remote"] == ip))
            .unwrap_or(false)
    };
    assert!(behind(&ips[1]), "M not learned behind B");
    lab.hosts[1].netd().cli(&["port", "del", "lan", "gm"])?;
    let tap2 = vxlan_common::ifname("vxm");
    let argv = ["--netns", gm.name(), "--name", "gm", "--mac", mac_m];
    lab.hosts[2].netd().cli(&integration_tests::netd::port_add(
        "lan", "tap", &tap2, &argv,
    ))?;
    gm.sh(&format!("ip addr add 10.78.0.2/24 dev {tap2}"))?;
    // One frame from M (its gratuitous ARP) and A follows it to C.
    gm.sh(&format!(
        "/usr/bin/python3 -c \"from scapy.all import *; sendp(Ether(src='{mac_m}',dst='ff:ff:ff:ff:ff:ff')/ARP(op=2,hwsrc='{mac_m}',psrc='10.78.0.2',pdst='10.78.0.2'),iface='{tap2}',verbose=0)\""
    ))?;
    assert!(
        eventually(|| behind(&ips[2])),
        "A did not relearn M behind C"
    );
    assert!(
        ping_retry(&ga, "10.78.0.2", 3),
        "traffic did not follow M to C"
    );
    Ok(())
}

#[test]
fn junk_on_the_tunnel_is_dropped_and_counted() -> Result<()> {
    let mut lab = Lab::new(3, 1500)?;
    let ips = lab.ips();
    let (ga, gb) = (guest("vxja")?, guest("vxjb")?);
    let net = || integration_tests::netd::network("lan", "internal", "mtu = 1450\n");
    lab.hosts[0]
        .start_netd(&(net() + &ga.port("ga") + &vxlan_port("vx", VNI, &ips[0], &[&ips[1]], "")))?;
    lab.hosts[1]
        .start_netd(&(net() + &gb.port("gb") + &vxlan_port("vx", VNI, &ips[1], &[&ips[0]], "")))?;
    ga.addr("10.79.0.1/24")?;
    gb.addr("10.79.0.2/24")?;
    assert!(ping_retry(&ga, "10.79.0.2", 5));
    let na = lab.hosts[0].netd();
    let before = tunnel(na, "lan", "vx")?;
    let port_before = na.counters("lan", "vx")?;
    // From B's own address (a listed remote): each kind of bad datagram, 5 times.
    // From host C (not listed): random UDP and a valid VXLAN frame.
    let vni = VNI;
    let script = format!(
        r#"
from scapy.all import *
import os
a = "{a}"
def vx(flags, vni, inner):
    return bytes([flags, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0" + inner
good_inner = bytes(Ether(src="02:00:00:00:99:01", dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.79.0.1"))
junk = [
    os.urandom(40),                         # not VXLAN: I flag clear (first byte random but forced below)
    b"\x08\x00\x00",                        # truncated header
    vx(0x00, {vni}, good_inner),            # I flag clear
    vx(0x08, {vni} + 1, good_inner),        # wrong VNI
    vx(0x08, {vni}, b"\x01\x02\x03\x04\x05"),  # inner frame shorter than Ethernet
    vx(0x08, {vni}, bytes(Ether(src="03:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")/Raw(b"x"*50))),  # multicast source
    vx(0x08, {vni}, bytes(Ether(src="02:00:00:00:99:02", dst="ff:ff:ff:ff:ff:ff")/Raw(b"x"*1460))),  # above the MTU
]
junk[0] = bytes([junk[0][0] & 0xf7]) + junk[0][1:]
for p in junk:
    for _ in range(5):
        send(IP(src="{src}", dst=a)/UDP(sport=40000, dport=4789)/Raw(p), verbose=0)
"#,
        a = ips[0],
        src = ips[1],
    );
    std::fs::write(lab.path("junk.py"), &script)?;
    lab.hosts[1]
        .ns
        .exec(&["/usr/bin/python3", &lab.path("junk.py")])?;
    let stranger = format!(
        r#"
from scapy.all import *
import os
for _ in range(5):
    send(IP(dst="{a}")/UDP(sport=1234, dport=4789)/Raw(os.urandom(64)), verbose=0)
    send(IP(dst="{a}")/UDP(sport=1234, dport=4789)/Raw(b"\x08\0\0\0" + ({vni}).to_bytes(3,"big") + b"\0" + bytes(Ether(src="02:00:00:00:99:03", dst="ff:ff:ff:ff:ff:ff")/ARP(pdst="10.79.0.1"))), verbose=0)
"#,
        a = ips[0]
    );
    std::fs::write(lab.path("stranger.py"), &stranger)?;
    lab.hosts[2]
        .ns
        .exec(&["/usr/bin/python3", &lab.path("stranger.py")])?;
    let d = |now: &serde_json::Value, then: &serde_json::Value, k: &str| {
        now[k].as_u64().unwrap_or(0) - then[k].as_u64().unwrap_or(0)
    };
    assert!(eventually(|| {
        tunnel(na, "lan", "vx")
            .map(|c| d(&c, &before, "drop_sender") >= 10)
            .unwrap_or(false)
    }));
    let after = tunnel(na, "lan", "vx")?;
    let port_after = na.counters("lan", "vx")?;
    assert_eq!(d(&after, &before, "drop_sender"), 10, "{after}");
    assert_eq!(d(&after, &before, "drop_not_vxlan"), 15, "{after}");
    assert_eq!(d(&after, &before, "drop_vni"), 5, "{after}");
    assert_eq!(
        d(&port_after, &port_before, "drop_malformed"),
        10,
        "{port_after}"
    );
    assert_eq!(d(&port_after, &port_before, "drop_mtu"), 5, "{port_after}");
    // None of the forged MACs was learned; the honest guest keeps working.
    let macs = na.cli(&["mac", "lan"])?;
    assert!(!macs.contains("02:00:00:00:99:0"), "{macs}");
    assert!(
        ping_retry(&ga, "10.79.0.2", 3),
        "honest guest lost after junk"
    );
    let _ = &lab.underlay;
    Ok(())
}

#[test]
fn a_network_too_big_for_the_underlay_is_refused_naming_both_mtus() -> Result<()> {
    let mut lab = Lab::new(2, 1500)?;
    let (a_ip, b_ip) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    // Default network MTU 1500 needs an underlay of 1550.
    let cfg = integration_tests::netd::network("lan", "internal", "")
        + &vxlan_port("vx", VNI, &a_ip, &[&b_ip], "");
    let err = match lab.hosts[0].start_netd(&cfg) {
        Ok(_) => panic!("netd started a vxlan port that does not fit the underlay"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("network MTU 1500") && err.contains("its MTU is 1500"),
        "{err}"
    );
    // At runtime too: a fitting network takes the port, a too-big one refuses it.
    let ok = integration_tests::netd::network("small", "internal", "mtu = 1450\n")
        + &integration_tests::netd::network("big", "internal", "");
    lab.hosts[0].start_netd(&ok)?;
    let n = lab.hosts[0].netd();
    n.cli(&[
        "port", "add", "small", "--kind", "vxlan", "--vni", "7", "--remote", &b_ip, "--name", "vx",
    ])?;
    let out = n
        .cli(&[
            "port", "add", "big", "--kind", "vxlan", "--vni", "8", "--remote", &b_ip, "--port",
            "4790",
        ])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(out.contains("1500") && out.contains("1550"), "{out}");
    // A vxlan port goes away cleanly and its UDP port is free again.
    n.cli(&["port", "del", "small", "vx"])?;
    n.cli(&[
        "port", "add", "small", "--kind", "vxlan", "--vni", "7", "--remote", &b_ip, "--name", "vx",
    ])?;
    let ports = n.cli_json(&["port", "list", "small"])?;
    assert!(
        integration_tests::has_item(&ports, |p| p["kind"] == "vxlan" && p["vxlan"]["vni"] == 7),
        "{ports}"
    );
    Ok(())
}

#[test]
fn a_multicast_group_instead_of_a_flood_list() -> Result<()> {
    let mut lab = Lab::new(3, 1500)?;
    let ips = lab.ips();
    let gs = [guest("vxma")?, guest("vxmb")?, guest("vxmc")?];
    for (i, g) in gs.iter().enumerate() {
        let cfg = integration_tests::netd::network("lan", "internal", "mtu = 1450\n")
            + &g.port("g")
            + &vxlan_port("vx", VNI, &ips[i], &[], "group = \"239.1.1.42\"\n");
        lab.hosts[i].start_netd(&cfg)?;
        g.addr(&format!("10.80.0.{}/24", i + 1))?;
    }
    // Broadcast (ARP) reaches every host through the group, then unicast follows
    // the learned remote.
    assert!(
        ping_retry(&gs[0], "10.80.0.2", 5),
        "A cannot reach B via the group"
    );
    assert!(
        ping_retry(&gs[0], "10.80.0.3", 5),
        "A cannot reach C via the group"
    );
    assert!(
        ping_retry(&gs[2], "10.80.0.2", 5),
        "C cannot reach B via the group"
    );
    let macs = lab.hosts[0].netd().cli_json(&["mac", "lan"])?;
    for ip in &ips[1..] {
        assert!(
            integration_tests::has_item(&macs, |e| e["remote"] == ip.as_str()),
            "nothing learned behind {ip}: {macs}"
        );
    }
    let show = lab.hosts[0]
        .netd()
        .cli_json(&["vxlan", "show", "lan", "vx"])?;
    assert_eq!(show["group"], "239.1.1.42", "{show}");
    assert_eq!(show["counters"]["drop_sender"], 0, "{show}");
    Ok(())
}

#[test]
fn a_hostonly_network_served_by_host_a_reaches_a_guest_on_host_b() -> Result<()> {
    let mut lab = Lab::new(2, 1500)?;
    let (a_ip, b_ip) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    let gb = guest("vxhb")?;
    let keys = "mtu = 1450\nsubnet = \"192.168.57.0/24\"\nhost_ifname = \"vxho0\"\n";
    let a = integration_tests::netd::network("ho", "hostonly", keys)
        + &vxlan_port("vx", VNI, &a_ip, &[&b_ip], "");
    let b =
        integration_tests::netd::network("ho", "hostonly", &format!("{keys}services = false\n"))
            + &gb.port("gb")
            + &vxlan_port("vx", VNI, &b_ip, &[&a_ip], "");
    lab.hosts[0].start_netd(&a)?;
    lab.hosts[1].start_netd(&b)?;
    // B has no host TAP of its own (A's host owns the gateway address).
    assert!(lab.hosts[1]
        .ns
        .exec(&["ip", "link", "show", "vxho0"])
        .is_err());
    let lease = lab.dhcp(&gb)?;
    // From A's DHCP server, in its default range .101 to .254.
    let last: u32 = lease
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip=192.168.57."))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((101..=254).contains(&last), "{lease}");
    // Host A itself, through its host TAP, across the tunnel.
    assert!(
        ping_retry(&gb, "192.168.57.1", 3),
        "guest on B cannot reach host A"
    );
    Ok(())
}

#[test]
fn a_group_port_drops_unicast_from_a_host_not_on_the_group() -> Result<()> {
    // Hosts A, B, C run netd on group 239.1.1.77 with no listed remotes; host X
    // runs no netd: it only sends VXLAN datagrams from a plain UDP socket.
    let mut lab = Lab::new(4, 1500)?;
    let ips = lab.ips();
    let gs = [guest("vxsa")?, guest("vxsb")?, guest("vxsc")?];
    for (i, g) in gs.iter().enumerate() {
        // IPv4 only: no IPv6 multicast from the guests makes every host flood to
        // the group early, so a member learns of the others from their
        // announcements alone (B, answering A's ARP, sends only unicast).
        g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")?;
        let cfg = integration_tests::netd::network("lan", "internal", "mtu = 1450\n")
            + &g.port("g")
            + &vxlan_port("vx", VNI, &ips[i], &[], "group = \"239.1.1.77\"\n");
        lab.hosts[i].start_netd(&cfg)?;
        g.addr(&format!("10.81.0.{}/24", i + 1))?;
    }
    // Group members reach each other, learned unicast replies included.
    assert!(ping_retry(&gs[0], "10.81.0.2", 5), "A cannot reach B");
    assert!(ping_retry(&gs[2], "10.81.0.1", 5), "C cannot reach A");
    let na = lab.hosts[0].netd();
    let before = tunnel(na, "lan", "vx")?;
    assert_eq!(before["drop_sender"], 0, "honest members dropped: {before}");

    // X: one valid VXLAN frame (a broadcast ARP from a forged MAC) per send.
    let x = &lab.hosts[3];
    let script = format!(
        r#"
import socket, sys
def frame(mac_last):
    eth = bytes.fromhex("ffffffffffff" + "0200000077" + mac_last) + b"\x08\x06"
    arp = bytes.fromhex("0001080006040001") + bytes.fromhex("0200000077" + mac_last) \
        + bytes([10, 81, 0, 99]) + b"\0" * 6 + bytes([10, 81, 0, 1])
    return b"\x08\0\0\0" + ({vni}).to_bytes(3, "big") + b"\0" + eth + arp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{x}", 0))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("{x}"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
dst, mac_last, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(n):
    s.sendto(frame(mac_last), (dst, 4789))
"#,
        vni = VNI,
        x = ips[3],
    );
    std::fs::write(lab.path("x.py"), &script)?;
    let send = |dst: &str, mac_last: &str, n: u32| {
        x.ns.exec(&[
            "/usr/bin/python3",
            &lab.path("x.py"),
            dst,
            mac_last,
            &n.to_string(),
        ])
    };
    let learned = |mac: &str| -> bool {
        na.cli_json(&["mac", "lan"])
            .map(|m| integration_tests::has_item(&m, |e| e["mac"] == mac))
            .unwrap_or(false)
    };
    let d = |k: &str| -> u64 {
        let now = tunnel(na, "lan", "vx").unwrap_or_default();
        now[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0)
    };

    // Unicast straight to A's address from a host neither listed nor on the group:
    // dropped and counted, nothing learned.
    send(&ips[0], "01", 5)?;
    assert!(
        eventually(|| d("drop_sender") >= 5),
        "unicast from X not counted: {}",
        tunnel(na, "lan", "vx")?
    );
    assert!(!learned("02:00:00:00:77:01"), "X's forged MAC was learned");
    // The members keep working, and no more was dropped than X's five.
    assert!(
        ping_retry(&gs[0], "10.81.0.3", 3),
        "A lost C after the attack"
    );
    assert!(
        ping_retry(&gs[1], "10.81.0.1", 3),
        "B lost A after the attack"
    );
    assert_eq!(d("drop_sender"), 5, "{}", tunnel(na, "lan", "vx")?);

    // The same datagram sent to the group is accepted (any sender in the group
    // is), and from then on X is a member whose unicast is accepted too.
    send("239.1.1.77", "02", 1)?;
    assert!(
        eventually(|| learned("02:00:00:00:77:02")),
        "a frame X sent to the group was not switched"
    );
    send(&ips[0], "03", 1)?;
    assert!(
        eventually(|| learned("02:00:00:00:77:03")),
        "unicast from a member was not accepted"
    );
    let macs = na.cli_json(&["mac", "lan"])?;
    assert!(
        integration_tests::has_item(&macs, |e| e["mac"] == "02:00:00:00:77:02"
            && e["remote"] == ips[3].as_str()),
        "{macs}"
    );
    assert_eq!(d("drop_sender"), 5, "{}", tunnel(na, "lan", "vx")?);
    Ok(())
}
