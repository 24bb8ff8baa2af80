//! One token bucket: a budget that refills linearly with time, plus an optional one-time
//! burst that never refills.
//!
//! Time is passed in explicitly (nanoseconds on a monotonic clock) so the arithmetic can
//! be tested without waiting; [`super::RateLimiter`] reads the clock.

use super::TokenBucketConfig;

const NS_PER_MS: u128 = 1_000_000;

/// A token bucket holding up to `size` tokens, refilled at `size` tokens per
/// `refill_time` milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    /// Tokens left of the initial burst; spent before the budget and never refilled.
    one_time_burst: u64,
    refill_time_ms: u64,
    budget: u64,
    /// Time up to which refill has been credited to `budget`.
    last_update_ns: u64,
}

impl TokenBucket {
    /// A full bucket as `cfg` describes it, created at `now_ns`; `None` when `cfg`
    /// disables the bucket (size or refill_time 0).
    pub fn new(cfg: &TokenBucketConfig, now_ns: u64) -> Option<Self> {
        if cfg.size == 0 || cfg.refill_time == 0 {
            return None;
        }
        Some(Self {
            size: cfg.size,
            one_time_burst: cfg.one_time_burst,
            refill_time_ms: cfg.refill_time,
            budget: cfg.size,
            last_update_ns: now_ns,
        })
    }

