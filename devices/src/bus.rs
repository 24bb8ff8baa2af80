//! The address bus that vCPU exits are dispatched to.
//!
//! One [`Bus`] serves port I/O and another MMIO; both map non-overlapping address ranges
//! to devices. Every vCPU thread holds a clone of the bus (the clones share the devices
//! through `Arc`s), so a lookup must be cheap and must never panic the VMM: ranges are
//! kept in a `BTreeMap` keyed by their base address (O(log n) lookup), and a device whose
//! mutex was poisoned by a panicking thread keeps serving accesses.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

/// A device that answers reads and writes in an address range of a [`Bus`].
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes; the device fills `data`.
    ///
    /// `offset` is relative to the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// Handles a guest write of `data`.
    ///
    /// `offset` is relative to the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from placing a device on a [`Bus`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// A range must cover at least one address.
    #[error("Bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Base address of the rejected range.
        base: u64,
    },
    /// The range would run past the end of the 64-bit address space.
    #[error("Bus range at {base:#x} with length {len:#x} runs past the end of the address space")]
    Overflow {
        /// Base address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range shares at least one address with a range already on the bus.
    #[error(
        "Bus range {base:#x}..={last:#x} overlaps the range {other_base:#x}..={other_last:#x} already on the bus"
    )]
    Overlap {
        /// Base address of the rejected range.
        base: u64,
        /// Last address (inclusive) of the rejected range.
        last: u64,
        /// Base address of the range already on the bus.
        other_base: u64,
        /// Last address (inclusive) of the range already on the bus.
        other_last: u64,
    },
}

