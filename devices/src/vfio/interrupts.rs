//! What a passed-through device asks the VMM for when it is created: MSI and MSI-X vectors
//! (as [`MsiVectors`], the interface the VMM's KVM router implements for every PCI
//! function) and, when the VMM can route it, a level-triggered INTx line.
//!
//! The host's vfio-pci signals the eventfds directly, so a device interrupt reaches the
//! guest through KVM without passing through the VMM.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::pci::MsiVectors;

/// A level-triggered INTx line: the VMM registered `trigger` as a KVM irqfd on `gsi` with
/// `resample` as its resample eventfd, which KVM signals when the guest EOIs the
/// interrupt; VFIO then unmasks the device's INTx so it can fire again.
#[derive(Debug)]
pub struct IntxLine {
    pub trigger: EventFd,
    pub resample: EventFd,
    /// The guest IRQ (GSI) of the line; the device reports it in the Interrupt Line
    /// register (0xff when above 254).
    pub gsi: u32,
}

/// The VMM's interrupt resources for one device.
pub trait InterruptAllocator {
    /// `count` vectors, all detached (masked) until routed.
    fn msi_vectors(&mut self, count: u16) -> io::Result<Arc<dyn MsiVectors>>;

    /// A level-triggered INTx line for the device's interrupt pin `pin` (1 = INTA# ..
    /// 4 = INTD#, as in config space), on the guest IRQ the platform's routing gives that
    /// pin of the device's slot; or `None` when the VMM cannot route INTx (the device then
    /// reports no interrupt pin, and the guest uses MSI or MSI-X).
    fn intx_line(&mut self, pin: u8) -> io::Result<Option<IntxLine>>;
}
