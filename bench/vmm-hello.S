# Boot-time bench guest: one line on the serial port, then reset. vmm-shim exits on
# the i8042 reset; QEMU microvm has no i8042, so the guest then triple-faults, which
# QEMU (-no-reboot) turns into an exit too.
    .include "integration-tests/tests/vmm_guest/serial.S"
    .globl _start
_start:
    lea msg(%rip), %rsi
    PUTS
    mov $0xfe, %al
    out %al, $0x64
    lidt zero_idt(%rip)
    ud2
    .align 8
zero_idt: .word 0
    .quad 0
msg: .asciz "guest up\n"
