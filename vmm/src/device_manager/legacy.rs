//! The legacy devices on the port I/O bus: the serial console (COM1), the i8042 (its
//! reset line and a keyboard for Ctrl+Alt+Del), the ACPI sleep control (power off) and the
//! boot timer.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::{
    BootTimer, SerialConsole, SleepControl, BOOT_TIMER_PORT, I8042, I8042_KEYBOARD_IRQ, I8042_PORT,
    I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN,
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
        let serial_irq = self.isa_irq(SERIAL_IRQ, "the serial IRQ")?;
        let out = console::output(console_cfg).map_err(io_err("the console output"))?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));
        let reset = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the reset event"))?;
        let keyboard_irq = self.isa_irq(I8042_KEYBOARD_IRQ, "the keyboard IRQ")?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            reset.try_clone().map_err(io_err("the reset event"))?,
            keyboard_irq,
        )));
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
        self.io_bus
            .insert(i8042.clone(), u64::from(I8042_PORT), I8042_PORT_LEN)?;
        self.i8042 = Some(i8042);
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

    /// An `EventFd` that raises ISA interrupt `irq` when written.
    fn isa_irq(&self, irq: u32, what: &'static str) -> Result<EventFd, DeviceManagerError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err(what))?;
        self.vm
            .register_irqfd(&evt, irq)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "register a legacy irqfd",
                source,
            })?;
        Ok(evt)
    }

    /// Presses Ctrl+Alt+Del on the i8042's keyboard (Firecracker's `SendCtrlAltDel`).
    pub fn send_ctrl_alt_del(&self) -> Result<(), String> {
        let i8042 = self
            .i8042
            .as_ref()
            .ok_or("the VM has no i8042 controller")?;
        i8042
            .lock()
            .map_err(|_| "the i8042 controller is poisoned".to_string())?
            .send_ctrl_alt_del()
            .map_err(|_| {
                "the guest has not read the keys sent before (does its kernel have the i8042 \
                 and AT keyboard drivers?)"
                    .to_string()
            })
    }
}
