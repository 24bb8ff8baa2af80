//! The i8042 keyboard controller, reduced to what a microVM needs from it:
//! - the CPU reset command (0xFE written to port 0x64), which Linux uses to reboot (via
//!   `vm-superio`); the VMM treats a reset as the guest asking to stop, so it watches the
//!   reset `EventFd` and exits when it fires;
//! - the controller commands Linux's i8042 driver sends when it probes: read and write the
//!   configuration byte (CTR), self-tests, port enable/disable, and the auxiliary (mouse)
//!   port checks, answered as "no mouse port". Every unanswered command costs the guest a 0.5 s timeout (an
//!   unanswered CTR read cost 1.3-1.8 s of boot in the nested rig).
//!
//! - a keyboard ([`super::keyboard`]) that answers `atkbd`'s probe, so that the VMM can press
//!   Ctrl+Alt+Del (Firecracker's `SendCtrlAltDel`); its bytes raise IRQ 1.
//!
//! Linux finds the keyboard through the DSDT (`PS2K`, PNP0303, IRQ 1); Firecracker's usual
//! `i8042.nopnp i8042.dumbkbd` makes it probe the ports directly instead.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::keyboard::{BufferFull, Keyboard};
use super::trigger::EventFdTrigger;
use crate::bus::BusDevice;

/// The keyboard's ISA interrupt.
pub const I8042_KEYBOARD_IRQ: u32 = 1;

/// Base port of the controller (the data port).
pub const I8042_PORT: u16 = 0x60;
/// Ports covered, from the data port 0x60 to the command/status port 0x64.
pub const I8042_PORT_LEN: u64 = 5;

const DATA: u8 = 0;
const COMMAND: u8 = 4;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2;
const STATUS_NOT_INHIBITED: u8 = 1 << 4;

// CTR bits.
const CTR_KBD_INT: u8 = 1 << 0;
const CTR_SYSTEM: u8 = 1 << 2;
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;

/// What firmware leaves behind: keyboard interrupt on, POST passed, scancode translation.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYSTEM | CTR_TRANSLATE;
const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// Interface test result "clock line stuck low": Linux then takes the mouse port as absent.
const AUX_TEST_FAILED: u8 = 0x01;
/// The loopback answer without the status register's AUX-data bit: Linux reads it as "no
/// loopback" at once, then runs the interface test.
const AUX_LOOP_NONE: u8 = 0x00;

/// Where the byte on the data port came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Controller,
    Keyboard,
}

/// An i8042 controller that signals `reset_evt` when the guest resets the CPU.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
    /// Whether a failure to signal the reset, or the keyboard interrupt, has been logged.
    reset_error_logged: bool,
    irq_error_logged: bool,
    /// The controller configuration byte.
    ctr: u8,
    /// A byte waiting for the guest on the data port.
    output: Option<(u8, Source)>,
    /// The last command, when it waits for a data byte (write CTR, aux loopback).
    pending: Option<u8>,
    keyboard: Keyboard,
    /// Written for every keyboard byte put on the data port (IRQ 1's irqfd).
    keyboard_irq: EventFd,
}

impl I8042 {
    /// Creates a controller that writes 1 to `reset_evt` on every CPU reset command and to
    /// `keyboard_irq` for every keyboard byte it hands the guest.
    pub fn new(reset_evt: EventFd, keyboard_irq: EventFd) -> Self {
        Self {
            device: I8042Device::new(EventFdTrigger::new(reset_evt)),
            reset_error_logged: false,
            irq_error_logged: false,
            ctr: CTR_DEFAULT,
            output: None,
            pending: None,
            keyboard: Keyboard::new(),
            keyboard_irq,
        }
    }

