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

use vmm_guest::{make_disk, run_guest, setup};

/// Sector the guest writes, and the pattern it repeats there.
const SECTOR: u64 = 21;
const PATTERN: &[u8; 16] = b"vmm-shim-tls-ok!";

/// Guest: write SECTOR with the pattern, read it back, compare, flush, `TLS OK`.
fn tls_guest() -> String {
    format!(
        r#"
    .set RING, 0x200000
    .set HDR, 0x203000
    .set DATA, 0x204000
    .set STATUS, 0x205000
    .set RDATA, 0x206000
_start:
    mov $MMIO0, %rbx
    BLK_UP 0, RING
    mov $DATA, %rdi
    mov $32, %ecx
2:  lea pattern(%rip), %rsi
    movsq
    movsq
    loop 2b
    movl $1, HDR
    movl $0, HDR+4
    movq ${SECTOR}, HDR+8
    movb $0xff, STATUS
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, '1'
    EXPECT_STATUS STATUS, 0, '2'
    READ1 RING, HDR, RDATA, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, '3'
    EXPECT_STATUS STATUS, 0, '4'
    mov $DATA, %rsi
    mov $RDATA, %rdi
    mov $512, %ecx
    repe cmpsb
    je 1f
    FAIL '5'
1:  movl $4, HDR
    movb $0xff, STATUS
    DSET RING, 1, STATUS, 1, F_WRITE, 0
    SUBMIT RING, 2, 0, 3
    EXPECT_STATUS STATUS, 0, '6'
    PRINT okmsg
    jmp reboot
pattern: .ascii "{pattern}"
okmsg: .asciz "TLS OK\n"
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
    run_ok(
        Command::new("psktool")
            .args(["-u", "alice", "-p"])
            .arg(&good),
    );
    run_ok(
        Command::new("psktool")
            .args(["-u", "alice", "-p"])
            .arg(&wrong),
    );
    (good, wrong)
}

/// certtool: a CA, a server certificate for 127.0.0.1 and a client certificate, in
/// `server/` (nbdkit's layout) and `client/` (libnbd's); `rogue/` holds a client
/// set whose CA did not sign the server's certificate.
fn make_x509(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_set = |d: &Path| {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(
            d.join("ca.info"),
            "cn = vnt CA\nca\ncert_signing_key\nexpiration_days = 30\n",
        )
        .unwrap();
        run_ok(
            Command::new("certtool")
                .arg("--generate-privkey")
                .arg("--outfile")
                .arg(d.join("ca-key.pem")),
        );
        run_ok(
            Command::new("certtool")
                .arg("--generate-self-signed")
                .arg("--load-privkey")
                .arg(d.join("ca-key.pem"))
                .arg("--template")
                .arg(d.join("ca.info"))
                .arg("--outfile")
                .arg(d.join("ca-cert.pem")),
        );
    };
    let signed = |ca: &Path, out: &Path, name: &str, info: &str| {
        std::fs::create_dir_all(out).unwrap();
        let key = out.join(format!("{name}-key.pem"));
        let tmpl = out.join(format!("{name}.info"));
        std::fs::write(&tmpl, info).unwrap();
        run_ok(
            Command::new("certtool")
                .arg("--generate-privkey")
                .arg("--outfile")
                .arg(&key),
        );
        run_ok(
            Command::new("certtool")
                .arg("--generate-certificate")
                .arg("--load-ca-certificate")
                .arg(ca.join("ca-cert.pem"))
                .arg("--load-ca-privkey")
                .arg(ca.join("ca-key.pem"))
                .arg("--load-privkey")
                .arg(&key)
                .arg("--template")
                .arg(&tmpl)
                .arg("--outfile")
                .arg(out.join(format!("{name}-cert.pem"))),
        );
        std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).unwrap();
    };
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

fn run_with_disk(elf: &Path, disk: &str) -> vmm_guest::VmRun {
    run_guest(&[], elf, &["--disk", disk], Duration::from_secs(60))
}

fn assert_pattern(img: &Path) {
    let bytes = std::fs::read(img).unwrap();
    let at = (SECTOR * 512) as usize;
    assert_eq!(&bytes[at..at + 512], PATTERN.repeat(32).as_slice());
}

#[test]
fn psk_guest_reads_and_writes_through_nbdkit_and_a_wrong_key_is_refused() {
    let (dir, elf) = setup("vnt-psk", &tls_guest());
    let (good, wrong) = make_psk(dir.path());
    let img = make_disk(dir.path());
    let psk_arg = format!("--tls-psk={}", good.display());
    let (_kit, port) = nbdkit(&img, &["--tls=require", &psk_arg]);
    // Identity in the URI, as libnbd takes it.
    let disk = format!(
        "nbds://alice@127.0.0.1:{port}/,tls-psk-file={}",
        good.display()
    );
    run_with_disk(&elf, &disk).assert_clean_exit("TLS OK\n");
    assert_pattern(&img);
    // Identity as an option; a second run on the same server.
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!(
        "nbds://127.0.0.1:{port}/,tls-psk-file={},tls-username=alice",
        good.display()
    );
    run_with_disk(&elf, &disk).assert_clean_exit("TLS OK\n");
    assert_pattern(&img);
    // The same identity with another key: the handshake fails, the VM does not start.
    let disk = format!(
        "nbds://alice@127.0.0.1:{port}/,tls-psk-file={}",
        wrong.display()
    );
    let r = run_with_disk(&elf, &disk);
    r.assert_exit(1, "TLS handshake failed");
    assert_eq!(r.serial, "", "{r}");
    // Plain NBD at a TLS-only server: refused by the server.
    let r = run_with_disk(&elf, &format!("nbd://127.0.0.1:{port}/"));
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(r.serial, "", "{r}");
}

#[test]
fn nbds_to_a_server_without_tls_is_refused_not_downgraded() {
    let (dir, elf) = setup("vnt-down", &tls_guest());
    let (good, _) = make_psk(dir.path());
    let img = make_disk(dir.path());
    let (_kit, port) = nbdkit(&img, &["--tls=off"]);
    let disk = format!(
        "nbds://alice@127.0.0.1:{port}/,tls-psk-file={}",
        good.display()
    );
    let r = run_with_disk(&elf, &disk);
    r.assert_exit(1, "server refused STARTTLS");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
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
    .set RING, 0x200000
    .set HDR, 0x203000
    .set DATA, 0x204000
    .set STATUS, 0x205000
_start:
    mov $MMIO0, %rbx
    BLK_UP 0, RING
    movl $1, HDR
    movq $1, HDR+8
    movq $0x6b2d65726f666562, %rax        # "before-k"
    movq %rax, DATA
    movb $0xff, STATUS
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_STATUS STATUS, 0, 'a'
    PRINT w1
    mov $0x3fd, %dx
2:  in %dx, %al
    test $1, %al
    jz 2b
    movq $2, HDR+8
    movq $0x6b6f2d7265746661, %rax        # "after-ok"
    movq %rax, DATA
    movb $0xff, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, 'u'
    EXPECT_STATUS STATUS, 0, 'b'
    PRINT okmsg
    jmp reboot
w1: .asciz "W1\n"
okmsg: .asciz "RE OK\n"
"#;

#[test]
fn a_tls_disk_reconnects_with_tls_when_nbdkit_restarts() {
    let (dir, elf) = setup("vnt-re", RECONNECT_GUEST);
    let (good, _) = make_psk(dir.path());
    let img = make_disk(dir.path());
    let psk_arg = format!("--tls-psk={}", good.display());
    let (mut kit, port) = nbdkit(&img, &["--tls=require", &psk_arg]);
    let disk = format!(
        "nbds://alice@127.0.0.1:{port}/,tls-psk-file={},reconnect_delay=20",
        good.display()
    );
    let mut cmd = vmm_guest::vmm_command(
        &[],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64M",
            "--disk",
            &disk,
        ],
    );
    cmd.env("VMM_LOG", "info");
    let mut vm = vmm_guest::LiveVm::spawn(cmd).unwrap();
    vm.expect_line("W1\n");
    kit.signal(libc::SIGKILL);
    kit.wait_timeout(Duration::from_secs(5))
        .expect("nbdkit gone");
    vm.send(b"x");
    std::thread::sleep(Duration::from_secs(1));
    // The new server requires TLS too: the disk can only come back over TLS.
    let _kit2 = nbdkit_on(&img, port, &["--tls=require", &psk_arg]);
    let r = vm.finish(Duration::from_secs(60));
    r.assert_clean_exit("RE OK\n");
    assert!(r.stderr.contains("reconnects=1"), "{r}");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[512..520], b"before-k");
    assert_eq!(&bytes[1024..1032], b"after-ok");
}
