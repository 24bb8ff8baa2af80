//! The config space a guest sees for a passed-through function.
//!
//! Built once from the physical config space and the VFIO region sizes, then kept in a
//! shadow [`PciConfiguration`]:
//! - identification, class and subsystem come from the device and are read-only;
//! - BARs are emulated from the region sizes and types, so the guest sizes and relocates
//!   them without touching the device (the VMM moves its mappings when they change);
//! - the expansion ROM is hidden;
//! - command writes go to the device as well (decoding, bus master, INTx disable), status
//!   reads come from the device (interrupt status), its error bits are cleared there;
//! - the capability list is rebuilt with MSI, MSI-X and PCI Express only. MSI and MSI-X are
//!   emulated in the shadow (the host's vfio-pci programs the real ones); PCI Express is
//!   read live from the device and read-only except Device Control. Other capabilities
//!   (power management, vendor specific, ...) and all extended capabilities are hidden.

use crate::pci::config_space::{
    BAR0_REG, COMMAND_STATUS_REG, INTERRUPT_REG, MAX_IO_BAR_SIZE, MIN_IO_BAR_SIZE,
    MIN_MEM_BAR_SIZE, NUM_BARS, STATUS_CAPABILITY_LIST, STATUS_W1C_BITS,
};
use crate::pci::msix::MSIX_CAP_LEN;
use crate::pci::{
    is_dword_access, BarKind, Msix, MsixLayout, PciConfigError, PciConfiguration, PciHeader,
};

use super::backend::VfioBackend;
use super::caps::{
    self, MsiLayout, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PCIE, CONFIG_SPACE_LEN, MSI_CTRL_ENABLE,
    MSI_CTRL_MME_MASK,
};

const STATUS_OFFSET: u64 = 6;
const COMMAND_OFFSET: u64 = 4;
/// Offset of Device Control inside the PCI Express capability.
const PCIE_DEVCTL: usize = 0x8;

#[derive(Debug, thiserror::Error)]
pub enum VirtualConfigError {
    #[error("cannot emulate BAR {index} of the device ({size:#x} bytes): {source}")]
    Bar {
        index: usize,
        size: u64,
        source: PciConfigError,
    },
    #[error("cannot rebuild the device's capability list: {0}")]
    Capability(PciConfigError),
}

/// An emulated BAR (as the shadow configuration space records it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtualBar {
    pub kind: BarKind,
    pub size: u64,
}

/// The emulated MSI capability: where it sits in the virtual config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCap {
    pub offset: usize,
    pub layout: MsiLayout,
}

/// The emulated MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: usize,
    /// Table entries (vectors), 1 to 2048.
    pub table_size: u16,
    pub layout: MsixLayout,
}

/// The PCI Express capability: virtual and physical offsets and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PcieCap {
    offset: usize,
    phys: usize,
    len: usize,
}

/// What a config write touched, so the device can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigTarget {
    /// The command or status register.
    Command,
    /// A BAR register.
    Bar,
    /// The MSI capability.
    Msi,
    /// The MSI-X capability.
    Msix,
    /// Something with no side effect (or an ignored write).
    Other,
}

/// The virtual config space of one passed-through function.
#[derive(Debug)]
pub struct VirtualConfig {
    shadow: PciConfiguration,
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
    pcie: Option<PcieCap>,
}

fn u16_at(c: &[u8; CONFIG_SPACE_LEN], off: usize) -> u16 {
    u16::from_le_bytes([c[off], c[off + 1]])
}

fn u32_at(c: &[u8; CONFIG_SPACE_LEN], off: usize) -> u32 {
    u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]])
}

/// Whether byte range `[start, start + len)` overlaps `[lo, lo + n)`.
fn overlaps(start: usize, len: usize, lo: usize, n: usize) -> bool {
    start < lo + n && lo < start + len
}

