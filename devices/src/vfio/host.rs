//! VFIO through the host kernel: the container (one IOMMU domain per VM), the DMA mappings
//! of guest RAM in it, and [`HostVfioDevice`], the [`VfioBackend`] over a VFIO device fd.
//!
//! Order matters: the container gets its IOMMU type when the first device's group joins it,
//! so devices are opened before guest memory is DMA-mapped.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
pub use vfio_ioctls::{VfioContainer, VfioDeviceFd};
use vfio_ioctls::{VfioDevice, VfioError, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{DeviceMapping, IrqKind, RegionInfo, VfioBackend};

/// VFIO's config space region of a PCI device.
const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
/// Config space of a PCI Express function.
const EXTENDED_CONFIG_LEN: u64 = 4096;
/// BAR regions are 0-5.
const MAX_BAR_REGION: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum HostVfioError {
    #[error("cannot open the VFIO container /dev/vfio/vfio: {0}")]
    Container(VfioError),
    #[error("cannot open VFIO device {path}: {source}")]
    Device { path: PathBuf, source: VfioError },
    #[error("cannot DMA-map guest memory at {iova:#x} ({len:#x} bytes) for VFIO: {source}")]
    DmaMap {
        iova: u64,
        len: u64,
        source: VfioError,
    },
    #[error(
        "guest memory range at {iova:#x} of {len:#x} bytes does not fit this host's address size"
    )]
    DmaRange { iova: u64, len: u64 },
}

/// Opens `/dev/vfio/vfio`. With `kvm_vfio` (a KVM_DEV_TYPE_VFIO device of the VM) every
/// group that joins is announced to KVM, which needs to know about non-coherent DMA.
pub fn open_container(
    kvm_vfio: Option<Arc<VfioDeviceFd>>,
) -> Result<Arc<VfioContainer>, HostVfioError> {
    VfioContainer::new(kvm_vfio)
        .map(Arc::new)
        .map_err(HostVfioError::Container)
}

fn vfio_irq_index(kind: IrqKind) -> u32 {
    match kind {
        IrqKind::Intx => VFIO_PCI_INTX_IRQ_INDEX,
        IrqKind::Msi => VFIO_PCI_MSI_IRQ_INDEX,
        IrqKind::Msix => VFIO_PCI_MSIX_IRQ_INDEX,
    }
}

fn io_err(e: VfioError) -> io::Error {
    io::Error::other(e.to_string())
}

/// A host PCI function opened through VFIO.
pub struct HostVfioDevice {
    device: VfioDevice,
}

impl HostVfioDevice {
    /// Opens the device at `sysfs_path` (e.g. `/sys/bus/pci/devices/0000:81:00.0`), adding
    /// its IOMMU group to `container`.
    pub fn open(container: &Arc<VfioContainer>, sysfs_path: &Path) -> Result<Self, HostVfioError> {
        let ops: Arc<dyn VfioOps> = container.clone();
        VfioDevice::new(sysfs_path, ops, false)
            .map(|device| HostVfioDevice { device })
            .map_err(|source| HostVfioError::Device {
                path: sysfs_path.to_path_buf(),
                source,
            })
    }

    fn is_bar(bar: u32) -> bool {
        bar <= MAX_BAR_REGION
    }
}

