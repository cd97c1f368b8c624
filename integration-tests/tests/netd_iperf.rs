//! iperf3 TCP between two test hosts through netd (short run).

mod netd_common;

use anyhow::Result;
use netd_common::*;

#[test]
fn iperf3_between_two_hosts() -> Result<()> {
    let dir = root_tempdir();
    let (_host, netd, [a, b]) = lan_of_two(dir.path(), ["ih", "ia", "ib"], "10.3.0")?;
    assert!(ping_retry(&a, "10.3.0.2", 5));
    let bps = iperf3_bps(&a, &b, "10.3.0.2")?;
    eprintln!("iperf3 through netd: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 10e6, "at least 10 Mbit/s through netd, got {bps}");
    let cb = netd.counters("lan", "b")?;
    assert!(cb["tx_bytes"].as_u64().unwrap() > 1_000_000, "{cb}");
    assert!(netd.stop());
    Ok(())
}
