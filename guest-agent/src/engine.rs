//! The device owner: opens the ai_infer function, owns the DMA pool, and runs INFER,
//! MODELS, TRACE and CANCEL requests for any number of threads.
//!
//! Only one process may drive the device: the engine holds an exclusive `flock` on a
//! lock file for its lifetime. Other processes go through the agent daemon, which is
//! an engine with a socket in front (see `crate::ipc`).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ai_infer_protocol::{
    CancelOutcome, DeviceConfig, ModelInfo, PriorityClass, Request, Status, TraceCounters,
    MAX_MODELS, MAX_TENSORS, MODEL_INFO_FIXED_LEN, MODEL_LIST_HEADER_LEN, PCI_DEVICE_ID_AI_INFER,
    PCI_VENDOR_ID_VIRTIO, TENSOR_SPEC_LEN,
};
use thiserror::Error;

use crate::backoff::BackoffPolicy;
use crate::chain::{self, ChainError, InferOutcome, PayloadOutcome, PreparedChain, TensorRef};
use crate::device::{AiInferDevice, DeviceError, DeviceOptions};
use crate::dma::{DmaError, DmaPool, DEFAULT_HUGETLBFS, HUGE_PAGE_SIZE};
use crate::driver::{Driver, DriverError};
use crate::mmio::Registers;
use crate::pci::{parse_virtio_caps, CapsError, PciFunction, SysfsError, SYSFS_PCI_DEVICES};
use crate::stats::GuestTrace;
use crate::transport::{TransportError, VirtioPciTransport};
use crate::virtqueue::ChainBuffer;

/// First MODELS payload area; grown on BUFFER_TOO_SMALL.
const MODELS_FIRST_PAYLOAD: usize = 16 << 10;
/// Largest MODELS payload the protocol allows: 1024 models of 16 + 16 tensors.
const MODELS_MAX_PAYLOAD: usize =
    MODEL_LIST_HEADER_LEN + MAX_MODELS * (MODEL_INFO_FIXED_LEN + 2 * MAX_TENSORS * TENSOR_SPEC_LEN);

/// Errors of the engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// Finding or preparing the PCI function failed.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The capability list is unusable.
    #[error(transparent)]
    Caps(#[from] CapsError),
    /// Register access failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The DMA pool failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// Device setup failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The driver failed (device reset, bad completion).
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Building the request or checking its response failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Another process drives the device.
    #[error("Cannot lock {path}: another agent owns the device ({source})")]
    Busy {
        /// The lock file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The caller's request id is already in flight.
    #[error("Request id {0} is already in flight")]
    DuplicateRequestId(u64),
    /// MODELS or TRACE ended with a non-OK status.
    #[error("{what} failed with status {status}")]
    Status {
        /// Which request.
        what: &'static str,
        /// Its status.
        status: Status,
    },
}

/// How to open the device. Defaults: the first 1af4:107c function, a 16 MiB pool from
/// `/dev/hugepages`, one queue of 256, lock file `/run/ai-agent.lock`.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// PCI address to use instead of searching by id.
    pub bdf: Option<String>,
    /// Where PCI functions are listed.
    pub sysfs_root: PathBuf,
    /// Bytes of huge pages for rings, control blocks and tensors (multiple of 2 MiB).
    pub pool_bytes: usize,
    /// hugetlbfs mount used if memfd cannot create huge pages.
    pub hugetlbfs_dir: String,
    /// Queue and connection settings.
    pub device: DeviceOptions,
    /// Polling settings.
    pub backoff: BackoffPolicy,
    /// The exclusive-ownership lock file.
    pub lock_path: PathBuf,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            bdf: None,
            sysfs_root: PathBuf::from(SYSFS_PCI_DEVICES),
            pool_bytes: 8 * HUGE_PAGE_SIZE,
            hugetlbfs_dir: DEFAULT_HUGETLBFS.to_string(),
            device: DeviceOptions::default(),
            backoff: BackoffPolicy::default(),
            lock_path: PathBuf::from("/run/ai-agent.lock"),
        }
    }
}

/// Per-request choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InferOptions {
    /// Scheduling class asked for (the device may lower it to the tenant's ceiling).
    pub priority: PriorityClass,
    /// Relative deadline in µs from when the device takes the request; 0 = none.
    pub deadline_us: u64,
    /// Request id to use (so another thread can cancel it); `None` = next free id.
    pub request_id: Option<u64>,
}

/// The device owner.
pub struct Engine {
    driver: Driver,
    pool: DmaPool,
    config: DeviceConfig,
    max_descriptors: usize,
    num_queues: u16,
    next_id: AtomicU64,
    /// Request ids in flight -> queue (CANCEL must go to the target's queue).
    in_flight: Mutex<HashMap<u64, u16>>,
    _lock: Option<Arc<File>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish()
    }
}

