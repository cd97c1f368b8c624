//! Hostile guests: a guest program feeds vmm-shim's virtio-blk malformed descriptor
//! chains (buffers outside RAM, loops, bad next indexes, missing or read-only status
//! bytes, readable-after-writable, a broken indirect table), out-of-range and unknown
//! requests, and a bogus avail index. vmm-shim must answer each with an error the guest
//! sees, count the bad chains, keep running, and serve good requests after a reset.

mod vmm_guest;

use vmm_guest::run_on_disk;

const GUEST: &str = r#"
    .set USED, RING+0x2000
    .set IND, 0x207000
    .set F_INDIRECT, 4

    # KICK n: publish head 0 in slot n-1 with avail idx n, notify, expect used idx n.
    .macro KICK n, head=0
    SUBMIT RING, (\n-1), \head, \n
    EXPECT_USED RING, \n, 'k'
    .endm
    # ULEN n, len: used entry n-1 has this length.
    .macro ULEN n, len
    cmpl $\len, USED+4+8*(\n-1)+4
    je 1f
    FAIL 'l'
1:
    .endm

_start:
    DISK0_UP
    movl $1, HDR                          # OUT
    movq $0, HDR+8

    # 1: header buffer outside guest RAM
    DSET RING, 0, 0x7fff0000, 16, F_NEXT, 1
    DSET RING, 1, STATUS, 1, F_WRITE, 0
    KICK 1
    ULEN 1, 0
    # 2: a descriptor that points at itself
    DSET RING, 0, HDR, 16, F_NEXT, 0
    KICK 2
    # 3: next index past the table
    DSET RING, 0, HDR, 16, F_NEXT, 200
    KICK 3
    # 4: no writable status byte at all
    DSET RING, 0, HDR, 16, F_NEXT, 1
    DSET RING, 1, DATA, 512, 0, 0
    KICK 4
    ULEN 4, 0
    # 5: readable data after the writable status
    DSET RING, 0, HDR, 16, F_NEXT, 1
    DSET RING, 1, STATUS, 1, F_WRITE|F_NEXT, 2
    DSET RING, 2, DATA, 512, 0, 0
    KICK 5
    # 6: indirect table whose length is not a multiple of 16
    DSET RING, 0, IND, 20, F_INDIRECT, 0
    KICK 6
    # 7: well formed, but past the end of the disk: IOERR, not a bad chain
    movq $999999, HDR+8
    movb $0xff, STATUS
    REQ3 RING, HDR, DATA, 512, STATUS
    KICK 7
    EXPECT_STATUS STATUS, 1, '7'
    # 8: unknown request type: UNSUPP
    movl $99, HDR
    movb $0xff, STATUS
    KICK 8
    EXPECT_STATUS STATUS, 2, '8'
    # 9: avail index far ahead of the ring: the device must not loop or crash
    movw $200, RING+0x1000+2
    movl $0, 0x50(%rbx)
    # the disk's I/O thread sees it after the kick returns: give it a moment
    # (about 0.1 to 0.5 s of TSC) before the reset below
    DELAY 1000000000
    # recover: reset and set the device up again, then a good write
    BLK_UP 0, RING
    movl $1, HDR
    movq $3, HDR+8
    movb $0xff, STATUS
    PUT8 DATA, 0x6b6f2d7473726966         # "first-ok"
    REQ3 RING, HDR, DATA, 512, STATUS
    KICK 1
    EXPECT_STATUS STATUS, 0, '9'
    PASS "HOSTILE OK\n"
"#;

#[test]
fn malformed_chains_are_answered_counted_and_survived() {
    let (_dir, nbd, r) = run_on_disk("hostile", GUEST);
    r.assert_clean_exit("HOSTILE OK\n");
    // Six malformed chains plus the bogus avail index, which the disk's I/O thread
    // counts each time it looks at the queue before the reset: once, or a few times
    // when a wake-up comes late; a device that looped on it would count without end.
    let n: u64 = r
        .stderr
        .split("bad_chains=")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no bad_chains count: {r}"));
    assert!((7..=16).contains(&n), "bad_chains={n}: {r}");
    let bytes = std::fs::read(&nbd.img).unwrap();
    assert_eq!(&bytes[3 * 512..3 * 512 + 8], b"first-ok");
}
