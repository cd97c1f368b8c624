//! Helpers for the port unit tests: a network with a port that records what the
//! switch sends it, socket pairs standing in for devices (no root needed), frames.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{PortKind, PortSpec};
use crate::offload::VNET_HDR_LEN;
use crate::switch::{Network, Port, PortClass, PortTx, TxError};

/// Frames the switch sent to a [`sink`] port.
pub(super) type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

struct SinkTx(Seen);

impl PortTx for SinkTx {
    fn send(&self, frame: &[u8]) -> Result<(), TxError> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

/// A network with one recording port, "sink".
pub(super) fn sink() -> (Arc<Network>, Arc<Port>, Seen) {
    let net = Network::new("t", 1500, 64, Duration::from_secs(300));
    let seen = Seen::default();
    let port = net
        .add_port("sink", PortClass::Service, Box::new(SinkTx(seen.clone())))
        .unwrap();
    (net, port, seen)
}

/// A broadcast Ethernet frame from 02:00:00:00:00:`src` of `len` bytes.
pub(super) fn frame(src: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0x5au8; len.max(14)];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, src]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

/// A spec for a port named `name`.
pub(super) fn spec(name: &str, kind: PortKind) -> PortSpec {
    PortSpec {
        name: name.into(),
        kind,
        ifname: None,
        mac: None,
        netns: None,
        path: None,
        persistent: false,
        guard: None,
        vxlan: None,
    }
}

/// Waits up to two seconds for `ok`.
pub(super) fn eventually(mut ok: impl FnMut() -> bool) -> bool {
    (0..400).any(|_| {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
        false
    })
}

/// A datagram socket pair standing in for a vnet-header device (every read and
/// write one message): the port's end (non-blocking) and the test's.
pub(super) fn device() -> (OwnedFd, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    (OwnedFd::from(a), b)
}

pub(super) fn with_hdr(f: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; VNET_HDR_LEN];
    m.extend_from_slice(f);
    m
}
