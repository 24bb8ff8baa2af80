//! Token-bucket rate limiting for device I/O (bytes and operations).
//!
//! A [`RateLimiter`] holds up to two [`TokenBucket`]s, one counting bytes and one counting
//! operations. A device asks it before each request; when a bucket is short, the limiter
//! becomes blocked and arms a timer for when the tokens will be there. The device stops
//! serving, watches the limiter's fd (the timer) in its worker's epoll, and on wake-up
//! calls [`RateLimiter::event_handler`] and tries again. The semantics follow Firecracker's.

mod bucket;

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(test)]
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

pub use bucket::TokenBucket;

/// The shortest wait the timer is armed for: finer timers only cost wake-ups.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Errors of rate-limiter configuration and of its timer.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket of size 0 that is supposed to refill.
    #[error("Bucket `{bucket}` has size 0 with refill_time {refill_time} ms: it would never hold a token (use size 0 and refill_time 0 for no limit)")]
    ZeroSize {
        /// `bandwidth` or `ops`.
        bucket: &'static str,
        /// The configured refill time.
        refill_time: u64,
    },
    /// A bucket with tokens that never refills.
    #[error("Bucket `{bucket}` has size {size} with refill_time 0: it would never refill (use size 0 and refill_time 0 for no limit)")]
    ZeroRefillTime {
        /// `bandwidth` or `ops`.
        bucket: &'static str,
        /// The configured size.
        size: u64,
    },
    /// A one-time burst on a bucket that is disabled.
    #[error("Bucket `{bucket}` has one_time_burst {one_time_burst} but no size or refill_time: a burst needs a bucket")]
    BurstWithoutBucket {
        /// `bandwidth` or `ops`.
        bucket: &'static str,
        /// The configured burst.
        one_time_burst: u64,
    },
    /// Reading the timer failed.
    #[error("Cannot read the rate limiter's timer: {0}")]
    Timer(#[source] io::Error),
}

/// One bucket's configuration. `size` 0 with `refill_time` 0 means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at start, spent before the budget.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    fn is_disabled(&self) -> bool {
        self.size == 0 && self.refill_time == 0
    }

    fn validate(&self, bucket: &'static str) -> Result<(), RateLimiterError> {
        if self.is_disabled() {
            if self.one_time_burst != 0 {
                return Err(RateLimiterError::BurstWithoutBucket {
                    bucket,
                    one_time_burst: self.one_time_burst,
                });
            }
            return Ok(());
        }
        if self.size == 0 {
            return Err(RateLimiterError::ZeroSize {
                bucket,
                refill_time: self.refill_time,
            });
        }
        if self.refill_time == 0 {
            return Err(RateLimiterError::ZeroRefillTime {
                bucket,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// A device's limits: bytes per time and operations per time. An absent bucket does not
/// limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, packets).
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Checks that each configured bucket either limits (size and refill_time both
    /// non-zero) or is explicitly disabled (both zero, no burst).
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if let Some(b) = &self.bandwidth {
            b.validate("bandwidth")?;
        }
        if let Some(b) = &self.ops {
            b.validate("ops")?;
        }
        Ok(())
    }
}

/// What a token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// A byte of data.
    Bytes,
    /// One operation.
    Ops,
}

/// Where the limiter reads the time: the monotonic clock, or in tests a clock they move.
#[derive(Clone, Debug, Default)]
pub(crate) enum Clock {
    #[default]
    Monotonic,
    #[cfg(test)]
    Fake(Arc<AtomicU64>),
}

impl Clock {
    /// Nanoseconds since a fixed point of this process.
    fn now_ns(&self) -> u64 {
        match self {
            Clock::Monotonic => {
                static BASE: OnceLock<Instant> = OnceLock::new();
                let elapsed = BASE.get_or_init(Instant::now).elapsed();
                u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
            }
            #[cfg(test)]
            Clock::Fake(t) => t.load(Ordering::SeqCst),
        }
    }
}

/// A bytes bucket, an ops bucket and the timer that ends a blocked period.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
    clock: Clock,
}

impl RateLimiter {
    /// A limiter with full buckets as `cfg` describes; `cfg` must validate.
    pub fn new(cfg: &RateLimiterConfig) -> io::Result<Self> {
        Self::with_clock(cfg, Clock::Monotonic)
    }

    /// A limiter that never limits (its timer is never armed).
    pub fn unlimited() -> io::Result<Self> {
        Self::new(&RateLimiterConfig::default())
    }

    pub(crate) fn with_clock(cfg: &RateLimiterConfig, clock: Clock) -> io::Result<Self> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let now = clock.now_ns();
        Ok(Self {
            bandwidth: cfg.bandwidth.and_then(|c| TokenBucket::new(&c, now)),
            ops: cfg.ops.and_then(|c| TokenBucket::new(&c, now)),
            timer: nonblocking_timer()?,
            blocked: false,
            clock,
        })
    }

    fn bucket_mut(&mut self, kind: TokenType) -> Option<&mut TokenBucket> {
        match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Takes `tokens` of `kind`; false when the bucket lacks them (or the limiter is
    /// already blocked): the limiter is then blocked and its timer armed for when enough
    /// tokens will be there (at least 1 ms ahead).
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let now = self.clock.now_ns();
        let Some(bucket) = self.bucket_mut(kind) else {
            return true;
        };
        if bucket.consume(tokens, now) {
            return true;
        }
        let wait = Duration::from_nanos(bucket.wait_ns(tokens, now)).max(MIN_WAIT);
        if let Err(e) = self.timer.reset(wait, None) {
            // Without a timer nothing would ever unblock the device: let it through.
            log::error!("rate limiter: cannot arm its timer, not limiting: {e}");
            return true;
        }
        self.blocked = true;
        false
    }

    /// Gives back tokens taken by a `consume` whose request then could not proceed (e.g.
    /// the ops bucket allowed it and the bytes bucket did not).
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        if let Some(bucket) = self.bucket_mut(kind) {
            bucket.replenish(tokens);
        }
    }

    /// Whether the limiter waits for its timer; `consume` fails until then.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Called when the timer fd is readable: reads the timer and unblocks. A wake-up with
    /// nothing to read (e.g. the timer was re-armed meanwhile) is not an error.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        match self.timer.wait() {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(RateLimiterError::Timer(e.into())),
        }
        self.blocked = false;
        Ok(())
    }

    /// Replaces the buckets' configuration: `Some` installs a full bucket as configured
    /// (a disabled configuration removes the limit), `None` leaves that bucket as it is.
    /// The configurations should have passed [`RateLimiterConfig::validate`]; an invalid
    /// one removes the limit. A blocked limiter is woken soon so it retries under the
    /// new limits.
    pub fn update(&mut self, bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) {
        let now = self.clock.now_ns();
        if let Some(cfg) = bandwidth {
            self.bandwidth = TokenBucket::new(&cfg, now);
        }
        if let Some(cfg) = ops {
            self.ops = TokenBucket::new(&cfg, now);
        }
        if self.blocked {
            if let Err(e) = self.timer.reset(MIN_WAIT, None) {
                log::error!("rate limiter: cannot re-arm its timer, unblocking: {e}");
                self.blocked = false;
            }
        }
    }

    /// The bytes bucket, if limited.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The ops bucket, if limited.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }
}

