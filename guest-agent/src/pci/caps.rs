//! The virtio vendor capabilities of a PCI function, parsed from its configuration
//! space bytes (virtio 1.2 §4.1.4).
//!
//! The device's bytes are not trusted: the walk is bounded (a loop or a pointer into
//! the header ends it with an error), every capability must fit in the bytes read, and
//! nothing assumes which BAR or offset a structure lives at.

use ai_infer_protocol::virtio_pci::{
    cfg_type, PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_EXT_LEN, VIRTIO_PCI_CAP_LEN,
};
use thiserror::Error;

/// PCI status register bit: the function has a capability list.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Offset of the PCI status register.
const STATUS_OFFSET: usize = 0x06;
/// Offset of the capabilities pointer.
const CAP_POINTER_OFFSET: usize = 0x34;
/// Capabilities live after the 64-byte standard header.
const FIRST_CAP_OFFSET: usize = 0x40;
/// A 256-byte space holds at most (256 - 64) / 4 capabilities: more means a loop.
const MAX_CAPS: usize = 48;
/// BAR indices of a type-0 header.
const MAX_BAR: u8 = 5;

/// `cfg_type` values of virtio capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VirtioCapType {
    /// Common configuration (`VIRTIO_PCI_CAP_COMMON_CFG`).
    Common = cfg_type::COMMON,
    /// Notifications (`VIRTIO_PCI_CAP_NOTIFY_CFG`).
    Notify = cfg_type::NOTIFY,
    /// ISR status (`VIRTIO_PCI_CAP_ISR_CFG`).
    Isr = cfg_type::ISR,
    /// Device-specific configuration (`VIRTIO_PCI_CAP_DEVICE_CFG`).
    Device = cfg_type::DEVICE,
    /// Configuration access window (`VIRTIO_PCI_CAP_PCI_CFG`); not used by this driver.
    PciCfg = cfg_type::PCI,
}

impl VirtioCapType {
    fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            cfg_type::COMMON => Some(Self::Common),
            cfg_type::NOTIFY => Some(Self::Notify),
            cfg_type::ISR => Some(Self::Isr),
            cfg_type::DEVICE => Some(Self::Device),
            cfg_type::PCI => Some(Self::PciCfg),
            _ => None,
        }
    }
}

/// Where one virtio structure lives: `length` bytes at `offset` in BAR `bar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapRegion {
    /// BAR index, 0..=5.
    pub bar: u8,
    /// Offset inside the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
}

/// The structures a driver needs, each from the first capability of its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: CapRegion,
    /// Notification area.
    pub notify: CapRegion,
    /// Multiplier of `queue_notify_off` inside the notification area.
    pub notify_off_multiplier: u32,
    /// ISR status byte (present on every virtio-pci device; unused while polling).
    pub isr: Option<CapRegion>,
    /// Device-specific configuration.
    pub device: CapRegion,
}

/// What is wrong with a capability list.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CapsError {
    /// Fewer configuration bytes than the standard header.
    #[error("PCI configuration space is only {0} bytes long")]
    ShortConfig(usize),
    /// The status register says there is no capability list.
    #[error("PCI function has no capability list (status {0:#06x})")]
    NoCapList(u16),
    /// A capability pointer into the header or past the end.
    #[error("Capability pointer {ptr:#x} is outside {first:#x}..{len:#x}")]
    BadPointer {
        /// The pointer.
        ptr: usize,
        /// First valid offset.
        first: usize,
        /// Bytes of configuration space read.
        len: usize,
    },
    /// The list revisits a capability or is longer than a configuration space allows.
    #[error("Capability list loops or exceeds {MAX_CAPS} entries (at {0:#x})")]
    Loop(usize),
    /// A virtio capability shorter than its structure, or running past the end.
    #[error("Virtio capability at {at:#x} has length {cap_len}, needs {needed} inside the configuration space")]
    BadLength {
        /// Offset of the capability.
        at: usize,
        /// Its `cap_len`.
        cap_len: usize,
        /// The minimum for its type.
        needed: usize,
    },
    /// A structure the driver needs has no usable capability.
    #[error("No usable virtio {0:?} capability")]
    Missing(VirtioCapType),
    /// notify_off_multiplier is neither 0 nor an even power of two (virtio 1.x §4.1.4.4):
    /// the notification addresses would not be 2-byte aligned.
    #[error("notify_off_multiplier {0} is neither 0 nor an even power of two")]
    BadNotifyMultiplier(u32),
}

