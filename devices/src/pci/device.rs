//! The interface every PCI function implements, and the host bridge at 00:00.0.

use super::config_space::{PciBarRange, PciConfiguration, PciHeader, NUM_BARS};

/// A PCI function as the [`PciRoot`](super::PciRoot) and the VMM see it.
///
/// Config accesses address a 32-bit register (`reg_idx`, i.e. byte offset / 4) and a
/// byte offset in it; the function decides what is writable. BAR accesses carry the
/// BAR index and the offset inside the BAR; the VMM maps guest addresses to BARs.
pub trait PciDevice: Send {
    /// Reads config register `reg_idx`. Registers the function does not have read
    /// all-ones.
    fn config_read(&mut self, reg_idx: usize) -> u32;

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of config register `reg_idx`.
    /// Malformed or out-of-range writes are ignored.
    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]);

    /// The BARs the function decodes now, by index (see
    /// [`PciConfiguration::decoded_bars`]); the VMM routes MMIO and port accesses inside
    /// them to [`Self::bar_read`] / [`Self::bar_write`]. A function without BARs
    /// returns none.
    fn bars(&self) -> [Option<PciBarRange>; NUM_BARS] {
        [None; NUM_BARS]
    }

    /// Reads `data.len()` bytes at `offset` in BAR `bar`. By default a function has no
    /// BAR contents: the read returns all-ones.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        log::debug!("PCI read of BAR {bar} offset {offset:#x} with no handler");
        data.fill(0xff);
    }

    /// Writes `data` at `offset` in BAR `bar`. By default the write is dropped.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        log::debug!(
            "PCI write of {} bytes to BAR {bar} offset {offset:#x} with no handler",
            data.len()
        );
    }
}

/// Vendor ID of the host bridge: Red Hat, Inc., the vendor under which QEMU's virtual
/// devices are registered.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the host bridge: 1b36:0008 is the "PCI Express Host bridge" of Red Hat's
/// virtual device ID list (QEMU `docs/specs/pci-ids.rst`), a generic host bridge that
/// guest kernels bind no special driver to.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Base class "bridge device".
const CLASS_BRIDGE: u8 = 0x06;
/// Subclass "host bridge".
const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

/// The host bridge at 00:00.0: identification only, no BARs, no interrupts.
#[derive(Debug, Clone)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    /// Creates the host bridge with conventional (256-byte) config space.
    pub fn new() -> Self {
        let header = PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            class_code: CLASS_BRIDGE,
            subclass: SUBCLASS_HOST_BRIDGE,
            subsystem_vendor_id: HOST_BRIDGE_VENDOR_ID,
            subsystem_id: HOST_BRIDGE_DEVICE_ID,
            ..PciHeader::default()
        };
        Self {
            config: PciConfiguration::new(header, false),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn config_read(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }

    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg_idx, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_identifies_as_host_bridge() {
        let mut bridge = PciHostBridge::new();
        assert_eq!(bridge.config_read(0), 0x0008_1b36);
        // Class 06, subclass 00, prog-if 00, revision 00.
        assert_eq!(bridge.config_read(2), 0x0600_0000);
        // Header type 0, single function.
        assert_eq!((bridge.config_read(3) >> 16) & 0xff, 0);
        // No capabilities, no BARs.
        assert_eq!(bridge.config_read(13), 0);
        for reg in 4..10 {
            bridge.config_write(reg, 0, &[0xff; 4]);
            assert_eq!(bridge.config_read(reg), 0, "BAR register {reg}");
        }
    }

    #[test]
    fn host_bridge_ids_are_read_only() {
        let mut bridge = PciHostBridge::new();
        bridge.config_write(0, 0, &[0; 4]);
        bridge.config_write(2, 0, &[0xff; 4]);
        assert_eq!(bridge.config_read(0), 0x0008_1b36);
        assert_eq!(bridge.config_read(2), 0x0600_0000);
    }

    #[test]
    fn default_bar_access_reads_all_ones() {
        let mut bridge = PciHostBridge::new();
        let mut data = [0u8; 4];
        bridge.bar_read(0, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
        bridge.bar_write(0, 0, &[1, 2, 3, 4]);
    }
}
