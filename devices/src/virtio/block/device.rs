//! The virtio-blk device: features and configuration space on the vCPU side, the request
//! loop on the worker thread.

use std::io;
use std::mem::offset_of;
use std::num::Wrapping;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskImage;
use super::request::{
    parse_request, status_byte, Operation, ParseError, Request, ID_LEN, MAX_DISCARD_SECTORS,
    MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE,
};
use super::{BlockConfig, BlockError};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
use crate::virtio::worker::{epoll_add, DEVICE_TOKEN_BASE};
use crate::virtio::{
    read_config_bytes, ActivateParams, DeviceUpdate, VirtioDevice, VirtioInterrupt, VirtioWorker,
    WorkerLoop, WorkerThread, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Largest ring the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Epoll token of the rate limiter's timer.
pub(super) const LIMITER_TOKEN: u64 = DEVICE_TOKEN_BASE;
/// Chains served per wake-up before the worker yields (and re-kicks itself), so a
/// driver that keeps the ring full cannot keep it from seeing a stop request.
const MAX_CHAINS_PER_PASS: usize = QUEUE_MAX_SIZE as usize;
/// Size of the configuration space: `struct virtio_blk_config` up to the secure-erase
/// fields, which need a feature not offered.
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
/// Logical block size advertised (VIRTIO_BLK_F_BLK_SIZE).
const BLOCK_SIZE: u32 = 512;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep serving.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the device counts; shared with its worker.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Requests completed (whatever their status).
    pub requests: AtomicU64,
    /// Requests refused as malformed (IOERR, or returned without a status).
    pub invalid_requests: AtomicU64,
    /// Requests that failed on the host (IOERR).
    pub io_errors: AtomicU64,
    /// Chains that could not be put on the used ring.
    pub lost_chains: AtomicU64,
    /// Times the queue waited for the rate limiter.
    pub rate_limited: AtomicU64,
    /// Set when the driver broke the ring (its available index claims more chains than
    /// the ring holds): the device stops serving until reset.
    pub broken: AtomicBool,
}

/// A virtio-blk device on a raw image.
pub struct Block {
    id: String,
    read_only: bool,
    serial: [u8; ID_LEN],
    disk: Arc<Mutex<DiskImage>>,
    /// Mirror of the disk's capacity, so reading the configuration never waits for I/O.
    capacity_sectors: u64,
    limiter: Arc<Mutex<RateLimiter>>,
    features: u64,
    metrics: Arc<BlockMetrics>,
    worker: Option<VirtioWorker<BlockWorker>>,
    /// The thread `worker` runs on, started with the device.
    thread: WorkerThread,
    interrupt: Option<Arc<VirtioInterrupt>>,
}

impl Block {
    /// Opens the image and prepares the device; nothing runs until activation.
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        let serial = match &cfg.serial {
            Some(s) if s.len() > ID_LEN => {
                return Err(BlockError::SerialTooLong { serial: s.clone() })
            }
            Some(s) => s.as_bytes(),
            None => &cfg.id.as_bytes()[..cfg.id.len().min(ID_LEN)],
        };
        let mut id_bytes = [0u8; ID_LEN];
        id_bytes[..serial.len()].copy_from_slice(serial);

        let limiter = match &cfg.rate_limiter {
            Some(rl) => {
                rl.validate().map_err(|source| BlockError::RateLimiter {
                    id: cfg.id.clone(),
                    source,
                })?;
                RateLimiter::new(rl)
            }
            None => RateLimiter::unlimited(),
        }
        .map_err(|source| BlockError::RateLimiterTimer {
            id: cfg.id.clone(),
            source,
        })?;

