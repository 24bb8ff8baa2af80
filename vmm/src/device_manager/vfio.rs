//! Passthrough devices in the VM: the VFIO container (with KVM's VFIO device), all guest
//! RAM DMA-mapped into it at IOVA = guest-physical address, and one [`VfioPciDevice`] per
//! configured host device on the PCI segment, with its BARs placed, its mmapped BAR parts in
//! KVM memory slots, its I/O BARs in the PCI port window (trapped and forwarded) and its
//! interrupts routed through KVM (MSI/MSI-X via [`MsiRouter`], INTx via an irqfd with a
//! resample eventfd on the GSI the DSDT's `_PRT` gives the device's slot and pin).

use std::io;
use std::sync::{Arc, Mutex};

use devices::pci::{MsiVectors, PciConfigError, PciDevice};
use devices::vfio::{
    open_container, DmaRange, GuestDmaMappings, GuestMapper, HostVfioDevice, HostVfioError,
    InterruptAllocator, IntxLine, VfioContainer, VfioDeviceFd, VfioPciDevice, VfioPciError,
};
use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::pci::{PciError, PciSegment};
use crate::arch::x86_64::layout::pci_intx_gsi;
use crate::interrupts::MsiRouter;
use crate::memory::GuestRam;
use crate::passthrough::{PassthroughDevice, PciAddress};

/// KVM memory slots assumed when the kernel does not say (KVM_USER_MEM_SLOTS of old x86
/// kernels; newer ones allow more, never fewer).
const FALLBACK_MEMSLOTS: u32 = 509;

/// The memory slots `vm` may use: KVM_CAP_NR_MEMSLOTS, or [`FALLBACK_MEMSLOTS`] when the
/// kernel answers nothing usable.
fn memslot_limit(vm: &VmFd) -> u32 {
    memslots_from_cap(vm.check_extension_int(kvm_ioctls::Cap::NrMemslots))
}

fn memslots_from_cap(answer: i32) -> u32 {
    u32::try_from(answer)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(FALLBACK_MEMSLOTS)
}

#[derive(Debug, thiserror::Error)]
pub enum PassthroughSetupError {
    #[error("cannot create KVM's VFIO device: {0}")]
    KvmVfio(kvm_ioctls::Error),
    #[error(transparent)]
    Host(#[from] HostVfioError),
    #[error("passthrough device {addr}: {source}")]
    Device {
        addr: PciAddress,
        source: VfioPciError,
    },
    #[error("passthrough device {addr}: cannot place BAR {bar}: {source}")]
    Bar {
        addr: PciAddress,
        bar: usize,
        source: PciError,
    },
    #[error("passthrough device {addr}: BAR {bar} does not take its address: {source}")]
    BarAddress {
        addr: PciAddress,
        bar: usize,
        source: PciConfigError,
    },
    #[error("passthrough device {addr}: cannot put it on PCI bus 0: {source}")]
    Slot { addr: PciAddress, source: PciError },
}

/// KVM memory slot numbers for BAR mappings, above those of guest RAM.
struct SlotPool {
    free: Vec<u32>,
    next: u32,
    /// One past the highest slot number KVM accepts.
    limit: u32,
}

impl SlotPool {
    fn take(&mut self) -> io::Result<u32> {
        if let Some(s) = self.free.pop() {
            return Ok(s);
        }
        if self.next >= self.limit {
            return Err(io::Error::other(format!(
                "no free KVM memory slot (KVM allows {})",
                self.limit
            )));
        }
        self.next += 1;
        Ok(self.next - 1)
    }
}

/// Maps BAR pieces into the guest as KVM memory slots.
struct KvmGuestMapper {
    vm: Arc<VmFd>,
    slots: Arc<Mutex<SlotPool>>,
}

impl KvmGuestMapper {
    fn set_slot(&self, slot: u32, gpa: u64, host_addr: u64, len: u64) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: for a new slot the caller of `map` keeps `host_addr..+len` mapped until
        // `unmap`; a zero-sized region deletes the slot and refers to no memory.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(io::Error::from)
    }
}

impl GuestMapper for KvmGuestMapper {
    unsafe fn map(&mut self, gpa: u64, host_addr: *mut u8, len: u64) -> io::Result<u32> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        if let Err(e) = self.set_slot(slot, gpa, host_addr as u64, len) {
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free
                .push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn unmap(&mut self, slot: u32) -> io::Result<()> {
        self.set_slot(slot, 0, 0, 0)?;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .push(slot);
        Ok(())
    }
}

/// Hands a device MSI vectors from the VM's router and the INTx line of its pin in the
/// PCI slot it is going to take.
struct VmInterrupts<'a> {
    vm: &'a VmFd,
    router: &'a Arc<MsiRouter>,
    slot: u8,
}

impl InterruptAllocator for VmInterrupts<'_> {
    fn msi_vectors(&mut self, count: u16) -> io::Result<Arc<dyn MsiVectors>> {
        let group = self
            .router
            .allocate(usize::from(count))
            .map_err(io::Error::other)?;
        Ok(Arc::new(group))
    }

    fn intx_line(&mut self, pin: u8) -> io::Result<Option<IntxLine>> {
        if !(1..=4).contains(&pin) {
            return Ok(None);
        }
        // Config space numbers INTA# as 1, the _PRT as 0. Devices whose slots and pins
        // share a GSI share the line, as PCI INTx allows; KVM resamples each irqfd.
        let gsi = pci_intx_gsi(self.slot, pin - 1);
        let trigger = EventFd::new(libc::EFD_NONBLOCK)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(io::Error::from)?;
        Ok(Some(IntxLine {
            trigger,
            resample,
            gsi,
        }))
    }
}

