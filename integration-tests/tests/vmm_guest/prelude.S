# The prelude of the vmm-shim test guests (vmm_guest/mod.rs puts it, after
# serial.S, before each test's own code) and of bench/vmm-blkread.S (which
# `.include`s both, assembled from the workspace root): the layout of a one-disk
# guest, the descriptor, request and wait macros, and the routines print,
# fail_with, reboot, dev_init, setup_queue and driver_ok (see mod.rs's docs).
    .set MMIO0, 0xd0000000
    .set F_NEXT, 1
    .set F_WRITE, 2

    # Where a guest with one disk keeps its queue and its request: the rings (RING,
    # RING+0x1000, RING+0x2000, see SETUP_QUEUE), a request header, a data buffer,
    # the status byte and a second buffer for what is read back.
    .set RING, 0x200000
    .set HDR, 0x203000
    .set DATA, 0x204000
    .set STATUS, 0x205000
    .set RDATA, 0x206000

    # DSET ring, idx, addr, len, flags, next: fill descriptor idx of the table at ring.
    .macro DSET ring, idx, addr, len, flags, next
    movabs $\addr, %rax
    movq %rax, \ring+16*\idx
    movl $\len, \ring+16*\idx+8
    movw $\flags, \ring+16*\idx+12
    movw $\next, \ring+16*\idx+14
    .endm

    # AVAIL ring, slot, head, newidx: publish a chain head in the avail ring.
    .macro AVAIL ring, slot, head, newidx
    movw $\head, \ring+0x1000+4+2*\slot
    movw $\newidx, \ring+0x1000+2
    .endm

    # SETUP_QUEUE queue, ring, size=8: set up virtqueue `queue` with `size` entries
    # and its rings at `ring`.
    .macro SETUP_QUEUE queue, ring, size=8
    mov $\queue, %edi
    mov $\ring, %esi
    mov $\size, %edx
    call setup_queue
    .endm

    # BLK_UP features, ring, size=8: bring the device at rbx up with `features`
    # acked and its one queue (`size` entries) at `ring` (a virtio-blk disk).
    .macro BLK_UP features, ring, size=8
    mov $\features, %r8d
    call dev_init
    SETUP_QUEUE 0, \ring, \size
    call driver_ok
    .endm

    # NET_UP features, rx, tx: bring the device at rbx up with `features` acked,
    # its receive queue at `rx` and its transmit queue at `tx` (a virtio-net NIC).
    .macro NET_UP features, rx, tx
    mov $\features, %r8d
    call dev_init
    SETUP_QUEUE 0, \rx
    SETUP_QUEUE 1, \tx
    call driver_ok
    .endm

    # REQ3 ring, hdr, data, len, status: a virtio-blk request in descriptors 0-2:
    # the header, `len` bytes of data the device reads, the status byte it writes.
    .macro REQ3 ring, hdr, data, len, status
    DSET \ring, 0, \hdr, 16, F_NEXT, 1
    DSET \ring, 1, \data, \len, F_NEXT, 2
    DSET \ring, 2, \status, 1, F_WRITE, 0
    .endm

    # SUBMIT ring, slot, head, newidx: publish a chain head, notify queue 0 and wait
    # for the device to use it (see WAIT_USED).
    .macro SUBMIT ring, slot, head, newidx
    AVAIL \ring, \slot, \head, \newidx
    movl $0, 0x50(%rbx)
    WAIT_USED \ring, \newidx
    .endm

    # WAIT_USED ring, idx: spin (a bounded while) until the used index is `idx`: a
    # disk completes on its own I/O thread, after the kick has returned. Keeps rcx.
    .macro WAIT_USED ring, idx
    push %rcx
    mov $0x20000000, %ecx
7:  cmpw $\idx, \ring+0x2000+2
    je 8f
    pause
    dec %ecx
    jnz 7b
8:  pop %rcx
    .endm

    # EXPECT_USED ring, idx, code: FAIL with `code` unless the used index is `idx`.
    .macro EXPECT_USED ring, idx, code
    cmpw $\idx, \ring+0x2000+2
    je 1f
    FAIL \code
1:
    .endm

    # EXPECT_STATUS status, want, code: FAIL with `code` unless the status byte the
    # device wrote at `status` is `want`.
    .macro EXPECT_STATUS status, want, code
    cmpb $\want, \status
    je 1f
    FAIL \code
