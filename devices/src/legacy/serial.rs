//! The guest's serial console: a 16550A UART at port 0x3f8.
//!
//! `vm-superio` emulates the UART registers; this wrapper puts it on the port I/O bus,
//! feeds it host input, and keeps a broken output sink (a closed stdout, a full pipe)
//! from disturbing the guest or the VMM: the byte is dropped, counted, and logged once.

use std::io::{self, Write};

use thiserror::Error;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::trigger::EventFdTrigger;
use crate::bus::BusDevice;

/// Base port of the console (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Number of UART registers; the console occupies this many ports.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Errors from the serial console.
#[derive(Debug, Error)]
pub enum SerialError {
    /// Input was queued but the guest could not be interrupted about it.
    #[error("Failed to signal the serial interrupt after queuing {queued} input bytes: {source}")]
    Interrupt {
        /// Bytes that were queued in the receive FIFO anyway.
        queued: usize,
        /// Error from writing the interrupt `EventFd`.
        source: io::Error,
    },
    /// A byte the guest sent could not be written to the output sink.
    #[error("Failed to write serial output byte {byte:#04x}: {source}")]
    Output {
        /// The byte that was lost.
        byte: u8,
        /// Error from the output sink.
        source: io::Error,
    },
}

type Uart = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A UART whose transmit side writes to a host sink and whose interrupt is an
/// `EventFd` (the VMM registers it as the irqfd for GSI 4).
pub struct SerialConsole {
    uart: Uart,
    /// Guest bytes the sink refused.
    lost_output_bytes: u64,
    /// Whether an output failure has been logged already (only the first one is).
    output_error_logged: bool,
    /// Whether an interrupt failure has been logged already (only the first one is).
    interrupt_error_logged: bool,
}

impl SerialConsole {
    /// Creates a console that raises `interrupt` and writes guest output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(interrupt), out),
            lost_output_bytes: 0,
            output_error_logged: false,
            interrupt_error_logged: false,
        }
    }

    /// Queues host input (for example stdin) for the guest to read from the receive
    /// buffer, and interrupts the guest if it enabled receive interrupts.
    ///
    /// Returns how many bytes were accepted. When the receive FIFO fills up, the bytes
    /// that do not fit are **not** queued: the result is then less than `bytes.len()`
    /// (0 when the FIFO was already full), and it is up to the caller to retry the rest
    /// later or drop it. A full FIFO is not an error. [`fifo_capacity`](Self::fifo_capacity)
    /// tells how many bytes would fit.
    ///
    /// Fails only if the interrupt could not be signalled; the bytes are queued anyway.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let queued = bytes.len().min(self.uart.fifo_capacity());
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(count) => Ok(count),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(source)) => Err(SerialError::Interrupt { queued, source }),
            // Queuing input does not touch the output sink; kept for completeness.
            Err(UartError::IOError(source)) => Err(SerialError::Output { byte: 0, source }),
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Number of guest output bytes the sink failed to take.
    pub fn lost_output_bytes(&self) -> u64 {
        self.lost_output_bytes
    }

    fn handle_uart_error(&mut self, byte: u8, error: UartError<io::Error>) {
        match error {
            UartError::IOError(source) => {
                self.lost_output_bytes += 1;
                if !self.output_error_logged {
                    self.output_error_logged = true;
                    log::warn!(
                        "{}; further serial output errors are not logged",
                        SerialError::Output { byte, source }
                    );
                }
            }
            UartError::Trigger(source) => {
                if !self.interrupt_error_logged {
                    self.interrupt_error_logged = true;
                    log::error!(
                        "Failed to signal the serial interrupt: {source}; further interrupt errors are not logged"
                    );
                }
            }
            // Only returned when queuing input, never by a register write.
            UartError::FullFifo => {}
        }
    }
}

