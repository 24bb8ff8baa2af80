//! The modern virtio-pci transport (virtio 1.2 §4.1.4): the common configuration
//! registers, queue notification, and the device-specific configuration window, found
//! through the function's virtio capabilities.

use std::collections::BTreeMap;
use std::sync::Arc;

use ai_infer_protocol::virtio_pci::common;
use thiserror::Error;

use crate::mmio::{MmioError, RegisterWindow, Registers};
use crate::pci::{CapRegion, VirtioCaps};

/// Errors of the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A register access failed.
    #[error(transparent)]
    Mmio(#[from] MmioError),
    /// A capability region too short for its structure.
    #[error("Virtio {what} structure is {len} bytes, needs at least {needed}")]
    ShortStructure {
        /// Which structure.
        what: &'static str,
        /// Its length.
        len: u32,
        /// The minimum.
        needed: u64,
    },
    /// Mapping a BAR failed.
    #[error("Cannot map BAR {bar}: {message}")]
    Bar {
        /// BAR index.
        bar: u8,
        /// Why.
        message: String,
    },
    /// The notification address of a queue lies outside the notify structure.
    #[error("Queue notify offset {offset:#x} is outside the notify structure")]
    NotifyOutOfRange {
        /// `queue_notify_off * notify_off_multiplier`.
        offset: u64,
    },
}

/// The registers of one virtio-pci function.
#[derive(Clone, Debug)]
pub struct VirtioPciTransport {
    common: RegisterWindow,
    notify: RegisterWindow,
    notify_off_multiplier: u32,
    device: RegisterWindow,
}

fn window(
    bars: &BTreeMap<u8, Arc<dyn Registers>>,
    region: CapRegion,
    what: &'static str,
    needed: u64,
) -> Result<RegisterWindow, TransportError> {
    if u64::from(region.length) < needed {
        return Err(TransportError::ShortStructure {
            what,
            len: region.length,
            needed,
        });
    }
    let regs = bars.get(&region.bar).cloned().ok_or(TransportError::Bar {
        bar: region.bar,
        message: "not mapped".into(),
    })?;
    Ok(RegisterWindow::new(
        regs,
        region.offset.into(),
        region.length.into(),
    )?)
}

impl VirtioPciTransport {
    /// Builds the transport from the function's capabilities; `map_bar` maps a BAR by
    /// index (each BAR is mapped once however many structures it holds).
    pub fn new<F>(caps: &VirtioCaps, mut map_bar: F) -> Result<Self, TransportError>
    where
        F: FnMut(u8) -> Result<Arc<dyn Registers>, String>,
    {
        let mut bars = BTreeMap::new();
        for region in [caps.common, caps.notify, caps.device] {
            if let std::collections::btree_map::Entry::Vacant(e) = bars.entry(region.bar) {
                let regs = map_bar(region.bar).map_err(|message| TransportError::Bar {
                    bar: region.bar,
                    message,
                })?;
                e.insert(regs);
            }
        }
        Ok(VirtioPciTransport {
            common: window(&bars, caps.common, "common configuration", common::LEN)?,
            notify: window(&bars, caps.notify, "notification", 2)?,
            notify_off_multiplier: caps.notify_off_multiplier,
            device: window(
                &bars,
                caps.device,
                "device configuration",
                ai_infer_protocol::CONFIG_SPACE_LEN as u64,
            )?,
        })
    }

    /// The device-specific configuration window.
    pub fn device_config(&self) -> &RegisterWindow {
        &self.device
    }

    /// Device status.
    pub fn status(&self) -> Result<u8, TransportError> {
        Ok(self.common.read8(common::DEVICE_STATUS)?)
    }

    /// Writes the device status (0 resets the device).
    pub fn set_status(&self, value: u8) -> Result<(), TransportError> {
        Ok(self.common.write8(common::DEVICE_STATUS, value)?)
    }

    /// Configuration generation counter.
    pub fn config_generation(&self) -> Result<u8, TransportError> {
        Ok(self.common.read8(common::CONFIG_GENERATION)?)
    }

    /// All 64 feature bits the device offers.
    pub fn device_features(&self) -> Result<u64, TransportError> {
        let mut features = 0u64;
        for half in 0..2u32 {
            self.common.write32(common::DEVICE_FEATURE_SELECT, half)?;
            features |= u64::from(self.common.read32(common::DEVICE_FEATURE)?) << (32 * half);
        }
        Ok(features)
    }

    /// Writes the feature bits the driver accepts.
    pub fn set_driver_features(&self, features: u64) -> Result<(), TransportError> {
        for half in 0..2u32 {
            self.common.write32(common::DRIVER_FEATURE_SELECT, half)?;
            self.common
                .write32(common::DRIVER_FEATURE, (features >> (32 * half)) as u32)?;
        }
        Ok(())
    }

    /// Sets the configuration-change MSI-X vector; returns what the device kept.
    pub fn set_config_vector(&self, vector: u16) -> Result<u16, TransportError> {
        self.common.write16(common::CONFIG_MSIX_VECTOR, vector)?;
        Ok(self.common.read16(common::CONFIG_MSIX_VECTOR)?)
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> Result<u16, TransportError> {
        Ok(self.common.read16(common::NUM_QUEUES)?)
    }

    /// Selects the queue the `queue_*` registers refer to.
    pub fn select_queue(&self, index: u16) -> Result<(), TransportError> {
        Ok(self.common.write16(common::QUEUE_SELECT, index)?)
    }

    /// Size of the selected queue (the device's maximum until the driver writes it;
    /// 0 if the queue does not exist).
    pub fn queue_size(&self) -> Result<u16, TransportError> {
        Ok(self.common.read16(common::QUEUE_SIZE)?)
    }

    /// Sets the size of the selected queue.
    pub fn set_queue_size(&self, size: u16) -> Result<(), TransportError> {
        Ok(self.common.write16(common::QUEUE_SIZE, size)?)
    }

    /// Sets the selected queue's MSI-X vector; returns what the device kept.
    pub fn set_queue_vector(&self, vector: u16) -> Result<u16, TransportError> {
        self.common.write16(common::QUEUE_MSIX_VECTOR, vector)?;
        Ok(self.common.read16(common::QUEUE_MSIX_VECTOR)?)
    }

    /// Sets the ring addresses of the selected queue.
    pub fn set_queue_rings(
        &self,
        desc: u64,
        driver: u64,
        device: u64,
    ) -> Result<(), TransportError> {
        self.common.write64_split(common::QUEUE_DESC_LO, desc)?;
        self.common.write64_split(common::QUEUE_DRIVER_LO, driver)?;
        self.common.write64_split(common::QUEUE_DEVICE_LO, device)?;
        Ok(())
    }

    /// Enables the selected queue.
    pub fn enable_queue(&self) -> Result<(), TransportError> {
        Ok(self.common.write16(common::QUEUE_ENABLE, 1)?)
    }

    /// The selected queue's notification address, checked against the notify window.
    pub fn queue_notify_address(&self) -> Result<u64, TransportError> {
        let off = self.common.read16(common::QUEUE_NOTIFY_OFF)?;
        let offset = u64::from(off) * u64::from(self.notify_off_multiplier);
        if offset
            .checked_add(2)
            .map_or(true, |end| end > self.notify.len())
        {
            return Err(TransportError::NotifyOutOfRange { offset });
        }
        Ok(offset)
    }

    /// Tells the device queue `index` has new buffers (at the address from
    /// [`queue_notify_address`](Self::queue_notify_address)).
    pub fn notify(&self, address: u64, index: u16) -> Result<(), TransportError> {
        Ok(self.notify.write16(address, index)?)
    }
}
