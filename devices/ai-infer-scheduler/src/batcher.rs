//! Dynamic batching: one queue per model, shared by all tenants.
//!
//! Modelled on Triton's dynamic batcher: requests for one model wait together, and a
//! batch is formed when it is full (`max_batch`) or when its oldest request has waited
//! `max_queue_delay`, whichever comes first; a request whose deadline would be missed
//! by waiting longer also makes the batch ready. Batches never mix models, and each
//! request keeps its own meta and job (buffers, status) inside the batch.
//!
//! Inside the model queue each tenant has a lane with one FIFO per priority class, so
//! the scheduler can pick across tenants and classes in fair-share and priority order
//! (see `fair_queue` and `priority`) and cancel or drain one tenant's work without
//! touching the others'. Deadlines sit in a min-heap with lazy deletion, so expiry is
//! found in O(log n) however many requests are queued.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use ai_infer_protocol::PriorityClass;

use crate::fair_queue::VirtualTime;
use crate::priority::{ClassPolicy, Rank};
use crate::{JobMeta, ModelPolicy, Nanos, TenantId};

/// A queued request: its submission number, what the scheduler knows, the job.
pub struct Queued<J> {
    /// Submission number (unique, increasing).
    pub seq: u64,
    /// The request's meta, priority already clamped.
    pub meta: JobMeta,
    /// The daemon's job.
    pub job: J,
}

/// One tenant's requests for one model.
struct Lane<J> {
    tenant: TenantId,
    /// One FIFO per class (index = wire value), each in submission order.
    fifos: [VecDeque<Queued<J>>; 4],
    len: usize,
}

impl<J> Lane<J> {
    fn new(tenant: TenantId) -> Self {
        Self {
            tenant,
            fifos: Default::default(),
            len: 0,
        }
    }
}

/// Where the best queued request is: lane and class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadRef {
    lane: usize,
    class: usize,
}

/// Deadline heap entry: deadline, seq, tenant, class.
type DeadlineEntry = Reverse<(Nanos, u64, TenantId, u8)>;

/// All queued requests of one model.
pub struct ModelQueue<J> {
    lanes: Vec<Lane<J>>,
    len: usize,
    /// Queued requests per class.
    by_class: [usize; 4],
    /// Requests with a deadline; entries of requests that left are skipped lazily.
    deadlines: BinaryHeap<DeadlineEntry>,
}

impl<J> Default for ModelQueue<J> {
    fn default() -> Self {
        Self {
            lanes: Vec::new(),
            len: 0,
            by_class: [0; 4],
            deadlines: BinaryHeap::new(),
        }
    }
}

impl<J> ModelQueue<J> {
    /// Requests queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Requests of `tenant` queued.
    pub fn tenant_len(&self, tenant: TenantId) -> usize {
        self.lanes
            .iter()
            .find(|l| l.tenant == tenant)
            .map_or(0, |l| l.len)
    }

    /// Requests queued of `class` or higher.
    pub fn len_at_or_above(&self, class: PriorityClass) -> usize {
        self.by_class[class as usize..].iter().sum()
    }

