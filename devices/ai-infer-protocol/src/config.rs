//! Device-specific configuration space and feature negotiation.

use crate::consts::{
    CONFIG_SPACE_LEN, DEVICE_FEATURES, MAX_CHAIN_DESCRIPTORS, MAX_RANK, MAX_REQUEST_QUEUES,
    MAX_TENSORS, MIN_CHAIN_DESCRIPTORS, PROTOCOL_VERSION, REQUIRED_FEATURES,
};
use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

/// The 40-byte device-specific configuration space (read-only for the driver).
///
/// These are the limits this device enforces for this tenant; each is at most the
/// protocol's own cap, and requests beyond them are rejected with BAD_REQUEST.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceConfig {
    /// Wire format version; this crate implements [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Number of request queues (queue indices `0..num_request_queues`).
    pub num_request_queues: u16,
    /// Most descriptors (direct plus indirect) one chain may have.
    pub max_chain_descriptors: u16,
    /// Most input tensors per request.
    pub max_input_tensors: u16,
    /// Most output tensors per request.
    pub max_output_tensors: u16,
    /// Highest tensor rank accepted.
    pub max_rank: u16,
    /// Most bytes of input data (sum of input `data_len`) per request.
    pub max_input_bytes: u64,
    /// Most bytes of output buffers (sum of output `data_len`) per request.
    pub max_output_bytes: u64,
    /// Most requests this tenant may have in flight; more get QUEUE_FULL.
    pub max_in_flight: u32,
}

impl Default for DeviceConfig {
    /// Recommended values: the protocol caps for counts, 256 MiB of data each way.
    fn default() -> Self {
        DeviceConfig {
            protocol_version: PROTOCOL_VERSION,
            num_request_queues: 1,
            max_chain_descriptors: 256,
            max_input_tensors: MAX_TENSORS as u16,
            max_output_tensors: MAX_TENSORS as u16,
            max_rank: MAX_RANK as u16,
            max_input_bytes: 256 << 20,
            max_output_bytes: 256 << 20,
            max_in_flight: 64,
        }
    }
}

fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ProtocolError> {
    if value < min || value > max {
        return Err(ProtocolError::InvalidConfig {
            field,
            value,
            min,
            max,
        });
    }
    Ok(())
}

impl DeviceConfig {
    /// Size on the wire.
    pub const LEN: usize = CONFIG_SPACE_LEN;

    /// Checks every field is within what this protocol version allows. A driver calls
    /// this after reading config space and refuses the device if it fails.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let v = u64::from(PROTOCOL_VERSION);
        check_range("protocol_version", self.protocol_version.into(), v, v)?;
        check_range(
            "num_request_queues",
            self.num_request_queues.into(),
            1,
            MAX_REQUEST_QUEUES as u64,
        )?;
        check_range(
            "max_chain_descriptors",
            self.max_chain_descriptors.into(),
            MIN_CHAIN_DESCRIPTORS as u64,
            MAX_CHAIN_DESCRIPTORS as u64,
        )?;
        check_range(
            "max_input_tensors",
            self.max_input_tensors.into(),
            1,
            MAX_TENSORS as u64,
        )?;
        check_range(
            "max_output_tensors",
            self.max_output_tensors.into(),
            1,
            MAX_TENSORS as u64,
        )?;
        check_range("max_rank", self.max_rank.into(), 1, MAX_RANK as u64)?;
        check_range("max_input_bytes", self.max_input_bytes, 1, u64::MAX)?;
        check_range("max_output_bytes", self.max_output_bytes, 1, u64::MAX)?;
        check_range(
            "max_in_flight",
            self.max_in_flight.into(),
            1,
            u32::MAX.into(),
        )?;
        Ok(())
    }

    /// Writes the 40-byte config space image; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut w = Writer::new(buf, "device config", Self::LEN)?;
        w.u32(self.protocol_version)?;
        w.u16(self.num_request_queues)?;
        w.u16(self.max_chain_descriptors)?;
        w.u16(self.max_input_tensors)?;
        w.u16(self.max_output_tensors)?;
        w.u16(self.max_rank)?;
        w.zeros(2)?;
        w.u64(self.max_input_bytes)?;
        w.u64(self.max_output_bytes)?;
        w.u32(self.max_in_flight)?;
        w.zeros(4)?;
        Ok(w.position())
    }

    /// Reads a config space image. Only the layout is checked here; call
    /// [`DeviceConfig::validate`] for the values.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "device config", Self::LEN)?;
        let protocol_version = r.u32()?;
        let num_request_queues = r.u16()?;
        let max_chain_descriptors = r.u16()?;
        let max_input_tensors = r.u16()?;
        let max_output_tensors = r.u16()?;
        let max_rank = r.u16()?;
        r.reserved_u16("config.reserved0")?;
        let max_input_bytes = r.u64()?;
        let max_output_bytes = r.u64()?;
        let max_in_flight = r.u32()?;
        r.reserved_u32("config.reserved1")?;
        Ok(DeviceConfig {
            protocol_version,
            num_request_queues,
            max_chain_descriptors,
            max_input_tensors,
            max_output_tensors,
            max_rank,
            max_input_bytes,
            max_output_bytes,
            max_in_flight,
        })
    }
}

