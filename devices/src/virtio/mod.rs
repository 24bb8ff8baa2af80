//! Virtio devices and the modern virtio-pci transport (virtio 1.2 §4.1).
//!
//! A [`VirtioDevice`] knows its features, its configuration space and how to start and
//! stop serving its queues; [`VirtioPciDevice`] puts it on PCI: it owns the status
//! state machine, feature negotiation and queue registers the guest programs, and calls
//! the device's [`VirtioDevice::activate`] at DRIVER_OK with the queues the guest set up.

pub mod pci;
pub mod vhost_user;

use std::io;

use vmm_sys_util::eventfd::EventFd;

pub use pci::{VirtioPciDevice, VirtioPciError, VIRTIO_PCI_BAR_SIZE};
pub use vhost_user::{VhostUserDevice, VhostUserDeviceConfig};

/// Device status bits (virtio 1.2 §2.1), shared with the guest agent.
pub use ai_infer_protocol::virtio_pci::status;

/// The feature bit every modern device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// One virtqueue as the guest configured it through the transport.
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
pub struct ActivateParams<'a> {
    /// Features the driver accepted.
    pub features: u64,
    /// One entry per queue the device has, enabled or not.
    pub queues: &'a [QueueConfig],
    /// Per queue: the eventfd the guest's notifications arrive on (an ioeventfd).
    pub kicks: &'a [EventFd],
    /// Per queue: the eventfd that raises the queue's interrupt.
    pub calls: &'a [EventFd],
    /// The configuration-change vector's eventfd, if the driver set one.
    pub config_irq: Option<&'a EventFd>,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id.
    fn device_type(&self) -> u32;

    /// Number of queues.
    fn num_queues(&self) -> usize;

    /// Largest ring size the device supports.
    fn queue_max_size(&self) -> u16;

    /// Features the device offers now (may be 0 while the device cannot serve).
    fn features(&self) -> u64;

    /// Whether the device can accept FEATURES_OK now (e.g. its backend is connected).
    fn ready(&self) -> bool;

    /// Reads the device configuration space at `offset`; bytes past its end read zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; read-only devices ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts serving the queues with the negotiated features.
    fn activate(&mut self, params: ActivateParams<'_>) -> io::Result<()>;

    /// Stops serving: after this returns the device no longer touches guest memory it
    /// was given at activation.
    fn reset(&mut self);

    /// Whether the device lost what it needs to go on (the driver must reset it).
    fn needs_reset(&self) -> bool {
        false
    }
}