    /// Capacity of the bucket.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Tokens in the budget (excluding what is left of the one-time burst).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Tokens left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * NS_PER_MS
    }

    /// Credits the budget with the tokens earned since the last update.
    fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_update_ns);
        if self.budget >= self.size {
            // Time spent full earns nothing.
            self.last_update_ns = now_ns;
            return;
        }
        let earned = u128::from(elapsed) * u128::from(self.size) / self.refill_ns();
        let missing = self.size - self.budget;
        if earned >= u128::from(missing) {
            self.budget = self.size;
            self.last_update_ns = now_ns;
        } else {
            // `earned < missing`, so it fits in a u64. Only the time that produced whole
            // tokens is consumed: the remainder keeps counting towards the next one.
            let earned = u64::try_from(earned).unwrap_or(missing);
            self.budget += earned;
            // `earned * refill_ns <= elapsed * size < 2^128`, and `spent <= elapsed`.
            let spent = u128::from(earned) * self.refill_ns() / u128::from(self.size);
            self.last_update_ns += u64::try_from(spent).unwrap_or(elapsed);
        }
    }

    /// Takes `tokens` at `now_ns`, from the one-time burst first. A request larger than
    /// the bucket can never fit, so it is admitted when the bucket is full and empties
    /// it: large requests are slowed, never starved.
    pub fn consume(&mut self, tokens: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        if tokens <= self.one_time_burst.saturating_add(self.budget) {
            let from_burst = tokens.min(self.one_time_burst);
            self.one_time_burst -= from_burst;
            self.budget -= tokens - from_burst;
            true
        } else if tokens > self.size && self.budget == self.size {
            self.one_time_burst = 0;
            self.budget = 0;
            true
        } else {
            false
        }
    }

    /// Nanoseconds from `now_ns` until a failed `consume(tokens)` would succeed, assuming
    /// nothing else consumes meanwhile. Call right after the failed `consume`.
    pub fn wait_ns(&self, tokens: u64, now_ns: u64) -> u64 {
        let target = if tokens > self.size {
            self.size
        } else {
            tokens.saturating_sub(self.one_time_burst)
        };
        let needed = target.saturating_sub(self.budget);
        if needed == 0 {
            return 0;
        }
        let Some(product) = u128::from(needed).checked_mul(self.refill_ns()) else {
            return u64::MAX;
        };
        let total = product.div_ceil(u128::from(self.size));
        let accrued = u128::from(now_ns.saturating_sub(self.last_update_ns));
        u64::try_from(total.saturating_sub(accrued)).unwrap_or(u64::MAX)
    }

    /// Gives back `tokens` (capped at the bucket's size).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn bucket(size: u64, burst: u64, refill_time: u64) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size,
                one_time_burst: burst,
                refill_time,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn disabled_configs_make_no_bucket() {
        let cfg = |size, refill_time| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time,
        };
        assert!(TokenBucket::new(&cfg(0, 0), 0).is_none());
        assert!(TokenBucket::new(&cfg(0, 10), 0).is_none());
        assert!(TokenBucket::new(&cfg(10, 0), 0).is_none());
        assert!(TokenBucket::new(&cfg(10, 10), 0).is_some());
    }

    #[test]
    fn refills_in_proportion_to_elapsed_time() {
        // 1000 tokens per 100 ms: 10 tokens per ms.
        let mut b = bucket(1000, 0, 100);
        assert!(b.consume(1000, 0));
        assert!(!b.consume(1, 0));
        assert!(!b.consume(11, MS), "only 10 tokens after 1 ms");
        assert!(b.consume(10, MS));
        assert_eq!(b.budget(), 0);
        assert!(b.consume(500, 51 * MS));
        assert!(!b.consume(1, 51 * MS));
        // Never more than `size`, however long it waits.
        assert!(!b.consume(1001, 10_000 * MS) || b.budget() == 0);
        let mut b = bucket(1000, 0, 100);
        assert!(b.consume(1, 0));
        b.refill(10_000 * MS);
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn fractional_refill_is_not_lost() {
        // 1 token per 3 ms; polling every ms must still earn a token every 3 ms.
        let mut b = bucket(1, 0, 3);
        assert!(b.consume(1, 0));
        assert!(!b.consume(1, MS));
        assert!(!b.consume(1, 2 * MS));
        assert!(b.consume(1, 3 * MS));
    }

    #[test]
    fn one_time_burst_is_spent_once() {
        let mut b = bucket(100, 50, 1000);
        assert!(b.consume(150, 0), "burst plus budget");
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.budget(), 0);
        b.refill(10_000 * MS);
        assert_eq!(b.one_time_burst(), 0, "the burst never refills");
        assert!(b.consume(100, 10_000 * MS));
        assert!(!b.consume(1, 10_000 * MS));
        // The burst is spent before the budget.
        let mut b = bucket(100, 50, 1000);
        assert!(b.consume(30, 0));
        assert_eq!((b.one_time_burst(), b.budget()), (20, 100));
    }

    #[test]
    fn larger_than_bucket_is_admitted_only_when_full() {
        let mut b = bucket(100, 0, 100);
        assert!(b.consume(1, 0));
        assert!(!b.consume(500, 0), "not full");
        assert_eq!(b.wait_ns(500, 0), MS, "one token short of full");
        assert!(b.consume(500, MS), "full again after 1 ms");
        assert_eq!(b.budget(), 0);
        assert!(!b.consume(1, MS));
    }

    #[test]
    fn wait_ns_says_when_tokens_will_be_there() {
        // 10 tokens per ms.
        let mut b = bucket(1000, 0, 100);
        assert!(b.consume(1000, 0));
        assert!(!b.consume(25, 0));
        let wait = b.wait_ns(25, 0);
        assert_eq!(wait, 2_500_000);
        assert!(!b.consume(25, wait - 1));
        assert!(b.consume(25, wait));
    }

    #[test]
    fn replenish_gives_tokens_back_up_to_size() {
        let mut b = bucket(10, 0, 1000);
        assert!(b.consume(10, 0));
        b.replenish(4);
        assert_eq!(b.budget(), 4);
        b.replenish(100);
        assert_eq!(b.budget(), 10);
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let mut b = bucket(u64::MAX, u64::MAX, u64::MAX);
        assert!(b.consume(u64::MAX, 0));
        assert!(b.consume(u64::MAX, 0));
        assert!(!b.consume(u64::MAX, u64::MAX));
        assert!(b.wait_ns(u64::MAX, u64::MAX) > 0);
        b.replenish(u64::MAX);
        assert_eq!(b.budget(), u64::MAX);
    }
}