impl VfioBackend for HostVfioDevice {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset.saturating_add(data.len() as u64) <= EXTENDED_CONFIG_LEN {
            self.device.region_read(CONFIG_REGION, data, offset);
        }
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        self.device.region_write(CONFIG_REGION, data, offset);
    }

    fn region(&self, bar: u32) -> Option<RegionInfo> {
        if !Self::is_bar(bar) {
            return None;
        }
        let size = self.device.get_region_size(bar);
        let sparse = self
            .device
            .get_region_caps(bar)
            .into_iter()
            .find_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                }
                _ => None,
            });
        Some(RegionInfo {
            size,
            mmap: self.device.get_region_flags(bar) & VFIO_REGION_INFO_FLAG_MMAP != 0,
            sparse,
        })
    }

    fn region_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if Self::is_bar(bar) {
            self.device.region_read(bar, data, offset);
        }
    }

    fn region_write(&self, bar: u32, offset: u64, data: &[u8]) {
        if Self::is_bar(bar) {
            self.device.region_write(bar, data, offset);
        }
    }

    fn irq_count(&self, kind: IrqKind) -> u32 {
        self.device
            .get_irq_info(vfio_irq_index(kind))
            .map_or(0, |i| i.count)
    }

    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_irq(vfio_irq_index(kind), fds.to_vec())
            .map_err(io_err)
    }

    fn disable_irq(&self, kind: IrqKind) -> io::Result<()> {
        self.device
            .disable_irq(vfio_irq_index(kind))
            .map_err(io_err)
    }

    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(VFIO_PCI_INTX_IRQ_INDEX, vec![fd])
            .map_err(io_err)
    }

    fn mmap_region(&self, bar: u32, offset: u64, len: u64) -> io::Result<DeviceMapping> {
        let size = self.device.get_region_size(bar);
        if !Self::is_bar(bar) || len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset:#x}+{len:#x} is outside BAR {bar} ({size:#x} bytes)"),
            ));
        }
        let file_offset = self
            .device
            .get_region_offset(bar)
            .checked_add(offset)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::other("region offset overflows off_t"))?;
        let len = usize::try_from(len).map_err(|_| io::Error::other("length overflows usize"))?;
        // SAFETY: a fresh shared mapping of the device fd at an address the kernel picks;
        // it replaces nothing of ours. The result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                file_offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        // SAFETY: `addr` is the start of the `len`-byte mapping just created, owned by nobody
        // else.
        Ok(unsafe { DeviceMapping::from_raw(addr, len) })
    }

    fn reset(&self) {
        self.device.reset();
    }
}

/// A piece of guest RAM to make reachable by device DMA at `iova` (= its guest-physical
/// address).
#[derive(Clone, Copy, Debug)]
pub struct DmaRange {
    pub iova: u64,
    pub len: u64,
    pub host_addr: *mut u8,
}

/// Guest RAM mapped into a container's IOMMU domain; unmapped when dropped.
pub struct GuestDmaMappings {
    container: Arc<VfioContainer>,
    mapped: Vec<(u64, u64)>,
}

impl GuestDmaMappings {
    /// DMA-maps every range (pinning its pages). On failure the ranges mapped so far are
    /// unmapped again.
    ///
    /// # Safety
    /// Each range must be a live mapping of guest memory that stays mapped (not unmapped or
    /// replaced) until the returned value is dropped; devices may read and write it at any
    /// time meanwhile, so nothing may hold Rust references into it.
    pub unsafe fn map(
        container: Arc<VfioContainer>,
        ranges: &[DmaRange],
    ) -> Result<Self, HostVfioError> {
        let mut out = GuestDmaMappings {
            container,
            mapped: Vec::with_capacity(ranges.len()),
        };
        for r in ranges {
            let len = usize::try_from(r.len).map_err(|_| HostVfioError::DmaRange {
                iova: r.iova,
                len: r.len,
            })?;
            // SAFETY: the caller guarantees the range stays mapped until `out` is dropped,
            // and `out` unmaps it from the IOMMU first.
            unsafe { out.container.vfio_dma_map(r.iova, len, r.host_addr) }.map_err(|source| {
                HostVfioError::DmaMap {
                    iova: r.iova,
                    len: r.len,
                    source,
                }
            })?;
            out.mapped.push((r.iova, r.len));
        }
        Ok(out)
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.mapped.iter().map(|(_, l)| l).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.mapped.is_empty()
    }
}

impl Drop for GuestDmaMappings {
    fn drop(&mut self) {
        for &(iova, len) in self.mapped.iter().rev() {
            let Ok(size) = usize::try_from(len) else {
                continue;
            };
            if let Err(e) = self.container.vfio_dma_unmap(iova, size) {
                log::error!("cannot DMA-unmap guest memory at {iova:#x} ({len:#x} bytes): {e}");
            }
        }
    }
}
