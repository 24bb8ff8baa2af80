//! Many threads, one device: submitting chains and waiting for their completions.
//!
//! Whoever waits polls the used rings for everybody (under a short lock) and files each
//! completion under the sequence number its submission got; each waiter takes its own.
//! (Not under the head index: the ring frees a chain's descriptors as soon as its
//! completion is seen, so the same head can be in flight again before the first
//! waiter has collected its result.) So any number of
//! requests can be in flight from any number of threads (the device batches them),
//! without a dedicated completion thread.
//!
//! A device that breaks the ring protocol (a used id that is not in flight, an index
//! jump) or asks for a reset is reset and initialised again. Requests in flight at
//! that moment are lost (spec §5): their waiters get [`DriverError::Lost`]. An epoch
//! counter tells waiters apart from requests submitted after the reset, whose heads
//! may be the same numbers.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::device::{AiInferDevice, DeviceError};
use crate::stats::GuestStats;
use crate::virtqueue::{ChainBuffer, VirtqueueError};

/// Errors of the driver.
#[derive(Debug, Error)]
pub enum DriverError {
    /// The device failed in a way that is not about one request.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The request was in flight when the device was reset; it will never complete.
    #[error("Request lost: the device was reset while it was in flight ({0})")]
    Lost(String),
    /// The device returned this chain with an impossible used length.
    #[error("Device completed the chain with an invalid length: {0}")]
    BadCompletion(String),
}

/// A chain in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// Queue it was submitted on.
    pub queue: u16,
    seq: u64,
    epoch: u64,
}

struct State {
    device: AiInferDevice,
    /// Incremented by every reset: tickets of older epochs are lost.
    epoch: u64,
    /// Why the last reset happened (reported to the waiters it orphaned).
    last_reset: String,
    /// Sequence number for the next submission (each chain carries its own as the
    /// ring's token, so a completion names its submitter).
    next_seq: u64,
    /// Completions seen but not yet collected: sequence number -> used.len or error.
    done: HashMap<u64, Result<u32, String>>,
}

/// The device shared by the threads of this process.
pub struct Driver {
    state: Mutex<State>,
    policy: BackoffPolicy,
    stats: GuestStats,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("policy", &self.policy)
            .finish()
    }
}

impl Driver {
    /// Wraps an initialised device.
    pub fn new(device: AiInferDevice, policy: BackoffPolicy) -> Self {
        Driver {
            state: Mutex::new(State {
                device,
                epoch: 0,
                last_reset: String::new(),
                next_seq: 0,
                done: HashMap::new(),
            }),
            policy,
            stats: GuestStats::default(),
        }
    }

