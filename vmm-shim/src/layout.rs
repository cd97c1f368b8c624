//! Guest physical memory layout (x86_64), fixed so test guests can rely on it.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params (zero page)  0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000-0xefff PDs: identity map of 4 GiB (2M pages)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x000e_0000  ACPI tables (RSDP, XSDT, FADT, MADT, DSDT), e820-reserved to 1 MiB
//! 0x0010_0000  high memory: kernels load here or above (bzImage at 16 MiB)
//! ...          initrd at the top of RAM (below 896 MiB)
//! 0xd000_0000  virtio-mmio devices, 4 KiB each, IRQ 5.. in order: disks, then NICs
//! 0xfffb_c000  KVM identity-map page, then the 3-page TSS (outside RAM)
//! ```
//!
//! RAM starts at 0 and ends below the MMIO windows (at most 3 GiB).

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// IDT address.
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (struct boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-table root.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// First of four page directories (0xb000..0xf000).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line.
pub const CMDLINE_MAX: usize = 0x10000;
/// End of low RAM in the e820 map (the EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where a bzImage's protected-mode kernel is loaded.
pub const BZIMAGE_LOAD: u64 = 0x100_0000;
/// Highest address an initrd may end at (the kernel's default initrd_addr_max + 1).
pub const INITRD_MAX_END: u64 = 0x3800_0000;
/// First virtio-mmio window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// First IRQ line given to virtio-mmio devices (4 is the serial port's).
pub const MMIO_IRQ_BASE: u32 = 5;
/// How many virtio-mmio devices fit in the IRQ lines 5..=23.
pub const MAX_MMIO_DEVICES: usize = 19;
/// The serial port's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// TSS address for KVM_SET_TSS_ADDR (3 pages just below 4 GiB, outside RAM).
pub const TSS_ADDR: usize = 0xfffb_d000;
/// Identity-map page for KVM_SET_IDENTITY_MAP_ADDR.
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Address of the `i`th virtio-mmio device.
pub fn mmio_addr(i: usize) -> u64 {
    MMIO_BASE + MMIO_SIZE * i as u64
}

/// IRQ line of the `i`th virtio-mmio device.
pub fn mmio_irq(i: usize) -> u32 {
    MMIO_IRQ_BASE + i as u32
}
