//! vmm-shim: a thin KVM virtual machine monitor on the rust-vmm crates.
//!
//! It boots a Linux kernel (ELF vmlinux or bzImage) with a serial console, virtio-blk
//! disks whose backend is an NBD connection (to stord or any NBD server) and virtio-net
//! NICs on TAP devices (optionally ports handed out by netd). Devices sit on virtio-mmio
//! and are announced on the kernel command line (`virtio_mmio.device=4K@ADDR:IRQ`).
//!
//! Module map: [`config`] (CLI/TOML, validated), [`boot`] (loader, zero page, long-mode
//! state), [`layout`] (guest physical map), [`legacy`] (UART, i8042), [`virtio`] (mmio
//! transport, blk, net, checked descriptor chains), [`nbd`] (client), [`sys`] (TAP and
//! signal syscalls), [`vmm`] (KVM setup, vCPU threads, shutdown), [`netd_client`].

pub mod acpi;
pub mod boot;
pub mod config;
pub mod fuzzing;
pub mod layout;
pub mod legacy;
pub mod nbd;
pub mod netd_client;
pub mod sys;
pub mod virtio;
pub mod vmm;

/// Formats an error with its whole `source()` chain: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
