//! The ai_infer device from the driver's side: the virtio initialisation sequence
//! (docs/ai_infer.md §5), its request queues, and recovery by reset.
//!
//! The device may exist before its backend (the host daemon) is connected; its
//! configuration then reads as zeros and FEATURES_OK does not stick. Initialisation
//! resets and retries with growing pauses until a timeout, so the agent can start at
//! boot before the host side is ready.

use std::time::{Duration, Instant};

use ai_infer_protocol::virtio_pci::{status, VIRTIO_MSI_NO_VECTOR};
use ai_infer_protocol::{
    config_offset, DeviceConfig, ProtocolError, CONFIG_SPACE_LEN, QUEUE_SIZE_MAX,
    VIRTIO_F_VERSION_1,
};
use thiserror::Error;

use crate::dma::DmaPool;
use crate::transport::{TransportError, VirtioPciTransport};
use crate::virtqueue::{ChainBuffer, SplitQueue, UsedChain, VirtqueueError};

/// How often to re-read a configuration that changed while being read.
const CONFIG_READ_TRIES: u32 = 16;
/// How long a reset may take to read back as 0.
const RESET_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors of device setup and use.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A register access failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The backend did not connect in time.
    #[error("Device backend not connected after {0:?} (configuration reads protocol_version 0)")]
    NotConnected(Duration),
    /// The reset did not complete.
    #[error("Device status still {0:#04x} {RESET_TIMEOUT:?} after reset")]
    ResetTimeout(u8),
    /// The configuration kept changing while being read.
    #[error("Device configuration changed during {CONFIG_READ_TRIES} consecutive reads")]
    ConfigUnstable,
    /// The configuration is malformed or outside protocol limits.
    #[error("Device configuration rejected: {0}")]
    BadConfig(ProtocolError),
    /// The device does not offer VIRTIO_F_VERSION_1.
    #[error("Device does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    /// FEATURES_OK did not stick although the backend is connected.
    #[error("Device refused features {0:#x}")]
    FeaturesRejected(u64),
    /// A queue the device does not have.
    #[error("Device queue {0} is not available (size 0)")]
    QueueUnavailable(u16),
    /// The device has no request queue at all.
    #[error("Device has no queues")]
    NoQueues,
    /// The device kept an MSI-X vector we asked it not to use. Harmless for polling,
    /// reported for diagnosis.
    #[error("Device kept MSI-X vector {0:#x} for queue {1}")]
    Vector(u16, u16),
    /// Ring setup or access failed.
    #[error(transparent)]
    Queue(#[from] VirtqueueError),
    /// The device asks for a reset (backend lost or ring corruption).
    #[error("Device needs a reset (status {0:#04x})")]
    NeedsReset(u8),
    /// A queue index outside those set up.
    #[error("Queue {0} is not set up")]
    NoSuchQueue(u16),
}

/// Driver-side choices. Defaults: one queue of 256 entries, wait up to 60 s for the
/// backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Request queues to use (at most what the device offers).
    pub queues: u16,
    /// Entries per queue (rounded down to a power of two, at most 256).
    pub queue_size: u16,
    /// How long to retry while the backend is not connected.
    pub connect_timeout: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            queues: 1,
            queue_size: QUEUE_SIZE_MAX,
            connect_timeout: Duration::from_secs(60),
        }
    }
}

struct Queue {
    ring: SplitQueue,
    notify_address: u64,
}

/// An initialised ai_infer device.
pub struct AiInferDevice {
    transport: VirtioPciTransport,
    pool: DmaPool,
    options: DeviceOptions,
    config: DeviceConfig,
    queues: Vec<Queue>,
}

impl std::fmt::Debug for AiInferDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AiInferDevice")
            .field("config", &self.config)
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// Outcome of one initialisation attempt.
enum Attempt {
    Ready(DeviceConfig, Vec<Queue>),
    NotConnected,
}

fn largest_power_of_two_at_most(n: u16) -> u16 {
    if n == 0 {
        0
    } else {
        1 << (15 - n.leading_zeros())
    }
}