impl VirtualConfig {
    /// Builds the virtual config space of the device behind `backend`. With `intx_gsi`
    /// the device's interrupt pin is kept and the Interrupt Line register names that
    /// guest IRQ; without it the function reports no INTx pin.
    pub fn new(
        backend: &dyn VfioBackend,
        intx_gsi: Option<u32>,
    ) -> Result<Self, VirtualConfigError> {
        let mut snap = [0u8; CONFIG_SPACE_LEN];
        backend.config_read(0, &mut snap);
        let header = PciHeader {
            vendor_id: u16_at(&snap, 0x00),
            device_id: u16_at(&snap, 0x02),
            revision_id: snap[0x08],
            prog_if: snap[0x09],
            subclass: snap[0x0a],
            class_code: snap[0x0b],
            subsystem_vendor_id: u16_at(&snap, 0x2c),
            subsystem_id: u16_at(&snap, 0x2e),
            // The guest sees this function alone in its slot.
            multi_function: false,
        };
        let device_caps = caps::walk(&snap);
        let has_pcie = device_caps.iter().any(|c| c.id == CAP_ID_PCIE);
        let mut shadow = PciConfiguration::new(header, has_pcie);

        Self::emulate_bars(&mut shadow, backend, &snap)?;

        let mut msi = None;
        let mut msix = None;
        let mut pcie = None;
        for cap in device_caps {
            let at = cap.offset;
            match cap.id {
                CAP_ID_MSI if msi.is_none() => {
                    let layout = MsiLayout::from_control(u16_at(&snap, at + 2));
                    msi = Some(Self::emulate_msi(&mut shadow, layout)?);
                }
                CAP_ID_MSIX if msix.is_none() && at + MSIX_CAP_LEN <= CONFIG_SPACE_LEN => {
                    let ctrl = u16_at(&snap, at + 2);
                    let (table, pba) = (u32_at(&snap, at + 4), u32_at(&snap, at + 8));
                    match caps::decode_msix(ctrl, table, pba) {
                        Some((size, layout)) => {
                            msix = Some(Self::emulate_msix(&mut shadow, size, layout)?)
                        }
                        None => log::warn!(
                            "VFIO device MSI-X capability names a BAR above 5 \
                             (table {table:#x}, PBA {pba:#x}); MSI-X hidden"
                        ),
                    }
                }
                CAP_ID_PCIE if pcie.is_none() => {
                    let len = caps::pcie_len(u16_at(&snap, at + 2)).min(CONFIG_SPACE_LEN - at);
                    let offset = shadow
                        .add_capability(&snap[at..at + len])
                        .map_err(VirtualConfigError::Capability)?;
                    pcie = Some(PcieCap {
                        offset,
                        phys: at,
                        len,
                    });
                }
                _ => {}
            }
        }

        let pin = snap[0x3d];
        if let (Some(gsi), 1..=4) = (intx_gsi, pin) {
            shadow.set_reg(INTERRUPT_REG, u32::from(u8::try_from(gsi).unwrap_or(0xff)));
            shadow.set_interrupt_pin(pin);
        }

        Ok(VirtualConfig {
            shadow,
            msi,
            msix,
            pcie,
        })
    }

