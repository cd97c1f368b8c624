//! The state ioctls on this host's KVM: every GET and SET a snapshot uses, and dirty
//! logging, on a real VM (skipped, saying so, where /dev/kvm cannot be opened).

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::Kvm;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::*;

/// A VM as `vmm::run` makes one (irqchip, PIT), 2 MiB of memory and one vCPU.
fn vm() -> Option<(Kvm, VmFd, GuestMemoryMmap, VcpuFd)> {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("NOT RUN: /dev/kvm cannot be opened");
        return None;
    };
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(crate::layout::TSS_ADDR).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    Some((kvm, vm, mem, vcpu))
}

fn region(mem: &GuestMemoryMmap, flags: u32) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 2 << 20,
        userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
        flags,
    }
}

#[test]
fn every_state_ioctl_round_trips_on_this_kvm() {
    let Some((kvm, vm, mem, mut vcpu)) = vm() else {
        return;
    };
    // SAFETY: the region is `mem`'s own mapping, which outlives the VM (dropped after
    // it at the end of the test).
    unsafe { vm.set_user_memory_region(region(&mem, 0)) }.unwrap();
    let msrs: Vec<u32> = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
    let mut s = save_vcpu(&mut vcpu, &msrs).expect("GET state ioctls");
    eprintln!("MSRs: {} listed, {} readable", msrs.len(), s.msrs.len());
    s.regs.rax = 0x1234_5678;
    s.regs.rip = 0x1000;
    restore_vcpu(&vcpu, &s).expect("SET state ioctls");
    let back = save_vcpu(&mut vcpu, &msrs).unwrap();
    assert_eq!((back.regs.rax, back.regs.rip), (0x1234_5678, 0x1000));
    assert_eq!(back.msrs.len(), s.msrs.len());
    let (irqchips, pit, clock) = save_vm(&vm).expect("GET irqchip, PIT, clock");
    let st = VmState {
        mem_bytes: 2 << 20,
        mem_crc32: 0,
        vcpus: vec![back],
        irqchips,
        pit,
        clock,
        devices: Vec::new(),
        serial: SerialSnap::default(),
    };
    restore_vm(&vm, &st).expect("SET irqchip, PIT, clock");
}

#[test]
fn dirty_logging_on_this_kvm() {
    let Some((_kvm, vm, mem, _vcpu)) = vm() else {
        return;
    };
    // SAFETY: as in the test above.
    unsafe { vm.set_user_memory_region(region(&mem, KVM_MEM_LOG_DIRTY_PAGES)) }
        .expect("KVM_MEM_LOG_DIRTY_PAGES");
    let log = vm.get_dirty_log(0, 2 << 20).expect("KVM_GET_DIRTY_LOG");
    assert_eq!(log.len(), 512 / 64);
}
