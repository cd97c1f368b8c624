//! Fuzzes virtqueue descriptor-chain handling of virtio-blk and virtio-net: the input
//! is a guest memory image holding the descriptor table, the avail ring and buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_shim::fuzzing::run_chains(data);
});
