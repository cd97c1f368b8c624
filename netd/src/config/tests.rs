//! Unit tests of the configuration: parsing, defaults, validation and the error
//! text that names the file, the key and what was expected.

use super::*;

fn v(text: &str) -> Result<Vec<NetworkSpec>, ConfigError> {
    crate::test_util::validate_config(text)
}

/// The error of a config with the usual header and these `[[network]]` tables.
fn cfg_err(networks: &str) -> String {
    v(&format!("control='/c'\nstate_dir='/s'\n{networks}"))
        .unwrap_err()
        .to_string()
}

/// Asserts that the config with these `[[network]]` tables is refused with an
/// error naming every one of `names` (the file, the key, what was expected).
fn assert_refused(networks: &str, names: &[&str]) {
    let e = cfg_err(networks);
    for name in names {
        assert!(e.contains(name), "missing {name:?} in: {e}");
    }
}

#[test]
fn hostonly_defaults_follow_virtualbox() {
    let n = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='h'\nmode='hostonly'\n").unwrap();
    let n = &n[0];
    let v4 = n.ipv4.as_ref().unwrap();
    assert_eq!(v4.gateway, Ipv4Addr::new(192, 168, 56, 1));
    assert_eq!(v4.prefix, 24);
    let d = n.dhcp.as_ref().unwrap();
    assert_eq!(d.start, Ipv4Addr::new(192, 168, 56, 101));
    assert_eq!(d.end, Ipv4Addr::new(192, 168, 56, 254));
    assert_eq!(d.server, Ipv4Addr::new(192, 168, 56, 100));
    assert_eq!(n.mtu, 1500);
    assert_eq!(n.host_ifname.as_deref(), Some("vh-h"));
}

#[test]
fn unknown_key_is_named() {
    assert_refused(
        "[[network]]\nname='h'\nmode='internal'\nbogus=1\n",
        &["t.toml", "bogus"],
    );
}

#[test]
fn bad_values_name_file_key_and_expectation() {
    assert_refused(
        "[[network]]\nname='h'\nmode='internal'\nsubnet='10.0.0.0/33'\n",
        &["t.toml", "network[0].subnet", "CIDR"],
    );
    // Modes nat and bridged are built (issue 4); a bridged network needs its uplink.
    assert_refused(
        "[[network]]\nname='h'\nmode='bridged'\n",
        &["network[0].uplink"],
    );
    assert_refused(
        "[[network]]\nname='h'\nmode='internal'\n[[network.port]]\nkind='tap'\n",
        &["network[0].port[0].ifname"],
    );
    assert_refused(
        "[[network]]\nname='h'\nmode='hostonly'\ndhcp_range='192.168.56.10-192.168.57.3'\n",
        &["dhcp_range"],
    );
    assert_refused(
        "[[network]]\nname='a'\nmode='internal'\n[[network]]\nname='a'\nmode='internal'\n",
        &["network[1].name", "unique"],
    );
}

#[test]
fn example_config_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/netd.toml");
    let cfg = Config::load(&path).unwrap();
    let control = cfg.control_spec(&path).unwrap();
    assert_eq!(
        (control.gid, control.max_connections, control.idle_timeout),
        (0, 64, std::time::Duration::from_secs(60))
    );
    let nets = cfg.validate(&path).unwrap();
    assert!(nets.iter().all(|n| n.guard == Guard::Clean));
    let ho = nets.iter().find(|n| n.name == "hostonly").unwrap();
    assert_eq!(ho.max_macs_per_port, 256);
    assert_eq!(
        ho.dhcp.as_ref().unwrap().server,
        Ipv4Addr::new(192, 168, 56, 100)
    );
    assert!(nets.iter().any(|n| n.mode == Mode::Internal));
}

/// Regression (issue 11, item 14): subnet arithmetic at the top of the address
/// space overflowed (a panic in debug builds, a wrapped range in release).
#[test]
fn subnets_at_the_top_of_the_address_space_do_not_overflow() {
    for mode in ["internal", "hostonly", "nat"] {
        let e = cfg_err(&format!(
            "[[network]]\nname='h'\nmode='{mode}'\nsubnet='255.255.255.255/32'\n"
        ));
        assert!(
            e.contains("t.toml") && e.contains("network[0].subnet"),
            "{e}"
        );
    }
    // The highest /30, /24 and /1 validate without overflow, in every mode.
    for subnet in ["255.255.255.252/30", "255.255.255.0/24", "128.0.0.0/1"] {
        for mode in ["internal", "hostonly", "nat"] {
            let text = format!(
                "control='/c'\nstate_dir='/s'\n[[network]]\nname='h'\nmode='{mode}'\nsubnet='{subnet}'\ndhcp=true\n"
            );
            match v(&text) {
                Ok(n) => {
                    let v4 = n[0].ipv4.as_ref().unwrap();
                    let d = n[0].dhcp.as_ref().unwrap();
                    assert!(
                        v4.contains(d.start) && v4.contains(d.end),
                        "{subnet} {mode}"
                    );
                    assert!(d.start <= d.end, "{subnet} {mode}");
                    assert!(v4.contains(d.server), "{subnet} {mode}");
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains("network[0]."), "{subnet} {mode}: {e}");
                }
            }
        }
    }
    assert_eq!(offset(Ipv4Addr::new(255, 255, 255, 255), 1), None);
    assert_eq!(
        offset(Ipv4Addr::new(255, 255, 255, 252), 2),
        Some(Ipv4Addr::new(255, 255, 255, 254))
    );
}

