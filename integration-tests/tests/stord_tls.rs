//! stord over TLS (NBD STARTTLS) with real peers: libnbd's nbdinfo / nbdcopy
//! (`nbds://`, `tls-psk-file=`, `tls-certificates=`) and qemu-img / qemu-io
//! (`--object tls-creds-psk` / `tls-creds-x509`). Credentials are made here
//! with GnuTLS's psktool and certtool. Every refusal (plain client under
//! `require`, wrong key, identity not on a disk's `allow` list, missing or
//! untrusted client certificate) is checked with its counter in `stord
//! status`, and an honest client keeps working in the same test.

mod stord_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Result};
use integration_tests::{bin, require_root, run_failing, sh};
use stord_common::{ok, Stord};

/// Makes, under `dir`: `keys.psk` (alice, bob), `wrong.psk` (alice, another
/// key), `psk-qemu/keys.psk` and `psk-wrong/keys.psk` (qemu reads DIR/keys.psk),
/// a CA with server and client certificates (`x509-client/`, `x509-client2/`:
/// CN=client1 / CN=client2 with ca-cert.pem, as libnbd and qemu look for them;
/// `x509-nocert/`: the CA only), and `rogue/`: a client1 certificate from
/// another CA.
fn make_creds(dir: &Path) -> Result<()> {
    let script = r#"
set -eu
cd "$1"
psktool -u alice -p keys.psk >/dev/null; psktool -u bob -p keys.psk >/dev/null
psktool -u alice -p wrong.psk >/dev/null
mkdir -p psk-qemu psk-wrong; cp keys.psk psk-qemu/; cp wrong.psk psk-wrong/keys.psk
printf 'cn = stord TLS test CA\nca\ncert_signing_key\nexpiration_days = 30\n' > ca.info
printf 'organization = Test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n' > server.info
gen() { certtool --generate-privkey --outfile "$1" >/dev/null 2>&1; }
cert() { # name cn ca-dir
  printf 'country = GB\norganization = Test\ncn = %s\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n' "$2" > $1.info
  gen $1-key.pem
  certtool --generate-certificate --load-ca-certificate $3/ca-cert.pem --load-ca-privkey $3/ca-key.pem --load-privkey $1-key.pem --template $1.info --outfile $1-cert.pem >/dev/null 2>&1
}
gen ca-key.pem
certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem >/dev/null 2>&1
gen server-key.pem
certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem --load-privkey server-key.pem --template server.info --outfile server-cert.pem >/dev/null 2>&1
cert client1 client1 .
cert client2 client2 .
mkdir -p x509-client x509-client2 x509-nocert rogue/ca rogue/dir
cp ca-cert.pem x509-client/; cp client1-cert.pem x509-client/client-cert.pem; cp client1-key.pem x509-client/client-key.pem
cp ca-cert.pem x509-client2/; cp client2-cert.pem x509-client2/client-cert.pem; cp client2-key.pem x509-client2/client-key.pem
cp ca-cert.pem x509-nocert/
(cd rogue/ca && gen ca-key.pem && certtool --generate-self-signed --load-privkey ca-key.pem --template ../../ca.info --outfile ca-cert.pem >/dev/null 2>&1)
(cd rogue && cert client1 client1 ca && cp ../ca-cert.pem dir/ && cp client1-cert.pem dir/client-cert.pem && cp client1-key.pem dir/client-key.pem)
"#;
    ok(Command::new("bash")
        .args(["-c", script, "mkcreds"])
        .arg(dir))?;
    Ok(())
}

/// Makes the credentials (see [`make_creds`]) and starts stord with
/// `tls = "MODE"`, the TLS keys `keys` (config key, file in the credentials
/// directory) and the `[[disk]]` tables `disks`.
fn tls_stord(mode: &str, keys: &[(&str, &str)], disks: &str) -> (tempfile::TempDir, Stord) {
    require_root();
    let creds = tempfile::tempdir().unwrap();
    make_creds(creds.path()).unwrap();
    let mut extra = format!("tls = \"{mode}\"\n");
    for (key, file) in keys {
        extra.push_str(&format!(
            "{key} = \"{}\"\n",
            creds.path().join(file).display()
        ));
    }
    extra.push_str(disks);
    let s = Stord::start_with(&std::env::temp_dir(), &extra, &[]).unwrap();
    (creds, s)
}

