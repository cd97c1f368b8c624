//! vmm-shim's `/metrics` (`--metrics ADDR`) while a guest runs: the guest reads a
//! sector through virtio-blk, prints a line, then polls the UART's line status
//! register until the test sends a byte. The scrape (curl, then promtool and
//! python3-prometheus-client) shows the vCPU's exits by reason (port writes from the
//! print, MMIO writes from the device set-up, port reads growing while it polls)
//! and the disk's completed requests (and reads); hostile scrapers are refused and the guest
//! runs on to a clean exit.

mod stord_common;
mod vmm_guest;

use std::time::Duration;

use integration_tests::free_port;
use integration_tests::metrics::{
    assert_dashboard_covered, assert_hostile_scrapers_refused, get, scrape_parsed,
};
use vmm_guest::{setup_with_disk, LiveVm};

const GUEST: &str = r#"
_start:
    DISK0_UP
    BLK_HDR 0, $1
    REQ3 RING, HDR, DATA, 512, STATUS
    READ1 RING, HDR, DATA, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, 'u'
    EXPECT_STATUS STATUS, 0, 's'
    PRINT ready
    WAIT_CONSOLE
    PASS "done\n"
ready: .asciz "ready\n"
"#;

#[test]
fn guest_exits_and_device_counters_are_scraped_while_it_runs() {
    let (_dir, elf, nbd) = setup_with_disk("metrics", GUEST);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut vm = LiveVm::guest(&[], &elf, &["--disk", &nbd.uri("d"), "--metrics", &addr]);
    vm.expect_line("ready\n");

    let exit = |s: &[_], r: &str| get(s, "vmm_vcpu_exits_total", &[("vcpu", "0"), ("reason", r)]);
    let m1 = scrape_parsed(&[], &addr).expect("scrape vmm-shim");
    assert!(
        exit(&m1, "io_out") >= 6.0,
        "one port write per byte of \"ready\\n\""
    );
    assert!(
        exit(&m1, "mmio_write") >= 5.0,
        "the device set-up writes registers"
    );
    assert!(exit(&m1, "mmio_read") >= 1.0);
    assert_eq!(exit(&m1, "fatal"), 0.0);
    let blk = [("device", "blk0"), ("type", "virtio-blk")];
    assert_eq!(
        get(&m1, "vmm_device_completed_total", &blk),
        1.0,
        "one READ"
    );
    assert_eq!(get(&m1, "vmm_blk_reads_total", &blk), 1.0, "one READ");
    assert_eq!(get(&m1, "vmm_blk_writes_total", &blk), 0.0);
    assert_eq!(get(&m1, "vmm_net_rx_packets_total", &blk), 0.0, "not a NIC");
    assert_eq!(get(&m1, "vmm_device_bad_chains_total", &blk), 0.0);
    assert_eq!(get(&m1, "vmm_device_io_errors_total", &blk), 0.0);
    assert_dashboard_covered(&m1, "vmm_");

    std::thread::sleep(Duration::from_millis(300));
    let m2 = scrape_parsed(&[], &addr).expect("scrape vmm-shim");
    assert!(
        exit(&m2, "io_in") > exit(&m1, "io_in"),
        "the guest's UART polling keeps exiting: {} -> {}",
        exit(&m1, "io_in"),
        exit(&m2, "io_in")
    );

    let m3 = assert_hostile_scrapers_refused(&[], "127.0.0.1", port);
    for r in ["too_large", "timeout", "too_many_connections"] {
        let n = get(&m3, "vmm_shim_scrape_refused_total", &[("reason", r)]);
        assert!(n >= 1.0, "{r}: {n}");
    }
    vm.send(b"x");
    vm.finish(Duration::from_secs(30))
        .assert_clean_exit("done\n");
}

#[test]
fn a_bad_metrics_address_is_refused() {
    let (_dir, elf) = vmm_guest::setup("badmetrics", "_start:\n    PASS \"no\\n\"\n");
    let r = vmm_guest::run_guest(
        &[],
        &elf,
        &["--metrics", "nowhere"],
        Duration::from_secs(30),
    );
    r.assert_exit(2, "metrics");
}