impl AsRawFd for RateLimiter {
    /// The timer: readable when a blocked limiter may go on.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// A monotonic timerfd whose reads never block (a worker may see it readable and find the
/// timer re-armed by the time it reads).
fn nonblocking_timer() -> io::Result<TimerFd> {
    // SAFETY: timerfd_create takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh timerfd that nothing else owns.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A clock tests move by hand.
    pub(crate) fn fake_clock() -> (Clock, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(1_000 * MS));
        (Clock::Fake(t.clone()), t)
    }

    fn bucket(size: u64, refill_time: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time,
        })
    }

    fn timer_armed(rl: &RateLimiter) -> bool {
        rl.timer.is_armed().unwrap()
    }

    #[test]
    fn unlimited_always_consumes() {
        let mut rl = RateLimiter::unlimited().unwrap();
        for _ in 0..1000 {
            assert!(rl.consume(u64::MAX, TokenType::Bytes));
            assert!(rl.consume(u64::MAX, TokenType::Ops));
        }
        assert!(!rl.is_blocked());
        assert!(!timer_armed(&rl));
    }

    #[test]
    fn blocked_arms_the_timer_and_event_handler_unblocks() {
        let (clock, t) = fake_clock();
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: bucket(2, 100),
        };
        let mut rl = RateLimiter::with_clock(&cfg, clock).unwrap();
        assert!(rl.consume(1, TokenType::Ops));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        assert!(rl.is_blocked());
        assert!(timer_armed(&rl));
        // Blocked: even the other (unlimited) kind waits, so requests stay in order.
        assert!(!rl.consume(1, TokenType::Bytes));

        // A wake-up before the timer fired reads nothing and is harmless.
        rl.event_handler().unwrap();
        assert!(!rl.is_blocked());
        assert!(!rl.consume(1, TokenType::Ops), "no time passed");
        assert!(rl.is_blocked());

        t.fetch_add(50 * MS, Ordering::SeqCst);
        rl.event_handler().unwrap();
        assert!(rl.consume(1, TokenType::Ops), "one op refilled in 50 ms");
    }

    #[test]
    fn the_timer_fires_when_tokens_are_due() {
        // 1 op per 2 ms on the real clock: the timer must fire within a few ms.
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: bucket(1, 2),
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert_eq!(n, 1, "timer fired");
        rl.event_handler().unwrap();
        assert!(!rl.is_blocked());
        assert!(rl.consume(1, TokenType::Ops));
    }

    #[test]
    fn manual_replenish_returns_tokens() {
        let (clock, _t) = fake_clock();
        let cfg = RateLimiterConfig {
            bandwidth: bucket(1000, 1000),
            ops: bucket(10, 1000),
        };
        let mut rl = RateLimiter::with_clock(&cfg, clock).unwrap();
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(rl.consume(10, TokenType::Ops));
        rl.manual_replenish(300, TokenType::Bytes);
        rl.manual_replenish(1, TokenType::Ops);
        assert_eq!(rl.bandwidth().unwrap().budget(), 300);
        assert_eq!(rl.ops().unwrap().budget(), 1);
        assert!(rl.consume(300, TokenType::Bytes));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.is_blocked());
    }

    #[test]
    fn both_buckets_limit_independently() {
        let (clock, t) = fake_clock();
        let cfg = RateLimiterConfig {
            bandwidth: bucket(4096, 100),
            ops: bucket(100, 100),
        };
        let mut rl = RateLimiter::with_clock(&cfg, clock).unwrap();
        // Ops plenty, bytes short: the request gives its op back.
        assert!(rl.consume(1, TokenType::Ops));
        assert!(rl.consume(4096, TokenType::Bytes));
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Bytes));
        rl.manual_replenish(1, TokenType::Ops);
        assert_eq!(rl.ops().unwrap().budget(), 99);
        assert!(rl.is_blocked());
        t.fetch_add(100 * MS, Ordering::SeqCst);
        rl.event_handler().unwrap();
        assert!(rl.consume(4096, TokenType::Bytes));
        assert!(rl.consume(100, TokenType::Ops), "ops refilled too");
        assert!(!rl.consume(1, TokenType::Ops));
    }

    #[test]
    fn one_time_burst_then_refill_rate() {
        let (clock, t) = fake_clock();
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: 5000,
                refill_time: 1000,
            }),
            ops: None,
        };
        let mut rl = RateLimiter::with_clock(&cfg, clock).unwrap();
        assert!(rl.consume(4000, TokenType::Bytes), "from the burst alone");
        assert_eq!(rl.bandwidth().unwrap().budget(), 1000, "budget untouched");
        assert!(
            rl.consume(2000, TokenType::Bytes),
            "rest of the burst plus budget"
        );
        assert!(!rl.consume(1, TokenType::Bytes));
        t.fetch_add(10_000 * MS, Ordering::SeqCst);
        rl.event_handler().unwrap();
        assert_eq!(
            rl.bandwidth().unwrap().one_time_burst(),
            0,
            "burst used once"
        );
        assert!(rl.consume(1000, TokenType::Bytes), "refilled to size");
        assert!(!rl.consume(1, TokenType::Bytes), "but no more than size");
    }

    #[test]
    fn request_larger_than_the_bucket_waits_for_a_full_bucket() {
        let (clock, t) = fake_clock();
        let cfg = RateLimiterConfig {
            bandwidth: bucket(1000, 100),
            ops: None,
        };
        let mut rl = RateLimiter::with_clock(&cfg, clock).unwrap();
        assert!(rl.consume(10, TokenType::Bytes));
        assert!(!rl.consume(5000, TokenType::Bytes));
        t.fetch_add(MS, Ordering::SeqCst);
        rl.event_handler().unwrap();
        assert!(rl.consume(5000, TokenType::Bytes), "full after 1 ms");
        assert!(!rl.consume(1, TokenType::Bytes));
    }

    #[test]
    fn update_replaces_or_keeps_buckets_and_wakes_a_blocked_limiter() {
        let (clock, _t) = fake_clock();
        let cfg = RateLimiterConfig {
            bandwidth: bucket(100, 1000),
            ops: bucket(1, 100_000),
        };
        let mut rl = RateLimiter::with_clock(&cfg, clock).unwrap();
        assert!(rl.consume(1, TokenType::Ops));
        assert!(!rl.consume(1, TokenType::Ops));
        assert!(rl.is_blocked());
        rl.update(None, Some(TokenBucketConfig::default()));
        assert!(rl.ops().is_none(), "a disabled config removes the limit");
        assert_eq!(rl.bandwidth().unwrap().size(), 100, "None keeps the bucket");
        // Woken within ~1 ms rather than after the old 100 s refill.
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1);
        rl.event_handler().unwrap();
        assert!(rl.consume(1000, TokenType::Ops));
        rl.update(bucket(10, 10), None);
        assert_eq!(rl.bandwidth().unwrap().size(), 10);
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let bad = |bandwidth, ops| RateLimiterConfig { bandwidth, ops }.validate();
        assert!(bad(None, None).is_ok());
        assert!(bad(bucket(0, 0), bucket(10, 10)).is_ok());
        let e = bad(bucket(0, 100), None).unwrap_err();
        assert!(matches!(
            e,
            RateLimiterError::ZeroSize {
                bucket: "bandwidth",
                refill_time: 100
            }
        ));
        assert!(e.to_string().contains("bandwidth") && e.to_string().contains("100"));
        let e = bad(None, bucket(5, 0)).unwrap_err();
        assert!(matches!(
            e,
            RateLimiterError::ZeroRefillTime {
                bucket: "ops",
                size: 5
            }
        ));
        let burst_only = Some(TokenBucketConfig {
            size: 0,
            one_time_burst: 7,
            refill_time: 0,
        });
        assert!(matches!(
            bad(burst_only, None),
            Err(RateLimiterError::BurstWithoutBucket {
                one_time_burst: 7,
                ..
            })
        ));
        assert!(RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(0, 1),
            ops: None
        })
        .is_err());
    }
}