/// `stord status` as JSON.
fn status(s: &Stord) -> serde_json::Value {
    let out = s.cli(&["status"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn counter(s: &Stord, name: &str) -> u64 {
    status(s)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Runs `cmd`, which must fail; returns its stdout and stderr together.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{cmd:?} succeeded:\n{text}");
    text
}

fn nbdinfo(args: &[&str]) -> Command {
    let mut c = Command::new("nbdinfo");
    c.args(args);
    c
}

/// A 16 MiB file of random bytes.
fn random_image(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("src.img");
    sh(&format!("head -c 16M /dev/urandom > {}", p.display()))?;
    Ok(p)
}

/// nbdcopy `src` to `uri` and back, byte-compared.
fn nbdcopy_round_trip(src: &Path, uri: &str) -> Result<()> {
    ok(Command::new("nbdcopy").arg(src).arg(uri))?;
    let back = src.with_extension("back");
    ok(Command::new("nbdcopy").arg(uri).arg(&back))?;
    // The export is 64 MiB: compare the part written.
    ok(Command::new("cmp")
        .args(["-n", "16777216"])
        .arg(src)
        .arg(&back))?;
    Ok(())
}

/// qemu-img convert `src` into the export, compare it, then qemu-io patterns,
/// all through the TLS credentials object `object`.
fn qemu_round_trip(object: &str, opts: &str, src: &Path) -> Result<()> {
    ok(Command::new("qemu-img")
        .args(["convert", "-n", "--object", object, "-f", "raw"])
        .arg(src)
        .args(["--target-image-opts", opts]))?;
    // --image-opts covers both images: the file as one too.
    let out = ok(Command::new("qemu-img")
        .args(["compare", "--object", object, "--image-opts"])
        .arg(format!("driver=file,filename={}", src.display()))
        .arg(opts))?;
    // The export is larger than the file: qemu-img compare says whether the
    // rest reads as zeroes too, and identical either way.
    if !out.contains("identical") {
        bail!("qemu-img compare: {out}");
    }
    let out = ok(Command::new("qemu-io")
        .args(["--object", object, "--image-opts", opts])
        .args([
            "-c",
            "write -P 0x5c 32M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0x5c 32M 1M",
        ]))?;
    if out.contains("verification failed")
        || out.contains("failed:")
        || !out.contains("read 1048576")
    {
        bail!("qemu-io: {out}");
    }
    Ok(())
}

/// PSK under `tls = "require"`: libnbd and qemu clients work; a plain
/// client, a wrong key and an identity off a disk's `allow` list are refused
/// and counted; the honest client keeps working.
#[test]
fn psk_require_libnbd_qemu_and_refusals() {
    let (creds, s) = tls_stord(
        "require",
        &[("tls_psk_file", "keys.psk")],
        "[[disk]]\nname = \"data\"\nsize = \"64MiB\"\nalloc = \"dynamic\"\n\
         [[disk]]\nname = \"bobs\"\nsize = \"4MiB\"\nalloc = \"fixed\"\nallow = [\"bob\"]\n",
    );
    let c = creds.path();
    let port = s.port;
    let psk = |user: &str, export: &str, file: &str| {
        format!(
            "nbds://{user}@127.0.0.1:{port}/{export}?tls-psk-file={}",
            c.join(file).display()
        )
    };
    let alice = psk("alice", "data", "keys.psk");

    // libnbd: TLS negotiated, LIST shows only what alice may open.
    let out = ok(&mut nbdinfo(&[&alice])).unwrap();
    assert!(out.contains("with TLS"), "{out}");
    let list = ok(&mut nbdinfo(&["--list", &alice])).unwrap();
    assert!(
        list.contains("export=\"data\"") && !list.contains("bobs"),
        "{list}"
    );
    let list = ok(&mut nbdinfo(&["--list", &psk("bob", "data", "keys.psk")])).unwrap();
    assert!(list.contains("export=\"bobs\""), "{list}");
    let src = random_image(s.dir.path()).unwrap();
    nbdcopy_round_trip(&src, &alice).unwrap();

    // qemu-img / qemu-io through tls-creds-psk.
    let qobj = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
        c.join("psk-qemu").display()
    );
    let qopts = format!("driver=nbd,host=127.0.0.1,port={port},export=data,tls-creds=tls0");
    qemu_round_trip(&qobj, &qopts, &src).unwrap();
    let ok_before = counter(&s, "tls_handshakes_ok");
    assert!(ok_before >= 6, "{}", status(&s));

    // A plain client under require: every option gets ERR_TLS_REQD.
    let out = fails(&mut nbdinfo(&[
        "--size",
        &format!("nbd://127.0.0.1:{port}/data"),
    ]));
    assert!(out.contains("requires TLS"), "{out}");
    let out = fails(Command::new("qemu-img").args([
        "info",
        "-f",
        "raw",
        &format!("nbd://127.0.0.1:{port}/data"),
    ]));
    assert!(out.to_lowercase().contains("tls"), "{out}");
    assert_eq!(counter(&s, "tls_plain_refused"), 2, "{}", status(&s));

    // A wrong key: the TLS handshake fails.
    fails(&mut nbdinfo(&[
        "--size",
        &psk("alice", "data", "wrong.psk"),
    ]));
    let qwrong = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=alice",
        c.join("psk-wrong").display()
    );
    fails(Command::new("qemu-img").args(["info", "--object", &qwrong, "--image-opts", &qopts]));
    assert_eq!(counter(&s, "tls_handshakes_failed"), 2, "{}", status(&s));

    // alice is not on bobs' allow list; bob is.
    let out = fails(&mut nbdinfo(&["--size", &psk("alice", "bobs", "keys.psk")]));
    assert!(out.contains("policy"), "{out}");
    assert_eq!(counter(&s, "tls_allow_refused"), 1, "{}", status(&s));
    let size = ok(&mut nbdinfo(&["--size", &psk("bob", "bobs", "keys.psk")])).unwrap();
    assert_eq!(size.trim(), "4194304");
    // Over the unix socket TLS is optional, but bobs still needs bob over TLS.
    let unix = s.unix();
    let out = fails(&mut nbdinfo(&[
        "--size",
        &format!("nbd+unix:///bobs?socket={}", unix.display()),
    ]));
    assert!(out.contains("requires TLS"), "{out}");
    let size = ok(&mut nbdinfo(&[
        "--size",
        &format!(
            "nbds+unix://bob@/bobs?socket={}&tls-psk-file={}",
            unix.display(),
            c.join("keys.psk").display()
        ),
    ]))
    .unwrap();
    assert_eq!(size.trim(), "4194304");

    // The honest client still works, and its data is intact.
    ok(Command::new("nbdcopy")
        .arg(&alice)
        .arg(s.dir.path().join("again.img")))
    .unwrap();
    ok(Command::new("cmp")
        .args(["-n", "16777216"])
        .arg(&src)
        .arg(s.dir.path().join("again.img")))
    .unwrap();
    let st = status(&s);
    assert_eq!(st["tls_handshakes_failed"], 2, "{st}");
    assert_eq!(st["protocol_errors"], 0, "{st}");
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// X.509 under `require` with `tls_ca`: a client certificate from the CA is
/// required; clients without one, or with one from another CA, are refused;
/// `allow` matches the certificate's common name.
#[test]
fn x509_client_certificates_required_with_tls_ca() {
    let (creds, s) = tls_stord(
        "require",
        &[
            ("tls_cert", "server-cert.pem"),
            ("tls_key", "server-key.pem"),
            ("tls_ca", "ca-cert.pem"),
        ],
        "[[disk]]\nname = \"data\"\nsize = \"64MiB\"\nalloc = \"fixed\"\n\
         [[disk]]\nname = \"c1\"\nsize = \"1MiB\"\nalloc = \"dynamic\"\nallow = [\"client1\"]\n",
    );
    let c = creds.path();
    let port = s.port;
    let x509 = |export: &str, dir: &str| {
        format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            c.join(dir).display()
        )
    };
    let out = ok(&mut nbdinfo(&[&x509("data", "x509-client")])).unwrap();
    assert!(out.contains("with TLS"), "{out}");
    let src = random_image(s.dir.path()).unwrap();
    nbdcopy_round_trip(&src, &x509("data", "x509-client")).unwrap();
    let qobj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        c.join("x509-client").display()
    );
    let qopts = format!("driver=nbd,host=127.0.0.1,port={port},export=data,tls-creds=tls0");
    qemu_round_trip(&qobj, &qopts, &src).unwrap();

    // No client certificate; a certificate from another CA.
    fails(&mut nbdinfo(&["--size", &x509("data", "x509-nocert")]));
    fails(&mut nbdinfo(&["--size", &x509("data", "rogue/dir")]));
    let qnocert = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        c.join("x509-nocert").display()
    );
    fails(Command::new("qemu-img").args(["info", "--object", &qnocert, "--image-opts", &qopts]));
    assert_eq!(counter(&s, "tls_handshakes_failed"), 3, "{}", status(&s));

    // allow = ["client1"]: client2's certificate is valid but not listed.
    let size = ok(&mut nbdinfo(&["--size", &x509("c1", "x509-client")])).unwrap();
    assert_eq!(size.trim(), "1048576");
    let out = fails(&mut nbdinfo(&["--size", &x509("c1", "x509-client2")]));
    assert!(out.contains("policy"), "{out}");
    assert_eq!(counter(&s, "tls_allow_refused"), 1, "{}", status(&s));
    // client2 may open the open disk, and the plain client none.
    ok(&mut nbdinfo(&["--size", &x509("data", "x509-client2")])).unwrap();
    fails(&mut nbdinfo(&[
        "--size",
        &format!("nbd://127.0.0.1:{port}/data"),
    ]));
    assert_eq!(counter(&s, "tls_plain_refused"), 1, "{}", status(&s));

    // The honest client still reads what it wrote.
    ok(Command::new("qemu-io")
        .args(["--object", &qobj, "--image-opts", &qopts])
        .args(["-c", "read -P 0x5c 32M 1M"]))
    .unwrap();
    assert!(!s.log_text().contains("panicked"));
}