    /// Queues a request at the end of its tenant's FIFO for its class.
    pub fn push(&mut self, queued: Queued<J>) {
        let class = queued.meta.priority as usize;
        let tenant = queued.meta.tenant;
        if let Some(deadline) = queued.meta.deadline {
            self.deadlines
                .push(Reverse((deadline, queued.seq, tenant, class as u8)));
            // Dispatched requests leave their entries behind; rebuild before the heap
            // grows without bound (amortised O(1) per push).
            if self.deadlines.len() > 2 * self.len + 64 {
                let lanes = &self.lanes;
                self.deadlines.retain(|Reverse((_, seq, tenant, class))| {
                    Self::find_in(lanes, *tenant, *class as usize, *seq).is_some()
                });
            }
        }
        let lane = match self.lanes.iter().position(|l| l.tenant == tenant) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane::new(tenant));
                self.lanes.len() - 1
            }
        };
        self.lanes[lane].fifos[class].push_back(queued);
        self.lanes[lane].len += 1;
        self.by_class[class] += 1;
        self.len += 1;
    }

    /// The lane index and position of request `seq` of `tenant` in `class`.
    fn find_in(
        lanes: &[Lane<J>],
        tenant: TenantId,
        class: usize,
        seq: u64,
    ) -> Option<(usize, usize)> {
        let lane = lanes.iter().position(|l| l.tenant == tenant)?;
        let pos = lanes[lane].fifos[class]
            .binary_search_by_key(&seq, |q| q.seq)
            .ok()?;
        Some((lane, pos))
    }

    fn remove_at(&mut self, lane: usize, class: usize, pos: usize) -> Option<Queued<J>> {
        let queued = self.lanes[lane].fifos[class].remove(pos)?;
        self.lanes[lane].len -= 1;
        self.by_class[class] -= 1;
        self.len -= 1;
        Some(queued)
    }

    /// The earliest deadline among queued requests (dropping stale heap entries).
    pub fn earliest_deadline(&mut self) -> Option<Nanos> {
        while let Some(Reverse((deadline, seq, tenant, class))) = self.deadlines.peek().copied() {
            if Self::find_in(&self.lanes, tenant, class as usize, seq).is_some() {
                return Some(deadline);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Removes and returns a request that cannot finish by its deadline even if it
    /// started at `now` and took `min_exec_ns`; `None` when there is none.
    pub fn pop_expired(&mut self, now: Nanos, min_exec_ns: Nanos) -> Option<Queued<J>> {
        let deadline = self.earliest_deadline()?;
        if now.saturating_add(min_exec_ns) <= deadline {
            return None;
        }
        let Reverse((_, seq, tenant, class)) = self.deadlines.pop()?;
        let (lane, pos) = Self::find_in(&self.lanes, tenant, class as usize, seq)?;
        self.remove_at(lane, class as usize, pos)
    }

    /// When the requests of class `min_class` or higher are ready to run a batch:
    /// `None` when there are none, a time ≤ `now` when ready, otherwise the time
    /// they become ready (batch delay or deadline pressure). `estimate(n)` is the
    /// predicted time of a batch of `n`.
    pub fn ready_at(
        &mut self,
        now: Nanos,
        policy: &ModelPolicy,
        min_class: PriorityClass,
        estimate: impl Fn(usize) -> Option<Nanos>,
    ) -> Option<Nanos> {
        let eligible = self.len_at_or_above(min_class);
        if eligible == 0 {
            return None;
        }
        if eligible >= policy.batch_limit() {
            return Some(now);
        }
        let oldest = self
            .lanes
            .iter()
            .flat_map(|l| {
                l.fifos[min_class as usize..]
                    .iter()
                    .filter_map(|f| f.front())
            })
            .map(|q| q.meta.arrival)
            .min()?;
        let mut ready = oldest.saturating_add(policy.max_queue_delay_ns);
        if let (Some(deadline), Some(exec)) = (self.earliest_deadline(), estimate(self.len)) {
            ready = ready.min(deadline.saturating_sub(exec));
        }
        Some(ready)
    }

    /// The best queued request of class `min_class` or higher at `now`, by
    /// `classes` and the tenants' counters.
    pub fn best_head(
        &self,
        now: Nanos,
        classes: &ClassPolicy,
        min_class: PriorityClass,
        vt_of: impl Fn(TenantId) -> VirtualTime,
    ) -> Option<(HeadRef, Rank)> {
        let mut best: Option<(HeadRef, Rank)> = None;
        for (lane_index, lane) in self.lanes.iter().enumerate() {
            if lane.len == 0 {
                continue;
            }
            let vt = vt_of(lane.tenant);
            for (class_index, class) in PriorityClass::ALL.iter().enumerate() {
                if *class < min_class {
                    continue;
                }
                let Some(head) = lane.fifos[class_index].front() else {
                    continue;
                };
                let rank = classes.rank(now, *class, head.meta.arrival, vt, head.seq);
                if best.is_none_or(|(_, b)| rank < b) {
                    let at = HeadRef {
                        lane: lane_index,
                        class: class_index,
                    };
                    best = Some((at, rank));
                }
            }
        }
        best
    }

    /// The request at `at` (from [`ModelQueue::best_head`]).
    pub fn peek(&self, at: HeadRef) -> Option<&Queued<J>> {
        self.lanes.get(at.lane)?.fifos.get(at.class)?.front()
    }

    /// Removes the request at `at`.
    pub fn pop(&mut self, at: HeadRef) -> Option<Queued<J>> {
        self.peek(at)?;
        self.remove_at(at.lane, at.class, 0)
    }

    /// Removes `tenant`'s queued request with `request_id`, if any.
    pub fn cancel(&mut self, tenant: TenantId, request_id: u64) -> Option<Queued<J>> {
        let lane = self.lanes.iter().position(|l| l.tenant == tenant)?;
        for class in 0..4 {
            if let Some(pos) = self.lanes[lane].fifos[class]
                .iter()
                .position(|q| q.meta.request_id == request_id)
            {
                return self.remove_at(lane, class, pos);
            }
        }
        None
    }

    /// Removes every queued request of `tenant`, oldest first per class, and its lane.
    pub fn drain_tenant(&mut self, tenant: TenantId) -> Vec<Queued<J>> {
        let Some(lane) = self.lanes.iter().position(|l| l.tenant == tenant) else {
            return Vec::new();
        };
        let lane = self.lanes.swap_remove(lane);
        let mut removed = Vec::with_capacity(lane.len);
        for (class, fifo) in lane.fifos.into_iter().enumerate() {
            self.by_class[class] -= fifo.len();
            removed.extend(fifo);
        }
        self.len -= removed.len();
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(
        seq: u64,
        tenant: u32,
        class: PriorityClass,
        arrival: Nanos,
        deadline: Option<Nanos>,
    ) -> Queued<u64> {
        Queued {
            seq,
            meta: JobMeta {
                tenant: TenantId(tenant),
                request_id: seq,
                model: 1,
                priority: class,
                deadline,
                arrival,
            },
            job: seq,
        }
    }

    fn policy(max_batch: u32, delay: Nanos) -> ModelPolicy {
        ModelPolicy {
            max_batch,
            max_queue_delay_ns: delay,
            ..ModelPolicy::default()
        }
    }

    #[test]
    fn ready_when_full_or_after_the_delay() {
        let mut q = ModelQueue::default();
        let p = policy(3, 100);
        assert_eq!(q.ready_at(0, &p, PriorityClass::Batch, |_| None), None);
        q.push(job(1, 1, PriorityClass::Normal, 10, None));
        q.push(job(2, 2, PriorityClass::Normal, 20, None));
        assert_eq!(
            q.ready_at(30, &p, PriorityClass::Batch, |_| None),
            Some(110),
            "oldest + delay"
        );
        q.push(job(3, 1, PriorityClass::Normal, 30, None));
        assert_eq!(
            q.ready_at(30, &p, PriorityClass::Batch, |_| None),
            Some(30),
            "full"
        );
    }

    #[test]
    fn full_means_the_clamped_batch_limit() {
        // form_batch never takes more than MAX_BATCH; a larger max_batch must not
        // leave a full batch waiting for the delay.
        let mut q = ModelQueue::default();
        let p = policy(crate::MAX_BATCH + 1, 1_000);
        for seq in 0..u64::from(crate::MAX_BATCH) {
            q.push(job(seq, 1, PriorityClass::Normal, 0, None));
        }
        assert_eq!(q.ready_at(5, &p, PriorityClass::Batch, |_| None), Some(5));
    }

    #[test]
    fn a_deadline_makes_the_batch_ready_early() {
        let mut q = ModelQueue::default();
        let p = policy(8, 1_000);
        q.push(job(1, 1, PriorityClass::Normal, 0, Some(500)));
        assert_eq!(
            q.ready_at(0, &p, PriorityClass::Batch, |_| Some(200)),
            Some(300)
        );
    }

    #[test]
    fn expired_requests_pop_in_deadline_order_and_stale_entries_are_skipped() {
        let mut q = ModelQueue::default();
        q.push(job(1, 1, PriorityClass::Normal, 0, Some(300)));
        q.push(job(2, 1, PriorityClass::Batch, 0, Some(100)));
        q.push(job(3, 2, PriorityClass::Normal, 0, Some(200)));
        assert!(q.cancel(TenantId(1), 2).is_some());
        assert_eq!(q.earliest_deadline(), Some(200));
        assert!(q.pop_expired(150, 49).is_none(), "150 + 49 < 200");
        assert_eq!(q.pop_expired(150, 51).map(|j| j.seq), Some(3));
        assert!(q.pop_expired(150, 51).is_none());
        assert_eq!(q.pop_expired(300, 0).map(|j| j.seq), None, "300 + 0 <= 300");
        assert_eq!(q.pop_expired(301, 0).map(|j| j.seq), Some(1));
        assert!(q.is_empty());
    }

    #[test]
    fn stale_deadline_entries_do_not_accumulate() {
        let mut q = ModelQueue::default();
        for seq in 0..10_000 {
            q.push(job(seq, 1, PriorityClass::Normal, 0, Some(1 << 40)));
            let (at, _) = q
                .best_head(0, &ClassPolicy::default(), PriorityClass::Batch, |_| 0)
                .unwrap();
            assert!(q.pop(at).is_some());
        }
        assert!(
            q.deadlines.len() <= 64 + 1,
            "heap holds {}",
            q.deadlines.len()
        );
    }

    #[test]
    fn best_head_prefers_class_then_virtual_time() {
        let mut q = ModelQueue::default();
        q.push(job(1, 1, PriorityClass::Normal, 0, None));
        q.push(job(2, 2, PriorityClass::Normal, 0, None));
        q.push(job(3, 3, PriorityClass::Batch, 0, None));
        let classes = ClassPolicy::default();
        let vt = |t: TenantId| if t == TenantId(1) { 50 } else { 10 };
        let (at, _) = q.best_head(0, &classes, PriorityClass::Batch, vt).unwrap();
        assert_eq!(q.pop(at).unwrap().seq, 2);
        let (at, _) = q.best_head(0, &classes, PriorityClass::Batch, vt).unwrap();
        assert_eq!(q.pop(at).unwrap().seq, 1);
        q.push(job(4, 3, PriorityClass::Realtime, 0, None));
        let (at, _) = q.best_head(0, &classes, PriorityClass::Batch, vt).unwrap();
        assert_eq!(q.pop(at).unwrap().seq, 4);
    }

    #[test]
    fn drain_and_cancel_touch_only_one_tenant() {
        let mut q = ModelQueue::default();
        for seq in 0..6 {
            let class = PriorityClass::ALL[seq as usize % 4];
            q.push(job(seq, (seq % 2) as u32, class, 0, None));
        }
        assert_eq!(q.cancel(TenantId(1), 3).map(|j| j.seq), Some(3));
        assert!(
            q.cancel(TenantId(1), 2).is_none(),
            "request 2 is tenant 0's"
        );
        let drained: Vec<_> = q.drain_tenant(TenantId(0)).iter().map(|j| j.seq).collect();
        assert_eq!(drained.len(), 3);
        assert!(drained.iter().all(|seq| seq % 2 == 0));
        assert_eq!(q.len(), 2);
        assert_eq!(q.len_at_or_above(PriorityClass::Batch), 2);
    }
}
