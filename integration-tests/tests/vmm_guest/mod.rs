//! Small guest programs for the vmm-shim tests, in GNU `as` syntax, assembled and
//! linked by the test (binutils) into a static ELF that vmm-shim loads like a vmlinux.
//!
//! The guest starts as the Linux 64-bit boot protocol leaves a kernel: long mode,
//! ring 0, the first 4 GiB identity-mapped, `rsi` = zero page. The prelude gives it a
//! serial `print`, a `fail` that prints `FAIL <code>` and triple-faults (vmm-shim exits
//! non-zero), `reboot` (i8042 0xfe: vmm-shim exits 0) and virtio-mmio driver helpers:
//! `dev_init` (reset, ACK, DRIVER, VERSION_1 + the features in r8d, FEATURES_OK),
//! `setup_queue` (queue edi, edx entries, rings at esi, esi+0x1000, esi+0x2000) and
//! `driver_ok`, and for a guest with one disk a fixed layout (RING, HDR, DATA, STATUS,
//! RDATA) with request macros (`DISK0_UP`, `BLK_HDR`, `REQ3`, `READ1`, `FLUSH`,
//! `SUBMIT`) and waits (`WAIT_CONSOLE`, `DELAY`). Device windows start at 0xd0000000,
//! 4 KiB apart: disks, then NICs.
//! A disk completes requests on its own thread, so `SUBMIT` waits for the used index
//! (`WAIT_USED`) before the guest looks at the result.

#![allow(dead_code)]

pub mod capture;
pub mod counter;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Assembly shared by every guest (put before the test's own code): the serial
/// output macro the bench guests share (`serial.S`), then the macros and routines
/// (`prelude.S`, which the block bench guest shares).
pub const PRELUDE: &str = concat!(include_str!("serial.S"), include_str!("prelude.S"));

/// Assembles `src` (plus the prelude) into a static ELF in `dir`; returns its path.
pub fn assemble(dir: &Path, name: &str, src: &str) -> Result<PathBuf> {
    assemble_with(dir, name, src, &[])
}

/// Like [`assemble`], with extra `ld` arguments (e.g. `--section-start=.ap=0x10000`).
pub fn assemble_with(dir: &Path, name: &str, src: &str, ld_args: &[&str]) -> Result<PathBuf> {
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let text = format!("    .code64\n    .globl _start\n    .text\n{PRELUDE}\n{src}\n");
    std::fs::write(&s, text)?;
    binutils(Command::new("as").args(["--64", "-o"]).arg(&o).arg(&s))?;
    binutils(
        Command::new("ld")
            .args(["-nostdlib", "-static", "-Ttext=0x1000000", "-e", "_start"])
            .args(ld_args)
            .arg("-o")
            .arg(&elf)
            .arg(&o),
    )?;
    Ok(elf)
}

/// Runs a binutils program (`as`, `ld`); fails with its stderr unless it succeeds.
fn binutils(cmd: &mut Command) -> Result<()> {
    let what = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .with_context(|| format!("running `{what}` (binutils)"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// What most vmm tests start with: root checked (KVM), a temporary directory, and
/// in it the guest program `src` assembled as `name` (see [`assemble`]); returns the
/// directory and the ELF's path.
pub fn setup(name: &str, src: &str) -> (tempfile::TempDir, PathBuf) {
    integration_tests::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let elf = assemble(dir.path(), name, src).expect("assemble the guest");
    (dir, elf)
}

/// What the vmm tests with one disk start with: [`setup`], and in the directory a
/// zeroed image exported by qemu-nbd as `d` (see [`TcpDisk`]).
pub fn setup_with_disk(name: &str, src: &str) -> (tempfile::TempDir, PathBuf, TcpDisk) {
    let (dir, elf) = setup(name, src);
    let disk = TcpDisk::new(dir.path(), "d");
    (dir, elf, disk)
}

/// [`setup_with_disk`], then the guest run to its end (a minute at most) on that
/// disk with vmm-shim logging at info, so that its counters are in the run's
/// stderr: the directory, the disk and the run.
pub fn run_on_disk(name: &str, src: &str) -> (tempfile::TempDir, TcpDisk, VmRun) {
    let (dir, elf, nbd) = setup_with_disk(name, src);
    let r = LiveVm::guest_logged(&elf, &["--disk", &nbd.uri("d")]).finish(Duration::from_secs(60));
    (dir, nbd, r)
}

/// Result of one vmm-shim run.
pub struct VmRun {
    /// Exit code (None if killed by a signal or timed out).
    pub code: Option<i32>,
    /// Whether vmm-shim was still running at the timeout (and was killed).
    pub timed_out: bool,
    /// Guest serial output.
    pub serial: String,
    /// vmm-shim's stderr.
    pub stderr: String,
}

impl VmRun {
    /// Asserts that the guest printed exactly `serial` and vmm-shim exited 0.
    pub fn assert_clean_exit(&self, serial: &str) {
        assert!(!self.timed_out, "vmm-shim did not exit in time: {self}");
        assert_eq!(self.serial, serial, "{self}");
        assert_eq!(self.code, Some(0), "{self}");
    }

    /// Asserts that vmm-shim exited with `code` and its stderr contains `needle`.
    pub fn assert_exit(&self, code: i32, needle: &str) {
        assert!(!self.timed_out, "vmm-shim did not exit in time: {self}");
        assert_eq!(self.code, Some(code), "{self}");
        assert!(
            self.stderr.contains(needle),
            "{needle:?} missing from stderr: {self}"
        );
    }
}

impl std::fmt::Display for VmRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?}, serial {:?}, stderr: {}",
            self.code, self.serial, self.stderr
        )
    }
}

