//! The API's routing and bounds over a real unix socket, with a mock VM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde_json::{json, Value};

use super::client::{self, Action, CtlError};
use super::*;

#[derive(Default)]
struct MockVm {
    paused: AtomicBool,
    fail: AtomicBool,
    migrated: AtomicBool,
}

impl Vm for MockVm {
    fn describe(&self) -> Value {
        let p = self.paused.load(Ordering::SeqCst);
        json!({ "state": if p { "paused" } else { "running" }, "vcpus": 1 })
    }
    fn set_paused(&self, paused: bool) -> Result<(), String> {
        if self.fail.load(Ordering::SeqCst) {
            return Err("cannot".into());
        }
        self.paused.store(paused, Ordering::SeqCst);
        Ok(())
    }
    fn snapshot(&self, dir: &Path, resume: bool) -> Result<Value, String> {
        Ok(json!({ "dir": dir, "resume": resume }))
    }
    fn migrate(&self, m: &Migration) -> Result<Value, String> {
        Ok(
            json!({ "to": m.to, "max": m.max_downtime_ms, "auto": m.auto_converge, "mib": m.max_bandwidth_mib }),
        )
    }
    fn migrated(&self) {
        self.migrated.store(true, Ordering::SeqCst);
    }
}

fn server() -> (tempfile::TempDir, std::path::PathBuf, Arc<MockVm>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vm = Arc::new(MockVm::default());
    serve(&sock, vm.clone()).unwrap();
    (dir, sock, vm)
}

/// Sends raw bytes, returns the status code and body.
fn raw(sock: &Path, bytes: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let end = fabric_util::http::head_end(&out).unwrap();
    let code = std::str::from_utf8(&out[9..12]).unwrap().parse().unwrap();
    (code, serde_json::from_slice(&out[end..]).unwrap())
}

#[test]
fn status_pause_and_resume_go_through_the_client() {
    let (_d, sock, vm) = server();
    assert_eq!(
        client::run(&sock, &Action::Status).unwrap()["state"],
        "running"
    );
    let v = client::run(&sock, &Action::Pause).unwrap();
    assert_eq!(v["state"], "paused");
    assert_eq!(v["api"]["served"], 1, "the status before it");
    assert_eq!(
        client::run(&sock, &Action::Resume).unwrap()["state"],
        "running"
    );
    vm.fail.store(true, Ordering::SeqCst);
    match client::run(&sock, &Action::Pause) {
        Err(CtlError::Refused {
            status: 500,
            message,
        }) => assert_eq!(message, "cannot"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client::run(&sock, &Action::Status).unwrap()["api"]["failed"],
        1
    );
}

#[test]
fn bad_requests_are_refused_with_json_and_counted() {
    let (_d, sock, vm) = server();
    let cases: [(&[u8], u16, &str); 8] = [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404, "not_found"),
        (b"DELETE /vm HTTP/1.1\r\n\r\n", 405, "bad_method"),
        (b"PATCH /vm HTTP/1.1\r\n\r\n", 411, "no_length"),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "too_large",
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"state\":\"gone\"}",
            400,
            "bad_request",
        ),
        (
            b"PATCH /vm HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"sta",
            400,
            "bad_request",
        ),
    ];
    for (req, code, _) in cases {
        let (c, v) = raw(&sock, req);
        assert_eq!(c, code, "{}", String::from_utf8_lossy(req));
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    let mut big = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
    big.extend(vec![b'a'; MAX_HEAD]);
    assert_eq!(raw(&sock, &big).0, 431);
    let v = client::run(&sock, &Action::Status).unwrap();
    let r = &v["api"]["refused"];
    assert_eq!(r["bad_request"], 4, "{v}");
    for k in [
        "too_large",
        "body_too_large",
        "not_found",
        "bad_method",
        "no_length",
    ] {
        assert_eq!(r[k], 1, "{k}: {v}");
    }
    assert!(!vm.paused.load(Ordering::SeqCst));
}

#[test]
fn a_second_server_on_a_live_socket_is_refused_and_a_stale_one_replaced() {
    let (_d, sock, _vm) = server();
    let again = serve(&sock, Arc::new(MockVm::default()));
    assert!(matches!(again, Err(ApiError::InUse(_))), "{again:?}");
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    serve(&stale, Arc::new(MockVm::default())).unwrap();
    assert!(client::run(&stale, &Action::Status).is_ok());
}

#[test]
fn snapshot_and_migrate_bodies_are_checked() {
    let (_d, sock, vm) = server();
    let put = |path: &str, body: &str| {
        raw(
            &sock,
            format!(
                "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let (code, v) = put("/snapshot", r#"{"dir":"/tmp/s"}"#);
    assert_eq!((code, &v["resume"]), (200, &json!(false)), "{v}");
    assert_eq!(put("/snapshot", r#"{"dir":"rel"}"#).0, 400);
    assert_eq!(put("/snapshot", r#"{"dir":"/x","more":1}"#).0, 400);
    assert!(!vm.migrated.load(Ordering::SeqCst));
    assert_eq!(put("/migrate", r#"{"to":"udp:1:2"}"#).0, 400);
    assert_eq!(
        put("/migrate", r#"{"to":"tcp:h:1","auto_converge":"no"}"#).0,
        400
    );
    assert_eq!(
        put("/migrate", r#"{"to":"tcp:h:1","max_downtime_ms":0}"#).0,
        400
    );
    assert_eq!(
        put("/migrate", r#"{"to":"tcp:h:1","max_bandwidth_mib":-1}"#).0,
        400
    );
    assert_eq!(
        put(
            "/migrate",
            r#"{"to":"tcp:h:1","max_bandwidth_mib":1048577}"#
        )
        .0,
        400
    );
    assert!(!vm.migrated.load(Ordering::SeqCst));
    let (code, v) = put("/migrate", r#"{"to":"tcp:127.0.0.1:9"}"#);
    assert_eq!((code, &v["max"]), (200, &json!(50)), "{v}");
    assert_eq!(v["mib"], 0, "no bandwidth cap unless asked: {v}");
    assert_eq!(
        v["auto"], true,
        "auto-converge is on unless turned off: {v}"
    );
    // The server calls `migrated` once the answer is out, so the client may read the
    // answer first: wait for it.
    let t0 = std::time::Instant::now();
    while !vm.migrated.load(Ordering::SeqCst) && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(vm.migrated.load(Ordering::SeqCst));
    let (code, _) = raw(&sock, b"GET /snapshot HTTP/1.1\r\n\r\n");
    assert_eq!(code, 405);
}
