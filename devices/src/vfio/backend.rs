//! What [`VfioPciDevice`](super::VfioPciDevice) needs from a VFIO device: config space and
//! BAR region access, region layout, interrupt wiring, mmap and reset.
//!
//! [`HostVfioDevice`](super::HostVfioDevice) implements it over the kernel's VFIO device
//! fd; tests implement it over plain memory, so the config space and BAR emulation run
//! without VFIO.

use std::io;
use std::ptr::NonNull;

use vmm_sys_util::eventfd::EventFd;

/// The interrupt sets of a VFIO PCI device (VFIO's irq indexes 0, 1, 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    Intx,
    Msi,
    Msix,
}

/// Layout of one BAR region as VFIO reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the BAR is not implemented).
    pub size: u64,
    /// The region can be mmapped (in full, or the `sparse` areas only).
    pub mmap: bool,
    /// Areas `(offset, len)` that can be mmapped when not the whole region can (a sparse
    /// mmap capability, e.g. around an MSI-X table the kernel will not expose).
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// A mapping of part of a device region into this process; unmapped on drop.
#[derive(Debug)]
pub struct DeviceMapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory (device MMIO) owned by this value; it has no
// thread affinity and is only accessed through raw pointers by KVM and the guest.
unsafe impl Send for DeviceMapping {}
// SAFETY: as above; `&DeviceMapping` only hands out the address.
unsafe impl Sync for DeviceMapping {}

impl DeviceMapping {
    /// Takes ownership of the mapping `[addr, addr + len)`.
    ///
    /// # Safety
    /// `addr` must be the start of a live `mmap` of exactly `len` bytes that nothing else
    /// unmaps; this value munmaps it when dropped.
    pub unsafe fn from_raw(addr: NonNull<u8>, len: usize) -> Self {
        DeviceMapping { addr, len }
    }

    /// The host address of the mapping.
    pub fn host_addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceMapping {
    fn drop(&mut self) {
        // SAFETY: by the contract of `from_raw` we own this mapping and nobody else unmaps
        // it; the VMM removes any KVM memory slot over it before dropping the device.
        let ret = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        if ret != 0 {
            log::error!(
                "cannot unmap device mapping at {:p} ({} bytes): {}",
                self.addr,
                self.len,
                io::Error::last_os_error()
            );
        }
    }
}

/// Access to one VFIO PCI device.
///
/// Reads that fail return all-ones, as a PCI read with no responder would; failed writes
/// are dropped and logged by the implementation. The guest is never trusted with offsets:
/// the callers bound-check, and implementations check again against the region size.
pub trait VfioBackend: Send {
    /// Reads the device's config space (as the host's vfio-pci presents it).
    fn config_read(&self, offset: u64, data: &mut [u8]);

    /// Writes the device's config space.
    fn config_write(&self, offset: u64, data: &[u8]);

    /// Layout of BAR region `bar` (0-5), `None` when the device has no such region.
    fn region(&self, bar: u32) -> Option<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` of BAR region `bar`.
    fn region_read(&self, bar: u32, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset` of BAR region `bar`.
    fn region_write(&self, bar: u32, offset: u64, data: &[u8]);

    /// Number of interrupts VFIO offers for `kind` (0: not supported).
    fn irq_count(&self, kind: IrqKind) -> u32;

    /// Signals `fds[i]` when interrupt `i` of `kind` fires (VFIO_DEVICE_SET_IRQS, trigger).
    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> io::Result<()>;

    /// Stops all interrupts of `kind`.
    fn disable_irq(&self, kind: IrqKind) -> io::Result<()>;

    /// Unmasks INTx whenever `fd` is signalled (VFIO_DEVICE_SET_IRQS, unmask).
    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()>;

    /// Maps `len` bytes at `offset` of BAR region `bar` into this process.
    fn mmap_region(&self, bar: u32, offset: u64, len: u64) -> io::Result<DeviceMapping>;

    /// Resets the device if it supports a reset.
    fn reset(&self);
}
