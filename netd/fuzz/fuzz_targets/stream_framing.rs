//! Fuzzes a `stream` port's framing (QEMU `-netdev stream`: a 4-byte big-endian
//! length, then the frame) through the real port: the harness connects to a stream
//! port's unix socket, writes the fuzzer's bytes, shuts its side and waits until
//! netd closes the connection. Any bytes must never panic, the port must take
//! exactly the frames a reference reading of the same bytes finds (each either
//! switched or dropped and counted), a length above `MAX_FRAME` must be counted and
//! end that connection only, and the next peer must be served.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use netd::config::{PortKind, PortSpec};
use netd::port::{start_port, RunningPort, MAX_FRAME};
use netd::switch::{Network, PortClass, PortTx, TxError};

struct Null;
impl PortTx for Null {
    fn send(&self, _frame: &[u8]) -> Result<(), TxError> {
        Ok(())
    }
}

struct Lab {
    net: Arc<Network>,
    path: PathBuf,
    _port: std::sync::Mutex<RunningPort>,
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let net = Network::new("fz", 1500, 64, Duration::from_secs(300));
        net.add_port("sink", PortClass::Service, Box::new(Null))
            .expect("sink port");
        let path =
            std::env::temp_dir().join(format!("netd-fuzz-stream-{}.sock", std::process::id()));
        let spec = PortSpec {
            name: "s".into(),
            kind: PortKind::Stream,
            ifname: None,
            mac: None,
            netns: None,
            path: Some(path.clone()),
            persistent: false,
            guard: None,
            vxlan: None,
        };
        let port = start_port(&net, &spec).expect("stream port");
        Lab {
            net,
            path,
            _port: std::sync::Mutex::new(port),
        }
    })
}

/// What a reader of `data` takes: (complete frames, those of them the switch
/// refuses as malformed: shorter than an Ethernet header or a multicast source,
/// whether it stopped at an oversized length).
fn reference(mut data: &[u8]) -> (u64, u64, bool) {
    let (mut frames, mut malformed) = (0, 0);
    while data.len() >= 4 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len > MAX_FRAME {
            return (frames, malformed, true);
        }
        let Some(f) = data.get(4..4 + len) else {
            break;
        };
        frames += 1;
        if f.len() < 14 || f[6] & 1 != 0 {
            malformed += 1;
        }
        data = &data[4 + len..];
    }
    (frames, malformed, false)
}

/// rx_frames + ingress drops of the stream port.
fn taken(net: &Network) -> (u64, u64) {
    let p = net
        .port_infos()
        .into_iter()
        .find(|p| p.name == "s")
        .expect("stream port listed");
    let c = p.counters;
    (c.rx_frames + c.drop_mtu, c.drop_malformed)
}

fuzz_target!(|data: &[u8]| {
    let lab = lab();
    let (f0, m0) = taken(&lab.net);
    let mut c = UnixStream::connect(&lab.path).expect("connect to the stream port");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // netd may close early (an oversized length): a failed write is fine then.
    let _ = c.write_all(data);
    let _ = c.shutdown(std::net::Shutdown::Write);
    // Whatever netd sends (nothing here: the sink never answers) until it closes.
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            // (libFuzzer's own signals interrupt the harness's read.)
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("netd did not close the connection: {e}"),
        }
    }
    let (frames, malformed, oversized) = reference(data);
    let (f1, m1) = taken(&lab.net);
    let over = u64::from(oversized);
    assert_eq!(f1 - f0 + (m1 - m0), frames + over, "frames taken");
    assert_eq!(m1 - m0, malformed + over, "malformed counted");
});
