//! One disk's NBD session: a connection that is re-established when it fails, with
//! the requests that were in flight sent again (QEMU's `reconnect-delay`).
//!
//! Theory of operation: [`NbdSession::submit`] hands a batch to the current
//! [`NbdClient`]. When the connection fails (I/O error, timeout, EOF, protocol
//! violation), the connection is dropped and the whole batch is retried on a new one:
//! every request this client sends is idempotent (READ, WRITE, TRIM, WRITE_ZEROES of
//! fixed ranges, FLUSH), and requests of one batch were in flight together, so the
//! server was free to run them in any order anyway. Replies of the failed connection
//! are discarded, so nothing is completed twice. Reconnection is tried, with a growing
//! pause between attempts, until `reconnect_delay` has passed since the connection
//! failed; only then does the batch fail, and the guest see I/O errors. While the
//! delay runs the vCPU waits: the guest sees a stall, not an error. After the delay
//! every batch still tries one connection, so the disk comes back when the server
//! does. A reconnected export must have the size and flags of the first one (the guest
//! sized its disk from them); otherwise it is not used.

use std::time::{Duration, Instant};

use super::{NbdClient, NbdError, Outcome, Request};
use crate::config::DiskSpec;

/// The first pause between reconnection attempts; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A disk's NBD connection that reconnects.
pub struct NbdSession {
    spec: DiskSpec,
    conn: Option<NbdClient>,
    size: u64,
    flags: u16,
    structured: bool,
    /// When the connection failed (None while it works).
    failed_at: Option<Instant>,
    /// Successful reconnections.
    reconnects: u64,
    /// Short READ replies of earlier connections.
    short_reads: u64,
}

/// What a session counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Successful reconnections.
    pub reconnects: u64,
    /// READ replies that did not cover their request (I/O errors).
    pub short_reads: u64,
}

impl NbdSession {
    /// Connects for the first time (no retry: a bad address or export is reported
    /// at start-up).
    pub fn connect(spec: &DiskSpec) -> Result<Self, NbdError> {
        let c = NbdClient::connect_spec(spec)?;
        Ok(NbdSession {
            spec: spec.clone(),
            size: c.size(),
            flags: c.flags(),
            structured: c.structured(),
            conn: Some(c),
            failed_at: None,
            reconnects: 0,
            short_reads: 0,
        })
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & super::TFLAG_READ_ONLY != 0
    }
    /// Whether the first connection negotiated structured replies.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The counters.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            reconnects: self.reconnects,
            short_reads: self.short_reads + self.conn.as_ref().map_or(0, |c| c.short_reads()),
        }
    }

    /// Runs a batch, reconnecting and retrying it while the reconnect delay lasts.
    pub fn submit(&mut self, reqs: &[Request]) -> Result<Vec<Outcome>, NbdError> {
        loop {
            let conn = match self.conn.as_mut() {
                Some(c) => c,
                None => {
                    let deadline = *self.failed_at.get_or_insert_with(Instant::now)
                        + self.spec.reconnect_delay;
                    self.reconnect(deadline)?
                }
            };
            match conn.submit(reqs) {
                Ok(out) => {
                    self.failed_at = None;
                    return Ok(out);
                }
                Err(e) => {
                    tracing::warn!(
                        export = %self.spec.export,
                        error = %crate::error_chain(&e),
                        delay_s = self.spec.reconnect_delay.as_secs(),
                        "NBD connection failed; reconnecting"
                    );
                    self.drop_conn();
                    let since = *self.failed_at.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.spec.reconnect_delay {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn drop_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            self.short_reads += c.short_reads();
        }
    }

    /// Connects again, pausing between attempts, until `deadline`; at least one
    /// attempt is made.
    fn reconnect(&mut self, deadline: Instant) -> Result<&mut NbdClient, NbdError> {
        let mut pause = FIRST_BACKOFF;
        loop {
            let err = match NbdClient::connect_spec(&self.spec) {
                Ok(c) if c.size() == self.size && c.flags() == self.flags => {
                    self.reconnects += 1;
                    tracing::info!(export = %self.spec.export, "NBD connection re-established");
                    return Ok(self.conn.insert(c));
                }
                Ok(c) => NbdError::Protocol(format!(
                    "reconnected export has size {} and flags {:#x}, not {} and {:#x}",
                    c.size(),
                    c.flags(),
                    self.size,
                    self.flags
                )),
                Err(e) => e,
            };
            let now = Instant::now();
            if now + pause > deadline {
                return Err(err);
            }
            tracing::debug!(error = %crate::error_chain(&err), "NBD reconnect attempt failed");
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// Flushes and disconnects (if connected).
    pub fn close(&mut self) -> Result<(), NbdError> {
        match self.conn.as_mut() {
            Some(c) => c.close(),
            None => Err(NbdError::Down),
        }
    }
}