    /// Presses and releases Ctrl+Alt+Del on the keyboard (Firecracker's `SendCtrlAltDel`).
    /// Fails when the guest has left earlier key presses unread.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), BufferFull> {
        self.keyboard
            .press_ctrl_alt_del(self.ctr & CTR_TRANSLATE != 0)?;
        self.feed_keyboard_byte();
        Ok(())
    }

    /// A controller answer for the data port. It goes ahead of a keyboard byte still
    /// waiting there, which is handed out again afterwards.
    fn answer(&mut self, byte: u8) {
        if let Some((kbd, Source::Keyboard)) = self.output {
            self.keyboard.unpop(kbd);
        }
        self.output = Some((byte, Source::Controller));
    }

    /// Moves the keyboard's next byte to the empty data port, with its interrupt, unless
    /// the guest disabled the keyboard.
    fn feed_keyboard_byte(&mut self) {
        if self.output.is_some() || self.ctr & CTR_KBD_DISABLED != 0 {
            return;
        }
        let Some(byte) = self.keyboard.pop() else {
            return;
        };
        self.output = Some((byte, Source::Keyboard));
        if self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = self.keyboard_irq.write(1) {
                if !self.irq_error_logged {
                    self.irq_error_logged = true;
                    log::error!("Failed to raise the i8042 keyboard interrupt: {e}");
                }
            }
        }
    }

    /// The `EventFd` signalled on CPU reset.
    pub fn reset_evt(&self) -> &EventFd {
        self.device.reset_evt().event_fd()
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_some() {
            STATUS_OUTPUT_FULL
        } else {
            0
        };
        let system = if self.ctr & CTR_SYSTEM != 0 {
            STATUS_SYSTEM
        } else {
            0
        };
        // The input buffer is never full (every write is handled at once), and no byte
        // ever comes from the mouse port (the AUX-data bit stays clear).
        full | system | STATUS_NOT_INHIBITED
    }

    fn command(&mut self, cmd: u8) {
        // A new command cancels one still waiting for its data byte.
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_WRITE_CTR | CMD_AUX_LOOP => self.pending = Some(cmd),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_TEST => self.answer(KBD_TEST_OK),
            CMD_AUX_TEST => self.answer(AUX_TEST_FAILED),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLED,
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            // CPU reset goes to vm-superio (the caller passes every command on); the rest
            // (output port, A20, writes to the mouse, ...) has nothing behind it.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(_) => self.answer(AUX_LOOP_NONE),
            None => self.keyboard.receive(value),
        }
    }
}