/// `tls = "on"` with a server certificate and no `tls_ca`: plain clients and
/// TLS clients without a certificate are both served.
#[test]
fn x509_tls_on_serves_plain_and_tls_clients() {
    let (creds, s) = tls_stord(
        "on",
        &[
            ("tls_cert", "server-cert.pem"),
            ("tls_key", "server-key.pem"),
        ],
        "[[disk]]\nname = \"data\"\nsize = \"8MiB\"\nalloc = \"dynamic\"\n",
    );
    let c = creds.path();
    let port = s.port;
    let plain = ok(&mut nbdinfo(&[&format!("nbd://127.0.0.1:{port}/data")])).unwrap();
    assert!(!plain.contains("with TLS"), "{plain}");
    let tls = ok(&mut nbdinfo(&[&format!(
        "nbds://127.0.0.1:{port}/data?tls-certificates={}",
        c.join("x509-nocert").display()
    )]))
    .unwrap();
    assert!(tls.contains("with TLS"), "{tls}");
    let st = status(&s);
    assert_eq!(st["tls_handshakes_ok"], 1, "{st}");
    assert_eq!(st["tls_plain_refused"], 0, "{st}");
}

/// Bad TLS configs stop stord with an error naming the key, the file and the
/// line.
#[test]
fn bad_tls_configs_are_refused_with_the_key_file_and_line() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let serve = |name: &str, extra: &str| {
        let cfg = d.join(name);
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ncontrol = \"{}\"\nstate_dir = \"{}\"\n{extra}",
                d.join(format!("{name}.sock")).display(),
                d.join("state").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin("stord"));
        cmd.args(["serve", "--config"]).arg(&cfg);
        run_failing(&mut cmd, 1)
    };
    let e = serve("nocreds.toml", "tls = \"require\"\n");
    assert!(e.contains("nocreds.toml") && e.contains("key `tls`"), "{e}");
    assert!(e.contains("tls_psk_file") && e.contains("tls_cert"), "{e}");

    let psk = d.join("bad.psk");
    std::fs::write(&psk, "alice:00112233\nbob=445566\n").unwrap();
    let e = serve(
        "badpsk.toml",
        &format!("tls = \"on\"\ntls_psk_file = \"{}\"\n", psk.display()),
    );
    assert!(
        e.contains("tls_psk_file") && e.contains("bad.psk line 2"),
        "{e}"
    );

    let e = serve(
        "missing.toml",
        &format!(
            "tls = \"on\"\ntls_psk_file = \"{}\"\n",
            d.join("absent.psk").display()
        ),
    );
    assert!(
        e.contains("absent.psk") && e.contains("No such file"),
        "{e}"
    );

    let notpem = d.join("notpem.pem");
    std::fs::write(&notpem, "hello\n").unwrap();
    let e = serve(
        "badcert.toml",
        &format!(
            "tls = \"on\"\ntls_cert = \"{0}\"\ntls_key = \"{0}\"\n",
            notpem.display()
        ),
    );
    assert!(
        e.contains("key `tls_cert`") && e.contains("notpem.pem"),
        "{e}"
    );
}