/// Reads the device configuration with the generation-counter loop, using the width
/// of each field (16-bit fields with 16-bit accesses, 64-bit ones as two 32-bit).
pub fn read_device_config(t: &VirtioPciTransport) -> Result<DeviceConfig, DeviceError> {
    let cfg = t.device_config();
    for _ in 0..CONFIG_READ_TRIES {
        let before = t.config_generation()?;
        let mut bytes = [0u8; CONFIG_SPACE_LEN];
        let mut put = |off: usize, data: &[u8]| bytes[off..off + data.len()].copy_from_slice(data);
        put(
            config_offset::PROTOCOL_VERSION,
            &cfg.read32(config_offset::PROTOCOL_VERSION as u64)
                .map_err(TransportError::from)?
                .to_le_bytes(),
        );
        for off in (config_offset::NUM_REQUEST_QUEUES..config_offset::MAX_INPUT_BYTES).step_by(2) {
            put(
                off,
                &cfg.read16(off as u64)
                    .map_err(TransportError::from)?
                    .to_le_bytes(),
            );
        }
        for off in (config_offset::MAX_INPUT_BYTES..CONFIG_SPACE_LEN).step_by(4) {
            put(
                off,
                &cfg.read32(off as u64)
                    .map_err(TransportError::from)?
                    .to_le_bytes(),
            );
        }
        if t.config_generation()? == before {
            return DeviceConfig::decode(&bytes).map_err(DeviceError::BadConfig);
        }
    }
    Err(DeviceError::ConfigUnstable)
}

impl AiInferDevice {
    /// Initialises the device, retrying while its backend is not connected.
    pub fn new(
        transport: VirtioPciTransport,
        pool: DmaPool,
        options: DeviceOptions,
    ) -> Result<Self, DeviceError> {
        let mut dev = AiInferDevice {
            transport,
            pool,
            options,
            config: DeviceConfig::default(),
            queues: Vec::new(),
        };
        dev.initialise()?;
        Ok(dev)
    }