1:
    .endm

    # READ1 ring, hdr, data, status: turn the virtio-blk request in descriptors 0-2
    # (see REQ3) into a read of one sector, the header's, into `data`; the status
    # byte is reset so that the device must write it.
    .macro READ1 ring, hdr, data, status
    movl $0, \hdr
    movb $0xff, \status
    DSET \ring, 1, \data, 512, F_NEXT|F_WRITE, 2
    .endm

    # DISK0_UP features=0: bring the first device (a disk; rbx = its window) up with
    # `features` acked and its queue at RING.
    .macro DISK0_UP features=0
    mov $MMIO0, %rbx
    BLK_UP \features, RING
    .endm

    # BLK_HDR type, sector: a request header at HDR (type 1 OUT, 0 IN, 4 FLUSH...)
    # for `sector` (an operand: `$5`, `%r12`), and the status byte reset so that
    # the device must write it.
    .macro BLK_HDR type, sector
    movl $\type, HDR
    movl $0, HDR+4
    movq \sector, HDR+8
    movb $0xff, STATUS
    .endm

    # KICK_NEXT ring, count, queue: publish head 0 as chain number `count` (a 64-bit
    # register; the ring has 8 slots) with the avail index count+1, and notify
    # `queue`. Clobbers rax.
    .macro KICK_NEXT ring, count, queue
    mov \count, %rax
    and $7, %eax
    movw $0, \ring+0x1000+4(,%rax,2)
    lea 1(\count), %eax
    movw %ax, \ring+0x1000+2
    movl $\queue, 0x50(%rbx)
    .endm

    # FLUSH slot, newidx: a FLUSH in descriptors 0-1 (the header, the status byte),
    # submitted in `slot` (see SUBMIT); the caller checks the status.
    .macro FLUSH slot, newidx
    movl $4, HDR
    movb $0xff, STATUS
    DSET RING, 1, STATUS, 1, F_WRITE, 0
    SUBMIT RING, \slot, 0, \newidx
    .endm

    # FILL16 dst, src, count: `count` copies of the 16 bytes at the label `src`, from
    # dst on.
    .macro FILL16 dst, src, count
    mov $\dst, %rdi
    mov $\count, %ecx
2:  lea \src(%rip), %rsi
    movsq
    movsq
    loop 2b
    .endm

    # PUT8 addr, value: the 8 bytes of `value` (e.g. an ASCII tag) at addr.
    .macro PUT8 addr, value
    movabs $\value, %rax
    movq %rax, \addr
    .endm

    # EXPECT_SAME a, b, len, code: FAIL with `code` unless the `len` bytes at a and
    # at b are the same.
    .macro EXPECT_SAME a, b, len, code
    mov $\a, %rsi
    mov $\b, %rdi
    mov $\len, %ecx
    repe cmpsb
    je 1f
    FAIL \code
1:
    .endm

    # WAIT_CONSOLE: spin until a byte of console input waits in the UART (LSR.DR);
    # the test sends it when it has done what the guest waits for. Clobbers al, dx.
    .macro WAIT_CONSOLE
    mov $0x3fd, %dx
2:  in %dx, %al
    test $1, %al
    jz 2b
    .endm

    # DELAY cycles: spin for `cycles` TSC cycles (rdtsc). Clobbers rax, rdx, r9.
    .macro DELAY cycles
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    movabs $\cycles, %r9
    add %rdx, %r9
2:  pause
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    cmp %r9, %rdx
    jb 2b
    .endm

    .macro FAIL code
    mov $\code, %al
    jmp fail_with
    .endm

    .macro PRINT label
    lea \label(%rip), %rsi
    call print
    .endm

    # PASS msg: print `msg` (a quoted string; escapes such as \n work) and reboot,
    # which makes vmm-shim exit 0: how a guest reports that all went well.
    .macro PASS msg
    PRINT 9f
    jmp reboot
9:  .asciz "\msg"
    .endm

print:                      # rsi = NUL-terminated string
    push %rax
    push %rdx
    PUTS
    pop %rdx
    pop %rax
    ret

fail_with:                  # al = code character
    mov %al, failcode(%rip)
    PRINT failmsg
    ud2

reboot:
    mov $0xfe, %al
    out %al, $0x64
    hlt
    jmp reboot

dev_init:                   # rbx = device base, r8d = low feature bits wanted
    cmpl $0x74726976, 0x0(%rbx)
    jne 9f
    movl $0, 0x70(%rbx)
    movl $3, 0x70(%rbx)
    movl $1, 0x24(%rbx)
    movl $1, 0x20(%rbx)
    movl $0, 0x24(%rbx)
    movl %r8d, 0x20(%rbx)
    movl $11, 0x70(%rbx)
    testl $8, 0x70(%rbx)
    jz 8f
    ret
8:  FAIL 'f'
9:  FAIL 'm'

setup_queue:                # rbx = base, edi = queue, esi = ring area (zeroed here),
                            # edx = entries
    push %rdi
    mov %rsi, %rdi
    xor %eax, %eax
    mov $(0x3000/8), %ecx
    rep stosq
    pop %rdi
    movl %edi, 0x30(%rbx)
    movl %edx, 0x38(%rbx)
    movl %esi, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    lea 0x1000(%rsi), %eax
    movl %eax, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    lea 0x2000(%rsi), %eax
    movl %eax, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)
    ret

driver_ok:
    movl $15, 0x70(%rbx)
    testl $4, 0x70(%rbx)
    jz 1f
    ret
1:  FAIL 'o'

failmsg: .ascii "FAIL "
failcode: .ascii "?"
    .asciz "\n"