        let disk = DiskImage::open(&cfg.path, cfg.read_only)?;
        let thread = WorkerThread::spawn(&format!("virtio-blk-{}", cfg.id)).map_err(|source| {
            BlockError::Thread {
                id: cfg.id.clone(),
                source,
            }
        })?;
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if cfg.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        Ok(Self {
            id: cfg.id,
            read_only: cfg.read_only,
            serial: id_bytes,
            capacity_sectors: disk.capacity_sectors(),
            disk: Arc::new(Mutex::new(disk)),
            limiter: Arc::new(Mutex::new(limiter)),
            features,
            metrics: Arc::default(),
            worker: None,
            thread,
            interrupt: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The drive's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the device counted so far.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// Swaps the backing file: opens `path` (read-only as the drive is), updates the
    /// capacity and, when active, raises the configuration-change interrupt. Requests
    /// already running finish on the old file.
    pub fn update_path(&mut self, path: &Path) -> Result<(), BlockError> {
        let disk = DiskImage::open(path, self.read_only)?;
        let capacity = disk.capacity_sectors();
        *lock(&self.disk) = disk;
        self.capacity_sectors = capacity;
        if let Some(irq) = &self.interrupt {
            if let Err(e) = irq.signal_config() {
                log::error!(
                    "virtio-blk {}: cannot signal the new capacity: {e}",
                    self.id
                );
            }
        }
        Ok(())
    }

    /// Changes the limits, also while running: `Some` applies like a PATCH (an absent
    /// bucket is kept, a bucket with size 0 and refill_time 0 is removed), `None` removes
    /// both limits.
    pub fn update_rate_limiter(
        &mut self,
        cfg: Option<RateLimiterConfig>,
    ) -> Result<(), BlockError> {
        let (bandwidth, ops) = match cfg {
            Some(cfg) => {
                cfg.validate().map_err(|source| BlockError::RateLimiter {
                    id: self.id.clone(),
                    source,
                })?;
                (cfg.bandwidth, cfg.ops)
            }
            None => (
                Some(TokenBucketConfig::default()),
                Some(TokenBucketConfig::default()),
            ),
        };
        lock(&self.limiter).update(bandwidth, ops);
        Ok(())
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            c[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity_sectors.to_le_bytes(),
        );
        let seg_max = u32::from(QUEUE_MAX_SIZE) - 2;
        put(
            offset_of!(virtio_blk_config, seg_max),
            &seg_max.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &BLOCK_SIZE.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &1u16.to_le_bytes(),
        );
        if !self.read_only {
            let one = 1u32.to_le_bytes();
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(offset_of!(virtio_blk_config, max_discard_seg), &one);
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &one,
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
            );
            put(offset_of!(virtio_blk_config, max_write_zeroes_seg), &one);
            put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        }
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, params: ActivateParams) -> io::Result<()> {
        if self.worker.is_some() {
            log::warn!(
                "virtio-blk {}: activated while running; restarting",
                self.id
            );
            self.reset();
        }
        let ActivateParams {
            features,
            memory,
            queues,
            kicks,
            interrupt,
        } = params;
        let (Ok([mut queue]), 1) = (<[Queue; 1]>::try_from(queues), kicks.len()) else {
            let e = io::Error::new(
                io::ErrorKind::InvalidInput,
                "virtio-blk needs exactly one queue and one kick",
            );
            log::error!("virtio-blk {}: {e}", self.id);
            return Err(e);
        };
        queue.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.metrics.broken.store(false, Ordering::Relaxed);
        let self_kick = kicks[0].try_clone()?;
        let worker = BlockWorker {
            mem: memory,
            queue,
            interrupt: interrupt.clone(),
            disk: self.disk.clone(),
            limiter: self.limiter.clone(),
            serial: self.serial,
            self_kick: Some(self_kick),
            metrics: self.metrics.clone(),
        };
        let worker = VirtioWorker::spawn(&self.thread, kicks, worker).inspect_err(|e| {
            log::error!("virtio-blk {}: cannot start its worker: {e}", self.id);
        })?;
        self.worker = Some(worker);
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn needs_reset(&self) -> bool {
        self.metrics.broken.load(Ordering::Relaxed)
    }

    fn reset(&mut self) -> Option<Vec<Queue>> {
        self.interrupt = None;
        let worker = self.worker.take()?;
        match worker.stop() {
            Some(state) => Some(vec![state.queue]),
            None => {
                log::error!("virtio-blk {}: its worker died; the queue is lost", self.id);
                None
            }
        }
    }

    fn update(&mut self, update: &DeviceUpdate) -> Result<(), String> {
        let DeviceUpdate::Drive { path, rate_limiter } = update else {
            return Err(format!("drive '{}' takes only drive changes", self.id));
        };
        if let Some(path) = path {
            self.update_path(path).map_err(|e| e.to_string())?;
        }
        if rate_limiter.is_some() {
            self.update_rate_limiter(*rate_limiter)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The serving half: owns the queue and guest memory while the device is active.
pub(super) struct BlockWorker {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) interrupt: Arc<VirtioInterrupt>,
    pub(super) disk: Arc<Mutex<DiskImage>>,
    pub(super) limiter: Arc<Mutex<RateLimiter>>,
    pub(super) serial: [u8; ID_LEN],
    /// The queue's kick, written to resume after yielding (`None`: the caller re-runs).
    pub(super) self_kick: Option<EventFd>,
    pub(super) metrics: Arc<BlockMetrics>,
}

impl WorkerLoop for BlockWorker {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        epoll_add(epoll, &*lock(&self.limiter), EventSet::IN, LIMITER_TOKEN)
    }

    fn queue_event(&mut self, _index: usize, _epoll: &Epoll) {
        self.serve_queue();
    }

    fn device_event(&mut self, token: u64, _events: EventSet, _epoll: &Epoll) {
        if token != LIMITER_TOKEN {
            return;
        }
        if let Err(e) = lock(&self.limiter).event_handler() {
            log::error!("virtio-blk: {e}");
        }
        self.serve_queue();
    }
}

impl BlockWorker {
    /// Serves available requests until the ring is empty, the rate limiter blocks, or
    /// [`MAX_CHAINS_PER_PASS`] were served; then interrupts the driver if it wants it.
    pub(super) fn serve_queue(&mut self) {
        // A queue the driver never enabled has no rings: touching them would write guest
        // memory at address 0.
        if !self.queue.ready()
            || self.metrics.broken.load(Ordering::Relaxed)
            || lock(&self.limiter).is_blocked()
        {
            return;
        }
        let mut served = 0;
        'ring: loop {
            if !self.ring_is_sane() {
                self.metrics.broken.store(true, Ordering::Relaxed);
                break;
            }
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                log::warn!("virtio-blk: cannot disable notifications: {e}");
            }
            loop {
                if served == MAX_CHAINS_PER_PASS {
                    self.yield_pass();
                    break 'ring;
                }
                let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                let head = chain.head_index();
                let disk = self.disk.clone();
                let disk = lock(&disk);
                let parsed = parse_request(&self.mem, chain, &disk.limits());
                if !self.admit(&parsed) {
                    // Served later, in order, when the limiter's timer fires.
                    self.queue.go_to_previous_position();
                    self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                    break 'ring;
                }
                let used_len = self.complete(&disk, parsed);
                drop(disk);
                served += 1;
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
                    self.metrics.lost_chains.fetch_add(1, Ordering::Relaxed);
                    log::debug!("virtio-blk: cannot return chain {head}: {e}");
                }
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-blk: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        if served > 0 {
            self.signal_used();
        }
    }

    /// Whether the driver's available index is within one ring of what was consumed.
    fn ring_is_sane(&self) -> bool {
        match self.queue.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(idx) if (idx - Wrapping(self.queue.next_avail())).0 <= self.queue.size() => true,
            Ok(idx) => {
                log::warn!(
                    "virtio-blk: available index {} is more than {} ahead of {}: the device needs a reset",
                    idx.0,
                    self.queue.size(),
                    self.queue.next_avail()
                );
                false
            }
            Err(e) => {
                log::warn!(
                    "virtio-blk: cannot read the available index: {e}; the device needs a reset"
                );
                false
            }
        }
    }

    fn yield_pass(&self) {
        if let Some(kick) = &self.self_kick {
            if let Err(e) = kick.write(1) {
                log::error!("virtio-blk: cannot reschedule the queue: {e}");
            }
        }
    }

    /// Charges the request to the rate limiter: one op, plus its data bytes. False (and
    /// nothing charged) when the limiter is short.
    fn admit(&self, parsed: &Result<Request, ParseError>) -> bool {
        let mut limiter = lock(&self.limiter);
        if !limiter.consume(1, TokenType::Ops) {
            return false;
        }
        let bytes = parsed.as_ref().map_or(0, Request::data_len);
        if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
            limiter.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    fn signal_used(&mut self) {
        let needed = self
            .queue
            .needs_notification(&self.mem)
            .unwrap_or_else(|e| {
                log::warn!("virtio-blk: cannot read used_event: {e}");
                true
            });
        if needed {
            if let Err(e) = self.interrupt.signal_queue(0) {
                log::error!("virtio-blk: cannot interrupt the driver: {e}");
            }
        }
    }

    /// Runs the request (or reports why not) and writes its status; returns the used
    /// length: bytes written to the guest, data and status.
    fn complete(&self, disk: &DiskImage, parsed: Result<Request, ParseError>) -> u32 {
        let request = match parsed {
            Ok(request) => request,
            Err(ParseError { status, error }) => {
                self.metrics
                    .invalid_requests
                    .fetch_add(1, Ordering::Relaxed);
                log::debug!("virtio-blk: refused request: {error}");
                let Some(status_addr) = status else {
                    return 0;
                };
                return self.write_status(status_addr, error.status(), 0);
            }
        };
        match self.execute(disk, &request.operation) {
            Ok(written) => self.write_status(request.status, status_byte(VIRTIO_BLK_S_OK), written),
            Err(status) => self.write_status(request.status, status_byte(status), 0),
        }
    }

    fn write_status(&self, addr: vm_memory::GuestAddress, status: u8, data_written: u64) -> u32 {
        if let Err(e) = self.mem.write_obj(status, addr) {
            // The address was checked at parse time; guest memory does not shrink.
            log::warn!("virtio-blk: cannot write the status at {:#x}: {e}", addr.0);
            return 0;
        }
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    }

    /// Runs `op`; returns the data bytes written to the guest, or the error status.
    fn execute(&self, disk: &DiskImage, op: &Operation) -> Result<u64, u32> {
        let result = match op {
            Operation::Read { sector, data, len } => disk
                .read(&self.mem, sector.saturating_mul(SECTOR_SIZE), data)
                .map(|()| *len),
            Operation::Write { sector, data, .. } => disk
                .write(&self.mem, sector.saturating_mul(SECTOR_SIZE), data)
                .map(|()| 0),
            Operation::Flush => disk.flush().map(|()| 0),
            Operation::GetId { data } => {
                DiskImage::write_id(&self.mem, data, &self.serial).map(|()| ID_LEN as u64)
            }
            Operation::Discard {
                sector,
                num_sectors,
            } => disk
                .discard(
                    sector.saturating_mul(SECTOR_SIZE),
                    u64::from(*num_sectors) * SECTOR_SIZE,
                )
                .map(|()| 0),
            Operation::WriteZeroes {
                sector,
                num_sectors,
                unmap,
            } => disk
                .write_zeroes(
                    sector.saturating_mul(SECTOR_SIZE),
                    u64::from(*num_sectors) * SECTOR_SIZE,
                    *unmap,
                )
                .map(|()| 0),
            Operation::Unsupported(_) => return Err(VIRTIO_BLK_S_UNSUPP),
        };
        result.map_err(|e| {
            self.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "virtio-blk {}: {} failed: {e}",
                disk.path().display(),
                op.name()
            );
            VIRTIO_BLK_S_IOERR
        })
    }
}
