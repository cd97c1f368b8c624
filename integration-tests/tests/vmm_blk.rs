//! vmm-shim's virtio-blk over real NBD servers (stord, and qemu-nbd), under the real
//! KVM: a guest program writes a sector and reads it back through the device; the test
//! then checks the bytes in the disk file. Also: a read-only export is offered read-only and a write
//! to it fails with IOERR; SIGTERM stops the VM and closes NBD cleanly.

mod stord_common;
mod vmm_guest;

use std::time::Duration;

use vmm_guest::{
    assert_sector_pattern, kill_server, make_disk, qemu_nbd, run_kernel, run_with_disk, setup,
    setup_with_disk, LiveVm,
};

/// Sector the guest writes.
const SECTOR: u64 = 77;
/// The 16-byte pattern the guest repeats over the sector.
const PATTERN: &[u8; 16] = b"vmm-shim-blk-ok!";

/// Guest: init virtio-blk at MMIO0, write sector 77 with the pattern, read it back,
/// compare; checks the RO feature bit against `expect_ro` (then expects IOERR on write).
fn blk_guest(expect_ro: bool) -> String {
    format!(
        r#"
_start:
    mov $MMIO0, %rbx
    cmpl $2, 0x8(%rbx)          # device id: block
    je 1f
    FAIL 'd'
1:  movl $0, 0x14(%rbx)
    movl 0x10(%rbx), %eax       # device features, low word
    shr $5, %eax                # VIRTIO_BLK_F_RO
    and $1, %eax
    cmp ${ro}, %eax
    je 1f
    FAIL 'r'
1:  BLK_UP 0, RING
    # capacity (config offset 0x100) must be 2048 sectors (1 MiB)
    cmpq $2048, 0x100(%rbx)
    je 1f
    FAIL 'c'
1:  FILL16 DATA, pattern, 32
    # OUT request: header, data, status
    BLK_HDR 1, ${sector}
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_USED RING, 1, '1'
    EXPECT_STATUS STATUS, {want_write_status}, '2'
    # IN request into RDATA
    READ1 RING, HDR, RDATA, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, '3'
    EXPECT_STATUS STATUS, 0, '4'
    cmpl $513, RING+0x2000+4+8+4    # used len of the read: 512 data + status
    je 1f
    FAIL '6'
1:  .if {ro} == 0
    EXPECT_SAME DATA, RDATA, 512, '5'
    .endif
    FLUSH 2, 3
    EXPECT_STATUS STATUS, {want_flush}, '7'
    PASS "BLK OK\n"
pattern: .ascii "{pattern}"
"#,
        ro = expect_ro as u8,
        sector = SECTOR,
        pattern = std::str::from_utf8(PATTERN).unwrap(),
        want_write_status = if expect_ro { 1 } else { 0 },
        want_flush = 0,
    )
}

#[test]
fn guest_writes_and_reads_a_sector_through_nbd_tcp() {
    let (_dir, elf, nbd) = setup_with_disk("blk", &blk_guest(false));
    run_with_disk(&elf, &nbd.uri("d")).assert_clean_exit("BLK OK\n");
    let bytes = std::fs::read(&nbd.img).unwrap();
    assert_sector_pattern(&bytes, SECTOR, PATTERN);
    assert!(bytes[..(SECTOR * 512) as usize].iter().all(|&b| b == 0));
}

