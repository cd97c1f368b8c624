//! vmm-shim's NBD client over TLS against nbdkit (`--tls=require`), a peer nobody
//! here wrote: a guest program writes a sector through `nbds://` and reads it back,
//! with a PSK (identity in the URI and as `tls-username=`) and with X.509 certificates
//! (libnbd's directory layout, the client certificate checked by nbdkit's
//! `--tls-verify-peer`); the bytes must be in nbdkit's backing file. Refused: a wrong
//! key, a CA the server's certificate does not chain to, a plain client at a TLS-only
//! server, and a server that does not offer TLS to an `nbds://` disk (no downgrade).
//! A TLS disk with `reconnect_delay` comes back, over TLS, when nbdkit restarts.
//! The credentials are made here with GnuTLS's psktool and certtool.

mod vmm_guest;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmm_guest::{assert_sector_pattern, kill_server, make_disk, run_with_disk, setup, LiveVm};

/// Sector the guest writes, and the pattern it repeats there.
const SECTOR: u64 = 21;
const PATTERN: &[u8; 16] = b"vmm-shim-tls-ok!";

/// Guest: write SECTOR with the pattern, read it back, compare, flush, `TLS OK`.
fn tls_guest() -> String {
    format!(
        r#"
_start:
    DISK0_UP
    FILL16 DATA, pattern, 32
    BLK_HDR 1, ${SECTOR}
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, '1'
    EXPECT_STATUS STATUS, 0, '2'
    READ1 RING, HDR, RDATA, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, '3'
    EXPECT_STATUS STATUS, 0, '4'
    EXPECT_SAME DATA, RDATA, 512, '5'
    FLUSH 2, 3
    EXPECT_STATUS STATUS, 0, '6'
    PASS "TLS OK\n"
pattern: .ascii "{pattern}"
"#,
        pattern = std::str::from_utf8(PATTERN).unwrap()
    )
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run a GnuTLS tool (gnutls-bin)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// psktool: `keys.psk` with alice's key, `wrong.psk` with another key for alice.
fn make_psk(dir: &Path) -> (PathBuf, PathBuf) {
    let (good, wrong) = (dir.join("keys.psk"), dir.join("wrong.psk"));
    for file in [&good, &wrong] {
        run_ok(
            Command::new("psktool")
                .args(["-u", "alice", "-p"])
                .arg(file),
        );
    }
    (good, wrong)
}

/// certtool: in `dir`, the key `{name}-key.pem` and the certificate
/// `{name}-cert.pem` made from the template `info` (kept as `{name}.info`), signed
/// by the CA whose files are in `ca` (`ca-cert.pem`, `ca-key.pem`; a copy of its
/// certificate goes into `dir` too) or, without one, self-signed.
fn cert_set(dir: &Path, name: &str, info: &str, ca: Option<&Path>) {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join(format!("{name}-key.pem"));
    let tmpl = dir.join(format!("{name}.info"));
    std::fs::write(&tmpl, info).unwrap();
    run_ok(
        Command::new("certtool")
            .arg("--generate-privkey")
            .arg("--outfile")
            .arg(&key),
    );
    let mut c = Command::new("certtool");
    match ca {
        None => c.arg("--generate-self-signed"),
        Some(ca) => c
            .arg("--generate-certificate")
            .arg("--load-ca-certificate")
            .arg(ca.join("ca-cert.pem"))
            .arg("--load-ca-privkey")
            .arg(ca.join("ca-key.pem")),
    };
    c.arg("--load-privkey")
        .arg(&key)
        .arg("--template")
        .arg(&tmpl);
    run_ok(c.arg("--outfile").arg(dir.join(format!("{name}-cert.pem"))));
    if let Some(ca) = ca {
        std::fs::copy(ca.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    }
}

/// certtool: a CA, a server certificate for 127.0.0.1 and a client certificate, in
/// `server/` (nbdkit's layout) and `client/` (libnbd's); `rogue/` holds a client
/// set whose CA did not sign the server's certificate.
fn make_x509(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_info = "cn = vnt CA\nca\ncert_signing_key\nexpiration_days = 30\n";
    let ca_set = |d: &Path| cert_set(d, "ca", ca_info, None);
    let signed =
        |ca: &Path, out: &Path, name: &str, info: &str| cert_set(out, name, info, Some(ca));
    let (ca, rogue_ca) = (dir.join("ca"), dir.join("rogue-ca"));
    ca_set(&ca);
    ca_set(&rogue_ca);
    let server_info = "cn = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n";
    let client_info =
        "cn = client1\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n";
    let (server, client, rogue) = (dir.join("server"), dir.join("client"), dir.join("rogue"));
    signed(&ca, &server, "server", server_info);
    signed(&ca, &client, "client", client_info);
    signed(&rogue_ca, &rogue, "client", client_info);
    (server, client, rogue)
}

/// nbdkit serving `img` (file plugin) on a free port of 127.0.0.1 with `tls` args.
fn nbdkit(img: &Path, tls: &[&str]) -> (integration_tests::ChildGuard, u16) {
    let port = integration_tests::free_port();
    (nbdkit_on(img, port, tls), port)
}

/// nbdkit serving `img` on `port` of 127.0.0.1 with `tls` args.
fn nbdkit_on(img: &Path, port: u16, tls: &[&str]) -> integration_tests::ChildGuard {
    let child = Command::new("nbdkit")
        .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
        .args(tls)
        .arg("file")
        .arg(img)
        .spawn()
        .expect("nbdkit must be installed");
    let g = integration_tests::ChildGuard::new(child);
    let up = integration_tests::wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "nbdkit did not start");
    g
}

/// Asserts that the guest's pattern is in `img` at SECTOR.
fn assert_pattern(img: &Path) {
    assert_sector_pattern(&std::fs::read(img).unwrap(), SECTOR, PATTERN);
}

/// What the PSK tests start with: the guest `src` built as `name`, alice's keys (see
/// [`make_psk`]), a zeroed image and the `--tls-psk=` argument for nbdkit.
struct Psk {
    /// Holds the files until the test ends.
    _dir: tempfile::TempDir,
    elf: PathBuf,
    good: PathBuf,
    wrong: PathBuf,
    img: PathBuf,
    kit_arg: String,
}

impl Psk {
    fn setup(name: &str, src: &str) -> Psk {
        let (dir, elf) = setup(name, src);
        let (good, wrong) = make_psk(dir.path());
        let img = make_disk(dir.path());
        let kit_arg = format!("--tls-psk={}", good.display());
        Psk {
            _dir: dir,
            elf,
            good,
            wrong,
            img,
            kit_arg,
        }
    }

    /// The `nbds://` disk for alice at `port` with the key file `key`, then `extra`
    /// options (each with its leading comma).
    fn disk(port: u16, key: &Path, extra: &str) -> String {
        format!(
            "nbds://alice@127.0.0.1:{port}/,tls-psk-file={}{extra}",
            key.display()
        )
    }
}

#[test]
fn psk_guest_reads_and_writes_through_nbdkit_and_a_wrong_key_is_refused() {
    let p = Psk::setup("vnt-psk", &tls_guest());
    let (elf, img) = (&p.elf, &p.img);
    let (_kit, port) = nbdkit(img, &["--tls=require", &p.kit_arg]);
    // Identity in the URI, as libnbd takes it.
    run_with_disk(elf, &Psk::disk(port, &p.good, "")).assert_clean_exit("TLS OK\n");
    assert_pattern(img);
    // Identity as an option; a second run on the same server.
    std::fs::write(img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!(
        "nbds://127.0.0.1:{port}/,tls-psk-file={},tls-username=alice",
        p.good.display()
    );
    run_with_disk(elf, &disk).assert_clean_exit("TLS OK\n");
    assert_pattern(img);
    // The same identity with another key: the handshake fails, the VM does not start.
    let r = run_with_disk(elf, &Psk::disk(port, &p.wrong, ""));
    r.assert_exit(1, "TLS handshake failed");
    assert_eq!(r.serial, "", "{r}");
    // Plain NBD at a TLS-only server: refused by the server.
    let r = run_with_disk(elf, &format!("nbd://127.0.0.1:{port}/"));
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(r.serial, "", "{r}");
}

#[test]
fn nbds_to_a_server_without_tls_is_refused_not_downgraded() {
    let p = Psk::setup("vnt-down", &tls_guest());
    let (elf, img) = (&p.elf, &p.img);
    let (_kit, port) = nbdkit(img, &["--tls=off"]);
    let r = run_with_disk(elf, &Psk::disk(port, &p.good, ""));
    r.assert_exit(1, "server refused STARTTLS");
    assert!(std::fs::read(img).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn x509_guest_reads_and_writes_through_nbdkit_and_a_foreign_ca_is_refused() {
    let (dir, elf) = setup("vnt-x509", &tls_guest());
    let (server, client, rogue) = make_x509(dir.path());
    let img = make_disk(dir.path());
    let certs = format!("--tls-certificates={}", server.display());
    let (_kit, port) = nbdkit(&img, &["--tls=require", &certs, "--tls-verify-peer"]);
    let disk = format!(
        "nbds://127.0.0.1:{port}/,tls-certificates={}",
        client.display()
    );
    run_with_disk(&elf, &disk).assert_clean_exit("TLS OK\n");
    assert_pattern(&img);
    // A client whose CA did not sign the server's certificate refuses the server.
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!(
        "nbds://127.0.0.1:{port}/,tls-certificates={}",
        rogue.display()
    );
    let r = run_with_disk(&elf, &disk);
    r.assert_exit(1, "certificate verify failed");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    // A bad credentials directory is a config error naming the key.
    let disk = format!(
        "nbds://127.0.0.1:{port}/,tls-certificates={}",
        dir.path().join("none").display()
    );
    run_with_disk(&elf, &disk).assert_exit(2, "disk[0]: tls-certificates:");
}

/// Guest: writes sector 1 ("before-k"), prints `W1`, waits for a console byte (the
/// test restarts nbdkit meanwhile), writes sector 2 ("after-ok"), prints `RE OK`.
const RECONNECT_GUEST: &str = r#"
_start:
    DISK0_UP
    BLK_HDR 1, $1
    PUT8 DATA, 0x6b2d65726f666562         # "before-k"
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_STATUS STATUS, 0, 'a'
    PRINT w1
    WAIT_CONSOLE
    BLK_HDR 1, $2
    PUT8 DATA, 0x6b6f2d7265746661         # "after-ok"
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, 'u'
    EXPECT_STATUS STATUS, 0, 'b'
    PASS "RE OK\n"
w1: .asciz "W1\n"
"#;

#[test]
fn a_tls_disk_reconnects_with_tls_when_nbdkit_restarts() {
    let p = Psk::setup("vnt-re", RECONNECT_GUEST);
    let (elf, img) = (&p.elf, &p.img);
    let (mut kit, port) = nbdkit(img, &["--tls=require", &p.kit_arg]);
    let disk = Psk::disk(port, &p.good, ",reconnect_delay=20");
    let mut vm = LiveVm::guest_logged(elf, &["--disk", &disk]);
    vm.expect_line("W1\n");
    kill_server(&mut kit, "nbdkit");
    vm.send(b"x");
    std::thread::sleep(Duration::from_secs(1));
    // The new server requires TLS too: the disk can only come back over TLS.
    let _kit2 = nbdkit_on(img, port, &["--tls=require", &p.kit_arg]);
    let r = vm.finish(Duration::from_secs(60));
    r.assert_clean_exit("RE OK\n");
    assert!(r.stderr.contains("reconnects=1"), "{r}");
    let bytes = std::fs::read(img).unwrap();
    assert_eq!(&bytes[512..520], b"before-k");
    assert_eq!(&bytes[1024..1032], b"after-ok");
}