impl BusDevice for SerialConsole {
    /// Only 1-byte accesses to the 8 registers are meaningful; any other read
    /// returns all ones, like an unclaimed port.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(register), [byte]) if u64::from(register) < SERIAL_PORT_LEN => {
                *byte = self.uart.read(register);
            }
            (_, data) => data.fill(0xff),
        }
    }

    /// Only 1-byte accesses to the 8 registers are meaningful; any other write is
    /// ignored.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(register), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if u64::from(register) >= SERIAL_PORT_LEN {
            return;
        }
        if let Err(error) = self.uart.write(register, *value) {
            self.handle_uart_error(*value, error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    // Register offsets and bits, from the 16550A data sheet.
    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THR_EMPTY: u8 = 0x02;
    const IIR_NONE: u8 = 0x01;
    const IIR_THR_EMPTY: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;
    const LSR_DATA_READY: u8 = 0x01;

    /// An output sink the test can inspect.
    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An output sink that always fails, like a closed pipe.
    struct BrokenSink;

    impl Write for BrokenSink {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn console_with(out: Box<dyn Write + Send>) -> (SerialConsole, EventFd) {
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let console = SerialConsole::new(interrupt.try_clone().unwrap(), out);
        (console, interrupt)
    }

    fn read_reg(console: &mut SerialConsole, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        console.read(offset, &mut data);
        data[0]
    }

    fn interrupt_pending(interrupt: &EventFd) -> bool {
        match interrupt.read() {
            Ok(count) => count > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reading the interrupt EventFd failed: {e}"),
        }
    }

    #[test]
    fn thr_write_reaches_the_sink() {
        let sink = SharedSink::default();
        let (mut console, interrupt) = console_with(Box::new(sink.clone()));
        for &b in b"hi\n" {
            console.write(DATA, &[b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        // Interrupts are disabled after reset.
        assert!(!interrupt_pending(&interrupt));
    }

    #[test]
    fn thr_write_with_ier_raises_the_interrupt() {
        let sink = SharedSink::default();
        let (mut console, interrupt) = console_with(Box::new(sink.clone()));

        // Enabling the THR-empty interrupt asserts it at once: the transmitter is empty.
        console.write(IER, &[IER_THR_EMPTY]);
        assert!(interrupt_pending(&interrupt));
        // Reading IIR reports and acknowledges it.
        assert_eq!(read_reg(&mut console, IIR) & 0x0f, IIR_THR_EMPTY);
        assert_eq!(read_reg(&mut console, IIR) & 0x0f, IIR_NONE);

        console.write(DATA, b"x");
        assert!(interrupt_pending(&interrupt));
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"x");
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let (mut console, interrupt) = console_with(Box::new(io::sink()));
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);

        assert_eq!(console.enqueue_input(b"ab").unwrap(), 2);
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        // Receive interrupts are disabled, so none was raised.
        assert!(!interrupt_pending(&interrupt));

        assert_eq!(read_reg(&mut console, DATA), b'a');
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read_reg(&mut console, DATA), b'b');
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_with_rda_enabled_raises_the_interrupt() {
        let (mut console, interrupt) = console_with(Box::new(io::sink()));
        console.write(IER, &[IER_RDA]);
        assert!(!interrupt_pending(&interrupt));
        console.enqueue_input(b"z").unwrap();
        assert!(interrupt_pending(&interrupt));
        assert_eq!(read_reg(&mut console, IIR) & 0x0f, IIR_RDA);
    }

    #[test]
    fn full_fifo_accepts_what_fits() {
        let (mut console, _interrupt) = console_with(Box::new(io::sink()));
        let capacity = console.fifo_capacity();
        assert!(capacity > 0);
        let input: Vec<u8> = (0..capacity + 10).map(|i| i.to_le_bytes()[0]).collect();

        assert_eq!(console.enqueue_input(&input).unwrap(), capacity);
        assert_eq!(console.fifo_capacity(), 0);
        assert_eq!(console.enqueue_input(b"more").unwrap(), 0);
        assert_eq!(console.enqueue_input(b"").unwrap(), 0);

        // The accepted prefix comes out in order; the excess was not queued.
        for expected in input.iter().take(capacity) {
            assert_eq!(read_reg(&mut console, DATA), *expected);
        }
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn broken_sink_does_not_panic_and_counts_lost_bytes() {
        let (mut console, interrupt) = console_with(Box::new(BrokenSink));
        console.write(IER, &[IER_THR_EMPTY]);
        assert!(interrupt_pending(&interrupt));
        read_reg(&mut console, IIR);

        console.write(DATA, b"a");
        console.write(DATA, b"b");
        assert_eq!(console.lost_output_bytes(), 2);
        // The guest still gets its THR-empty interrupt, so it does not stall.
        assert!(interrupt_pending(&interrupt));
    }

    #[test]
    fn wrong_size_accesses() {
        let sink = SharedSink::default();
        let (mut console, _interrupt) = console_with(Box::new(sink.clone()));
        console.enqueue_input(b"q").unwrap();

        let mut wide = [0u8; 2];
        console.read(DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        // The wide read did not consume the byte.
        assert_eq!(read_reg(&mut console, LSR) & LSR_DATA_READY, LSR_DATA_READY);

        console.write(DATA, b"xy");
        console.write(DATA, &[]);
        assert!(sink.0.lock().unwrap().is_empty());

        // Past the 8 registers.
        assert_eq!(read_reg(&mut console, SERIAL_PORT_LEN), 0xff);
        assert_eq!(read_reg(&mut console, 0x1_0000_0000), 0xff);
    }
}
