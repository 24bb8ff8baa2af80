//! Quotas: token buckets for a tenant's request rate and its accelerator time.
//!
//! Both are checked when a request is submitted, so an over-limit request gets
//! THROTTLED at once instead of waiting in a queue. The request bucket is debited one
//! token per admitted request; the accelerator bucket is debited by the accelerator
//! time a tenant actually used, when a batch completes, and may go into debt (a long
//! batch is paid for afterwards by a longer refusal).

use crate::{Nanos, TenantPolicy};

const NS_PER_S: f64 = 1e9;

/// Largest rate kept as given; anything above (including +∞) counts as this.
const MAX_RATE: f64 = 1e18;

/// A token bucket on the scheduler clock: `rate` tokens per second, at most `depth`.
///
/// It starts full at the first time it is used. The level may be negative after
/// [`TokenBucket::charge`] (debt); a bucket in debt admits nothing until refilled.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    rate_per_ns: f64,
    depth: f64,
    level: f64,
    updated: Option<Nanos>,
}

/// A rate or depth as the bucket uses it: NaN and negatives are 0, huge values capped.
fn sane(value: f64) -> f64 {
    if value.is_nan() || value <= 0.0 {
        0.0
    } else {
        value.min(MAX_RATE)
    }
}

impl TokenBucket {
    /// A full bucket refilled at `rate_per_s` tokens per second and holding at most
    /// `depth`. Invalid values (NaN, negative) count as 0, so the bucket admits nothing
    /// rather than everything.
    pub fn new(rate_per_s: f64, depth: f64) -> Self {
        let depth = sane(depth);
        Self {
            rate_per_ns: sane(rate_per_s) / NS_PER_S,
            depth,
            level: depth,
            updated: None,
        }
    }

    /// Tokens added per second.
    pub fn rate_per_s(&self) -> f64 {
        self.rate_per_ns * NS_PER_S
    }

    /// Most tokens the bucket holds.
    pub fn depth(&self) -> f64 {
        self.depth
    }

    /// Changes rate and depth, keeping the tokens (at most the new depth).
    pub fn reconfigure(&mut self, rate_per_s: f64, depth: f64) {
        self.rate_per_ns = sane(rate_per_s) / NS_PER_S;
        self.depth = sane(depth);
        self.level = self.level.min(self.depth);
    }

    /// Tokens available at `now` (negative while in debt).
    pub fn level(&mut self, now: Nanos) -> f64 {
        self.refill(now);
        self.level
    }

    /// Whether `amount` tokens are available at `now`, without taking them.
    pub fn has(&mut self, now: Nanos, amount: f64) -> bool {
        self.level(now) >= amount
    }

    /// Takes `amount` tokens if available; `false` (and nothing taken) otherwise.
    pub fn try_take(&mut self, now: Nanos, amount: f64) -> bool {
        if self.has(now, amount) {
            self.level -= amount;
            true
        } else {
            false
        }
    }

    /// Takes `amount` tokens unconditionally; the level may go negative.
    pub fn charge(&mut self, now: Nanos, amount: f64) {
        self.refill(now);
        self.level -= sane(amount);
    }

    fn refill(&mut self, now: Nanos) {
        let Some(updated) = self.updated else {
            self.updated = Some(now);
            return;
        };
        // Callers may pass slightly out-of-order times from different threads; time
        // never runs backwards for the bucket.
        if now > updated {
            let added = (now - updated) as f64 * self.rate_per_ns;
            self.level = (self.level + added).min(self.depth);
            self.updated = Some(now);
        }
    }
}

/// A tenant's two quotas; `None` is unlimited.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantQuota {
    /// Requests per second, depth `burst` requests.
    requests: Option<TokenBucket>,
    /// Accelerator nanoseconds per second, depth `accel_burst` seconds.
    accel_ns: Option<TokenBucket>,
}

impl TenantQuota {
    /// The buckets `policy` asks for, full.
    pub fn new(policy: &TenantPolicy) -> Self {
        Self {
            requests: policy
                .rate_rps
                .map(|rate| TokenBucket::new(rate, f64::from(policy.burst))),
            accel_ns: policy.accel_share.map(|share| {
                TokenBucket::new(share * NS_PER_S, sane(policy.accel_burst) * NS_PER_S)
            }),
        }
    }

    /// Applies a changed policy, keeping what the buckets hold (hot reconfiguration).
    pub fn reconfigure(&mut self, policy: &TenantPolicy) {
        let fresh = Self::new(policy);
        self.requests = match (self.requests.take(), fresh.requests) {
            (Some(mut old), Some(new)) => {
                old.reconfigure(new.rate_per_s(), new.depth());
                Some(old)
            }
            (_, new) => new,
        };
        self.accel_ns = match (self.accel_ns.take(), fresh.accel_ns) {
            (Some(mut old), Some(new)) => {
                old.reconfigure(new.rate_per_s(), new.depth());
                Some(old)
            }
            (_, new) => new,
        };
    }

