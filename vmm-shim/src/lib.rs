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
//! signal syscalls), [`vmm`] (KVM setup, vCPU threads, shutdown), [`netd_client`]
//! (netd's control API, from the `fabric-api` crate), [`metrics`] (what `--metrics`
//! exports), [`api`] (the control API, `--api-sock`, and `vmm-shim ctl`). Sizes, MACs, TAP ioctls and
//! logging set-up are the `fabric-util` crate's, shared with netd and stord.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod fuzzing;
pub mod layout;
pub mod legacy;
pub mod metrics;
pub mod nbd;
pub mod netd_client;
pub mod sys;
#[cfg(test)]
mod testutil;
pub mod virtio;
pub mod vmm;

pub use fabric_util::error_chain;
