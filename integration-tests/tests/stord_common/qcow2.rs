//! Helpers of the qcow2 tests (`stord_qcow2*.rs`): stord's CLI, QEMU's
//! tools as the judge (`qemu-img check`, `compare`, `info`), local
//! reference images made by QEMU, and patching images into hostile ones.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::{ok, Stord};
use integration_tests::ChildGuard;

/// A 64 MiB raw base with data at the start and at 32 MiB.
pub fn base_file(dir: &Path) -> PathBuf {
    let p = dir.join("base.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&vec![0x11; 8 << 20], 0).unwrap();
    f.write_all_at(&vec![0x22; 4 << 20], 32 << 20).unwrap();
    f.sync_all().unwrap();
    p
}

/// Runs `stord disk ARGS`; its stdout, or the error with stderr.
pub fn disk(s: &Stord, args: &[&str]) -> Result<String> {
    let mut a = vec!["disk"];
    a.extend_from_slice(args);
    let out = s.cli(&a);
    if !out.status.success() {
        anyhow::bail!(
            "stord {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `stord disk ARGS` for a change refused while clients are attached: tried
/// again while the last client's connection is still being closed.
pub fn disk_idle(s: &Stord, args: &[&str]) {
    let mut last = None;
    let done = integration_tests::wait_until(Duration::from_secs(10), || match disk(s, args) {
        Ok(_) => true,
        Err(e) if e.to_string().contains("open connection") => false,
        Err(e) => {
            last = Some(e);
            true
        }
    });
    assert!(done && last.is_none(), "{args:?}: {last:?}");
}

/// qemu-io, read-only, on an NBD export: its output, whatever the status.
pub fn qemu_io_ro(uri: &str, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", cmd, uri])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `stord disk ARGS` that must fail; its stderr.
pub fn refused(s: &Stord, args: &[&str]) -> String {
    let mut a = vec!["disk"];
    a.extend_from_slice(args);
    let out = s.cli(&a);
    assert!(!out.status.success(), "stord {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// qemu-io on a local image file (QEMU's own qcow2 driver).
pub fn qemu_io_local(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = ok(c.arg(img)).unwrap();
    assert!(!out.contains("failed"), "{out}");
}

/// A local qcow2 reference overlay on `base` (format `fmt`).
pub fn reference(dir: &Path, name: &str, base: &Path, fmt: &str) -> PathBuf {
    let p = dir.join(name);
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(base)
        .arg(&p))
    .unwrap();
    p
}

/// `qemu-img check` must find no errors and no leaks.
pub fn check_clean(img: &Path, share: bool) {
    let mut c = Command::new("qemu-img");
    c.arg("check");
    if share {
        c.arg("-U");
    }
    let out = c.arg(img).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}",
        img.display()
    );
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
}

/// `qemu-img compare` of two images (formats given) must say identical.
pub fn same(a: &str, fa: &str, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", fa, "-F", "qcow2", a])
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compare {a} {}: {}{}",
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sha(p: &Path) -> String {
    ok(Command::new("sha256sum").arg(p)).unwrap()[..64].to_string()
}

/// Stops stord with SIGTERM (its final flush) and waits for it.
pub fn stop(s: &mut Stord) {
    if let Some(mut g) = s.child.take() {
        g.signal(libc::SIGTERM);
        assert!(
            g.wait_timeout(Duration::from_secs(20)).is_some(),
            "stord did not stop"
        );
    }
}

pub fn info_chain(img: &Path) -> String {
    ok(Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain"])
        .arg(img))
    .unwrap()
}

/// The L2 table offset of guest cluster 0 of a qcow2 file.
pub fn l2_of(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    let be = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    be(be(40) as usize) & 0x00ff_ffff_ffff_fe00
}

pub fn patch(p: &Path, at: u64, v: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(v, at).unwrap();
}

pub fn qcow2_with_data(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("8M"))
    .unwrap();
    qemu_io_local(&p, &["write -P 0x61 0 192k"]);
    p
}

/// A client holding an NBD connection to `uri` open (see
/// [`super::holder`]), once it is up; closed on drop.
pub fn attached(uri: &str) -> ChildGuard {
    let mut held = super::holder(uri);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.child().stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    held
}

/// A raw base ([`base_file`]) imported as `golden`, and `vm`, a linked
/// clone of it; the base's path.
pub fn golden_and_clone(s: &Stord, work: &Path) -> PathBuf {
    let base = base_file(work);
    disk(s, &["import", "golden", "--from", base.to_str().unwrap()]).unwrap();
    disk(s, &["clone", "golden", "vm"]).unwrap();
    base
}
