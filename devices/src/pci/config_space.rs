//! The configuration space of one PCI function (a type-0 header).
//!
//! [`PciConfiguration`] holds the 256 bytes of conventional config space (or the 4 KiB
//! of PCI Express extended space) together with a write mask per register, so that a
//! guest write only changes the bits a real device would let it change: identification,
//! class, header type and capability pointers stay read-only, status error bits are
//! write-1-to-clear, and BARs only accept address bits above their size — which is what
//! makes the BAR sizing protocol (write all-ones, read back the size mask) work.
//!
//! Host bridges use the same type-0 header with class 06/00; type-1 (PCI-to-PCI bridge)
//! headers are not modelled.

use thiserror::Error;

use super::{extract_bytes, is_dword_access, low_u32};

/// Registers (dwords) in conventional config space.
pub const NUM_CONFIGURATION_REGISTERS: usize = 64;
/// Registers (dwords) in PCI Express extended config space.
pub const NUM_EXTENDED_CONFIGURATION_REGISTERS: usize = 1024;
/// Base Address Registers in a type-0 header.
pub const NUM_BARS: usize = 6;

const VENDOR_DEVICE_REG: usize = 0;
pub(crate) const COMMAND_STATUS_REG: usize = 1;
const CLASS_REG: usize = 2;
const BIST_HEADER_REG: usize = 3;
pub(crate) const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
const CAPABILITY_POINTER_REG: usize = 13;
pub(crate) const INTERRUPT_REG: usize = 15;

/// Command bits the guest may change: I/O space, memory space, bus master, parity error
/// response, SERR# enable and interrupt disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status bit: the capability list pointer is valid.
pub(crate) const STATUS_CAPABILITY_LIST: u16 = 1 << 4;
/// Status error bits, write-1-to-clear: master data parity error, signaled and received
/// target abort, received master abort, signaled system error, detected parity error.
pub const STATUS_W1C_BITS: u16 = 0xf900;
/// Command bit: the function decodes its I/O BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command bit: the function decodes its memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command bit: the function may master the bus (DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// First byte available to capabilities, right after the type-0 header.
const CAPABILITY_START: usize = 0x40;
/// Capabilities in the capability list live in conventional config space.
const CAPABILITY_END: usize = 0x100;

/// Low bits of a memory BAR that hold its type, not its address.
const BAR_MEM_TYPE_MASK: u32 = 0xf;
/// Low bits of an I/O BAR that hold its type, not its address.
const BAR_IO_TYPE_MASK: u32 = 0x3;
const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64BIT: u32 = 0x4;
const BAR_MEM_PREFETCHABLE: u32 = 0x8;
/// Smallest memory BAR the spec allows.
pub(crate) const MIN_MEM_BAR_SIZE: u64 = 16;
/// Smallest and largest I/O BARs the spec allows.
pub(crate) const MIN_IO_BAR_SIZE: u64 = 4;
pub(crate) const MAX_IO_BAR_SIZE: u64 = 256;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Memory below 4 GiB, one BAR slot.
    Mmio32,
    /// Memory anywhere in the 64-bit space; takes its slot and the next one.
    Mmio64,
    /// Port I/O.
    Io,
}

/// A BAR as the guest has placed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBarRange {
    /// BAR index (0-5).
    pub index: usize,
    /// Base address the guest programmed.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What it decodes.
    pub kind: BarKind,
}

