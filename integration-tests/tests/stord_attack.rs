//! Hostile NBD clients against stord: clients that stall (a WRITE whose
//! payload never comes, READ replies never read), that never finish the
//! handshake, that sit idle, or that open too many connections. Each attack is
//! closed or refused, counted in `stord status`, and an honest client (libnbd)
//! keeps being answered in the same test. Also the safe defaults of the files
//! and sockets stord makes.

mod stord_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::wait_until;
use stord_common::{dynamic, python, spawn_python, Stord};

fn status(s: &Stord) -> serde_json::Value {
    let out = s.cli(&["status"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn counter(s: &Stord, name: &str) -> u64 {
    status(s)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Raw-socket NBD helpers for the hostile clients: fixed newstyle handshake
/// with NBD_OPT_GO (simple replies), then requests by hand. Every script that
/// takes them is run with stord's NBD port as its argument (`port`).
const RAW: &str = r#"
import socket, struct, sys, time

port = int(sys.argv[1])

def handshake(sock, export):
    hello = recv_exact(sock, 18)
    assert hello[:16] == b'NBDMAGICIHAVEOPT', hello
    sock.sendall(struct.pack('>I', 1))  # FIXED_NEWSTYLE
    name = export.encode()
    data = struct.pack('>I', len(name)) + name + struct.pack('>H', 0)
    sock.sendall(b'IHAVEOPT' + struct.pack('>II', 7, len(data)) + data)  # GO
    while True:
        magic, opt, rtype, rlen = struct.unpack('>QIII', recv_exact(sock, 20))
        recv_exact(sock, rlen)
        if rtype == 1:  # ACK
            return
        assert rtype == 3, rtype  # INFO

def request(kind, handle, offset, length):
    return struct.pack('>IHHQQI', 0x25609513, 0, kind, handle, offset, length)

def connect(port, src='127.0.0.1'):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, 0))
    s.connect(('127.0.0.1', port))
    return s

def client(src='127.0.0.1'):
    """A connection from src through the handshake for the export d."""
    s = connect(port, src)
    handshake(s, 'd')
    return s
"#;

/// 16 clients send a 32 MiB WRITE header and 1 MiB of its payload and go
/// silent (reproduces the issue: they held the whole global budget), 8 more
/// never read their READ replies. Meanwhile an honest client's 4 KiB WRITE and READ are each answered within 100 ms. After
/// `request_timeout` the stalled connections are closed and counted, and the
/// honest client still works.
#[test]
fn stalled_clients_do_not_stall_others() {
    let s = Stord::limited("request_timeout = 3\n", &[dynamic("d", "256MiB")]);
    // 16 clients send a 32 MiB WRITE header and 1 MiB of its payload and go
    // silent: together what a global budget of 16 x 32 MiB would have been.
    // 8 more queue 64 READs of 1 MiB and never read a reply.
    let stall = format!(
        "{RAW}
socks = []
for i in range(24):
    s = connect(port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    handshake(s, 'd')
    if i < 16:
        s.sendall(request(1, 99, 0, 32 << 20) + b'x' * (1 << 20))
    else:
        s.sendall(b''.join(request(0, h, (h % 200) << 20, 1 << 20) for h in range(64)))
    socks.append(s)
print('stalled', flush=True)
time.sleep(60)
"
    );
    let mut stalled = spawn_python(
        s.dir.path(),
        &stall,
        &[s.port.to_string()],
        Stdio::inherit(),
    )
    .unwrap();
    let mut out = std::io::BufReader::new(stalled.child().stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "stalled");
    // Let stord take the stalled requests in (budget, payload reads, replies).
    std::thread::sleep(Duration::from_millis(500));

    let honest = r#"
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
worst = 0.0
for i in range(20):
    buf = bytes([i]) * 4096
    t = time.monotonic()
    h.pwrite(buf, 4096 * i)
    got = h.pread(4096, 4096 * i)
    worst = max(worst, time.monotonic() - t)
    assert got == buf
print(worst)
"#;
    let worst: f64 = python(s.dir.path(), honest, &[s.uri("d")])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        worst < 0.1,
        "an honest 4 KiB WRITE + READ took {worst:.3} s with 24 stalled clients"
    );

    // The stalled connections are closed once request_timeout passes.
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || counter(&s, "timeouts") >= 24),
        "stalled connections not closed: {}\n{}",
        status(&s),
        s.log_text()
    );
    eprintln!(
        "24 stalled connections closed after {:?} more",
        t0.elapsed()
    );
    // Every stalled connection is gone on the server side. (The clients
    // that never read see the close only behind the replies queued for
    // them; those that stalled a WRITE see it at once.)
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = s.cli(&["disk", "list", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v[0]["connections"] == 0
        }),
        "stalled connections still attached"
    );
    let worst: f64 = python(s.dir.path(), honest, &[s.uri("d")])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(worst < 0.1, "{worst}");
}

