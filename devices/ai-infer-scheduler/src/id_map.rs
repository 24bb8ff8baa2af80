//! Hash maps keyed by the daemon's own small integer ids (tenants, models,
//! executors), with a multiplicative hash instead of SipHash.
//!
//! SipHash resists keys chosen by an attacker; these keys are numbered by the daemon
//! and the operator, never by a guest, so the scheduler's hot path does not need to
//! pay for that (lookups were about 40% of the decision time).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by a daemon-assigned id.
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of the integers written into it.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(MULTIPLIER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_small_ids_spread_over_the_high_bits() {
        let hash = |i: u32| {
            let mut h = IdHasher::default();
            h.write_u32(i);
            h.finish()
        };
        let top7: std::collections::HashSet<u64> = (0..64).map(|i| hash(i) >> 57).collect();
        assert!(
            top7.len() > 40,
            "only {} distinct top-7-bit groups",
            top7.len()
        );
        let mut map: IdMap<u32, u32> = IdMap::default();
        for i in 0..1000 {
            map.insert(i, i * 2);
        }
        assert!((0..1000).all(|i| map.get(&i) == Some(&(i * 2))));
    }
}
