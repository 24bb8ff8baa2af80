//! One tenant (one VM socket): its identity, what the operator grants it (changed by
//! a reload), and the state of its current connection — TRACE counters, in-flight
//! INFER ids, and a generation per queue that makes results of abandoned work
//! (reset, disconnect) be discarded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use ai_infer_protocol::{DeviceConfig, Status, TraceCounters, MAX_REQUEST_QUEUES};
use ai_infer_scheduler::{Nanos, TenantId, TenantPolicy};

pub mod socket;

use self::socket::PeerRule;

/// A tenant's fixed identity, from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantSpec {
    /// Scheduler id.
    pub id: TenantId,
    /// Name from the config (for logs and metrics).
    pub name: String,
}

/// What the operator grants a tenant; a reload replaces it as a whole.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// Scheduler policy (applied to the scheduler while connected).
    pub policy: TenantPolicy,
    /// Model ids this tenant may use (ascending).
    pub allowed_ids: Vec<u32>,
    /// The limits the device enforces (its config space), fixed for a connection
    /// when it starts; `max_in_flight` is also enforced live through `policy`.
    pub device_config: DeviceConfig,
    /// Which peers may connect as this tenant (checked at each accept).
    pub peer: PeerRule,
}

/// Why a connection to a tenant socket was closed at once (a metric label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's uid/gid is not the tenant's.
    Peer,
    /// A VMM is already connected.
    Busy,
    /// The peer did not complete the handshake in time.
    Handshake,
}

impl Refusal {
    /// Every reason, in metric order.
    pub const ALL: [Refusal; 3] = [Refusal::Peer, Refusal::Busy, Refusal::Handshake];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Peer => "peer",
            Refusal::Busy => "busy",
            Refusal::Handshake => "handshake_timeout",
        }
    }
}

/// An in-flight INFER of the current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// The queue it arrived on.
    pub queue: u16,
    /// Whether an executor has taken it.
    pub running: bool,
}

/// Per-connection state; replaced when a VMM connects.
#[derive(Default)]
pub struct Connection {
    /// When the counters started (scheduler clock).
    pub started: Nanos,
    /// TRACE counters (`uptime_ns`, `in_flight` filled in on read).
    pub counters: TraceCounters,
    /// In-flight INFER requests by `request_id`.
    pub in_flight: HashMap<u64, InFlight>,
}

/// What a completion adds to the counters.
#[derive(Clone, Copy, Debug)]
pub enum Record {
    /// An INFER chain: its status, timings and byte counts.
    Infer {
        /// The request id (removed from the in-flight set).
        request_id: u64,
        /// Whether this request was registered in flight (admitted).
        admitted: bool,
        /// Completion status.
        status: Status,
        /// Response `queue_ns`.
        queue_ns: u64,
        /// Response `compute_ns`.
        compute_ns: u64,
        /// Response `batch_size`.
        batch_size: u32,
        /// Input bytes (counted when OK).
        bytes_in: u64,
        /// Output bytes written (counted when OK).
        bytes_out: u64,
    },
    /// Any other chain.
    Other,
}

/// Mutable state behind the tenant's lock.
pub struct TenantState {
    running: [usize; MAX_REQUEST_QUEUES],
    /// The current connection.
    pub conn: Connection,
}

impl TenantState {
    /// Adds a completion to the counters and forgets a finished INFER.
    pub fn record(&mut self, record: Record) {
        let c = &mut self.conn.counters;
        c.completed = c.completed.wrapping_add(1);
        if let Record::Infer {
            request_id,
            admitted,
            status,
            queue_ns,
            compute_ns,
            batch_size,
            bytes_in,
            bytes_out,
        } = record
        {
            if admitted {
                self.conn.in_flight.remove(&request_id);
            }
            c.record_infer(status, queue_ns, compute_ns, batch_size);
            if status == Status::Ok {
                c.bytes_in = c.bytes_in.wrapping_add(bytes_in);
                c.bytes_out = c.bytes_out.wrapping_add(bytes_out);
            }
        }
    }

    /// Counts down the work running for `queue` (see [`Tenant::finish_running`]).
    pub fn finish_running(&mut self, queue: u16) {
        if let Some(r) = self.running.get_mut(usize::from(queue)) {
            *r = r.saturating_sub(1);
        }
    }

