//! netd's daemon surface: strict config errors, the control CLI changing ports at
//! runtime, readiness notification and SIGTERM cleanup.

mod netd_common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use integration_tests::{bin, require_root, unique_name, wait_until, Netns};
use netd_common::*;

#[test]
fn bad_config_names_file_key_and_expectation() -> Result<()> {
    let dir = tempdir();
    let cases = [
        ("[[network]]\nname = \"a\"\nmode = \"internal\"\ncolour = \"red\"\n", "colour"),
        ("[[network]]\nname = \"a\"\nmode = \"internal\"\nsubnet = \"10.0.0.0/40\"\n", "network[0].subnet"),
        ("[[network]]\nname = \"a\"\nmode = \"nat\"\n", "not yet built"),
        ("[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network.port]]\nkind = \"vm\"\nifname = \"this-name-is-far-too-long\"\n", "network[0].port[0].ifname"),
        ("[[network]]\nname = \"a\"\nmode = \"hostonly\"\n[[network.reservation]]\nmac = \"nope\"\nip = \"192.168.56.9\"\n", "network[0].reservation[0].mac"),
    ];
    for (body, want) in cases {
        let cfg = write_config(dir.path(), body);
        let out = Command::new(bin("netd"))
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "bad config must fail: {err}");
        assert!(
            err.contains("netd.toml") && err.contains(want),
            "error names file and {want:?}: {err}"
        );
    }
    Ok(())
}

#[test]
fn cli_changes_ports_at_runtime_and_sigterm_cleans_up() -> Result<()> {
    require_root();
    let dir = tempdir();
    let host = Netns::new("ch")?;
    let a = Netns::new("ca")?;
    let b = Netns::new("cb")?;
    let (ta, tb, tv, tk, tp) = (
        unique_name("ta"),
        unique_name("tb"),
        unique_name("tv"),
        unique_name("tk"),
        unique_name("tp"),
    );
    // A persistent TAP that exists before netd: a vm port on it must leave it alone.
    host.exec(&["ip", "tuntap", "add", "dev", &tk, "mode", "tap"])?;
    let cfg = write_config(
        dir.path(),
        &format!(
            "[[network]]\nname = \"lan\"\nmode = \"internal\"\n\n[[network.port]]\nname = \"a\"\nkind = \"tap\"\nifname = \"{ta}\"\nnetns = \"{na}\"\n",
            na = a.name()
        ),
    );
    // Readiness: netd sends READY=1 to $NOTIFY_SOCKET.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(10)))?;
    let netd = Netd::start_env(&host, dir.path(), &cfg, &[("NOTIFY_SOCKET", &notify_path)])?;
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"READY=1");

    a.exec(&["ip", "addr", "add", "10.6.0.1/24", "dev", &ta])?;
    assert!(!ping(&a, "10.6.0.2"), "nobody there yet");
    netd.cli(&[
        "port",
        "add",
        "lan",
        "--kind",
        "tap",
        "--ifname",
        &tb,
        "--netns",
        b.name(),
        "--name",
        "b",
    ])?;
    b.exec(&["ip", "addr", "add", "10.6.0.2/24", "dev", &tb])?;
    assert!(ping_retry(&a, "10.6.0.2", 5), "port added at runtime works");
    let ports = netd.cli_json(&["port", "list", "lan"])?;
    assert!(
        ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "b" && p["kind"] == "tap"),
        "{ports}"
    );

    // Errors are clear and change nothing.
    let e = netd
        .cli(&["port", "add", "nosuch", "--kind", "vm", "--ifname", &tv])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no network named \\\"nosuch\\\"") || e.contains("no network named"),
        "{e}"
    );
    let e = netd
        .cli(&[
            "port", "add", "lan", "--kind", "vm", "--ifname", &tv, "--mac", "zz",
        ])
        .unwrap_err()
        .to_string();
    assert!(e.contains("mac"), "{e}");
    let e = netd
        .cli(&[
            "port", "add", "lan", "--kind", "tap", "--ifname", &tb, "--name", "b2",
        ])
        .unwrap_err()
        .to_string();
    assert!(e.contains("already used"), "{e}");
    let e = netd
        .cli(&["port", "del", "lan", "nosuch"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no port named"), "{e}");

    netd.cli(&["port", "del", "lan", "b"])?;
    assert!(!ping(&a, "10.6.0.2"), "deleted port no longer switches");
    assert!(
        b.exec(&["ip", "link", "show", &tb]).is_err(),
        "its TAP is gone"
    );

    // vm ports: one netd creates (removed on exit), one that existed (kept).
    netd.cli(&["port", "add", "lan", "--kind", "vm", "--ifname", &tv])?;
    netd.cli(&["port", "add", "lan", "--kind", "vm", "--ifname", &tk])?;
    // A vm TAP that disappears under netd is recreated (the port stays configured).
    host.exec(&["ip", "link", "delete", &tv])?;
    assert!(
        wait_until(Duration::from_secs(5), || host
            .exec(&["ip", "link", "show", &tv])
            .is_ok()),
        "netd recreated the vm port's TAP"
    );
    // One marked persistent survives netd's exit.
    netd.cli(&[
        "port",
        "add",
        "lan",
        "--kind",
        "vm",
        "--ifname",
        &tp,
        "--persistent",
    ])?;
    assert!(host.exec(&["ip", "link", "show", &tv]).is_ok());
    let nets = netd.cli_json(&["net", "list"])?;
    assert_eq!(nets[0]["ports"], 4, "{nets}");
    assert!(netd.stop(), "clean exit on SIGTERM");
    assert!(
        host.exec(&["ip", "link", "show", &tv]).is_err(),
        "TAP netd created is removed"
    );
    assert!(
        host.exec(&["ip", "link", "show", &tk]).is_ok(),
        "pre-existing TAP is kept"
    );
    assert!(
        a.exec(&["ip", "link", "show", &ta]).is_err(),
        "tap port removed"
    );
    Ok(())
}
