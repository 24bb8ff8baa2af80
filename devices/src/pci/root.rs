//! PCI bus 0 and the two ways the guest reaches its config space.
//!
//! [`PciRoot`] holds up to 32 devices of 8 functions each on bus 0, with the host
//! bridge at 00:00.0, and dispatches config accesses by (bus, device, function,
//! register). Addresses with nothing behind them read all-ones, as on real hardware, so
//! the guest's bus scan finds only what was added. [`PciConfigIo`] (ports 0xCF8-0xCFF)
//! and [`PciConfigMmio`] (ECAM) are the [`BusDevice`]s the VMM places on its buses;
//! both share one `PciRoot`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::device::{PciDevice, PciHostBridge};
use super::{extract_bytes, is_dword_access};
use crate::bus::BusDevice;

/// Devices on one bus.
pub const NUM_DEVICES: u8 = 32;
/// Functions per device.
pub const NUM_FUNCTIONS: u8 = 8;
/// Registers (dwords) addressable per function (4 KiB of extended config space).
const NUM_REGISTERS: usize = 1024;

/// Port of the CONFIG_ADDRESS register; CONFIG_DATA follows at 0xCFC.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Length of the port range of [`PciConfigIo`].
pub const PCI_CONFIG_IO_PORT_LEN: u64 = 8;

/// Errors from adding devices to a [`PciRoot`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciRootError {
    /// All 32 device slots of bus 0 are taken.
    #[error("PCI bus 0 has no free device slot (all {NUM_DEVICES} are in use)")]
    NoFreeSlot,
    /// The device number is 32 or more, or the function number 8 or more.
    #[error("PCI address 00:{device:02x}.{function} is out of range")]
    AddressOutOfRange {
        /// The requested device number.
        device: u8,
        /// The requested function number.
        function: u8,
    },
    /// A function is already at that address.
    #[error("PCI address 00:{device:02x}.{function} is already in use")]
    AddressInUse {
        /// The requested device number.
        device: u8,
        /// The requested function number.
        function: u8,
    },
}

/// Bus 0: its functions keyed by (device, function).
pub struct PciRoot {
    functions: BTreeMap<(u8, u8), Arc<Mutex<dyn PciDevice>>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.functions
                    .keys()
                    .map(|(device, function)| format!("00:{device:02x}.{function}")),
            )
            .finish()
    }
}

impl PciRoot {
    /// Creates bus 0 with a [`PciHostBridge`] at 00:00.0.
    pub fn new() -> Self {
        let mut functions: BTreeMap<(u8, u8), Arc<Mutex<dyn PciDevice>>> = BTreeMap::new();
        functions.insert((0, 0), Arc::new(Mutex::new(PciHostBridge::new())));
        Self { functions }
    }

    /// The lowest device slot with no function in it: where [`Self::add_device`] puts
    /// the next device. (A VMM that needs the slot before it builds the device, e.g. to
    /// wire its INTx pin, asks here and then uses [`Self::add_function`].)
    pub fn free_slot(&self) -> Result<u8, PciRootError> {
        (0..NUM_DEVICES)
            .find(|&slot| !self.functions.keys().any(|&(d, _)| d == slot))
            .ok_or(PciRootError::NoFreeSlot)
    }

