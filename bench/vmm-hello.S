# Boot-time bench guest: one line on the serial port, then reset. vmm-shim exits on
# the i8042 reset; QEMU microvm has no i8042, so the guest then triple-faults, which
# QEMU (-no-reboot) turns into an exit too.
    .globl _start
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0xfe, %al
    out %al, $0x64
    lidt zero_idt(%rip)
    ud2
    .align 8
zero_idt: .word 0
    .quad 0
msg: .asciz "guest up\n"
