//! iperf3 TCP between two test hosts through netd (short run).

mod netd_common;

use anyhow::Result;
use integration_tests::require_root;
use netd_common::*;

#[test]
fn iperf3_between_two_hosts() -> Result<()> {
    require_root();
    let dir = tempdir();
    let a = TapHost::new("ia")?;
    let b = TapHost::new("ib")?;
    let (_host, netd) = start_netd(
        dir.path(),
        "ih",
        &format!(
            r#"
[[network]]
name = "lan"
mode = "internal"
{}{}"#,
            a.port("a"),
            b.port("b")
        ),
    )?;
    a.addr("10.3.0.1/24")?;
    b.addr("10.3.0.2/24")?;
    assert!(ping_retry(&a, "10.3.0.2", 5));
    let bps = iperf3_bps(&a, &b, "10.3.0.2")?;
    eprintln!("iperf3 through netd: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 10e6, "at least 10 Mbit/s through netd, got {bps}");
    let cb = netd.counters("lan", "b")?;
    assert!(cb["tx_bytes"].as_u64().unwrap() > 1_000_000, "{cb}");
    assert!(netd.stop());
    Ok(())
}
