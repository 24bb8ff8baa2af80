//! Guest-side counters: what the agent submitted and saw, and how long requests took
//! from submission to the completion being noticed (which the device's own TRACE
//! timings do not include: notification, polling and back-off).
//!
//! Latency buckets are the protocol's log2 microsecond buckets, so this histogram can
//! be compared bucket for bucket with the device's.

use std::sync::atomic::{AtomicU64, Ordering};

use ai_infer_protocol::{latency_bucket, Status, LATENCY_BUCKETS, STATUS_SLOTS};

use crate::backoff::BackoffStep;

/// Live counters, updated without locks.
#[derive(Debug, Default)]
pub struct GuestStats {
    submitted: AtomicU64,
    completed: AtomicU64,
    by_status: [AtomicU64; STATUS_SLOTS],
    driver_errors: AtomicU64,
    device_resets: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    spins: AtomicU64,
    yields: AtomicU64,
    sleeps: AtomicU64,
    latency_hist: [AtomicU64; LATENCY_BUCKETS],
}

/// A snapshot of [`GuestStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestTrace {
    /// INFER requests made available to the device.
    pub submitted: u64,
    /// INFER requests whose completion was seen (any status).
    pub completed: u64,
    /// Completions by status code.
    pub by_status: [u64; STATUS_SLOTS],
    /// Requests that failed in the driver (bad device response, lost by a reset).
    pub driver_errors: u64,
    /// Device resets done by the driver.
    pub device_resets: u64,
    /// Input bytes of INFER requests completed OK.
    pub bytes_in: u64,
    /// Output bytes of INFER requests completed OK.
    pub bytes_out: u64,
    /// Polling steps spent spinning, yielding and sleeping.
    pub spins: u64,
    /// See `spins`.
    pub yields: u64,
    /// See `spins`.
    pub sleeps: u64,
    /// INFER completed OK by submit-to-seen latency, protocol buckets.
    pub latency_hist: [u64; LATENCY_BUCKETS],
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl GuestStats {
    /// An INFER request was submitted.
    pub fn submitted(&self) {
        add(&self.submitted, 1);
    }

    /// An INFER completion was seen after `latency_ns`.
    pub fn completed(&self, status: Status, latency_ns: u64, bytes_in: u64, bytes_out: u64) {
        add(&self.completed, 1);
        add(&self.by_status[status as usize], 1);
        if status == Status::Ok {
            add(&self.bytes_in, bytes_in);
            add(&self.bytes_out, bytes_out);
            add(&self.latency_hist[latency_bucket(latency_ns)], 1);
        }
    }

    /// A request failed inside the driver.
    pub fn driver_error(&self) {
        add(&self.driver_errors, 1);
    }

    /// The driver reset the device.
    pub fn device_reset(&self) {
        add(&self.device_resets, 1);
    }

    /// One polling step.
    pub fn backoff(&self, step: BackoffStep) {
        match step {
            BackoffStep::Spin => add(&self.spins, 1),
            BackoffStep::Yield => add(&self.yields, 1),
            BackoffStep::Sleep(_) => add(&self.sleeps, 1),
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> GuestTrace {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GuestTrace {
            submitted: get(&self.submitted),
            completed: get(&self.completed),
            by_status: std::array::from_fn(|i| get(&self.by_status[i])),
            driver_errors: get(&self.driver_errors),
            device_resets: get(&self.device_resets),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            spins: get(&self.spins),
            yields: get(&self.yields),
            sleeps: get(&self.sleeps),
            latency_hist: std::array::from_fn(|i| get(&self.latency_hist[i])),
        }
    }
}

impl GuestTrace {
    /// Number of values in [`GuestTrace::to_words`].
    pub const WORDS: usize = 10 + STATUS_SLOTS + LATENCY_BUCKETS;

    /// All counters in a fixed order (scalars as declared, then statuses, then
    /// buckets): the form sent over the daemon socket and to C.
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        let mut out = [0u64; Self::WORDS];
        let scalars = [
            self.submitted,
            self.completed,
            self.driver_errors,
            self.device_resets,
            self.bytes_in,
            self.bytes_out,
            self.spins,
            self.yields,
            self.sleeps,
            0,
        ];
        let all = scalars
            .iter()
            .chain(&self.by_status)
            .chain(&self.latency_hist);
        for (slot, v) in out.iter_mut().zip(all) {
            *slot = *v;
        }
        out
    }

    /// The inverse of [`GuestTrace::to_words`].
    pub fn from_words(w: &[u64; Self::WORDS]) -> Self {
        GuestTrace {
            submitted: w[0],
            completed: w[1],
            driver_errors: w[2],
            device_resets: w[3],
            bytes_in: w[4],
            bytes_out: w[5],
            spins: w[6],
            yields: w[7],
            sleeps: w[8],
            by_status: std::array::from_fn(|i| w[10 + i]),
            latency_hist: std::array::from_fn(|i| w[10 + STATUS_SLOTS + i]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_and_buckets() {
        let s = GuestStats::default();
        s.submitted();
        s.submitted();
        s.completed(Status::Ok, 1_500_000, 16, 8); // 1500 µs: bucket 11 (1024..2048)
        s.completed(Status::Deadline, 10, 99, 99);
        s.backoff(BackoffStep::Spin);
        s.backoff(BackoffStep::Sleep(Duration::from_micros(5)));
        s.device_reset();
        let t = s.snapshot();
        assert_eq!((t.submitted, t.completed), (2, 2));
        assert_eq!(t.by_status[0], 1);
        assert_eq!(t.by_status[Status::Deadline as usize], 1);
        assert_eq!((t.bytes_in, t.bytes_out), (16, 8));
        assert_eq!(t.latency_hist[11], 1);
        assert_eq!(t.latency_hist.iter().sum::<u64>(), 1);
        assert_eq!((t.spins, t.yields, t.sleeps, t.device_resets), (1, 0, 1, 1));
        assert_eq!(GuestTrace::from_words(&t.to_words()), t);
    }
}