/// Checks the feature bits a driver wrote before it sets `FEATURES_OK`: only offered
/// bits, and every required bit. Returns the negotiated set.
pub fn negotiate_features(driver_features: u64) -> Result<u64, ProtocolError> {
    let unoffered = driver_features & !DEVICE_FEATURES;
    if unoffered != 0 {
        return Err(ProtocolError::UnofferedFeatures(unoffered));
    }
    let missing = REQUIRED_FEATURES & !driver_features;
    if missing != 0 {
        return Err(ProtocolError::MissingFeatures(missing));
    }
    Ok(driver_features)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::{
        config_offset, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
    };

    fn sample() -> DeviceConfig {
        DeviceConfig {
            protocol_version: 1,
            num_request_queues: 2,
            max_chain_descriptors: 300,
            max_input_tensors: 4,
            max_output_tensors: 3,
            max_rank: 6,
            max_input_bytes: 0x1122_3344_5566,
            max_output_bytes: 64 << 20,
            max_in_flight: 17,
        }
    }

    #[test]
    fn round_trip_and_offsets() {
        let cfg = sample();
        let mut buf = [0xaau8; DeviceConfig::LEN];
        assert_eq!(cfg.encode(&mut buf), Ok(40));
        assert_eq!(DeviceConfig::decode(&buf), Ok(cfg));
        let at = |off: usize, len: usize| &buf[off..off + len];
        assert_eq!(at(config_offset::PROTOCOL_VERSION, 4), &1u32.to_le_bytes());
        assert_eq!(
            at(config_offset::NUM_REQUEST_QUEUES, 2),
            &2u16.to_le_bytes()
        );
        assert_eq!(
            at(config_offset::MAX_CHAIN_DESCRIPTORS, 2),
            &300u16.to_le_bytes()
        );
        assert_eq!(at(config_offset::MAX_INPUT_TENSORS, 2), &4u16.to_le_bytes());
        assert_eq!(
            at(config_offset::MAX_OUTPUT_TENSORS, 2),
            &3u16.to_le_bytes()
        );
        assert_eq!(at(config_offset::MAX_RANK, 2), &6u16.to_le_bytes());
        assert_eq!(at(config_offset::RESERVED0, 2), &[0, 0]);
        assert_eq!(
            at(config_offset::MAX_INPUT_BYTES, 8),
            &0x1122_3344_5566u64.to_le_bytes()
        );
        assert_eq!(
            at(config_offset::MAX_OUTPUT_BYTES, 8),
            &(64u64 << 20).to_le_bytes()
        );
        assert_eq!(at(config_offset::MAX_IN_FLIGHT, 4), &17u32.to_le_bytes());
        assert_eq!(at(config_offset::RESERVED1, 4), &[0; 4]);
        assert_eq!(DeviceConfig::default().validate(), Ok(()));
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn decode_rejects_truncation_and_reserved_bits() {
        let mut buf = [0u8; DeviceConfig::LEN];
        sample().encode(&mut buf).unwrap();
        for len in 0..DeviceConfig::LEN {
            assert_eq!(
                DeviceConfig::decode(&buf[..len]),
                Err(ProtocolError::Truncated {
                    what: "device config",
                    needed: 40,
                    got: len
                })
            );
        }
        buf[config_offset::RESERVED0] = 3;
        assert_eq!(
            DeviceConfig::decode(&buf),
            Err(ProtocolError::ReservedNotZero {
                field: "config.reserved0",
                value: 3
            })
        );
    }

    #[test]
    fn validate_rejects_out_of_range_limits() {
        type Case = (fn(&mut DeviceConfig), &'static str, u64);
        let cases: [Case; 6] = [
            (|c| c.protocol_version = 2, "protocol_version", 2),
            (|c| c.num_request_queues = 0, "num_request_queues", 0),
            (|c| c.max_chain_descriptors = 3, "max_chain_descriptors", 3),
            (|c| c.max_input_tensors = 17, "max_input_tensors", 17),
            (|c| c.max_rank = 9, "max_rank", 9),
            (|c| c.max_in_flight = 0, "max_in_flight", 0),
        ];
        for (mutate, field, value) in cases {
            let mut cfg = sample();
            mutate(&mut cfg);
            match cfg.validate() {
                Err(ProtocolError::InvalidConfig {
                    field: f, value: v, ..
                }) => {
                    assert_eq!((f, v), (field, value));
                }
                other => panic!("{field}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn feature_negotiation() {
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        assert_eq!(negotiate_features(v1), Ok(v1));
        let with_event_idx = v1 | (1 << VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(negotiate_features(with_event_idx), Ok(with_event_idx));
        assert_eq!(
            negotiate_features(0),
            Err(ProtocolError::MissingFeatures(v1))
        );
        let platform = 1u64 << VIRTIO_F_ACCESS_PLATFORM;
        assert_eq!(
            negotiate_features(v1 | platform),
            Err(ProtocolError::UnofferedFeatures(platform))
        );
        let in_order = 1u64 << VIRTIO_F_IN_ORDER;
        assert_eq!(
            negotiate_features(v1 | in_order),
            Err(ProtocolError::UnofferedFeatures(in_order))
        );
    }
}
