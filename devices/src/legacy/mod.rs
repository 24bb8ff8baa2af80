//! Legacy PC devices: just enough for a Linux guest to print, to reboot, to be sent
//! Ctrl+Alt+Del, and to tell the VMM when it has booted.
//!
//! The serial port and the i8042 reset logic come from `vm-superio`; this module adapts
//! them to [`BusDevice`](crate::BusDevice) and to `EventFd` notification.

pub mod boot_timer;
pub mod i8042;
pub mod keyboard;
pub mod serial;
pub mod sleep_control;
pub mod trigger;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
pub use i8042::{I8042, I8042_KEYBOARD_IRQ, I8042_PORT, I8042_PORT_LEN};
pub use serial::{SerialConsole, SerialError, SERIAL_PORT, SERIAL_PORT_LEN};
pub use sleep_control::SleepControl;
pub use trigger::EventFdTrigger;
