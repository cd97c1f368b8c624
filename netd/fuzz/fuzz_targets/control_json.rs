//! Fuzzes the control API's request path: any bytes as a request line through
//! `fabric_api::decode_request` (as the control socket reads it), and every request
//! that decodes through `Daemon::handle` on a running daemon (an internal network
//! with DHCP and a NAT network, no ports), whose answer must encode as one line.
//! Nothing may panic, whatever the names, CIDRs and addresses. Requests that would
//! create host resources (a port: TAPs, sockets; a forward: a listening socket on
//! a host port other tests may need) are validated only, as the daemon does first.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use fabric_api::netd::{Request, Response};
use libfuzzer_sys::fuzz_target;
use netd::config::Config;
use netd::daemon::Daemon;

const CONFIG: &str = r#"
control = "/nonexistent/netd-fuzz.sock"
state_dir = "/nonexistent/netd-fuzz"

[[network]]
name = "fi"
mode = "internal"
subnet = "10.77.0.0/24"
dhcp = true

[[network]]
name = "fn"
mode = "nat"
resolv_conf = "/nonexistent/resolv.conf"
"#;

struct Lab {
    _rt: tokio::runtime::Runtime,
    daemon: Arc<Daemon>,
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let path = Path::new("fuzz.toml");
        let specs = Config::parse(CONFIG, path)
            .expect("config parses")
            .validate(path)
            .expect("config validates");
        let state = std::env::temp_dir().join(format!("netd-fuzz-control-{}", std::process::id()));
        let daemon = {
            let _g = rt.enter();
            Daemon::start(specs, &state).expect("daemon starts")
        };
        Lab { _rt: rt, daemon }
    })
}

fuzz_target!(|data: &[u8]| {
    let lab = lab();
    let resp = match fabric_api::decode_request::<Request>(data) {
        Err(e) => {
            assert!(!e.is_empty());
            Response::fail(e)
        }
        Ok(Request::PortAdd { port, .. }) => {
            match netd::config::validate_port(&port, "<control>", "port") {
                Ok(_) => Response::ok(serde_json::Value::Null),
                Err(e) => Response::fail(netd::error_chain(&e)),
            }
        }
        Ok(Request::ForwardAdd { forward, .. }) => {
            Response::ok(serde_json::to_value(&forward).expect("a forward serializes"))
        }
        Ok(req) => match lab.daemon.handle(req) {
            Ok(v) => Response::ok(v),
            Err(e) => Response::fail(netd::error_chain(&e)),
        },
    };
    let line = fabric_api::encode_line(&resp, b"");
    assert!(line.len() > 1 && line.ends_with(b"\n"), "no answer line");
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one line only"
    );
});
