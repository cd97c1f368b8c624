//! Thin wrappers over the few raw syscalls the VMM needs (TAP reads and writes, poll,
//! signals, two KVM calls); opening a TAP and its ioctls are `fabric_util::sys`,
//! shared with netd. Every `unsafe` block of the crate lives here, but the one call
//! of the `unsafe fn` [`set_user_memory_region`] (vmm.rs), whose contract only the
//! caller can keep.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use fabric_util::sys::TapHeader;

use crate::virtio::net::NetBackend;

/// A TAP queue opened with `IFF_VNET_HDR` (header size 12), non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the TAP interface `name`.
    pub fn open(name: &str) -> io::Result<Tap> {
        let len = u8::try_from(crate::virtio::net::VNET_HDR_LEN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file = File::from(fabric_util::sys::tap_open(name, TapHeader::Vnet { len })?);
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: write(2) from a live slice of the given length to our fd.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into a live, writable slice of the given length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        fabric_util::sys::tap_set_offload(self.file.as_fd(), flags)
    }
}

/// Waits until one of `fds` is readable (or `timeout_ms` passes, -1 = forever);
/// returns a readiness flag per fd.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll(2) on a live array of pollfd of the given length.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter()
        .map(|x| x.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
        .collect())
}

/// The signals that stop the VM.
const TERM_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks SIGTERM/SIGINT/SIGHUP in the calling thread (threads spawned later inherit
/// the mask), so that only [`wait_term_signal`] receives them. The call cannot
/// fail for these signals; nothing is reported.
pub fn block_term_signals() {
    let _ = fabric_util::sys::block_signals(&TERM_SIGNALS);
}

/// Waits for SIGTERM/SIGINT/SIGHUP (which must be blocked); returns the signal
/// (0 if the wait failed).
pub fn wait_term_signal() -> i32 {
    fabric_util::sys::wait_signal(&TERM_SIGNALS).unwrap_or(0)
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Installs a no-op handler for the kick signal (without SA_RESTART, so KVM_RUN returns
/// EINTR).
pub fn install_kick_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data, zeroed then filled.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = noop_handler as *const () as usize;
    sa.sa_flags = 0;
    // SAFETY: installing a handler that does nothing is async-signal-safe.
    let r = unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends the kick signal to a thread.
pub fn kick_thread(t: libc::pthread_t) {
    // SAFETY: pthread_kill on a thread handle that is still joinable (caller keeps it).
    unsafe {
        libc::pthread_kill(t, kick_signal());
    }
}

pub use fabric_util::sd_notify_ready;

/// Registers a guest memory region with KVM.
///
/// # Safety
///
/// `region.userspace_addr .. + memory_size` must be a live mapping of guest memory
/// (`vm-memory`'s `GuestMemoryMmap`) that stays mapped for as long as any vCPU of `vm`
/// can run: KVM reads and writes it on the guest's behalf, so if it were unmapped and
/// the addresses reused, the guest would write into unrelated memory of this process.
/// (This used to be a safe function with that contract in its doc, which let safe code
/// pass any address.)
pub unsafe fn set_user_memory_region(
    vm: &kvm_ioctls::VmFd,
    region: kvm_bindings::kvm_userspace_memory_region,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the caller upholds the contract above; KVM only reads the struct.
    unsafe { vm.set_user_memory_region(region) }
}

/// The suberror of a KVM_EXIT_INTERNAL_ERROR (call only right after that exit).
pub fn internal_error_suberror(vcpu: &mut kvm_ioctls::VcpuFd) -> u32 {
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of
    // the kvm_run union; reading a u32 from it reads initialized data.
    unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror }
}
