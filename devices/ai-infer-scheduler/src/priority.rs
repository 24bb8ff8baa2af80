//! Priority classes: strict order between classes, fair share inside a class, and a
//! bounded wait for every class so that none starves.
//!
//! A request's class is what the guest asked for, lowered to the tenant's ceiling
//! (set by the operator, never by the guest). Higher classes go first: a realtime
//! request overtakes every queued lower-class request. Inside one class the fair
//! queue decides (smallest virtual time first), then arrival order.
//!
//! Strict priority alone starves the lower classes under a flood of higher ones. So
//! each class has a configurable longest wait: a request that has waited that long
//! becomes *overdue* and goes before every request that is not, overdue requests in
//! the order they became overdue. That bounds the wait of any request to its class's
//! bound plus the time to drain the requests that became overdue before it and one
//! batch already running (the scheduler is not preemptive). This is the "aging"
//! remedy of classic priority schedulers, and it plays the role of Triton's
//! per-priority queue policies (`default_timeout_microseconds`), except that the
//! request is promoted instead of rejected.

use ai_infer_protocol::PriorityClass;

use crate::fair_queue::VirtualTime;
use crate::Nanos;

/// Longest queueing wait per class before a request is promoted ahead of all others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Indexed by the class's wire value (`Batch` = 0 … `Realtime` = 3); `None` = no
    /// bound (the class is only ordered by priority).
    pub max_wait_ns: [Option<Nanos>; 4],
}

impl Default for ClassPolicy {
    /// Batch 2 s, Normal 500 ms, Interactive 100 ms, Realtime unbounded (nothing is
    /// above it to starve it).
    fn default() -> Self {
        const MS: Nanos = 1_000_000;
        Self {
            max_wait_ns: [Some(2_000 * MS), Some(500 * MS), Some(100 * MS), None],
        }
    }
}

/// A request's class after the tenant's ceiling, and whether it was lowered.
pub fn clamp(requested: PriorityClass, ceiling: PriorityClass) -> (PriorityClass, bool) {
    if requested > ceiling {
        (ceiling, true)
    } else {
        (requested, false)
    }
}

/// Scheduling order of a queued request: smaller goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    /// 0 = overdue, 1 = in time.
    tier: u8,
    /// When it became overdue (0 when in time).
    due: Nanos,
    /// 3 − class, so higher classes sort first.
    class_order: u8,
    /// The tenant's fair-share counter.
    vt: VirtualTime,
    /// Submission order.
    seq: u64,
}

impl ClassPolicy {
    /// The rank at `now` of a request of `class` that arrived at `arrival`, of a
    /// tenant whose counter is `vt`, submitted as number `seq`.
    pub fn rank(
        &self,
        now: Nanos,
        class: PriorityClass,
        arrival: Nanos,
        vt: VirtualTime,
        seq: u64,
    ) -> Rank {
        let class_order = 3 - class as u8;
        match self.max_wait_ns[class as usize] {
            Some(bound) if now >= arrival.saturating_add(bound) => Rank {
                tier: 0,
                due: arrival.saturating_add(bound),
                class_order,
                vt,
                seq,
            },
            _ => Rank {
                tier: 1,
                due: 0,
                class_order,
                vt,
                seq,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_lowers_to_the_ceiling_and_never_raises() {
        use PriorityClass::*;
        assert_eq!(clamp(Realtime, Normal), (Normal, true));
        assert_eq!(clamp(Batch, Interactive), (Batch, false));
        assert_eq!(clamp(Interactive, Interactive), (Interactive, false));
    }

    #[test]
    fn higher_class_ranks_first_whatever_the_fair_share() {
        let p = ClassPolicy::default();
        let realtime = p.rank(0, PriorityClass::Realtime, 0, 1_000_000, 9);
        let normal = p.rank(0, PriorityClass::Normal, 0, 0, 1);
        assert!(realtime < normal);
    }

    #[test]
    fn inside_a_class_the_smaller_virtual_time_ranks_first() {
        let p = ClassPolicy::default();
        let a = p.rank(0, PriorityClass::Normal, 0, 10, 9);
        let b = p.rank(0, PriorityClass::Normal, 0, 20, 1);
        assert!(a < b);
    }

    #[test]
    fn an_overdue_request_ranks_before_realtime() {
        let p = ClassPolicy {
            max_wait_ns: [Some(100), None, None, None],
        };
        let batch_in_time = p.rank(99, PriorityClass::Batch, 0, 0, 1);
        let batch_overdue = p.rank(100, PriorityClass::Batch, 0, 0, 1);
        let realtime = p.rank(100, PriorityClass::Realtime, 100, 0, 2);
        assert!(realtime < batch_in_time);
        assert!(batch_overdue < realtime);
        // Two overdue requests: the one overdue first goes first.
        let older = p.rank(500, PriorityClass::Batch, 10, 99, 5);
        let newer = p.rank(500, PriorityClass::Batch, 20, 0, 4);
        assert!(older < newer);
    }
}
