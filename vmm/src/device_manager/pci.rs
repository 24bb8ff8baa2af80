//! The VM's PCI segment: bus 0 behind the 0xCF8 ports and ECAM, BAR address allocation
//! in the I/O, 32-bit and 64-bit windows, routing of guest accesses in those windows to
//! the BAR that decodes them, and the wiring of each function's interrupts and
//! notifications into KVM.

use std::sync::{Arc, Mutex};

use devices::pci::{
    BarKind, PciBarRouter, PciConfigIo, PciConfigMmio, PciDevice, PciRoot, PciSpace,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_LEN,
};
use devices::virtio::VirtioPciError;
use devices::{Bus, BusError};
use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::arch::x86_64::layout::{
    Mmio64Window, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_IO_BAR_SIZE, PCI_IO_BAR_START,
    PCI_IO_WINDOW_LAST, PCI_IO_WINDOW_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use crate::interrupts::InterruptError;

/// 64-bit BARs this large or larger go to the 64-bit window; smaller ones below 4 GiB.
const LARGE_BAR: u64 = 256 << 20;

/// Errors from building the PCI segment.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A window could not be placed on the MMIO or port bus.
    #[error("cannot place the PCI {what} on the bus: {source}")]
    Bus {
        /// Which range.
        what: &'static str,
        /// Why.
        source: BusError,
    },
    /// A BAR does not fit in its window.
    #[error("no room for a {size:#x}-byte BAR in the PCI {window}")]
    NoBarSpace {
        /// The BAR size.
        size: u64,
        /// Which window, where it is and what bounds it.
        window: String,
    },
    /// Bus 0 is full.
    #[error("cannot add a PCI function: {0}")]
    Root(#[from] devices::pci::PciRootError),
    /// The virtio transport could not be built.
    #[error(transparent)]
    Virtio(#[from] VirtioPciError),
    /// Interrupt vectors could not be allocated.
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
}

/// Bus 0 and the address space it hands out.
pub struct PciSegment {
    root: Arc<Mutex<PciRoot>>,
    io: AddressAllocator,
    mmio32: AddressAllocator,
    /// `None` when guest RAM leaves no room for a 64-bit window.
    mmio64: Option<AddressAllocator>,
    mmio64_window: Mmio64Window,
}

impl PciSegment {
    /// Bus 0 with its host bridge and the 64-bit window `mmio64_window` (from
    /// [`pci_mmio64_window`](crate::arch::x86_64::layout::pci_mmio64_window), the one
    /// the ACPI tables declare).
    pub fn new(mmio64_window: Mmio64Window) -> Self {
        Self {
            root: Arc::new(Mutex::new(PciRoot::new())),
            // Both windows are non-empty constants: creation cannot fail.
            io: AddressAllocator::new(u64::from(PCI_IO_BAR_START), PCI_IO_BAR_SIZE)
                .unwrap_or_else(|_| unreachable!("constant PCI I/O BAR range")),
            mmio32: AddressAllocator::new(PCI_MMIO32_START, PCI_MMIO32_SIZE)
                .unwrap_or_else(|_| unreachable!("constant PCI 32-bit window")),
            mmio64: AddressAllocator::new(mmio64_window.start, mmio64_window.size).ok(),
            mmio64_window,
        }
    }

    /// Puts the config mechanisms and the routers of the windows on the buses.
    pub fn attach(&self, io_bus: &mut Bus, mmio_bus: &mut Bus) -> Result<(), PciError> {
        let bus_err = |what| move |source| PciError::Bus { what, source };
        let router = |base, space| {
            Arc::new(Mutex::new(PciBarRouter::new(
                self.root.clone(),
                base,
                space,
            )))
        };
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(self.root.clone()))),
                u64::from(PCI_CONFIG_IO_PORT),
                PCI_CONFIG_IO_PORT_LEN,
            )
            .map_err(bus_err("config ports"))?;
        // The whole port range the host bridge claims, not only where BARs are placed:
        // the guest may move an I/O BAR anywhere in it.
        let io_start = u64::from(PCI_IO_WINDOW_START);
        io_bus
            .insert(
                router(io_start, PciSpace::Io),
                io_start,
                u64::from(PCI_IO_WINDOW_LAST) - io_start + 1,
            )
            .map_err(bus_err("I/O window"))?;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(PciConfigMmio::new(self.root.clone()))),
                PCI_ECAM_START,
                PCI_ECAM_SIZE,
            )
            .map_err(bus_err("ECAM"))?;
        mmio_bus
            .insert(
                router(PCI_MMIO32_START, PciSpace::Memory),
                PCI_MMIO32_START,
                PCI_MMIO32_SIZE,
            )
            .map_err(bus_err("32-bit window"))?;
        let w = self.mmio64_window;
        if w.size > 0 {
            mmio_bus
                .insert(router(w.start, PciSpace::Memory), w.start, w.size)
                .map_err(bus_err("64-bit window"))?;
        }
        Ok(())
    }

    /// Reserves a naturally aligned range for a BAR of `size` bytes. I/O BARs go to
    /// 0xc000-0xffff; 32-bit BARs and small 64-bit ones below 4 GiB (any guest can reach
    /// them; a small 64-bit BAR that finds no room there goes high); 64-bit BARs of
    /// 256 MiB or more to the 64-bit window.
    pub fn allocate_bar(&mut self, size: u64, kind: BarKind) -> Result<u64, PciError> {
        let take = |alloc: &mut AddressAllocator| {
            alloc
                .allocate(size, size, AllocPolicy::FirstMatch)
                .map(|r| r.start())
                .ok()
        };
        let placed = match kind {
            BarKind::Io => take(&mut self.io),
            BarKind::Mmio32 => take(&mut self.mmio32),
            BarKind::Mmio64 if size < LARGE_BAR => {
                take(&mut self.mmio32).or_else(|| self.mmio64.as_mut().and_then(take))
            }
            BarKind::Mmio64 => self.mmio64.as_mut().and_then(take),
        };
        placed.ok_or_else(|| PciError::NoBarSpace {
            size,
            window: self.describe_window(kind, size),
        })
    }

    /// The window a BAR of `kind` and `size` was looked for in, for error messages.
    fn describe_window(&self, kind: BarKind, size: u64) -> String {
        let w = self.mmio64_window;
        let bounds = format!(
            "the lower half of the guest CPU's {}-bit physical address space",
            w.phys_bits
        );
        match kind {
            BarKind::Io => format!(
                "I/O window {PCI_IO_BAR_START:#x}-{:#x}",
                u64::from(PCI_IO_BAR_START) + PCI_IO_BAR_SIZE - 1
            ),
            BarKind::Mmio32 => format!(
                "32-bit window {PCI_MMIO32_START:#x}-{:#x}",
                PCI_MMIO32_START + PCI_MMIO32_SIZE - 1
            ),
            BarKind::Mmio64 if w.size == 0 => format!(
                "64-bit window: there is none, guest RAM reaches {:#x}, beyond {bounds}",
                w.start
            ),
            BarKind::Mmio64 => format!(
                "{}64-bit window {:#x}-{:#x} ({} GiB, ending at {bounds})",
                if size < LARGE_BAR {
                    "32-bit window or the "
                } else {
                    ""
                },
                w.start,
                w.end() - 1,
                w.size >> 30
            ),
        }
    }

    /// The slot the next [`Self::add`] will use.
    pub fn free_slot(&self) -> Result<u8, PciError> {
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        Ok(root.free_slot()?)
    }

    /// Adds a function at the next free slot.
    pub fn add(&self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        Ok(root.add_device(device)?)
    }

    /// Adds a function as function 0 of `slot` (one [`Self::free_slot`] returned).
    pub fn add_at(&self, slot: u8, device: Arc<Mutex<dyn PciDevice>>) -> Result<(), PciError> {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        Ok(root.add_function(slot, 0, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::pci_mmio64_window;

    const GIB: u64 = 1 << 30;

    #[test]
    fn bars_go_to_their_windows_naturally_aligned() {
        let mut pci = PciSegment::new(pci_mmio64_window(2 * GIB, 40));
        assert_eq!(pci.allocate_bar(0x20, BarKind::Io).unwrap(), 0xc000);
        assert_eq!(pci.allocate_bar(0x100, BarKind::Io).unwrap(), 0xc100);
        assert_eq!(pci.allocate_bar(0x4, BarKind::Io).unwrap(), 0xc020);
        assert_eq!(
            pci.allocate_bar(0x10_0000, BarKind::Mmio32).unwrap(),
            0xc000_0000
        );
        assert_eq!(
            pci.allocate_bar(0x4000, BarKind::Mmio64).unwrap(),
            0xc010_0000
        );
        // GPU-sized BARs: 128 GiB at its own alignment, then 32 GiB below it.
        assert_eq!(
            pci.allocate_bar(128 * GIB, BarKind::Mmio64).unwrap(),
            128 * GIB
        );
        assert_eq!(
            pci.allocate_bar(32 * GIB, BarKind::Mmio64).unwrap(),
            32 * GIB
        );
    }

    #[test]
    fn a_bar_that_does_not_fit_says_which_window_and_why() {
        // 36 bits: the window is 4-32 GiB; a 64 GiB BAR cannot fit.
        let mut pci = PciSegment::new(pci_mmio64_window(GIB, 36));
        let err = pci.allocate_bar(64 * GIB, BarKind::Mmio64).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("0x1000000000-byte BAR")
                && msg.contains("64-bit window 0x100000000-0x7ffffffff (28 GiB")
                && msg.contains("36-bit physical address space"),
            "{msg}"
        );
        // RAM up to the usable limit: no window at all.
        let mut pci = PciSegment::new(pci_mmio64_window(40 * GIB, 36));
        let msg = pci
            .allocate_bar(GIB, BarKind::Mmio64)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("there is none"), "{msg}");
        // Small 64-bit BARs still go below 4 GiB.
        assert!(pci.allocate_bar(0x1000, BarKind::Mmio64).unwrap() < 4 * GIB);
        // The I/O window fills up: 64 BARs of 256 ports.
        for _ in 0..64 {
            pci.allocate_bar(0x100, BarKind::Io).unwrap();
        }
        let msg = pci.allocate_bar(4, BarKind::Io).unwrap_err().to_string();
        assert!(msg.contains("I/O window 0xc000-0xffff"), "{msg}");
    }

    #[test]
    fn small_64_bit_bars_overflow_into_the_64_bit_window() {
        let mut pci = PciSegment::new(pci_mmio64_window(GIB, 40));
        assert_eq!(
            pci.allocate_bar(PCI_MMIO32_SIZE, BarKind::Mmio32).unwrap(),
            PCI_MMIO32_START
        );
        assert!(pci.allocate_bar(0x1000, BarKind::Mmio32).is_err());
        assert_eq!(pci.allocate_bar(0x1000, BarKind::Mmio64).unwrap(), 4 * GIB);
    }

    #[test]
    fn attach_places_the_windows_on_the_buses() {
        let pci = PciSegment::new(pci_mmio64_window(GIB, 40));
        let (mut io, mut mmio) = (Bus::new(), Bus::new());
        pci.attach(&mut io, &mut mmio).unwrap();
        // The port window ends at 0xffff and starts at 0x0d00: a device there is refused.
        let probe = Arc::new(Mutex::new(PciConfigIo::new(pci.root.clone())));
        assert!(io.insert(probe.clone(), 0xfffe, 2).is_err());
        assert!(io.insert(probe.clone(), 0x0d00, 1).is_err());
        assert!(io.insert(probe.clone(), 0x0cf0, 1).is_ok());
        assert!(mmio.insert(probe.clone(), 511 * GIB, 1).is_err());
        assert!(mmio.insert(probe, 512 * GIB, 1).is_ok());
        // Without a 64-bit window nothing is placed above RAM.
        let pci = PciSegment::new(pci_mmio64_window(40 * GIB, 36));
        let (mut io, mut mmio) = (Bus::new(), Bus::new());
        pci.attach(&mut io, &mut mmio).unwrap();
        let probe = Arc::new(Mutex::new(PciConfigIo::new(pci.root.clone())));
        assert!(mmio.insert(probe, 40 * GIB, 1).is_ok());
    }
}