/// Regression (issue 11, item 14): a bridged uplink could name another
/// network's TAP (or host TAP), joining the two networks.
#[test]
fn an_uplink_naming_another_networks_interface_is_refused() {
    assert_refused("[[network]]\nname='a'\nmode='internal'\n[[network.port]]\nkind='tap'\nifname='tap0'\n[[network]]\nname='b'\nmode='bridged'\nuplink='tap0'\n", &["network[1].uplink", "tap0"]);
    assert_refused("[[network]]\nname='a'\nmode='hostonly'\nhost_ifname='vh0'\n[[network]]\nname='b'\nmode='bridged'\nuplink='vh0'\n", &["network[1].uplink"]);
    assert_refused("[[network]]\nname='a'\nmode='bridged'\nuplink='eth9'\n[[network]]\nname='b'\nmode='bridged'\nuplink='eth9'\n", &["network[1].uplink"]);
    // A port named after an uplink listed earlier is refused too.
    assert_refused("[[network]]\nname='b'\nmode='bridged'\nuplink='eth9'\n[[network]]\nname='a'\nmode='internal'\n[[network.port]]\nkind='vm'\nifname='eth9'\n", &["network[1].port[0].ifname"]);
}

#[test]
fn control_settings_are_checked_naming_the_key() {
    let c = |extra: &str| {
        Config::parse(
            &format!("control='/c'\nstate_dir='/s'\n{extra}"),
            Path::new("t.toml"),
        )
        .unwrap()
        .control_spec(Path::new("t.toml"))
    };
    let d = c("").unwrap();
    let default_gid = match crate::sys::effective_ids() {
        (0, _) => 0,
        (_, gid) => gid,
    };
    assert_eq!(
        (d.gid, d.max_connections, d.idle_timeout.as_secs()),
        (default_gid, 64, 60)
    );
    assert_eq!(c("control_group='root'").unwrap().gid, 0);
    assert_eq!(c("control_group='4242'").unwrap().gid, 4242);
    let e = c("control_group='no-such-group-here'")
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.toml") && e.contains("control_group"), "{e}");
    let e = c("control_max_connections=0").unwrap_err().to_string();
    assert!(e.contains("control_max_connections"), "{e}");
    let e = c("control_idle_timeout=0").unwrap_err().to_string();
    assert!(e.contains("control_idle_timeout"), "{e}");
}

#[test]
fn guard_defaults_to_clean_and_is_set_per_network_and_port() {
    let n = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='h'\nmode='internal'\n[[network.port]]\nkind='tap'\nifname='t0'\n")
        .unwrap();
    assert_eq!(n[0].guard, Guard::Clean);
    assert_eq!(n[0].max_macs_per_port, 256);
    assert_eq!(n[0].ports[0].guard, None);
    let n = v("control='/c'\nstate_dir='/s'\n[[network]]\nname='h'\nmode='internal'\nguard='off'\nmax_macs_per_port=8\n[[network.port]]\nkind='tap'\nifname='t0'\nguard='clean'\n")
        .unwrap();
    assert_eq!(n[0].guard, Guard::Off);
    assert_eq!(n[0].max_macs_per_port, 8);
    assert_eq!(n[0].ports[0].guard, Some(Guard::Clean));
    assert_refused(
        "[[network]]\nname='h'\nmode='internal'\nguard='strict'\n",
        &["t.toml", "guard"],
    );
    assert_refused(
        "[[network]]\nname='h'\nmode='internal'\nmax_macs_per_port=0\n",
        &["network[0].max_macs_per_port"],
    );
}

#[test]
fn mac_parse_roundtrip() {
    let m = parse_mac("52:54:00:ab:cd:ef").unwrap();
    assert_eq!(fmt_mac(&m), "52:54:00:ab:cd:ef");
    assert!(parse_mac("52:54:00:ab:cd").is_none());
    assert!(parse_mac("52:54:00:ab:cd:ef:00").is_none());
    assert!(parse_mac("zz:54:00:ab:cd:ef").is_none());
}

#[test]
fn metrics_key_is_an_address_and_port() {
    let path = Path::new("t.toml");
    let with = |m: &str| Config::parse(&format!("control='/c'\nstate_dir='/s'\n{m}"), path);
    let c = with("metrics = '127.0.0.1:9102'\n").unwrap();
    assert_eq!(
        c.metrics_addr(path).unwrap(),
        Some("127.0.0.1:9102".parse().unwrap())
    );
    assert_eq!(with("").unwrap().metrics_addr(path).unwrap(), None);
    let e = with("metrics = '9102'\n")
        .unwrap()
        .metrics_addr(path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.toml") && e.contains("`metrics`") && e.contains("9102"),
        "{e}"
    );
}
