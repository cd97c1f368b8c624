# Throughput bench guest: reads 64 MiB from the first virtio-blk device (at
# 0xd0000000) in 1 MiB requests, four in flight per kick, and prints "S" before and
# "E" after on the serial port (the bench timestamps the two lines), then resets.
# The device is brought up by the test guests' prelude (dev_init, setup_queue,
# driver_ok: vmm_guest/prelude.S), its queue with 16 entries.
    .globl _start
    .text
    .include "integration-tests/tests/vmm_guest/serial.S"
    .include "integration-tests/tests/vmm_guest/prelude.S"
    .set BRING, 0x1800000
    .set BHDR, 0x1804000
    .set BSTATUS, 0x1805000
    .set BUF, 0x2000000
_start:
    mov $MMIO0, %rbx
    BLK_UP 0, BRING, 16
    # four chains: header k, 1 MiB buffer k, status k
    .set k, 0
    .rept 4
    movq $BHDR+16*k, BRING+16*(3*k)
    movl $16, BRING+16*(3*k)+8
    movw $1, BRING+16*(3*k)+12
    movw $(3*k+1), BRING+16*(3*k)+14
    movq $BUF+0x100000*k, BRING+16*(3*k+1)
    movl $0x100000, BRING+16*(3*k+1)+8
    movw $3, BRING+16*(3*k+1)+12
    movw $(3*k+2), BRING+16*(3*k+1)+14
    movq $BSTATUS+k, BRING+16*(3*k+2)
    movl $1, BRING+16*(3*k+2)+8
    movw $2, BRING+16*(3*k+2)+12
    movl $0, BHDR+16*k
    .set k, k + 1
    .endr
    lea start_msg(%rip), %rsi
    call print
    xor %r12d, %r12d            # MiB read so far
    xor %r13d, %r13d            # avail index
1:  .set k, 0
    .rept 4
    lea k(%r12), %eax
    shl $11, %eax               # MiB -> sectors
    movq %rax, BHDR+16*k+8
    movb $0xff, BSTATUS+k
    lea k(%r13), %ecx
    and $15, %ecx
    movw $(3*k), BRING+0x1000+4(,%rcx,2)
    .set k, k + 1
    .endr
    add $4, %r13d
    movw %r13w, BRING+0x1000+2
    movl $0, 0x50(%rbx)
    # the disk completes on its own thread: wait for the used index
2:  cmpw %r13w, BRING+0x2000+2
    je 3f
    pause
    jmp 2b
3:
    cmpl $0, BSTATUS
    jne fail
    add $4, %r12d
    cmp $64, %r12d
    jb 1b
    lea end_msg(%rip), %rsi
    call print
    jmp reboot
fail:
    lea fail_msg(%rip), %rsi
    call print
    ud2
start_msg: .asciz "S\n"
end_msg: .asciz "E\n"
fail_msg: .asciz "FAIL\n"
