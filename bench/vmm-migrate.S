# Migration bench guest (bench/migrate.sh): rewrites one word of each page of a
# 16 MiB working set at 64 MiB, pauses ~25 ms (prelude.S's DELAY), prints a '.' every 16
# passes, forever. Assembled after bench/vmm-pvh.S, like the other bench guests:
# QEMU microvm enters through the PVH note, vmm-shim at _start.
    .include "integration-tests/tests/vmm_guest/serial.S"
    .include "integration-tests/tests/vmm_guest/prelude.S"
    .set WSET, 0x4000000
    .set WSET_PAGES, 4096
    .globl _start
_start:
    xor %r12d, %r12d
pass:
    inc %r12
    mov $WSET, %rdi
    mov $WSET_PAGES, %ecx
1:  mov %r12, (%rdi)
    add $4096, %rdi
    loop 1b
    test $15, %r12
    jnz 3f
    lea dot(%rip), %rsi
    PUTS
3:  DELAY 50000000
    jmp pass
dot: .asciz "."
