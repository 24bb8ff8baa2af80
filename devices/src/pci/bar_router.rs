//! Routes guest accesses inside the PCI windows to the BAR that decodes them: one router
//! per MMIO window on the MMIO bus, and one for the PCI port range on the port I/O bus.
//!
//! The guest may move a BAR at any time by rewriting it, so the router does not cache a
//! map: on each access it asks the functions which BARs they decode now. There are only
//! a handful of functions and BAR accesses are rare (virtqueue notifications go through
//! ioeventfds and never exit to the VMM), so a linear scan is cheap enough.

use std::sync::{Arc, Mutex};

use super::config_space::BarKind;
use super::root::PciRoot;
use crate::bus::BusDevice;

/// The address space a window is in, and so which BARs can decode in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciSpace {
    /// Memory: 32- and 64-bit memory BARs.
    Memory,
    /// Port I/O: I/O BARs.
    Io,
}

impl PciSpace {
    fn decodes(self, kind: BarKind) -> bool {
        (kind == BarKind::Io) == (self == PciSpace::Io)
    }
}

/// A [`BusDevice`] covering one PCI window, placed on the MMIO or port bus at `base`.
pub struct PciBarRouter {
    root: Arc<Mutex<PciRoot>>,
    base: u64,
    space: PciSpace,
}

impl PciBarRouter {
    /// A router for the window of `space` starting at address (or port) `base`.
    pub fn new(root: Arc<Mutex<PciRoot>>, base: u64, space: PciSpace) -> Self {
        Self { root, base, space }
    }

    /// Calls `f` with the function, BAR index and offset decoding `offset` (relative to
    /// the window); returns false if no BAR does.
    fn dispatch(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut dyn super::PciDevice, usize, u64),
    ) -> bool {
        let Some(addr) = self.base.checked_add(offset) else {
            return false;
        };
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        for device in root.functions() {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            let hit = dev.bars().into_iter().flatten().find(|bar| {
                self.space.decodes(bar.kind) && addr >= bar.addr && addr - bar.addr < bar.size
            });
            if let Some(bar) = hit {
                let offset = addr - bar.addr;
                if offset + len as u64 > bar.size {
                    log::debug!(
                        "PCI {:?} access at {addr:#x} runs past the end of BAR {}",
                        self.space,
                        bar.index
                    );
                    return false;
                }
                f(&mut *dev, bar.index, offset);
                return true;
            }
        }
        false
    }
}

