//! vmm-shim's virtio-net on a real TAP, under the real KVM: a guest program sends an
//! ARP request through the device and waits for the kernel's ARP reply, which comes
//! back from the TAP's kernel side in a network namespace the test creates.

mod vmm_guest;

use std::time::Duration;

use integration_tests::{require_root, unique_name, Netns};
use vmm_guest::{assemble, run_vmm};

const GUEST: &str = r#"
    .set RX, 0x200000
    .set TX, 0x210000
    .set BUFS, 0x220000
_start:
    mov $MMIO0, %rbx
    cmpl $1, 0x8(%rbx)          # device id: net
    je 1f
    FAIL 'd'
1:  xor %r8d, %r8d
    call dev_init
    xor %edi, %edi
    mov $RX, %esi
    call setup_queue
    mov $1, %edi
    mov $TX, %esi
    call setup_queue
    call driver_ok
    # four 2 KiB receive buffers
    DSET RX, 0, BUFS, 2048, F_WRITE, 0
    DSET RX, 1, BUFS+0x800, 2048, F_WRITE, 0
    DSET RX, 2, BUFS+0x1000, 2048, F_WRITE, 0
    DSET RX, 3, BUFS+0x1800, 2048, F_WRITE, 0
    movw $0, RX+0x1000+4
    movw $1, RX+0x1000+6
    movw $2, RX+0x1000+8
    movw $3, RX+0x1000+10
    movw $4, RX+0x1000+2
    movl $0, 0x50(%rbx)
    # send the ARP request (vnet header + frame, one descriptor)
    DSET TX, 0, arpreq, arpreq_end-arpreq, 0, 0
    AVAIL TX, 0, 0, 1
    movl $1, 0x50(%rbx)
    cmpw $1, TX+0x2000+2
    je 1f
    FAIL 't'
1:  xor %r12d, %r12d            # next used entry to look at
wait:
    mov $2000000, %ecx
2:  movzwl RX+0x2000+2, %eax
    cmp %r12d, %eax
    jne got
    pause
    loop 2b
    FAIL 'w'
got:
    mov %r12d, %eax
    movl RX+0x2000+4(,%rax,8), %eax     # used id = buffer index
    shl $11, %eax
    add $BUFS, %eax
    cmpw $0x0608, 24(%rax)              # ethertype ARP (big endian 0x0806)
    jne next
    cmpw $0x0200, 32(%rax)              # op = reply
    jne next
    cmpl $0x0100000a, 40(%rax)          # sender IP 10.0.0.1
    jne next
    PRINT okmsg
    jmp reboot
next:
    inc %r12d
    cmp $4, %r12d
    jne wait
    FAIL 'n'

arpreq:
    .fill 12, 1, 0                       # virtio_net_hdr_v1
    .byte 0xff,0xff,0xff,0xff,0xff,0xff
    .byte 0x52,0x54,0x00,0x12,0x34,0x56
    .byte 0x08,0x06
    .byte 0x00,0x01, 0x08,0x00, 6, 4, 0x00,0x01
    .byte 0x52,0x54,0x00,0x12,0x34,0x56
    .byte 10,0,0,2
    .byte 0,0,0,0,0,0
    .byte 10,0,0,1
arpreq_end:
okmsg: .asciz "NET OK\n"
"#;

#[test]
fn guest_arp_exchange_through_a_tap() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "net", GUEST).unwrap();
    let ns = Netns::new("vmn").unwrap();
    let tap = unique_name("vt");
    ns.sh(&format!(
        "ip tuntap add dev {tap} mode tap vnet_hdr && \
         sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 && \
         ip addr add 10.0.0.1/24 dev {tap} && ip link set {tap} up"
    ))
    .unwrap();
    let net = format!("tap={tap},mac=52:54:00:12:34:56");
    let r = run_vmm(
        &["ip", "netns", "exec", ns.name()],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--mem",
            "64M",
            "--net",
            &net,
        ],
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(r.serial, "NET OK\n", "stderr: {}", r.stderr);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
}

#[test]
fn missing_tap_permission_or_bad_name_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble(dir.path(), "x", "_start: jmp reboot\n").unwrap();
    let r = run_vmm(
        &[],
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--net",
            "tap=waytoolongname0123",
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.code, Some(2), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("net[0]"), "{}", r.stderr);
}