fn byte(cfg: &[u8], at: usize) -> Result<u8, CapsError> {
    cfg.get(at)
        .copied()
        .ok_or(CapsError::ShortConfig(cfg.len()))
}

fn le16(cfg: &[u8], at: usize) -> Result<u16, CapsError> {
    Ok(u16::from_le_bytes([byte(cfg, at)?, byte(cfg, at + 1)?]))
}

fn le32(cfg: &[u8], at: usize) -> Result<u32, CapsError> {
    Ok(u32::from_le_bytes([
        byte(cfg, at)?,
        byte(cfg, at + 1)?,
        byte(cfg, at + 2)?,
        byte(cfg, at + 3)?,
    ]))
}

/// Offsets of every capability in the standard list, in list order.
pub fn capability_offsets(cfg: &[u8]) -> Result<Vec<usize>, CapsError> {
    if cfg.len() < FIRST_CAP_OFFSET {
        return Err(CapsError::ShortConfig(cfg.len()));
    }
    let status = le16(cfg, STATUS_OFFSET)?;
    if status & STATUS_CAP_LIST == 0 {
        return Err(CapsError::NoCapList(status));
    }
    // The standard list lives in the first 256 bytes; the low two bits are reserved.
    let limit = cfg.len().min(256);
    let mut ptr = usize::from(byte(cfg, CAP_POINTER_OFFSET)? & !3);
    let mut seen = Vec::new();
    while ptr != 0 {
        if ptr < FIRST_CAP_OFFSET || ptr + 2 > limit {
            return Err(CapsError::BadPointer {
                ptr,
                first: FIRST_CAP_OFFSET,
                len: limit,
            });
        }
        if seen.contains(&ptr) || seen.len() >= MAX_CAPS {
            return Err(CapsError::Loop(ptr));
        }
        seen.push(ptr);
        ptr = usize::from(byte(cfg, ptr + 1)? & !3);
    }
    Ok(seen)
}