/// The command line of vmm-shim with `args`, prefixed by `prefix` (e.g.
/// `ip netns exec NS`), its standard streams piped.
pub fn vmm_command(prefix: &[&str], args: &[&str]) -> Command {
    let bin = integration_tests::bin("vmm-shim");
    let mut cmd = if let Some((first, rest)) = prefix.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Runs vmm-shim with `args` (prefixed by `prefix`, e.g. `ip netns exec NS`), killing
/// it after `timeout`.
pub fn run_vmm(prefix: &[&str], args: &[&str], timeout: Duration) -> Result<VmRun> {
    let mut cmd = vmm_command(prefix, args);
    cmd.stdin(std::process::Stdio::null());
    Ok(LiveVm::spawn(cmd)?.finish(timeout))
}

/// Runs `kernel` under vmm-shim with `extra` arguments (see [`run_vmm`]).
pub fn run_kernel(prefix: &[&str], kernel: &Path, extra: &[&str], timeout: Duration) -> VmRun {
    let mut args = vec!["--kernel", kernel.to_str().expect("UTF-8 kernel path")];
    args.extend_from_slice(extra);
    run_vmm(prefix, &args, timeout).expect("run vmm-shim")
}

/// vmm-shim's arguments for the guest program `elf` with 64 MiB of RAM, then `extra`.
fn guest_args<'a>(elf: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let elf = elf.to_str().expect("UTF-8 kernel path");
    [&["--kernel", elf, "--mem", "64M"], extra].concat()
}

/// Runs the guest program `elf` with 64 MiB of RAM and `extra` arguments.
pub fn run_guest(prefix: &[&str], elf: &Path, extra: &[&str], timeout: Duration) -> VmRun {
    run_vmm(prefix, &guest_args(elf, extra), timeout).expect("run vmm-shim")
}

/// Runs the guest program `elf` (64 MiB of RAM) with `disk` as its only disk, for a
/// minute at most.
pub fn run_with_disk(elf: &Path, disk: &str) -> VmRun {
    run_guest(&[], elf, &["--disk", disk], Duration::from_secs(60))
}

/// Asserts that `sector` of the disk image `bytes` holds 32 copies of `pattern`, as
/// the guests that write a pattern (`FILL16 DATA, pattern, 32`) leave it.
pub fn assert_sector_pattern(bytes: &[u8], sector: u64, pattern: &[u8; 16]) {
    let at = (sector * 512) as usize;
    assert_eq!(&bytes[at..at + 512], pattern.repeat(32).as_slice());
}

