//! The serving half of virtio-net: moves frames between the queues and the backend.
//!
//! Epoll is level-triggered, and the tap is only watched for what can make progress:
//! EPOLLIN while no received frame is waiting for the guest (a frame held back for lack
//! of receive buffers or by the rate limiter turns it off until the rx kick or the
//! limiter's timer), EPOLLOUT only while a transmit frame waits for a full tap. So an
//! idle or stalled device never spins, and reading stops at [`RX_BUDGET`] frames per
//! wake-up so a busy tap cannot starve transmit (level triggering wakes us again).
//!
//! A frame read from the tap is never dropped for lack of buffers: it waits in the
//! worker's buffer, and the tap keeps the ones after it.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    gather_tx_frame, write_rx_chain, NetBackend, NetMetrics, MAX_FRAME_LEN, NUM_BUFFERS_OFFSET,
    RX_QUEUE, TX_QUEUE, VNET_HDR_LEN,
};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, TokenType};
use crate::virtio::worker::{epoll_add, DEVICE_TOKEN_BASE};
use crate::virtio::VirtioInterrupt;

/// The tap (or test backend).
pub(super) const TAP_TOKEN: u64 = DEVICE_TOKEN_BASE;
/// The receive rate limiter's timer.
pub(super) const RX_LIMITER_TOKEN: u64 = DEVICE_TOKEN_BASE + 1;
/// The transmit rate limiter's timer.
pub(super) const TX_LIMITER_TOKEN: u64 = DEVICE_TOKEN_BASE + 2;
/// New rate limits from [`super::Net::update_rate_limiters`].
pub(super) const UPDATE_TOKEN: u64 = DEVICE_TOKEN_BASE + 3;

/// Frames read from the tap per wake-up.
pub(super) const RX_BUDGET: usize = 64;

/// New limits for either direction (`None`: unchanged).
pub(super) struct LimiterUpdate {
    pub rx: Option<RateLimiterConfig>,
    pub tx: Option<RateLimiterConfig>,
}

/// What the device keeps between activations: the backend and the rate limiters.
pub(super) struct NetResources {
    pub backend: Box<dyn NetBackend>,
    pub rx_limiter: RateLimiter,
    pub tx_limiter: RateLimiter,
    pub updates: Receiver<LimiterUpdate>,
    pub update_evt: EventFd,
}

impl NetResources {
    pub(super) fn apply(&mut self, update: LimiterUpdate) {
        if let Some(cfg) = update.rx {
            self.rx_limiter.update(cfg.bandwidth, cfg.ops);
        }
        if let Some(cfg) = update.tx {
            self.tx_limiter.update(cfg.bandwidth, cfg.ops);
        }
    }
}

/// What became of a received frame.
#[derive(Debug, PartialEq, Eq)]
enum RxDelivery {
    /// In the guest's buffers.
    Delivered,
    /// Cannot ever fit the guest's buffers; counted.
    Dropped,
    /// Not enough buffers now: the frame stays, nothing was published.
    NoBuffers,
}

