//! The TRACE payload: one tenant's device-side counters and latency histogram.

use crate::consts::{LATENCY_BUCKETS, STATUS_SLOTS, TRACE_COUNTERS_LEN};
use crate::error::ProtocolError;
use crate::status::Status;
use crate::wire::{Reader, Writer};

/// Index of the latency bucket for a device-side latency of `ns` nanoseconds.
///
/// Buckets are fixed log2 ranges of whole microseconds, so guest and host can merge
/// or compare histograms without exchanging bucket bounds: bucket 0 holds latencies
/// under 1 µs, bucket `i` (1..=30) holds `2^(i-1) µs <= latency < 2^i µs`, and bucket
/// 31 everything from 2^30 µs (about 18 minutes) up.
pub fn latency_bucket(ns: u64) -> usize {
    let us = ns / 1000;
    if us == 0 {
        return 0;
    }
    let log2_plus_one = (u64::BITS - us.leading_zeros()) as usize;
    log2_plus_one.min(LATENCY_BUCKETS - 1)
}

/// Lower bound (inclusive) and upper bound (exclusive, `None` = unbounded) of a
/// bucket, in nanoseconds.
pub fn latency_bucket_bounds_ns(bucket: usize) -> (u64, Option<u64>) {
    let us_to_ns = |us: u64| us * 1000;
    match bucket {
        0 => (0, Some(1000)),
        b if b < LATENCY_BUCKETS - 1 => (us_to_ns(1 << (b - 1)), Some(us_to_ns(1 << b))),
        _ => (us_to_ns(1 << (LATENCY_BUCKETS - 2)), None),
    }
}

/// Device-side counters of one tenant (the 464-byte TRACE payload).
///
/// Counters start at zero when the daemon accepts the tenant's vhost-user connection
/// and survive virtio device resets; they only ever describe this tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TraceCounters {
    /// Nanoseconds since the counters started.
    pub uptime_ns: u64,
    /// Chains completed, all opcodes (excluding the TRACE reporting them).
    pub completed: u64,
    /// INFER requests taken from the queues and not yet completed.
    pub in_flight: u64,
    /// Highest `in_flight` seen.
    pub in_flight_max: u64,
    /// Input bytes of INFER requests completed OK.
    pub bytes_in: u64,
    /// Output bytes written by INFER requests completed OK.
    pub bytes_out: u64,
    /// Sum of `queue_ns` over INFER requests completed OK.
    pub queue_ns_total: u64,
    /// Sum of `compute_ns` over INFER requests completed OK.
    pub compute_ns_total: u64,
    /// INFER requests whose priority was lowered to the tenant's ceiling.
    pub priority_clamped: u64,
    /// INFER requests completed OK that ran in a batch of more than one request.
    pub batched: u64,
    /// INFER completions per status code (index = status value).
    pub infer_status: [u64; STATUS_SLOTS],
    /// Histogram of `queue_ns + compute_ns` of INFER requests completed OK, bucketed
    /// by [`latency_bucket`].
    pub latency_hist: [u64; LATENCY_BUCKETS],
}

impl TraceCounters {
    /// Size on the wire.
    pub const LEN: usize = TRACE_COUNTERS_LEN;

    /// Accounts one INFER completion (a device-side helper, so every device counts
    /// the same way).
    pub fn record_infer(
        &mut self,
        status: Status,
        queue_ns: u64,
        compute_ns: u64,
        batch_size: u32,
    ) {
        let slot = &mut self.infer_status[status as usize];
        *slot = slot.wrapping_add(1);
        if status == Status::Ok {
            self.queue_ns_total = self.queue_ns_total.wrapping_add(queue_ns);
            self.compute_ns_total = self.compute_ns_total.wrapping_add(compute_ns);
            let bucket = latency_bucket(queue_ns.saturating_add(compute_ns));
            self.latency_hist[bucket] = self.latency_hist[bucket].wrapping_add(1);
            if batch_size > 1 {
                self.batched = self.batched.wrapping_add(1);
            }
        }
    }