    /// Adds `device` as function 0 of the lowest free device slot and returns the slot.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciRootError> {
        let slot = self.free_slot()?;
        self.functions.insert((slot, 0), device);
        Ok(slot)
    }

    /// Adds `device` at 00:`device_nr`.`function`. A guest only looks at functions
    /// 1-7 of a device whose function 0 sets the multi-function header bit.
    pub fn add_function(
        &mut self,
        device_nr: u8,
        function: u8,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciRootError> {
        if device_nr >= NUM_DEVICES || function >= NUM_FUNCTIONS {
            return Err(PciRootError::AddressOutOfRange {
                device: device_nr,
                function,
            });
        }
        if self.functions.contains_key(&(device_nr, function)) {
            return Err(PciRootError::AddressInUse {
                device: device_nr,
                function,
            });
        }
        self.functions.insert((device_nr, function), device);
        Ok(())
    }

    /// Every function on the bus, host bridge first.
    pub fn functions(&self) -> impl Iterator<Item = &Arc<Mutex<dyn PciDevice>>> {
        self.functions.values()
    }

    /// Reads config register `reg_idx` of bus:device.function; all-ones if nothing is
    /// there or the address is out of range.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, reg_idx: usize) -> u32 {
        match self.function(bus, device, function, reg_idx) {
            Some(dev) => lock_device(dev).config_read(reg_idx),
            None => 0xffff_ffff,
        }
    }

    /// Writes `data` at byte `offset` of config register `reg_idx` of
    /// bus:device.function; dropped if nothing is there or the access is malformed.
    pub fn config_write(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        if !is_dword_access(offset, data.len()) {
            return;
        }
        if let Some(dev) = self.function(bus, device, function, reg_idx) {
            lock_device(dev).config_write(reg_idx, offset, data);
        }
    }

    fn function(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        reg_idx: usize,
    ) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || reg_idx >= NUM_REGISTERS {
            return None;
        }
        self.functions.get(&(device, function))
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks a PCI function, recovering it if a thread panicked while holding the lock (the
/// guest then sees a misbehaving device rather than the VMM going down).
fn lock_device(device: &Arc<Mutex<dyn PciDevice>>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        log::error!("PCI device was poisoned by a panic; recovering its state");
        let guard = poisoned.into_inner();
        device.clear_poison();
        guard
    })
}

/// Locks the root, recovering it if poisoned.
fn lock_root(root: &Mutex<PciRoot>) -> MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|poisoned| {
        log::error!("PCI root was poisoned by a panic; recovering its state");
        let guard = poisoned.into_inner();
        root.clear_poison();
        guard
    })
}

/// CONFIG_ADDRESS bit that makes CONFIG_DATA accesses reach config space.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS bits that are stored: enable, bus, device, function, register.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// Configuration mechanism #1: CONFIG_ADDRESS at port 0xCF8 and CONFIG_DATA at
/// 0xCFC-0xCFF, a [`BusDevice`] at [`PCI_CONFIG_IO_PORT`] of length
/// [`PCI_CONFIG_IO_PORT_LEN`].
///
/// CONFIG_ADDRESS takes only 32-bit accesses; bits 30-24 and 1-0 read as zero.
/// CONFIG_DATA takes 1-, 2- and 4-byte accesses at 0xCFC + (register offset), and reads
/// all-ones while the enable bit is clear. Byte accesses to 0xCF8-0xCFB (e.g. the
/// 0xCF9 reset control register of PC chipsets) are not emulated: reads return
/// all-ones and writes are dropped.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    config_address: u32,
}