    /// Whether a request may be admitted at `now`: a request token is available and
    /// the accelerator bucket is not empty or in debt. Takes nothing.
    pub fn admits(&mut self, now: Nanos) -> bool {
        let requests_ok = self.requests.as_mut().is_none_or(|b| b.has(now, 1.0));
        let accel_ok = self.accel_ns.as_mut().is_none_or(|b| b.level(now) > 0.0);
        requests_ok && accel_ok
    }

    /// Takes the request token of an admitted request.
    pub fn take_request(&mut self, now: Nanos) {
        if let Some(bucket) = self.requests.as_mut() {
            bucket.charge(now, 1.0);
        }
    }

    /// Charges accelerator time the tenant used.
    pub fn charge_accel(&mut self, now: Nanos, ns: Nanos) {
        if let Some(bucket) = self.accel_ns.as_mut() {
            bucket.charge(now, ns as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    #[test]
    fn bucket_starts_full_and_refuses_beyond_its_depth() {
        let mut b = TokenBucket::new(10.0, 5.0);
        for _ in 0..5 {
            assert!(b.try_take(0, 1.0));
        }
        assert!(!b.try_take(0, 1.0));
        assert!(!b.try_take(MS, 1.0), "1 ms refills only 0.01 token");
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(10.0, 5.0);
        for _ in 0..5 {
            assert!(b.try_take(0, 1.0));
        }
        assert!(!b.try_take(99 * MS, 1.0), "0.99 token after 99 ms");
        assert!(b.try_take(100 * MS, 1.0), "one token after 100 ms");
        assert!(!b.try_take(100 * MS, 1.0));
        // Over 1 s at 10/s exactly 10 more requests pass.
        let mut taken = 0;
        for t in (101..=1100).map(|ms| ms * MS) {
            if b.try_take(t, 1.0) {
                taken += 1;
            }
        }
        assert_eq!(taken, 10);
    }

    #[test]
    fn bucket_caps_refill_at_depth_after_idling() {
        let mut b = TokenBucket::new(10.0, 5.0);
        assert!(b.try_take(0, 5.0));
        assert!((b.level(3_600_000 * MS) - 5.0).abs() < 1e-9);
        assert!(b.try_take(3_600_000 * MS, 5.0));
        assert!(!b.try_take(3_600_000 * MS, 1.0));
    }

    #[test]
    fn bucket_debt_delays_admission() {
        let mut b = TokenBucket::new(1.0, 1.0);
        b.charge(0, 3.0);
        assert!((b.level(0) + 2.0).abs() < 1e-9);
        assert!(!b.has(2_000 * MS, 1.0), "still at 0 after 2 s");
        assert!(b.has(3_000 * MS, 1.0));
    }

    #[test]
    fn bucket_treats_invalid_rates_as_zero() {
        for bad in [f64::NAN, -1.0, 0.0] {
            let mut b = TokenBucket::new(bad, 1.0);
            assert!(b.try_take(0, 1.0));
            assert!(
                !b.try_take(1_000_000 * MS, 1.0),
                "rate {bad} must not refill"
            );
        }
        let mut b = TokenBucket::new(f64::INFINITY, 2.0);
        assert!(b.try_take(0, 2.0));
        assert!(b.try_take(1, 2.0), "an infinite rate refills at once");
    }

    #[test]
    fn bucket_ignores_time_going_backwards() {
        let mut b = TokenBucket::new(10.0, 1.0);
        assert!(b.try_take(1_000 * MS, 1.0));
        assert!(!b.try_take(500 * MS, 1.0));
        assert!(!b.try_take(1_050 * MS, 1.0));
        assert!(b.try_take(1_100 * MS, 1.0));
    }

    #[test]
    fn reconfigure_keeps_tokens_up_to_the_new_depth() {
        let mut b = TokenBucket::new(10.0, 10.0);
        assert!(b.try_take(0, 2.0));
        b.reconfigure(1.0, 4.0);
        assert!((b.level(0) - 4.0).abs() < 1e-9);
        assert!((b.rate_per_s() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn accelerator_quota_admits_until_in_debt() {
        let policy = TenantPolicy {
            accel_share: Some(0.5),
            accel_burst: 0.01,
            ..TenantPolicy::default()
        };
        let mut q = TenantQuota::new(&policy);
        assert!(q.admits(0));
        q.charge_accel(0, 30 * MS);
        assert!(!q.admits(0), "20 ms in debt");
        assert!(!q.admits(40 * MS), "refilled 20 ms: level 0 is not > 0");
        assert!(q.admits(41 * MS));
    }

    #[test]
    fn request_quota_counts_admitted_requests() {
        let policy = TenantPolicy {
            rate_rps: Some(2.0),
            burst: 2,
            ..TenantPolicy::default()
        };
        let mut q = TenantQuota::new(&policy);
        assert!(q.admits(0));
        q.take_request(0);
        assert!(q.admits(0));
        q.take_request(0);
        assert!(!q.admits(0));
        assert!(q.admits(500 * MS));
    }
}