    /// Registers an admitted INFER.
    pub fn add_in_flight(&mut self, request_id: u64, queue: u16) {
        self.conn.in_flight.insert(
            request_id,
            InFlight {
                queue,
                running: false,
            },
        );
        let c = &mut self.conn.counters;
        c.in_flight_max = c.in_flight_max.max(self.conn.in_flight.len() as u64);
    }
}

/// A tenant: its identity, its grant and its locked state.
pub struct Tenant {
    /// Fixed identity.
    pub spec: TenantSpec,
    /// Read often, replaced only by a reload; never held while taking another lock.
    grant: RwLock<Arc<Grant>>,
    connected: AtomicBool,
    /// Connections closed at once, by [`Refusal`].
    refusals: [AtomicU64; 3],
    /// Per queue; moved only under the state lock (so a check under it is stable), read
    /// without it where the vring lock is held (taking a chain), which must not wait for
    /// the tenant lock: completions hold the tenant lock while they publish to the vring.
    generations: [AtomicU64; MAX_REQUEST_QUEUES],
    state: Mutex<TenantState>,
    idle: Condvar,
}

impl Tenant {
    /// A tenant with no connection yet.
    pub fn new(spec: TenantSpec, grant: Grant) -> Self {
        Tenant {
            spec,
            grant: RwLock::new(Arc::new(grant)),
            connected: AtomicBool::new(false),
            refusals: Default::default(),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            state: Mutex::new(TenantState {
                running: [0; MAX_REQUEST_QUEUES],
                conn: Connection::default(),
            }),
            idle: Condvar::new(),
        }
    }