/// The virtio-net worker state.
pub(super) struct NetWorker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<VirtioInterrupt>,
    res: NetResources,
    metrics: Arc<NetMetrics>,
    mergeable: bool,
    /// Which queues got used buffers since their last interrupt.
    used: [bool; 2],
    /// Chains filled for the frame being delivered (head, bytes), reused.
    rx_chains: Vec<(u16, u32)>,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` not yet delivered.
    rx_pending: Option<usize>,
    /// Whether the rate limiter already paid for it.
    rx_charged: bool,
    tx_buf: Vec<u8>,
    /// Length of the frame in `tx_buf` not yet sent.
    tx_pending: Option<usize>,
    tx_charged: bool,
    /// The pending frame met a full tap.
    tx_wants_writable: bool,
    /// What the tap is registered for (None: not registered).
    tap_events: Option<EventSet>,
    /// The tap hung up or failed: transmit frames are dropped, nothing is received.
    tap_failed: bool,
    tap_error_logged: bool,
}

impl NetWorker {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        rxq: Queue,
        txq: Queue,
        interrupt: Arc<VirtioInterrupt>,
        res: NetResources,
        metrics: Arc<NetMetrics>,
        mergeable: bool,
    ) -> Self {
        NetWorker {
            mem,
            rxq,
            txq,
            interrupt,
            res,
            metrics,
            mergeable,
            used: [false; 2],
            rx_chains: Vec::new(),
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_charged: false,
            tx_buf: vec![0; MAX_FRAME_LEN],
            tx_pending: None,
            tx_charged: false,
            tx_wants_writable: false,
            tap_events: None,
            tap_failed: false,
            tap_error_logged: false,
        }
    }

    /// The queues (rx, tx) and what the device keeps; frames in flight are dropped.
    pub(super) fn into_parts(self) -> (Vec<Queue>, NetResources) {
        (vec![self.rxq, self.txq], self.res)
    }

    /// What the tap is registered for in epoll (`None`: not registered).
    #[cfg(test)]
    pub(super) fn tap_interest(&self) -> Option<EventSet> {
        self.tap_events
    }

    /// Whether a received frame waits for the guest.
    #[cfg(test)]
    pub(super) fn rx_pending(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Whether a transmit frame waits for the limiter or the tap.
    #[cfg(test)]
    pub(super) fn tx_pending(&self) -> bool {
        self.tx_pending.is_some()
    }

    /// The tap events that can make progress now.
    pub(super) fn wanted_tap_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.rx_pending.is_none() {
            events |= EventSet::IN;
        }
        if self.tx_pending.is_some() && self.tx_wants_writable {
            events |= EventSet::OUT;
        }
        events
    }

    /// Registers the tap for what can make progress now, or removes it once failed.
    fn update_tap_interest(&mut self, epoll: &Epoll) {
        let fd: RawFd = self.res.backend.as_raw_fd();
        if self.tap_failed {
            if self.tap_events.take().is_some() {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            return;
        }
        let want = self.wanted_tap_events();
        if self.tap_events == Some(want) {
            return;
        }
        let op = if self.tap_events.is_some() {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        match epoll.ctl(op, fd, EpollEvent::new(want, TAP_TOKEN)) {
            Ok(()) => self.tap_events = Some(want),
            Err(e) => log::error!("virtio-net: cannot watch the tap: {e}"),
        }
    }

    /// The tap hung up or failed: stop using it for good (it leaves epoll at the next
    /// interest update).
    fn fail_tap(&mut self, why: &str) {
        if self.tap_failed {
            return;
        }
        log::error!("virtio-net: the tap failed ({why}); frames are dropped from now on");
        self.tap_failed = true;
        self.rx_pending = None;
    }

    fn log_tap_error(&mut self, what: &str, e: &io::Error) {
        if self.tap_error_logged {
            log::debug!("virtio-net: tap {what} failed: {e}");
        } else {
            log::warn!("virtio-net: tap {what} failed: {e} (further errors are only counted)");
            self.tap_error_logged = true;
        }
    }

    /// Interrupts the guest for `queue` if it has used buffers and wants to know.
    fn signal_used(&mut self, queue: usize) {
        if !std::mem::take(&mut self.used[queue]) {
            return;
        }
        let q = if queue == RX_QUEUE {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        // When the ring cannot be read, interrupting is the safe side.
        if q.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_queue(queue) {
                log::error!("virtio-net: cannot interrupt the guest for queue {queue}: {e}");
            }
        }
    }

    /// Reads from the tap and delivers to the guest until the tap is empty, the guest
    /// runs out of buffers, the limiter blocks or the budget is spent.
    pub(super) fn process_rx(&mut self) {
        let mut budget = RX_BUDGET;
        let mut rearmed = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    if self.tap_failed || budget == 0 {
                        break;
                    }
                    budget -= 1;
                    match self.res.backend.read_frame(&mut self.rx_buf) {
                        Ok(n) if n < VNET_HDR_LEN || n > self.rx_buf.len() => {
                            NetMetrics::inc(&self.metrics.rx_dropped_malformed);
                            continue;
                        }
                        Ok(n) => {
                            self.rx_pending = Some(n);
                            self.rx_charged = false;
                            n
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // A tap only fails a read once it is detached or gone.
                            NetMetrics::inc(&self.metrics.rx_tap_errors);
                            self.fail_tap(&format!("read: {e}"));
                            break;
                        }
                    }
                }
            };
            if !self.rx_charged {
                if !charge(&mut self.res.rx_limiter, len, &self.metrics.rx_throttled) {
                    break;
                }
                self.rx_charged = true;
            }
            match self.deliver_rx(len) {
                RxDelivery::Delivered => {
                    self.rx_pending = None;
                    NetMetrics::inc(&self.metrics.rx_packets);
                    NetMetrics::add(&self.metrics.rx_bytes, len - VNET_HDR_LEN);
                }
                RxDelivery::Dropped => self.rx_pending = None,
                RxDelivery::NoBuffers => {
                    NetMetrics::inc(&self.metrics.rx_no_buffer_waits);
                    // Buffers posted since we looked: try once more, else wait for the kick.
                    if rearmed || !self.arm_rx_kick() {
                        break;
                    }
                    rearmed = true;
                }
            }
        }
        self.signal_used(RX_QUEUE);
    }

    /// Asks the guest to kick the rx queue when it posts buffers beyond those it posted
    /// so far; true if it already has.
    fn arm_rx_kick(&mut self) -> bool {
        if !self.rxq.ready() {
            return false;
        }
        // `enable_notification` asks for a kick past `next_avail`; after a partial
        // merge was rolled back that is behind what the guest posted, so point it at
        // the guest's avail index for the call.
        let saved = self.rxq.next_avail();
        let Ok(avail) = self.rxq.avail_idx(&self.mem, Ordering::Acquire) else {
            return false;
        };
        self.rxq.set_next_avail(avail.0);
        let more = self.rxq.enable_notification(&self.mem);
        self.rxq.set_next_avail(saved);
        matches!(more, Ok(true))
    }

    /// Copies the frame in `rx_buf[..len]` into the guest's receive buffers.
    fn deliver_rx(&mut self, len: usize) -> RxDelivery {
        if len > self.rx_buf.len() || len < VNET_HDR_LEN {
            return RxDelivery::Dropped;
        }
        if !self.rxq.ready() {
            return RxDelivery::NoBuffers;
        }
        if self.mergeable {
            self.deliver_rx_mergeable(len)
        } else {
            self.deliver_rx_single(len)
        }
    }

    /// Without MRG_RXBUF: the whole frame in one chain, num_buffers 1.
    fn deliver_rx_single(&mut self, len: usize) -> RxDelivery {
        self.rx_buf[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&1u16.to_le_bytes());
        let used_len = u32::try_from(len).unwrap_or(u32::MAX);
        loop {
            let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                return RxDelivery::NoBuffers;
            };
            let head = chain.head_index();
            match write_rx_chain(&self.mem, chain, 0, &self.rx_buf[..len]) {
                Ok(n) if n == len => {
                    self.used[RX_QUEUE] |= return_used(&mut self.rxq, &self.mem, head, used_len);
                    return RxDelivery::Delivered;
                }
                Ok(_) => {
                    // Too small for this frame: drop it and hand the buffer back empty,
                    // as the driver then replaces it (keeping it would drop every
                    // frame as large after it).
                    NetMetrics::inc(&self.metrics.rx_dropped_oversize);
                    self.used[RX_QUEUE] |= return_used(&mut self.rxq, &self.mem, head, 0);
                    return RxDelivery::Dropped;
                }
                Err(e) => {
                    log::debug!("virtio-net: bad receive chain {head}: {e}");
                    NetMetrics::inc(&self.metrics.rx_bad_buffers);
                    self.used[RX_QUEUE] |= return_used(&mut self.rxq, &self.mem, head, 0);
                }
            }
        }
    }

    /// With MRG_RXBUF: as many chains as the frame needs, the first holding the header,
    /// num_buffers set to their count. Nothing is published until the frame fits.
    fn deliver_rx_mergeable(&mut self, len: usize) -> RxDelivery {
        let ring = usize::from(self.rxq.size());
        'attempt: loop {
            let start = self.rxq.next_avail();
            self.rx_chains.clear();
            let mut first = None;
            let mut off = 0;
            while off < len {
                if self.rx_chains.len() >= ring {
                    // The whole ring cannot hold it, now or later.
                    self.rxq.set_next_avail(start);
                    NetMetrics::inc(&self.metrics.rx_dropped_oversize);
                    return RxDelivery::Dropped;
                }
                let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                    self.rxq.set_next_avail(start);
                    return RxDelivery::NoBuffers;
                };
                let head = chain.head_index();
                let kept = chain.clone();
                let min = if first.is_none() { VNET_HDR_LEN } else { 1 };
                match write_rx_chain(&self.mem, chain, 0, &self.rx_buf[off..len]) {
                    Ok(n) if n >= min => {
                        self.rx_chains
                            .push((head, u32::try_from(n).unwrap_or(u32::MAX)));
                        off += n;
                        first.get_or_insert(kept);
                    }
                    result => {
                        // A chain we cannot use: hand it back empty with those already
                        // filled for this frame (the driver drops empty buffers) and
                        // start over after it.
                        if let Err(e) = result {
                            log::debug!("virtio-net: bad receive chain {head}: {e}");
                        }
                        NetMetrics::inc(&self.metrics.rx_bad_buffers);
                        for &(h, _) in &self.rx_chains {
                            self.used[RX_QUEUE] |= return_used(&mut self.rxq, &self.mem, h, 0);
                        }
                        self.used[RX_QUEUE] |= return_used(&mut self.rxq, &self.mem, head, 0);
                        continue 'attempt;
                    }
                }
            }
            let count = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
            if let Some(first) = first {
                // The first chain holds the whole header (checked above). If the guest
                // rewrote its descriptors meanwhile, only its own buffer suffers.
                if let Err(e) =
                    write_rx_chain(&self.mem, first, NUM_BUFFERS_OFFSET, &count.to_le_bytes())
                {
                    log::debug!("virtio-net: cannot write num_buffers: {e}");
                }
            }
            for &(head, n) in &self.rx_chains {
                self.used[RX_QUEUE] |= return_used(&mut self.rxq, &self.mem, head, n);
            }
            return RxDelivery::Delivered;
        }
    }

    /// Sends the guest's frames until the ring is empty or the limiter or a full tap
    /// makes one wait.
    pub(super) fn process_tx(&mut self) {
        if !self.txq.ready() {
            return;
        }
        let mut rearmed = false;
        if let Err(e) = self.txq.disable_notification(&self.mem) {
            log::debug!("virtio-net: cannot disable tx notifications: {e}");
        }
        loop {
            if !self.flush_tx() {
                break;
            }
            match self.txq.pop_descriptor_chain(&self.mem) {
                Some(chain) => {
                    rearmed = false;
                    let head = chain.head_index();
                    let result = gather_tx_frame(&self.mem, chain, &mut self.tx_buf);
                    // The frame is copied out: the guest may have its buffers back.
                    self.used[TX_QUEUE] |= return_used(&mut self.txq, &self.mem, head, 0);
                    match result {
                        Ok(len) => {
                            self.tx_pending = Some(len);
                            self.tx_charged = false;
                        }
                        Err(e) => {
                            log::debug!("virtio-net: dropping transmit chain {head}: {e}");
                            let counter = if e.is_oversize() {
                                &self.metrics.tx_dropped_oversize
                            } else {
                                &self.metrics.tx_dropped_malformed
                            };
                            NetMetrics::inc(counter);
                        }
                    }
                }
                None => {
                    // Ask for a kick; if the guest posted meanwhile, go on (once without
                    // progress, so a corrupt avail index cannot keep us here).
                    if rearmed || !matches!(self.txq.enable_notification(&self.mem), Ok(true)) {
                        break;
                    }
                    rearmed = true;
                }
            }
        }
        self.signal_used(TX_QUEUE);
    }

    /// Sends the pending transmit frame, if any; false while it has to wait.
    fn flush_tx(&mut self) -> bool {
        let Some(len) = self.tx_pending else {
            return true;
        };
        if !self.tx_charged {
            if !charge(&mut self.res.tx_limiter, len, &self.metrics.tx_throttled) {
                return false;
            }
            self.tx_charged = true;
        }
        if self.tap_failed {
            NetMetrics::inc(&self.metrics.tx_tap_errors);
            self.tx_pending = None;
            return true;
        }
        let mut interrupted = 0;
        loop {
            match self.res.backend.write_frame(&self.tx_buf[..len]) {
                Ok(_) => {
                    NetMetrics::inc(&self.metrics.tx_packets);
                    NetMetrics::add(&self.metrics.tx_bytes, len - VNET_HDR_LEN);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.tx_wants_writable {
                        NetMetrics::inc(&self.metrics.tx_tap_full);
                    }
                    self.tx_wants_writable = true;
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < 3 => {
                    interrupted += 1;
                }
                Err(e) => {
                    // Dropped, as a NIC drops what it cannot send (e.g. the link is down).
                    NetMetrics::inc(&self.metrics.tx_tap_errors);
                    self.log_tap_error("write", &e);
                    break;
                }
            }
        }
        self.tx_pending = None;
        self.tx_wants_writable = false;
        true
    }

    fn apply_updates(&mut self) {
        let _ = self.res.update_evt.read();
        while let Ok(update) = self.res.updates.try_recv() {
            self.res.apply(update);
        }
    }
}

/// Puts a chain on `q`'s used ring; whether it did (a guest-made bad head cannot be).
fn return_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match q.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("virtio-net: cannot return chain {head}: {e}");
            false
        }
    }
}

/// Takes one op and `bytes` from `limiter`; false (and counted) when it has to wait for
/// the limiter's timer.
fn charge(limiter: &mut RateLimiter, bytes: usize, throttled: &AtomicU64) -> bool {
    if limiter.is_blocked() {
        return false;
    }
    if !limiter.consume(1, TokenType::Ops) {
        NetMetrics::inc(throttled);
        return false;
    }
    if !limiter.consume(u64::try_from(bytes).unwrap_or(u64::MAX), TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        NetMetrics::inc(throttled);
        return false;
    }
    true
}

impl crate::virtio::WorkerLoop for NetWorker {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        epoll_add(epoll, &self.res.update_evt, EventSet::IN, UPDATE_TOKEN)?;
        epoll_add(epoll, &self.res.rx_limiter, EventSet::IN, RX_LIMITER_TOKEN)?;
        epoll_add(epoll, &self.res.tx_limiter, EventSet::IN, TX_LIMITER_TOKEN)?;
        self.update_tap_interest(epoll);
        if self.tap_events.is_none() {
            return Err(io::Error::other("cannot watch the tap"));
        }
        Ok(())
    }

    fn queue_event(&mut self, index: usize, epoll: &Epoll) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
        self.update_tap_interest(epoll);
    }

    fn device_event(&mut self, token: u64, events: EventSet, epoll: &Epoll) {
        match token {
            TAP_TOKEN => {
                if events.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    self.fail_tap("error or hang-up");
                    // Let the guest's pending transmit frames drain (dropped).
                    self.process_tx();
                } else {
                    if events.contains(EventSet::OUT) {
                        self.process_tx();
                    }
                    if events.contains(EventSet::IN) {
                        self.process_rx();
                    }
                }
            }
            RX_LIMITER_TOKEN => {
                if let Err(e) = self.res.rx_limiter.event_handler() {
                    log::debug!("virtio-net: rx rate limiter: {e}");
                }
                self.process_rx();
            }
            TX_LIMITER_TOKEN => {
                if let Err(e) = self.res.tx_limiter.event_handler() {
                    log::debug!("virtio-net: tx rate limiter: {e}");
                }
                self.process_tx();
            }
            UPDATE_TOKEN => {
                self.apply_updates();
                self.process_tx();
                self.process_rx();
            }
            _ => {}
        }
        self.update_tap_interest(epoll);
    }
}
