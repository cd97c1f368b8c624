//! Offloads end to end: TAP ports hand netd 64 KiB TCP super-frames (TSO) with
//! partial checksums; a port that cannot take them (a `stream` socket) gets them
//! segmented and checksummed in software. The test joins two networks with a
//! "cable" made of two stream-port connections it relays between, and runs iperf3
//! across it: the receiving kernel checks every segment's checksums and sequence.

mod netd_common;

use anyhow::Result;
use netd_common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// Copies framed traffic from `from` to `to` until either side closes.
fn relay(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = vec![0u8; 70_000];
    loop {
        let mut hdr = [0u8; 4];
        if from.read_exact(&mut hdr).is_err() {
            return;
        }
        let len = u32::from_be_bytes(hdr) as usize;
        assert!(
            len <= 1514,
            "stream port got an unsegmented frame of {len} bytes"
        );
        if from.read_exact(&mut buf[..len]).is_err() {
            return;
        }
        if to.write_all(&hdr).is_err() || to.write_all(&buf[..len]).is_err() {
            return;
        }
    }
}

#[test]
fn tso_frames_are_segmented_for_stream_ports() -> Result<()> {
    let dir = root_tempdir();
    let [a, b] = TapHost::each(["oa", "ob"])?;
    let (s1, s2) = (dir.path().join("s1.sock"), dir.path().join("s2.sock"));
    // Two networks, each with a host and one end of the cable.
    let networks = [
        network("one", "internal", ""),
        a.port("a"),
        stream_port("cable", &s1),
        network("two", "internal", ""),
        b.port("b"),
        stream_port("cable", &s2),
    ];
    let (_host, netd) = start_netd(dir.path(), "oh", &networks.concat())?;
    let c1 = UnixStream::connect(&s1)?;
    let c2 = UnixStream::connect(&s2)?;
    let (c1b, c2b) = (c1.try_clone()?, c2.try_clone()?);
    let t1 = std::thread::spawn(move || relay(c1, c2b));
    let t2 = std::thread::spawn(move || relay(c2, c1b));

    a.addr("10.8.0.1/24")?;
    b.addr("10.8.0.2/24")?;
    let feat = a.sh(&format!(
        "ethtool -k {} 2>/dev/null | grep tcp-segmentation-offload || true",
        a.tap
    ))?;
    eprintln!("TAP features: {feat}");
    assert!(ping_retry(&a, "10.8.0.2", 5), "ping across the cable");
    let bps = iperf3_bps(&a, &b, "10.8.0.2")?;
    eprintln!("iperf3 across the stream cable: {:.2} Gbit/s", bps / 1e9);
    assert!(
        bps > 10e6,
        "TCP works through software segmentation, got {bps}"
    );
    let ca = netd.counters("one", "a")?;
    let cc = netd.counters("one", "cable")?;
    eprintln!("a: {ca}\ncable: {cc}");
    assert_eq!(cc["drop_offload"], 0, "{cc}");
    // More frames left through the cable than came in from the TAP: super-frames
    // were cut into segments.
    assert!(
        cc["tx_frames"].as_u64().unwrap() > ca["rx_frames"].as_u64().unwrap(),
        "a: {ca}\ncable: {cc}"
    );
    assert!(netd.stop());
    // The relays end when netd closes the cable; a relay that saw an unsegmented
    // frame panicked.
    assert!(
        t1.join().is_ok() && t2.join().is_ok(),
        "only MTU-sized frames on the cable"
    );
    Ok(())
}