impl BusDevice for I8042 {
    /// 1-byte reads: the data port hands out the pending byte (0 when none), the command
    /// port reads the status. Other sizes and offsets read all ones.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(DATA), [byte]) => {
                *byte = self.output.take().map_or(0, |(b, _)| b);
                self.feed_keyboard_byte();
            }
            (Ok(COMMAND), [byte]) => *byte = self.status(),
            (Ok(register), [byte]) if u64::from(register) < I8042_PORT_LEN => *byte = 0,
            (_, data) => data.fill(0xff),
        }
    }

    /// Only 1-byte writes are meaningful; others are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(register), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        match register {
            COMMAND => self.command(*value),
            DATA => self.data(*value),
            _ => return,
        }
        // An enabled keyboard, an answer to a keyboard command or a freed data port.
        self.feed_keyboard_byte();
        if let Err(e) = self.device.write(register, *value) {
            if !self.reset_error_logged {
                self.reset_error_logged = true;
                log::error!("Failed to signal the i8042 CPU reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    const COMMAND: u64 = 4;
    const CMD_RESET_CPU: u8 = 0xfe;
    const STATUS_AUX_DATA: u8 = 1 << 5;

    fn reset_pending(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(count) => count > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reading the reset EventFd failed: {e}"),
        }
    }

    fn i8042() -> (I8042, EventFd) {
        let (dev, reset, _irq) = i8042_with_irq();
        (dev, reset)
    }

    fn i8042_with_irq() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (dev, reset, irq)
    }

    /// Interrupts raised since the last call.
    fn irqs(evt: &EventFd) -> u64 {
        match evt.read() {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("reading the IRQ EventFd failed: {e}"),
        }
    }

    #[test]
    fn reset_command_signals_the_event() {
        let (mut dev, evt) = i8042();
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert!(reset_pending(&evt));
        // The accessor hands out the same event.
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(dev.reset_evt().read().unwrap(), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let (mut dev, evt) = i8042();
        for value in [0x00, 0x20, 0x60, 0xaa, 0xad, 0xd1, 0xfd, 0xff] {
            dev.write(COMMAND, &[value]);
        }
        // 0xFE on the data port, and as a wide write on the command port.
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND, &[CMD_RESET_CPU, 0]);
        dev.write(COMMAND, &[]);
        assert!(!reset_pending(&evt));
    }

    #[test]
    fn reads() {
        let (mut dev, _evt) = i8042();
        let mut byte = [0xaau8; 1];
        dev.read(COMMAND, &mut byte);
        assert_eq!(byte, [STATUS_SYSTEM | STATUS_NOT_INHIBITED]);
        dev.read(0, &mut byte);
        assert_eq!(byte, [0], "nothing pending reads 0");
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.read(I8042_PORT_LEN, &mut byte);
        assert_eq!(byte, [0xff]);
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    /// Linux's i8042_command(): wait for the answer in the status register, then read it.
    fn answer(dev: &mut I8042, cmd: u8) -> Option<u8> {
        dev.write(COMMAND, &[cmd]);
        if read(dev, COMMAND) & STATUS_OUTPUT_FULL == 0 {
            return None;
        }
        let byte = read(dev, 0);
        assert_eq!(
            read(dev, COMMAND) & STATUS_OUTPUT_FULL,
            0,
            "read empties it"
        );
        Some(byte)
    }

    #[test]
    fn answers_the_probe_of_linux_i8042_driver() {
        let (mut dev, evt) = i8042();
        assert_eq!(answer(&mut dev, CMD_READ_CTR), Some(CTR_DEFAULT));
        assert_eq!(
            answer(&mut dev, CMD_READ_CTR),
            Some(CTR_DEFAULT),
            "stable reads"
        );
        // Write the CTR back with the keyboard disabled, as the driver does, and read it.
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(0, &[CTR_KBD_DISABLED | CTR_SYSTEM]);
        assert_eq!(
            answer(&mut dev, CMD_READ_CTR),
            Some(CTR_KBD_DISABLED | CTR_SYSTEM)
        );
        dev.write(COMMAND, &[CMD_ENABLE_KBD]);
        dev.write(COMMAND, &[CMD_DISABLE_AUX]);
        assert_eq!(
            answer(&mut dev, CMD_READ_CTR),
            Some(CTR_AUX_DISABLED | CTR_SYSTEM)
        );
        assert_eq!(answer(&mut dev, CMD_SELF_TEST), Some(SELF_TEST_OK));
        assert_eq!(answer(&mut dev, CMD_KBD_TEST), Some(KBD_TEST_OK));
        // No mouse port: the loopback answers without the AUX-data status bit, the
        // interface test reports a stuck clock line.
        dev.write(COMMAND, &[CMD_AUX_LOOP]);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(0, &[0x5a]);
        assert_eq!(
            read(&mut dev, COMMAND) & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL
        );
        assert_eq!(read(&mut dev, 0), AUX_LOOP_NONE);
        assert_eq!(answer(&mut dev, CMD_AUX_TEST), Some(AUX_TEST_FAILED));
        // Unknown controller commands get no answer.
        assert_eq!(answer(&mut dev, 0xd1), None);
        assert!(!reset_pending(&evt));
    }

    /// What Linux's i8042 interrupt handler does: one status read, one data read.
    fn interrupt_byte(dev: &mut I8042) -> Option<u8> {
        (read(dev, COMMAND) & STATUS_OUTPUT_FULL != 0).then(|| read(dev, 0))
    }

    #[test]
    fn keyboard_commands_are_answered_one_byte_per_interrupt() {
        let (mut dev, _reset, irq) = i8042_with_irq();
        // atkbd's identify command.
        dev.write(0, &[0xf2]);
        let mut got = Vec::new();
        while let Some(b) = interrupt_byte(&mut dev) {
            got.push(b);
        }
        assert_eq!(got, [0xfa, 0xab, 0x83]);
        assert_eq!(irqs(&irq), 3);
    }

    #[test]
    fn ctrl_alt_del_reaches_the_guest_in_the_scancode_set_it_reads() {
        let (mut dev, reset, irq) = i8042_with_irq();
        dev.send_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while let Some(b) = interrupt_byte(&mut dev) {
            got.push(b);
        }
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(irqs(&irq), 8);
        // Translation off: set 2 codes.
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(0, &[CTR_KBD_INT | CTR_SYSTEM]);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(interrupt_byte(&mut dev), Some(0x14));
        assert!(!reset_pending(&reset));
    }

    #[test]
    fn a_disabled_keyboard_holds_its_bytes_and_answers_go_first() {
        let (mut dev, _reset, irq) = i8042_with_irq();
        dev.write(COMMAND, &[CMD_DISABLE_KBD]);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(interrupt_byte(&mut dev), None);
        assert_eq!(irqs(&irq), 0);
        dev.write(COMMAND, &[CMD_ENABLE_KBD]);
        assert_eq!(irqs(&irq), 1);
        // A controller command answered while Ctrl's press waits on the data port: the
        // answer is read first, then Ctrl, nothing lost.
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(interrupt_byte(&mut dev), Some(SELF_TEST_OK));
        assert_eq!(interrupt_byte(&mut dev), Some(0x1d));
        // With the interrupt bit cleared, bytes still arrive but raise nothing.
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(0, &[CTR_SYSTEM | CTR_TRANSLATE]);
        irqs(&irq);
        assert_eq!(interrupt_byte(&mut dev), Some(0x38));
        assert_eq!(irqs(&irq), 0);
        // A guest that never reads: the buffer fills and further presses are refused.
        while dev.send_ctrl_alt_del().is_ok() {}
        assert!(dev.send_ctrl_alt_del().is_err());
    }

    #[test]
    fn a_command_cancels_a_pending_ctr_write() {
        let (mut dev, _evt) = i8042();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(COMMAND, &[CMD_ENABLE_AUX]);
        // This data byte is a keyboard command now (acknowledged), not the CTR.
        dev.write(0, &[0x00]);
        assert_eq!(interrupt_byte(&mut dev), Some(0xfa));
        assert_eq!(answer(&mut dev, CMD_READ_CTR), Some(CTR_DEFAULT));
    }
}