/// Finds the virtio structures in a function's configuration space bytes.
///
/// For each type the first capability with a valid BAR index is used, as virtio asks;
/// capabilities of unknown types are skipped (later spec versions may add some).
pub fn parse_virtio_caps(cfg: &[u8]) -> Result<VirtioCaps, CapsError> {
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    let limit = cfg.len().min(256);
    for at in capability_offsets(cfg)? {
        if byte(cfg, at)? != PCI_CAP_ID_VNDR {
            continue;
        }
        let cap_len = usize::from(byte(cfg, at + 2)?);
        let Some(kind) = VirtioCapType::from_raw(byte(cfg, at + 3)?) else {
            continue;
        };
        let needed = if kind == VirtioCapType::Notify {
            VIRTIO_PCI_CAP_EXT_LEN
        } else {
            VIRTIO_PCI_CAP_LEN
        };
        if cap_len < needed || at + needed > limit {
            return Err(CapsError::BadLength {
                at,
                cap_len,
                needed,
            });
        }
        let bar = byte(cfg, at + 4)?;
        if bar > MAX_BAR {
            // Reserved BAR values: the driver must ignore such a capability.
            continue;
        }
        let region = CapRegion {
            bar,
            offset: le32(cfg, at + 8)?,
            length: le32(cfg, at + 12)?,
        };
        match kind {
            VirtioCapType::Common => {
                common.get_or_insert(region);
            }
            VirtioCapType::Notify => {
                if notify.is_none() {
                    notify = Some((region, le32(cfg, at + 16)?));
                }
            }
            VirtioCapType::Isr => {
                isr.get_or_insert(region);
            }
            VirtioCapType::Device => {
                device.get_or_insert(region);
            }
            VirtioCapType::PciCfg => {}
        }
    }
    let common = common.ok_or(CapsError::Missing(VirtioCapType::Common))?;
    let (notify, notify_off_multiplier) =
        notify.ok_or(CapsError::Missing(VirtioCapType::Notify))?;
    if notify_off_multiplier != 0
        && !(notify_off_multiplier.is_power_of_two() && notify_off_multiplier >= 2)
    {
        return Err(CapsError::BadNotifyMultiplier(notify_off_multiplier));
    }
    let device = device.ok_or(CapsError::Missing(VirtioCapType::Device))?;
    Ok(VirtioCaps {
        common,
        notify,
        notify_off_multiplier,
        isr,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a 256-byte configuration space with the given capabilities, each
    /// `(offset, bytes)`, chained in the given order.
    fn config_with(caps: &[(usize, Vec<u8>)]) -> Vec<u8> {
        let mut cfg = vec![0u8; 256];
        cfg[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        cfg[2..4].copy_from_slice(&0x107cu16.to_le_bytes());
        cfg[STATUS_OFFSET..STATUS_OFFSET + 2].copy_from_slice(&STATUS_CAP_LIST.to_le_bytes());
        cfg[CAP_POINTER_OFFSET] = caps.first().map_or(0, |c| c.0 as u8);
        for (i, (at, bytes)) in caps.iter().enumerate() {
            cfg[*at..*at + bytes.len()].copy_from_slice(bytes);
            cfg[*at + 1] = caps.get(i + 1).map_or(0, |c| c.0 as u8);
        }
        cfg
    }

    fn vcap(kind: u8, bar: u8, offset: u32, length: u32) -> Vec<u8> {
        let mut c = vec![PCI_CAP_ID_VNDR, 0, 16, kind, bar, 0, 0, 0];
        c.extend(offset.to_le_bytes());
        c.extend(length.to_le_bytes());
        c
    }

    fn notify_cap(bar: u8, offset: u32, length: u32, mult: u32) -> Vec<u8> {
        let mut c = vcap(2, bar, offset, length);
        c[2] = 20;
        c.extend(mult.to_le_bytes());
        c
    }

    fn standard() -> Vec<(usize, Vec<u8>)> {
        vec![
            // An MSI-X capability first, as QEMU and others put it: skipped.
            (
                0x40,
                vec![0x11, 0, 0x3f, 0x00, 0x04, 0, 0, 0, 0x04, 0x08, 0, 0],
            ),
            (0x50, vcap(1, 4, 0x0000, 0x38)),
            (0x60, vcap(3, 4, 0x1000, 0x1)),
            (0x70, vcap(4, 4, 0x2000, 0x28)),
            (0x84, notify_cap(2, 0x3000, 0x1000, 4)),
            (0x98, vcap(5, 0, 0, 0)),
        ]
    }

    #[test]
    fn finds_every_structure_wherever_it_is() {
        let caps = parse_virtio_caps(&config_with(&standard())).unwrap();
        assert_eq!(
            caps,
            VirtioCaps {
                common: CapRegion {
                    bar: 4,
                    offset: 0,
                    length: 0x38
                },
                notify: CapRegion {
                    bar: 2,
                    offset: 0x3000,
                    length: 0x1000
                },
                notify_off_multiplier: 4,
                isr: Some(CapRegion {
                    bar: 4,
                    offset: 0x1000,
                    length: 1
                }),
                device: CapRegion {
                    bar: 4,
                    offset: 0x2000,
                    length: 0x28
                },
            }
        );
    }

    #[test]
    fn first_capability_of_a_type_wins_and_reserved_bars_are_skipped() {
        let mut caps = standard();
        caps.insert(1, (0xb0, vcap(1, 7, 0x9000, 0x38))); // reserved BAR: ignored
        caps.push((0xc0, vcap(1, 0, 0x5000, 0x38))); // second common: ignored
        caps.push((0xd0, vcap(9, 0, 0, 0))); // unknown type: skipped
        let parsed = parse_virtio_caps(&config_with(&caps)).unwrap();
        assert_eq!(
            parsed.common,
            CapRegion {
                bar: 4,
                offset: 0,
                length: 0x38
            }
        );
    }

    #[test]
    fn rejects_missing_structures() {
        let mut caps = standard();
        caps.retain(|(_, c)| c[3] != 4 || c[0] != PCI_CAP_ID_VNDR);
        assert_eq!(
            parse_virtio_caps(&config_with(&caps)),
            Err(CapsError::Missing(VirtioCapType::Device))
        );
        assert_eq!(
            parse_virtio_caps(&config_with(&[])),
            Err(CapsError::Missing(VirtioCapType::Common))
        );
    }

    #[test]
    fn rejects_notify_multipliers_that_misalign_notifications() {
        for (mult, ok) in [
            (0, true),
            (2, true),
            (4, true),
            (1, false),
            (3, false),
            (6, false),
        ] {
            let mut caps = standard();
            caps[4].1 = notify_cap(2, 0x3000, 0x1000, mult);
            let parsed = parse_virtio_caps(&config_with(&caps));
            if ok {
                assert_eq!(parsed.unwrap().notify_off_multiplier, mult);
            } else {
                assert_eq!(parsed, Err(CapsError::BadNotifyMultiplier(mult)));
            }
        }
    }

    #[test]
    fn rejects_loops_and_bad_pointers() {
        let mut cfg = config_with(&standard());
        cfg[0x98 + 1] = 0x50; // last points back to the second
        assert_eq!(parse_virtio_caps(&cfg), Err(CapsError::Loop(0x50)));
        let mut cfg = config_with(&standard());
        cfg[0x60 + 1] = 0x60; // self loop
        assert_eq!(parse_virtio_caps(&cfg), Err(CapsError::Loop(0x60)));
        let mut cfg = config_with(&standard());
        cfg[CAP_POINTER_OFFSET] = 0x10; // into the header
        assert!(matches!(
            parse_virtio_caps(&cfg),
            Err(CapsError::BadPointer { ptr: 0x10, .. })
        ));
        // A pointer whose capability would run off a short read of config space.
        let cfg = config_with(&standard());
        assert!(matches!(
            parse_virtio_caps(&cfg[..0x90]),
            Err(CapsError::BadPointer {
                ptr: 0x98,
                len: 0x90,
                ..
            })
        ));
        // The list ends inside the read bytes but the notify capability does not.
        let mut cfg = config_with(&standard());
        cfg[0x84 + 1] = 0;
        assert_eq!(
            parse_virtio_caps(&cfg[..0x90]),
            Err(CapsError::BadLength {
                at: 0x84,
                cap_len: 20,
                needed: 20
            })
        );
    }

    #[test]
    fn rejects_short_capabilities_and_config() {
        let mut caps = standard();
        caps[4].1[2] = 16; // notify cap too short for its multiplier
        assert_eq!(
            parse_virtio_caps(&config_with(&caps)),
            Err(CapsError::BadLength {
                at: 0x84,
                cap_len: 16,
                needed: 20
            })
        );
        let mut cfg = config_with(&standard());
        cfg[0xfc] = PCI_CAP_ID_VNDR;
        cfg[0xfd] = 0;
        cfg[0xfe] = 16;
        cfg[0xff] = 1;
        cfg[0x98 + 1] = 0xfc; // a capability in the last 4 bytes
        assert_eq!(
            parse_virtio_caps(&cfg),
            Err(CapsError::BadLength {
                at: 0xfc,
                cap_len: 16,
                needed: 16
            })
        );
        assert_eq!(
            parse_virtio_caps(&[0u8; 10]),
            Err(CapsError::ShortConfig(10))
        );
        let mut cfg = config_with(&standard());
        cfg[STATUS_OFFSET] = 0;
        assert_eq!(parse_virtio_caps(&cfg), Err(CapsError::NoCapList(0)));
    }

    #[test]
    fn list_longer_than_config_space_allows_is_a_loop() {
        // 48 distinct 4-byte-apart capabilities fill 0x40..0x100 exactly: fine.
        let mut cfg = vec![0u8; 256];
        cfg[STATUS_OFFSET] = STATUS_CAP_LIST as u8;
        cfg[CAP_POINTER_OFFSET] = 0x40;
        for at in (0x40..0x100).step_by(4) {
            cfg[at] = 0x01; // power management id, not vendor
            cfg[at + 1] = if at + 4 < 0x100 { (at + 4) as u8 } else { 0 };
        }
        assert_eq!(capability_offsets(&cfg).unwrap().len(), 48);
        // Close it into a ring: rejected, not an endless walk.
        cfg[0xfc + 1] = 0x40;
        assert_eq!(capability_offsets(&cfg), Err(CapsError::Loop(0x40)));
    }
}
