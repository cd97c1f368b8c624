//! The counting guests of the control API, snapshot and migration tests, and the
//! helpers that drive a VM through its API and read what the guest counted.
//!
//! [`counter`] prints 1, 2, 3... on the serial port, one number a line, about every
//! 10 ms; [`counter_program`] makes a variant that, before printing each number, also
//! dirties a working set of guest memory (one word per page) and/or writes the
//! number to its disk (sector `n mod 2048`, first 8 bytes), so that a snapshot or a
//! migration must carry memory, disk and vCPU state over for the count to go on.
//! [`counter_net_program`] also sends each number in a frame through its NIC (the
//! device after the disk, if any): see [`COUNT_ETHERTYPE`] and [`frame_counts`].
//! [`counter_busy_program`] rewrites its working set and prints without waiting.

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

/// The ethertype of the counter's frames (IEEE 802 local experimental 1): the count,
/// big endian, in the first 8 bytes of the payload.
pub const COUNT_ETHERTYPE: u16 = 0x88b5;
/// The ethertype of the frame the counter sends when its NIC asks it to announce
/// itself (VIRTIO_NET_S_ANNOUNCE), before it acks on the control queue: the count it
/// was at, as in a count frame.
pub const ANNOUNCE_ETHERTYPE: u16 = 0x88b6;

/// The NIC part of a counter with a NIC at `base` (its MAC `mac`): set-up code, and
/// the code run for each number (r12) before it is printed. With `every`, each number
/// goes in a frame and the guest acks VIRTIO_NET_F_GUEST_ANNOUNCE (and announces
/// itself when asked); without, only the first number goes and nothing else is
/// acked (a guest that says nothing after a move).
fn nic_code(base: u64, mac: [u8; 6], every: bool) -> (String, String) {
    let mac = mac.map(|b| format!("{b:#04x}")).join(",");
    // MAC | STATUS | CTRL_VQ | GUEST_ANNOUNCE, or MAC alone.
    let features = if every { 0x23_0020 } else { 0x20 };
    let up = format!(
        r#"
    .set NIC, {base:#x}
    .set NRX, 0x300000
    .set NTX, 0x310000
    .set NCTL, 0x320000
    .set NFRAME, 0x330000
    .set NANN, 0x331000
    .set NCMD, 0x334000
    .set NACK, 0x334100
    push %rbx
    mov $NIC, %rbx
    cmpl $1, 0x8(%rbx)          # device id: net
    je 5f
    FAIL 'd'
5:  mov ${features:#x}, %r8d
    call dev_init
    SETUP_QUEUE 0, NRX
    SETUP_QUEUE 1, NTX
    SETUP_QUEUE 2, NCTL
    call driver_ok
    pop %rbx
    lea countframe(%rip), %rsi
    mov $NFRAME, %rdi
    mov $72, %ecx
    rep movsb
    lea countframe(%rip), %rsi
    mov $NANN, %rdi
    mov $72, %ecx
    rep movsb
    movb $0xb6, NANN+12+13
    DSET NTX, 0, NFRAME, 72, 0, 0
    DSET NTX, 1, NANN, 72, 0, 0
    DSET NCTL, 0, NCMD, 2, F_NEXT, 1
    DSET NCTL, 1, NACK, 1, F_WRITE, 0
    xor %r15d, %r15d            # frames sent (the TX avail index)
    jmp 6f
countframe:
    .fill 12, 1, 0              # virtio_net_hdr_v1
    .byte 0xff,0xff,0xff,0xff,0xff,0xff
    .byte {mac}
    .byte 0x88,0xb5
    .fill 46, 1, 0
    # nic_send head: queue TX chain `head` (the frame there has the count at r12).
    .macro NIC_SEND head
    mov %r15, %rax
    and $7, %eax
    movw $\head, NTX+0x1000+4(,%rax,2)
    lea 1(%r15), %eax
    movw %ax, NTX+0x1000+2
    mov $NIC, %rax
    movl $1, 0x50(%rax)
    inc %r15
    .endm
6:
"#
    );
    if !every {
        let once = r#"
    mov %r12, %rax
    bswap %rax
    mov %rax, NFRAME+26
    cmp $1, %r12
    jne 6f
    NIC_SEND 0
6:
"#;
        return (up, once.to_string());
    }
    let each = r#"
    mov %r12, %rax
    bswap %rax
    mov %rax, NFRAME+26
    mov $NIC, %rax
    testw $2, 0x106(%rax)       # status: VIRTIO_NET_S_ANNOUNCE
    jz 6f
    mov %r12, %rax
    bswap %rax
    mov %rax, NANN+26
    NIC_SEND 1
    movw $0x0003, NCMD          # VIRTIO_NET_CTRL_ANNOUNCE, _ACK
    movb $0xff, NACK
    movzwl NCTL+0x1000+2, %eax
    mov %eax, %edx
    and $7, %edx
    movw $0, NCTL+0x1000+4(,%rdx,2)
    inc %eax
    movw %ax, NCTL+0x1000+2
    mov $NIC, %rax
    movl $2, 0x50(%rax)
    cmpb $0, NACK
    je 6f
    FAIL 'a'
6:  NIC_SEND 0
"#
    .to_string();
    (up, each)
}

/// The main loop of a counter that, for each number, first writes it into one word of each of
/// `wset_pages` pages from [`WSET`] (0: none) and, with `disk`, to sector
/// `n mod 2048` of the first device (a disk), and with `nic` sends it in a frame
/// (see [`nic_code`]); then waits about 10 ms before the next, or, with `busy`
/// (TSC ticks), goes on at once but waits that long after each page (from that
/// page on, so a vCPU that was slowed down does not catch up).
fn counter_with(
    wset_pages: u32,
    disk: bool,
    nic: Option<([u8; 6], bool)>,
    busy: Option<u32>,
) -> String {
    let (delay, spin) = match busy {
        None => ("DELAY 20000000".to_string(), String::new()),
        Some(n) => (
            String::new(),
            format!(
                r#"rdtsc
    shl $32, %rdx
    or %rax, %rdx
    lea {n}(%rdx), %r9
3:  rdtsc
    shl $32, %rdx
    or %rax, %rdx
    cmp %r9, %rdx
    jb 3b"#
            ),
        ),
    };
    let base = 0xd000_0000u64 + if disk { 0x1000 } else { 0 };
    let (nic_up, nic_send) = nic
        .map(|(m, every)| nic_code(base, m, every))
        .unwrap_or_default();
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
    {nic_up}
    xor %r12d, %r12d
count:
    inc %r12
    mov ${WSET}, %rdi
    mov ${wset_pages}, %ecx
    test %ecx, %ecx
    jz 2f
1:  mov %r12, (%rdi)
    add $4096, %rdi
    {spin}
    loop 1b
2:  {disk_write}
    {nic_send}
    call show
    {delay}
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
    format!("{}{SHOW}", counter_with(wset_pages, disk, None, None))
}

/// [`counter_program`] with a NIC (MAC `mac`) that each number is also sent
/// through, in a broadcast frame of [`COUNT_ETHERTYPE`].
pub fn counter_net_program(wset_pages: u32, disk: bool, mac: [u8; 6]) -> String {
    format!(
        "{}{SHOW}",
        counter_with(wset_pages, disk, Some((mac, true)), None)
    )
}

/// The plain counter with a NIC (MAC `mac`) that sends only its first number in a
/// frame and then nothing (nor does it ack the announce features).
pub fn counter_quiet_net_program(mac: [u8; 6]) -> String {
    format!("{}{SHOW}", counter_with(0, false, Some((mac, false)), None))
}

/// [`counter_program`] without the wait: it rewrites its working set of
/// `wset_pages`, spinning `spin` loops after each page (work that takes vCPU time,
/// so that a slowed-down vCPU dirties less), and prints the next number, over and
/// over, as fast as its vCPU runs (a guest whose dirty set a migration round always
/// finds full again, unless the vCPU is slowed down).
pub fn counter_busy_program(wset_pages: u32, spin: u32) -> String {
    format!(
        "{}{SHOW}",
        counter_with(wset_pages, false, None, Some(spin))
    )
}

/// One frame from the guest's MAC that a capture saw: its ethertype and, for the
/// counter's frames, the count it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The ethertype.
    pub ethertype: u16,
    /// The count (0 for frames of other types).
    pub count: u64,
}

/// The frames from `mac` in a capture written by `tshark -T fields -e eth.src -e
/// eth.type -e data.data -E separator=,` (one line each, in order).
pub fn frames_from(capture: &str, mac: &str) -> Vec<Seen> {
    capture
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split(',');
            let (src, ty, data) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            if !src.eq_ignore_ascii_case(mac) {
                return None;
            }
            let ethertype = u16::from_str_radix(ty.trim_start_matches("0x"), 16).ok()?;
            let hex: String = data.chars().filter(|c| c.is_ascii_hexdigit()).collect();
            let count = hex.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok());
            Some(Seen {
                ethertype,
                count: count.unwrap_or(0),
            })
        })
        .collect()
}