fn lock_exclusive(path: &PathBuf) -> Result<File, EngineError> {
    let busy = |source| EngineError::Busy {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(busy)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(busy(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Removes a request id from the in-flight map when the request ends, however it ends.
struct InFlightGuard<'a> {
    map: &'a Mutex<HashMap<u64, u16>>,
    id: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Engine {
    /// Finds the device, takes it from the kernel, and initialises it.
    pub fn open(options: &EngineOptions) -> Result<Self, EngineError> {
        let lock = lock_exclusive(&options.lock_path)?;
        let root = &options.sysfs_root;
        let function = match &options.bdf {
            Some(bdf) => {
                PciFunction::open(root, bdf, PCI_VENDOR_ID_VIRTIO, PCI_DEVICE_ID_AI_INFER)?
            }
            None => PciFunction::find(root, PCI_VENDOR_ID_VIRTIO, PCI_DEVICE_ID_AI_INFER)?,
        };
        if let Some(driver) = function.unbind_driver()? {
            log::info!("{}: unbound kernel driver {driver}", function.bdf());
        }
        function.enable_memory_and_bus_master()?;
        let caps = parse_virtio_caps(&function.read_config()?)?;
        log::debug!("{}: virtio capabilities {caps:?}", function.bdf());
        let transport = VirtioPciTransport::new(&caps, |bar| {
            function
                .map_bar(bar)
                .map(|b| b as Arc<dyn Registers>)
                .map_err(|e| e.to_string())
        })?;
        let pool = DmaPool::hugetlb(options.pool_bytes, &options.hugetlbfs_dir)?;
        let device = AiInferDevice::new(transport, pool, options.device)?;
        let mut engine = Engine::with_device(device, options.backoff);
        engine._lock = Some(Arc::new(lock));
        Ok(engine)
    }

    /// An engine over an initialised device (tests, fake devices).
    pub fn with_device(device: AiInferDevice, backoff: BackoffPolicy) -> Self {
        let config = *device.config();
        let pool = device.pool().clone();
        let queue_size = device.queue_size(0).unwrap_or(0);
        let num_queues = device.num_queues();
        Engine {
            max_descriptors: usize::from(config.max_chain_descriptors.min(queue_size)),
            num_queues,
            driver: Driver::new(device, backoff),
            pool,
            config,
            next_id: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
            _lock: None,
        }
    }

    /// The device's limits for this tenant.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The DMA pool (rings, control blocks, and tensors of direct users).
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    /// Guest-side counters.
    pub fn guest_trace(&self) -> GuestTrace {
        self.driver.stats().snapshot()
    }

    /// A request id no other request of this engine uses (to know it before
    /// submitting, e.g. to cancel from another thread).
    pub fn reserve_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue for a priority class: one per class when the device has enough queues.
    fn queue_for(&self, priority: PriorityClass) -> u16 {
        u16::from(u8::from(priority)).min(self.num_queues.saturating_sub(1))
    }

    /// Submits `prepared` on `queue`, waits, and checks the response with `finish`;
    /// a failure of either counts as a driver error.
    fn run<T>(
        &self,
        queue: u16,
        prepared: &PreparedChain,
        finish: impl FnOnce(&PreparedChain, u32) -> Result<T, ChainError>,
    ) -> Result<T, EngineError> {
        let result = match self.driver.call(queue, &prepared.buffers) {
            Ok(used) => finish(prepared, used).map_err(EngineError::from),
            Err(e) => Err(e.into()),
        };
        if result.is_err() {
            self.driver.stats().driver_error();
        }
        result
    }

    /// A MODELS, TRACE or CANCEL request with `payload_len` bytes of payload area.
    fn control<T>(
        &self,
        queue: u16,
        request: Request,
        payload_len: usize,
        finish: impl FnOnce(&PreparedChain, u32) -> Result<T, ChainError>,
    ) -> Result<T, EngineError> {
        let prepared =
            chain::prepare_control(&self.pool, request, payload_len, self.max_descriptors)?;
        self.run(queue, &prepared, finish)
    }

    /// Submits `chain` exactly as given and returns the used length the device reported.
    ///
    /// For hostile-driver tests (`ai-agent garbage`): nothing here is validated, so the
    /// chain may point outside guest memory or be malformed on purpose. Buffers inside
    /// the pool are the caller's to read back.
    pub fn call_raw(&self, queue: u16, chain: &[ChainBuffer]) -> Result<u32, EngineError> {
        self.driver.call(queue, chain).map_err(EngineError::from)
    }

    /// Runs model `model_id` on tensors already in device-addressable memory.
    pub fn infer(
        &self,
        model_id: u32,
        inputs: &[TensorRef],
        outputs: &[TensorRef],
        options: &InferOptions,
    ) -> Result<InferOutcome, EngineError> {
        let id = options
            .request_id
            .unwrap_or_else(|| self.reserve_request_id());
        let request = Request::infer(
            id,
            model_id,
            inputs.iter().map(|t| t.desc).collect(),
            outputs.iter().map(|t| t.desc).collect(),
        )
        .map_err(ChainError::Request)?
        .with_priority(options.priority)
        .with_deadline_us(options.deadline_us);
        request
            .validate(&self.config)
            .map_err(ChainError::Request)?;
        let prepared =
            chain::prepare_infer(&self.pool, request, inputs, outputs, self.max_descriptors)?;
        let queue = self.queue_for(options.priority);
        let _guard = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&id) {
                return Err(EngineError::DuplicateRequestId(id));
            }
            map.insert(id, queue);
            InFlightGuard {
                map: &self.in_flight,
                id,
            }
        };
        let stats = self.driver.stats();
        stats.submitted();
        let start = Instant::now();
        let outcome = self.run(queue, &prepared, chain::finish_infer)?;
        let bytes_in = inputs.iter().map(|t| t.desc.data_len).sum();
        stats.completed(
            outcome.status,
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            bytes_in,
            outcome.payload_len,
        );
        Ok(outcome)
    }

    /// The models this tenant may use.
    pub fn models(&self) -> Result<Vec<ModelInfo>, EngineError> {
        let mut payload = MODELS_FIRST_PAYLOAD;
        for _ in 0..3 {
            let request = Request::models(self.reserve_request_id());
            match self.control(0, request, payload, chain::finish_models)? {
                PayloadOutcome::Done(models) => return Ok(models),
                PayloadOutcome::NeedBytes(n) if n <= MODELS_MAX_PAYLOAD as u64 => {
                    payload = n as usize
                }
                PayloadOutcome::NeedBytes(n) => {
                    return Err(ChainError::BadResponse(format!(
                    "MODELS needs {n} bytes, more than the protocol allows ({MODELS_MAX_PAYLOAD})"
                ))
                    .into())
                }
                PayloadOutcome::Failed(status) => {
                    return Err(EngineError::Status {
                        what: "MODELS",
                        status,
                    })
                }
            }
        }
        Err(ChainError::BadResponse("MODELS kept asking for a larger payload".into()).into())
    }

    /// This tenant's device-side counters.
    pub fn device_trace(&self) -> Result<TraceCounters, EngineError> {
        let request = Request::trace(self.reserve_request_id());
        match self.control(0, request, TraceCounters::LEN, chain::finish_trace)? {
            PayloadOutcome::Done(t) => Ok(t),
            PayloadOutcome::NeedBytes(n) => Err(ChainError::BadResponse(format!(
                "TRACE asks for {n} bytes, the protocol fixes {}",
                TraceCounters::LEN
            ))
            .into()),
            PayloadOutcome::Failed(status) => Err(EngineError::Status {
                what: "TRACE",
                status,
            }),
        }
    }

    /// Cancels the in-flight INFER with `request_id` (sent on that request's queue, so
    /// the device's ordering rule applies).
    pub fn cancel(&self, request_id: u64) -> Result<CancelOutcome, EngineError> {
        let queue = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&request_id)
            .copied()
            .unwrap_or(0);
        let request = Request::cancel(self.reserve_request_id(), request_id);
        self.control(queue, request, 0, chain::finish_cancel)?
            .map_err(|status| EngineError::Status {
                what: "CANCEL",
                status,
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{fake_models, Corruption, FakeDeviceBehaviour, FakeVirtioPci};
    use ai_infer_protocol::{DType, TensorDesc};

    pub(crate) fn fake_engine(behaviour: FakeDeviceBehaviour) -> (FakeVirtioPci, Engine) {
        crate::testing::fake_engine(behaviour)
    }

    fn tensor(
        engine: &Engine,
        desc: TensorDesc,
        data: &[u8],
    ) -> (crate::dma::DmaBuffer, TensorRef) {
        let mut buf = engine.pool().alloc(desc.data_len as usize).unwrap();
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        let ranges = engine
            .pool()
            .device_ranges(buf.offset(), desc.data_len as usize)
            .unwrap();
        (buf, TensorRef { desc, ranges })
    }

    /// The fake's models take one f32 input of shape [1, 4]...
    fn f32_input(engine: &Engine, data: &[u8]) -> (crate::dma::DmaBuffer, TensorRef) {
        tensor(
            engine,
            TensorDesc::input(DType::F32, &[1, 4]).unwrap(),
            data,
        )
    }

    /// ...and produce an f32 output of shape [1, n].
    fn f32_output(engine: &Engine, capacity: u64) -> (crate::dma::DmaBuffer, TensorRef) {
        tensor(
            engine,
            TensorDesc::output(DType::F32, &[1, 0], capacity).unwrap(),
            &[],
        )
    }

    /// One INFER of `model` on one input and one output, default options.
    fn infer_one(
        engine: &Engine,
        model: u32,
        input: &TensorRef,
        output: &TensorRef,
    ) -> Result<InferOutcome, EngineError> {
        engine.infer(
            model,
            std::slice::from_ref(input),
            std::slice::from_ref(output),
            &InferOptions::default(),
        )
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn infer_runs_in_place_end_to_end() {
        let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let (_i, input) = f32_input(&engine, &f32s(&[1.0, 2.0, 3.0, 4.0]));
        let (out_buf, output) = f32_output(&engine, 64);
        let opts = InferOptions {
            priority: PriorityClass::Interactive,
            deadline_us: 5000,
            request_id: Some(77),
        };
        let out = engine.infer(1, &[input], &[output], &opts).unwrap();
        assert_eq!(out.request_id, 77);
        assert_eq!(out.status, Status::Ok);
        assert_eq!(out.outputs[0].shape.dims(), &[1, 4]);
        assert_eq!(&out_buf.as_slice()[..16], &f32s(&[2.0, 4.0, 6.0, 8.0])[..]);
        // Interactive goes to the highest queue the device has (2 queues: queue 1).
        assert_eq!(fake.state().notifies, vec![1]);
        let t = engine.guest_trace();
        assert_eq!(
            (
                t.submitted,
                t.completed,
                t.by_status[0],
                t.bytes_in,
                t.bytes_out
            ),
            (1, 1, 1, 16, 16)
        );
    }

    #[test]
    fn statuses_come_back_as_outcomes_not_errors() {
        let (_fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let (_i, input) = f32_input(&engine, &[0; 16]);
        let (_o, small) = f32_output(&engine, 8);
        let out = infer_one(&engine, 1, &input, &small).unwrap();
        assert_eq!(out.status, Status::BufferTooSmall);
        assert_eq!(out.outputs[0].data_len, 16);
        let (_o, output) = f32_output(&engine, 64);
        let out = infer_one(&engine, 9, &input, &output).unwrap();
        assert_eq!(out.status, Status::UnknownModel);
        let out = infer_one(&engine, 2, &input, &output).unwrap();
        assert_eq!((out.status, out.detail), (Status::BadTensor, Some(0)));
    }

    #[test]
    fn invalid_requests_are_refused_before_sending() {
        let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let (_i, input) = f32_input(&engine, &[0; 16]);
        let err = engine
            .infer(1, &[input], &[], &InferOptions::default())
            .unwrap_err();
        assert!(
            matches!(err, EngineError::Chain(ChainError::Request(_))),
            "{err}"
        );
        assert!(fake.state().notifies.is_empty());
    }

    #[test]
    fn corrupt_responses_fail_only_their_request() {
        let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        let (_i, input) = f32_input(&engine, &[0; 16]);
        let (_o, output) = f32_output(&engine, 64);
        for c in [
            Corruption::WrongRequestId,
            Corruption::ShortUsedLen,
            Corruption::ExtraShapes,
            Corruption::UnknownStatus,
            Corruption::OversizedOutput,
        ] {
            fake.state().corruption = Some(c);
            let err = infer_one(&engine, 1, &input, &output).unwrap_err();
            assert!(
                matches!(err, EngineError::Chain(ChainError::BadResponse(_))),
                "{c:?}: {err}"
            );
        }
        fake.state().corruption = Some(Corruption::UsedLenZero);
        let out = infer_one(&engine, 1, &input, &output).unwrap();
        assert_eq!(out.status, Status::BadRequest);
        let out = infer_one(&engine, 1, &input, &output).unwrap();
        assert_eq!(out.status, Status::Ok);
        assert_eq!(engine.guest_trace().driver_errors, 5);
    }

    #[test]
    fn models_trace_and_cancel() {
        let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
        assert_eq!(engine.models().unwrap(), fake_models());
        // A list larger than the first payload area: the engine resizes and retries.
        let mut many = Vec::new();
        for id in 1..=100 {
            let mut m = fake_models()[0].clone();
            m.id = id;
            many.push(m);
        }
        fake.state().models = many.clone();
        assert_eq!(engine.models().unwrap(), many);
        fake.state().trace.completed = 41;
        assert_eq!(engine.device_trace().unwrap().completed, 41);
        assert_eq!(engine.cancel(12345).unwrap(), CancelOutcome::NotFound);
    }
}