impl BusDevice for PciBarRouter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        if !self.dispatch(offset, len, |dev, bar, off| dev.bar_read(bar, off, data)) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !self.dispatch(offset, data.len(), |dev, bar, off| {
            dev.bar_write(bar, off, data)
        }) {
            log::debug!(
                "dropping PCI {:?} write at window offset {offset:#x}",
                self.space
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config_space::NUM_BARS;
    use crate::pci::{PciBarRange, PciConfiguration, PciDevice, PciHeader};

    struct Dev {
        config: PciConfiguration,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Dev {
        fn config_read(&mut self, reg_idx: usize) -> u32 {
            self.config.read_reg(reg_idx)
        }
        fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg_idx, offset, data);
        }
        fn bars(&self) -> [Option<PciBarRange>; NUM_BARS] {
            self.config.decoded_bars()
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar.to_le_bytes()[0] * 16 + offset.to_le_bytes()[0]);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    /// A bus 0 with `config`'s function on it: the function, and the root for routers.
    fn on_bus(config: PciConfiguration) -> (Arc<Mutex<Dev>>, Arc<Mutex<PciRoot>>) {
        let dev = Arc::new(Mutex::new(Dev {
            config,
            last_write: None,
        }));
        let mut root = PciRoot::new();
        root.add_device(dev.clone()).unwrap();
        (dev, Arc::new(Mutex::new(root)))
    }

    #[test]
    fn accesses_follow_the_bar_and_the_command_register() {
        let mut config = PciConfiguration::new(PciHeader::default(), false);
        config.add_bar(0, 0x1000, BarKind::Mmio64, false).unwrap();
        config.add_bar(2, 0x100, BarKind::Mmio32, false).unwrap();
        config.set_bar_address(0, 0x1_0000_0000).unwrap();
        config.set_bar_address(2, 0xc000_0000).unwrap();
        let (dev, root) = on_bus(config);
        let mut low = PciBarRouter::new(root.clone(), 0xc000_0000, PciSpace::Memory);
        let mut high = PciBarRouter::new(root, 0x1_0000_0000, PciSpace::Memory);

        let mut d = [0u8; 4];
        low.read(0x4, &mut d);
        assert_eq!(d, [0xff; 4], "memory decoding is off");
        dev.lock().unwrap().config.write_reg(1, 0, &[0x2]);
        low.read(0x4, &mut d);
        assert_eq!(d, [0x24; 4]);
        high.write(0x10, &[7, 7]);
        assert_eq!(dev.lock().unwrap().last_write, Some((0, 0x10, vec![7, 7])));
        // Past the end of BAR 2 and an access straddling its end.
        low.read(0x100, &mut d);
        assert_eq!(d, [0xff; 4]);
        low.read(0xfe, &mut d);
        assert_eq!(d, [0xff; 4]);
        // The guest moves BAR 2; the old address no longer decodes.
        dev.lock()
            .unwrap()
            .config
            .write_reg(6, 0, &0xc000_1000u32.to_le_bytes());
        low.read(0x4, &mut d);
        assert_eq!(d, [0xff; 4]);
        low.read(0x1004, &mut d);
        assert_eq!(d, [0x24; 4]);
    }

    #[test]
    fn port_accesses_reach_io_bars_only() {
        let mut config = PciConfiguration::new(PciHeader::default(), false);
        config.add_bar(0, 0x20, BarKind::Io, false).unwrap();
        config.add_bar(1, 0x1000, BarKind::Mmio32, false).unwrap();
        config.set_bar_address(0, 0xc040).unwrap();
        // A memory BAR at the same number as a port must not answer port accesses.
        config.set_bar_address(1, 0xd000).unwrap();
        let (dev, root) = on_bus(config);
        let mut ports = PciBarRouter::new(root.clone(), 0x0d00, PciSpace::Io);
        let mut mmio = PciBarRouter::new(root, 0xc000, PciSpace::Memory);

        let mut d = [0u8; 2];
        // Both decodings on: ports see only the I/O BAR, memory only the memory BAR.
        dev.lock().unwrap().config.write_reg(1, 0, &[0x3]);
        ports.read(0xc044 - 0x0d00, &mut d);
        assert_eq!(d, [0x04; 2]);
        ports.write(0xc05e - 0x0d00, &[1, 2]);
        assert_eq!(dev.lock().unwrap().last_write, Some((0, 0x1e, vec![1, 2])));
        ports.read(0xd004 - 0x0d00, &mut d);
        assert_eq!(d, [0xff; 2], "a memory BAR does not decode ports");
        mmio.read(0x40, &mut d);
        assert_eq!(d, [0xff; 2], "an I/O BAR does not decode memory");
        mmio.read(0x1004, &mut d);
        assert_eq!(d, [0x14; 2]);
        // Past the BAR end, straddling it, and with I/O decoding off.
        ports.read(0xc060 - 0x0d00, &mut d);
        assert_eq!(d, [0xff; 2]);
        let mut w = [0u8; 4];
        ports.read(0xc05e - 0x0d00, &mut w);
        assert_eq!(w, [0xff; 4]);
        dev.lock().unwrap().config.write_reg(1, 0, &[0x2]);
        ports.read(0xc044 - 0x0d00, &mut d);
        assert_eq!(d, [0xff; 2]);
        // An offset that would overflow the address is refused, not wrapped.
        ports.read(u64::MAX, &mut d);
        assert_eq!(d, [0xff; 2]);
    }
}
