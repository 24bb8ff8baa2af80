//! The state of an emulated MSI capability, decoded from the shadow config space after
//! each guest write: whether MSI is on, how many vectors, their messages and masks.

use crate::pci::{MsiMessage, PciConfiguration};

use super::caps::{MSI_CTRL_ENABLE, MSI_CTRL_MME_MASK, MSI_CTRL_MME_SHIFT};
use super::config::MsiCap;

/// What the guest programmed into an MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiState {
    pub enabled: bool,
    /// Vectors in use: what the guest enabled (Multiple Message Enable), at most what the
    /// capability offers.
    pub count: u16,
    pub address: u64,
    pub data: u16,
    /// Per-vector mask bits (0 without per-vector masking).
    pub mask: u32,
}

/// Reads `len` (1..=4) bytes at config byte `offset` from the shadow, little-endian.
fn read_bytes(shadow: &PciConfiguration, offset: usize, len: usize) -> u32 {
    let reg = shadow.read_reg(offset / 4);
    let shift = (offset % 4) * 8;
    let value = reg >> shift;
    if len >= 4 {
        value
    } else {
        value & ((1u32 << (len * 8)) - 1)
    }
}

/// The 16-bit field at byte `offset` of config space.
fn read_u16(shadow: &PciConfiguration, offset: usize) -> u16 {
    let [lo, hi, ..] = read_bytes(shadow, offset, 2).to_le_bytes();
    u16::from_le_bytes([lo, hi])
}

impl MsiState {
    pub fn read(cap: &MsiCap, shadow: &PciConfiguration) -> Self {
        let layout = cap.layout;
        let ctrl = read_u16(shadow, cap.offset + 2);
        let mme = (ctrl & MSI_CTRL_MME_MASK) >> MSI_CTRL_MME_SHIFT;
        let requested = 1u16 << mme.min(5);
        let lo = u64::from(read_bytes(shadow, cap.offset + 4, 4));
        let hi = layout
            .address_hi()
            .map_or(0, |o| u64::from(read_bytes(shadow, cap.offset + o, 4)));
        MsiState {
            enabled: ctrl & MSI_CTRL_ENABLE != 0,
            count: requested.min(layout.max_vectors),
            address: lo | (hi << 32),
            data: read_u16(shadow, cap.offset + layout.data()),
            mask: layout
                .mask()
                .map_or(0, |o| read_bytes(shadow, cap.offset + o, 4)),
        }
    }

    /// The message of `vector`: with several vectors the low bits of the data carry the
    /// vector number.
    pub fn message(&self, vector: u16) -> MsiMessage {
        let low = self.count.max(1) - 1;
        MsiMessage {
            addr: self.address,
            data: u32::from((self.data & !low) | (vector & low)),
        }
    }

    pub fn masked(&self, vector: u16) -> bool {
        vector >= 32 || self.mask & (1 << vector) != 0
    }
}
