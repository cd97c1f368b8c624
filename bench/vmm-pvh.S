# Shared by the bench guests: a PVH entry (32-bit, paging off: what QEMU microvm
# gives an ELF kernel with a XEN_ELFNOTE_PHYS32_ENTRY note) that switches to long mode
# and jumps to _start, where vmm-shim enters directly (64-bit boot protocol state).
    .section .note.pvh, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start

    .data
    .align 4096
pml4: .quad pdpt + 3
    .fill 511, 8, 0
pdpt: .quad pd + 3
    .fill 511, 8, 0
pd:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x83
    .set i, i + 1
    .endr
gdt: .quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff
gdtr: .word 23
    .long gdt

    .text
    .code32
pvh_start:
    cli
    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt gdtr
    ljmp $0x8, $_start
    .code64
