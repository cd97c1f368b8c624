//! Unit tests of the runtime state: applying changes to a base table, which side
//! wins a conflict, and the state file's round trip, atomic replacement and
//! refusal of a corrupt file.

use super::*;
use crate::config::Config;
use crate::nat::Cidr;

fn base() -> NetworkConfig {
    let text = r#"
control = "/tmp/x.sock"
state_dir = "/tmp/x"
[[network]]
name = "lab"
mode = "nat"
[[network.port]]
name = "a"
kind = "tap"
ifname = "ta"
[[network.forward]]
proto = "tcp"
host = "2222"
guest = "10.0.2.15:22"
[[network.reservation]]
mac = "52:54:00:00:00:01"
ip = "10.0.2.50"
"#;
    let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
    cfg.network[0].clone()
}

fn tap(name: &str) -> PortConfig {
    serde_json::from_value(serde_json::json!({"name": name, "kind": "tap", "ifname": name}))
        .unwrap()
}

fn fwd(host: &str) -> Forward {
    serde_json::from_value(serde_json::json!({"proto":"tcp","host":host,"guest":"10.0.2.15:80"}))
        .unwrap()
}

fn names(t: &NetworkConfig) -> Vec<String> {
    t.port.iter().map(port_key).collect()
}

#[test]
fn changes_apply_removals_then_additions() {
    let b = base();
    let mut c = Changes::default();
    c.port_added(tap("b"));
    c.port_removed(&b, "a");
    c.forward_added(fwd("8080"));
    c.forward_removed(&b, ForwardKey::from(&b.forward[0]));
    c.reservation_added(
        &b,
        Reservation {
            mac: "52:54:00:00:00:02".into(),
            ip: "10.0.2.51".parse().unwrap(),
            hostname: Some("web".into()),
        },
    );
    let (t, conflicts) = c.clone().apply(&b);
    assert!(conflicts.is_empty(), "{conflicts:?}");
    assert_eq!(names(&t), ["b"]);
    assert_eq!(t.forward.len(), 1);
    assert_eq!(t.forward[0].host, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(t.reservation.len(), 2);
    // The result validates as a config table does.
    t.validate_at("<control>", "").unwrap();

    // A config port removed and added again is the new one.
    c.port_added(tap("a"));
    let (t, conflicts) = c.clone().apply(&b);
    assert!(conflicts.is_empty());
    assert_eq!(names(&t), ["b", "a"]);
    // Removing a port added at runtime forgets it; a base port stays removed.
    c.port_removed(&b, "b");
    c.port_removed(&b, "a");
    assert!(c.ports.is_empty());
    assert_eq!(c.removed_ports, ["a"]);
}

#[test]
fn a_reservation_of_a_base_mac_replaces_it_and_macs_are_normalised() {
    let b = base();
    let mut c = Changes::default();
    c.reservation_added(
        &b,
        Reservation {
            mac: "52:54:00:00:00:01".to_uppercase(),
            ip: "10.0.2.60".parse().unwrap(),
            hostname: None,
        },
    );
    assert_eq!(c.removed_reservations, ["52:54:00:00:00:01"]);
    let (t, _) = c.clone().apply(&b);
    assert_eq!(t.reservation.len(), 1);
    assert_eq!(
        t.reservation[0].ip,
        "10.0.2.60".parse::<std::net::Ipv4Addr>().unwrap()
    );
    c.reservation_removed(&b, "52:54:00:00:00:01");
    assert!(c.reservations.is_empty());
    assert!(c.clone().apply(&b).0.reservation.is_empty());
}

#[test]
fn the_base_wins_and_each_conflict_is_named() {
    let b = base();
    let mut c = Changes::default();
    // Added at runtime, and now in the file too; removed at runtime, and gone
    // from the file since.
    c.ports.push(tap("a"));
    c.removed_ports.push("gone".into());
    c.forwards.push(b.forward[0].clone());
    c.removed_reservations.push("52:54:00:00:00:09".into());
    let (t, conflicts) = c.apply(&b);
    assert_eq!(names(&t), ["a"]);
    assert_eq!(t.forward, b.forward);
    assert_eq!(conflicts.len(), 4, "{conflicts:?}");
    assert!(conflicts[0].contains("\"gone\""), "{conflicts:?}");
    assert!(conflicts[1].contains("\"a\"") && conflicts[1].contains("that one is used"));
    // What did not apply is dropped, so it is reported once.
    assert!(c.is_empty(), "{c:?}");
}

#[test]
fn the_state_file_round_trips_and_is_replaced_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    assert!(
        load(&path).unwrap().is_empty(),
        "a missing file is an empty state"
    );
    let mut changes = Changes::default();
    changes.port_added(tap("b"));
    changes.forward_added(fwd("8080"));
    let mut api = base();
    api.name = "lab2".into();
    let nets = vec![
        StoredNet {
            name: "lab".into(),
            source: Source::Config,
            table: None,
            changes: changes.clone(),
        },
        StoredNet {
            name: "lab2".into(),
            source: Source::Api,
            table: Some(api),
            changes: Changes::default(),
        },
    ];
    save(&path, &nets).unwrap();
    let back = load(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].changes, changes);
    assert_eq!(back[1].source, Source::Api);
    let t = back[1].table.as_ref().unwrap();
    assert_eq!(t.name, "lab2");
    assert_eq!(
        t.forward,
        base().forward,
        "forwards survive the JSON round trip"
    );
    assert_eq!(t.port, base().port);
    save(&path, &nets[..1]).unwrap();
    assert_eq!(load(&path).unwrap().len(), 1);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "no temporary file left");
}