/// One device's range. `last` is inclusive so that a range may end at `u64::MAX`.
#[derive(Clone)]
struct BusRange {
    last: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Maps non-overlapping address ranges to devices.
///
/// Cloning a `Bus` is cheap and shares the devices; the VMM builds the bus once and
/// gives a clone to each vCPU thread.
#[derive(Default, Clone)]
pub struct Bus {
    /// Keyed by the base address of each range.
    ranges: BTreeMap<u64, BusRange>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|(base, range)| format!("{base:#x}..={:#x}", range.last)),
            )
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`.
    ///
    /// Fails if `len` is zero, if the range runs past `u64::MAX`, or if it overlaps a
    /// range already on the bus; the bus is unchanged then.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;

        // Ranges on the bus are disjoint, so if any of them overlaps the new one, the one
        // with the highest base at or below `last` does.
        if let Some((&other_base, other)) = self.ranges.range(..=last).next_back() {
            if other.last >= base {
                return Err(BusError::Overlap {
                    base,
                    last,
                    other_base,
                    other_last: other.last,
                });
            }
        }

        self.ranges.insert(base, BusRange { last, device });
        Ok(())
    }

    /// Reads `data.len()` bytes at `addr` from the device whose range contains `addr`.
    ///
    /// Returns `false` if no device is there; `data` is then filled with `0xff`, which is
    /// what a read from an unclaimed address returns on a PC.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock_device(device, addr).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes `data` at `addr` to the device whose range contains `addr`.
    ///
    /// Returns `false` (and drops the write) if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock_device(device, addr).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Finds the device whose range contains `addr`, with `addr`'s offset in that range.
    ///
    /// An access that starts inside a range belongs to that range even if it runs past
    /// its end; the device sees the full access size and decides what to do.
    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        (addr <= range.last).then(|| (addr - base, &range.device))
    }
}

/// Locks a device, recovering it if a thread panicked while holding the lock.
///
/// A panic in one device access must not take down every vCPU: the device state may be
/// inconsistent, but the guest only sees a misbehaving device. The poison flag is
/// cleared so the event is logged once.
fn lock_device(
    device: &Arc<Mutex<dyn BusDevice>>,
    addr: u64,
) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        log::error!("Bus device at {addr:#x} was poisoned by a panic; recovering its state");
        let guard = poisoned.into_inner();
        device.clear_poison();
        guard
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with the low byte of the offset.
    #[derive(Default)]
    struct Recorder {
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            data.fill(offset.to_le_bytes()[0]);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Bus>();
    }

    #[test]
    fn empty_bus_reads_all_ones() {
        let bus = Bus::new();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x3f8, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x3f8, &[1]));
    }

    #[test]
    fn lookup_edges() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();

        let mut data = [0u8; 1];
        // One before the start.
        assert!(!bus.read(0xff, &mut data));
        assert_eq!(data, [0xff]);
        // First byte.
        assert!(bus.read(0x100, &mut data));
        assert_eq!(data, [0x00]);
        // Last byte.
        assert!(bus.read(0x10f, &mut data));
        assert_eq!(data, [0x0f]);
        // One past the end.
        data = [0];
        assert!(!bus.read(0x110, &mut data));
        assert_eq!(data, [0xff]);

        assert!(bus.write(0x104, &[0xab, 0xcd]));
        assert!(!bus.write(0x110, &[0xee]));

        let dev = dev.lock().unwrap();
        assert_eq!(dev.reads, vec![(0x0, 1), (0xf, 1)]);
        assert_eq!(dev.writes, vec![(0x4, vec![0xab, 0xcd])]);
    }

    #[test]
    fn access_starting_inside_a_range_goes_to_it() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x100, 2).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x101, &mut data));
        assert_eq!(dev.lock().unwrap().reads, vec![(1, 4)]);
    }

    #[test]
    fn dispatches_to_the_right_device() {
        let mut bus = Bus::new();
        let a = recorder();
        let b = recorder();
        bus.insert(a.clone(), 0x60, 5).unwrap();
        bus.insert(b.clone(), 0x65, 1).unwrap();

        assert!(bus.write(0x64, &[0xfe]));
        assert!(bus.write(0x65, &[0x01]));

        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![0x01])]);
    }

    #[test]
    fn rejects_zero_length() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
    }

    #[test]
    fn range_may_end_at_the_top_of_the_address_space() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev, u64::MAX - 1, 2).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(u64::MAX, &mut data));
        assert_eq!(data, [1]);
    }

    #[test]
    fn rejects_overflow() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        let err = bus.insert(recorder(), 2, u64::MAX).unwrap_err();
        assert_eq!(
            err,
            BusError::Overflow {
                base: 2,
                len: u64::MAX
            }
        );
        assert_eq!(
            err.to_string(),
            "Bus range at 0x2 with length 0xffffffffffffffff runs past the end of the address space"
        );

        // 1..=u64::MAX fits exactly.
        bus.insert(recorder(), 1, u64::MAX).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(u64::MAX, &mut data));
        assert!(!bus.read(0, &mut data));
    }

    #[test]
    fn largest_range_from_zero_stops_before_the_top() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0, u64::MAX).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(u64::MAX - 1, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
        // The top byte is still free.
        bus.insert(recorder(), u64::MAX, 1).unwrap();
    }

    #[test]
    fn rejects_overlaps_and_names_both_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();

        // Ends on the first byte of the existing range.
        let err = bus.insert(recorder(), 0xf0, 0x11).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap {
                base: 0xf0,
                last: 0x100,
                other_base: 0x100,
                other_last: 0x10f
            }
        );
        assert_eq!(
            err.to_string(),
            "Bus range 0xf0..=0x100 overlaps the range 0x100..=0x10f already on the bus"
        );
        // Starts on the last byte.
        assert!(bus.insert(recorder(), 0x10f, 1).is_err());
        // Inside.
        assert!(bus.insert(recorder(), 0x104, 2).is_err());
        // Covers it entirely.
        assert!(bus.insert(recorder(), 0x0, 0x1000).is_err());
        // Same base.
        assert!(bus.insert(recorder(), 0x100, 1).is_err());

        // Adjacent on both sides is fine.
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
        bus.insert(recorder(), 0x110, 0x10).unwrap();
        // A range spanning a gap but hitting a later range is rejected.
        assert!(bus.insert(recorder(), 0x0, 0xf1).is_err());
    }

    #[test]
    fn failed_insert_leaves_the_bus_unchanged() {
        let mut bus = Bus::new();
        let first = recorder();
        bus.insert(first.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(recorder(), 0x100, 0x10).is_err());
        assert!(bus.write(0x100, &[7]));
        assert_eq!(first.lock().unwrap().writes, vec![(0, vec![7])]);
    }

    #[test]
    fn clones_share_devices() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x10, 1).unwrap();
        let clone = bus.clone();
        assert!(clone.write(0x10, &[3]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![3])]);
    }

    #[test]
    fn poisoned_device_keeps_working() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x10, 1).unwrap();

        let poisoner = dev.clone();
        let result = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("device panicked while locked");
        })
        .join();
        assert!(result.is_err());
        assert!(dev.is_poisoned());

        let mut data = [0u8; 1];
        assert!(bus.read(0x10, &mut data));
        assert_eq!(data, [0]);
        assert!(bus.write(0x10, &[9]));
        assert!(!dev.is_poisoned());
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![9])]);
    }
}