impl PciConfigIo {
    /// Creates the port I/O access mechanism for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root,
            config_address: 0,
        }
    }

    /// (bus, device, function, register) selected by CONFIG_ADDRESS, if enabled.
    fn selected(&self) -> Option<(u8, u8, u8, usize)> {
        let addr = self.config_address;
        (addr & CONFIG_ADDRESS_ENABLE != 0).then_some((
            addr.to_le_bytes()[2],
            ((addr >> 11) & 0x1f) as u8,
            ((addr >> 8) & 0x7) as u8,
            ((addr >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            4..=7 => {
                let offset = offset - 4;
                match self.selected() {
                    Some((bus, device, function, reg_idx))
                        if is_dword_access(offset, data.len()) =>
                    {
                        let value =
                            lock_root(&self.root).config_read(bus, device, function, reg_idx);
                        extract_bytes(value, offset, data);
                    }
                    _ => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.config_address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_MASK;
                }
            }
            4..=7 => {
                if let Some((bus, device, function, reg_idx)) = self.selected() {
                    lock_root(&self.root).config_write(
                        bus,
                        device,
                        function,
                        reg_idx,
                        offset - 4,
                        data,
                    );
                }
            }
            _ => {}
        }
    }
}

/// Size of the ECAM window for all 256 buses (1 MiB per bus).
pub const PCI_ECAM_SIZE_ALL_BUSES: u64 = 256 << 20;
/// Size of the ECAM window for bus 0 alone.
pub const PCI_ECAM_SIZE_BUS0: u64 = 1 << 20;

/// PCI Express enhanced configuration access (ECAM): config space memory-mapped at
/// offset `bus << 20 | device << 15 | function << 12 | register`. A [`BusDevice`] the
/// VMM places at its ECAM base with [`PCI_ECAM_SIZE_BUS0`] or
/// [`PCI_ECAM_SIZE_ALL_BUSES`] bytes; buses other than 0 read all-ones.
#[derive(Debug)]
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// Creates the ECAM access mechanism for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    /// (bus, device, function, register, byte offset in the register) of an ECAM
    /// offset, or `None` past the 256-bus window.
    fn decode(offset: u64) -> Option<(u8, u8, u8, usize, u64)> {
        if offset >= PCI_ECAM_SIZE_ALL_BUSES {
            return None;
        }
        // 1 MiB per bus: inside the window the bus number fits a byte.
        let bus = u8::try_from(offset >> 20).ok()?;
        Some((
            bus,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            ((offset >> 2) & 0x3ff) as usize,
            offset & 0x3,
        ))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset) {
            Some((bus, device, function, reg_idx, byte)) if is_dword_access(byte, data.len()) => {
                let value = lock_root(&self.root).config_read(bus, device, function, reg_idx);
                extract_bytes(value, byte, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, device, function, reg_idx, byte)) = Self::decode(offset) {
            lock_root(&self.root).config_write(bus, device, function, reg_idx, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config_space::{BarKind, PciConfiguration, PciHeader};

    /// An endpoint with a 4 KiB MMIO BAR 0 whose BAR contents echo the offset.
    struct TestDevice {
        config: PciConfiguration,
    }

    impl TestDevice {
        fn new(device_id: u16) -> Self {
            let mut config = PciConfiguration::new(
                PciHeader {
                    vendor_id: 0x1af4,
                    device_id,
                    class_code: 0x01,
                    ..PciHeader::default()
                },
                true,
            );
            config
                .add_bar(0, 0x1000, BarKind::Mmio32, false)
                .expect("valid BAR");
            Self { config }
        }
    }

    impl PciDevice for TestDevice {
        fn config_read(&mut self, reg_idx: usize) -> u32 {
            self.config.read_reg(reg_idx)
        }

        fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg_idx, offset, data);
        }
    }

    fn root_with(devices: &[u16]) -> Arc<Mutex<PciRoot>> {
        let mut root = PciRoot::new();
        for &id in devices {
            root.add_device(Arc::new(Mutex::new(TestDevice::new(id))))
                .unwrap();
        }
        Arc::new(Mutex::new(root))
    }

    fn cf8(bus: u8, device: u8, function: u8, reg: u8) -> [u8; 4] {
        (CONFIG_ADDRESS_ENABLE
            | (u32::from(bus) << 16)
            | (u32::from(device) << 11)
            | (u32::from(function) << 8)
            | u32::from(reg & 0xfc))
        .to_le_bytes()
    }

    fn io_read(io: &mut PciConfigIo, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        io.read(offset, &mut data);
        data
    }

    fn ecam(device: u8, function: u8, reg: u64) -> u64 {
        (u64::from(device) << 15) | (u64::from(function) << 12) | reg
    }

    fn ecam_read32(mmio: &mut PciConfigMmio, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        mmio.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn add_device_takes_the_next_free_slot() {
        let mut root = PciRoot::new();
        for expected in 1..NUM_DEVICES {
            let slot = root
                .add_device(Arc::new(Mutex::new(TestDevice::new(0x1000))))
                .unwrap();
            assert_eq!(slot, expected);
        }
        assert_eq!(
            root.add_device(Arc::new(Mutex::new(TestDevice::new(0x1000)))),
            Err(PciRootError::NoFreeSlot)
        );
    }

    #[test]
    fn add_function_checks_the_address() {
        let mut root = PciRoot::new();
        let dev = || Arc::new(Mutex::new(TestDevice::new(0x1001)));
        assert_eq!(
            root.add_function(0, 0, dev()),
            Err(PciRootError::AddressInUse {
                device: 0,
                function: 0
            })
        );
        assert!(root.add_function(32, 0, dev()).is_err());
        assert!(root.add_function(3, 8, dev()).is_err());
        root.add_function(3, 2, dev()).unwrap();
        assert_eq!(root.config_read(0, 3, 2, 0), 0x1001_1af4);
        assert_eq!(root.config_read(0, 3, 0, 0), 0xffff_ffff);
        // A slot with only a non-zero function is not free for add_device.
        assert_eq!(root.free_slot(), Ok(1));
        assert_eq!(root.add_device(dev()), Ok(1));
        assert_eq!(root.add_device(dev()), Ok(2));
        assert_eq!(root.add_device(dev()), Ok(4));
    }

    #[test]
    fn absent_devices_functions_and_buses_read_all_ones() {
        let root = root_with(&[0x1042]);
        let root = root.lock().unwrap();
        assert_eq!(root.config_read(0, 0, 0, 0), 0x0008_1b36);
        assert_eq!(root.config_read(0, 1, 0, 0), 0x1042_1af4);
        assert_eq!(root.config_read(0, 2, 0, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 31, 0, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 1, 1, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 0, 7, 0), 0xffff_ffff);
        assert_eq!(root.config_read(1, 0, 0, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 200, 9, 0), 0xffff_ffff);
        assert_eq!(root.config_read(0, 1, 0, 1024), 0xffff_ffff);
        // Writes to nothing are dropped without effect.
        root.config_write(0, 2, 0, 4, 0, &[0xff; 4]);
        root.config_write(0, 1, 0, 4096, 0, &[0xff; 4]);
    }

    #[test]
    fn config_io_reads_host_bridge_ids() {
        let mut io = PciConfigIo::new(root_with(&[]));
        io.write(0, &cf8(0, 0, 0, 0));
        assert_eq!(io_read(&mut io, 4, 4), 0x0008_1b36u32.to_le_bytes());
        // 16-bit reads of vendor and device ID at 0xCFC and 0xCFE.
        assert_eq!(io_read(&mut io, 4, 2), [0x36, 0x1b]);
        assert_eq!(io_read(&mut io, 6, 2), [0x08, 0x00]);
        // Byte reads at each offset.
        assert_eq!(io_read(&mut io, 5, 1), [0x1b]);
        assert_eq!(io_read(&mut io, 7, 1), [0x00]);
        // Class code byte at register 2, byte 3.
        io.write(0, &cf8(0, 0, 0, 0x08));
        assert_eq!(io_read(&mut io, 7, 1), [0x06]);
    }

    #[test]
    fn config_address_register_reads_back() {
        let mut io = PciConfigIo::new(root_with(&[]));
        // Linux probes mechanism #1 this way.
        io.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0, 4), 0x8000_0000u32.to_le_bytes());
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0, 4), 0x80ff_fffcu32.to_le_bytes());
        // Byte and word accesses to 0xCF8-0xCFB are not CONFIG_ADDRESS.
        io.write(0, &[0]);
        io.write(1, &[0]);
        assert_eq!(io_read(&mut io, 0, 4), 0x80ff_fffcu32.to_le_bytes());
        assert_eq!(io_read(&mut io, 1, 1), [0xff]);
        assert_eq!(io_read(&mut io, 0, 2), [0xff, 0xff]);
    }

    #[test]
    fn config_io_bar_sizing_round_trip() {
        let mut io = PciConfigIo::new(root_with(&[0x1042]));
        io.write(0, &cf8(0, 1, 0, 0x10));
        io.write(4, &[0xff; 4]);
        assert_eq!(io_read(&mut io, 4, 4), 0xffff_f000u32.to_le_bytes());
        io.write(4, &0xfe00_0000u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 4, 4), 0xfe00_0000u32.to_le_bytes());
        // A 16-bit write to the upper half at 0xCFE.
        io.write(6, &0xfd00u16.to_le_bytes());
        assert_eq!(io_read(&mut io, 4, 4), 0xfd00_0000u32.to_le_bytes());
        // Command register through a byte write at 0xCFC.
        io.write(0, &cf8(0, 1, 0, 0x04));
        io.write(4, &[0x06]);
        assert_eq!(io_read(&mut io, 4, 2), [0x06, 0x00]);
    }

    #[test]
    fn config_io_malformed_accesses_read_all_ones() {
        let mut io = PciConfigIo::new(root_with(&[]));
        // Enable bit clear: reads all-ones, writes dropped.
        io.write(0, &0x0000_0000u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 4, 4), [0xff; 4]);
        io.write(0, &0x0000_0004u32.to_le_bytes());
        io.write(4, &[0xff; 4]);
        io.write(0, &cf8(0, 0, 0, 4));
        assert_eq!(io_read(&mut io, 4, 4), [0, 0, 0, 0]);
        // Size 3, misaligned, crossing the dword, beyond the port range.
        io.write(0, &cf8(0, 0, 0, 0));
        assert_eq!(io_read(&mut io, 4, 3), [0xff; 3]);
        assert_eq!(io_read(&mut io, 5, 2), [0xff; 2]);
        assert_eq!(io_read(&mut io, 6, 4), [0xff; 4]);
        assert_eq!(io_read(&mut io, 8, 4), [0xff; 4]);
        assert_eq!(io_read(&mut io, u64::MAX, 1), [0xff]);
        assert_eq!(io_read(&mut io, 4, 8), [0xff; 8]);
        assert_eq!(io_read(&mut io, 4, 0), Vec::<u8>::new());
        io.write(5, &[0xff; 2]);
        io.write(4, &[0xff; 3]);
        io.write(u64::MAX, &[0xff]);
        // Absent device and other buses read all-ones through the ports too.
        io.write(0, &cf8(0, 9, 0, 0));
        assert_eq!(io_read(&mut io, 4, 4), [0xff; 4]);
        io.write(0, &cf8(3, 0, 0, 0));
        assert_eq!(io_read(&mut io, 4, 4), [0xff; 4]);
    }

    #[test]
    fn ecam_reads_and_writes() {
        let mut mmio = PciConfigMmio::new(root_with(&[0x1042]));
        assert_eq!(ecam_read32(&mut mmio, ecam(0, 0, 0)), 0x0008_1b36);
        assert_eq!(ecam_read32(&mut mmio, ecam(1, 0, 0)), 0x1042_1af4);
        let mut word = [0u8; 2];
        mmio.read(ecam(1, 0, 2), &mut word);
        assert_eq!(word, [0x42, 0x10]);
        let mut byte = [0u8; 1];
        mmio.read(ecam(1, 0, 0xb), &mut byte);
        assert_eq!(byte, [0x01]);
        // Extended config space is reachable through ECAM only.
        assert_eq!(ecam_read32(&mut mmio, ecam(1, 0, 0x100)), 0);
        assert_eq!(ecam_read32(&mut mmio, ecam(0, 0, 0x100)), 0xffff_ffff);
        // BAR sizing through ECAM.
        mmio.write(ecam(1, 0, 0x10), &[0xff; 4]);
        assert_eq!(ecam_read32(&mut mmio, ecam(1, 0, 0x10)), 0xffff_f000);
        mmio.write(ecam(1, 0, 0x10), &0xc000_0000u32.to_le_bytes());
        assert_eq!(ecam_read32(&mut mmio, ecam(1, 0, 0x10)), 0xc000_0000);
    }

    #[test]
    fn ecam_absent_and_malformed_accesses_read_all_ones() {
        let mut mmio = PciConfigMmio::new(root_with(&[]));
        assert_eq!(ecam_read32(&mut mmio, ecam(5, 0, 0)), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut mmio, ecam(0, 1, 0)), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut mmio, 1 << 20), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut mmio, PCI_ECAM_SIZE_ALL_BUSES), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut mmio, u64::MAX - 3), 0xffff_ffff);
        let mut data = [0u8; 3];
        mmio.read(ecam(0, 0, 0), &mut data);
        assert_eq!(data, [0xff; 3]);
        let mut data = [0u8; 4];
        mmio.read(ecam(0, 0, 2), &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 8];
        mmio.read(ecam(0, 0, 0), &mut data);
        assert_eq!(data, [0xff; 8]);
        // Malformed writes change nothing.
        mmio.write(ecam(0, 0, 0x3c), &[0x55; 3]);
        mmio.write(ecam(0, 0, 0x3d), &[0x55; 2]);
        mmio.write(u64::MAX, &[0x55]);
        assert_eq!(ecam_read32(&mut mmio, ecam(0, 0, 0x3c)), 0);
    }

    #[test]
    fn io_and_ecam_share_one_root() {
        let root = root_with(&[0x1042]);
        let mut io = PciConfigIo::new(root.clone());
        let mut mmio = PciConfigMmio::new(root);
        mmio.write(ecam(1, 0, 0x3c), &[0x0b]);
        io.write(0, &cf8(0, 1, 0, 0x3c));
        assert_eq!(io_read(&mut io, 4, 1), [0x0b]);
    }
}