/// The passthrough devices of a VM and the DMA mappings they use.
pub struct Passthrough {
    devices: Vec<(PciAddress, Arc<Mutex<VfioPciDevice>>)>,
    /// Unmapped (dropped) after the devices are shut down, before the container goes.
    dma: Option<GuestDmaMappings>,
    _container: Arc<VfioContainer>,
}

impl Passthrough {
    /// Opens every device, DMA-maps all of `ram`, and puts the devices on `pci`.
    pub fn attach(
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        pci: &mut PciSegment,
        router: &Arc<MsiRouter>,
        devices: &[PassthroughDevice],
    ) -> Result<Self, PassthroughSetupError> {
        let mut kvm_vfio = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio = vm
            .create_device(&mut kvm_vfio)
            .map_err(PassthroughSetupError::KvmVfio)?;
        let container = open_container(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio))))?;

        // Groups join the container (and give it its IOMMU) as devices open; only then
        // can memory be mapped.
        let opened = devices
            .iter()
            .map(|d| HostVfioDevice::open(&container, &d.sysfs_path).map(|h| (d, h)))
            .collect::<Result<Vec<_>, _>>()?;

        let ranges: Vec<DmaRange> = ram
            .memory
            .iter()
            .map(|r| DmaRange {
                iova: r.start_addr().0,
                len: r.len(),
                host_addr: r.as_ptr(),
            })
            .collect();
        let started = std::time::Instant::now();
        // SAFETY: guest RAM stays mapped until the VM is torn down, and `vm::run` drops
        // this value (unmapping the DMA ranges) before it drops the RAM.
        let dma = unsafe { GuestDmaMappings::map(container.clone(), &ranges) }?;
        log::info!(
            "passthrough: {} MiB of guest RAM DMA-mapped in {} ms",
            dma.len() >> 20,
            started.elapsed().as_millis()
        );

        let slots = Arc::new(Mutex::new(SlotPool {
            free: Vec::new(),
            next: u32::try_from(ram.memory.num_regions()).unwrap_or(u32::MAX),
            limit: memslot_limit(vm),
        }));
        let mut out = Passthrough {
            devices: Vec::new(),
            dma: Some(dma),
            _container: container,
        };
        for (cfg, host) in opened {
            let addr = cfg.addr;
            // The slot comes first: the INTx line depends on it.
            let slot = pci
                .free_slot()
                .map_err(|source| PassthroughSetupError::Slot { addr, source })?;
            let mut irqs = VmInterrupts { vm, router, slot };
            let mut dev = VfioPciDevice::new(Box::new(host), &mut irqs)
                .map_err(|source| PassthroughSetupError::Device { addr, source })?;
            for (bar, info) in dev.bar_layout() {
                let gpa = pci
                    .allocate_bar(info.size, info.kind)
                    .map_err(|source| PassthroughSetupError::Bar { addr, bar, source })?;
                dev.set_bar_address(bar, gpa)
                    .map_err(|source| PassthroughSetupError::BarAddress { addr, bar, source })?;
                log::info!(
                    "passthrough device {addr}: BAR {bar} ({:#x} bytes, {:?}) at {gpa:#x}",
                    info.size,
                    info.kind
                );
            }
            if cfg.mmap {
                dev.attach_mapper(Box::new(KvmGuestMapper {
                    vm: vm.clone(),
                    slots: slots.clone(),
                }));
            } else {
                log::info!("passthrough device {addr}: BARs not mapped, every access traps");
            }
            let intx = dev
                .intx_gsi()
                .map_or_else(|| "no INTx".to_string(), |gsi| format!("INTx on GSI {gsi}"));
            let dev = Arc::new(Mutex::new(dev));
            pci.add_at(slot, dev.clone() as Arc<Mutex<dyn PciDevice>>)
                .map_err(|source| PassthroughSetupError::Slot { addr, source })?;
            log::info!(
                "passthrough device {addr} at PCI 00:{slot:02x}.0, {intx} (host NUMA node {})",
                cfg.numa_node
                    .map_or_else(|| "unknown".to_string(), |n| n.to_string())
            );
            out.devices.push((addr, dev));
        }
        Ok(out)
    }

    /// Takes the devices out of the guest (mappings, interrupts, reset), then unmaps guest
    /// RAM from the IOMMU. Call after the vCPUs stopped and before the RAM goes.
    pub fn shutdown(&mut self) {
        for (addr, dev) in self.devices.drain(..) {
            log::info!("passthrough device {addr}: reset");
            dev.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        }
        self.dma = None;
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_run_out_at_the_limit_and_freed_ones_come_back() {
        let mut pool = SlotPool {
            free: Vec::new(),
            next: 2,
            limit: 4,
        };
        assert_eq!(pool.take().unwrap(), 2);
        assert_eq!(pool.take().unwrap(), 3);
        let err = pool.take().unwrap_err().to_string();
        assert!(err.contains("KVM allows 4"), "{err}");
        pool.free.push(2);
        assert_eq!(pool.take().unwrap(), 2);
    }

    #[test]
    fn the_slot_limit_is_kvms_answer_unless_it_is_unusable() {
        assert_eq!(memslots_from_cap(32764), 32764);
        assert_eq!(memslots_from_cap(0), FALLBACK_MEMSLOTS);
        assert_eq!(memslots_from_cap(-22), FALLBACK_MEMSLOTS);
        match kvm_ioctls::Kvm::new().and_then(|k| k.create_vm()) {
            // x86 KVMs have allowed 32, then 125, 509 and now 32764 slots.
            Ok(vm) => {
                let n = memslot_limit(&vm);
                eprintln!("this KVM allows {n} memory slots");
                assert!(n >= 32, "{n}");
            }
            Err(e) => eprintln!("SKIP: no usable /dev/kvm ({e})"),
        }
    }
}
