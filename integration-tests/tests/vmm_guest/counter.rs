//! The counting guests of the control API, snapshot and migration tests, and the
//! helpers that drive a VM through its API and read what the guest counted.
//!
//! [`counter`] prints 1, 2, 3... on the serial port, one number a line, about every
//! 10 ms; [`counter_program`] makes a variant that, before printing each number, also
//! dirties a working set of guest memory (one word per page) and/or writes the
//! number to its disk (sector `n mod 2048`, first 8 bytes), so that a snapshot or a
//! migration must carry memory, disk and vCPU state over for the count to go on.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{run, wait_until};
use serde_json::Value;

/// The counter's printing routine: r12 in decimal and a newline.
const SHOW: &str = r#"
show:
    mov %r12, %rax
    lea numend(%rip), %rdi
    mov $10, %r8
1:  xor %edx, %edx
    div %r8
    add $'0', %dl
    dec %rdi
    mov %dl, (%rdi)
    test %rax, %rax
    jnz 1b
    mov %rdi, %rsi
    call print
    ret
numbuf: .fill 24, 1, 0
numend: .asciz "\n"
"#;

/// Guest address of the working set [`counter_with`] dirties.
pub const WSET: u64 = 0x200_0000;

/// The main loop of a counter that, for each number, first writes it into one word of each of
/// `wset_pages` pages from [`WSET`] (0: none) and, with `disk`, to sector
/// `n mod 2048` of the first device (a disk).
fn counter_with(wset_pages: u32, disk: bool) -> String {
    let disk_up = if disk {
        "DISK0_UP\n    xor %r13d, %r13d"
    } else {
        ""
    };
    let disk_write = if disk {
        r#"
    mov %r12, DATA
    mov %r12, %rcx
    and $2047, %rcx
    BLK_HDR 1, %rcx
    REQ3 RING, HDR, DATA, 512, STATUS
    KICK_NEXT RING, %r13, 0
    inc %r13
1:  cmpw %r13w, RING+0x2000+2
    je 2f
    pause
    jmp 1b
2:  EXPECT_STATUS STATUS, 0, 'w'"#
    } else {
        ""
    };
    format!(
        r#"
_start:
    {disk_up}
    xor %r12d, %r12d
count:
    inc %r12
    mov ${WSET}, %rdi
    mov ${wset_pages}, %ecx
    test %ecx, %ecx
    jz 2f
1:  mov %r12, (%rdi)
    add $4096, %rdi
    loop 1b
2:  {disk_write}
    call show
    DELAY 20000000
    jmp count
"#
    )
}

/// The plain counter: prints 1, 2, 3... on the serial port, one number a line,
/// about every 10 ms.
pub fn counter() -> String {
    counter_program(0, false)
}

/// The full program of [`counter_with`].
pub fn counter_program(wset_pages: u32, disk: bool) -> String {
    format!("{}{SHOW}", counter_with(wset_pages, disk))
}

/// `curl --unix-socket SOCK -X METHOD [-d BODY] http://localhost/PATH`: the status
/// code and the JSON body.
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    c.arg(format!("http://localhost{path}"));
    let out = run(&mut c).expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.trim_end().rsplit_once('\n').expect("curl -w code");
    let v = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    (code.parse().expect("status code"), v)
}

/// `vmm-shim ctl --api-sock SOCK ARGS...`: exit status and standard output (then
/// standard error).
pub fn ctl(sock: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(integration_tests::bin("vmm-shim"))
        .arg("ctl")
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .expect("vmm-shim ctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The numbers the guest printed so far (complete lines only).
pub fn counts(console: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let done = text.rfind('\n').map_or("", |i| &text[..i]);
    done.lines()
        .map(|l| l.parse().unwrap_or_else(|_| panic!("serial line {l:?}")))
        .collect()
}

/// Waits until the guest has printed more than `n` numbers.
pub fn wait_count(console: &Path, n: usize) -> Vec<u64> {
    assert!(
        wait_until(Duration::from_secs(20), || counts(console).len() > n),
        "the guest stopped counting at {:?}",
        counts(console).last()
    );
    counts(console)
}

/// 1, 2, 3, ... with no gap and no repeat.
pub fn assert_consecutive(c: &[u64]) {
    for (i, n) in c.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "gap or repeat at line {i}: {c:?}");
    }
}

/// Asserts that sector `n mod 2048` of the disk image `bytes` starts with `n` for
/// every `n` printed (the disk counter writes before it prints).
pub fn assert_disk_counts(bytes: &[u8], printed: &[u64]) {
    // Only the last 2048 numbers can still be on the disk.
    let from = printed.len().saturating_sub(2048);
    for &n in &printed[from..] {
        let at = ((n % 2048) * 512) as usize;
        let got = bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        assert_eq!(got, Some(n), "sector {} should hold {n}", n % 2048);
    }
}
