//! Virtio devices and the modern virtio-pci transport (virtio 1.2 §4.1).
//!
//! A [`VirtioDevice`] knows its features, its configuration space and how to start and
//! stop serving its queues; [`VirtioPciDevice`] puts it on PCI: it owns the status
//! state machine, feature negotiation and queue registers the guest programs, and calls
//! the device's [`VirtioDevice::activate`] at DRIVER_OK with the queues the guest set up.

pub mod block;
pub mod interrupt;
pub mod net;
pub mod pci;
pub mod pci_layout;
#[cfg(test)]
pub(crate) mod test_support;
pub mod vhost_user;
pub mod vsock;
pub mod worker;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limiter::RateLimiterConfig;

pub use interrupt::VirtioInterrupt;
pub use pci::{VirtioPciDevice, VirtioPciError, VIRTIO_PCI_BAR_SIZE};
pub use vhost_user::{VhostUserDevice, VhostUserDeviceConfig};
pub use virtio_queue::{Queue, QueueT};
pub use worker::{VirtioWorker, WorkerLoop, WorkerThread};

/// Device status bits (virtio 1.2 §2.1).
pub use pci_layout::status;

/// The feature bit every modern device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// The driver and device suppress notifications with used/avail event indices.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// One virtqueue's registers as the guest programmed them through the transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Ring size chosen by the driver (a power of two ≤ the device maximum).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// Whether the driver enabled the queue.
    pub enabled: bool,
}

/// What a device gets at DRIVER_OK.
pub struct ActivateParams {
    /// Features the driver accepted.
    pub features: u64,
    /// The guest's memory, where the rings and buffers are.
    pub memory: GuestMemoryMmap,
    /// One queue per queue the device has, in order, enabled (`ready()`) or not; each
    /// enabled queue's rings were checked to lie inside `memory`.
    pub queues: Vec<Queue>,
    /// Per queue: the eventfd the guest's notifications arrive on (an ioeventfd).
    pub kicks: Vec<EventFd>,
    /// Raises the queues' and the configuration-change interrupts.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// A virtio device behind a transport.
///
/// The transport owns the registers the driver programs; the device owns what it does
/// with its queues once started. A device serves its queues on its own thread (see
/// [`worker`]); no method here may block on guest I/O, as they run on vCPU threads.
pub trait VirtioDevice: Send {
    /// The virtio device id.
    fn device_type(&self) -> u32;

    /// Number of queues.
    fn num_queues(&self) -> usize;

    /// Largest ring size the device supports (a power of two).
    fn queue_max_size(&self) -> u16;

    /// Features the device offers now (may be 0 while the device cannot serve).
    fn features(&self) -> u64;

    /// Whether the device can accept FEATURES_OK now (e.g. its backend is connected).
    fn ready(&self) -> bool {
        true
    }

    /// Reads the device configuration space at `offset`; bytes past its end read zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; read-only fields ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts serving the queues with the negotiated features.
    fn activate(&mut self, params: ActivateParams) -> io::Result<()>;

    /// Stops serving and hands the queues back (`None` if it was not serving or lost
    /// them). After this returns the device no longer touches guest memory.
    fn reset(&mut self) -> Option<Vec<Queue>>;

    /// Whether the device lost what it needs to go on (the driver must reset it).
    fn needs_reset(&self) -> bool {
        false
    }

    /// Applies a change from the control plane, also while the device serves. A device
    /// that takes no such change says so.
    fn update(&mut self, _update: &DeviceUpdate) -> Result<(), String> {
        Err("this device takes no changes while it runs".into())
    }
}

/// A change the control plane makes to a device while the VM runs (Firecracker's PATCH).
/// `None` leaves that part as it is.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceUpdate {
    /// A drive: a new backing file, new limits.
    Drive {
        path: Option<PathBuf>,
        rate_limiter: Option<RateLimiterConfig>,
    },
    /// A network interface: new receive and transmit limits.
    Net {
        rx_rate_limiter: Option<RateLimiterConfig>,
        tx_rate_limiter: Option<RateLimiterConfig>,
    },
}

/// Reads `len` bytes of a little-endian configuration space `config` at `offset` into
/// `data`; bytes past its end read zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
