//! Legacy PC devices on port I/O: the 8250 UART at 0x3f8 (vm-superio, IRQ 4 through an
//! irqfd) and just enough of the i8042 controller for the guest to reset the machine
//! (command 0xfe on port 0x64, what Linux's `reboot=k` does).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

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

/// Console output: stdout (flushed per write, so the first byte shows at once) or a file.
pub enum ConsoleOut {
    /// Standard output.
    Stdout,
    /// A file.
    File(std::fs::File),
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(buf)?;
                o.flush()?;
                Ok(buf.len())
            }
            ConsoleOut::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOut::Stdout => io::stdout().flush(),
            ConsoleOut::File(f) => f.flush(),
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
