//! ACPI tables that describe the machine to a Linux guest.
//!
//! Debian's kernel (like most distribution kernels) is built without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so `virtio_mmio.device=` on the command line is
//! not enough for it to find our devices: it discovers virtio-mmio devices through ACPI
//! (`_HID "LNRO0005"`), as under QEMU microvm and Firecracker. We therefore write, in the
//! BIOS area at 0xe0000 (reserved in the e820 map): an RSDP (ACPI 2.0), an XSDT, a
//! hardware-reduced FADT (no SCI, no PM blocks: nothing to emulate), a MADT (one local
//! APIC per vCPU, the in-kernel IOAPIC, PC-AT compatible PICs) and a DSDT holding one
//! `LNRO0005` device per virtio-mmio window with its memory range and edge-triggered
//! interrupt. The zero page's `acpi_rsdp_addr` points at the RSDP so the kernel needn't
//! scan for it. Kernels with the command-line option still get `virtio_mmio.device=`.

use acpi_tables::{aml, rsdp::Rsdp, sdt::Sdt, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the tables go (the legacy BIOS area).
pub const ACPI_START: u64 = 0xe0000;
/// End of the area (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
const RSDP_ADDR: u64 = ACPI_START;
const XSDT_ADDR: u64 = ACPI_START + 0x100;
const FADT_ADDR: u64 = ACPI_START + 0x200;
const MADT_ADDR: u64 = ACPI_START + 0x400;
const DSDT_ADDR: u64 = ACPI_START + 0x1000;

const OEM_ID: [u8; 6] = *b"FABRIC";
const OEM_TABLE: [u8; 8] = *b"VMMSHIM ";

/// Local APIC base.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base.
const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// One virtio-mmio device for the DSDT.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    /// Base address of its 4 KiB window.
    pub addr: u64,
    /// Its IRQ (GSI).
    pub irq: u32,
}

/// The tables, built (for writing into guest memory or inspecting in tests).
pub struct Tables {
    /// (guest address, bytes) of each table.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn dsdt(devices: &[MmioDevice]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let names: Vec<String> = (0..devices.len()).map(|i| format!("V{i:03}")).collect();
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uids: Vec<aml::Name> = (0..devices.len())
        .map(|i| aml::Name::new("_UID".into(), &(i as u32)))
        .collect();
    let mems: Vec<aml::Memory32Fixed> = devices
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.addr as u32, crate::layout::MMIO_SIZE as u32))
        .collect();
    let irqs: Vec<aml::Interrupt> = devices
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.irq))
        .collect();
    let templates: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let crs: Vec<aml::Name> = templates
        .iter()
        .map(|t| aml::Name::new("_CRS".into(), t))
        .collect();
    let devs: Vec<aml::Device> = (0..devices.len())
        .map(|i| aml::Device::new(names[i].as_str().into(), vec![&hid, &uids[i], &crs[i]]))
        .collect();
    let children: Vec<&dyn Aml> = devs.iter().map(|d| d as &dyn Aml).collect();
    let scope = aml::Scope::new("\\_SB_".into(), children);
    let mut bytes = Vec::new();
    scope.to_aml_bytes(&mut bytes);
    dsdt.append_slice(&bytes);
    dsdt
}

fn fadt() -> Sdt {
    // ACPI 6.x FADT, 276 bytes, hardware-reduced.
    let mut f = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE, 1);
    f.write_u32(40, DSDT_ADDR as u32);
    // IAPC_BOOT_ARCH: VGA not present (bit 2), ASPM/CMOS not relevant.
    f.write_u16(109, 1 << 2);
    // Flags: WBINVD (0), HW_REDUCED_ACPI (20).
    f.write_u32(112, (1 << 0) | (1 << 20));
    f.write_u8(131, 3); // FADT minor version
    f.write(140, DSDT_ADDR); // X_DSDT
    f.write(268, u64::from_le_bytes(*b"VMMSHIM\0")); // hypervisor vendor identity
    f.update_checksum();
    f
}

