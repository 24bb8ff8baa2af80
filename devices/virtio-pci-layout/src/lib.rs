//! The modern virtio-pci transport layout (virtio 1.2 §4.1.4): the vendor capabilities
//! that locate each structure, the common configuration registers, the device status bits
//! and the "no MSI-X vector" value. virtio-bindings has the generic virtio numbers but not
//! these.
//!
//! Both sides use these numbers: the VMM's virtio-pci transport (`devices`) and the guest
//! agent's userspace driver (through `ai_infer_protocol::virtio_pci`), so the two cannot
//! disagree on a register offset. No dependencies: it is linked into the guest agent.

#![no_std]

/// PCI capability id of vendor-specific capabilities (every virtio capability).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

/// Length of `struct virtio_pci_cap`.
pub const VIRTIO_PCI_CAP_LEN: usize = 16;

/// Length of `struct virtio_pci_notify_cap` (the capability plus
/// `notify_off_multiplier`) and of `struct virtio_pci_cfg_cap` (plus the data window).
pub const VIRTIO_PCI_CAP_EXT_LEN: usize = 20;

/// `cfg_type` values of the virtio capabilities.
pub mod cfg_type {
    /// Common configuration (`VIRTIO_PCI_CAP_COMMON_CFG`).
    pub const COMMON: u8 = 1;
    /// Notifications (`VIRTIO_PCI_CAP_NOTIFY_CFG`).
    pub const NOTIFY: u8 = 2;
    /// ISR status (`VIRTIO_PCI_CAP_ISR_CFG`).
    pub const ISR: u8 = 3;
    /// Device-specific configuration (`VIRTIO_PCI_CAP_DEVICE_CFG`).
    pub const DEVICE: u8 = 4;
    /// PCI configuration access window (`VIRTIO_PCI_CAP_PCI_CFG`).
    pub const PCI: u8 = 5;
}

/// Register offsets in the common configuration structure (virtio 1.2 §4.1.4.3).
pub mod common {
    /// `device_feature_select` (le32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (le32, read-only).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (le32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (le32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` (le16).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` (le16, read-only).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` (u8, read-only).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` (le16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (le16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (le16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (le16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` (le16, read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc`, low half (le32).
    pub const QUEUE_DESC_LO: u64 = 0x20;
    /// `queue_desc`, high half (le32).
    pub const QUEUE_DESC_HI: u64 = 0x24;
    /// `queue_driver` (the available ring), low half (le32).
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    /// `queue_driver`, high half (le32).
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    /// `queue_device` (the used ring), low half (le32).
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    /// `queue_device`, high half (le32).
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
    /// Length of the structure up to `queue_device` (the virtio 1.0 layout).
    pub const LEN: u64 = 0x38;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready; queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`: what a polling
/// driver writes, and what a device reads back for a vector it refuses.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
