# Throughput bench guest: reads 64 MiB from the first virtio-blk device (at
# 0xd0000000) in 1 MiB requests, four in flight per kick, and prints "S" before and
# "E" after on the serial port (the bench timestamps the two lines), then resets.
    .include "integration-tests/tests/vmm_guest/serial.S"
    .set MMIO, 0xd0000000
    .set RING, 0x1800000
    .set HDR, 0x1804000
    .set STATUS, 0x1805000
    .set BUF, 0x2000000
    .globl _start
_start:
    mov $MMIO, %rbx
    movl $0, 0x70(%rbx)
    movl $3, 0x70(%rbx)
    movl $1, 0x24(%rbx)
    movl $1, 0x20(%rbx)
    movl $0, 0x24(%rbx)
    movl $0, 0x20(%rbx)
    movl $11, 0x70(%rbx)
    mov $RING, %rdi
    xor %eax, %eax
    mov $(0x3000/8), %ecx
    rep stosq
    movl $0, 0x30(%rbx)
    movl $16, 0x38(%rbx)
    movl $RING, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    movl $RING+0x1000, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    movl $RING+0x2000, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)
    movl $15, 0x70(%rbx)
    # four chains: header k, 1 MiB buffer k, status k
    .set k, 0
    .rept 4
    movq $HDR+16*k, RING+16*(3*k)
    movl $16, RING+16*(3*k)+8
    movw $1, RING+16*(3*k)+12
    movw $(3*k+1), RING+16*(3*k)+14
    movq $BUF+0x100000*k, RING+16*(3*k+1)
    movl $0x100000, RING+16*(3*k+1)+8
    movw $3, RING+16*(3*k+1)+12
    movw $(3*k+2), RING+16*(3*k+1)+14
    movq $STATUS+k, RING+16*(3*k+2)
    movl $1, RING+16*(3*k+2)+8
    movw $2, RING+16*(3*k+2)+12
    movl $0, HDR+16*k
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
    movq %rax, HDR+16*k+8
    movb $0xff, STATUS+k
    lea k(%r13), %ecx
    and $15, %ecx
    movw $(3*k), RING+0x1000+4(,%rcx,2)
    .set k, k + 1
    .endr
    add $4, %r13d
    movw %r13w, RING+0x1000+2
    movl $0, 0x50(%rbx)
    # the disk completes on its own thread: wait for the used index
2:  cmpw %r13w, RING+0x2000+2
    je 3f
    pause
    jmp 2b
3:
    cmpl $0, STATUS
    jne fail
    add $4, %r12d
    cmp $64, %r12d
    jb 1b
    lea end_msg(%rip), %rsi
    call print
    mov $0xfe, %al
    out %al, $0x64
    hlt
fail:
    lea fail_msg(%rip), %rsi
    call print
    ud2
print:
    PUTS
    ret
start_msg: .asciz "S\n"
end_msg: .asciz "E\n"
fail_msg: .asciz "FAIL\n"