/// A client that never finishes the handshake is closed after
/// `handshake_timeout`, one that sits idle after `idle_timeout`; both are
/// counted, while a client that keeps working stays connected.
#[test]
fn handshake_and_idle_timeouts_close_connections() {
    let s = Stord::limited(
        "handshake_timeout = 1\nidle_timeout = 1.5\n",
        &[dynamic("d", "1MiB")],
    );
    let silent = format!(
        "{RAW}
s = connect(port)
t = time.monotonic()
s.settimeout(10)
try:
    while s.recv(4096):
        pass
except OSError:
    pass
print(time.monotonic() - t)
"
    );
    let took: f64 = python(s.dir.path(), &silent, &[s.port.to_string()])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (0.8..4.0).contains(&took),
        "silent handshake closed after {took} s"
    );
    assert!(counter(&s, "handshake_timeouts") >= 1, "{}", status(&s));

    let idle_and_busy = r#"
import nbd, sys, time
idle = nbd.NBD()
idle.connect_uri(sys.argv[1])
busy = nbd.NBD()
busy.connect_uri(sys.argv[1])
t = time.monotonic()
while time.monotonic() - t < 4:
    busy.pread(512, 0)
    time.sleep(0.3)
try:
    idle.pread(512, 0)
    print('idle still open')
except nbd.Error:
    print('idle closed')
busy.pread(512, 0)
print('busy open')
"#;
    let out = python(s.dir.path(), idle_and_busy, &[s.uri("d")]).unwrap();
    assert_eq!(out.trim(), "idle closed\nbusy open", "{out}");
    assert!(counter(&s, "idle_closed") >= 1, "{}", status(&s));
}

/// `max_connections_per_client`: a third TCP connection from one address is
/// refused and counted while another address is served; over the unix socket
/// the limit is per uid.
#[test]
fn connections_per_client_are_bounded() {
    let s = Stord::limited("max_connections_per_client = 2\n", &[dynamic("d", "1MiB")]);
    let script = format!(
        "{RAW}
import nbd
held = [client() for i in range(2)]
third = connect(port)
try:
    handshake(third, 'd')
    print('third served')
except (EOFError, OSError):
    print('third refused')
other = client('127.0.0.2')
other.sendall(request(0, 1, 0, 512))
print('other', len(recv_exact(other, 16 + 512)))
u = []
for i in range(2):
    h = nbd.NBD(); h.connect_uri(sys.argv[2]); u.append(h)
try:
    h = nbd.NBD(); h.connect_uri(sys.argv[2]); h.pread(512, 0)
    print('unix third served')
except nbd.Error:
    print('unix third refused')
for c in held:
    c.close()
time.sleep(0.5)
h = nbd.NBD(); h.connect_uri(sys.argv[3]); h.pread(512, 0)
print('tcp free again')
"
    );
    let out = python(
        s.dir.path(),
        &script,
        &[s.port.to_string(), s.unix_uri("d"), s.uri("d")],
    )
    .unwrap();
    assert_eq!(
        out.trim(),
        "third refused\nother 528\nunix third refused\ntcp free again",
        "{out}"
    );
    assert!(counter(&s, "refused_per_client") >= 2, "{}", status(&s));
}

/// Disk files 0600, the state and disks directories 0700, catalog 0600, and
/// both unix sockets 0660 with the `socket_group`, from the moment they exist.
#[test]
fn files_and_sockets_are_private() {
    let s = Stord::limited("socket_group = \"disk\"\n", &[dynamic("d", "1MiB")]);
    let out = s.cli(&["disk", "create", "e", "--size", "1MiB", "--alloc", "fixed"]);
    assert!(out.status.success(), "{out:?}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let state = s.state();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("disks")), 0o700);
    assert_eq!(mode(&state.join("catalog.json")), 0o600);
    assert_eq!(mode(&state.join("disks/d.img")), 0o600);
    assert_eq!(mode(&state.join("disks/e.img")), 0o600);
    for sock in [s.unix(), s.control()] {
        assert_eq!(mode(&sock), 0o660, "{}", sock.display());
        assert_eq!(std::fs::metadata(&sock).unwrap().gid(), 6, "group disk");
    }
    // A group that does not exist stops the daemon with a clear error.
    let bad = s.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(s.config())
        .unwrap()
        .replace(
            "socket_group = \"disk\"",
            "socket_group = \"no-such-group-s1\"",
        )
        .replace("control.sock", "control2.sock")
        .replace("nbd.sock", "nbd2.sock");
    let text = text.replace(&format!(":{}\"", s.port), ":1\"");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(integration_tests::bin("stord"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-group-s1"), "{err}");
}
