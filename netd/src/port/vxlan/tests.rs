//! Unit tests of the VXLAN port: encapsulation, per-remote learning, the flood list
//! and the tunnel counters, over real loopback UDP sockets.

use super::super::testing::{eventually, frame, sink};
use super::*;

fn vspec(local: Ipv4Addr, remote: Ipv4Addr, port: u16) -> PortSpec {
    let mut s = super::super::testing::spec("vx", crate::config::PortKind::Vxlan);
    s.vxlan = Some(VxlanSpec {
        vni: 42,
        local: Some(local),
        remotes: vec![remote],
        group: None,
        port,
        ttl: None,
        learning: true,
        accept_any: false,
    });
    s
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn config(text: &str) -> Result<Vec<crate::config::NetworkSpec>, String> {
    let head = "control='/c'\nstate_dir='/s'\n[[network]]\nname='n'\n";
    crate::test_util::validate_config(&format!("{head}{text}")).map_err(|e| e.to_string())
}

#[test]
fn config_errors_name_the_file_and_the_key() {
    let port = "[[network.port]]\nname='vx'\nkind='vxlan'\n";
    let n = config(&format!(
        "mode='internal'\n{port}vni=7\nremotes=['192.0.2.2']\n"
    ))
    .unwrap();
    let v = n[0].ports[0].vxlan.as_ref().unwrap();
    assert_eq!((v.vni, v.port, v.learning), (7, 4789, true));
    let e = config(&format!(
        "mode='internal'\n{port}vni=0\nremotes=['192.0.2.2']\n"
    ))
    .unwrap_err();
    assert!(
        e.contains("t.toml") && e.contains("network[0].port[0].vni"),
        "{e}"
    );
    let e = config(&format!("mode='internal'\n{port}vni=7\n")).unwrap_err();
    assert!(e.contains("network[0].port[0].remotes"), "{e}");
    let e = config(&format!(
        "mode='internal'\n{port}vni=7\nremotes=['192.0.2.2']\nvnii=1\n"
    ))
    .unwrap_err();
    assert!(e.contains("vnii"), "{e}");
    let e =
        config("mode='internal'\n[[network.port]]\nkind='tap'\nifname='t0'\nvni=7\n").unwrap_err();
    assert!(e.contains("network[0].port[0].vni"), "{e}");
}

#[test]
fn services_false_makes_a_pure_switch() {
    let n = config("mode='nat'\nservices=false\n").unwrap();
    assert!(n[0].dhcp.is_none() && n[0].nat.is_none() && !n[0].services);
    let n = config("mode='hostonly'\nservices=false\n").unwrap();
    assert!(n[0].dhcp.is_none() && n[0].host_ifname.is_none());
    let n = config("mode='hostonly'\n").unwrap();
    assert!(n[0].dhcp.is_some() && n[0].services);
    let e = config("mode='hostonly'\nservices=false\ndhcp=true\n").unwrap_err();
    assert!(e.contains("network[0].dhcp"), "{e}");
}

#[test]
fn a_network_too_big_for_the_underlay_is_refused_naming_both_mtus() {
    // Loopback (MTU 65536; IP_MTU says 65535): a 65521 network does not fit.
    let net = Network::new("n", 65521, 16, std::time::Duration::from_secs(60));
    let e = start_vxlan_port(&net, &vspec(A, B, free_udp_port()))
        .err()
        .expect("refused");
    let msg = crate::error_chain(&e);
    assert!(msg.contains("65521") && msg.contains("65535"), "{msg}");
    assert!(net.port("vx").is_none());
}

#[test]
fn frames_cross_a_loopback_tunnel_learn_the_remote_and_junk_is_counted() {
    // Two networks, each with a vxlan port whose remote is the other's
    // loopback address (127.0.0.1 and 127.0.0.2, one UDP port).
    let p = free_udp_port();
    let (na, sink_a, seen_a) = sink();
    let (nb, _, seen_b) = sink();
    let pa = start_vxlan_port(&na, &vspec(A, B, p)).unwrap();
    let pb = start_vxlan_port(&nb, &vspec(B, A, p)).unwrap();
    // A broadcast from a's sink floods to a's tunnel and comes out at b's sink.
    let f = frame(7, 100);
    na.ingress(&sink_a, &f);
    assert!(eventually(|| seen_b.lock().unwrap().contains(&f)));
    // b learned the source MAC behind remote A.
    let t = nb.mac_table();
    let e = t.iter().find(|e| e.mac == "02:00:00:00:00:07").unwrap();
    assert_eq!(e.port, "vx");
    assert_eq!(e.remote.as_deref(), Some("127.0.0.1"));
    // Junk at b: not VXLAN, wrong VNI, an unlisted sender.
    let junk = UdpSocket::bind(SocketAddrV4::new(A, 0)).unwrap();
    junk.send_to(b"hi", SocketAddrV4::new(B, p)).unwrap();
    let mut wrong = VxlanHeader { vni: 43 }.emit().to_vec();
    wrong.extend_from_slice(&f);
    junk.send_to(&wrong, SocketAddrV4::new(B, p)).unwrap();
    let stranger = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 0)).unwrap();
    let mut good = VxlanHeader { vni: 42 }.emit().to_vec();
    good.extend_from_slice(&frame(9, 100));
    stranger.send_to(&good, SocketAddrV4::new(B, p)).unwrap();
    let tb = pb.tunnel.clone().unwrap();
    assert!(eventually(|| {
        let c = tb.info().counters;
        c.drop_not_vxlan == 1 && c.drop_vni == 1 && c.drop_sender == 1
    }));
    assert_eq!(tb.info().counters.rx_datagrams, 1);
    assert_eq!(
        seen_b.lock().unwrap().len(),
        1,
        "no junk reached the switch"
    );
    // Removing the remote forgets what was learned behind it.
    tb.del_remote(A).unwrap();
    assert!(nb.mac_table().iter().all(|e| e.port != "vx"));
    assert!(matches!(tb.del_remote(A), Err(VxlanError::NoSuchRemote(_))));
    tb.add_remote(A).unwrap();
    assert!(matches!(tb.add_remote(A), Err(VxlanError::RemoteExists(_))));
    let _ = seen_a;
    pa.shutdown();
    pb.shutdown();
    assert!(na.port("vx").is_none());
}