fn madt(cpus: u8) -> Sdt {
    let mut m = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE, 1);
    m.write_u32(36, LAPIC_ADDR);
    m.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present (KVM's in-kernel PIC)
    for id in 0..cpus {
        // Processor Local APIC: type 0, length 8, uid, APIC ID, flags = enabled.
        m.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    let mut io = vec![1u8, 12, cpus, 0];
    io.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    m.append_slice(&io);
    m.update_checksum();
    m
}

/// Builds every table for `cpus` vCPUs and these devices.
pub fn build(cpus: u8, devices: &[MmioDevice]) -> Tables {
    let dsdt = dsdt(devices);
    let fadt = fadt();
    let madt = madt(cpus);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    xsdt.append(FADT_ADDR);
    xsdt.append(MADT_ADDR);
    xsdt.update_checksum();
    let rsdp = Rsdp::new(OEM_ID, XSDT_ADDR);
    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);
    Tables {
        blobs: vec![
            (RSDP_ADDR, rsdp_bytes),
            (XSDT_ADDR, xsdt.as_slice().to_vec()),
            (FADT_ADDR, fadt.as_slice().to_vec()),
            (MADT_ADDR, madt.as_slice().to_vec()),
            (DSDT_ADDR, dsdt.as_slice().to_vec()),
        ],
    }
}

/// Writes the tables into guest memory; returns the RSDP address.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u8,
    devices: &[MmioDevice],
) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, bytes) in build(cpus, devices).blobs {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_fit_and_checksum() {
        let devs: Vec<MmioDevice> = (0..19)
            .map(|i| MmioDevice {
                addr: crate::layout::mmio_addr(i),
                irq: crate::layout::mmio_irq(i),
            })
            .collect();
        let t = build(32, &devs);
        let mut end = 0;
        for (addr, b) in &t.blobs {
            assert!(*addr >= end, "tables overlap at {addr:#x}");
            end = addr + b.len() as u64;
            if *addr == RSDP_ADDR {
                assert_eq!(&b[..8], b"RSD PTR ");
                assert_eq!(sum(&b[..20]), 0);
                assert_eq!(sum(b), 0);
            } else {
                assert_eq!(sum(b), 0, "checksum of {:?}", std::str::from_utf8(&b[..4]));
                let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
                assert_eq!(len, b.len());
            }
        }
        assert!(end <= ACPI_END);
    }

    /// The DSDT must disassemble with ACPICA's iasl (a decoder nobody here wrote) into
    /// the devices we meant.
    #[test]
    fn iasl_decodes_the_dsdt() {
        let devs = [
            MmioDevice {
                addr: 0xd000_0000,
                irq: 5,
            },
            MmioDevice {
                addr: 0xd000_1000,
                irq: 6,
            },
        ];
        let t = build(2, &devs);
        let dir = tempfile::tempdir().unwrap();
        for (addr, b) in &t.blobs {
            if *addr == DSDT_ADDR || *addr == MADT_ADDR || *addr == FADT_ADDR {
                let name = std::str::from_utf8(&b[..4]).unwrap().to_lowercase();
                std::fs::write(dir.path().join(format!("{name}.dat")), b).unwrap();
            }
        }
        let out = std::process::Command::new("iasl")
            .args(["-d", "dsdt.dat", "apic.dat", "facp.dat"])
            .current_dir(dir.path())
            .output()
            .expect("iasl (Debian package acpica-tools) must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        assert!(dsl.contains("\"LNRO0005\""), "{dsl}");
        assert!(dsl.contains("0xD0001000"), "{dsl}");
        assert!(dsl.contains("Memory32Fixed (ReadWrite,"), "{dsl}");
        assert!(
            dsl.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"),
            "{dsl}"
        );
        let madt = std::fs::read_to_string(dir.path().join("apic.dsl")).unwrap();
        assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
        assert!(madt.contains("I/O APIC"), "{madt}");
        let fadt = std::fs::read_to_string(dir.path().join("facp.dsl")).unwrap();
        let hw_reduced = fadt
            .lines()
            .find(|l| l.contains("Hardware Reduced"))
            .unwrap_or_default();
        assert!(hw_reduced.trim_end().ends_with(": 1"), "{fadt}");
        assert!(!fadt.to_lowercase().contains("error"), "{fadt}");
    }
}
