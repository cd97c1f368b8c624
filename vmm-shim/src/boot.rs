//! Loading a Linux kernel (or a test guest shaped like one) and the 64-bit boot state.
//!
//! The kernel is an ELF `vmlinux` (loaded at its physical addresses, entered at
//! `e_entry`) or a bzImage (protected-mode part loaded at 16 MiB, entered at its 64-bit
//! entry `load + 0x200`), both through linux-loader. We then write the zero page
//! (`struct boot_params`: setup header, command line pointer, initrd, an e820 map, the
//! ACPI RSDP address: see [`crate::acpi`]), a GDT
//! and identity-mapping page tables for the first 4 GiB, and give the boot vCPU long mode,
//! paging and `rsi` = zero page, which is the state the Linux 64-bit boot protocol asks
//! for. Test guests are plain static ELF programs and find the same state.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// A boot error.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// could not open kernel or initrd
    #[error("could not open {path}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the kernel is neither a loadable ELF nor a bzImage
    #[error("{path} is neither an x86_64 ELF vmlinux nor a bzImage (ELF: {elf}; bzImage: {bz})")]
    Kernel {
        /// The file.
        path: String,
        /// The ELF loader's complaint.
        elf: String,
        /// The bzImage loader's complaint.
        bz: String,
    },
    /// the initrd does not fit in guest memory
    #[error("initrd of {size} bytes does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// writing boot structures into guest memory failed
    #[error("writing {what} into guest memory failed")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// the command line is too long
    #[error("kernel command line longer than {CMDLINE_MAX} bytes")]
    CmdlineTooLong,
}

/// Where the kernel was put and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Memory { what, source }
}

/// Loads the kernel, initrd and command line and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    cpus: u8,
    devices: &[crate::acpi::MmioDevice],
) -> Result<LoadedKernel, BootError> {
    let open = |p: &Path| {
        File::open(p).map_err(|source| BootError::Open {
            path: p.display().to_string(),
            source,
        })
    };
    let mut f = open(kernel)?;
    let (loaded, header) = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => (
            LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
            },
            None,
        ),
        Err(elf_err) => {
            match BzImage::load(
                mem,
                Some(GuestAddress(BZIMAGE_LOAD)),
                &mut f,
                Some(GuestAddress(HIMEM_START)),
            ) {
                Ok(r) => (
                    LoadedKernel {
                        entry: r.kernel_load.0 + 0x200,
                        end: r.kernel_end,
                    },
                    r.setup_header,
                ),
                Err(bz_err) => {
                    return Err(BootError::Kernel {
                        path: kernel.display().to_string(),
                        elf: elf_err.to_string(),
                        bz: bz_err.to_string(),
                    })
                }
            }
        }
    };

    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.kernel_alignment = 0x100_0000;

    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err("command line"))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = bytes.len() as u32;

    if let Some(path) = initrd {
        let mut f = open(path)?;
        let size = f
            .metadata()
            .map_err(|source| BootError::Open {
                path: path.display().to_string(),
                source,
            })?
            .len();
        let top = mem_bytes.min(INITRD_MAX_END);
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= loaded.end)
            .ok_or(BootError::InitrdTooBig { size })?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(mem_err("initrd"))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    params.acpi_rsdp_addr =
        crate::acpi::write(mem, cpus, devices).map_err(mem_err("ACPI tables"))?;
    let e820 = [
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: 1,
        },
        boot_e820_entry {
            addr: crate::acpi::ACPI_START,
            size: crate::acpi::ACPI_END - crate::acpi::ACPI_START,
            r#type: 2,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: mem_bytes - HIMEM_START,
            r#type: 1,
        },
    ];
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(mem_err("boot_params"))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(loaded)
}

/// Identity-maps the first 4 GiB with 2 MiB pages (RAM and the MMIO windows at 3 GiB+).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_obj(PDPTE_ADDR | 0x03, GuestAddress(PML4_ADDR))
        .map_err(mem_err("PML4"))?;
    for g in 0..4u64 {
        let pd = PDE_ADDR + g * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_ADDR + g * 8))
            .map_err(mem_err("PDPT"))?;
        for i in 0..512u64 {
            mem.write_obj(((g << 30) | (i << 21)) | 0x83, GuestAddress(pd + i * 8))
                .map_err(mem_err("PD"))?;
        }
    }
    Ok(())
}

/// GDT entries: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("IDT"))?;
    Ok(())
}

/// Decodes a GDT entry into a KVM segment.
fn segment(index: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: 0,
    }
}

/// Long mode, paging, flat segments: the state the 64-bit boot protocol wants.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    let tss = segment(3, GDT[3]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= 0x1 | 0x8000_0000; // PE | PG
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 0x20; // PAE
    sregs.efer |= 0x100 | 0x400; // LME | LMA
    sregs
}

/// General registers at the kernel entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}

/// FPU state after reset (x87 control word, MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_decodes_to_long_mode_code() {
        let cs = segment(1, GDT[1]);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 8);
        let tr = segment(3, GDT[3]);
        assert_eq!(tr.type_, 0xb);
        assert_eq!(tr.s, 0);
    }

    #[test]
    fn rejects_garbage_kernel() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, vec![0x5au8; 8192]).unwrap();
        let err = load(&mem, 64 << 20, &k, None, "x", 1, &[]).unwrap_err();
        assert!(matches!(err, BootError::Kernel { .. }), "{err}");
    }
}