    /// One emulated BAR per implemented region, typed like the device's own BAR.
    fn emulate_bars(
        shadow: &mut PciConfiguration,
        backend: &dyn VfioBackend,
        snap: &[u8; CONFIG_SPACE_LEN],
    ) -> Result<(), VirtualConfigError> {
        let mut index = 0;
        while index < NUM_BARS {
            let size = u32::try_from(index)
                .ok()
                .and_then(|region| backend.region(region))
                .map_or(0, |r| r.size);
            let reg = u32_at(snap, 0x10 + 4 * index);
            let (kind, prefetchable) = if reg & 0x1 != 0 {
                (BarKind::Io, false)
            } else if (reg >> 1) & 0x3 == 0x2 {
                (BarKind::Mmio64, reg & 0x8 != 0)
            } else {
                (BarKind::Mmio32, reg & 0x8 != 0)
            };
            let slots = if kind == BarKind::Mmio64 { 2 } else { 1 };
            if size == 0 {
                index += slots;
                continue;
            }
            let size = match kind {
                BarKind::Io => size.max(MIN_IO_BAR_SIZE),
                _ => size.max(MIN_MEM_BAR_SIZE),
            }
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX);
            if kind == BarKind::Io && size > MAX_IO_BAR_SIZE {
                log::warn!("VFIO device I/O BAR {index} of {size:#x} bytes is too large; hidden");
                index += 1;
                continue;
            }
            shadow
                .add_bar(index, size, kind, prefetchable)
                .map_err(|source| VirtualConfigError::Bar {
                    index,
                    size,
                    source,
                })?;
            index += slots;
        }
        Ok(())
    }

    fn emulate_msi(
        shadow: &mut PciConfiguration,
        layout: MsiLayout,
    ) -> Result<MsiCap, VirtualConfigError> {
        let mut bytes = vec![0u8; layout.cap_len()];
        bytes[0] = CAP_ID_MSI;
        bytes[2..4].copy_from_slice(&layout.control().to_le_bytes());
        let offset = shadow
            .add_capability(&bytes)
            .map_err(VirtualConfigError::Capability)?;
        let reg = offset / 4;
        shadow.set_write_mask(reg, u32::from(MSI_CTRL_ENABLE | MSI_CTRL_MME_MASK) << 16);
        shadow.set_write_mask(reg + 1, 0xffff_fffc);
        if let Some(hi) = layout.address_hi() {
            shadow.set_write_mask((offset + hi) / 4, 0xffff_ffff);
        }
        shadow.set_write_mask((offset + layout.data()) / 4, 0x0000_ffff);
        if let Some(mask) = layout.mask() {
            let bits = match layout.max_vectors {
                32 => u32::MAX,
                n => (1u32 << n) - 1,
            };
            shadow.set_write_mask((offset + mask) / 4, bits);
        }
        Ok(MsiCap { offset, layout })
    }

    fn emulate_msix(
        shadow: &mut PciConfiguration,
        table_size: u16,
        layout: MsixLayout,
    ) -> Result<MsixCap, VirtualConfigError> {
        let offset = shadow
            .add_capability(&layout.capability(table_size))
            .map_err(VirtualConfigError::Capability)?;
        shadow.set_write_mask(offset / 4, Msix::CONTROL_WRITE_MASK);
        Ok(MsixCap {
            offset,
            table_size,
            layout,
        })
    }

    /// The emulated BAR at `index`, if any (not the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<VirtualBar> {
        Some(VirtualBar {
            kind: self.shadow.bar_kind(index)?,
            size: self.shadow.bar_size(index)?,
        })
    }

    pub fn msi(&self) -> Option<MsiCap> {
        self.msi
    }

    pub fn msix(&self) -> Option<MsixCap> {
        self.msix
    }

    /// The shadow register file (for reading emulated capability state).
    pub fn shadow(&self) -> &PciConfiguration {
        &self.shadow
    }

    /// Places BAR `index` at `addr`, as firmware would before the guest boots.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciConfigError> {
        self.shadow.set_bar_address(index, addr)
    }

    /// Where each BAR decodes now (`None`: not decoded), see
    /// [`PciConfiguration::decoded_bars`].
    pub fn decoded_addresses(&self) -> [Option<u64>; NUM_BARS] {
        self.shadow.decoded_bars().map(|bar| bar.map(|b| b.addr))
    }

    /// Guest read of register `reg_idx`.
    pub fn read(&self, reg_idx: usize, backend: &dyn VfioBackend) -> u32 {
        if reg_idx == COMMAND_STATUS_REG {
            let mut status = [0u8; 2];
            backend.config_read(STATUS_OFFSET, &mut status);
            // The capability list bit is ours (the list is rebuilt), the rest the device's.
            let device = u16::from_le_bytes(status) & !STATUS_CAPABILITY_LIST;
            let ours = self.shadow.status() & STATUS_CAPABILITY_LIST;
            return u32::from(self.shadow.command()) | (u32::from(device | ours) << 16);
        }
        if let Some(p) = self.pcie {
            let byte = reg_idx.saturating_mul(4);
            // The header dword (ID, next pointer) stays ours; the body is live.
            if byte >= p.offset + 4 && byte < p.offset + p.len {
                let mut v = [0u8; 4];
                backend.config_read((p.phys + byte - p.offset) as u64, &mut v);
                return u32::from_le_bytes(v);
            }
        }
        self.shadow.read_reg(reg_idx)
    }

    /// Guest write of `data` at byte `offset` of register `reg_idx`; says what it touched.
    pub fn write(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
        backend: &dyn VfioBackend,
    ) -> ConfigTarget {
        if !is_dword_access(offset, data.len()) || reg_idx >= self.shadow.num_registers() {
            return ConfigTarget::Other;
        }
        let Ok(byte) = usize::try_from(offset) else {
            return ConfigTarget::Other;
        };
        let start = reg_idx * 4 + byte;
        let len = data.len();
        if reg_idx == COMMAND_STATUS_REG {
            self.shadow.write_reg(reg_idx, offset, data);
            self.forward_command_status(start, data, backend);
            return ConfigTarget::Command;
        }
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg_idx) {
            self.shadow.write_reg(reg_idx, offset, data);
            return ConfigTarget::Bar;
        }
        if let Some(m) = self.msi {
            if overlaps(start, len, m.offset, m.layout.cap_len()) {
                self.shadow.write_reg(reg_idx, offset, data);
                return ConfigTarget::Msi;
            }
        }
        if let Some(m) = self.msix {
            if overlaps(start, len, m.offset, MSIX_CAP_LEN) {
                self.shadow.write_reg(reg_idx, offset, data);
                return ConfigTarget::Msix;
            }
        }
        if let Some(p) = self.pcie {
            if overlaps(start, len, p.offset, p.len) {
                // Only Device Control (error reporting, payload, relaxed ordering, FLR)
                // reaches the device; vfio-pci itself filters what it lets through.
                let devctl = p.offset + PCIE_DEVCTL;
                if start >= devctl && start + len <= devctl + 2 {
                    backend.config_write((p.phys + start - p.offset) as u64, data);
                }
                return ConfigTarget::Other;
            }
        }
        self.shadow.write_reg(reg_idx, offset, data);
        ConfigTarget::Other
    }

    /// Sends a guest command/status write on to the device: the new command register when
    /// the write covered it, and the status error bits it wrote 1 to.
    fn forward_command_status(&self, start: usize, data: &[u8], backend: &dyn VfioBackend) {
        let end = start + data.len();
        if start < 6 {
            backend.config_write(COMMAND_OFFSET, &self.shadow.command().to_le_bytes());
        }
        if end > 6 {
            let mut bytes = [0u8; 4];
            bytes[start - 4..end - 4].copy_from_slice(data);
            let written = u16::from_le_bytes([bytes[2], bytes[3]]);
            // The error bits are write-1-to-clear on the device.
            let clear = written & STATUS_W1C_BITS;
            if clear != 0 {
                backend.config_write(STATUS_OFFSET, &clear.to_le_bytes());
            }
        }
    }
}