#[test]
fn a_corrupt_or_foreign_state_file_is_an_error_naming_it_and_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, b"{\"version\":1,\"networks\":[{\"name\":").unwrap();
    let e = load(&path).unwrap_err();
    assert!(matches!(e, StateError::Parse(..)), "{e:?}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    std::fs::write(&path, b"{\"version\":7}").unwrap();
    assert!(matches!(load(&path), Err(StateError::Version(_, 7))));
    std::fs::write(&path, b"{\"version\":1,\"networks\":[],\"extra\":1}").unwrap();
    assert!(matches!(load(&path), Err(StateError::Parse(..))));
    let to = set_aside(&path).unwrap();
    assert!(!path.exists() && to.exists());
    assert!(to.to_string_lossy().ends_with("runtime.json.corrupt"));
}

#[test]
fn entries_store_only_what_the_state_needs() {
    let e = Entry {
        source: Source::Config,
        base: base(),
        changes: Changes::default(),
    };
    assert!(
        e.stored("lab").is_none(),
        "a config network without changes"
    );
    let mut api = e.clone();
    api.source = Source::Api;
    let s = api.stored("lab").unwrap();
    assert!(s.table.is_some());
    assert_eq!(names(&api.effective()), ["a"]);
}

fn vxlan(name: &str, remotes: &[&str]) -> PortConfig {
    serde_json::from_value(serde_json::json!({
        "name": name, "kind": "vxlan", "vni": 42, "remotes": remotes
    }))
    .unwrap()
}

fn remotes(t: &NetworkConfig, port: &str) -> Vec<Ipv4Addr> {
    t.port
        .iter()
        .find(|p| port_key(p) == port)
        .map(|p| p.vxlan.remotes.clone())
        .unwrap_or_default()
}

#[test]
fn flood_list_changes_apply_to_base_and_runtime_ports_and_die_with_them() {
    let mut b = base();
    b.port.push(vxlan("vx", &["192.0.2.1", "192.0.2.2"]));
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let mut c = Changes::default();
    c.remote_changed("vx", ip("192.0.2.3"), true);
    c.remote_changed("vx", ip("192.0.2.1"), false);
    // The last change of a (port, remote) is the one kept.
    c.remote_changed("vx", ip("192.0.2.9"), true);
    c.remote_changed("vx", ip("192.0.2.9"), false);
    c.port_added(vxlan("vy", &[]));
    c.remote_changed("vy", ip("198.51.100.7"), true);
    assert_eq!(c.vxlan_remotes.len(), 4);
    let (t, conflicts) = c.clone().apply(&b);
    assert!(conflicts.is_empty(), "{conflicts:?}");
    assert_eq!(remotes(&t, "vx"), [ip("192.0.2.2"), ip("192.0.2.3")]);
    assert_eq!(remotes(&t, "vy"), [ip("198.51.100.7")]);
    // Through the state file and back.
    let back: Changes = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    // A port removed takes its flood list changes with it.
    c.port_removed(&b, "vy");
    assert!(c.vxlan_remotes.iter().all(|r| r.port == "vx"));
    // The file dropped the port: the change is a conflict, named, and dropped.
    let (t, conflicts) = c.apply(&base());
    assert!(remotes(&t, "vx").is_empty());
    assert_eq!(conflicts.len(), 3, "{conflicts:?}");
    assert!(conflicts[0].contains("\"vx\""), "{conflicts:?}");
    assert!(c.vxlan_remotes.is_empty());
}

#[test]
fn outbound_changes_replay_on_the_routers_lists() {
    let net = |s: &str| crate::nat::parse_cidr(s).unwrap();
    let v4 = |s: &str| crate::nat::Cidr::V4(net(s));
    let mut nat = crate::nat::RouterConfig::defaults();
    nat.outbound_deny.push(net("10.1.0.0/24"));
    let mut c = Changes::default();
    c.outbound_changed(PolicyList::Deny, v4("192.0.2.0/24"), true);
    c.outbound_changed(PolicyList::Deny, v4("10.1.0.0/24"), false);
    c.outbound_changed(PolicyList::Allow, v4("0.0.0.0/0"), true);
    c.outbound_changed(PolicyList::Allow, v4("0.0.0.0/0"), false);
    c.outbound_changed(PolicyList::Allow, v4("203.0.113.0/24"), true);
    let v6 = crate::nat::parse_cidr_any("2001:db8:1::/48").unwrap();
    c.outbound_changed(PolicyList::Deny, v6, true);
    assert_eq!(c.outbound.len(), 5, "one per (list, CIDR): {c:?}");
    c.apply_outbound(&mut nat);
    assert!(nat
        .outbound_deny6
        .contains(&("2001:db8:1::".parse().unwrap(), 48)));
    assert!(nat.outbound_deny.contains(&net("192.0.2.0/24")));
    assert!(!nat.outbound_deny.contains(&net("10.1.0.0/24")));
    assert_eq!(nat.outbound_allow, [net("203.0.113.0/24")]);
    assert!(c.denies(Cidr::V4(net("192.0.2.0/24"))) && !c.denies(Cidr::V4(net("10.1.0.0/24"))));
    // Replaying twice changes nothing more.
    let once = nat.clone();
    c.apply_outbound(&mut nat);
    assert_eq!(nat, once);
    // A hand-edited entry that is not a CIDR is skipped, not a panic.
    c.outbound[0].cidr = "not-a-cidr".into();
    c.apply_outbound(&mut nat);
}
