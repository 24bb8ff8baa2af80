//! virtio-net on an existing tap interface (virtio 1.2 §5.1).
//!
//! One receive and one transmit queue; frames pass between the guest and the tap with
//! their 12-byte `virtio_net_hdr_v1` unchanged, so checksum and segmentation offloads
//! negotiated with the guest are done by the host kernel (the tap's offloads follow what
//! the guest accepted). The only header field the device writes is `num_buffers` on
//! receive. The host side is configured by the operator: aivmm only attaches to the tap
//! by name, as Firecracker does.
//!
//! Serving runs on the device's own worker thread ([`crate::virtio::worker`]), with
//! optional token-bucket rate limiters per direction that can be changed while running
//! ([`Net::update_rate_limiters`]).

mod rx;
mod tap;
#[cfg(test)]
mod tests;
mod tx;
mod worker;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    virtio_net_hdr_mrg_rxbuf, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use crate::virtio::{
    read_config_bytes, ActivateParams, DeviceUpdate, VirtioDevice, VirtioWorker, WorkerThread,
};

pub use rx::{write_rx_chain, RxBufferError};
pub use tap::{NetBackend, Tap, TapError};
pub use tx::{gather_tx_frame, TxFrameError};

use worker::{LimiterUpdate, NetResources, NetWorker};

/// Size of the header in front of every frame: `virtio_net_hdr_v1`, which with
/// VERSION_1 is 12 bytes whether or not MRG_RXBUF is negotiated.
pub const VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_mrg_rxbuf>();
/// Where `num_buffers` is in the header.
const NUM_BUFFERS_OFFSET: usize = std::mem::offset_of!(virtio_net_hdr_mrg_rxbuf, num_buffers);
/// The largest frame either way: header, 64 KiB of (segmentation-offloaded) packet and
/// an Ethernet header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65536 + 14;

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_MAX_SIZE: u16 = 256;
/// Smallest MTU the device may advertise (virtio 1.2 §5.1.4.2).
const MIN_MTU: u16 = 68;
/// `virtio_net_config` up to and including `mtu`.
const CONFIG_LEN: usize = 12;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// One virtio-net device as configured by the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Device id (names the worker thread and seeds the default MAC).
    pub id: String,
    /// Host tap interface to attach to; it must exist.
    pub tap: String,
    /// Guest MAC address; default: a locally administered one derived from `id`, so
    /// the guest sees the same address on every boot.
    pub mac: Option<[u8; 6]>,
    /// MTU advertised to the guest (VIRTIO_NET_F_MTU); default: none advertised.
    pub mtu: Option<u16>,
    /// Limits what the guest receives; default: unlimited.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits what the guest sends; default: unlimited.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Errors creating or changing a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// No id.
    #[error("a virtio-net device needs a non-empty id")]
    EmptyId,
    /// A multicast or all-zero MAC.
    #[error("MAC address {0} of virtio-net device {1:?} is not a unicast address")]
    InvalidMac(String, String),
    /// An MTU below what IPv4 needs.
    #[error("MTU {mtu} of virtio-net device {id:?} is below the minimum of {MIN_MTU}")]
    InvalidMtu {
        /// The device.
        id: String,
        /// The MTU asked for.
        mtu: u16,
    },
    /// A rate limiter configuration is invalid.
    #[error("invalid {direction} rate limiter for virtio-net device {id:?}: {source}")]
    InvalidRateLimiter {
        /// The device.
        id: String,
        /// "rx" or "tx".
        direction: &'static str,
        /// What is wrong.
        source: RateLimiterError,
    },
    /// A rate limiter's timer cannot be created.
    #[error("cannot create the {direction} rate limiter of virtio-net device {id:?}: {source}")]
    RateLimiter {
        /// The device.
        id: String,
        /// "rx" or "tx".
        direction: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The worker's wake-up eventfd cannot be created or written.
    #[error("cannot notify the worker of virtio-net device {id:?}: {source}")]
    Notify {
        /// The device.
        id: String,
        /// Why.
        source: io::Error,
    },
    /// The worker thread cannot be started.
    #[error("cannot start the worker thread of virtio-net device {id:?}: {source}")]
    Thread {
        /// The device.
        id: String,
        /// Why.
        source: io::Error,
    },
    /// The device lost its tap (its worker died); only a new device helps.
    #[error("virtio-net device {0:?} lost its tap")]
    Lost(String),
}

