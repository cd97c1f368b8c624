//! vmm-shim under the real KVM: a guest prints on the 8250 and resets through the i8042
//! (exit 0); a guest that triple-faults makes vmm-shim exit non-zero with a message;
//! a TOML config runs the same as flags and its errors name the key; with two vCPUs the
//! boot CPU starts the second one through the in-kernel LAPIC (INIT/SIPI).

mod vmm_guest;

use std::time::Duration;

use integration_tests::require_root;
use vmm_guest::{assemble_with, run_guest, run_kernel, setup, LiveVm};

#[test]
fn guest_prints_on_serial_and_reboots_with_status_0() {
    let (_dir, elf) = setup(
        "hello",
        r#"
_start:
    PRINT msg
    # The UART's line status register says the transmitter is empty.
    mov $0x3fd, %dx
    in %dx, %al
    test $0x20, %al
    jnz 1f
    FAIL 'l'
1:  PRINT done
    jmp reboot
msg:  .asciz "hello from the guest\n"
done: .asciz "LSR ok\n"
"#,
    );
    run_guest(&[], &elf, &[], Duration::from_secs(30))
        .assert_clean_exit("hello from the guest\nLSR ok\n");
}

#[test]
fn triple_fault_exits_nonzero_with_a_message() {
    // ud2 with an IDT that has no valid gate: #UD -> #GP -> #DF -> triple fault.
    let (_dir, elf) = setup(
        "tf",
        r#"
_start:
    PRINT msg
    ud2
msg: .asciz "about to fault\n"
"#,
    );
    let r = run_guest(&[], &elf, &[], Duration::from_secs(30));
    assert_eq!(r.serial, "about to fault\n", "{r}");
    r.assert_exit(1, "triple fault");
}

#[test]
fn bad_kernel_and_bad_config_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    run_kernel(&[], &junk, &[], Duration::from_secs(30))
        .assert_exit(1, "neither an x86_64 ELF vmlinux nor a bzImage");

    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, "kernel = \"/x\"\nmemory = \"1G\"\n").unwrap();
    let r = run_config(&cfg);
    r.assert_exit(2, "vm.toml");
    r.assert_exit(2, "memory");

    std::fs::write(
        &cfg,
        "kernel = \"/x\"\nmem = \"1G\"\ndisk = [\"http://x\"]\n",
    )
    .unwrap();
    run_config(&cfg).assert_exit(2, "disk[0]");
}

/// Runs vmm-shim with `--config cfg` and nothing else.
fn run_config(cfg: &std::path::Path) -> vmm_guest::VmRun {
    vmm_guest::run_vmm(
        &[],
        &["--config", cfg.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .unwrap()
}

#[test]
fn toml_config_with_console_file() {
    let (dir, elf) = setup(
        "cfg",
        "_start:\n    PRINT msg\n    jmp reboot\nmsg: .asciz \"from toml\\n\"\n",
    );
    let console = dir.path().join("console.log");
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "kernel = \"{}\"\nmem = \"48M\"\ncpus = 1\nconsole = \"{}\"\n",
            elf.display(),
            console.display()
        ),
    )
    .unwrap();
    // The console went to the file, not stdout.
    run_config(&cfg).assert_clean_exit("");
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "from toml\n");
}

#[test]
fn second_vcpu_starts_through_init_sipi() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // The AP starts in real mode at 0x10000 (SIPI vector 0x10), sets a flag at 0x6000
    // and halts; the BSP waits for the flag.
    let elf = assemble_with(
        dir.path(),
        "smp",
        r#"
_start:
    movb $0, 0x6000
    mov $0xfee00000, %rbx
    movl $0x01000000, 0x310(%rbx)    # destination: APIC ID 1
    movl $0x00004500, 0x300(%rbx)    # INIT
    movl $0x01000000, 0x310(%rbx)
    movl $0x00004610, 0x300(%rbx)    # STARTUP, vector 0x10
    mov $3000000, %ecx
1:  cmpb $1, 0x6000
    je 2f
    pause
    loop 1b
    FAIL 's'
2:  PRINT okmsg
    jmp reboot
okmsg: .asciz "SMP OK
"

    .section .ap, "ax"
    .code16
ap_start:
    xor %ax, %ax
    mov %ax, %ds
    movb $1, 0x6000
3:  hlt
    jmp 3b
"#,
        &["--section-start=.ap=0x10000"],
    )
    .unwrap();
    run_guest(&[], &elf, &["--cpus", "2"], Duration::from_secs(60)).assert_clean_exit("SMP OK\n");
}

