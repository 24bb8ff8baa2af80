//! The capability list of a physical device's config space, read defensively: the list
//! comes from hardware (through the host kernel) and is walked with bounds and a loop
//! guard, so a broken device cannot hang or crash the VMM.

use crate::pci::config_space::STATUS_CAPABILITY_LIST;
use crate::pci::msix::MsixLayout;

/// Capability IDs we look at (PCI Local Bus spec, "Capability IDs").
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_PCIE: u8 = 0x10;
pub use crate::pci::msix::PCI_CAP_ID_MSIX as CAP_ID_MSIX;

/// Size of conventional config space.
pub const CONFIG_SPACE_LEN: usize = 256;
/// Capabilities live between the end of the type-0 header and the end of conventional
/// config space.
const FIRST_CAP_OFFSET: usize = 0x40;
/// Offset of the capabilities pointer in the header.
const CAP_POINTER_OFFSET: usize = 0x34;
/// More entries than fit in 192 bytes at 4 bytes each means a loop.
const MAX_CAPS: usize = (CONFIG_SPACE_LEN - FIRST_CAP_OFFSET) / 4;

/// A capability of the physical device: its ID and where it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCapability {
    pub id: u8,
    pub offset: usize,
}

/// Walks the capability list of a config space snapshot. Stops at the first pointer that
/// leaves the capability area, points back to an entry already seen, or after
/// [`MAX_CAPS`] entries.
pub fn walk(config: &[u8; CONFIG_SPACE_LEN]) -> Vec<DeviceCapability> {
    let status = u16::from_le_bytes([config[6], config[7]]);
    if status & STATUS_CAPABILITY_LIST == 0 {
        return Vec::new();
    }
    let mut out: Vec<DeviceCapability> = Vec::new();
    let mut ptr = usize::from(config[CAP_POINTER_OFFSET] & 0xfc);
    while ptr != 0 && out.len() < MAX_CAPS {
        if !(FIRST_CAP_OFFSET..CONFIG_SPACE_LEN - 1).contains(&ptr)
            || out.iter().any(|c| c.offset == ptr)
        {
            log::warn!("VFIO device capability list has a bad pointer {ptr:#x}; list cut there");
            break;
        }
        out.push(DeviceCapability {
            id: config[ptr],
            offset: ptr,
        });
        ptr = usize::from(config[ptr + 1] & 0xfc);
    }
    out
}

/// The fixed fields of an MSI capability's Message Control register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiLayout {
    /// 64-bit message address.
    pub is_64bit: bool,
    /// Mask and pending bit registers are present.
    pub per_vector_mask: bool,
    /// Vectors the function can use: 1, 2, 4, 8, 16 or 32.
    pub max_vectors: u16,
}

/// Message Control bits of MSI.
pub const MSI_CTRL_ENABLE: u16 = 1 << 0;
const MSI_CTRL_MMC_SHIFT: u16 = 1;
pub const MSI_CTRL_MME_SHIFT: u16 = 4;
pub const MSI_CTRL_MME_MASK: u16 = 0x7 << MSI_CTRL_MME_SHIFT;
const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_PVM: u16 = 1 << 8;

impl MsiLayout {
    /// Decodes Message Control; encodings above 32 vectors (reserved) count as 32.
    pub fn from_control(ctrl: u16) -> Self {
        let mmc = ((ctrl >> MSI_CTRL_MMC_SHIFT) & 0x7).min(5);
        MsiLayout {
            is_64bit: ctrl & MSI_CTRL_64BIT != 0,
            per_vector_mask: ctrl & MSI_CTRL_PVM != 0,
            max_vectors: 1 << mmc,
        }
    }

    /// The read-only part of Message Control (everything but enable and MME).
    pub fn control(&self) -> u16 {
        // A u16 has at most 16 trailing zeros.
        #[allow(clippy::cast_possible_truncation)]
        let mmc = self.max_vectors.trailing_zeros() as u16;
        (mmc << MSI_CTRL_MMC_SHIFT)
            | if self.is_64bit { MSI_CTRL_64BIT } else { 0 }
            | if self.per_vector_mask {
                MSI_CTRL_PVM
            } else {
                0
            }
    }

    /// Offset of the upper address dword, if 64-bit.
    pub fn address_hi(&self) -> Option<usize> {
        self.is_64bit.then_some(0x8)
    }

    /// Offset of the 16-bit message data.
    pub fn data(&self) -> usize {
        if self.is_64bit {
            0xc
        } else {
            0x8
        }
    }

