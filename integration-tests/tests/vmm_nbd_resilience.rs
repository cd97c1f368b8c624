//! vmm-shim's NBD client and virtio-mmio transport against hostile or failing peers,
//! under the real KVM with small guest programs (see `vmm_guest`):
//! - the NBD server (qemu-nbd) is killed and restarted under a guest that keeps
//!   writing: with `reconnect_delay` the guest sees a stall, no I/O error, and every
//!   acknowledged write is in the image afterwards; the vCPU keeps running meanwhile
//!   (the disk's I/O thread waits, not the vCPU);
//! - a server that answers a READ short (a tiny python NBD server) gives the guest an
//!   I/O error, not zeros, and the next read on the same connection works;
//! - a guest that re-programs an active device's queue, writes features after
//!   FEATURES_OK, skips status steps, uses indirect descriptors or a looping chain is
//!   refused and counted, and its good requests are still served;
//! - a guest flooding the serial port is rate limited and the drops counted.

mod vmm_guest;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_guest::{kill_server, qemu_nbd, run_on_disk, setup, setup_with_disk, LiveVm};

/// `name=N` from vmm-shim's log, e.g. `reconnects=1`.
fn counter(stderr: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    let at = stderr.rfind(&key)? + key.len();
    let digits: String = stderr[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Sectors the writing guest writes (sector k holds 512 bytes of k + 1).
const SECTORS: u32 = 64;

/// Guest: writes sectors 0..SECTORS, one request each, failing on any status but OK.
/// After sector 15 it prints `HALF` and waits for a console byte (the test kills the
/// server meanwhile and restarts it a little later), then goes on.
fn writer_guest() -> String {
    format!(
        r#"
_start:
    DISK0_UP
    REQ3 RING, HDR, DATA, 512, STATUS
    xor %r12d, %r12d
next:
    lea 1(%r12), %eax
    mov $DATA, %rdi
    mov $512, %ecx
    rep stosb
    BLK_HDR 1, %r12
    KICK_NEXT RING, %r12, 0
    lea 1(%r12), %eax
    # wait for the used index, printing a dot now and then: the vCPU keeps running
    # while the disk waits for its server
    mov $0x20000000, %ecx
4:  cmpw %ax, RING+0x2000+2
    je 1f
    pause
    test $0xfffff, %ecx
    jnz 5f
    push %rax
    push %rdx
    mov $0x3f8, %dx
    mov $0x2e, %al
    out %al, %dx
    pop %rdx
    pop %rax
5:  dec %ecx
    jnz 4b
    FAIL 'u'
1:  EXPECT_STATUS STATUS, 0, 'e'
    cmp $15, %r12d
    jne 3f
    PRINT half
    WAIT_CONSOLE
3:  inc %r12d
    cmp ${SECTORS}, %r12d
    jb next
    PASS "WRITES OK\n"
half: .asciz "HALF\n"
"#
    )
}

#[test]
fn server_restart_under_a_writing_guest_is_a_stall_not_an_error() {
    let (_dir, elf, mut nbd) = setup_with_disk("vnr-writer", &writer_guest());
    let disk = format!("{},reconnect_delay=30", nbd.uri("d"));
    let mut vm = LiveVm::guest_logged(&elf, &["--disk", &disk]);
    let half = vm.read_line();
    assert!(half.ends_with("HALF\n"), "{half:?}");
    kill_server(&mut nbd.nbd, "qemu-nbd");
    // The guest's next write meets a dead server and waits for the new one.
    vm.send(b"x");
    std::thread::sleep(Duration::from_millis(1500));
    let _restarted = qemu_nbd(&nbd.img, "d", Some(nbd.port), None, false);
    let r = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{r}");
    // The guest ran on (printing dots) while its write waited for the new server:
    // the vCPU is not the thread that waits.
    let dots = r
        .serial
        .strip_suffix("WRITES OK\n")
        .unwrap_or_else(|| panic!("{r}"));
    // A dot is 2^20 pause loops (milliseconds); the stall lasted 1.5 s at least.
    assert!(dots.len() >= 10 && dots.bytes().all(|b| b == b'.'), "{r}");
    assert!(!r.stderr.contains("KVM_IOEVENTFD failed"), "{r}");
    assert_eq!(counter(&r.stderr, "reconnects"), Some(1), "{r}");
    assert_eq!(counter(&r.stderr, "io_errors"), Some(0), "{r}");
    let bytes = std::fs::read(&nbd.img).unwrap();
    for k in 0..SECTORS as usize {
        let s = &bytes[k * 512..(k + 1) * 512];
        assert!(s.iter().all(|&b| b == k as u8 + 1), "sector {k} lost");
    }
}

#[test]
fn without_reconnect_delay_a_dead_server_fails_the_write() {
    // The control: the same guest and the same restart, no reconnect_delay. The
    // write that meets the dead server fails (the guest prints FAIL e).
    let (_dir, elf, mut nbd) = setup_with_disk("vnr-writer0", &writer_guest());
    let disk = nbd.uri("d");
    let mut vm = LiveVm::guest_logged(&elf, &["--disk", &disk]);
    let half = vm.read_line();
    assert!(half.ends_with("HALF\n"), "{half:?}");
    kill_server(&mut nbd.nbd, "qemu-nbd");
    vm.send(b"x");
    let r = vm.finish(Duration::from_secs(60));
    assert!(r.serial.ends_with("FAIL e\n"), "{r}");
}

/// The sector the lying server answers short.
const SHORT_SECTOR: u64 = 8;

/// Guest: reads SHORT_SECTOR (answered short: must be IOERR), then sector 9 (answered
/// in full with 0x5a: must be OK with the data), then prints `SHORT OK`.
fn short_read_guest() -> String {
    format!(
        r#"
_start:
    DISK0_UP
    REQ3 RING, HDR, DATA, 512, STATUS
    movq ${SHORT_SECTOR}, HDR+8
    READ1 RING, HDR, DATA, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, 'u'
    EXPECT_STATUS STATUS, 1, 's'
    movq ${next}, HDR+8
    movb $0xff, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, 'v'
    EXPECT_STATUS STATUS, 0, 'f'
    cmpb $0x5a, DATA+511
    je 1f
    FAIL 'd'
1:  PASS "SHORT OK\n"
"#,
        next = SHORT_SECTOR + 1
    )
}

#[test]
fn a_short_read_reply_is_an_io_error_not_zeros() {
    let (dir, elf) = setup("vnr-short", &short_read_guest());
    let script = dir.path().join("short_read_server.py");
    std::fs::write(&script, include_str!("vmm_nbd_common/short_read_server.py")).unwrap();
    let port = integration_tests::free_port();
    let mut server = integration_tests::ChildGuard::new(
        Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(SHORT_SECTOR.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.child().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let disk = format!("nbd://127.0.0.1:{port}/x");
    let r = LiveVm::guest_logged(&elf, &["--disk", &disk]).finish(Duration::from_secs(60));
    r.assert_clean_exit("SHORT OK\n");
    assert_eq!(counter(&r.stderr, "short_reads"), Some(1), "{r}");
    assert_eq!(counter(&r.stderr, "io_errors"), Some(1), "{r}");
    assert!(r.stderr.contains("answered a READ short"), "{r}");
}

/// Guest: brings the disk up, then tries what the transport must refuse while the
/// device is active (clearing DRIVER_OK, moving the descriptor table out of RAM,
/// un-readying the queue, changing features), a well-formed request behind an
/// indirect descriptor and a looping chain; a good write must still work. Then a reset
/// and DRIVER_OK before FEATURES_OK (refused), a proper set-up and a good write.
const HOSTILE_MMIO_GUEST: &str = r#"
    .set IND, 0x207000
    .set F_INDIRECT, 4
_start:
    DISK0_UP
    movl $1, HDR
    movq $3, HDR+8
    PUT8 DATA, 0x6b6f2d7473726966         # "first-ok"
    # refused: status without DRIVER_OK, then queue registers and features
    movl $11, 0x70(%rbx)
    movl $0, 0x30(%rbx)
    movl $0x7fff0000, 0x80(%rbx)
    movl $0, 0x44(%rbx)
    movl $0, 0x24(%rbx)
    movl $0xffffffff, 0x20(%rbx)
    cmpl $15, 0x70(%rbx)
    je 1f
    FAIL 's'
1:  # indirect: a good 3-descriptor table, behind an INDIRECT descriptor
    movq $HDR, IND
    movl $16, IND+8
    movw $F_NEXT, IND+12
    movw $1, IND+14
    movq $DATA, IND+16
    movl $512, IND+24
    movw $F_NEXT, IND+28
    movw $2, IND+30
    movq $STATUS, IND+32
    movl $1, IND+40
    movw $F_WRITE, IND+44
    movb $0xff, STATUS
    DSET RING, 0, IND, 48, F_INDIRECT, 0
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, 'i'
    EXPECT_STATUS STATUS, 0xff, 'j'
    # a chain that loops: 0 -> 1 -> 0
    DSET RING, 0, HDR, 16, F_NEXT, 1
    DSET RING, 1, DATA, 512, F_NEXT, 0
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, 'l'
    # the device still serves the ring where it was set up
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 2, 0, 3
    EXPECT_USED RING, 3, 'g'
    EXPECT_STATUS STATUS, 0, 'h'
    # reset; DRIVER_OK straight after DRIVER: refused
    movl $0, 0x70(%rbx)
    movl $3, 0x70(%rbx)
    movl $7, 0x70(%rbx)
    cmpl $3, 0x70(%rbx)
    je 1f
    FAIL 'o'
1:  BLK_UP 0, RING
    movq $4, HDR+8
    movb $0xff, STATUS
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, 'k'
    EXPECT_STATUS STATUS, 0, 'm'
    PASS "MMIO OK\n"
"#;

#[test]
fn hostile_mmio_sequences_and_indirect_chains_are_refused_and_counted() {
    let (_dir, nbd, r) = run_on_disk("vnr-mmio", HOSTILE_MMIO_GUEST);
    r.assert_clean_exit("MMIO OK\n");
    // Status 11, desc address, queue ready, features; DRIVER_OK before FEATURES_OK.
    assert_eq!(counter(&r.stderr, "refused_mmio"), Some(5), "{r}");
    // The indirect chain and the loop.
    assert_eq!(counter(&r.stderr, "bad_chains"), Some(2), "{r}");
    let bytes = std::fs::read(&nbd.img).unwrap();
    assert_eq!(&bytes[3 * 512..3 * 512 + 8], b"first-ok");
    assert_eq!(&bytes[4 * 512..4 * 512 + 8], b"first-ok");
}

/// Bytes the flooding guest writes to the UART.
const FLOOD: u64 = 512 << 10;

/// Guest: writes FLOOD bytes of 'x' to the UART as fast as it can, then writes a
/// sector through the disk (the VM still works), waits about two seconds (rdtsc: the
/// rate limit refills) and prints `\nFLOOD DONE`.
fn flood_guest() -> String {
    format!(
        r#"
_start:
    DISK0_UP
    mov $0x3f8, %dx
    mov $0x78, %al
    mov ${FLOOD}, %rcx
1:  out %al, %dx
    dec %rcx
    jnz 1b
    BLK_HDR 1, $5
    PUT8 DATA, 0x6b6f2d646f6f6c66         # "flood-ok"
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, 'u'
    EXPECT_STATUS STATUS, 0, 'w'
    DELAY 6000000000
    PASS "\nFLOOD DONE\n"
"#
    )
}

#[test]
fn a_serial_flood_is_rate_limited_and_counted() {
    let (dir, elf, nbd) = setup_with_disk("vnr-flood", &flood_guest());
    let disk = nbd.uri("d");
    // To a file: a pipe nobody reads until the end would block the vCPU instead.
    let console = dir.path().join("console.log");
    let started = Instant::now();
    let r = LiveVm::guest_logged(
        &elf,
        &["--disk", &disk, "--console", console.to_str().unwrap()],
    )
    .finish(Duration::from_secs(120));
    let elapsed = started.elapsed().as_secs_f64();
    let serial = std::fs::read(&console).unwrap();
    assert!(!r.timed_out && r.code == Some(0), "{r}");
    assert!(
        serial.ends_with(b"\nFLOOD DONE\n"),
        "{} bytes",
        serial.len()
    );
    let xs = serial.iter().filter(|&&b| b == b'x').count() as u64;
    // The burst (128 KiB) plus 16 KiB per second at most.
    let allowed = (128 << 10) as f64 + (16 << 10) as f64 * elapsed;
    assert!((xs as f64) <= allowed, "{xs} bytes in {elapsed:.1} s");
    let dropped = counter(&r.stderr, "serial_dropped").expect("serial_dropped logged");
    assert_eq!(dropped + xs, FLOOD, "{}", &r.stderr);
    assert!(dropped > 0);
    eprintln!("flood: {xs} bytes shown, {dropped} dropped, {elapsed:.1} s");
    let bytes = std::fs::read(&nbd.img).unwrap();
    assert_eq!(&bytes[5 * 512..5 * 512 + 8], b"flood-ok");
}
