//! The device manager: every bus, the PCI segment, MSI routing, the legacy devices, the
//! virtio transports and passthrough, for the VM's whole life.
//!
//! `vm::run_image` builds it once the VM and its RAM exist, asks it to attach what the
//! config names, hands its buses to the vCPUs and keeps it until the VM is torn down, so
//! that the control plane can reach devices after boot. Adding a device type means one
//! module in `devices/src/virtio/` and one `add_*` call in [`virtio`].

mod legacy;
pub mod pci;
pub mod vfio;
mod virtio;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::{DeviceUpdate, VirtioPciDevice};
use devices::{Bus, I8042};
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::layout::Mmio64Window;
use crate::config::ValidatedConfig;
use crate::interrupts::MsiRouter;
use crate::memory::GuestRam;
pub use legacy::LegacyEvents;
use pci::{PciError, PciSegment};
use vfio::{Passthrough, PassthroughSetupError};

/// Errors from attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// A device could not be placed on a bus.
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::BusError),
    /// The PCI segment refused a function.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// Passthrough could not be set up.
    #[error(transparent)]
    Passthrough(#[from] PassthroughSetupError),
    /// A device the config names could not be created (an image, a tap, a socket).
    #[error("{kind} '{id}': {message}")]
    Device {
        /// What kind of device ("drive", "network interface", "vsock", "ai_infer").
        kind: &'static str,
        /// The config's id for it.
        id: String,
        /// Why.
        message: String,
    },
    /// A host resource for a legacy device (an eventfd, the console) failed.
    #[error("cannot set up {what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// KVM refused an interrupt line.
    #[error("cannot {what}: {source}")]
    Kvm {
        /// What.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

impl DeviceManagerError {
    /// Errors that come from what the operator asked for (a missing image, a tap that
    /// cannot be opened, a device that cannot be passed through).
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            DeviceManagerError::Passthrough(_) | DeviceManagerError::Device { .. }
        )
    }
}

/// A virtio device on the PCI bus, by the config's id.
pub struct VirtioEntry {
    /// The config's id (a drive id, an interface id, "vsock", "ai_infer").
    pub id: String,
    /// Its PCI slot on bus 0.
    pub slot: u8,
    /// The transport, which owns the device.
    pub transport: Arc<Mutex<VirtioPciDevice>>,
}

/// Every device of one VM.
pub struct DeviceManager {
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    io_bus: Bus,
    mmio_bus: Bus,
    pci: PciSegment,
    msi_router: Arc<MsiRouter>,
    virtio: Vec<VirtioEntry>,
    /// Dropped (devices reset, DMA unmapped) before the RAM, on every path.
    passthrough: Option<Passthrough>,
    /// Kept for the control API's Ctrl+Alt+Del.
    i8042: Option<Arc<Mutex<I8042>>>,
}

impl DeviceManager {
    /// Empty buses and PCI bus 0 with its host bridge, config mechanisms and BAR windows
    /// (`mmio64` is the 64-bit window the ACPI tables declare).
    pub fn new(
        vm: Arc<VmFd>,
        ram: &GuestRam,
        mmio64: Mmio64Window,
    ) -> Result<Self, DeviceManagerError> {
        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let pci = PciSegment::new(mmio64);
        pci.attach(&mut io_bus, &mut mmio_bus)?;
        Ok(Self {
            msi_router: Arc::new(MsiRouter::new(vm.clone())),
            vm,
            memory: ram.memory.clone(),
            io_bus,
            mmio_bus,
            pci,
            virtio: Vec::new(),
            passthrough: None,
            i8042: None,
        })
    }

    /// Attaches everything `cfg` names: the legacy devices, then ai_infer, the drives
    /// (the root drive first, so it is /dev/vda), the network interfaces, vsock and the
    /// passthrough devices. Returns the events the control loop watches.
    pub fn attach_configured(
        &mut self,
        cfg: &ValidatedConfig,
        ram: &GuestRam,
        start: Instant,
    ) -> Result<LegacyEvents, DeviceManagerError> {
        let events = self.add_legacy(&cfg.console, start)?;
        if let Some(ai) = &cfg.ai_infer {
            self.add_ai_infer(ai)?;
        }
        for drive in &cfg.drives {
            self.add_block(drive)?;
        }
        for net in &cfg.net {
            self.add_net(net)?;
        }
        if let Some(vsock) = &cfg.vsock {
            self.add_vsock(vsock)?;
        }
        if !cfg.passthrough.is_empty() {
            self.passthrough = Some(Passthrough::attach(
                &self.vm,
                ram,
                &mut self.pci,
                &self.msi_router,
                &cfg.passthrough,
            )?);
        }
        Ok(events)
    }

    /// The port I/O bus the vCPUs dispatch to.
    pub fn io_bus(&self) -> &Bus {
        &self.io_bus
    }

    /// The MMIO bus the vCPUs dispatch to.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio_bus
    }

    /// Applies a control-plane change to the virtio device the config calls `id`.
    pub fn update_virtio(&self, id: &str, update: &DeviceUpdate) -> Result<(), String> {
        let entry = self
            .virtio
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| format!("no device '{id}'"))?;
        entry
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update_device(update)
    }

    /// The virtio devices, in PCI order.
    pub fn virtio_devices(&self) -> &[VirtioEntry] {
        &self.virtio
    }

    /// Takes the devices out of the guest: passthrough devices reset and DMA-unmapped,
    /// virtio devices reset (their worker threads stopped). Called once the vCPUs are
    /// stopped; the manager may then be dropped with the VM.
    pub fn shutdown(&mut self) {
        self.passthrough = None;
        for entry in &self.virtio {
            let mut transport = entry.transport.lock().unwrap_or_else(|p| p.into_inner());
            transport.shutdown();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}
