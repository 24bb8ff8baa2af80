//! Device models for aivmm.
//!
//! Devices know nothing about the VMM: each one implements [`BusDevice`] and the VMM
//! places it on a [`Bus`] (port I/O or MMIO) that the vCPU exit loop dispatches to.
//! Interrupts and other notifications leave a device through `EventFd`s that the VMM
//! wires to KVM (irqfd) or to its own event loop.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod thread;
pub mod thread_start;
pub mod vfio;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use legacy::{
    BootTimer, EventFdTrigger, SerialConsole, SerialError, SleepControl, BOOT_TIMER_MAGIC,
    BOOT_TIMER_PORT, I8042, I8042_KEYBOARD_IRQ, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT,
    SERIAL_PORT_LEN,
};
