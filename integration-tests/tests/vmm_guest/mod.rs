//! Small guest programs for the vmm-shim tests, in GNU `as` syntax, assembled and
//! linked by the test (binutils) into a static ELF that vmm-shim loads like a vmlinux.
//!
//! The guest starts as the Linux 64-bit boot protocol leaves a kernel: long mode,
//! ring 0, the first 4 GiB identity-mapped, `rsi` = zero page. The prelude gives it a
//! serial `print`, a `fail` that prints `FAIL <code>` and triple-faults (vmm-shim exits
//! non-zero), `reboot` (i8042 0xfe: vmm-shim exits 0) and virtio-mmio driver helpers:
//! `dev_init` (reset, ACK, DRIVER, VERSION_1 + the features in r8d, FEATURES_OK),
//! `setup_queue` (queue edi, 8 entries, rings at esi, esi+0x1000, esi+0x2000) and
//! `driver_ok`. Device windows start at 0xd0000000, 4 KiB apart: disks, then NICs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Assembly shared by every guest (appended after the test's own code).
pub const PRELUDE: &str = r#"
    .set MMIO0, 0xd0000000
    .set F_NEXT, 1
    .set F_WRITE, 2

    # DSET ring, idx, addr, len, flags, next: fill descriptor idx of the table at ring.
    .macro DSET ring, idx, addr, len, flags, next
    movabs $\addr, %rax
    movq %rax, \ring+16*\idx
    movl $\len, \ring+16*\idx+8
    movw $\flags, \ring+16*\idx+12
    movw $\next, \ring+16*\idx+14
    .endm

    # AVAIL ring, slot, head, newidx: publish a chain head in the avail ring.
    .macro AVAIL ring, slot, head, newidx
    movw $\head, \ring+0x1000+4+2*\slot
    movw $\newidx, \ring+0x1000+2
    .endm

    .macro FAIL code
    mov $\code, %al
    jmp fail_with
    .endm

    .macro PRINT label
    lea \label(%rip), %rsi
    call print
    .endm

print:                      # rsi = NUL-terminated string
    push %rax
    push %rdx
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  pop %rdx
    pop %rax
    ret

fail_with:                  # al = code character
    mov %al, failcode(%rip)
    PRINT failmsg
    ud2

reboot:
    mov $0xfe, %al
    out %al, $0x64
    hlt
    jmp reboot

dev_init:                   # rbx = device base, r8d = low feature bits wanted
    cmpl $0x74726976, 0x0(%rbx)
    jne 9f
    movl $0, 0x70(%rbx)
    movl $3, 0x70(%rbx)
    movl $1, 0x24(%rbx)
    movl $1, 0x20(%rbx)
    movl $0, 0x24(%rbx)
    movl %r8d, 0x20(%rbx)
    movl $11, 0x70(%rbx)
    testl $8, 0x70(%rbx)
    jz 8f
    ret
8:  FAIL 'f'
9:  FAIL 'm'

setup_queue:                # rbx = base, edi = queue, esi = ring area (zeroed here)
    push %rdi
    mov %rsi, %rdi
    xor %eax, %eax
    mov $(0x3000/8), %ecx
    rep stosq
    pop %rdi
    movl %edi, 0x30(%rbx)
    movl $8, 0x38(%rbx)
    movl %esi, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    lea 0x1000(%rsi), %eax
    movl %eax, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    lea 0x2000(%rsi), %eax
    movl %eax, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)
    ret

driver_ok:
    movl $15, 0x70(%rbx)
    testl $4, 0x70(%rbx)
    jz 1f
    ret
1:  FAIL 'o'

failmsg: .ascii "FAIL "
failcode: .ascii "?"
    .asciz "\n"
"#;

/// Assembles `src` (plus the prelude) into a static ELF in `dir`; returns its path.
pub fn assemble(dir: &Path, name: &str, src: &str) -> Result<PathBuf> {
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let text = format!("    .code64\n    .globl _start\n    .text\n{PRELUDE}\n{src}\n");
    std::fs::write(&s, text)?;
    let out = Command::new("as")
        .args(["--64", "-o"])
        .arg(&o)
        .arg(&s)
        .output()
        .context("running `as` (binutils)")?;
    if !out.status.success() {
        bail!("as failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new("ld")
        .args([
            "-nostdlib",
            "-static",
            "-Ttext=0x1000000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&o)
        .output()
        .context("running `ld` (binutils)")?;
    if !out.status.success() {
        bail!("ld failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(elf)
}

/// Result of one vmm-shim run.
pub struct VmRun {
    /// Exit code (None if killed by a signal or timed out).
    pub code: Option<i32>,
    /// Guest serial output.
    pub serial: String,
    /// vmm-shim's stderr.
    pub stderr: String,
}

/// Runs vmm-shim with `args` (prefixed by `prefix`, e.g. `ip netns exec NS`), killing
/// it after `timeout`.
pub fn run_vmm(prefix: &[&str], args: &[&str], timeout: std::time::Duration) -> Result<VmRun> {
    let bin = integration_tests::bin("vmm-shim");
    let mut cmd = if let Some((first, rest)) = prefix.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().context("spawn vmm-shim")?;
    let mut guard = integration_tests::ChildGuard::new(child);
    let status = guard.wait_timeout(timeout);
    if status.is_none() {
        guard.signal(libc::SIGKILL);
    }
    let mut serial = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    if let Some(o) = guard.child().stdout.as_mut() {
        let _ = o.read_to_string(&mut serial);
    }
    if let Some(e) = guard.child().stderr.as_mut() {
        let _ = e.read_to_string(&mut stderr);
    }
    Ok(VmRun {
        code: status.and_then(|s| s.code()),
        serial,
        stderr,
    })
}
