# Serial output shared by the test guests (vmm_guest/mod.rs takes it into its
# prelude) and the bench guests (bench/vmm-*.S `.include` it, assembled from the
# workspace root).
#
# PUTS: writes the NUL-terminated string at rsi to the 8250 at 0x3f8, polling
# nothing (vmm-shim and QEMU take every byte at once). It needs no stack, so the
# bench's PVH entry, which sets none up, can use it; it clobbers al, dx and rsi and
# its local labels 1 and 2.
    .macro PUTS
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:
    .endm
