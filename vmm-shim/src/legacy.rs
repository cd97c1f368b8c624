//! Legacy PC devices on port I/O: the 8250 UART at 0x3f8 (vm-superio, IRQ 4 through an
//! irqfd) and just enough of the i8042 controller for the guest to reset the machine
//! (command 0xfe on port 0x64, what Linux's `reboot=k` does).
//!
//! Console output is rate limited ([`ConsoleOut`]): a bounded burst, then a steady
//! rate; what a flooding guest writes beyond that is dropped and counted
//! (`serial_dropped` in the log when the VM stops).

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// i8042 command: pulse the reset line.
pub const I8042_RESET: u8 = 0xfe;

/// The serial interrupt: an eventfd registered as irqfd for IRQ 4.
pub struct IrqEvt(pub EventFd);

impl Trigger for IrqEvt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub enum ConsoleSink {
    /// Standard output (flushed per write, so the first byte shows at once).
    Stdout,
    /// A file.
    File(std::fs::File),
}

/// Bytes of console output the guest may send at once before the rate limit applies.
pub const SERIAL_BURST: u64 = 128 << 10;
/// Sustained console output rate, bytes per second; the rest is dropped and counted.
pub const SERIAL_RATE: u64 = 16 << 10;

/// Console output, rate limited: a token bucket of [`SERIAL_BURST`] bytes refilled at
/// [`SERIAL_RATE`] per second. A guest that floods the UART (every byte a vCPU exit
/// and a write to the host's terminal or file) gets its excess dropped and counted
/// in [`ConsoleOut::dropped`], instead of filling the host's disk or log.
pub struct ConsoleOut {
    sink: ConsoleSink,
    tokens: u64,
    refilled: Instant,
    dropped: Arc<AtomicU64>,
}

impl ConsoleOut {
    /// Output to `sink`, with a full bucket.
    pub fn new(sink: ConsoleSink) -> Self {
        ConsoleOut {
            sink,
            tokens: SERIAL_BURST,
            refilled: Instant::now(),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes dropped by the rate limit so far.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Adds the tokens earned since the last refill (whole bytes only, so the
    /// remainder keeps accruing).
    fn refill(&mut self) {
        let ns = self.refilled.elapsed().as_nanos();
        let earned = ns * u128::from(SERIAL_RATE) / 1_000_000_000;
        if earned > 0 {
            let earned = u64::try_from(earned).unwrap_or(u64::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(SERIAL_BURST);
            self.refilled = Instant::now();
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tokens < buf.len() as u64 {
            self.refill();
        }
        let n = buf
            .len()
            .min(usize::try_from(self.tokens).unwrap_or(usize::MAX));
        if n < buf.len()
            && self
                .dropped
                .fetch_add((buf.len() - n) as u64, Ordering::Relaxed)
                == 0
        {
            tracing::warn!("guest console output over the rate limit; excess dropped");
        }
        self.tokens -= n as u64;
        if n > 0 {
            match &mut self.sink {
                ConsoleSink::Stdout => {
                    let mut o = io::stdout().lock();
                    o.write_all(&buf[..n])?;
                    o.flush()?;
                }
                ConsoleSink::File(f) => f.write_all(&buf[..n])?,
            }
        }
        // Dropped bytes count as written: the UART does not retry them.
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            ConsoleSink::Stdout => io::stdout().flush(),
            ConsoleSink::File(f) => f.flush(),
        }
    }
}

/// The emulated UART.
pub type SerialDev = Serial<IrqEvt, vm_superio::serial::NoEvents, ConsoleOut>;

/// What a port write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing.
    None,
    /// The guest reset the machine.
    Reset,
}

/// The port I/O bus.
pub struct PioBus {
    serial: Arc<Mutex<SerialDev>>,
}

impl PioBus {
    /// Creates the bus around the UART.
    pub fn new(serial: Arc<Mutex<SerialDev>>) -> Self {
        PioBus { serial }
    }

    /// A port read.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let v = match port {
            COM1..=0x3ff => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                s.read((port - COM1) as u8)
            }
            // i8042: output buffer empty, input buffer empty.
            I8042_DATA | I8042_CMD => 0,
            _ => 0xff,
        };
        data.fill(v);
    }

    /// A port write.
    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        let Some(&v) = data.first() else {
            return PioAction::None;
        };
        match port {
            COM1..=0x3ff => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = s.write((port - COM1) as u8, v) {
                    tracing::debug!(error = ?e, "serial write failed");
                }
                PioAction::None
            }
            I8042_CMD if v == I8042_RESET => PioAction::Reset,
            _ => PioAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_burst_is_dropped_and_counted() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut out = ConsoleOut::new(ConsoleSink::File(f.reopen().unwrap()));
        let dropped = out.dropped();
        let chunk = vec![b'x'; 4096];
        for _ in 0..(2 * SERIAL_BURST / 4096) {
            assert_eq!(out.write(&chunk).unwrap(), 4096);
        }
        let len = std::fs::metadata(f.path()).unwrap().len();
        // The burst, plus what the rate earned while the loop ran.
        assert!(
            (SERIAL_BURST..SERIAL_BURST + SERIAL_RATE).contains(&len),
            "{len}"
        );
        assert_eq!(dropped.load(Ordering::Relaxed), 2 * SERIAL_BURST - len);
        // After a while the bucket has tokens again.
        std::thread::sleep(std::time::Duration::from_millis(100));
        out.write_all(b"ok").unwrap();
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), len + 2);
    }
}
