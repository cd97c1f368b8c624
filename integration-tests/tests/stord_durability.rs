//! stord's durability promises, end to end: a failed fdatasync is latched (a
//! later FLUSH is never acknowledged although data was lost), the catalog
//! survives a kill at any point of a create or delete, and a disk whose file
//! is gone is listed missing while the others serve.

mod stord_common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{require_root, wait_until, ChildGuard};
use stord_common::{dynamic, python, spawn_python, Rng, Stord};

fn list(s: &Stord) -> Vec<serde_json::Value> {
    let out = s.cli(&["disk", "list", "--json"]);
    assert!(out.status.success(), "{out:?}\n{}", s.log_text());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts that the table of `stord disk list` shows the disk `name` as `state`
/// (its last column: `failed`, `missing`).
fn assert_listed_as(s: &Stord, name: &str, state: &str) {
    let table = String::from_utf8(s.cli(&["disk", "list"]).stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) && l.ends_with(state)),
        "{table}"
    );
}

fn status(s: &Stord) -> serde_json::Value {
    let out = s.cli(&["status"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A FUSE file system (python3-fuse) passing through to `root`, whose fsync
/// fails with EIO while the file `fail` exists in the test's directory: a disk
/// whose writeback fails on demand.
const FAILING_FS: &str = r#"
import errno, os, sys, fuse
fuse.fuse_python_api = (0, 2)
ROOT = os.environ['FS_ROOT']
FAIL = os.environ['FS_FAIL']

def on_file(path, flags, op):
    """op(fd) on the file under ROOT, opened with flags for this call only."""
    fd = os.open(ROOT + path, flags)
    try:
        return op(fd)
    finally:
        os.close(fd)

class FS(fuse.Fuse):
    def getattr(self, path):
        return os.lstat(ROOT + path)
    def readdir(self, path, offset):
        for e in ['.', '..'] + os.listdir(ROOT + path):
            yield fuse.Direntry(e)
    def open(self, path, flags):
        return 0
    def read(self, path, size, offset):
        return on_file(path, os.O_RDONLY, lambda fd: os.pread(fd, size, offset))
    def write(self, path, buf, offset):
        return on_file(path, os.O_WRONLY, lambda fd: os.pwrite(fd, buf, offset))
    def truncate(self, path, size):
        os.truncate(ROOT + path, size)
    def chmod(self, path, mode):
        os.chmod(ROOT + path, mode)
    def fsync(self, path, datasync):
        if os.path.exists(FAIL):
            return -errno.EIO
        on_file(path, os.O_RDONLY, os.fsync)
        return 0
    def flush(self, path):
        return 0
    def release(self, path, flags):
        return 0

server = FS(dash_s_do='setsingle')
server.parse(args=[sys.argv[1], '-f'])
server.main()
"#;

/// The mounted FUSE file system; unmounted on drop.
struct FailingFs {
    mnt: PathBuf,
    _child: ChildGuard,
}

impl FailingFs {
    fn mount(dir: &Path) -> FailingFs {
        let root = dir.join("fs-root");
        let mnt = dir.join("fs-mnt");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let script = dir.join("failing_fs.py");
        std::fs::write(&script, FAILING_FS).unwrap();
        let child = ChildGuard::new(
            Command::new("/usr/bin/python3")
                .arg(&script)
                .arg(&mnt)
                .env("FS_ROOT", &root)
                .env("FS_FAIL", dir.join("fail"))
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mounted = wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .contains(mnt.to_str().unwrap())
        });
        assert!(mounted, "the FUSE file system did not mount");
        FailingFs { mnt, _child: child }
    }
}

impl Drop for FailingFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Once an fdatasync failed, every later FLUSH and FUA write on that disk
/// fails with EIO, also after the file system recovers (Linux would report
/// the lost writeback only once); `disk list` shows the disk failed, `status`
/// counts it, another disk keeps flushing, and a restart (reopen) clears it.
#[test]
fn failed_flush_is_latched() {
    require_root();
    let mut s = Stord::start(&[dynamic("bad", "4MiB"), dynamic("good", "4MiB")]).unwrap();
    s.kill();
    // Move bad's file onto the failing file system, behind a symlink.
    let fs = FailingFs::mount(s.dir.path());
    let img = s.state().join("disks/bad.img");
    let on_fs = fs.mnt.join("bad.img");
    // Into the backing directory: the file system passes it through.
    std::fs::copy(&img, s.dir.path().join("fs-root/bad.img")).unwrap();
    assert!(on_fs.exists());
    std::fs::remove_file(&img).unwrap();
    std::os::unix::fs::symlink(&on_fs, &img).unwrap();
    s.restart().unwrap();
    let fail = s.dir.path().join("fail");

    let client = r#"
import nbd, sys
bad = nbd.NBD(); bad.connect_uri(sys.argv[1])
good = nbd.NBD(); good.connect_uri(sys.argv[2])
def flush(h):
    try:
        h.flush(); return 'ok'
    except nbd.Error as e:
        return 'EIO' if e.errnum == 5 else 'errno %s' % e.errnum
def fua(h):
    try:
        h.pwrite(b'f' * 4096, 8192, nbd.CMD_FLAG_FUA); return 'ok'
    except nbd.Error as e:
        return 'EIO' if e.errnum == 5 else 'errno %s' % e.errnum
for line in sys.stdin:
    what = line.strip()
    if what == 'write':
        bad.pwrite(b'w' * 4096, 0); print('ok', flush=True)
    elif what == 'flush':
        print(flush(bad), flush=True)
    elif what == 'fua':
        print(fua(bad), flush=True)
    elif what == 'good':
        good.pwrite(b'g' * 4096, 0); print(flush(good), fua(good), flush=True)
"#;
    let mut c = spawn_python(
        s.dir.path(),
        client,
        &[s.uri("bad"), s.uri("good")],
        Stdio::inherit(),
    )
    .unwrap();
    let mut stdin = c.child().stdin.take().unwrap();
    let mut out = BufReader::new(c.child().stdout.take().unwrap());
    let mut ask = |what: &str| -> String {
        writeln!(stdin, "{what}").unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    assert_eq!(ask("write"), "ok");
    assert_eq!(ask("flush"), "ok", "flush before the failure");
    std::fs::write(&fail, b"").unwrap();
    assert_eq!(ask("write"), "ok");
    assert_eq!(ask("flush"), "EIO", "the failing fdatasync");
    std::fs::remove_file(&fail).unwrap();
    // The file system works again; the lost write is not forgotten.
    assert_eq!(ask("write"), "ok");
    assert_eq!(ask("flush"), "EIO", "a FLUSH after a lost writeback");
    assert_eq!(ask("fua"), "EIO", "a FUA write after a lost writeback");
    assert_eq!(ask("good"), "ok ok", "the other disk");
    let disks = list(&s);
    let bad = disks.iter().find(|d| d["name"] == "bad").unwrap();
    let good = disks.iter().find(|d| d["name"] == "good").unwrap();
    assert_eq!(bad["failed"], true, "{disks:?}");
    assert_eq!(good["failed"], false, "{disks:?}");
    assert_listed_as(&s, "bad", "failed");
    assert!(status(&s)["flush_failures"].as_u64().unwrap() >= 1);
    assert!(s.log_text().contains("flush failed"));
    drop(stdin);
    drop(c);

    // Reopened (restart): the disk flushes again.
    s.restart().unwrap();
    let out = python(
        s.dir.path(),
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b'x' * 512, 0); h.flush(); print('ok')\n",
        &[s.uri("bad")],
    )
    .unwrap();
    assert_eq!(out.trim(), "ok");
    s.kill();
}

/// 100 trials: creates and deletes run while stord is SIGKILLed at a random
/// moment; after each restart the catalog opens, no listed disk is missing,
/// and every listed disk serves (a libnbd read). Then a disk file removed by
/// hand is listed missing while the others serve, and can be deleted.
#[test]
fn catalog_survives_kills_and_missing_files() {
    require_root();
    let mut s = Stord::start(&[dynamic("base", "1MiB")]).unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    // One libnbd process checks the disks: a URI per line, "ok" or the error.
    let checker = r#"
import nbd, sys
for line in sys.stdin:
    try:
        h = nbd.NBD(); h.connect_uri(line.strip()); h.pread(512, 0); h.shutdown()
        print('ok', flush=True)
    except Exception as e:
        print('fail', e, flush=True)
"#;
    let mut chk = spawn_python(s.dir.path(), checker, &[] as &[&str], Stdio::inherit()).unwrap();
    let mut chk_in = chk.child().stdin.take().unwrap();
    let mut chk_out = BufReader::new(chk.child().stdout.take().unwrap());
    let t0 = Instant::now();
    let mut served = 0;
    for trial in 0..100u32 {
        // A create (fixed: fallocate and fsync) and a delete of an earlier
        // disk, in flight together, and the kill somewhere in them.
        let name = format!("t{trial}");
        let mut ops = vec![Command::new(integration_tests::bin("stord"))
            .args(["disk", "create", &name, "--size", "2MiB", "--alloc"])
            .arg(if trial % 2 == 0 { "fixed" } else { "dynamic" })
            .arg("--control")
            .arg(s.control())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()];
        let listed = list(&s);
        if listed.len() > 4 {
            let victim = listed[1 + (rng.next() as usize % (listed.len() - 1))]["name"]
                .as_str()
                .unwrap()
                .to_string();
            if victim != "base" {
                ops.push(
                    Command::new(integration_tests::bin("stord"))
                        .args(["disk", "delete", &victim, "--control"])
                        .arg(s.control())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
            }
        }
        std::thread::sleep(Duration::from_micros(rng.next() % 8000));
        s.kill();
        for mut op in ops {
            let _ = op.wait();
        }
        s.restart()
            .unwrap_or_else(|e| panic!("trial {trial} (seed {seed}): {e:#}"));
        for d in list(&s) {
            assert_eq!(d["missing"], false, "trial {trial} (seed {seed}): {d}");
            let disk = d["name"].as_str().unwrap();
            writeln!(chk_in, "{}", s.uri(disk)).unwrap();
            let mut l = String::new();
            chk_out.read_line(&mut l).unwrap();
            assert_eq!(l.trim(), "ok", "trial {trial} (seed {seed}): disk {disk}");
            served += 1;
        }
    }
    eprintln!(
        "100 kill trials in {:?}, {served} disk checks",
        t0.elapsed()
    );

    // A disk whose file is gone: listed missing, the others serve.
    let out = s.cli(&["disk", "create", "gone", "--size", "1MiB"]);
    assert!(out.status.success(), "{out:?}");
    s.kill();
    std::fs::remove_file(s.state().join("disks/gone.img")).unwrap();
    s.restart().unwrap();
    let disks = list(&s);
    let gone = disks.iter().find(|d| d["name"] == "gone").unwrap();
    assert_eq!(gone["missing"], true, "{disks:?}");
    for d in disks.iter().filter(|d| d["name"] != "gone") {
        assert_eq!(d["missing"], false);
        writeln!(chk_in, "{}", s.uri(d["name"].as_str().unwrap())).unwrap();
        let mut l = String::new();
        chk_out.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), "ok", "{d}");
    }
    writeln!(chk_in, "{}", s.uri("gone")).unwrap();
    let mut l = String::new();
    chk_out.read_line(&mut l).unwrap();
    assert!(l.starts_with("fail"), "a missing disk was served: {l}");
    assert_listed_as(&s, "gone", "missing");
    // A missing disk is not recreated empty under the same name, and can be
    // deleted.
    let out = s.cli(&["disk", "create", "gone", "--size", "1MiB"]);
    assert!(!out.status.success());
    let out = s.cli(&["disk", "delete", "gone"]);
    assert!(out.status.success(), "{out:?}");
    s.restart().unwrap();
    assert!(list(&s).iter().all(|d| d["name"] != "gone"));
}
