//! Register layout of the modern virtio-pci transport (virtio 1.2 §4.1.4): the vendor
//! capabilities and the common configuration structure come from `virtio-pci-layout`
//! (shared with the guest agent's driver); the generic virtio numbers (status bits, feature
//! bits, device ids) from virtio-bindings.

pub use virtio_pci_layout::{
    cfg_type, common, PCI_CAP_ID_VNDR, VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_CAP_EXT_LEN,
    VIRTIO_PCI_CAP_LEN,
};

/// Device status bits (virtio 1.2 §2.1), from virtio-bindings, as `u8` like the register.
pub mod status {
    use virtio_bindings::virtio_config as c;

    #[allow(clippy::cast_possible_truncation)] // Each constant is one bit of a u8 register.
    const fn bit(v: u32) -> u8 {
        v as u8
    }
    pub const ACKNOWLEDGE: u8 = bit(c::VIRTIO_CONFIG_S_ACKNOWLEDGE);
    pub const DRIVER: u8 = bit(c::VIRTIO_CONFIG_S_DRIVER);
    pub const DRIVER_OK: u8 = bit(c::VIRTIO_CONFIG_S_DRIVER_OK);
    pub const FEATURES_OK: u8 = bit(c::VIRTIO_CONFIG_S_FEATURES_OK);
    pub const DEVICE_NEEDS_RESET: u8 = bit(c::VIRTIO_CONFIG_S_NEEDS_RESET);
    pub const FAILED: u8 = bit(c::VIRTIO_CONFIG_S_FAILED);
}

#[cfg(test)]
mod tests {
    use super::status;

    #[test]
    fn status_bits_agree_with_the_layout_the_guest_agent_uses() {
        use virtio_pci_layout::status as guest;
        assert_eq!(
            [
                status::ACKNOWLEDGE,
                status::DRIVER,
                status::DRIVER_OK,
                status::FEATURES_OK,
                status::DEVICE_NEEDS_RESET,
                status::FAILED
            ],
            [
                guest::ACKNOWLEDGE,
                guest::DRIVER,
                guest::DRIVER_OK,
                guest::FEATURES_OK,
                guest::DEVICE_NEEDS_RESET,
                guest::FAILED
            ]
        );
    }
}
