//! A `stream` port (QEMU `-netdev stream` framing on a unix socket): a misbehaving
//! peer's junk is counted and its connection closed without harming netd; then a
//! real QEMU guest on the same port gets a DHCP lease and pings a test host.

mod netd_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::Result;
use integration_tests::wait_until;
use netd_common::*;

// Its own `main` (`harness = false`): where the guest assets could not be fetched the
// boot says NOT RUN instead of counting as passed.
integration_tests::guest_tests_main!(
    "netd_stream_qemu",
    stream_port_survives_bad_peer_then_serves_qemu
);

fn stream_port_survives_bad_peer_then_serves_qemu() -> Result<()> {
    let dir = root_tempdir();
    let peer = TapHost::new("sp")?;
    let sock = dir.path().join("vm.sock");
    let lan = [
        network("lan", "internal", "subnet = \"10.5.0.0/24\"\ndhcp = true\n"),
        peer.port("peer"),
        stream_port("vm", &sock),
    ];
    let (host, netd) = start_netd(dir.path(), "sh", &lan.concat())?;
    peer.addr("10.5.0.2/24")?;

    // A bad peer: a runt frame (counted), a good broadcast frame (switched), then an
    // absurd length (connection closed, counted).
    let mut s = UnixStream::connect(&sock)?;
    s.write_all(&[0, 0, 0, 5, 1, 2, 3, 4, 5])?;
    let mut good = vec![0xffu8; 6];
    good.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77, 0x88, 0xb5]);
    good.extend_from_slice(&[0u8; 46]);
    s.write_all(&(good.len() as u32).to_be_bytes())?;
    s.write_all(&good)?;
    s.write_all(&[0x7f, 0xff, 0xff, 0xff])?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    let mut closed = false;
    for _ in 0..50 {
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => continue, // frames flooded to us before the close
            Err(_) => break,
        }
    }
    assert!(closed, "netd closed the connection after a bad length");
    assert!(
        wait_until(Duration::from_secs(3), || {
            netd.counters("lan", "vm")
                .map(|c| c["drop_malformed"] == 2 && c["rx_frames"] == 1)
                .unwrap_or(false)
        }),
        "counters: {}",
        netd.counters("lan", "vm")?
    );

    // A real VMM on the same port.
    let initrd = guest_initramfs(dir.path(), "10.5.0.2")?;
    let netdev = format!(
        "stream,id=n0,server=off,addr.type=unix,addr.path={}",
        sock.display()
    );
    let out = boot_guest(
        &host,
        dir.path(),
        &initrd,
        &netdev,
        "52:54:00:ab:cd:01",
        Duration::from_secs(90),
    )?;
    assert_guest_leased_and_pinged(&out, "10.5.0.101/24", "QEMU on the stream port");
    let c = netd.counters("lan", "vm")?;
    assert!(c["tx_frames"].as_u64().unwrap() >= 4, "{c}");
    assert!(netd.stop());
    assert!(!sock.exists(), "socket file removed on exit");
    Ok(())
}