    /// Offset of the mask bits, if per-vector masking is supported.
    pub fn mask(&self) -> Option<usize> {
        self.per_vector_mask.then_some(self.data() + 4)
    }

    /// Offset of the pending bits, if per-vector masking is supported.
    pub fn pending(&self) -> Option<usize> {
        self.mask().map(|m| m + 4)
    }

    /// Length of the capability, rounded up to whole dwords.
    pub fn cap_len(&self) -> usize {
        match self.pending() {
            Some(p) => p + 4,
            None => self.data() + 4,
        }
    }
}

/// Length of the PCI Express capability: 0x3c for version 2, 0x24 for version 1.
pub fn pcie_len(flags: u16) -> usize {
    if flags & 0xf >= 2 {
        0x3c
    } else {
        0x24
    }
}

/// Message Control bits of MSI-X.
pub const MSIX_CTRL_TABLE_SIZE: u16 = 0x7ff;

/// Decodes an MSI-X capability: its table size (1 to 2048) and where the table and PBA
/// are. `None` when a BIR names a BAR that cannot exist (6 or 7).
pub fn decode_msix(ctrl: u16, table: u32, pba: u32) -> Option<(u16, MsixLayout)> {
    let (table_bar, pba_bar) = ((table & 0x7) as u8, (pba & 0x7) as u8);
    if table_bar > 5 || pba_bar > 5 {
        return None;
    }
    Some((
        (ctrl & MSIX_CTRL_TABLE_SIZE) + 1,
        MsixLayout {
            table_bar,
            table_offset: table & !0x7,
            pba_bar,
            pba_offset: pba & !0x7,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(caps: &[(usize, u8, u8)]) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        c[6] = STATUS_CAPABILITY_LIST.to_le_bytes()[0];
        if let Some(&(first, _, _)) = caps.first() {
            c[CAP_POINTER_OFFSET] = u8::try_from(first).unwrap();
        }
        for &(off, id, next) in caps {
            c[off] = id;
            c[off + 1] = next;
        }
        c
    }

    #[test]
    fn walks_a_well_formed_list() {
        let c = config_with(&[(0x40, 0x01, 0x50), (0x50, 0x05, 0x70), (0x70, 0x10, 0)]);
        let ids: Vec<(u8, usize)> = walk(&c).iter().map(|c| (c.id, c.offset)).collect();
        assert_eq!(ids, vec![(0x01, 0x40), (0x05, 0x50), (0x10, 0x70)]);
    }

    #[test]
    fn broken_lists_are_cut_not_followed() {
        // A loop back to the first entry.
        let c = config_with(&[(0x40, 0x05, 0x48), (0x48, 0x11, 0x40)]);
        assert_eq!(walk(&c).len(), 2);
        // A pointer into the header.
        let c = config_with(&[(0x40, 0x05, 0x20)]);
        assert_eq!(walk(&c).len(), 1);
        // The low two pointer bits are ignored: 0xff is the last dword, 0xfc.
        let mut c = config_with(&[(0x40, 0x05, 0)]);
        c[0x41] = 0xff;
        assert_eq!(walk(&c)[1].offset, 0xfc);
        // No capability list bit: nothing, whatever the pointer says.
        let mut c = config_with(&[(0x40, 0x05, 0)]);
        c[6] = 0;
        assert!(walk(&c).is_empty());
    }

    #[test]
    fn msi_layouts_place_their_fields() {
        let l = MsiLayout::from_control(0x0180 | (3 << 1));
        assert!(l.is_64bit && l.per_vector_mask);
        assert_eq!(l.max_vectors, 8);
        assert_eq!(
            (l.data(), l.mask(), l.pending(), l.cap_len()),
            (0xc, Some(0x10), Some(0x14), 0x18)
        );
        assert_eq!(l.control(), 0x0186);
        let l = MsiLayout::from_control(0);
        assert_eq!(
            (l.address_hi(), l.data(), l.mask(), l.cap_len()),
            (None, 0x8, None, 0xc)
        );
        assert_eq!(MsiLayout::from_control(7 << 1).max_vectors, 32);
    }

    #[test]
    fn msix_capability_decodes_table_and_pba() {
        let (size, l) = decode_msix(0x0042, 0x2000 | 2, 0x3000 | 4).unwrap();
        assert_eq!(size, 0x43);
        assert_eq!(l.table_bar, 2);
        assert_eq!(l.table_range(size), (0x2000, 0x43 * 16));
        assert_eq!((l.pba_bar, l.pba_range(size)), (4, (0x3000, 16)));
        assert!(decode_msix(0, 6, 0).is_none());
        assert!(decode_msix(0, 0, 7).is_none());
    }
}