macro_rules! net_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters of one virtio-net device, shared with whoever reports them.
        ///
        /// Byte counts are packet bytes, without the 12-byte virtio-net header.
        #[derive(Debug, Default)]
        pub struct NetMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of [`NetMetrics`] at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct NetCounters {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl NetMetrics {
            /// Reads every counter (each one atomically, not all together).
            pub fn snapshot(&self) -> NetCounters {
                NetCounters {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

net_counters! {
    /// Frames delivered to the guest.
    rx_packets,
    /// Bytes delivered to the guest.
    rx_bytes,
    /// Frames from the tap shorter than the virtio-net header.
    rx_dropped_malformed,
    /// Frames that cannot fit the guest's buffers (one chain without MRG_RXBUF, the
    /// whole ring with it).
    rx_dropped_oversize,
    /// Receive chains the guest got wrong (read-only, outside memory, broken), returned
    /// empty.
    rx_bad_buffers,
    /// Times a frame had to wait for the guest to post receive buffers.
    rx_no_buffer_waits,
    /// Times the receive rate limiter held a frame back.
    rx_throttled,
    /// Tap read errors other than "nothing to read".
    rx_tap_errors,
    /// Frames sent to the tap.
    tx_packets,
    /// Bytes sent to the tap.
    tx_bytes,
    /// Transmit chains dropped as malformed (writable, outside memory, broken, short).
    tx_dropped_malformed,
    /// Transmit chains dropped for exceeding the largest frame.
    tx_dropped_oversize,
    /// Times the transmit rate limiter held a frame back.
    tx_throttled,
    /// Times the tap was full and a frame waited for it.
    tx_tap_full,
    /// Frames the tap refused with an error (dropped).
    tx_tap_errors,
}

impl NetMetrics {
    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// The features the device offers.
fn offered_features(mtu: bool) -> u64 {
    let mut features = crate::virtio::VIRTIO_F_VERSION_1
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_UFO)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_UFO);
    if mtu {
        features |= bit(VIRTIO_NET_F_MTU);
    }
    features
}

/// The tap offloads (TUN_F_* flags) matching the features the guest accepted: what the
/// tap may hand the device is what the guest can receive.
///
/// The kernel refuses segmentation offloads without checksum offload, and the guest may
/// not accept them without GUEST_CSUM either, so without it the answer is 0.
pub fn tap_offload_flags(guest_features: u64) -> u32 {
    let has = |feature: u32| guest_features & bit(feature) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// A locally administered unicast MAC derived from `id` with FNV-1a, which (unlike
/// std's hasher) is fixed forever, so a device keeps its address across aivmm builds.
pub fn mac_from_id(id: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `virtio_net_config` as the guest reads it: mac, status, max_virtqueue_pairs, mtu.
fn config_space(mac: [u8; 6], mtu: Option<u16>) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[..6].copy_from_slice(&mac);
    // Both constants are tiny; the fields are 16-bit.
    #[allow(clippy::cast_possible_truncation)]
    let status = VIRTIO_NET_S_LINK_UP as u16;
    config[6..8].copy_from_slice(&status.to_le_bytes());
    config[8..10].copy_from_slice(&1u16.to_le_bytes());
    config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
    config
}

/// A virtio-net device attached to a tap.
pub struct Net {
    id: String,
    mac: [u8; 6],
    features: u64,
    config: [u8; CONFIG_LEN],
    metrics: Arc<NetMetrics>,
    /// What the worker needs, while no worker runs.
    idle: Option<NetResources>,
    worker: Option<VirtioWorker<NetWorker>>,
    /// The thread `worker` runs on, started with the device.
    thread: WorkerThread,
    updates: Sender<LimiterUpdate>,
    update_evt: EventFd,
    rx_limits: Option<RateLimiterConfig>,
    tx_limits: Option<RateLimiterConfig>,
    lost: bool,
}

impl Net {
    /// Attaches to the tap `cfg.tap` and builds the device.
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        if cfg.id.is_empty() {
            return Err(NetError::EmptyId);
        }
        let tap = Tap::open(&cfg.tap)?;
        Self::with_backend(cfg, Box::new(tap))
    }

    /// Builds the device on any frame backend (`cfg.tap` is not used).
    pub fn with_backend(cfg: NetConfig, backend: Box<dyn NetBackend>) -> Result<Self, NetError> {
        if cfg.id.is_empty() {
            return Err(NetError::EmptyId);
        }
        let mac = match cfg.mac {
            Some(mac) if mac[0] & 1 != 0 || mac == [0; 6] => {
                return Err(NetError::InvalidMac(format_mac(&mac), cfg.id));
            }
            Some(mac) => mac,
            None => mac_from_id(&cfg.id),
        };
        if let Some(mtu) = cfg.mtu.filter(|&mtu| mtu < MIN_MTU) {
            return Err(NetError::InvalidMtu { id: cfg.id, mtu });
        }
        validate_limits(&cfg.id, cfg.rx_rate_limiter, cfg.tx_rate_limiter)?;
        let limiter = |limits: &Option<RateLimiterConfig>, direction| {
            match limits {
                Some(limits) => RateLimiter::new(limits),
                None => RateLimiter::unlimited(),
            }
            .map_err(|source| NetError::RateLimiter {
                id: cfg.id.clone(),
                direction,
                source,
            })
        };
        let rx_limiter = limiter(&cfg.rx_rate_limiter, "rx")?;
        let tx_limiter = limiter(&cfg.tx_rate_limiter, "tx")?;
        let notify_err = |source| NetError::Notify {
            id: cfg.id.clone(),
            source,
        };
        let update_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(notify_err)?;
        let worker_evt = update_evt.try_clone().map_err(notify_err)?;
        let (updates, receiver) = mpsc::channel();
        let thread = WorkerThread::spawn(&format!("virtio-net-{}", cfg.id)).map_err(|source| {
            NetError::Thread {
                id: cfg.id.clone(),
                source,
            }
        })?;
        Ok(Net {
            mac,
            features: offered_features(cfg.mtu.is_some()),
            config: config_space(mac, cfg.mtu),
            metrics: Arc::new(NetMetrics::default()),
            idle: Some(NetResources {
                backend,
                rx_limiter,
                tx_limiter,
                updates: receiver,
                update_evt: worker_evt,
            }),
            worker: None,
            thread,
            updates,
            update_evt,
            rx_limits: cfg.rx_rate_limiter,
            tx_limits: cfg.tx_rate_limiter,
            lost: false,
            id: cfg.id,
        })
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The rate limits in force (`None`: unlimited).
    pub fn rate_limits(&self) -> (Option<RateLimiterConfig>, Option<RateLimiterConfig>) {
        (self.rx_limits, self.tx_limits)
    }

    /// Changes the receive and/or transmit limits, also while the device is serving
    /// (the worker applies them at once: this wakes it). As Firecracker's PATCH: `None`
    /// leaves a direction as it is; in a config, a bucket left out keeps its limit, a
    /// bucket given replaces it full, and one with size and refill_time 0 removes it.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> Result<(), NetError> {
        if rx.is_none() && tx.is_none() {
            return Ok(());
        }
        validate_limits(&self.id, rx, tx)?;
        let update = LimiterUpdate { rx, tx };
        if let Some(res) = self.idle.as_mut() {
            res.apply(update);
        } else if self.worker.is_some() {
            self.updates
                .send(update)
                .map_err(|_| NetError::Lost(self.id.clone()))?;
            self.update_evt
                .write(1)
                .map_err(|source| NetError::Notify {
                    id: self.id.clone(),
                    source,
                })?;
        } else {
            return Err(NetError::Lost(self.id.clone()));
        }
        self.rx_limits = merge_limits(self.rx_limits, rx);
        self.tx_limits = merge_limits(self.tx_limits, tx);
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, params: ActivateParams) -> io::Result<()> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if self.worker.is_some() {
            return Err(invalid(format!(
                "virtio-net device {:?} is already active",
                self.id
            )));
        }
        if params.queues.len() != NUM_QUEUES || params.kicks.len() != NUM_QUEUES {
            return Err(invalid(format!(
                "virtio-net device {:?} needs {NUM_QUEUES} queues and kicks, got {} and {}",
                self.id,
                params.queues.len(),
                params.kicks.len()
            )));
        }
        if params.features & crate::virtio::VIRTIO_F_VERSION_1 == 0 {
            return Err(invalid(format!(
                "the driver of virtio-net device {:?} did not accept VERSION_1",
                self.id
            )));
        }
        let mut res = self
            .idle
            .take()
            .ok_or_else(|| io::Error::other(NetError::Lost(self.id.clone()).to_string()))?;
        set_tap_offloads(&self.id, res.backend.as_mut(), params.features);

        let event_idx = params.features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = params.queues.into_iter();
        let (Some(mut rxq), Some(mut txq)) = (queues.next(), queues.next()) else {
            self.idle = Some(res);
            return Err(invalid("virtio-net queues vanished".to_string()));
        };
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        let state = NetWorker::new(
            params.memory,
            rxq,
            txq,
            params.interrupt,
            res,
            Arc::clone(&self.metrics),
            params.features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
        );
        match VirtioWorker::spawn(&self.thread, params.kicks, state) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(e) => {
                // The state (and the tap with it) went with the failed spawn.
                self.lost = true;
                Err(e)
            }
        }
    }

    fn reset(&mut self) -> Option<Vec<Queue>> {
        let worker = self.worker.take()?;
        match worker.stop() {
            Some(state) => {
                let (queues, res) = state.into_parts();
                self.idle = Some(res);
                Some(queues)
            }
            None => {
                log::error!("virtio-net {}: worker lost; the tap is gone", self.id);
                self.lost = true;
                None
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.lost
    }

    fn update(&mut self, update: &DeviceUpdate) -> Result<(), String> {
        let DeviceUpdate::Net {
            rx_rate_limiter,
            tx_rate_limiter,
        } = update
        else {
            return Err(format!(
                "network interface '{}' takes only interface changes",
                self.id
            ));
        };
        self.update_rate_limiters(*rx_rate_limiter, *tx_rate_limiter)
            .map_err(|e| e.to_string())
    }
}

fn validate_limits(
    id: &str,
    rx: Option<RateLimiterConfig>,
    tx: Option<RateLimiterConfig>,
) -> Result<(), NetError> {
    for (direction, cfg) in [("rx", rx), ("tx", tx)] {
        if let Some(cfg) = cfg {
            cfg.validate()
                .map_err(|source| NetError::InvalidRateLimiter {
                    id: id.to_string(),
                    direction,
                    source,
                })?;
        }
    }
    Ok(())
}

/// The limits in force after `update` is applied to `current` (see
/// [`Net::update_rate_limiters`]).
fn merge_limits(
    current: Option<RateLimiterConfig>,
    update: Option<RateLimiterConfig>,
) -> Option<RateLimiterConfig> {
    let Some(update) = update else {
        return current;
    };
    let current = current.unwrap_or_default();
    let pick =
        |old: Option<_>, new: Option<crate::rate_limiter::TokenBucketConfig>| match new.or(old) {
            Some(b) if b.size == 0 && b.refill_time == 0 => None,
            other => other,
        };
    let merged = RateLimiterConfig {
        bandwidth: pick(current.bandwidth, update.bandwidth),
        ops: pick(current.ops, update.ops),
    };
    (merged != RateLimiterConfig::default()).then_some(merged)
}

/// Sets the tap's offloads to what the guest accepted. Failing is not fatal: the tap then
/// hands over plain frames, which every guest takes.
fn set_tap_offloads(id: &str, backend: &mut dyn NetBackend, features: u64) {
    let flags = tap_offload_flags(features);
    if let Err(e) = backend.set_offload(flags) {
        // Older kernels refuse UFO; keep the rest.
        let without_ufo = flags & !libc::TUN_F_UFO;
        let fallback = if without_ufo != flags {
            backend.set_offload(without_ufo)
        } else {
            Err(e)
        };
        if let Err(e) = fallback {
            log::warn!("virtio-net {id}: cannot set tap offloads {flags:#x}: {e}");
            if let Err(e) = backend.set_offload(0) {
                log::warn!("virtio-net {id}: cannot clear tap offloads: {e}");
            }
        }
    }
}
