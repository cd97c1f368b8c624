//! tshark on an interface of a test's namespace, for the NIC tests of vmm-shim: one
//! line per frame (`eth.src,eth.type,data.data`, see [`super::counter::frames_from`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::{wait_until, ChildGuard, Netns};

use super::counter::{frame_counts, frames_from, Seen};

/// A running tshark writing its lines to a file.
pub struct Capture {
    out: PathBuf,
    _tshark: ChildGuard,
}

impl Capture {
    /// Starts tshark on `iface` in `ns`, writing into `dir`; returns once tshark
    /// says it is capturing.
    pub fn start(ns: &Netns, iface: &str, dir: &Path) -> Capture {
        let out = dir.join(format!("{iface}.frames"));
        let err = dir.join(format!("{iface}.tshark"));
        let line = format!(
            "exec tshark -l -n -i {iface} -T fields -e eth.src -e eth.type \
             -e data.data -E separator=, > {} 2> {}",
            out.display(),
            err.display()
        );
        let tshark = ns
            .spawn(&["sh", "-c", &line])
            .expect("tshark (tshark) must be installed");
        let ready = wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&err).is_ok_and(|s| s.contains("Capturing on"))
        });
        assert!(
            ready,
            "tshark did not start on {iface}: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        Capture {
            out,
            _tshark: tshark,
        }
    }

    /// The frames from `mac` captured so far, in order.
    pub fn from(&self, mac: &str) -> Vec<Seen> {
        frames_from(&std::fs::read_to_string(&self.out).unwrap_or_default(), mac)
    }

    /// The frames from `mac` once tshark has seen a counter's frame of `last` or
    /// later (waits up to 10 s, panics with what it saw if not).
    pub fn up_to(&self, mac: &str, last: u64) -> Vec<Seen> {
        let there = wait_until(Duration::from_secs(10), || {
            frame_counts(&self.from(mac))
                .last()
                .is_some_and(|&c| c >= last)
        });
        assert!(there, "no frame of {last} yet: {:?}", self.from(mac));
        self.from(mac)
    }
}

/// Two vnet_hdr TAPs (`a`, `b`: where a VM is before and after a move) in a kernel
/// bridge of a fresh namespace, all up, without IPv6 (no chatter). The bridge learns
/// on them but floods nothing to them, so what a capture on a TAP sees is what the
/// VMM wrote to it.
pub struct BridgedTaps {
    /// The namespace.
    pub ns: Netns,
    /// The bridge.
    pub br: String,
    /// The first TAP.
    pub a: String,
    /// The second TAP.
    pub b: String,
}

impl BridgedTaps {
    /// Makes them.
    pub fn new() -> BridgedTaps {
        use integration_tests::unique_name;
        let ns = Netns::new("vnic").unwrap();
        let (br, a, b) = (unique_name("vbr"), unique_name("vta"), unique_name("vtb"));
        ns.sh(&format!(
            "ip link add {br} type bridge && sysctl -qw net.ipv6.conf.{br}.disable_ipv6=1 && \
             ip link set {br} up && for t in {a} {b}; do ip tuntap add dev $t mode tap vnet_hdr \
             && sysctl -qw net.ipv6.conf.$t.disable_ipv6=1 && ip link set $t master {br} up && \
             bridge link set dev $t flood off mcast_flood off bcast_flood off; done"
        ))
        .unwrap();
        BridgedTaps { ns, br, a, b }
    }

    /// The bridge port the kernel learned `mac` on (`bridge fdb show`).
    pub fn fdb_port(&self, mac: &str) -> Option<String> {
        let fdb = self
            .ns
            .sh(&format!("bridge fdb show br {}", self.br))
            .ok()?;
        fdb.lines()
            .filter(|l| l.starts_with(mac) && !l.contains("permanent"))
            .find_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|&x| x == "dev")
                    .and_then(|_| w.next())
                    .map(str::to_string)
            })
    }
}
