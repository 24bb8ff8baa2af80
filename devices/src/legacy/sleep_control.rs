//! The ACPI hardware-reduced sleep control register: how a guest `poweroff` reaches the VMM.
//!
//! The FADT points the guest's X_SLEEP_CONTROL_REG at this one-byte I/O register and the
//! DSDT's `_S5_` object gives the sleep type; entering S5 writes `(SLP_TYP << 2) | SLP_EN`.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// SLP_EN: the write that actually enters the sleep state.
pub const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Signals `poweroff_evt` when the guest enters the sleep state `s5_type`.
pub struct SleepControl {
    s5_type: u8,
    poweroff_evt: EventFd,
}

impl SleepControl {
    pub fn new(s5_type: u8, poweroff_evt: EventFd) -> Self {
        SleepControl {
            s5_type,
            poweroff_evt,
        }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken".
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        if offset != 0 || value & SLP_EN == 0 {
            return;
        }
        let typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if typ == self.s5_type {
            if let Err(e) = self.poweroff_evt.write(1) {
                log::error!("cannot signal guest power-off: {e}");
            }
        } else {
            log::info!("guest asked for unsupported sleep type {typ}; ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SleepControl::new(5, evt.try_clone().unwrap());
        dev.write(0, &[5 << 2]); // no SLP_EN
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3
        dev.write(0, &[0x34, 0]); // wrong size
        dev.write(1, &[0x34]); // status register
        assert!(evt.read().is_err(), "nothing signalled yet");
        dev.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
