//! Numbers fixed by the ai_infer specification (`docs/ai_infer.md`).
//!
//! Everything a driver or a device must agree on without negotiation lives here, so
//! that the host daemon and the guest agent cannot drift apart.

/// Virtio device id of ai_infer.
///
/// Not registered with OASIS. On virtio-pci the modern PCI device id is
/// `0x1040 + id` and the virtio range of vendor 0x1af4 ends at 0x107f, so the id must
/// be at most 63. Non-standard devices conventionally count down from 63 (crosvm uses
/// 63, 62 and 61), so 60 is the highest id not already used that way.
pub const VIRTIO_ID_AI_INFER: u32 = 60;

/// PCI vendor id of every virtio-pci device.
pub const PCI_VENDOR_ID_VIRTIO: u16 = 0x1af4;

/// Modern (non-transitional) virtio-pci device id: `0x1040 + VIRTIO_ID_AI_INFER`.
pub const PCI_DEVICE_ID_AI_INFER: u16 = 0x1040 + VIRTIO_ID_AI_INFER as u16;

/// PCI subsystem vendor id (the virtio vendor, as for other virtio devices).
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_VIRTIO;

/// PCI subsystem id; the virtio spec asks non-transitional devices for 0x40 or higher.
pub const PCI_SUBSYSTEM_ID_AI_INFER: u16 = 0x0040;

/// PCI revision id; the virtio spec asks non-transitional devices for 1 or higher.
pub const PCI_REVISION_ID_AI_INFER: u8 = 1;

/// PCI class code (class 0x12 "processing accelerator", subclass 0, prog-if 0).
pub const PCI_CLASS_CODE_AI_INFER: u32 = 0x12_00_00;

/// Version of the wire format described by this crate, reported in config space.
pub const PROTOCOL_VERSION: u32 = 1;

/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Feature bit: modern virtio (1.x). Required.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: device accesses memory through a platform IOMMU. Never offered.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Feature bit: packed virtqueues. Never offered (split rings only).
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// Feature bit: used buffers in available order. Never offered: the scheduler
/// completes requests out of order by design (priorities, deadlines, batching).
pub const VIRTIO_F_IN_ORDER: u32 = 35;

/// Every feature bit the device offers.
pub const DEVICE_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Feature bits the driver must accept, or the device refuses `FEATURES_OK`.
pub const REQUIRED_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// Maximum number of input tensors, and separately of output tensors, per request.
pub const MAX_TENSORS: usize = 16;

/// Maximum rank (number of dimensions) of a tensor.
pub const MAX_RANK: usize = 8;

/// Maximum length in bytes (UTF-8) of a model name.
pub const MAX_MODEL_NAME_LEN: usize = 64;

/// Maximum length in bytes (UTF-8) of a tensor name in a model signature.
pub const MAX_TENSOR_NAME_LEN: usize = 32;

/// Maximum number of models in one MODELS response.
pub const MAX_MODELS: usize = 1024;

/// Maximum number of request queues a device may advertise.
pub const MAX_REQUEST_QUEUES: usize = 64;

/// Largest value a device may advertise as `max_chain_descriptors`.
pub const MAX_CHAIN_DESCRIPTORS: usize = 4096;

/// Smallest value a device may advertise as `max_chain_descriptors`: one request
/// descriptor, one input, one output and one response descriptor.
pub const MIN_CHAIN_DESCRIPTORS: usize = 4;

/// Recommended maximum queue size (a power of two) for each request queue.
pub const QUEUE_SIZE_MAX: u16 = 256;

/// Size of the request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 40;
/// Size of one tensor descriptor on the wire (requests and output shapes).
pub const TENSOR_DESC_LEN: usize = 80;
/// Size of the response header on the wire (always the last bytes of a chain).
pub const RESPONSE_HEADER_LEN: usize = 48;
/// Size of the device-specific configuration space.
pub const CONFIG_SPACE_LEN: usize = 40;
/// Size of the header in front of the model entries of a MODELS payload.
pub const MODEL_LIST_HEADER_LEN: usize = 8;
/// Size of the fixed part of a model entry (tensor specs follow it).
pub const MODEL_INFO_FIXED_LEN: usize = 80;
/// Size of one tensor spec inside a model entry.
pub const TENSOR_SPEC_LEN: usize = 168;
/// Number of log2 latency buckets in a TRACE payload.
pub const LATENCY_BUCKETS: usize = 32;
/// Number of per-status counters in a TRACE payload (status codes 0..16).
pub const STATUS_SLOTS: usize = 16;
/// Size of a TRACE payload.
pub const TRACE_COUNTERS_LEN: usize = 8 * (10 + STATUS_SLOTS + LATENCY_BUCKETS);

/// `detail` value of a response when the status has no detail to report.
pub const DETAIL_NONE: u32 = u32::MAX;

/// Byte offsets of the fields of the device-specific configuration space.
pub mod config_offset {
    /// `le32 protocol_version`
    pub const PROTOCOL_VERSION: usize = 0x00;
    /// `le16 num_request_queues`
    pub const NUM_REQUEST_QUEUES: usize = 0x04;
    /// `le16 max_chain_descriptors`
    pub const MAX_CHAIN_DESCRIPTORS: usize = 0x06;
    /// `le16 max_input_tensors`
    pub const MAX_INPUT_TENSORS: usize = 0x08;
    /// `le16 max_output_tensors`
    pub const MAX_OUTPUT_TENSORS: usize = 0x0a;
    /// `le16 max_rank`
    pub const MAX_RANK: usize = 0x0c;
    /// `le16 reserved`
    pub const RESERVED0: usize = 0x0e;
    /// `le64 max_input_bytes`
    pub const MAX_INPUT_BYTES: usize = 0x10;
    /// `le64 max_output_bytes`
    pub const MAX_OUTPUT_BYTES: usize = 0x18;
    /// `le32 max_in_flight`
    pub const MAX_IN_FLIGHT: usize = 0x20;
    /// `le32 reserved`
    pub const RESERVED1: usize = 0x24;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_ids_follow_the_virtio_pci_rules() {
        assert_eq!(PCI_DEVICE_ID_AI_INFER, 0x107c);
        // Modern virtio-pci ids of vendor 0x1af4 end at 0x107f.
        const { assert!(PCI_DEVICE_ID_AI_INFER <= 0x107f) };
    }

    #[test]
    fn sizes_match_the_spec_tables() {
        assert_eq!(TRACE_COUNTERS_LEN, 464);
        assert_eq!(TENSOR_DESC_LEN, 8 + 8 * MAX_RANK + 8);
        assert_eq!(TENSOR_SPEC_LEN, 8 + MAX_TENSOR_NAME_LEN + 16 * MAX_RANK);
        assert_eq!(MODEL_INFO_FIXED_LEN, 16 + MAX_MODEL_NAME_LEN);
        assert_eq!(config_offset::RESERVED1 + 4, CONFIG_SPACE_LEN);
    }

    #[test]
    fn device_features_never_include_forbidden_bits() {
        for bit in [
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_F_RING_PACKED,
            VIRTIO_F_IN_ORDER,
        ] {
            assert_eq!(DEVICE_FEATURES & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(DEVICE_FEATURES & REQUIRED_FEATURES, REQUIRED_FEATURES);
    }
}