    /// Writes the 464-byte wire form; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut w = Writer::new(buf, "trace counters", Self::LEN)?;
        for v in self.scalars() {
            w.u64(v)?;
        }
        for v in self.infer_status.iter().chain(&self.latency_hist) {
            w.u64(*v)?;
        }
        Ok(w.position())
    }

    /// Reads the first 464 bytes of `buf`. Every value is a valid counter, so only
    /// the length can be wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "trace counters", Self::LEN)?;
        let mut t = TraceCounters {
            uptime_ns: r.u64()?,
            completed: r.u64()?,
            in_flight: r.u64()?,
            in_flight_max: r.u64()?,
            bytes_in: r.u64()?,
            bytes_out: r.u64()?,
            queue_ns_total: r.u64()?,
            compute_ns_total: r.u64()?,
            priority_clamped: r.u64()?,
            batched: r.u64()?,
            ..TraceCounters::default()
        };
        for slot in t.infer_status.iter_mut().chain(t.latency_hist.iter_mut()) {
            *slot = r.u64()?;
        }
        Ok(t)
    }

    /// The scalar counters in wire order.
    fn scalars(&self) -> [u64; 10] {
        [
            self.uptime_ns,
            self.completed,
            self.in_flight,
            self.in_flight_max,
            self.bytes_in,
            self.bytes_out,
            self.queue_ns_total,
            self.compute_ns_total,
            self.priority_clamped,
            self.batched,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TraceCounters {
        let mut t = TraceCounters {
            uptime_ns: 1,
            completed: 2,
            in_flight: 3,
            in_flight_max: 4,
            bytes_in: 5,
            bytes_out: 6,
            queue_ns_total: 7,
            compute_ns_total: 8,
            priority_clamped: 9,
            batched: 10,
            ..TraceCounters::default()
        };
        for (i, s) in t.infer_status.iter_mut().enumerate() {
            *s = 100 + i as u64;
        }
        for (i, s) in t.latency_hist.iter_mut().enumerate() {
            *s = 1000 + i as u64;
        }
        t
    }

    #[test]
    fn round_trip_and_layout() {
        let t = sample();
        let mut b = [0u8; TraceCounters::LEN];
        assert_eq!(t.encode(&mut b), Ok(464));
        assert_eq!(TraceCounters::decode(&b), Ok(t));
        let at = |off: usize| u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
        assert_eq!(at(0x00), 1, "uptime_ns");
        assert_eq!(at(0x48), 10, "batched");
        assert_eq!(at(0x50), 100, "infer_status[OK]");
        assert_eq!(at(0x50 + 8 * 15), 115, "infer_status[15]");
        assert_eq!(at(0xd0), 1000, "latency_hist[0]");
        assert_eq!(at(0x1c8), 1031, "latency_hist[31]");
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let b = [0u8; TraceCounters::LEN];
        for len in 0..TraceCounters::LEN {
            assert_eq!(
                TraceCounters::decode(&b[..len]),
                Err(ProtocolError::Truncated {
                    what: "trace counters",
                    needed: 464,
                    got: len
                })
            );
        }
        let mut small = [0u8; 463];
        assert!(matches!(
            sample().encode(&mut small),
            Err(ProtocolError::BufferTooSmall {
                needed: 464,
                got: 463,
                ..
            })
        ));
    }

    #[test]
    fn bucket_boundaries() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(999), 0);
        assert_eq!(latency_bucket(1_000), 1);
        assert_eq!(latency_bucket(1_999), 1);
        assert_eq!(latency_bucket(2_000), 2);
        assert_eq!(latency_bucket(3_999), 2);
        assert_eq!(latency_bucket(4_000), 3);
        assert_eq!(latency_bucket(10_000), 4); // 10 µs in [8, 16)
        assert_eq!(latency_bucket(50_000), 6); // 50 µs in [32, 64)
        assert_eq!(latency_bucket(1_000_000), 10); // 1 ms in [512, 1024) µs
        assert_eq!(latency_bucket((1 << 29) * 1000), 30);
        assert_eq!(latency_bucket((1 << 30) * 1000 - 1), 30);
        assert_eq!(latency_bucket((1 << 30) * 1000), 31);
        assert_eq!(latency_bucket(u64::MAX), 31);
        for b in 0..LATENCY_BUCKETS {
            let (lo, hi) = latency_bucket_bounds_ns(b);
            assert_eq!(latency_bucket(lo), b, "lower bound of {b}");
            if let Some(hi) = hi {
                assert_eq!(latency_bucket(hi - 1), b, "upper bound of {b}");
                assert_eq!(latency_bucket(hi), b + 1);
            }
        }
        assert_eq!(latency_bucket_bounds_ns(31).1, None);
    }

    #[test]
    fn record_infer_counts_ok_latency_only() {
        let mut t = TraceCounters::default();
        t.record_infer(Status::Ok, 3_000, 7_000, 1);
        t.record_infer(Status::Ok, 0, 500, 4);
        t.record_infer(Status::BadTensor, 2_000, 0, 0);
        assert_eq!(t.infer_status[0], 2);
        assert_eq!(t.infer_status[Status::BadTensor as usize], 1);
        assert_eq!(t.queue_ns_total, 3_000);
        assert_eq!(t.compute_ns_total, 7_500);
        assert_eq!(t.batched, 1);
        assert_eq!(t.latency_hist[4], 1); // 10 µs
        assert_eq!(t.latency_hist[0], 1); // 0.5 µs
        assert_eq!(t.latency_hist.iter().sum::<u64>(), 2);
    }
}