    /// The guest-side counters.
    pub fn stats(&self) -> &GuestStats {
        &self.stats
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock point; a panicking thread cannot
        // leave it half-updated in a way the next user cannot handle.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the device (for its configuration, queue count, pool).
    pub fn with_device<T>(&self, f: impl FnOnce(&AiInferDevice) -> T) -> T {
        f(&self.lock().device)
    }

    /// Resets and re-initialises the device; every request in flight is lost.
    fn recover(&self, st: &mut State, why: String) -> Result<(), DriverError> {
        log::warn!("ai_infer device reset: {why}");
        self.stats.device_reset();
        st.epoch += 1;
        st.last_reset = why;
        st.done.clear();
        st.device.initialise()?;
        Ok(())
    }

    /// Moves every returned chain into `done`; resets the device if it broke the ring.
    fn drain(&self, st: &mut State) -> Result<bool, DriverError> {
        let mut progress = false;
        for queue in 0..st.device.num_queues() {
            loop {
                match st.device.poll(queue) {
                    Ok(Some(used)) => {
                        st.done.insert(used.token, Ok(used.len));
                        progress = true;
                    }
                    Ok(None) => break,
                    Err(DeviceError::Queue(VirtqueueError::BadUsedLen {
                        token, len, max, ..
                    })) => {
                        let msg = format!("used.len {len} > writable {max}");
                        st.done.insert(token, Err(msg));
                        progress = true;
                    }
                    Err(DeviceError::Queue(e)) => {
                        self.recover(st, format!("queue {queue}: {e}"))?;
                        return Ok(true);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(progress)
    }

    /// Makes a chain available on `queue`, waiting for free descriptors if the queue
    /// is full of requests in flight.
    pub fn submit(&self, queue: u16, chain: &[ChainBuffer]) -> Result<Ticket, DriverError> {
        let mut backoff = Backoff::new(self.policy);
        loop {
            {
                let mut st = self.lock();
                let seq = st.next_seq;
                match st.device.submit(queue, chain, seq) {
                    Ok(_) => {
                        st.next_seq += 1;
                        return Ok(Ticket {
                            queue,
                            seq,
                            epoch: st.epoch,
                        });
                    }
                    Err(DeviceError::Queue(VirtqueueError::Full { needed, .. }))
                        if needed <= usize::from(st.device.queue_size(queue).unwrap_or(0)) =>
                    {
                        // Full of requests in flight: wait for some to complete (or for
                        // the device to ask for a reset, which frees them all).
                        if !self.drain(&mut st)?
                            && backoff.is_sleeping()
                            && st.device.needs_reset()?
                        {
                            self.recover(&mut st, "device set DEVICE_NEEDS_RESET".into())?;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            self.stats.backoff(backoff.wait());
        }
    }

    /// Waits for the chain of `ticket` to come back; returns its used length.
    pub fn wait(&self, ticket: Ticket) -> Result<u32, DriverError> {
        let mut backoff = Backoff::new(self.policy);
        loop {
            {
                let mut st = self.lock();
                if st.epoch != ticket.epoch {
                    return Err(DriverError::Lost(st.last_reset.clone()));
                }
                if let Some(done) = st.done.remove(&ticket.seq) {
                    return done.map_err(DriverError::BadCompletion);
                }
                if self.drain(&mut st)? {
                    backoff.reset();
                    continue;
                }
                if backoff.is_sleeping() && st.device.needs_reset()? {
                    self.recover(&mut st, "device set DEVICE_NEEDS_RESET".into())?;
                    continue;
                }
            }
            self.stats.backoff(backoff.wait());
        }
    }

    /// Submits and waits.
    pub fn call(&self, queue: u16, chain: &[ChainBuffer]) -> Result<u32, DriverError> {
        let ticket = self.submit(queue, chain)?;
        self.wait(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceOptions;
    use crate::dma::DmaBuffer;
    use crate::testing::{FakeDeviceBehaviour, FakeVirtioPci};
    use ai_infer_protocol::virtio_pci::status;
    use std::sync::Arc;
    use std::time::Duration;

    fn quick() -> BackoffPolicy {
        BackoffPolicy {
            spins: 10,
            yields: 2,
            min_sleep: Duration::from_micros(50),
            max_sleep: Duration::from_micros(200),
        }
    }

    /// A fake that completes only what the test tells it to, a driver with one queue
    /// of `queue_size`, and a chain (8 bytes readable, 64 writable) in `buf`.
    fn manual(queue_size: u16) -> (FakeVirtioPci, Driver, DmaBuffer, Vec<ChainBuffer>) {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            auto_complete: false,
            ..Default::default()
        });
        let opts = DeviceOptions {
            queues: 1,
            queue_size,
            connect_timeout: Duration::from_millis(100),
        };
        let drv = Driver::new(
            AiInferDevice::new(fake.transport(), fake.pool(), opts).unwrap(),
            quick(),
        );
        let buf = fake.pool().alloc(128).unwrap();
        let a = buf.device_addr().unwrap();
        let chain = vec![
            ChainBuffer {
                addr: a,
                len: 8,
                writable: false,
            },
            ChainBuffer {
                addr: a + 64,
                len: 64,
                writable: true,
            },
        ];
        (fake, drv, buf, chain)
    }

    #[test]
    fn completions_reach_the_right_waiter_out_of_order() {
        let (fake, drv, _buf, c) = manual(8);
        let t1 = drv.submit(0, &c).unwrap();
        let t2 = drv.submit(0, &c).unwrap();
        fake.complete_raw(0, 2, 11); // heads: t1 = 0, t2 = 2
        fake.complete_raw(0, 0, 22);
        assert_eq!(drv.wait(t1).unwrap(), 22);
        assert_eq!(drv.wait(t2).unwrap(), 11);
    }

    #[test]
    fn a_head_reused_before_its_first_result_is_collected_keeps_results_apart() {
        let (fake, drv, _buf, c) = manual(8);
        let a = drv.submit(0, &c).unwrap(); // head 0
        let b = drv.submit(0, &c).unwrap(); // head 2
        fake.complete_raw(0, 0, 11);
        fake.complete_raw(0, 2, 22);
        // Waiting for b also sees a's completion and frees its descriptors...
        assert_eq!(drv.wait(b).unwrap(), 22);
        let _c = drv.submit(0, &c).unwrap(); // head 2 again
        let d = drv.submit(0, &c).unwrap(); // head 0 again, a not collected yet
        fake.complete_raw(0, 0, 33);
        assert_eq!(drv.wait(d).unwrap(), 33);
        assert_eq!(drv.wait(a).unwrap(), 11);
    }

    #[test]
    fn threads_share_the_device() {
        let (fake, drv, _buf, c) = manual(4);
        let drv = Arc::new(drv);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A device thread completing whatever is available, newest first.
        let dev = {
            let fake = fake.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // The fake's chains are not valid requests: complete them raw.
                    let mut st = fake.state();
                    let ring = st.rings[0].as_mut().unwrap();
                    let mut taken = Vec::new();
                    while let Some((head, _)) = ring.take() {
                        taken.push(head);
                    }
                    for head in taken.into_iter().rev() {
                        ring.complete(u32::from(head), 64);
                    }
                    drop(st);
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
        };
        // 8 threads x 50 requests through a queue of 4 entries (2 descriptors each).
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let drv = drv.clone();
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        assert_eq!(drv.call(0, &c).unwrap(), 64);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        dev.join().unwrap();
        assert!(drv.stats().snapshot().spins + drv.stats().snapshot().sleeps > 0);
    }

    #[test]
    fn broken_ring_resets_and_loses_requests_in_flight() {
        let (fake, drv, _buf, c) = manual(8);
        let t = drv.submit(0, &c).unwrap();
        fake.complete_raw(0, 7, 64); // head 7 is not in flight
        assert!(matches!(drv.wait(t), Err(DriverError::Lost(why)) if why.contains("descriptor 7")));
        assert_eq!(drv.stats().snapshot().device_resets, 1);
        // The device works again afterwards.
        let t = drv.submit(0, &c).unwrap();
        fake.complete_raw(0, 0, 64);
        assert_eq!(drv.wait(t).unwrap(), 64);
    }

    #[test]
    fn bad_used_len_fails_only_that_request() {
        let (fake, drv, _buf, c) = manual(8);
        let t = drv.submit(0, &c).unwrap();
        fake.complete_raw(0, 0, 65);
        assert!(matches!(drv.wait(t), Err(DriverError::BadCompletion(_))));
        assert_eq!(drv.stats().snapshot().device_resets, 0);
    }

    #[test]
    fn needs_reset_is_noticed_while_waiting() {
        let (fake, drv, _buf, c) = manual(8);
        let t = drv.submit(0, &c).unwrap();
        fake.state().status |= status::DEVICE_NEEDS_RESET;
        assert!(matches!(drv.wait(t), Err(DriverError::Lost(why)) if why.contains("NEEDS_RESET")));
        assert!(!drv.with_device(|d| d.needs_reset().unwrap()));
    }
}
