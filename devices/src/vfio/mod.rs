//! VFIO PCI passthrough: a host PCI function given to the guest.
//!
//! - [`host`]: the VFIO container, guest RAM DMA-mapped into it (IOVA = guest-physical),
//!   and [`HostVfioDevice`], a device opened through the host kernel;
//! - [`VfioBackend`]: what the device model needs from a VFIO device (tests fake it);
//! - [`VfioPciDevice`]: the [`PciDevice`](crate::pci::PciDevice) the guest sees: virtual
//!   config space, BARs mmapped where possible and trapped elsewhere, MSI-X table emulated,
//!   interrupts (INTx, MSI, MSI-X) through eventfds the VMM routes ([`InterruptAllocator`]),
//!   BAR mappings placed through the VMM's [`GuestMapper`].

pub mod backend;
pub mod bar_map;
pub mod caps;
pub mod config;
pub mod host;
pub mod interrupts;
pub mod msi;
pub mod pci_device;

#[cfg(test)]
mod fake;

pub use backend::{DeviceMapping, IrqKind, RegionInfo, VfioBackend};
pub use bar_map::{BarMmap, GuestMapper};
pub use config::VirtualBar;
pub use host::{
    open_container, DmaRange, GuestDmaMappings, HostVfioDevice, HostVfioError, VfioContainer,
    VfioDeviceFd,
};
pub use interrupts::{InterruptAllocator, IntxLine};
pub use pci_device::{VfioPciDevice, VfioPciError};
