//! PCI: configuration space, the device trait, and bus 0 with its two config access
//! mechanisms (port I/O 0xCF8/0xCFC and ECAM).
//!
//! These are device models only: nothing here knows about KVM or the VMM. The VMM puts
//! a [`PciConfigIo`] on the port I/O bus at [`PCI_CONFIG_IO_PORT`] and a [`PciConfigMmio`]
//! on the MMIO bus at the ECAM base it chooses, both sharing one [`PciRoot`].

pub mod bar_router;
pub mod config_space;
pub mod device;
pub mod msix;
pub mod root;

pub use bar_router::{PciBarRouter, PciSpace};
pub use config_space::{BarKind, PciBarRange, PciConfigError, PciConfiguration, PciHeader};
pub use device::{PciDevice, PciHostBridge};
pub use msix::{MsiMessage, MsiVectors, Msix, MsixLayout};
pub use root::{
    PciConfigIo, PciConfigMmio, PciRoot, PciRootError, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_LEN,
};

/// Whether an access of `len` bytes at `offset` inside a 32-bit register is one that PCI
/// config space accepts: 1, 2 or 4 bytes, naturally aligned, within the dword.
pub(crate) fn is_dword_access(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset < 4 && offset.is_multiple_of(len as u64)
}

/// Copies the bytes of `value` at `offset` (a valid [`is_dword_access`]) into `data`.
pub(crate) fn extract_bytes(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let src = usize::try_from(offset)
        .ok()
        .and_then(|start| bytes.get(start..start.checked_add(data.len())?));
    if let Some(src) = src {
        data.copy_from_slice(src);
    }
}

/// The low dword of `value`: what a 32-bit register, or the lower half of a 64-bit
/// BAR or address pair, holds.
pub(crate) fn low_u32(value: u64) -> u32 {
    let [b0, b1, b2, b3, ..] = value.to_le_bytes();
    u32::from_le_bytes([b0, b1, b2, b3])
}
