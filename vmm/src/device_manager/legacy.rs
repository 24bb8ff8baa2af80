//! The legacy devices on the port I/O bus: the serial console (COM1), the i8042 (its
//! reset line), the ACPI sleep control (power off) and the boot timer.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::{
    BootTimer, SerialConsole, SleepControl, BOOT_TIMER_PORT, I8042, I8042_PORT, I8042_PORT_LEN,
    SERIAL_PORT, SERIAL_PORT_LEN,
};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::acpi;
use crate::config::ConsoleConfig;
use crate::console;

/// The serial port's ISA IRQ (COM1).
const SERIAL_IRQ: u32 = 4;

/// What the legacy devices signal to the control loop.
pub struct LegacyEvents {
    /// The guest reset the machine (i8042).
    pub reset: EventFd,
    /// The guest powered off (ACPI S5).
    pub poweroff: EventFd,
    /// The console, whose input the control loop feeds from stdin.
    pub serial: Arc<Mutex<SerialConsole>>,
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> DeviceManagerError {
    move |source| DeviceManagerError::Io { what, source }
}

impl DeviceManager {
    /// Puts the legacy devices on the port bus.
    pub(super) fn add_legacy(
        &mut self,
        console_cfg: &ConsoleConfig,
        start: Instant,
    ) -> Result<LegacyEvents, DeviceManagerError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the serial IRQ"))?;
        self.vm
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "register the serial irqfd",
                source,
            })?;
        let out = console::output(console_cfg).map_err(io_err("the console output"))?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));
        let reset = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the reset event"))?;
        let i8042 = I8042::new(reset.try_clone().map_err(io_err("the reset event"))?);
        let boot_timer = BootTimer::new(start).on_init_reached(|t| {
            eprintln!("aivmm: guest reached init in {} ms", t.as_millis());
        });
        let poweroff = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the power-off event"))?;
        let sleep_control = SleepControl::new(
            acpi::S5_SLP_TYP,
            poweroff
                .try_clone()
                .map_err(io_err("the power-off event"))?,
        );
        self.io_bus.insert(
            Arc::new(Mutex::new(sleep_control)),
            u64::from(acpi::SLEEP_CONTROL_PORT),
            2,
        )?;
        self.io_bus
            .insert(serial.clone(), u64::from(SERIAL_PORT), SERIAL_PORT_LEN)?;
        self.io_bus.insert(
            Arc::new(Mutex::new(i8042)),
            u64::from(I8042_PORT),
            I8042_PORT_LEN,
        )?;
        self.io_bus.insert(
            Arc::new(Mutex::new(boot_timer)),
            u64::from(BOOT_TIMER_PORT),
            1,
        )?;
        Ok(LegacyEvents {
            reset,
            poweroff,
            serial,
        })
    }
}