/// Errors from building a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// BAR indices go from 0 to 5.
    #[error("BAR index {0} is out of range (a type-0 header has 6 BARs)")]
    BarIndexOutOfRange(usize),
    /// A 64-bit BAR needs the slot after its own.
    #[error("64-bit BAR at index {0} has no room for its upper half")]
    BarNoUpperSlot(usize),
    /// The slot (or the upper slot of a 64-bit BAR) is already taken.
    #[error("BAR slot {0} is already in use")]
    BarInUse(usize),
    /// BAR sizes are powers of two.
    #[error("BAR {index} size {size:#x} is not a power of two")]
    BarSizeNotPowerOfTwo {
        /// The BAR index.
        index: usize,
        /// The rejected size.
        size: u64,
    },
    /// The size is below the minimum or above the maximum for the BAR kind.
    #[error("BAR {index} size {size:#x} is out of range for a {kind:?} BAR")]
    BarSizeOutOfRange {
        /// The BAR index.
        index: usize,
        /// The rejected size.
        size: u64,
        /// The BAR kind.
        kind: BarKind,
    },
    /// Only memory BARs can be prefetchable.
    #[error("I/O BAR {0} cannot be prefetchable")]
    PrefetchableIoBar(usize),
    /// No BAR was registered at this index.
    #[error("BAR {0} is not registered")]
    BarNotRegistered(usize),
    /// The address is not aligned to the BAR size or does not fit the BAR kind.
    #[error("address {addr:#x} is not valid for BAR {index} (size {size:#x}, {kind:?})")]
    BarAddressInvalid {
        /// The BAR index.
        index: usize,
        /// The rejected address.
        addr: u64,
        /// The BAR size.
        size: u64,
        /// The BAR kind.
        kind: BarKind,
    },
    /// A capability is at least its ID and next-pointer bytes.
    #[error("capability of {0} bytes is too short (a capability has at least 2 bytes)")]
    CapabilityTooShort(usize),
    /// The capability does not fit in what is left of conventional config space.
    #[error("capability of {len} bytes at {offset:#x} does not fit in config space")]
    CapabilitySpaceFull {
        /// Where it would have been placed.
        offset: usize,
        /// Its length.
        len: usize,
    },
}

/// The identification fields of a function's header; all read-only to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID (offset 0x00).
    pub vendor_id: u16,
    /// Device ID (offset 0x02).
    pub device_id: u16,
    /// Revision ID (offset 0x08).
    pub revision_id: u8,
    /// Programming interface (offset 0x09).
    pub prog_if: u8,
    /// Subclass (offset 0x0a).
    pub subclass: u8,
    /// Base class (offset 0x0b).
    pub class_code: u8,
    /// Subsystem vendor ID (offset 0x2c).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (offset 0x2e).
    pub subsystem_id: u16,
    /// Sets the multi-function bit of the header type (offset 0x0e).
    pub multi_function: bool,
}

/// A BAR registered by the device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// The configuration space of one PCI function.
#[derive(Debug, Clone)]
pub struct PciConfiguration {
    registers: Vec<u32>,
    /// Bits of each register that a guest write may change.
    writable: Vec<u32>,
    /// Bits of each register that a guest write of 1 clears.
    write_one_to_clear: Vec<u32>,
    /// The BAR whose lower slot is at each index (`None` for free and upper slots).
    bars: [Option<Bar>; NUM_BARS],
    /// Slots taken by a BAR (including the upper half of 64-bit BARs).
    bar_slot_used: [bool; NUM_BARS],
    /// Offsets of the capabilities in list order.
    capabilities: Vec<usize>,
    /// First free byte for the next capability.
    next_capability_offset: usize,
}

impl PciConfiguration {
    /// Creates a type-0 config space with `header`'s identification, 256 bytes long, or
    /// 4 KiB if `extended` (PCI Express). The extended part reads as zero (no extended
    /// capabilities) and is read-only.
    pub fn new(header: PciHeader, extended: bool) -> Self {
        let len = if extended {
            NUM_EXTENDED_CONFIGURATION_REGISTERS
        } else {
            NUM_CONFIGURATION_REGISTERS
        };
        let mut registers = vec![0u32; len];
        let mut writable = vec![0u32; len];
        let mut write_one_to_clear = vec![0u32; len];

        registers[VENDOR_DEVICE_REG] =
            u32::from(header.vendor_id) | (u32::from(header.device_id) << 16);
        registers[CLASS_REG] = u32::from(header.revision_id)
            | (u32::from(header.prog_if) << 8)
            | (u32::from(header.subclass) << 16)
            | (u32::from(header.class_code) << 24);
        let header_type = if header.multi_function { 0x80 } else { 0x00 };
        registers[BIST_HEADER_REG] = header_type << 16;
        registers[SUBSYSTEM_REG] =
            u32::from(header.subsystem_vendor_id) | (u32::from(header.subsystem_id) << 16);

        writable[COMMAND_STATUS_REG] = COMMAND_WRITABLE;
        write_one_to_clear[COMMAND_STATUS_REG] = u32::from(STATUS_W1C_BITS) << 16;
        // Cache line size and latency timer are plain read/write bytes.
        writable[BIST_HEADER_REG] = 0x0000_ffff;
        // Interrupt line is scratch for the guest; the pin is set by the device model.
        writable[INTERRUPT_REG] = 0x0000_00ff;

        Self {
            registers,
            writable,
            write_one_to_clear,
            bars: [None; NUM_BARS],
            bar_slot_used: [false; NUM_BARS],
            capabilities: Vec::new(),
            next_capability_offset: CAPABILITY_START,
        }
    }

