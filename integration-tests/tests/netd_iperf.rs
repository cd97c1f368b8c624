//! iperf3 TCP between two test hosts through netd (short run).

mod netd_common;

use anyhow::{Context, Result};
use integration_tests::{require_root, unique_name, wait_until, Netns};
use netd_common::*;
use std::time::Duration;

#[test]
fn iperf3_between_two_hosts() -> Result<()> {
    require_root();
    let dir = tempdir();
    let host = Netns::new("ih")?;
    let a = Netns::new("ia")?;
    let b = Netns::new("ib")?;
    let (ta, tb) = (unique_name("ta"), unique_name("tb"));
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[[network]]
name = "lan"
mode = "internal"

[[network.port]]
name = "a"
kind = "tap"
ifname = "{ta}"
netns = "{na}"

[[network.port]]
name = "b"
kind = "tap"
ifname = "{tb}"
netns = "{nb}"
"#,
            na = a.name(),
            nb = b.name()
        ),
    );
    let netd = Netd::start(&host, dir.path(), &cfg)?;
    a.exec(&["ip", "addr", "add", "10.3.0.1/24", "dev", &ta])?;
    b.exec(&["ip", "addr", "add", "10.3.0.2/24", "dev", &tb])?;
    assert!(ping_retry(&a, "10.3.0.2", 5));
    let _server = b.spawn(&["iperf3", "-s", "-1", "-B", "10.3.0.2"])?;
    assert!(wait_until(Duration::from_secs(5), || {
        b.sh("ss -ltn")
            .map(|s| s.contains("10.3.0.2:5201"))
            .unwrap_or(false)
    }));
    let out = a.exec(&["iperf3", "-c", "10.3.0.2", "-t", "2", "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no throughput")?;
    eprintln!("iperf3 through netd: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 10e6, "at least 10 Mbit/s through netd, got {bps}");
    let cb = netd.counters("lan", "b")?;
    assert!(cb["tx_bytes"].as_u64().unwrap() > 1_000_000, "{cb}");
    assert!(netd.stop());
    Ok(())
}
