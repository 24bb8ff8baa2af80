//! The VM's PCI segment: bus 0 behind the 0xCF8 ports and ECAM, BAR address allocation
//! in the 32- and 64-bit MMIO windows, and the wiring of each function's interrupts and
//! notifications into KVM.

use std::sync::{Arc, Mutex};

use devices::pci::{
    BarKind, PciBarRouter, PciConfigIo, PciConfigMmio, PciDevice, PciHeader, PciRoot,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_LEN,
};
use devices::virtio::{VirtioDevice, VirtioPciDevice, VirtioPciError, VIRTIO_PCI_BAR_SIZE};
use devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::arch::x86_64::layout::{
    pci_mmio64_start, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
    PCI_MMIO64_SIZE,
};
use crate::interrupts::{InterruptError, MsiRouter};

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
    #[error("no room for a {size:#x}-byte BAR in the PCI {window} window")]
    NoBarSpace {
        /// The BAR size.
        size: u64,
        /// Which window.
        window: &'static str,
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
    /// KVM refused an ioeventfd.
    #[error("cannot register a virtio notification with KVM: {0}")]
    IoEvent(kvm_ioctls::Error),
}

/// Bus 0 and the address space it hands out.
pub struct PciSegment {
    root: Arc<Mutex<PciRoot>>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    mmio64_start: u64,
}

impl PciSegment {
    /// Bus 0 with its host bridge; the 64-bit window starts above `ram_end`.
    pub fn new(ram_end: u64) -> Self {
        let mmio64_start = pci_mmio64_start(ram_end);
        Self {
            root: Arc::new(Mutex::new(PciRoot::new())),
            // Both windows are non-empty constants: creation cannot fail.
            mmio32: AddressAllocator::new(PCI_MMIO32_START, PCI_MMIO32_SIZE)
                .unwrap_or_else(|_| unreachable!("constant PCI 32-bit window")),
            mmio64: AddressAllocator::new(mmio64_start, PCI_MMIO64_SIZE)
                .unwrap_or_else(|_| unreachable!("PCI 64-bit window above RAM")),
            mmio64_start,
        }
    }

    /// Puts the config mechanisms and both MMIO windows on the buses.
    pub fn attach(&self, io_bus: &mut Bus, mmio_bus: &mut Bus) -> Result<(), PciError> {
        let bus_err = |what| move |source| PciError::Bus { what, source };
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(self.root.clone()))),
                u64::from(PCI_CONFIG_IO_PORT),
                PCI_CONFIG_IO_PORT_LEN,
            )
            .map_err(bus_err("config ports"))?;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(PciConfigMmio::new(self.root.clone()))),
                PCI_ECAM_START,
                PCI_ECAM_SIZE,
            )
            .map_err(bus_err("ECAM"))?;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(PciBarRouter::new(
                    self.root.clone(),
                    PCI_MMIO32_START,
                ))),
                PCI_MMIO32_START,
                PCI_MMIO32_SIZE,
            )
            .map_err(bus_err("32-bit window"))?;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(PciBarRouter::new(
                    self.root.clone(),
                    self.mmio64_start,
                ))),
                self.mmio64_start,
                PCI_MMIO64_SIZE,
            )
            .map_err(bus_err("64-bit window"))?;
        Ok(())
    }

    /// Reserves a naturally aligned range for a BAR of `size` bytes. 32-bit BARs and
    /// small 64-bit ones go below 4 GiB (any guest can reach them); 64-bit BARs of
    /// 256 MiB or more go to the 64-bit window.
    pub fn allocate_bar(&mut self, size: u64, kind: BarKind) -> Result<u64, PciError> {
        let (alloc, window) = match kind {
            BarKind::Mmio64 if size >= 256 << 20 => (&mut self.mmio64, "64-bit"),
            _ => (&mut self.mmio32, "32-bit"),
        };
        alloc
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciError::NoBarSpace { size, window })
    }

    /// Adds a function at the next free slot.
    pub fn add(&self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        Ok(root.add_device(device)?)
    }

    /// Puts a virtio device on the bus: one MSI-X vector per queue plus one for config
    /// changes, BAR 0 allocated, and each queue's notification registered as an
    /// ioeventfd at BAR 0's address. (If the guest moves BAR 0, notifications reach the
    /// transport through the BAR router instead, which forwards them: slower, still
    /// correct.)
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        router: &Arc<MsiRouter>,
        device: Box<dyn VirtioDevice>,
        header: PciHeader,
    ) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), PciError> {
        let vectors = Arc::new(router.allocate(device.num_queues() + 1)?);
        let mut transport = VirtioPciDevice::new(device, header, vectors)?;
        let bar = self.allocate_bar(VIRTIO_PCI_BAR_SIZE, BarKind::Mmio64)?;
        transport
            .set_bar_address(bar)
            .map_err(|e| PciError::Virtio(VirtioPciError::Config(e)))?;
        for (offset, evt) in transport.notifications() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
                .map_err(PciError::IoEvent)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let slot = self.add(transport.clone())?;
        Ok((slot, transport))
    }
}