#[test]
fn console_input_reaches_the_guest() {
    // Reads three bytes from the UART (polling LSR.DR) and echoes them in brackets.
    let (_dir, elf) = setup(
        "echo",
        r#"
_start:
    mov $3, %r12d
    mov $0x3f8, %dx
    mov $'[', %al
    out %al, %dx
1:  mov $0x3fd, %dx
    mov $20000000, %ecx
2:  in %dx, %al
    test $1, %al
    jnz 3f
    loop 2b
    FAIL 'i'
3:  mov $0x3f8, %dx
    in %dx, %al
    out %al, %dx
    dec %r12d
    jnz 1b
    mov $']', %al
    out %al, %dx
    jmp reboot
"#,
    );
    let mut vm = LiveVm::guest(&[], &elf, &[]);
    vm.send(b"abc");
    vm.finish(Duration::from_secs(60))
        .assert_clean_exit("[abc]");
}

#[test]
fn kvm_internal_error_is_a_clear_nonzero_exit() {
    // kvm_pvm cannot emulate `lock cmpxchg16b` at ring 0 (KVM_EXIT_INTERNAL_ERROR);
    // hardware KVM just runs it.
    let (_dir, elf) = setup(
        "ie",
        r#"
_start:
    mov $0x3f8, %dx
    mov $'a', %al
    out %al, %dx
    xor %eax, %eax
    xor %edx, %edx
    xor %ebx, %ebx
    xor %ecx, %ecx
    lea buf(%rip), %rdi
    lock cmpxchg16b (%rdi)
    mov $0x3f8, %dx
    mov $'b', %al
    out %al, %dx
    jmp reboot
    .align 16
buf: .quad 0, 0
"#,
    );
    let r = run_guest(&[], &elf, &[], Duration::from_secs(30));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(r.serial, "a", "{r}");
        r.assert_exit(
            1,
            "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror 1)",
        );
        r.assert_exit(1, "vCPU 0");
        r.assert_exit(1, "rip=0x");
    } else {
        r.assert_clean_exit("ab");
    }
}

/// Wraps a flat 64-bit payload into a minimal bzImage: one setup sector after the boot
/// sector, boot protocol 2.15 header, LOADED_HIGH; the payload is the protected-mode
/// part, loaded at 16 MiB with its 64-bit entry 0x200 bytes in.
fn make_bzimage(payload: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes());
    img.extend_from_slice(payload);
    img
}

#[test]
fn bzimage_kernels_load_and_enter_at_the_64_bit_entry() {
    // Linked at 16 MiB with _start at +0x200, as a bzImage's startup_64.
    let (dir, elf) = setup(
        "bz",
        r#"
    .org 0x200
_start:
    # the zero page says we were loaded as a bzImage by a boot loader (0xff)
    cmpb $0xff, 0x210(%rsi)
    je 1f
    FAIL 't'
1:  PRINT msg
    jmp reboot
msg: .asciz "bzImage entered\n"
"#,
    );
    let flat = dir.path().join("bz.bin");
    let st = std::process::Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&elf)
        .arg(&flat)
        .status()
        .unwrap();
    assert!(st.success());
    let bz = dir.path().join("bzImage");
    std::fs::write(&bz, make_bzimage(&std::fs::read(&flat).unwrap())).unwrap();
    run_guest(&[], &bz, &[], Duration::from_secs(30)).assert_clean_exit("bzImage entered\n");
}

#[test]
fn initrd_and_cmdline_reach_the_guest_through_the_zero_page() {
    // Prints the initrd (a NUL-terminated string) and the command line, both found
    // through boot_params: ramdisk_image at 0x218, cmd_line_ptr at 0x228.
    let (dir, elf) = setup(
        "zp",
        r#"
_start:
    mov %rsi, %r12
    movl 0x218(%r12), %esi
    call print
    PRINT nl
    movl 0x228(%r12), %esi
    call print
    PRINT nl
    jmp reboot
nl: .asciz "\n"
"#,
    );
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"initrd bytes here\0").unwrap();
    let r = run_guest(
        &[],
        &elf,
        &[
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 hello=world",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(0), "{r}");
    let mut lines = r.serial.lines();
    assert_eq!(lines.next(), Some("initrd bytes here"), "{r}");
    // The VMM appends nothing without devices.
    assert_eq!(lines.next(), Some("console=ttyS0 hello=world"), "{r}");
}

#[test]
fn sd_notify_ready_then_sigterm_exits_0() {
    let (dir, elf) = setup("spin", "_start:\n1:  pause\n    jmp 1b\n");
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = vmm_guest::vmm_command(&[], &["--kernel", elf.to_str().unwrap(), "--mem", "64M"]);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let vm = LiveVm::spawn(cmd).unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 from vmm-shim");
    assert_eq!(&buf[..n], b"READY=1");
    vm.stop(Duration::from_secs(10)).assert_clean_exit("");
}
