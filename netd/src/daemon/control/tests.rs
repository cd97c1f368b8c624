//! Unit tests of the control server: accept back-off, the socket's mode, group and
//! bounds, idle connections, and a control path that belongs to somebody else.

use super::*;
use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Regression (issue 11, item 12): the control socket's mode was the umask's,
/// with no bound on connections and no idle timeout.
#[test]
fn the_control_socket_is_0660_bounded_and_closes_idle_connections() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let (_, gid) = crate::sys::effective_ids();
    let spec = ControlSpec {
        path: path.clone(),
        gid,
        max_connections: 2,
        idle_timeout: Duration::from_secs(1),
    };
    let d = rt.block_on(async { Daemon::start(vec![], &dir.path().join("state")).unwrap() });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve_control(d.clone(), spec, async {
        let _ = stop_rx.await;
    }));
    let ok = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        path.exists()
    });
    assert!(ok, "control socket bound");
    let md = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    assert_eq!(md.gid(), gid);

    let call = |c: &mut std::os::unix::net::UnixStream, line: &str| -> String {
        c.write_all(line.as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(c.try_clone().unwrap());
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        out
    };
    let connect = || {
        let c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    };
    let mut a = connect();
    let mut b = connect();
    assert!(call(&mut a, "{\"cmd\":\"net_list\"}\n").contains("\"ok\":true"));
    assert!(call(&mut b, "{\"cmd\":\"net_list\"}\n").contains("\"ok\":true"));
    // A third is told and closed, and counted.
    let mut c = connect();
    let mut r = std::io::BufReader::new(c.try_clone().unwrap());
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    assert!(out.contains("too many control connections"), "{out}");
    let _ = c.write_all(b"{\"cmd\":\"net_list\"}\n");
    // The two still work; after a second of silence they are closed.
    assert!(call(&mut a, "{\"cmd\":\"control_stats\"}\n").contains("\"refused_full\":1"));
    std::thread::sleep(Duration::from_millis(1500));
    let mut out = String::new();
    let mut r = std::io::BufReader::new(b.try_clone().unwrap());
    r.read_line(&mut out).unwrap();
    assert!(out.contains("no request for 1 s"), "{out}");
    out.clear();
    assert_eq!(r.read_line(&mut out).unwrap(), 0, "closed");
    // A new connection is served, and the counters say what happened.
    let mut e = connect();
    let stats = call(&mut e, "{\"cmd\":\"control_stats\"}\n");
    assert!(stats.contains("\"closed_idle\":2"), "{stats}");
    assert!(stats.contains("\"connections\":1"), "{stats}");
    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();
    assert!(!path.exists(), "socket removed on exit");
}

#[test]
fn the_control_path_is_never_taken_from_somebody_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    std::fs::write(&path, b"precious").unwrap();
    let spec = ControlSpec {
        path: path.clone(),
        gid: 0,
        max_connections: 1,
        idle_timeout: Duration::from_secs(1),
    };
    assert!(bind_control(&spec).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

/// Regression (issue 11, finding 2): failed accepts (EMFILE) back off from 10 ms
/// to 1 s instead of spinning, log rarely, and a success starts over.
#[test]
fn failed_accepts_back_off_and_log_rarely() {
    let mut b = AcceptBackoff::default();
    let waits: Vec<(Duration, bool)> = (0..10).map(|_| b.failed()).collect();
    assert_eq!(waits[0], (Duration::from_millis(10), true));
    assert_eq!(waits[1], (Duration::from_millis(20), false));
    assert_eq!(waits[9].0, Duration::from_secs(1));
    // A hundred failures in a row wait at least 90 s in all, with two log lines.
    let mut b = AcceptBackoff::default();
    let (total, logs) = (0..200).fold((Duration::ZERO, 0), |(t, l), _| {
        let (w, log) = b.failed();
        (t + w, l + usize::from(log))
    });
    assert!(total > Duration::from_secs(190), "{total:?}");
    assert_eq!(logs, 2);
    b.reset();
    assert_eq!(b.failed().0, Duration::from_millis(10));
}
