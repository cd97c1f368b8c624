//! What a virtio-blk device talks to: the [`BlockBackend`] trait, its production
//! implementation on an NBD connection, and [`MemDisk`], an in-memory disk for unit
//! tests and the fuzz harness.
//!
//! The device hands the backend all requests of one batch in one [`BlockBackend::submit`]
//! call, so a backend may keep them in flight together (the NBD client pipelines them
//! on its socket). The answer is one [`Outcome`] per request, in request order; an `Err`
//! from `submit` itself means the backend is gone and every request of the batch failed.

use crate::nbd::{self, NbdClient, NbdError, NbdSession, Outcome, Request, SessionStats};

/// What a block device talks to.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read-only export.
    fn read_only(&self) -> bool;
    /// FLUSH supported.
    fn can_flush(&self) -> bool;
    /// TRIM supported.
    fn can_trim(&self) -> bool;
    /// WRITE_ZEROES supported.
    fn can_write_zeroes(&self) -> bool;
    /// Runs requests (in flight together); an `Err` means the backend is gone.
    fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError>;
    /// Flushes and disconnects.
    fn close(&mut self) -> Result<(), NbdError>;
    /// Reconnections and short reads so far (for the log when the VM stops).
    fn stats(&self) -> SessionStats {
        SessionStats::default()
    }
}

/// A backend shared between the device (which asks it for size and flags, and closes
/// it) and the disk's I/O thread (which runs the requests without the device lock).
impl<B: BlockBackend> BlockBackend for std::sync::Arc<std::sync::Mutex<B>> {
    fn size(&self) -> u64 {
        self.lock().unwrap_or_else(|e| e.into_inner()).size()
    }
    fn read_only(&self) -> bool {
        self.lock().unwrap_or_else(|e| e.into_inner()).read_only()
    }
    fn can_flush(&self) -> bool {
        self.lock().unwrap_or_else(|e| e.into_inner()).can_flush()
    }
    fn can_trim(&self) -> bool {
        self.lock().unwrap_or_else(|e| e.into_inner()).can_trim()
    }
    fn can_write_zeroes(&self) -> bool {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .can_write_zeroes()
    }
    fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).submit(reqs)
    }
    fn close(&mut self) -> Result<(), NbdError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).close()
    }
    fn stats(&self) -> SessionStats {
        self.lock().unwrap_or_else(|e| e.into_inner()).stats()
    }
}

/// The [`BlockBackend`] of an NBD connection type ([`NbdSession`], [`NbdClient`]):
/// the size and read-only flag from the handshake, FLUSH, TRIM and WRITE_ZEROES as
/// the server's transmission flags offer them; then any further method (`stats`).
macro_rules! nbd_backend {
    ($ty:ident $(, $more:item)*) => {
        impl BlockBackend for $ty {
            fn size(&self) -> u64 {
                $ty::size(self)
            }
            fn read_only(&self) -> bool {
                $ty::read_only(self)
            }
            fn can_flush(&self) -> bool {
                self.flags() & nbd::TFLAG_SEND_FLUSH != 0
            }
            fn can_trim(&self) -> bool {
                self.flags() & nbd::TFLAG_SEND_TRIM != 0
            }
            fn can_write_zeroes(&self) -> bool {
                self.flags() & nbd::TFLAG_SEND_WRITE_ZEROES != 0
            }
            fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
                $ty::submit(self, reqs)
            }
            fn close(&mut self) -> Result<(), NbdError> {
                $ty::close(self)
            }
            $($more)*
        }
    };
}

nbd_backend!(
    NbdSession,
    fn stats(&self) -> SessionStats {
        NbdSession::stats(self)
    }
);
nbd_backend!(NbdClient);

/// errno a [`MemDisk`] answers for a request outside the disk (EINVAL).
const EINVAL: u32 = 22;

/// An in-memory disk that records what it was asked: the backend of the device's unit
/// tests and of [`crate::fuzzing`]. It offers FLUSH, TRIM and WRITE_ZEROES; TRIM and
/// WRITE_ZEROES zero the range. A request outside the disk fails with EINVAL (the
/// device never sends one, but the fuzz harness must not depend on that).
#[derive(Debug, Default)]
pub struct MemDisk {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Present the export as read-only.
    pub read_only: bool,
    /// Answer every request with this errno.
    pub fail_errno: Option<u32>,
    /// Fail every submission as a dead connection does.
    pub dead: bool,
    /// Keep every submission in `submits` (off in the fuzz harness, whose long runs
    /// would pile up the written data).
    pub record: bool,
    /// Every submission, in order, while `record` is on.
    pub submits: Vec<Vec<Request>>,
}

impl MemDisk {
    /// A zeroed, writable disk of `size` bytes that records its submissions.
    pub fn new(size: usize) -> Self {
        MemDisk {
            data: vec![0; size],
            record: true,
            ..Default::default()
        }
    }

    /// The bytes `offset..offset + len`, if they lie on the disk.
    fn range(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let o = usize::try_from(offset).ok()?;
        self.data.get_mut(o..o.checked_add(len)?)
    }

    fn run(&mut self, r: &Request) -> Outcome {
        if let Some(e) = self.fail_errno {
            return Err(e);
        }
        match r {
            Request::Read { offset, len } => self
                .range(*offset, *len as usize)
                .map(|s| s.to_vec())
                .ok_or(EINVAL),
            Request::Write { offset, data } => {
                let s = self.range(*offset, data.len()).ok_or(EINVAL)?;
                s.copy_from_slice(data);
                Ok(vec![])
            }
            Request::Trim { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                self.range(*offset, *len as usize).ok_or(EINVAL)?.fill(0);
                Ok(vec![])
            }
            Request::Flush => Ok(vec![]),
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_write_zeroes(&self) -> bool {
        true
    }
    fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        if self.record {
            self.submits.push(reqs.to_vec());
        }
        if self.dead {
            return Err(NbdError::Down);
        }
        Ok(reqs.iter().map(|r| self.run(r)).collect())
    }
    fn close(&mut self) -> Result<(), NbdError> {
        Ok(())
    }
}