/// Kills the server `server` (SIGKILL) under a running guest and waits for it to be
/// gone, so that the guest's next request meets a dead server.
pub fn kill_server(server: &mut integration_tests::ChildGuard, what: &str) {
    server.signal(libc::SIGKILL);
    server
        .wait_timeout(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{what} still running after SIGKILL"));
}

/// A vmm-shim process the test talks to while it runs: reads the guest's serial
/// line by line, writes console input, signals it; killed on drop.
pub struct LiveVm {
    guard: integration_tests::ChildGuard,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl LiveVm {
    /// Spawns `cmd` (from [`vmm_command`]; stdout must be piped).
    pub fn spawn(mut cmd: Command) -> Result<LiveVm> {
        let child = cmd.spawn().context("spawn vmm-shim")?;
        let mut guard = integration_tests::ChildGuard::new(child);
        let stdout = guard
            .child()
            .stdout
            .take()
            .context("vmm-shim stdout piped")?;
        Ok(LiveVm {
            guard,
            out: std::io::BufReader::new(stdout),
        })
    }

    /// Spawns the guest program `elf` with 64 MiB of RAM and `extra` arguments.
    pub fn guest(prefix: &[&str], elf: &Path, extra: &[&str]) -> LiveVm {
        LiveVm::spawn(vmm_command(prefix, &guest_args(elf, extra))).expect("spawn vmm-shim")
    }

    /// Like [`LiveVm::guest`], with vmm-shim logging at info (`VMM_LOG`): the
    /// counters it logs on exit are in its stderr.
    pub fn guest_logged(elf: &Path, extra: &[&str]) -> LiveVm {
        let mut cmd = vmm_command(&[], &guest_args(elf, extra));
        cmd.env("VMM_LOG", "info");
        LiveVm::spawn(cmd).expect("spawn vmm-shim")
    }

    /// vmm-shim's pid.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Asserts that the next line of the guest's serial output is `want` (with `\n`).
    pub fn expect_line(&mut self, want: &str) {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read vmm-shim stdout");
        assert_eq!(line, want, "unexpected serial line from the guest");
    }

    /// The next line of the guest's serial output (with its `\n`).
    pub fn read_line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read vmm-shim stdout");
        line
    }

    /// Writes `bytes` to the guest's console input.
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.guard
            .child()
            .stdin
            .as_mut()
            .expect("vmm-shim stdin piped")
            .write_all(bytes)
            .expect("write vmm-shim stdin");
    }

    /// Kills vmm-shim (SIGKILL: no flush, no clean-up) and waits for it to be gone.
    pub fn kill(mut self) {
        self.guard.signal(libc::SIGKILL);
        assert!(
            self.guard.wait_timeout(Duration::from_secs(10)).is_some(),
            "vmm-shim still running after SIGKILL"
        );
    }

    /// Sends SIGTERM, then [`LiveVm::finish`]es.
    pub fn stop(self, timeout: Duration) -> VmRun {
        self.guard.signal(libc::SIGTERM);
        self.finish(timeout)
    }

    /// Waits up to `timeout` for vmm-shim to exit (killing it then), and returns its
    /// exit code, the rest of the serial output and its stderr.
    pub fn finish(mut self, timeout: Duration) -> VmRun {
        use std::io::Read;
        let status = self.guard.wait_timeout(timeout);
        if status.is_none() {
            self.guard.signal(libc::SIGKILL);
        }
        let mut serial = String::new();
        let _ = self.out.read_to_string(&mut serial);
        let mut stderr = String::new();
        if let Some(e) = self.guard.child().stderr.as_mut() {
            let _ = e.read_to_string(&mut stderr);
        }
        VmRun {
            code: status.and_then(|s| s.code()),
            timed_out: status.is_none(),
            serial,
            stderr,
        }
    }
}

/// Writes a zeroed 1 MiB disk image `disk.img` in `dir`.
pub fn make_disk(dir: &Path) -> PathBuf {
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    img
}

/// A zeroed 1 MiB disk image in a test's directory, exported read-write by qemu-nbd
/// on a free TCP port of 127.0.0.1 (stopped on drop).
pub struct TcpDisk {
    /// The image file.
    pub img: PathBuf,
    /// qemu-nbd's port.
    pub port: u16,
    /// qemu-nbd.
    pub nbd: integration_tests::ChildGuard,
}

impl TcpDisk {
    /// Makes the image in `dir` and exports it as `export`.
    pub fn new(dir: &Path, export: &str) -> TcpDisk {
        let img = make_disk(dir);
        let port = integration_tests::free_port();
        let nbd = qemu_nbd(&img, export, Some(port), None, false);
        TcpDisk { img, port, nbd }
    }

    /// The `nbd://` URI of the export `name` (with any `,option` vmm-shim takes).
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }
}

