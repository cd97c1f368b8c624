//! stord's `/metrics` (the `metrics` config key) end to end: qemu-io writes and
//! reads move the disk's request, byte and latency-histogram counters by command;
//! a held connection shows in the connection gauge, a refused one in the rejects by
//! reason; the text passes promtool and python3-prometheus-client; hostile scrapers
//! are refused and the disk keeps serving.

mod stord_common;

use std::process::Command;
use std::time::Duration;

use integration_tests::metrics::{
    assert_dashboard_covered, assert_hostile_scrapers_refused, get, scrape_parsed, Sample,
};
use integration_tests::{free_port, wait_until};
use stord_common::*;

fn scrape(addr: &str) -> Vec<Sample> {
    scrape_parsed(&[], addr).expect("scrape stord")
}

#[test]
fn disk_counters_and_histograms_move_with_nbd_requests() {
    let mport = free_port();
    let addr = format!("127.0.0.1:{mport}");
    let s = Stord::limited(
        &format!("metrics = \"{addr}\"\nmax_connections = 1\n"),
        &[dynamic("d", "8MiB")],
    );
    let read = [("disk", "d"), ("cmd", "read")];
    let write = [("disk", "d"), ("cmd", "write")];
    let m0 = scrape(&addr);
    assert_eq!(get(&m0, "stord_disk_requests_total", &read), 0.0);
    assert_eq!(
        get(&m0, "stord_disk_size_bytes", &[("disk", "d")]),
        8388608.0
    );
    assert_eq!(get(&m0, "stord_disk_connections", &[("disk", "d")]), 0.0);

    qemu_io(&s.unix_uri("d"), &["write -P 0xab 0 1M"]).expect("qemu-io write");
    qemu_io(
        &s.unix_uri("d"),
        &["read -P 0xab 0 1M", "read -P 0xab 4096 512"],
    )
    .expect("qemu-io read");
    let m1 = scrape(&addr);
    let reads = get(&m1, "stord_disk_requests_total", &read);
    let bytes = get(&m1, "stord_disk_bytes_total", &read);
    assert!(reads >= 2.0, "reads {reads}");
    assert!(bytes >= 1048576.0 + 512.0, "read bytes {bytes}");
    assert!(get(&m1, "stord_disk_requests_total", &write) >= 1.0);
    assert!(get(&m1, "stord_disk_bytes_total", &write) >= 1048576.0);
    // The READs' latency histogram holds each of them, in order of its bounds.
    let hist = "stord_disk_request_duration_seconds";
    let count = get(&m1, &format!("{hist}_count"), &read);
    assert_eq!(count, reads, "one observation per READ");
    assert!(get(&m1, &format!("{hist}_sum"), &read) > 0.0);
    let inf = get(
        &m1,
        &format!("{hist}_bucket"),
        &[("disk", "d"), ("cmd", "read"), ("le", "+Inf")],
    );
    assert_eq!(inf, count);
    let in_10s = get(
        &m1,
        &format!("{hist}_bucket"),
        &[("disk", "d"), ("cmd", "read"), ("le", "10")],
    );
    assert_eq!(in_10s, count, "every READ took under 10 s");
    assert_eq!(get(&m1, "stord_disk_errors_total", &read), 0.0);
    assert!(get(&m1, "stord_connections_total", &[]) >= 2.0);
    assert_dashboard_covered(&m1, "stord_");

    // A held connection is in the gauge; one over max_connections is refused and
    // counted by its reason.
    let mut h = holder(&s.uri("d"));
    assert!(wait_until(Duration::from_secs(10), || {
        get(&scrape(&addr), "stord_disk_connections", &[("disk", "d")]) == 1.0
    }));
    let refused = nbd_size(&s.uri("d"));
    assert!(refused.is_err(), "{refused:?}");
    let m2 = scrape(&addr);
    assert!(get(&m2, "stord_rejects_total", &[("reason", "max_connections")]) >= 1.0);
    assert_eq!(
        get(&m2, "stord_tls_handshakes_total", &[("result", "failed")]),
        0.0
    );
    h.signal(libc::SIGKILL);
    h.wait_timeout(Duration::from_secs(5));

    // Hostile scrapers are refused and counted; the disk still serves.
    let m3 = assert_hostile_scrapers_refused(&[], "127.0.0.1", mport);
    for r in ["too_large", "timeout", "too_many_connections"] {
        assert!(
            get(&m3, "stord_scrape_refused_total", &[("reason", r)]) >= 1.0,
            "{r}"
        );
    }
    assert!(wait_until(Duration::from_secs(10), || {
        get(&scrape(&addr), "stord_disk_connections", &[("disk", "d")]) == 0.0
    }));
    qemu_io(&s.unix_uri("d"), &["read -P 0xab 0 64k"]).expect("served after the attacks");
    let m4 = scrape(&addr);
    assert!(get(&m4, "stord_disk_requests_total", &read) > reads);
}

#[test]
fn a_bad_metrics_address_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("stord.toml");
    std::fs::write(
        &cfg,
        format!(
            "control = \"{0}/c.sock\"\nstate_dir = \"{0}/state\"\nmetrics = \"9102\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(integration_tests::bin("stord"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stord.toml") && err.contains("`metrics`") && err.contains("9102"),
        "{err}"
    );
}