/// A hostile client speaking raw NBD: STARTTLS, then junk instead of a TLS
/// ClientHello; another that goes silent after STARTTLS; a third that tries
/// STARTTLS twice. The first is counted as a failed handshake and dropped, the
/// second holds only its own thread, and an honest PSK client is served
/// meanwhile.
#[test]
fn hostile_starttls_peers_are_dropped_and_counted() {
    let (creds, s) = tls_stord(
        "require",
        &[("tls_psk_file", "keys.psk")],
        "[[disk]]\nname = \"data\"\nsize = \"64MiB\"\nalloc = \"dynamic\"\n",
    );
    let c = creds.path();
    let port = s.port;
    // Raw fixed-newstyle client: greeting, then NBD_OPT_STARTTLS; prints the
    // reply type, then does what argv[2] says.
    let script = r#"
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
recv_exact(s, 18)
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
def option(o, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data)
    magic, opt, typ, ln = struct.unpack(">QIII", recv_exact(s, 20))
    recv_exact(s, ln)
    return typ
# Under require a plain option is refused with ERR_TLS_REQD (2^31 + 5).
print("list", hex(option(3)), flush=True)
print("starttls", hex(option(5)), flush=True)
if sys.argv[2] == "junk":
    s.sendall(b"\x16\x03\x01\x00\x10" + b"\xff" * 16 + b"GET / HTTP/1.0\r\n\r\n")
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
        print("closed", flush=True)
    except ConnectionResetError:
        print("closed", flush=True)
elif sys.argv[2] == "silent":
    time.sleep(30)
"#;
    let dir = s.dir.path();
    let silent = stord_common::spawn_python(
        dir,
        script,
        &[port.to_string(), "silent".into()],
        Stdio::null(),
    )
    .unwrap();
    let out = stord_common::python(dir, script, &[port.to_string(), "junk".into()]).unwrap();
    assert!(out.contains("list 0x80000005"), "{out}");
    assert!(out.contains("starttls 0x1\n"), "{out}");
    assert!(out.contains("closed"), "{out}");
    assert_eq!(counter(&s, "tls_handshakes_failed"), 1, "{}", status(&s));
    assert!(counter(&s, "tls_plain_refused") >= 1);

    // While the silent one still holds its connection: an honest client.
    let src = random_image(dir).unwrap();
    let uri = format!(
        "nbds://alice@127.0.0.1:{port}/data?tls-psk-file={}",
        c.join("keys.psk").display()
    );
    nbdcopy_round_trip(&src, &uri).unwrap();
    drop(silent);
    assert!(!s.log_text().contains("panicked"));
}

