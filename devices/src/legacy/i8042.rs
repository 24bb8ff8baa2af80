//! The i8042 keyboard controller, reduced to the one thing a microVM needs from it:
//! the CPU reset command (0xFE written to port 0x64), which Linux uses to reboot.
//!
//! The VMM treats a reset as the guest asking to stop, so it watches the reset `EventFd`
//! and exits when it fires. Everything else reads as 0 and is ignored (via `vm-superio`).

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::trigger::EventFdTrigger;
use crate::bus::BusDevice;

/// Base port of the controller (the data port).
pub const I8042_PORT: u16 = 0x60;
/// Ports covered, from the data port 0x60 to the command/status port 0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// An i8042 controller that signals `reset_evt` when the guest resets the CPU.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
    /// Whether a failure to signal the reset has been logged already.
    reset_error_logged: bool,
}

impl I8042 {
    /// Creates a controller that writes 1 to `reset_evt` on every CPU reset command.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            device: I8042Device::new(EventFdTrigger::new(reset_evt)),
            reset_error_logged: false,
        }
    }

    /// The `EventFd` signalled on CPU reset.
    pub fn reset_evt(&self) -> &EventFd {
        self.device.reset_evt().event_fd()
    }
}

impl BusDevice for I8042 {
    /// 1-byte reads return the controller's answer (always 0); other sizes return all
    /// ones.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(register), [byte]) if u64::from(register) < I8042_PORT_LEN => {
                *byte = self.device.read(register);
            }
            (_, data) => data.fill(0xff),
        }
    }

    /// Only 1-byte writes are meaningful; others are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(register), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if u64::from(register) >= I8042_PORT_LEN {
            return;
        }
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

    fn reset_pending(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(count) => count > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reading the reset EventFd failed: {e}"),
        }
    }

    fn i8042() -> (I8042, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
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
        assert_eq!(byte, [0]);
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
