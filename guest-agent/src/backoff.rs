//! Adaptive waiting for a completion: spin (lowest latency), then yield the CPU, then
//! sleep with growing intervals up to a cap (lowest CPU use for long requests).

use std::time::Duration;

/// Tuning of [`Backoff`]. Defaults: 2000 spins, 50 yields, sleeps from 20 µs doubling
/// up to 1 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Polls with only a CPU spin hint in between.
    pub spins: u32,
    /// Further polls with `sched_yield` in between.
    pub yields: u32,
    /// First sleep.
    pub min_sleep: Duration,
    /// Longest sleep.
    pub max_sleep: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            spins: 2000,
            yields: 50,
            min_sleep: Duration::from_micros(20),
            max_sleep: Duration::from_millis(1),
        }
    }
}

/// What [`Backoff::wait`] did, for the guest-side counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffStep {
    /// Spun.
    Spin,
    /// Yielded the CPU.
    Yield,
    /// Slept this long.
    Sleep(Duration),
}

/// The state of one wait.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    polls: u32,
    sleep: Duration,
}

impl Backoff {
    /// A fresh wait.
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            sleep: policy.min_sleep,
            policy,
            polls: 0,
        }
    }

    /// The next step, without performing it.
    pub fn next_step(&mut self) -> BackoffStep {
        let polls = self.polls;
        self.polls = self.polls.saturating_add(1);
        if polls < self.policy.spins {
            BackoffStep::Spin
        } else if polls - self.policy.spins < self.policy.yields {
            BackoffStep::Yield
        } else {
            let now = self.sleep;
            self.sleep = (self.sleep * 2)
                .min(self.policy.max_sleep)
                .max(self.policy.min_sleep);
            BackoffStep::Sleep(now)
        }
    }

    /// Waits one step; returns what it did.
    pub fn wait(&mut self) -> BackoffStep {
        let step = self.next_step();
        match step {
            BackoffStep::Spin => std::hint::spin_loop(),
            BackoffStep::Yield => std::thread::yield_now(),
            BackoffStep::Sleep(d) => std::thread::sleep(d),
        }
        step
    }

    /// Whether the wait has reached the sleeping phase (the time to check slow
    /// things such as the device status register).
    pub fn is_sleeping(&self) -> bool {
        self.polls > self.policy.spins.saturating_add(self.policy.yields)
    }

    /// Starts over (after progress).
    pub fn reset(&mut self) {
        self.polls = 0;
        self.sleep = self.policy.min_sleep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_then_yields_then_sleeps_longer_up_to_the_cap() {
        let policy = BackoffPolicy {
            spins: 3,
            yields: 2,
            min_sleep: Duration::from_micros(10),
            max_sleep: Duration::from_micros(35),
        };
        let mut b = Backoff::new(policy);
        let steps: Vec<_> = (0..9).map(|_| b.next_step()).collect();
        let us = |n| BackoffStep::Sleep(Duration::from_micros(n));
        assert_eq!(
            steps,
            vec![
                BackoffStep::Spin,
                BackoffStep::Spin,
                BackoffStep::Spin,
                BackoffStep::Yield,
                BackoffStep::Yield,
                us(10),
                us(20),
                us(35),
                us(35),
            ]
        );
        assert!(b.is_sleeping());
        b.reset();
        assert_eq!(b.next_step(), BackoffStep::Spin);
        assert!(!b.is_sleeping());
    }

    #[test]
    fn wait_performs_the_step() {
        let mut b = Backoff::new(BackoffPolicy {
            spins: 0,
            yields: 0,
            min_sleep: Duration::from_millis(2),
            max_sleep: Duration::from_millis(2),
        });
        let t = std::time::Instant::now();
        assert_eq!(b.wait(), BackoffStep::Sleep(Duration::from_millis(2)));
        assert!(t.elapsed() >= Duration::from_millis(2));
    }
}
