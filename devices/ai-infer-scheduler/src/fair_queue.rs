//! Weighted fair sharing of accelerator time: one virtual-time counter per tenant.
//!
//! Modelled on the Virtual Token Counter (Sheng et al., "Fairness in Serving Large
//! Language Models", OSDI 2024), itself a form of weighted fair queueing: each tenant
//! has a counter of the accelerator time it received divided by its weight, and among
//! tenants with queued work the one with the smallest counter is served next. Over a
//! busy period every backlogged tenant's counter therefore advances at the same pace,
//! which is exactly "accelerator time in proportion to weight".
//!
//! The counter is charged in accelerator *time* (not requests), when a batch is
//! dispatched (with the estimated time, so parallel executors do not all pick the same
//! tenant) and corrected when the batch completes (with the measured time).
//!
//! An idle tenant does not bank credit: when it gets work again its counter is lifted
//! to the smallest counter among backlogged tenants (or, when nobody is backlogged, to
//! the counter of the last tenant served), minus at most a configured credit. So after
//! an idle spell it gets at most that credit of extra service, not the whole
//! accelerator for as long as it was away.

use crate::Nanos;

/// A tenant's virtual time: accelerator nanoseconds received × [`SCALE`] / weight.
pub type VirtualTime = u128;

/// Virtual units per accelerator nanosecond at weight 1; large, so the division by the
/// weight loses nothing that matters.
pub const SCALE: u128 = 1 << 20;

/// Virtual time charged for `ns` accelerator nanoseconds at `weight`.
pub fn virtual_cost(ns: Nanos, weight: u32) -> VirtualTime {
    u128::from(ns) * SCALE / u128::from(weight.max(1))
}

/// One tenant's fair-share counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantClock {
    vt: VirtualTime,
    weight: u32,
}

impl TenantClock {
    /// A counter at `start` for a tenant of `weight` (0 counts as 1).
    pub fn new(weight: u32, start: VirtualTime) -> Self {
        Self {
            vt: start,
            weight: weight.max(1),
        }
    }

    /// The counter.
    pub fn vt(&self) -> VirtualTime {
        self.vt
    }

    /// The weight (≥ 1).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Changes the weight; service already received keeps its old price.
    pub fn set_weight(&mut self, weight: u32) {
        self.weight = weight.max(1);
    }

    /// Charges `ns` accelerator nanoseconds; returns the virtual time charged, for an
    /// exact [`TenantClock::refund`] later.
    pub fn charge(&mut self, ns: Nanos) -> VirtualTime {
        let cost = virtual_cost(ns, self.weight);
        self.vt = self.vt.saturating_add(cost);
        cost
    }

    /// Takes back a charge made by [`TenantClock::charge`].
    pub fn refund(&mut self, cost: VirtualTime) {
        self.vt = self.vt.saturating_sub(cost);
    }

    /// Called when the tenant goes from no queued work to some: it re-enters at
    /// `floor` (the current virtual time), at most `credit_ns` of accelerator time
    /// behind it.
    pub fn lift(&mut self, floor: VirtualTime, credit_ns: Nanos) {
        let lowest = floor.saturating_sub(virtual_cost(credit_ns, self.weight));
        self.vt = self.vt.max(lowest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_scale_inversely_with_weight() {
        let mut light = TenantClock::new(1, 0);
        let mut heavy = TenantClock::new(4, 0);
        light.charge(1000);
        heavy.charge(4000);
        assert_eq!(light.vt(), heavy.vt());
        assert_eq!(TenantClock::new(0, 0).weight(), 1);
    }

    #[test]
    fn refund_undoes_a_charge_exactly() {
        let mut c = TenantClock::new(3, 77);
        let cost = c.charge(1_000_001);
        c.refund(cost);
        assert_eq!(c.vt(), 77);
    }

    #[test]
    fn lift_moves_an_idle_counter_up_to_the_floor_minus_credit() {
        let mut idle = TenantClock::new(2, 0);
        idle.lift(virtual_cost(10_000, 1), 0);
        assert_eq!(idle.vt(), virtual_cost(10_000, 1));

        let mut idle = TenantClock::new(2, 0);
        idle.lift(virtual_cost(10_000, 1), 4_000);
        // 4 µs of credit at weight 2 is 2 µs of weight-1 virtual time.
        assert_eq!(idle.vt(), virtual_cost(8_000, 1));

        let mut ahead = TenantClock::new(1, virtual_cost(50_000, 1));
        ahead.lift(virtual_cost(10_000, 1), 0);
        assert_eq!(ahead.vt(), virtual_cost(50_000, 1), "never lowered");
    }
}
