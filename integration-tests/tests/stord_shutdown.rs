//! SIGTERM: stord stops accepting, answers ESHUTDOWN to requests that arrive
//! after shutdown began, finishes in-flight work, flushes, removes its sockets
//! and exits 0; the data acknowledged before is there after a restart.

mod stord_common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::require_root;
use stord_common::{dynamic, qemu_io, spawn_python, Stord};

const CLIENT: &str = r#"
import errno, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x3c" * (1 << 20), 0)         # acknowledged, not flushed
print("ready", flush=True)
sys.stdin.readline()                     # the test sends SIGTERM, then "go"
try:
    h.pread(4096, 0)
    print("served", flush=True)
except nbd.Error as e:
    print("error", str(e).rsplit("(", 1)[-1].rstrip(")"), flush=True)
# A client that ignores ESHUTDOWN and keeps sending is cut off after the grace
# period instead of holding the daemon up.
deadline = time.time() + 20
while time.time() < deadline:
    try:
        h.pread(4096, 0)
    except nbd.Error as e:
        if "ESHUTDOWN" not in str(e):
            print("closed", flush=True)
            break
"#;

#[test]
fn sigterm_is_graceful() {
    require_root();
    let mut s = Stord::start(&[dynamic("d", "8MiB")]).unwrap();
    let mut client = spawn_python(s.dir.path(), CLIENT, &[s.uri("d")], Stdio::inherit()).unwrap();
    let mut out = BufReader::new(client.child().stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let mut daemon = s.child.take().unwrap();
    daemon.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // New connections are refused once shutdown began.
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err());
    writeln!(client.child().stdin.as_mut().unwrap(), "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "error ESHUTDOWN", "a request after SIGTERM");

    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "closed",
        "a client that keeps sending is cut off"
    );

    let st = daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("stord exits after SIGTERM");
    assert!(st.success(), "exit status {st:?}; log:\n{}", s.log_text());
    assert!(!s.control().exists(), "control socket removed");
    assert!(!s.unix().exists(), "NBD unix socket removed");
    let log = s.log_text();
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");

    s.restart().unwrap();
    qemu_io(&s.uri("d"), &["read -P 0x3c 0 1M"]).unwrap();
}