/// Starts qemu-nbd on a TCP port (or a unix socket) for `img`.
pub fn qemu_nbd(
    img: &Path,
    export: &str,
    port: Option<u16>,
    sock: Option<&Path>,
    ro: bool,
) -> integration_tests::ChildGuard {
    let mut c = Command::new("qemu-nbd");
    c.args([
        "-f",
        "raw",
        "-x",
        export,
        "-t",
        "--cache=none",
        "--aio=threads",
    ]);
    if ro {
        c.arg("-r");
    }
    match (port, sock) {
        (Some(p), _) => {
            c.args(["-b", "127.0.0.1", "-p", &p.to_string()]);
        }
        (None, Some(s)) => {
            c.arg("-k").arg(s);
        }
        _ => unreachable!(),
    }
    c.arg(img);
    let g = integration_tests::ChildGuard::new(
        c.spawn().expect("qemu-nbd (qemu-utils) must be installed"),
    );
    let ready = integration_tests::wait_until(Duration::from_secs(10), || match (port, sock) {
        (Some(p), _) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
        (_, Some(s)) => std::os::unix::net::UnixStream::connect(s).is_ok(),
        _ => false,
    });
    assert!(ready, "qemu-nbd did not start");
    g
}

/// A guest that drives virtio-net (the first device): posts four RX buffers, sends an
/// ARP request from `src` (MAC 52:54:00:12:34:56) for `dst` (resent about every second,
/// 20 times at most), and prints `NET OK` once an ARP reply from `dst` arrives; other
/// frames (IPv6 chatter of the peer...) are skipped and their buffers reposted.
pub fn arp_guest(src: [u8; 4], dst: [u8; 4]) -> String {
    let ip = |a: [u8; 4]| format!("{},{},{},{}", a[0], a[1], a[2], a[3]);
    format!(
        r#"
    .set RX, 0x200000
    .set TX, 0x210000
    .set BUFS, 0x220000
_start:
    mov $MMIO0, %rbx
    cmpl $1, 0x8(%rbx)          # device id: net
    je 1f
    FAIL 'd'
1:  NET_UP 0, RX, TX
    # four 2 KiB receive buffers
    DSET RX, 0, BUFS, 2048, F_WRITE, 0
    DSET RX, 1, BUFS+0x800, 2048, F_WRITE, 0
    DSET RX, 2, BUFS+0x1000, 2048, F_WRITE, 0
    DSET RX, 3, BUFS+0x1800, 2048, F_WRITE, 0
    movw $0, RX+0x1000+4
    movw $1, RX+0x1000+6
    movw $2, RX+0x1000+8
    movw $3, RX+0x1000+10
    movw $4, RX+0x1000+2
    mov $4, %r13d               # avail index of the RX ring
    movl $0, 0x50(%rbx)
    # send the ARP request (vnet header + frame, one descriptor), again every ~second
    # until a reply comes (a switch port may come up a little after the guest)
    DSET TX, 0, arpreq, arpreq_end-arpreq, 0, 0
    xor %r12d, %r12d            # next used RX entry to look at
    xor %r14d, %r14d            # requests sent
send:
    KICK_NEXT TX, %r14, 1
    inc %r14d
    cmpw %r14w, TX+0x2000+2
    je wait
    FAIL 't'
wait:
    mov $200000, %ecx
2:  movzwl RX+0x2000+2, %eax
    cmp %r12d, %eax
    jne got
    pause
    loop 2b
    cmp $20, %r14d
    jb send
    FAIL 'w'
got:
    mov %r12d, %eax
    and $7, %eax
    movl RX+0x2000+4(,%rax,8), %eax     # used id = buffer index
    and $3, %eax
    mov %eax, %r15d
    shl $11, %eax
    add $BUFS, %eax
    cmpw $0x0608, 24(%rax)              # ethertype ARP (big endian 0x0806)
    jne next
    cmpw $0x0200, 32(%rax)              # op = reply
    jne next
    cmpl ${dst_le}, 40(%rax)            # sender IP = the address we asked for
    jne next
    PASS "NET OK\n"
next:                                   # not ours: give the buffer back, look again
    mov %r13d, %eax
    and $7, %eax
    movw %r15w, RX+0x1000+4(,%rax,2)
    inc %r13d
    movw %r13w, RX+0x1000+2
    movl $0, 0x50(%rbx)
    inc %r12d
    cmp $64, %r12d
    jb wait
    FAIL 'n'

arpreq:
    .fill 12, 1, 0                       # virtio_net_hdr_v1
    .byte 0xff,0xff,0xff,0xff,0xff,0xff
    .byte 0x52,0x54,0x00,0x12,0x34,0x56
    .byte 0x08,0x06
    .byte 0x00,0x01, 0x08,0x00, 6, 4, 0x00,0x01
    .byte 0x52,0x54,0x00,0x12,0x34,0x56
    .byte {src}
    .byte 0,0,0,0,0,0
    .byte {dst}
arpreq_end:
"#,
        src = ip(src),
        dst = ip(dst),
        dst_le = u32::from_le_bytes(dst),
    )
}