/// PSK and X.509 in one config, with `tls_ca`: PSK clients (TLS 1.3, and
/// TLS 1.2 through a qemu priority string) need no certificate, certificate
/// clients need one from the CA.
#[test]
fn psk_and_x509_together() {
    let (creds, s) = tls_stord(
        "require",
        &[
            ("tls_psk_file", "keys.psk"),
            ("tls_cert", "server-cert.pem"),
            ("tls_key", "server-key.pem"),
            ("tls_ca", "ca-cert.pem"),
        ],
        "[[disk]]\nname = \"data\"\nsize = \"8MiB\"\nalloc = \"dynamic\"\n",
    );
    let c = creds.path();
    let port = s.port;
    let size = ok(&mut nbdinfo(&[
        "--size",
        &format!(
            "nbds://alice@127.0.0.1:{port}/data?tls-psk-file={}",
            c.join("keys.psk").display()
        ),
    ]))
    .unwrap();
    assert_eq!(size.trim(), "8388608");
    let size = ok(&mut nbdinfo(&[
        "--size",
        &format!(
            "nbds://127.0.0.1:{port}/data?tls-certificates={}",
            c.join("x509-client").display()
        ),
    ]))
    .unwrap();
    assert_eq!(size.trim(), "8388608");
    let qopts = format!("driver=nbd,host=127.0.0.1,port={port},export=data,tls-creds=tls0");
    let tls12 = format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username=bob,priority=NORMAL:-VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK",
        c.join("psk-qemu").display()
    );
    let out = ok(Command::new("qemu-io")
        .args(["--object", &tls12, "--image-opts", &qopts])
        .args(["-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k"]))
    .unwrap();
    assert!(out.contains("read 65536/65536"), "{out}");
    fails(&mut nbdinfo(&[
        "--size",
        &format!(
            "nbds://127.0.0.1:{port}/data?tls-certificates={}",
            c.join("x509-nocert").display()
        ),
    ]));
    let st = status(&s);
    assert_eq!(st["tls_handshakes_ok"], 3, "{st}");
    assert_eq!(st["tls_handshakes_failed"], 1, "{st}");
}
