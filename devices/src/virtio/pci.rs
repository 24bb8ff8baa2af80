//! The modern virtio-pci transport: one 64-bit memory BAR with the common configuration,
//! ISR, device configuration, notification area and the MSI-X table and PBA, each found
//! by the guest through a vendor-specific capability (virtio 1.2 §4.1.4).
//!
//! ```text
//! BAR 0 (32 KiB)  0x0000 common cfg   0x1000 ISR   0x2000 device cfg
//!                 0x3000 notify (4 bytes per queue)
//!                 0x4000 MSI-X table  0x5000 MSI-X PBA
//! ```
//!
//! Every register the guest writes is checked: a queue size that is not a power of two
//! or above the maximum, a queue change after DRIVER_OK, features the device did not offer
//! or an out-of-range MSI-X vector are refused the way the spec says (the register keeps
//! its old value, FEATURES_OK does not stick, the vector reads back as NO_VECTOR). None of
//! it can make the VMM fail: the worst a guest gets is a device that will not start.

use std::sync::Arc;

use std::io;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci_layout::{
    cfg_type, common, PCI_CAP_ID_VNDR, VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_CAP_EXT_LEN,
    VIRTIO_PCI_CAP_LEN,
};
use super::{
    status, ActivateParams, QueueConfig, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::pci::config_space::{NUM_BARS, NUM_CONFIGURATION_REGISTERS};
use crate::pci::{
    BarKind, MsiVectors, Msix, MsixLayout, PciBarRange, PciConfigError, PciConfiguration,
    PciDevice, PciHeader,
};

/// Size of BAR 0.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
const COMMON_CFG_OFFSET: u64 = 0x0000;
const COMMON_CFG_LEN: u64 = common::LEN;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Each queue notifies at its own 4-byte slot, so each gets its own ioeventfd.
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u32 = 0x4000;
const MSIX_PBA_OFFSET: u32 = 0x5000;
/// Most queues: the notify area and the MSI-X table (one vector per queue + config) fit.
pub const MAX_QUEUES: usize = 255;

/// Errors from building the transport.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The device has no queues or more than the transport supports.
    #[error("a virtio-pci device needs 1 to {MAX_QUEUES} queues, not {0}")]
    QueueCount(usize),
    /// The VMM gave fewer interrupt vectors than queues + 1.
    #[error("{queues} queues need {needed} MSI-X vectors, got {got}")]
    Vectors {
        /// Queues of the device.
        queues: usize,
        /// Vectors needed.
        needed: usize,
        /// Vectors given.
        got: usize,
    },
    /// The device's largest ring size is not a power of two.
    #[error("a virtio queue's maximum size must be a power of two, not {0}")]
    QueueMaxSize(u16),
    /// Config space could not be built.
    #[error("cannot build the virtio-pci config space: {0}")]
    Config(#[from] PciConfigError),
    /// An eventfd could not be created.
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Registers queue notifications with the hypervisor as ioeventfds: a guest write at
/// `addr` then signals the eventfd without leaving the kernel.
pub trait NotificationRegistrar: Send {
    /// Starts delivering writes at guest-physical `addr` to `evt`.
    fn register(&self, addr: u64, evt: &EventFd) -> io::Result<()>;
    /// Stops it.
    fn unregister(&self, addr: u64, evt: &EventFd) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    config: QueueConfig,
    vector: u16,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    msix: Msix,
    msix_cap_reg: usize,
    pci_cfg_cap: usize,
    queues: Vec<QueueRegs>,
    kicks: Vec<EventFd>,
    memory: GuestMemoryMmap,
    /// Where the notifications are registered as ioeventfds, and at which BAR 0 address.
    registrar: Option<Box<dyn NotificationRegistrar>>,
    registered_at: Option<u64>,
    /// Handed to the device for queues without a vector: nobody listens.
    no_vector_call: EventFd,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_vector: u16,
    queue_select: u16,
    config_generation: u8,
    activated: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish()
    }
}

impl VirtioPciDevice {
    /// Puts `device` on PCI with `header` identification; `vectors` must have at least
    /// one vector per queue plus one for configuration changes. `memory` is the guest's,
    /// handed to the device at activation.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        header: PciHeader,
        vectors: Arc<dyn MsiVectors>,
        memory: GuestMemoryMmap,
    ) -> Result<Self, VirtioPciError> {
        let num_queues = device.num_queues();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(num_queues));
        }
        if vectors.len() < num_queues + 1 {
            return Err(VirtioPciError::Vectors {
                queues: num_queues,
                needed: num_queues + 1,
                got: vectors.len(),
            });
        }
        let mut config = PciConfiguration::new(header, false);
        config.add_bar(0, VIRTIO_PCI_BAR_SIZE, BarKind::Mmio64, false)?;

        let msix = Msix::new(
            vectors,
            MsixLayout {
                table_bar: 0,
                table_offset: MSIX_TABLE_OFFSET,
                pba_bar: 0,
                pba_offset: MSIX_PBA_OFFSET,
            },
        );
        let msix_cap = config.add_capability(&msix.capability())?;
        config.set_write_mask(msix_cap / 4, Msix::CONTROL_WRITE_MASK);

        for (kind, offset, len) in [
            (cfg_type::COMMON, COMMON_CFG_OFFSET, COMMON_CFG_LEN),
            (cfg_type::ISR, ISR_OFFSET, ISR_LEN),
            (cfg_type::DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
        ] {
            config.add_capability(&virtio_cap(kind, offset, len, VIRTIO_PCI_CAP_LEN))?;
        }
        let mut notify = virtio_cap(
            cfg_type::NOTIFY,
            NOTIFY_OFFSET,
            NOTIFY_LEN,
            VIRTIO_PCI_CAP_EXT_LEN,
        );
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        config.add_capability(&notify)?;
        // The PCI configuration access capability: bar, offset, length and the data
        // window are guest-writable; accesses to the window reach the BAR.
        let mut pci_cfg = virtio_cap(cfg_type::PCI, 0, 0, VIRTIO_PCI_CAP_EXT_LEN);
        pci_cfg.extend_from_slice(&[0; 4]);
        let pci_cfg_cap = config.add_capability(&pci_cfg)?;
        let reg = pci_cfg_cap / 4;
        config.set_write_mask(reg + 1, 0x0000_00ff); // bar
        config.set_write_mask(reg + 2, 0xffff_ffff); // offset
        config.set_write_mask(reg + 3, 0xffff_ffff); // length
        config.set_write_mask(reg + 4, 0xffff_ffff); // data

        let kicks = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        let no_vector_call = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?;
        let max = device.queue_max_size();
        if !max.is_power_of_two() {
            return Err(VirtioPciError::QueueMaxSize(max));
        }
        Ok(Self {
            config,
            device,
            msix,
            msix_cap_reg: msix_cap / 4,
            pci_cfg_cap,
            queues: vec![
                QueueRegs {
                    config: QueueConfig {
                        size: max,
                        ..QueueConfig::default()
                    },
                    vector: VIRTIO_MSI_NO_VECTOR,
                };
                num_queues
            ],
            kicks,
            memory,
            registrar: None,
            registered_at: None,
            no_vector_call,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Applies a control-plane change to the device behind this transport.
    pub fn update_device(&mut self, update: &super::DeviceUpdate) -> Result<(), String> {
        self.device.update(update)
    }

    /// Stops the device for good at VM teardown (its threads end, it lets go of guest
    /// memory); the guest may not run afterwards.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    /// Places BAR 0 at `addr` (the VMM's allocation, before the guest runs).
    pub fn set_bar_address(&mut self, addr: u64) -> Result<(), PciConfigError> {
        self.config.set_bar_address(0, addr)
    }

    /// The notification eventfds with their offset in BAR 0, for the VMM to register as
    /// ioeventfds at `BAR 0 + offset` (writes then never exit to the VMM).
    pub fn notifications(&self) -> impl Iterator<Item = (u64, &EventFd)> {
        self.kicks.iter().enumerate().map(|(q, evt)| {
            (
                NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                evt,
            )
        })
    }

    fn device_status(&self) -> u8 {
        let mut s = self.status;
        if self.activated && self.device.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn reset(&mut self) {
        if self.activated {
            // The queues come back from the device; their registers are reset below.
            if self.device.reset().is_none() {
                log::debug!(
                    "virtio device {}: reset returned no queues",
                    self.device.device_type()
                );
            }
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        let max = self.device.queue_max_size();
        for q in &mut self.queues {
            *q = QueueRegs {
                config: QueueConfig {
                    size: max,
                    ..QueueConfig::default()
                },
                vector: VIRTIO_MSI_NO_VECTOR,
            };
        }
        // Drop notifications the guest sent before the reset.
        for kick in &self.kicks {
            let _ = kick.read();
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        let mut new = value;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.device.ready()
                && self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log::warn!(
                    "virtio device {}: refusing FEATURES_OK (driver features {:#x}, offered {:#x}, ready {})",
                    self.device.device_type(),
                    self.driver_features,
                    offered,
                    self.device.ready()
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && !self.activated {
            if new & status::FEATURES_OK == 0 {
                log::warn!("virtio: DRIVER_OK without FEATURES_OK; ignoring");
                new &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate() {
                log::error!(
                    "virtio device {}: activation failed: {e}",
                    self.device.device_type()
                );
                new |= status::DEVICE_NEEDS_RESET;
                new &= !status::DRIVER_OK;
            }
        }
        // The driver cannot set DEVICE_NEEDS_RESET itself.
        self.status =
            new & !status::DEVICE_NEEDS_RESET | (self.status & status::DEVICE_NEEDS_RESET);
        if new & status::DEVICE_NEEDS_RESET != 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
        }
    }

    fn activate(&mut self) -> io::Result<()> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            queues.push(build_queue(
                index,
                regs.config,
                self.device.queue_max_size(),
                event_idx,
                &self.memory,
            )?);
        }
        let calls = self
            .queues
            .iter()
            .map(|q| {
                self.msix
                    .notifier(q.vector)
                    .unwrap_or(&self.no_vector_call)
                    .try_clone()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let config_irq = self
            .msix
            .notifier(self.config_vector)
            .map(EventFd::try_clone)
            .transpose()?;
        let kicks = self
            .kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        self.device.activate(ActivateParams {
            features: self.driver_features,
            memory: self.memory.clone(),
            queues,
            kicks,
            interrupt: Arc::new(VirtioInterrupt::new(calls, config_irq)),
        })?;
        self.activated = true;
        Ok(())
    }

    /// Gives the transport the hypervisor's ioeventfd registration: from now on the
    /// queue notifications are registered at wherever BAR 0 decodes, and follow it when
    /// the guest moves the BAR or turns memory decoding off.
    pub fn attach_registrar(&mut self, registrar: Box<dyn NotificationRegistrar>) {
        self.registrar = Some(registrar);
        self.registered_at = None;
        self.sync_notifications();
    }

    /// Brings the ioeventfd registrations in line with where BAR 0 decodes now.
    fn sync_notifications(&mut self) {
        let Some(registrar) = self.registrar.as_ref() else {
            return;
        };
        let at = self.config.decoded_bars()[0].map(|bar| bar.addr);
        if at == self.registered_at {
            return;
        }
        let slots = |base: u64| {
            self.kicks.iter().enumerate().map(move |(q, evt)| {
                (
                    base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    evt,
                )
            })
        };
        if let Some(old) = self.registered_at {
            for (addr, evt) in slots(old) {
                if let Err(e) = registrar.unregister(addr, evt) {
                    log::error!("virtio-pci: cannot unregister the notification at {addr:#x}: {e}");
                }
            }
        }
        self.registered_at = None;
        if let Some(new) = at {
            for (addr, evt) in slots(new) {
                if let Err(e) = registrar.register(addr, evt) {
                    // Writes then reach the transport through the BAR router: slower, correct.
                    log::warn!("virtio-pci: cannot register the notification at {addr:#x}: {e}");
                }
            }
            self.registered_at = Some(new);
        }
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let value: u64 = match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (common::DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            (common::DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (common::DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (common::CONFIG_MSIX_VECTOR, 2) => u64::from(self.config_vector),
            (common::NUM_QUEUES, 2) => self.queues.len() as u64,
            (common::DEVICE_STATUS, 1) => u64::from(self.device_status()),
            (common::CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (common::QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (off, len) => match self.queues.get(usize::from(self.queue_select)).copied() {
                None => 0,
                Some(q) => match (off, len) {
                    (common::QUEUE_SIZE, 2) => u64::from(q.config.size),
                    (common::QUEUE_MSIX_VECTOR, 2) => u64::from(q.vector),
                    (common::QUEUE_ENABLE, 2) => u64::from(q.config.enabled),
                    (common::QUEUE_NOTIFY_OFF, 2) => u64::from(self.queue_select),
                    (common::QUEUE_DESC_LO, 4) => q.config.desc_table & 0xffff_ffff,
                    (common::QUEUE_DESC_HI, 4) => q.config.desc_table >> 32,
                    (common::QUEUE_DRIVER_LO, 4) => q.config.avail_ring & 0xffff_ffff,
                    (common::QUEUE_DRIVER_HI, 4) => q.config.avail_ring >> 32,
                    (common::QUEUE_DEVICE_LO, 4) => q.config.used_ring & 0xffff_ffff,
                    (common::QUEUE_DEVICE_HI, 4) => q.config.used_ring >> 32,
                    _ => 0,
                },
            },
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        // The same value at the register widths, for the 1-, 2- and 4-byte registers.
        let [b0, b1, b2, b3, ..] = bytes;
        let byte = b0;
        let word = u16::from_le_bytes([b0, b1]);
        let dword = u32::from_le_bytes([b0, b1, b2, b3]);
        let running = self.status & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (common::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = dword,
            (common::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = dword,
            (common::DRIVER_FEATURE, 4) if self.status & status::FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                    _ => {}
                }
            }
            (common::CONFIG_MSIX_VECTOR, 2) => self.config_vector = self.valid_vector(word),
            (common::DEVICE_STATUS, 1) => self.set_status(byte),
            (common::QUEUE_SELECT, 2) => self.queue_select = word,
            (common::QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.valid_vector(word);
                if let Some(q) = self.selected() {
                    q.vector = vector;
                }
            }
            (off, len) if !running => {
                let max = self.device.queue_max_size();
                let Some(q) = self.selected() else {
                    return;
                };
                let c = &mut q.config;
                match (off, len) {
                    (common::QUEUE_SIZE, 2) => {
                        let size = word;
                        if size.is_power_of_two() && size <= max {
                            c.size = size;
                        } else {
                            log::debug!("virtio: ignoring queue size {size} (max {max})");
                        }
                    }
                    (common::QUEUE_ENABLE, 2) => c.enabled = value == 1,
                    (common::QUEUE_DESC_LO, 4) => c.desc_table = set_lo(c.desc_table, value),
                    (common::QUEUE_DESC_HI, 4) => c.desc_table = set_hi(c.desc_table, value),
                    (common::QUEUE_DRIVER_LO, 4) => c.avail_ring = set_lo(c.avail_ring, value),
                    (common::QUEUE_DRIVER_HI, 4) => c.avail_ring = set_hi(c.avail_ring, value),
                    (common::QUEUE_DEVICE_LO, 4) => c.used_ring = set_lo(c.used_ring, value),
                    (common::QUEUE_DEVICE_HI, 4) => c.used_ring = set_hi(c.used_ring, value),
                    _ => log::debug!("virtio: ignoring common config write at {off:#x}/{len}"),
                }
            }
            (off, len) => log::debug!(
                "virtio: ignoring common config write at {off:#x}/{len} after DRIVER_OK"
            ),
        }
    }

    /// Forwards an access through the PCI configuration access capability's window.
    fn pci_cfg_window(&mut self, data: Option<&[u8]>) -> [u8; 4] {
        let reg = self.pci_cfg_cap / 4;
        let bar = self.config.read_reg(reg + 1).to_le_bytes()[0];
        let offset = u64::from(self.config.read_reg(reg + 2));
        let len = self.config.read_reg(reg + 3) as usize;
        let mut out = [0u8; 4];
        if bar != 0 || !matches!(len, 1 | 2 | 4) {
            return out;
        }
        match data {
            Some(d) => {
                let d = d.get(..len).unwrap_or(d);
                self.bar_write(0, offset, d);
            }
            None => self.bar_read(0, offset, &mut out[..len]),
        }
        out
    }
}

fn set_lo(old: u64, value: u64) -> u64 {
    (old & !0xffff_ffff) | (value & 0xffff_ffff)
}

fn set_hi(old: u64, value: u64) -> u64 {
    (old & 0xffff_ffff) | (value << 32)
}

/// A `virtio_queue::Queue` from the registers the driver programmed; an enabled queue
/// whose rings are not inside guest memory fails the activation.
fn build_queue(
    index: usize,
    regs: QueueConfig,
    max_size: u16,
    event_idx: bool,
    memory: &GuestMemoryMmap,
) -> io::Result<Queue> {
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("queue {index}: {what}"),
        )
    };
    let mut q = Queue::new(max_size).map_err(|e| invalid(&e.to_string()))?;
    if !regs.enabled {
        return Ok(q);
    }
    q.try_set_size(regs.size)
        .map_err(|_| invalid(&format!("size {} is not valid", regs.size)))?;
    q.try_set_desc_table_address(GuestAddress(regs.desc_table))
        .map_err(|_| invalid(&format!("descriptor table at {:#x}", regs.desc_table)))?;
    q.try_set_avail_ring_address(GuestAddress(regs.avail_ring))
        .map_err(|_| invalid(&format!("available ring at {:#x}", regs.avail_ring)))?;
    q.try_set_used_ring_address(GuestAddress(regs.used_ring))
        .map_err(|_| invalid(&format!("used ring at {:#x}", regs.used_ring)))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(memory) {
        return Err(invalid("rings are not inside guest memory"));
    }
    Ok(q)
}

/// A `struct virtio_pci_cap` of `cap_len` bytes (16, or 20 with one extra dword).
// Offsets and lengths lie inside the 32 KiB BAR 0 and `cap_len` is 16 or 20: no cast
// truncates.
#[allow(clippy::cast_possible_truncation)]
fn virtio_cap(kind: u8, offset: u64, len: u64, cap_len: usize) -> Vec<u8> {
    let mut cap = vec![PCI_CAP_ID_VNDR, 0, cap_len as u8, kind, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(len as u32).to_le_bytes());
    cap
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == self.pci_cfg_cap / 4 + 4 {
            return u32::from_le_bytes(self.pci_cfg_window(None));
        }
        self.config.read_reg(reg_idx)
    }

    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if reg_idx >= NUM_CONFIGURATION_REGISTERS {
            return;
        }
        if reg_idx == self.pci_cfg_cap / 4 + 4 {
            self.pci_cfg_window(Some(data));
            return;
        }
        self.config.write_reg(reg_idx, offset, data);
        if reg_idx == self.msix_cap_reg {
            let control = (self.config.read_reg(reg_idx) >> 16) as u16;
            self.msix.set_control(control);
        }
        // A BAR or command register write may have moved BAR 0 or stopped its decoding.
        self.sync_notifications();
    }

    fn bars(&self) -> [Option<PciBarRange>; NUM_BARS] {
        self.config.decoded_bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 || data.len() > 8 {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_LEN && o + len <= COMMON_CFG_LEN => {
                self.read_common(o, data)
            }
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                // MSI-X only: no INTx, so the ISR never has bits to report.
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (u64::from(MSIX_TABLE_OFFSET)..u64::from(MSIX_PBA_OFFSET)).contains(&o) => {
                self.msix.read_table(o - u64::from(MSIX_TABLE_OFFSET), data)
            }
            o if o >= u64::from(MSIX_PBA_OFFSET) => {
                self.msix.read_pba(o - u64::from(MSIX_PBA_OFFSET), data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.len() > 8 {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_CFG_LEN => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Only reached when the ioeventfd is not registered (yet).
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                let kick = usize::try_from(queue).ok().and_then(|q| self.kicks.get(q));
                if let Some(kick) = kick {
                    let _ = kick.write(1);
                }
            }
            o if (u64::from(MSIX_TABLE_OFFSET)..u64::from(MSIX_PBA_OFFSET)).contains(&o) => self
                .msix
                .write_table(o - u64::from(MSIX_TABLE_OFFSET), data),
            _ => log::debug!("virtio-pci: dropping BAR write at {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::RecordingVectors;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<QueueConfig>)>,
        resets: usize,
    }

    /// What a queue handed to the device says about itself.
    fn regs_of(q: &Queue) -> QueueConfig {
        QueueConfig {
            size: q.size(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            enabled: q.ready(),
        }
    }

    struct FakeDevice {
        ready: bool,
        seen: Arc<Mutex<Seen>>,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            60
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 28
        }
        fn ready(&self) -> bool {
            self.ready
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset.to_le_bytes()[0].wrapping_add(i.to_le_bytes()[0]);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, p: ActivateParams) -> std::io::Result<()> {
            assert_eq!(p.kicks.len(), 2);
            assert!(p.interrupt.queue_eventfd(1).is_some());
            let queues = p.queues.iter().map(regs_of).collect();
            self.seen.lock().unwrap().activated = Some((p.features, queues));
            Ok(())
        }
        fn reset(&mut self) -> Option<Vec<Queue>> {
            self.seen.lock().unwrap().resets += 1;
            None
        }
    }

    fn transport(ready: bool) -> (VirtioPciDevice, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let dev = FakeDevice {
            ready,
            seen: seen.clone(),
        };
        let header = PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x107c,
            ..PciHeader::default()
        };
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let t =
            VirtioPciDevice::new(Box::new(dev), header, RecordingVectors::new(3), memory).unwrap();
        (t, seen)
    }

    fn w(t: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
        t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(t: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Walks the capability list and returns (cfg_type, offset) of each virtio cap.
    fn virtio_caps(t: &mut VirtioPciDevice) -> Vec<(u8, u32)> {
        let mut caps = Vec::new();
        let mut ptr = (t.config_read(13) & 0xff) as usize;
        let mut guard = 0;
        while ptr != 0 && guard < 48 {
            let dw0 = t.config_read(ptr / 4);
            if dw0.to_le_bytes()[0] == PCI_CAP_ID_VNDR {
                let cfg_type = (dw0 >> 24) as u8;
                caps.push((cfg_type, t.config_read(ptr / 4 + 2)));
            }
            ptr = ((dw0 >> 8) & 0xff) as usize;
            guard += 1;
        }
        caps
    }

    #[test]
    fn capabilities_point_at_the_bar_layout() {
        let (mut t, _) = transport(true);
        let caps = virtio_caps(&mut t);
        assert_eq!(
            caps,
            vec![
                (cfg_type::COMMON, 0),
                (cfg_type::ISR, 0x1000),
                (cfg_type::DEVICE, 0x2000),
                (cfg_type::NOTIFY, 0x3000),
                (cfg_type::PCI, 0)
            ]
        );
        assert_eq!(t.config_read(0), 0x107c_1af4);
        assert_eq!(r(&mut t, common::NUM_QUEUES, 2), 2);
    }

    fn negotiate(t: &mut VirtioPciDevice, features: u64) -> u8 {
        w(t, common::DEVICE_STATUS, 0, 1);
        w(t, common::DEVICE_STATUS, 1, 1);
        w(t, common::DEVICE_STATUS, 3, 1);
        w(t, common::DRIVER_FEATURE_SELECT, 0, 4);
        w(t, common::DRIVER_FEATURE, features & 0xffff_ffff, 4);
        w(t, common::DRIVER_FEATURE_SELECT, 1, 4);
        w(t, common::DRIVER_FEATURE, features >> 32, 4);
        w(t, common::DEVICE_STATUS, 11, 1);
        u8::try_from(r(t, common::DEVICE_STATUS, 1)).unwrap()
    }

    #[test]
    fn features_ok_needs_version_1_only_offered_bits_and_a_ready_device() {
        let (mut t, _) = transport(true);
        w(&mut t, common::DEVICE_FEATURE_SELECT, 1, 4);
        assert_eq!(r(&mut t, common::DEVICE_FEATURE, 4), 1);
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1) & status::FEATURES_OK,
            8
        );
        assert_eq!(
            negotiate(&mut t, 1 << 28) & status::FEATURES_OK,
            0,
            "no VERSION_1"
        );
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 35) & status::FEATURES_OK,
            0
        );
        let (mut t, _) = transport(false);
        assert_eq!(
            negotiate(&mut t, VIRTIO_F_VERSION_1) & status::FEATURES_OK,
            0,
            "not ready"
        );
    }

    #[test]
    fn queues_are_programmed_checked_and_handed_over_at_driver_ok() {
        let (mut t, seen) = transport(true);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, common::QUEUE_SELECT, 1, 2);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 256);
        w(&mut t, common::QUEUE_SIZE, 100, 2);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 256, "not a power of two");
        w(&mut t, common::QUEUE_SIZE, 512, 2);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 256, "above the maximum");
        w(&mut t, common::QUEUE_SIZE, 64, 2);
        w(&mut t, common::QUEUE_DESC_LO, 0x1000, 4);
        w(&mut t, common::QUEUE_DESC_HI, 0, 4);
        w(&mut t, common::QUEUE_DRIVER_LO, 0x2000, 4);
        w(&mut t, common::QUEUE_DEVICE_LO, 0x3000, 4);
        w(&mut t, common::QUEUE_MSIX_VECTOR, 1, 2);
        assert_eq!(r(&mut t, common::QUEUE_MSIX_VECTOR, 2), 1);
        w(&mut t, common::QUEUE_MSIX_VECTOR, 9, 2);
        assert_eq!(
            r(&mut t, common::QUEUE_MSIX_VECTOR, 2),
            0xffff,
            "vector out of range"
        );
        w(&mut t, common::QUEUE_ENABLE, 1, 2);
        assert_eq!(r(&mut t, common::QUEUE_NOTIFY_OFF, 2), 1);
        w(&mut t, common::QUEUE_SELECT, 7, 2);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 0, "no such queue");
        w(&mut t, common::DEVICE_STATUS, 15, 1);
        assert_eq!(r(&mut t, common::DEVICE_STATUS, 1), 15);
        let (features, queues) = seen.lock().unwrap().activated.clone().unwrap();
        assert_eq!(features, VIRTIO_F_VERSION_1);
        assert_eq!(
            queues[1],
            QueueConfig {
                size: 64,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                enabled: true
            }
        );
        assert!(!queues[0].enabled);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, common::QUEUE_SELECT, 1, 2);
        w(&mut t, common::QUEUE_SIZE, 16, 2);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 64);
        // Reset stops the device and restores defaults.
        w(&mut t, common::DEVICE_STATUS, 0, 1);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, common::DEVICE_STATUS, 1), 0);
        assert_eq!(r(&mut t, common::QUEUE_SIZE, 2), 256);
    }

    #[test]
    fn device_config_notify_and_pci_cfg_window() {
        let (mut t, _) = transport(true);
        assert_eq!(r(&mut t, DEVICE_CFG_OFFSET + 4, 4), 0x0706_0504);
        let (_, kick) = t.notifications().nth(1).unwrap();
        let kick = kick.try_clone().unwrap();
        w(&mut t, NOTIFY_OFFSET + 4, 1, 2);
        assert_eq!(kick.read().unwrap(), 1);
        // Read the device config through the PCI_CFG capability window.
        let cap = t.pci_cfg_cap / 4;
        t.config_write(cap + 1, 0, &[0]);
        t.config_write(
            cap + 2,
            0,
            &u32::try_from(DEVICE_CFG_OFFSET + 8).unwrap().to_le_bytes(),
        );
        t.config_write(cap + 3, 0, &4u32.to_le_bytes());
        assert_eq!(t.config_read(cap + 4), 0x0b0a_0908);
        // Garbage in unused parts of the BAR reads zero and writes vanish.
        assert_eq!(r(&mut t, 0x1800, 8), 0);
        assert_eq!(r(&mut t, 0x5ff8, 8), u64::MAX, "past the PBA");
        w(&mut t, 0x1800, 0xdead, 4);
        w(&mut t, common::DEVICE_STATUS, 0xdead, 4);
        assert_eq!(r(&mut t, common::DEVICE_STATUS, 1), 0);
    }

    #[test]
    fn rings_outside_guest_memory_fail_activation_with_needs_reset() {
        let (mut t, seen) = transport(true);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w(&mut t, common::QUEUE_SELECT, 0, 2);
        w(&mut t, common::QUEUE_SIZE, 64, 2);
        w(&mut t, common::QUEUE_DESC_LO, 0x1000, 4);
        w(&mut t, common::QUEUE_DESC_HI, 0x1, 4);
        w(&mut t, common::QUEUE_DRIVER_LO, 0x2000, 4);
        w(&mut t, common::QUEUE_DEVICE_LO, 0x3000, 4);
        w(&mut t, common::QUEUE_ENABLE, 1, 2);
        w(&mut t, common::DEVICE_STATUS, 15, 1);
        let status = u8::try_from(r(&mut t, common::DEVICE_STATUS, 1)).unwrap();
        assert_eq!(status & status::DRIVER_OK, 0);
        assert_ne!(status & status::DEVICE_NEEDS_RESET, 0);
        assert!(seen.lock().unwrap().activated.is_none());
    }

    #[derive(Default)]
    struct Registrations(Mutex<Vec<(bool, u64)>>);

    struct Recorder(Arc<Registrations>);

    impl NotificationRegistrar for Recorder {
        fn register(&self, addr: u64, _evt: &EventFd) -> io::Result<()> {
            self.0 .0.lock().unwrap().push((true, addr));
            Ok(())
        }
        fn unregister(&self, addr: u64, _evt: &EventFd) -> io::Result<()> {
            self.0 .0.lock().unwrap().push((false, addr));
            Ok(())
        }
    }

    #[test]
    fn notifications_follow_bar_0_when_the_guest_moves_it() {
        let (mut t, _) = transport(true);
        t.set_bar_address(0xc000_0000).unwrap();
        let seen = Arc::new(Registrations::default());
        t.attach_registrar(Box::new(Recorder(seen.clone())));
        assert!(seen.0.lock().unwrap().is_empty(), "memory decoding is off");
        // Command register: memory decoding on.
        t.config_write(1, 0, &[0x2, 0]);
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![(true, 0xc000_3000), (true, 0xc000_3004)]
        );
        seen.0.lock().unwrap().clear();
        // The guest moves BAR 0 (low dword at register 4).
        t.config_write(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![
                (false, 0xc000_3000),
                (false, 0xc000_3004),
                (true, 0xd000_3000),
                (true, 0xd000_3004)
            ]
        );
        seen.0.lock().unwrap().clear();
        // Decoding off: nothing registered any more.
        t.config_write(1, 0, &[0, 0]);
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![(false, 0xd000_3000), (false, 0xd000_3004)]
        );
    }
}
