//! Fuzzes the virtio-mmio transport of virtio-blk and virtio-net: the input is a guest
//! memory image followed by register accesses (see `vmm_shim::fuzzing::run_mmio`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_shim::fuzzing::run_mmio(data);
});
