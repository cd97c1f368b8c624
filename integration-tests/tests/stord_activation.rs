//! stord started the ways a supervisor or a client starts it: one connection on
//! stdin/stdout (`nbdinfo [ stord serve --stdin ... ]`, libnbd's
//! connect_command), systemd socket activation (`systemd-socket-activate`, TCP
//! and unix sockets), and sd_notify READY=1.

mod stord_common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::{bin, free_port, require_root, wait_until, ChildGuard};
use stord_common::{ok, python, qemu_io};

/// What every test here starts from: root checked, a temporary directory, and in it
/// the config of one 4 MiB disk `only` (its control socket and state in the
/// directory too); returns the directory and the config's path.
fn setup() -> (tempfile::TempDir, PathBuf) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    (dir, cfg)
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("stord.toml");
    std::fs::write(
        &p,
        format!(
            "control = \"{}\"\nstate_dir = \"{}\"\n[[disk]]\nname = \"only\"\nsize = \"4MiB\"\nalloc = \"dynamic\"\n",
            dir.join("control.sock").display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    p
}

/// The command line of `stord serve --stdin` on the config `cfg` (for libnbd to run).
fn stdin_command(cfg: &Path) -> Vec<String> {
    let stord = bin("stord").display().to_string();
    let cfg = cfg.display().to_string();
    vec![
        stord,
        "serve".into(),
        "--stdin".into(),
        "--config".into(),
        cfg,
    ]
}

#[test]
fn stdin_mode_serves_one_connection() {
    let (dir, cfg) = setup();
    let cmd = stdin_command(&cfg);
    // libnbd runs stord itself and talks NBD over its stdin/stdout; the empty
    // export name means the only disk. Data written through one stdin session
    // is there in the next.
    let script = r#"
import os, sys, nbd
control, cmd = sys.argv[1], sys.argv[2:]
h = nbd.NBD()
h.connect_command(cmd)
assert h.get_size() == 4 << 20
assert not os.path.exists(control), "stdin mode binds nothing"
h.pwrite(b"\x42" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.shutdown()
h = nbd.NBD()
h.set_export_name("only")
h.connect_command(cmd)
assert h.pread(4096, 8192) == b"\x42" * 4096
h.shutdown()
print("ok")
"#;
    let control = dir.path().join("control.sock").display().to_string();
    let args = [vec![control], cmd].concat();
    let out = python(dir.path(), script, &args).unwrap();
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn stdin_mode_sigterm_is_graceful() {
    let (dir, cfg) = setup();
    let cmd = stdin_command(&cfg);
    let script = r#"
import signal, socket, subprocess, sys, time, nbd
cmd = sys.argv[1:]
a, b = socket.socketpair()
p = subprocess.Popen(cmd, stdin=b, stdout=b)
b.close()
h = nbd.NBD()
h.connect_socket(a.detach())
h.pwrite(b"\x55" * 4096, 0)                 # acknowledged, not flushed
p.send_signal(signal.SIGTERM)
time.sleep(0.3)
try:
    h.pread(4096, 0)
    raise AssertionError("served after SIGTERM")
except nbd.Error as e:
    assert "ESHUTDOWN" in str(e), e
assert p.wait(timeout=10) == 0, "stord --stdin exit status after SIGTERM"
h = nbd.NBD()
h.connect_command(cmd)
assert h.pread(4096, 0) == b"\x55" * 4096
h.shutdown()
print("ok")
"#;
    let out = python(dir.path(), script, &cmd).unwrap();
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn nbdinfo_runs_stord_with_socket_activation() {
    let (_dir, cfg) = setup();
    let stord = bin("stord");
    // `nbdinfo -- [ CMD ]` starts CMD with a listening socket in LISTEN_FDS.
    let mut c = Command::new("nbdinfo");
    c.args([
        "--json",
        "--",
        "[",
        stord.to_str().unwrap(),
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "]",
    ]);
    let out = ok(&mut c).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(4 << 20),
        "{out}"
    );
    assert_eq!(
        v["exports"][0]["can_multi_conn"].as_bool(),
        Some(true),
        "{out}"
    );
}

#[test]
fn systemd_socket_activation_tcp_and_unix() {
    let (dir, cfg) = setup();
    let port = free_port();
    let sock = dir.path().join("activated.sock");
    let child = Command::new("systemd-socket-activate")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--listen={}", sock.display()))
        .arg(bin("stord"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = ChildGuard::new(child);
    let uri = format!("nbd://127.0.0.1:{port}/only");
    // systemd-socket-activate starts stord on the first connection.
    assert!(wait_until(Duration::from_secs(15), || {
        Command::new("nbdinfo")
            .args(["--can", "connect"])
            .arg(&uri)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }));
    qemu_io(&uri, &["write -P 0x17 0 64k", "read -P 0x17 0 64k"]).unwrap();
    let unix_uri = format!("nbd+unix:///only?socket={}", sock.display());
    qemu_io(&unix_uri, &["read -P 0x17 0 64k"]).unwrap();
    // The control socket from the config is bound as usual.
    assert!(dir.path().join("control.sock").exists());
    g.signal(libc::SIGTERM);
    let st = g
        .wait_timeout(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(st.success(), "{st:?}");
}

#[test]
fn sd_notify_ready() {
    let (dir, cfg) = setup();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = Command::new(bin("stord"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut g = ChildGuard::new(child);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("stord sends READY=1");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // By the time READY=1 is sent, the control socket answers.
    let out = Command::new(bin("stord"))
        .args(["disk", "list", "--control"])
        .arg(dir.path().join("control.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    g.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("stord sends STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let st = g.wait_timeout(Duration::from_secs(10)).expect("exits");
    assert!(st.success());
    let mut lines = BufReader::new(g.child().stderr.take().unwrap()).lines();
    assert!(lines.any(|l| l.map(|l| l.contains("SIGTERM")).unwrap_or(false)));
}