#[test]
fn unix_socket_export_and_read_only_export() {
    let (dir, elf) = setup("blkro", &blk_guest(true));
    let img = make_disk(dir.path());
    let sock = dir.path().join("nbd.sock");
    let _nbd = qemu_nbd(&img, "ro0", None, Some(&sock), true);
    let disk = format!("nbd+unix:///ro0?socket={}", sock.display());
    run_with_disk(&elf, &disk).assert_clean_exit("BLK OK\n");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn forced_read_only_flag_on_a_writable_export() {
    let (_dir, elf, nbd) = setup_with_disk("blkro2", &blk_guest(true));
    run_with_disk(&elf, &nbd.uri("d,ro")).assert_clean_exit("BLK OK\n");
    assert!(std::fs::read(&nbd.img).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn missing_export_is_a_clear_error() {
    let (_dir, elf, nbd) = setup_with_disk("x", "_start: jmp reboot\n");
    let disk = nbd.uri("nope");
    run_kernel(&[], &elf, &["--disk", &disk], Duration::from_secs(60))
        .assert_exit(1, "refused export \"nope\"");
}

#[test]
fn sigterm_stops_the_guest_and_closes_nbd() {
    let (_dir, elf, nbd) =
        setup_with_disk("spin", "_start: PRINT m\n1: jmp 1b\nm: .asciz \"up\\n\"\n");
    // A guest that spins forever (in ring 0, so vmm-shim must kick it out of KVM_RUN).
    let disk = nbd.uri("d");
    let mut cmd =
        vmm_guest::vmm_command(&[], &["--kernel", elf.to_str().unwrap(), "--disk", &disk]);
    cmd.env("VMM_LOG", "info");
    let vm = LiveVm::spawn(cmd).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let r = vm.stop(Duration::from_secs(10));
    r.assert_exit(0, "disk closing");
    assert!(!r.stderr.contains("NBD close failed"), "{r}");
}

#[test]
fn guest_writes_and_reads_a_sector_through_stord() {
    let (_dir, elf) = setup("blk", &blk_guest(false));
    let stord = stord_common::Stord::start(&[stord_common::dynamic("vm0", "1M")]).unwrap();
    for (round, disk) in [stord.uri("vm0"), stord.unix_uri("vm0")].iter().enumerate() {
        let r = run_with_disk(&elf, disk);
        assert_eq!(r.serial, "BLK OK\n", "round {round}: {r}");
        r.assert_clean_exit("BLK OK\n");
    }
    // vmm-shim flushed before it disconnected: the bytes are in stord's disk file.
    let bytes = std::fs::read(stord.state().join("disks/vm0.img")).unwrap();
    assert_sector_pattern(&bytes, SECTOR, PATTERN);
}

/// Guest: write the pattern to sectors 10..13, then DISCARD sector 10 and
/// WRITE_ZEROES sector 11 (one segment each); sector 12 stays.
const TRIM_GUEST: &str = r#"
    .set SEG, 0x206000
    .set FEATURES, (1 << 13) | (1 << 14)    # DISCARD, WRITE_ZEROES
_start:
    mov $MMIO0, %rbx
    movl $0, 0x14(%rbx)
    movl 0x10(%rbx), %eax
    and $FEATURES, %eax                 # both offered
    cmp $FEATURES, %eax
    je 1f
    FAIL 'f'
1:  BLK_UP FEATURES, RING
    mov $DATA, %rdi
    mov $0x5a, %al
    mov $1536, %ecx
    rep stosb
    movl $1, HDR
    movq $10, HDR+8
    REQ3 RING, HDR, DATA, 1536, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_STATUS STATUS, 0, 'w'
    # DISCARD sector 10
    movl $11, HDR
    movq $10, SEG
    movl $1, SEG+8
    movl $0, SEG+12
    DSET RING, 1, SEG, 16, F_NEXT, 2
    movb $0xff, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_STATUS STATUS, 0, 'd'
    # WRITE_ZEROES sector 11, no unmap
    movl $13, HDR
    movq $11, SEG
    movb $0xff, STATUS
    SUBMIT RING, 2, 0, 3
    EXPECT_STATUS STATUS, 0, 'z'
    PASS "TRIM OK\n"
"#;

#[test]
fn discard_and_write_zeroes_reach_stord() {
    let (_dir, elf) = setup("trim", TRIM_GUEST);
    let stord = stord_common::Stord::start(&[stord_common::dynamic("t0", "1M")]).unwrap();
    run_with_disk(&elf, &stord.uri("t0")).assert_clean_exit("TRIM OK\n");
    let bytes = std::fs::read(stord.state().join("disks/t0.img")).unwrap();
    assert!(
        bytes[10 * 512..12 * 512].iter().all(|&b| b == 0),
        "sectors 10-11 zeroed"
    );
    assert!(
        bytes[12 * 512..13 * 512].iter().all(|&b| b == 0x5a),
        "sector 12 kept"
    );
}

/// Guest: one good write, then waits for a byte on the console; by then the test has
/// killed the NBD server, and the next read must come back as IOERR (not a crash).
const IOERR_GUEST: &str = r#"
_start:
    DISK0_UP
    movl $1, HDR
    movq $1, HDR+8
    REQ3 RING, HDR, DATA, 512, STATUS
    SUBMIT RING, 0, 0, 1
    EXPECT_STATUS STATUS, 0, 'w'
    PRINT w1
    WAIT_CONSOLE
    READ1 RING, HDR, DATA, STATUS
    SUBMIT RING, 1, 0, 2
    EXPECT_USED RING, 2, 'u'
    EXPECT_STATUS STATUS, 1, 'e'
    PASS "IOERR OK\n"
w1: .asciz "W1\n"
"#;

#[test]
fn nbd_server_death_is_an_io_error_for_the_guest() {
    let (_dir, elf, mut nbd) = setup_with_disk("ioerr", IOERR_GUEST);
    let disk = nbd.uri("d");
    let mut vm = LiveVm::guest(&[], &elf, &["--disk", &disk]);
    vm.expect_line("W1\n");
    kill_server(&mut nbd.nbd, "qemu-nbd");
    vm.send(b"x");
    let r = vm.finish(Duration::from_secs(30));
    r.assert_clean_exit("IOERR OK\n");
    assert!(r.stderr.contains("block backend failed"), "{r}");
}