    /// What the tenant is granted now.
    pub fn grant(&self) -> Arc<Grant> {
        Arc::clone(&self.grant.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the grant (reload). Work already admitted keeps what it was given.
    pub fn set_grant(&self, grant: Grant) {
        *self.grant.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(grant);
    }

    /// Whether a VMM is connected (for metrics).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records that a VMM connected or left.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Counts a connection closed at once.
    pub fn count_refusal(&self, why: Refusal) {
        self.refusals[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed at once for `why` since start.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refusals[why as usize].load(Ordering::Relaxed)
    }

    /// Locks the state (a panicked holder leaves consistent counters behind).
    pub fn lock(&self) -> MutexGuard<'_, TenantState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current generation of `queue` (0 for an index out of range, which no chain
    /// can carry: queue indices come from the vhost-user library, below 64). Stable while
    /// the state lock is held.
    pub fn generation(&self, queue: u16) -> u64 {
        self.generations
            .get(usize::from(queue))
            .map_or(0, |g| g.load(Ordering::SeqCst))
    }

    /// Starts a connection: counters from zero, nothing in flight.
    pub fn begin_connection(&self, now: Nanos) {
        self.lock().conn = Connection {
            started: now,
            ..Connection::default()
        };
    }

    /// Abandons the work of every queue `which` selects: later completions of it are
    /// discarded, and its in-flight entries are forgotten. Returns the ids that were
    /// still queued (not running) so the caller can remove them from the scheduler.
    pub fn abandon(&self, which: impl Fn(u16) -> bool) -> Vec<u64> {
        let mut st = self.lock();
        for (q, g) in self.generations.iter().enumerate() {
            if which(q as u16) {
                g.fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut queued = Vec::new();
        st.conn.in_flight.retain(|id, f| {
            if which(f.queue) {
                if !f.running {
                    queued.push(*id);
                }
                false
            } else {
                true
            }
        });
        queued
    }

    /// Marks an INFER as taken by an executor if its queue generation is still
    /// `generation`; then it must be finished ([`Tenant::finish_running`]; a
    /// [`ChainTicket`](crate::ticket::ChainTicket) does it as it completes). Returns
    /// false for abandoned work, which must not be run.
    pub fn start_running(&self, request_id: u64, queue: u16, generation: u64) -> bool {
        let mut st = self.lock();
        if self.generation(queue) != generation {
            return false;
        }
        if let Some(f) = st.conn.in_flight.get_mut(&request_id) {
            f.running = true;
        }
        if let Some(r) = st.running.get_mut(usize::from(queue)) {
            *r += 1;
        }
        true
    }

    /// An executor is done with a job [`Tenant::start_running`] accepted (normally
    /// through [`TenantState::finish_running`] as the job completes, under the lock it
    /// completes under; call [`Tenant::notify_idle`] after releasing it).
    pub fn finish_running(&self, queue: u16) {
        self.lock().finish_running(queue);
        self.notify_idle();
    }

    /// Wakes [`Tenant::wait_idle`] after running work finished.
    pub fn notify_idle(&self) {
        self.idle.notify_all();
    }

    /// Waits until no executor runs work of a queue `which` selects, at most
    /// `timeout`; false on timeout.
    pub fn wait_idle(&self, which: impl Fn(u16) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let busy = st
                .running
                .iter()
                .enumerate()
                .any(|(q, n)| *n > 0 && which(q as u16));
            if !busy {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.idle.wait_timeout(st, left) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The TRACE payload now, from the device-side counters. `priority_clamped` is
    /// the scheduler's to fill in (it clamps, so it counts).
    pub fn trace(&self, now: Nanos) -> TraceCounters {
        let st = self.lock();
        let mut c = st.conn.counters;
        c.uptime_ns = now.saturating_sub(st.conn.started);
        c.in_flight = st.conn.in_flight.len() as u64;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ai_infer_protocol::PriorityClass;

    fn tenant() -> Tenant {
        Tenant::new(
            TenantSpec {
                id: TenantId(0),
                name: "t".into(),
            },
            Grant {
                policy: TenantPolicy {
                    priority_ceiling: PriorityClass::Normal,
                    ..TenantPolicy::default()
                },
                allowed_ids: vec![1],
                device_config: DeviceConfig::default(),
                peer: PeerRule::default(),
            },
        )
    }

    #[test]
    fn abandon_bumps_generations_and_returns_queued_ids() {
        let t = tenant();
        {
            let mut st = t.lock();
            st.add_in_flight(1, 0);
            st.add_in_flight(2, 0);
            st.add_in_flight(3, 1);
        }
        assert!(t.start_running(2, 0, 0));
        let queued = t.abandon(|q| q == 0);
        assert_eq!(queued, vec![1]);
        assert_eq!((t.generation(0), t.generation(1)), (1, 0));
        let st = t.lock();
        assert_eq!(st.conn.in_flight.len(), 1);
        assert_eq!(st.conn.counters.in_flight_max, 3);
        drop(st);
        // Work of the old generation is not started.
        assert!(!t.start_running(1, 0, 0));
        assert!(t.start_running(3, 1, 0));
    }

    #[test]
    fn a_new_grant_replaces_the_old_one_for_later_readers() {
        let t = tenant();
        let before = t.grant();
        let mut g = (*before).clone();
        g.policy.weight = 7;
        g.allowed_ids = vec![1, 2];
        t.set_grant(g);
        assert_eq!(before.policy.weight, 1, "a reader keeps what it read");
        assert_eq!(t.grant().policy.weight, 7);
        assert_eq!(t.grant().allowed_ids, vec![1, 2]);
    }

    #[test]
    fn wait_idle_waits_for_running_work_of_the_selected_queues() {
        let t = std::sync::Arc::new(tenant());
        assert!(t.start_running(9, 2, 0));
        assert!(t.wait_idle(|q| q != 2, Duration::from_millis(1)));
        assert!(!t.wait_idle(|q| q == 2, Duration::from_millis(20)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            t2.finish_running(2);
        });
        assert!(t.wait_idle(|q| q == 2, Duration::from_secs(5)));
        h.join().unwrap();
    }

    #[test]
    fn records_count_completions_and_ok_bytes() {
        let t = tenant();
        t.begin_connection(100);
        let mut st = t.lock();
        st.add_in_flight(5, 0);
        st.record(Record::Infer {
            request_id: 5,
            admitted: true,
            status: Status::Ok,
            queue_ns: 1000,
            compute_ns: 2000,
            batch_size: 2,
            bytes_in: 16,
            bytes_out: 8,
        });
        st.record(Record::Infer {
            request_id: 6,
            admitted: false,
            status: Status::QueueFull,
            queue_ns: 10,
            compute_ns: 0,
            batch_size: 0,
            bytes_in: 99,
            bytes_out: 99,
        });
        st.record(Record::Other);
        drop(st);
        let c = t.trace(350);
        assert_eq!(c.uptime_ns, 250);
        assert_eq!(c.completed, 3);
        assert_eq!(c.in_flight, 0);
        assert_eq!((c.bytes_in, c.bytes_out), (16, 8));
        assert_eq!(c.infer_status[Status::Ok as usize], 1);
        assert_eq!(c.infer_status[Status::QueueFull as usize], 1);
        assert_eq!(c.batched, 1);
        assert_eq!(c.queue_ns_total, 1000);
    }
}