/// The counts of the counter's frames among `seen`.
pub fn frame_counts(seen: &[Seen]) -> Vec<u64> {
    seen.iter()
        .filter(|s| s.ethertype == COUNT_ETHERTYPE)
        .map(|s| s.count)
        .collect()
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

/// The device `name` (`net0`, `blk0`...) of `GET /vm` on the API socket `sock`.
pub fn device(sock: &Path, name: &str) -> Value {
    let (_, v) = curl(sock, "GET", "/vm", None);
    v["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no device {name} in {v}"))
}

/// Asserts a move of a counter that acks the announce, seen `before` (only count
/// frames) and `after` (see [`assert_announced_and_counting`], five RARPs, and the
/// guest's own announce once), whose counts cover every number `printed`. Returns
/// all the counts.
pub fn assert_moved_and_announced(before: &[Seen], after: &[Seen], printed: &[u64]) -> Vec<u64> {
    let counting = before.iter().all(|s| s.ethertype == COUNT_ETHERTYPE);
    assert!(counting, "{before:?}");
    let all = assert_announced_and_counting(before, after, 5);
    assert!(all.len() >= printed.len(), "{all:?} {printed:?}");
    // The guest was asked, announced itself once and acked.
    let asked = after
        .iter()
        .filter(|s| s.ethertype == ANNOUNCE_ETHERTYPE)
        .count();
    assert_eq!(asked, 1, "{after:?}");
    all
}

/// Asserts what a capture on the side a VM moved to saw from its MAC: RARP first
/// (before any frame of the guest's), `rarps` of them in all, at most one announce
/// of the guest's own; and that the counter's frames seen `before` the move and
/// there go on with no gap and no repeat. Returns all the counts.
pub fn assert_announced_and_counting(before: &[Seen], after: &[Seen], rarps: usize) -> Vec<u64> {
    assert_eq!(
        after.first().map(|s| s.ethertype),
        Some(0x8035),
        "RARP first: {after:?}"
    );
    let n = after.iter().filter(|s| s.ethertype == 0x8035).count();
    assert_eq!(n, rarps, "RARP announces: {after:?}");
    let (a, b) = (frame_counts(before), frame_counts(after));
    assert!(!a.is_empty() && !b.is_empty(), "{before:?} {after:?}");
    let all = [a, b].concat();
    assert_consecutive(&all);
    all
}