    /// The limits the device enforces for this tenant.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> u16 {
        // At most 64 (protocol cap on num_request_queues).
        self.queues.len() as u16
    }

    /// Size of queue `index`.
    pub fn queue_size(&self, index: u16) -> Option<u16> {
        self.queues.get(usize::from(index)).map(|q| q.ring.size())
    }

    /// The DMA pool the rings live in.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    /// Resets the device: every chain in flight is abandoned and the device touches
    /// none of their buffers afterwards (spec §5). Queues must be set up again.
    pub fn reset(&mut self) -> Result<(), DeviceError> {
        self.transport.set_status(0)?;
        let start = Instant::now();
        loop {
            let s = self.transport.status()?;
            if s == 0 {
                break;
            }
            if start.elapsed() > RESET_TIMEOUT {
                return Err(DeviceError::ResetTimeout(s));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        // Only now is it safe to free the rings the device may have been reading.
        self.queues.clear();
        Ok(())
    }

    /// Reset, then the whole initialisation sequence, retrying with growing pauses
    /// while the backend is not connected.
    pub fn initialise(&mut self) -> Result<(), DeviceError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            self.reset()?;
            match self.attempt()? {
                Attempt::Ready(config, queues) => {
                    self.config = config;
                    self.queues = queues;
                    self.add_status(status::DRIVER_OK)?;
                    let s = self.transport.status()?;
                    if s & status::DEVICE_NEEDS_RESET != 0 {
                        return Err(DeviceError::NeedsReset(s));
                    }
                    log::info!(
                        "ai_infer device ready: {} queue(s) of {}, limits {:?}",
                        self.queues.len(),
                        self.queues.first().map_or(0, |q| q.ring.size()),
                        self.config
                    );
                    return Ok(());
                }
                Attempt::NotConnected => {
                    let waited = start.elapsed();
                    if waited >= self.options.connect_timeout {
                        self.reset()?;
                        return Err(DeviceError::NotConnected(waited));
                    }
                    log::debug!("ai_infer backend not connected yet; retrying in {pause:?}");
                    std::thread::sleep(pause.min(self.options.connect_timeout - waited));
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn add_status(&self, bits: u8) -> Result<(), DeviceError> {
        let s = self.transport.status()?;
        self.transport.set_status(s | bits)?;
        Ok(())
    }

    fn fail(&self, error: DeviceError) -> DeviceError {
        // Best effort: tell the device we gave up; the error is what matters.
        let _ = self.add_status(status::FAILED);
        error
    }

    fn attempt(&self) -> Result<Attempt, DeviceError> {
        let t = &self.transport;
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;
        let config = read_device_config(t)?;
        if config.protocol_version == 0 {
            return Ok(Attempt::NotConnected);
        }
        let offered = t.device_features()?;
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        if offered & version_1 == 0 {
            return Err(self.fail(DeviceError::NoVersion1(offered)));
        }
        // A polling driver needs nothing else: no indirect tables (one descriptor per
        // tensor fits the chain limit) and no event index (it never waits for
        // interrupts).
        t.set_driver_features(version_1)?;
        self.add_status(status::FEATURES_OK)?;
        if t.status()? & status::FEATURES_OK == 0 {
            if read_device_config(t)?.protocol_version == 0 {
                return Ok(Attempt::NotConnected);
            }
            return Err(self.fail(DeviceError::FeaturesRejected(version_1)));
        }
        if let Err(e) = config.validate() {
            return Err(self.fail(DeviceError::BadConfig(e)));
        }
        let _ = t.set_config_vector(VIRTIO_MSI_NO_VECTOR)?;
        let available = t.num_queues()?.min(config.num_request_queues);
        let wanted = self.options.queues.max(1).min(available);
        if wanted == 0 {
            return Err(self.fail(DeviceError::NoQueues));
        }
        let mut queues = Vec::with_capacity(usize::from(wanted));
        for index in 0..wanted {
            match self.setup_queue(index) {
                Ok(q) => queues.push(q),
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(Attempt::Ready(config, queues))
    }

    fn setup_queue(&self, index: u16) -> Result<Queue, DeviceError> {
        let t = &self.transport;
        t.select_queue(index)?;
        let max = t.queue_size()?;
        let size =
            largest_power_of_two_at_most(max.min(self.options.queue_size).min(QUEUE_SIZE_MAX));
        if size == 0 {
            return Err(DeviceError::QueueUnavailable(index));
        }
        t.set_queue_size(size)?;
        let ring = SplitQueue::new(&self.pool, size)?;
        let (desc, driver, device) = ring.ring_addresses();
        t.set_queue_rings(desc, driver, device)?;
        let vector = t.set_queue_vector(VIRTIO_MSI_NO_VECTOR)?;
        if vector != VIRTIO_MSI_NO_VECTOR {
            log::warn!("{}", DeviceError::Vector(vector, index));
        }
        let notify_address = t.queue_notify_address()?;
        t.enable_queue()?;
        Ok(Queue {
            ring,
            notify_address,
        })
    }

    fn queue(&mut self, index: u16) -> Result<&mut Queue, DeviceError> {
        self.queues
            .get_mut(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue(index))
    }

    /// Free descriptors of queue `index`.
    pub fn free_descriptors(&self, index: u16) -> usize {
        self.queues
            .get(usize::from(index))
            .map_or(0, |q| q.ring.free_descriptors())
    }

    /// Makes a chain available on queue `index`, tagged with `token` (returned with its
    /// [`UsedChain`]), and notifies the device if it wants it. Returns the chain's head.
    pub fn submit(
        &mut self,
        index: u16,
        chain: &[ChainBuffer],
        token: u64,
    ) -> Result<u16, DeviceError> {
        let q = self
            .queues
            .get_mut(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue(index))?;
        let head = q.ring.add_chain_tagged(chain, token)?;
        if q.ring.needs_notify()? {
            self.transport.notify(q.notify_address, index)?;
        }
        Ok(head)
    }

    /// The next chain the device returned on queue `index`, if any.
    pub fn poll(&mut self, index: u16) -> Result<Option<UsedChain>, DeviceError> {
        Ok(self.queue(index)?.ring.poll_used()?)
    }

    /// Whether the device asks for a reset (reads the status register: a slow MMIO
    /// exit, so callers check it only when idle).
    pub fn needs_reset(&self) -> Result<bool, DeviceError> {
        Ok(self.transport.status()? & status::DEVICE_NEEDS_RESET != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeDeviceBehaviour, FakeVirtioPci};

    fn options() -> DeviceOptions {
        DeviceOptions {
            queues: 2,
            queue_size: 64,
            connect_timeout: Duration::from_millis(200),
        }
    }

    #[test]
    fn powers_of_two() {
        assert_eq!(largest_power_of_two_at_most(0), 0);
        assert_eq!(largest_power_of_two_at_most(1), 1);
        assert_eq!(largest_power_of_two_at_most(255), 128);
        assert_eq!(largest_power_of_two_at_most(256), 256);
        assert_eq!(largest_power_of_two_at_most(u16::MAX), 32768);
    }

    #[test]
    fn initialises_through_the_whole_sequence() {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour::default());
        let dev = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap();
        let st = fake.state();
        assert_eq!(
            st.status_writes,
            vec![0, 1, 3, 11, 15],
            "reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK"
        );
        assert_eq!(st.driver_features, 1 << VIRTIO_F_VERSION_1);
        // The fake offers 2 queues of up to 1024 entries; the driver caps at 64.
        assert_eq!(dev.num_queues(), 2);
        assert_eq!(st.queues[0].size, 64);
        assert!(st.queues[0].enabled && st.queues[1].enabled);
        assert_eq!(st.queues[0].vector, VIRTIO_MSI_NO_VECTOR);
        assert_eq!(dev.config(), &st.config);
    }

    #[test]
    fn waits_for_the_backend_then_succeeds() {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            connect_after_resets: 3,
            ..Default::default()
        });
        let dev = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap();
        assert!(fake.state().resets >= 3);
        assert_eq!(dev.config().protocol_version, 1);
    }

    #[test]
    fn gives_up_when_the_backend_never_comes() {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            connect_after_resets: u32::MAX,
            ..Default::default()
        });
        let t = Instant::now();
        let err = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap_err();
        assert!(matches!(err, DeviceError::NotConnected(_)), "{err}");
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert_eq!(fake.state().status, 0, "left reset");
    }

    #[test]
    fn refuses_devices_it_cannot_drive() {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            features: 0,
            ..Default::default()
        });
        let err = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap_err();
        assert!(matches!(err, DeviceError::NoVersion1(0)), "{err}");
        assert_ne!(fake.state().status & status::FAILED, 0);

        let fake = FakeVirtioPci::new(FakeDeviceBehaviour::default());
        fake.state().config.protocol_version = 2;
        let err = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap_err();
        assert!(matches!(err, DeviceError::BadConfig(_)), "{err}");

        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            refuse_features: true,
            ..Default::default()
        });
        let err = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap_err();
        assert!(matches!(err, DeviceError::FeaturesRejected(_)), "{err}");

        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            max_queue_size: 0,
            ..Default::default()
        });
        let err = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap_err();
        assert!(matches!(err, DeviceError::QueueUnavailable(0)), "{err}");
    }

    #[test]
    fn config_read_retries_while_the_generation_changes() {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            generation_bumps: 3,
            ..Default::default()
        });
        let cfg = read_device_config(&fake.transport()).unwrap();
        assert_eq!(cfg, fake.state().config);
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            generation_bumps: u32::MAX,
            ..Default::default()
        });
        assert!(matches!(
            read_device_config(&fake.transport()),
            Err(DeviceError::ConfigUnstable)
        ));
    }

    #[test]
    fn submits_notifies_and_recovers_with_reset() {
        let fake = FakeVirtioPci::new(FakeDeviceBehaviour {
            auto_complete: false,
            ..Default::default()
        });
        let mut dev = AiInferDevice::new(fake.transport(), fake.pool(), options()).unwrap();
        let buf = fake.pool().alloc(128).unwrap();
        let addr = buf.device_addr().unwrap();
        let chain = [
            ChainBuffer {
                addr,
                len: 64,
                writable: false,
            },
            ChainBuffer {
                addr: addr + 64,
                len: 64,
                writable: true,
            },
        ];
        let head = dev.submit(1, &chain, 5).unwrap();
        assert_eq!(fake.state().notifies, vec![1]);
        assert!(matches!(
            dev.submit(2, &chain, 6),
            Err(DeviceError::NoSuchQueue(2))
        ));
        assert_eq!(dev.poll(1).unwrap(), None);
        fake.complete_raw(1, u32::from(head), 64);
        assert_eq!(
            dev.poll(1).unwrap(),
            Some(UsedChain {
                head,
                len: 64,
                token: 5
            })
        );

        fake.state().status |= status::DEVICE_NEEDS_RESET;
        assert!(dev.needs_reset().unwrap());
        dev.initialise().unwrap();
        assert!(!dev.needs_reset().unwrap());
        assert_eq!(
            dev.submit(0, &chain, 7).unwrap(),
            0,
            "fresh rings after reset"
        );
    }
}