    /// Number of 32-bit registers (64, or 1024 for extended config space).
    pub fn num_registers(&self) -> usize {
        self.registers.len()
    }

    /// Reads register `reg_idx`; a register beyond the end reads all-ones.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.registers.get(reg_idx).copied().unwrap_or(0xffff_ffff)
    }

    /// Handles a guest write of `data` at byte `offset` of register `reg_idx`.
    ///
    /// Only 1-, 2- and 4-byte naturally aligned accesses inside an existing register are
    /// honoured; anything else is ignored. Read-only bits keep their value and
    /// write-1-to-clear bits are cleared where `data` has ones.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if reg_idx >= self.registers.len() || !is_dword_access(offset, data.len()) {
            log::debug!(
                "Ignoring PCI config write of {} bytes at register {reg_idx} offset {offset}",
                data.len()
            );
            return;
        }
        let shift = offset * 8;
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes) << shift;
        let byte_mask = (u32::MAX >> (32 - 8 * data.len())) << shift;

        let writable = self.writable[reg_idx] & byte_mask;
        let clear = self.write_one_to_clear[reg_idx] & byte_mask & value;
        let reg = &mut self.registers[reg_idx];
        *reg = ((*reg & !writable) | (value & writable)) & !clear;
    }

    /// Lets the guest write the bits of `mask` in register `reg_idx` (for a device
    /// model's own capability fields). The ID and next-pointer bytes of capabilities
    /// stay read-only whatever the mask; out-of-range registers are ignored.
    pub fn set_write_mask(&mut self, reg_idx: usize, mask: u32) {
        let Some(writable) = self.writable.get_mut(reg_idx) else {
            return;
        };
        let header_mask = if self.capabilities.contains(&(reg_idx * 4)) {
            0xffff_0000
        } else {
            0xffff_ffff
        };
        *writable = mask & header_mask;
    }

    /// Sets register `reg_idx` as the device model (not the guest): no mask applies.
    /// Out-of-range registers are ignored.
    pub fn set_reg(&mut self, reg_idx: usize, value: u32) {
        if let Some(reg) = self.registers.get_mut(reg_idx) {
            *reg = value;
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        let [lo, hi, _, _] = self.registers[COMMAND_STATUS_REG].to_le_bytes();
        u16::from_le_bytes([lo, hi])
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        (self.registers[COMMAND_STATUS_REG] >> 16) as u16
    }

    /// Sets bits in the status register, as the device does when it sees an error.
    pub fn set_status_bits(&mut self, bits: u16) {
        self.registers[COMMAND_STATUS_REG] |= u32::from(bits) << 16;
    }

    /// Whether the guest enabled decoding of the function's memory BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// Whether the guest enabled decoding of the function's I/O BARs.
    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO_SPACE != 0
    }

    /// Sets the interrupt pin (1 = INTA# .. 4 = INTD#, 0 = none) reported to the guest.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let reg = &mut self.registers[INTERRUPT_REG];
        *reg = (*reg & !0x0000_ff00) | (u32::from(pin) << 8);
    }

    /// The interrupt line the guest wrote (its IRQ routing note).
    pub fn interrupt_line(&self) -> u8 {
        self.registers[INTERRUPT_REG].to_le_bytes()[0]
    }

    /// Registers BAR `index` of `size` bytes (a power of two). A [`BarKind::Mmio64`]
    /// BAR also takes slot `index + 1`. Its address starts at zero; the VMM may place
    /// it with [`Self::set_bar_address`] and the guest may move it.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: BarKind,
        prefetchable: bool,
    ) -> Result<(), PciConfigError> {
        if index >= NUM_BARS {
            return Err(PciConfigError::BarIndexOutOfRange(index));
        }
        if kind == BarKind::Mmio64 && index + 1 >= NUM_BARS {
            return Err(PciConfigError::BarNoUpperSlot(index));
        }
        if self.bar_slot_used[index] {
            return Err(PciConfigError::BarInUse(index));
        }
        if kind == BarKind::Mmio64 && self.bar_slot_used[index + 1] {
            return Err(PciConfigError::BarInUse(index + 1));
        }
        if !size.is_power_of_two() {
            return Err(PciConfigError::BarSizeNotPowerOfTwo { index, size });
        }
        let (min, max) = match kind {
            BarKind::Mmio32 => (MIN_MEM_BAR_SIZE, 1 << 31),
            BarKind::Mmio64 => (MIN_MEM_BAR_SIZE, 1 << 63),
            BarKind::Io => (MIN_IO_BAR_SIZE, MAX_IO_BAR_SIZE),
        };
        if size < min || size > max {
            return Err(PciConfigError::BarSizeOutOfRange { index, size, kind });
        }
        if kind == BarKind::Io && prefetchable {
            return Err(PciConfigError::PrefetchableIoBar(index));
        }

        let reg = BAR0_REG + index;
        let address_mask = !(size - 1);
        match kind {
            BarKind::Io => {
                self.registers[reg] = BAR_IO_SPACE;
                self.writable[reg] = low_u32(address_mask) & !BAR_IO_TYPE_MASK;
            }
            BarKind::Mmio32 | BarKind::Mmio64 => {
                let mut type_bits = 0;
                if kind == BarKind::Mmio64 {
                    type_bits |= BAR_MEM_64BIT;
                }
                if prefetchable {
                    type_bits |= BAR_MEM_PREFETCHABLE;
                }
                self.registers[reg] = type_bits;
                self.writable[reg] = low_u32(address_mask) & !BAR_MEM_TYPE_MASK;
                if kind == BarKind::Mmio64 {
                    self.registers[reg + 1] = 0;
                    self.writable[reg + 1] = (address_mask >> 32) as u32;
                    self.bar_slot_used[index + 1] = true;
                }
            }
        }
        self.bar_slot_used[index] = true;
        self.bars[index] = Some(Bar { size, kind });
        Ok(())
    }

    /// Places BAR `index` at `addr`, as firmware would. `addr` must be aligned to the
    /// BAR's size and fit the BAR kind (below 4 GiB for 32-bit memory, below 64 KiB
    /// for I/O).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciConfigError> {
        let bar = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(PciConfigError::BarNotRegistered(index))?;
        let limit = match bar.kind {
            BarKind::Mmio32 => 1 << 32,
            BarKind::Mmio64 => u64::MAX,
            BarKind::Io => 1 << 16,
        };
        if !addr.is_multiple_of(bar.size) || addr > limit - bar.size {
            return Err(PciConfigError::BarAddressInvalid {
                index,
                addr,
                size: bar.size,
                kind: bar.kind,
            });
        }
        let reg = BAR0_REG + index;
        self.registers[reg] = (self.registers[reg] & !self.writable[reg]) | low_u32(addr);
        if bar.kind == BarKind::Mmio64 {
            self.registers[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// The address BAR `index` is currently programmed to, or `None` if no BAR starts
    /// at `index` (a free slot or the upper half of a 64-bit BAR).
    ///
    /// While the guest sizes a BAR (after writing all-ones) this is the size mask, not a
    /// usable address; the guest disables decoding in the command register meanwhile.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let reg = BAR0_REG + index;
        let low = self.registers[reg];
        Some(match bar.kind {
            BarKind::Io => u64::from(low & !BAR_IO_TYPE_MASK),
            BarKind::Mmio32 => u64::from(low & !BAR_MEM_TYPE_MASK),
            BarKind::Mmio64 => {
                u64::from(low & !BAR_MEM_TYPE_MASK) | (u64::from(self.registers[reg + 1]) << 32)
            }
        })
    }

    /// The size of BAR `index`, or `None` if no BAR starts at `index`.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|bar| bar.size)
    }

    /// The kind of BAR `index`, or `None` if no BAR starts at `index`.
    pub fn bar_kind(&self, index: usize) -> Option<BarKind> {
        self.bars.get(index).copied().flatten().map(|bar| bar.kind)
    }

    /// The BARs the function decodes right now, by BAR index: memory BARs while memory
    /// decoding is on, I/O BARs while I/O decoding is on, skipping any at address zero or
    /// mid-sizing (an address that would run past the end of its space). A fixed array:
    /// the BAR router asks on every trapped access, which must not allocate.
    pub fn decoded_bars(&self) -> [Option<PciBarRange>; NUM_BARS] {
        std::array::from_fn(|index| {
            let bar = self.bars[index]?;
            let addr = self.bar_address(index)?;
            let (enabled, limit) = match bar.kind {
                BarKind::Io => (self.io_enabled(), 1u64 << 16),
                BarKind::Mmio32 => (self.memory_enabled(), 1u64 << 32),
                BarKind::Mmio64 => (self.memory_enabled(), u64::MAX),
            };
            let fits = addr != 0 && addr.checked_add(bar.size).is_some_and(|end| end <= limit);
            (enabled && fits).then_some(PciBarRange {
                index,
                addr,
                size: bar.size,
                kind: bar.kind,
            })
        })
    }

    /// Appends a capability to the capability list and returns its offset.
    ///
    /// `data[0]` is the capability ID; `data[1]` (the next pointer) is filled in by the
    /// list. The capability is placed at the next dword-aligned offset from 0x40 and
    /// must end inside the 256 bytes of conventional config space. Its bytes are
    /// read-only to the guest until opened with [`Self::set_write_mask`].
    pub fn add_capability(&mut self, data: &[u8]) -> Result<usize, PciConfigError> {
        if data.len() < 2 {
            return Err(PciConfigError::CapabilityTooShort(data.len()));
        }
        let offset = self.next_capability_offset;
        let full = || PciConfigError::CapabilitySpaceFull {
            offset,
            len: data.len(),
        };
        let end = offset
            .checked_add(data.len())
            .filter(|&end| end <= CAPABILITY_END)
            .ok_or_else(full)?;
        // Below the end of conventional config space (256 bytes), so it fits a pointer.
        let pointer = u8::try_from(offset).map_err(|_| full())?;

        for (i, &byte) in data.iter().enumerate() {
            let value = if i == 1 { 0 } else { byte };
            self.set_byte(offset + i, value);
        }
        match self.capabilities.last() {
            Some(&previous) => self.set_byte(previous + 1, pointer),
            None => {
                self.set_byte(CAPABILITY_POINTER_REG * 4, pointer);
                self.set_status_bits(STATUS_CAPABILITY_LIST);
            }
        }
        self.capabilities.push(offset);
        self.next_capability_offset = (end + 3) & !3;
        Ok(offset)
    }

    /// Writes one byte as the device model.
    fn set_byte(&mut self, offset: usize, value: u8) {
        let reg = &mut self.registers[offset / 4];
        let shift = (offset % 4) * 8;
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Reads `data.len()` bytes at byte `offset` of register `reg_idx` (a 1/2/4-byte
    /// aligned access); anything else reads all-ones.
    pub fn read_bytes(&self, reg_idx: usize, offset: u64, data: &mut [u8]) {
        if is_dword_access(offset, data.len()) {
            extract_bytes(self.read_reg(reg_idx), offset, data);
        } else {
            data.fill(0xff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1234,
            device_id: 0x11e8,
            revision_id: 0x10,
            prog_if: 0x01,
            subclass: 0x80,
            class_code: 0x00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            multi_function: false,
        }
    }

    fn config() -> PciConfiguration {
        PciConfiguration::new(header(), false)
    }

    /// Writes all-ones to a BAR register and returns what reads back.
    fn size_probe(config: &mut PciConfiguration, reg_idx: usize) -> u32 {
        config.write_reg(reg_idx, 0, &[0xff; 4]);
        config.read_reg(reg_idx)
    }

    #[test]
    fn header_fields_are_laid_out() {
        let config = config();
        assert_eq!(config.read_reg(0), 0x11e8_1234);
        assert_eq!(config.read_reg(2), 0x0080_0110);
        assert_eq!(config.read_reg(11), 0x1100_1af4);
        assert_eq!(config.num_registers(), 64);
        let multi = PciConfiguration::new(
            PciHeader {
                multi_function: true,
                ..header()
            },
            true,
        );
        assert_eq!((multi.read_reg(3) >> 16) & 0xff, 0x80);
        assert_eq!(multi.num_registers(), 1024);
    }

    #[test]
    fn read_only_fields_survive_writes() {
        let mut config = config();
        config.add_capability(&[0x09, 0, 0xaa, 0xbb]).unwrap();
        let before: Vec<u32> = [0, 2, 11, 12, 13]
            .iter()
            .map(|&r| config.read_reg(r))
            .collect();
        for reg in [0, 2, 11, 12, 13] {
            config.write_reg(reg, 0, &[0; 4]);
            config.write_reg(reg, 0, &[0xff; 4]);
            config.write_reg(reg, 2, &[0x55, 0x55]);
            config.write_reg(reg, 1, &[0x77]);
        }
        let after: Vec<u32> = [0, 2, 11, 12, 13]
            .iter()
            .map(|&r| config.read_reg(r))
            .collect();
        assert_eq!(before, after);
        // Header type byte is read-only, cache line size is not.
        config.write_reg(3, 0, &[0xff; 4]);
        assert_eq!(config.read_reg(3), 0x0000_ffff);
        // Interrupt line writable, pin read-only.
        config.set_interrupt_pin(1);
        config.write_reg(15, 0, &[0xff; 4]);
        assert_eq!(config.read_reg(15), 0x0000_01ff);
        assert_eq!(config.interrupt_line(), 0xff);
        // The capability header stays intact even after opening its body.
        config.set_write_mask(0x40 / 4, 0xffff_ffff);
        config.write_reg(0x40 / 4, 0, &[0; 4]);
        assert_eq!(config.read_reg(0x40 / 4), 0x0000_0009);
    }

    #[test]
    fn command_register_keeps_only_writable_bits() {
        let mut config = config();
        config.write_reg(1, 0, &[0xff, 0xff]);
        assert_eq!(config.command(), 0x0547);
        assert!(config.memory_enabled() && config.io_enabled());
        config.write_reg(1, 0, &[0x02]);
        assert_eq!(config.command(), 0x0502);
        assert!(config.memory_enabled() && !config.io_enabled());
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut config = config();
        config.add_capability(&[0x05, 0, 0, 0]).unwrap();
        config.set_status_bits(0xf900 | 0x0008);
        assert_eq!(config.status(), 0xf918);
        // Writing zeros changes nothing.
        config.write_reg(1, 2, &[0, 0]);
        assert_eq!(config.status(), 0xf918);
        // Writing one clears only that error bit; capability list and interrupt status stay.
        config.write_reg(1, 2, &0x2000u16.to_le_bytes());
        assert_eq!(config.status(), 0xd918);
        // A 32-bit write that sets command bits also clears status bits written as 1.
        config.write_reg(1, 0, &0xffff_0006u32.to_le_bytes());
        assert_eq!(config.status(), 0x0018);
        assert_eq!(config.command(), 0x0006);
    }

    #[test]
    fn mmio32_bar_sizing_and_address() {
        let mut config = config();
        config.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
        assert_eq!(size_probe(&mut config, 4), 0xffff_f000);
        config.write_reg(4, 0, &0xfebf_0000u32.to_le_bytes());
        assert_eq!(config.read_reg(4), 0xfebf_0000);
        assert_eq!(config.bar_address(0), Some(0xfebf_0000));
        assert_eq!(config.bar_size(0), Some(0x1000));
        assert_eq!(config.bar_kind(0), Some(BarKind::Mmio32));
        // Bits below the size are not settable.
        config.write_reg(4, 0, &0xfebf_0abcu32.to_le_bytes());
        assert_eq!(config.bar_address(0), Some(0xfebf_0000));
    }

    #[test]
    fn prefetchable_mmio32_keeps_its_type_bits() {
        let mut config = config();
        config.add_bar(2, 0x10_0000, BarKind::Mmio32, true).unwrap();
        assert_eq!(config.read_reg(6), 0x8);
        assert_eq!(size_probe(&mut config, 6), 0xfff0_0008);
        config.write_reg(6, 0, &[0; 4]);
        assert_eq!(config.read_reg(6), 0x8);
    }

    #[test]
    fn mmio64_bar_sizing_covers_both_halves() {
        let mut config = config();
        config
            .add_bar(2, 0x2_0000_0000, BarKind::Mmio64, true)
            .unwrap();
        assert_eq!(config.read_reg(6), 0xc);
        assert_eq!(size_probe(&mut config, 6), 0x0000_000c);
        assert_eq!(size_probe(&mut config, 7), 0xffff_fffe);

        let mut small = self::config();
        small.add_bar(0, 0x4000, BarKind::Mmio64, false).unwrap();
        assert_eq!(size_probe(&mut small, 4), 0xffff_c004);
        assert_eq!(size_probe(&mut small, 5), 0xffff_ffff);
        small.write_reg(4, 0, &0xc000_0000u32.to_le_bytes());
        small.write_reg(5, 0, &0x0000_0080u32.to_le_bytes());
        assert_eq!(small.read_reg(4), 0xc000_0004);
        assert_eq!(small.bar_address(0), Some(0x80_c000_0000));
        // The upper half is not a BAR of its own.
        assert_eq!(small.bar_address(1), None);
        assert_eq!(small.bar_size(1), None);
    }

    #[test]
    fn io_bar_sizing_and_address() {
        let mut config = config();
        config.add_bar(1, 0x20, BarKind::Io, false).unwrap();
        assert_eq!(config.read_reg(5), 0x1);
        assert_eq!(size_probe(&mut config, 5), 0xffff_ffe1);
        config.write_reg(5, 0, &0xc040u32.to_le_bytes());
        assert_eq!(config.read_reg(5), 0xc041);
        assert_eq!(config.bar_address(1), Some(0xc040));
        // A 16-bit write of the low half works the same way.
        config.write_reg(5, 0, &0xd000u16.to_le_bytes());
        assert_eq!(config.bar_address(1), Some(0xd000));
    }

    #[test]
    fn unregistered_bars_read_zero_and_ignore_writes() {
        let mut config = config();
        assert_eq!(size_probe(&mut config, 4), 0);
        assert_eq!(config.bar_address(0), None);
        assert_eq!(config.bar_address(6), None);
    }

    #[test]
    fn add_bar_rejects_bad_requests() {
        let mut config = config();
        assert_eq!(
            config.add_bar(6, 0x1000, BarKind::Mmio32, false),
            Err(PciConfigError::BarIndexOutOfRange(6))
        );
        assert_eq!(
            config.add_bar(5, 0x1000, BarKind::Mmio64, false),
            Err(PciConfigError::BarNoUpperSlot(5))
        );
        assert_eq!(
            config.add_bar(0, 0x1800, BarKind::Mmio32, false),
            Err(PciConfigError::BarSizeNotPowerOfTwo {
                index: 0,
                size: 0x1800
            })
        );
        assert!(matches!(
            config.add_bar(0, 0, BarKind::Mmio32, false),
            Err(PciConfigError::BarSizeNotPowerOfTwo { .. })
        ));
        assert!(matches!(
            config.add_bar(0, 8, BarKind::Mmio32, false),
            Err(PciConfigError::BarSizeOutOfRange { .. })
        ));
        assert!(matches!(
            config.add_bar(0, 1 << 32, BarKind::Mmio32, false),
            Err(PciConfigError::BarSizeOutOfRange { .. })
        ));
        assert!(matches!(
            config.add_bar(0, 512, BarKind::Io, false),
            Err(PciConfigError::BarSizeOutOfRange { .. })
        ));
        assert_eq!(
            config.add_bar(0, 16, BarKind::Io, true),
            Err(PciConfigError::PrefetchableIoBar(0))
        );
        config.add_bar(0, 0x1000, BarKind::Mmio64, false).unwrap();
        assert_eq!(
            config.add_bar(1, 0x1000, BarKind::Mmio32, false),
            Err(PciConfigError::BarInUse(1))
        );
        config.add_bar(3, 0x1000, BarKind::Mmio32, false).unwrap();
        assert_eq!(
            config.add_bar(2, 0x1000, BarKind::Mmio64, false),
            Err(PciConfigError::BarInUse(3))
        );
    }

    #[test]
    fn set_bar_address_checks_alignment_and_range() {
        let mut config = config();
        config.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
        config.add_bar(1, 0x1_0000, BarKind::Mmio64, true).unwrap();
        config.add_bar(3, 0x100, BarKind::Io, false).unwrap();
        config.set_bar_address(0, 0xfe00_0000).unwrap();
        config.set_bar_address(1, 0x40_0000_0000).unwrap();
        config.set_bar_address(3, 0x1000).unwrap();
        assert_eq!(config.bar_address(0), Some(0xfe00_0000));
        assert_eq!(config.bar_address(1), Some(0x40_0000_0000));
        assert_eq!(config.read_reg(5), 0xc);
        assert_eq!(config.read_reg(6), 0x40);
        assert_eq!(config.bar_address(3), Some(0x1000));
        assert_eq!(config.read_reg(7), 0x1001);
        assert!(config.set_bar_address(0, 0xfe00_0800).is_err());
        assert!(config.set_bar_address(0, 0x1_0000_0000).is_err());
        assert!(config.set_bar_address(3, 0x1_0000).is_err());
        assert_eq!(
            config.set_bar_address(2, 0),
            Err(PciConfigError::BarNotRegistered(2))
        );
    }

    #[test]
    fn capability_chain_walks() {
        let mut config = config();
        assert_eq!(config.status() & STATUS_CAPABILITY_LIST, 0);
        // The next-pointer byte given by the caller is ignored.
        let first = config.add_capability(&[0x05, 0xee, 1, 2, 3, 4, 5]).unwrap();
        let second = config.add_capability(&[0x11, 0, 0xab, 0xcd]).unwrap();
        let third = config.add_capability(&[0x09, 0, 7]).unwrap();
        assert_eq!((first, second, third), (0x40, 0x48, 0x4c));
        assert_ne!(config.status() & STATUS_CAPABILITY_LIST, 0);

        let mut walked = Vec::new();
        let mut ptr = (config.read_reg(13) & 0xff) as usize;
        while ptr != 0 && walked.len() < 48 {
            assert_eq!(ptr % 4, 0);
            let header = config.read_reg(ptr / 4);
            walked.push((ptr, header.to_le_bytes()[0]));
            ptr = ((header >> 8) & 0xff) as usize;
        }
        assert_eq!(walked, vec![(0x40, 0x05), (0x48, 0x11), (0x4c, 0x09)]);
        assert_eq!(config.read_reg(0x40 / 4), 0x0201_4805);
        assert_eq!(config.read_reg(0x44 / 4), 0x0005_0403);
        assert_eq!(config.read_reg(0x48 / 4), 0xcdab_4c11);
    }

    #[test]
    fn capability_bounds_are_checked() {
        let mut config = config();
        assert_eq!(
            config.add_capability(&[0x05]),
            Err(PciConfigError::CapabilityTooShort(1))
        );
        assert_eq!(
            config.add_capability(&[0u8; 0xc1]),
            Err(PciConfigError::CapabilitySpaceFull {
                offset: 0x40,
                len: 0xc1
            })
        );
        // Exactly filling the space works; nothing more fits afterwards.
        assert_eq!(config.add_capability(&[0x09; 0xc0]), Ok(0x40));
        assert_eq!(
            config.add_capability(&[0x09, 0]),
            Err(PciConfigError::CapabilitySpaceFull {
                offset: 0x100,
                len: 2
            })
        );
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let mut config = config();
        config.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
        // Size 3, unaligned, crossing the dword, empty: all ignored.
        config.write_reg(4, 0, &[0xff; 3]);
        config.write_reg(4, 1, &[0xff; 2]);
        config.write_reg(4, 2, &[0xff; 4]);
        config.write_reg(4, 4, &[0xff]);
        config.write_reg(4, 0, &[]);
        config.write_reg(4, 0, &[0xff; 8]);
        assert_eq!(config.read_reg(4), 0);
        // Beyond the end of (conventional and extended) config space.
        config.write_reg(64, 0, &[0xff; 4]);
        config.write_reg(usize::MAX, 0, &[0xff; 4]);
        assert_eq!(config.read_reg(64), 0xffff_ffff);
        assert_eq!(config.read_reg(2000), 0xffff_ffff);
        assert_eq!(config.read_reg(usize::MAX), 0xffff_ffff);
        let mut data = [0u8; 3];
        config.read_bytes(0, 0, &mut data);
        assert_eq!(data, [0xff; 3]);
        let mut data = [0u8; 2];
        config.read_bytes(0, 2, &mut data);
        assert_eq!(data, [0xe8, 0x11]);
        config.set_write_mask(5000, 0xffff_ffff);
        config.set_reg(5000, 1);
    }

    #[test]
    fn extended_space_is_read_only_zero() {
        let mut config = PciConfiguration::new(header(), true);
        assert_eq!(config.read_reg(0x100 / 4), 0);
        config.write_reg(0x100 / 4, 0, &[0xff; 4]);
        assert_eq!(config.read_reg(0x100 / 4), 0);
        assert_eq!(config.read_reg(1023), 0);
        assert_eq!(config.read_reg(1024), 0xffff_ffff);
    }
}
