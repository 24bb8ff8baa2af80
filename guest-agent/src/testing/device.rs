//! A fake ai_infer virtio-pci function for tests: the common configuration registers
//! with their side effects, the device configuration, notification, and request
//! handling that uses the protocol crate the way a real device does
//! (`Request::parse`, `ChainLayout::from_chain`, `ModelInfo::check_request`).

use std::sync::{Arc, Mutex, MutexGuard};

use ai_infer_protocol::virtio_pci::{common, status};
use ai_infer_protocol::{
    CancelOutcome, ChainLayout, DType, DeviceConfig, DimRange, ModelInfo, ModelList, Opcode,
    PriorityClass, ProtocolError, Request, Response, ResponseHeader, Shape, Status, TensorDesc,
    TensorSpec, TraceCounters, DEVICE_FEATURES, RESPONSE_HEADER_LEN,
};

use super::ring::{device_read, device_write};
use super::FakeRing;
use crate::dma::DmaPool;
use crate::mmio::Registers;
use crate::pci::{CapRegion, VirtioCaps};
use crate::transport::VirtioPciTransport;

const COMMON: u64 = 0x0000;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const BAR_LEN: u64 = 0x4000;
const NOTIFY_MULT: u32 = 4;
const NUM_QUEUES: u16 = 2;

/// Ways to misbehave on the next response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// Echo another request id.
    WrongRequestId,
    /// Publish used.len = 0 (as for an unreportable chain) without writing.
    UsedLenZero,
    /// Publish a used.len smaller than W but at least 48.
    ShortUsedLen,
    /// Report more output shapes than the request has.
    ExtraShapes,
    /// Write status 13.
    UnknownStatus,
    /// Claim more bytes written than the buffer holds.
    OversizedOutput,
}

/// How the fake behaves.
#[derive(Clone, Copy, Debug)]
pub struct FakeDeviceBehaviour {
    /// The backend connects after this many resets.
    pub connect_after_resets: u32,
    /// Features offered.
    pub features: u64,
    /// Never accept FEATURES_OK.
    pub refuse_features: bool,
    /// Maximum queue size reported.
    pub max_queue_size: u16,
    /// Generation changes on this many reads.
    pub generation_bumps: u32,
    /// Process chains when notified (else tests complete them explicitly).
    pub auto_complete: bool,
}

impl Default for FakeDeviceBehaviour {
    fn default() -> Self {
        FakeDeviceBehaviour {
            connect_after_resets: 0,
            features: DEVICE_FEATURES,
            refuse_features: false,
            max_queue_size: 1024,
            generation_bumps: 0,
            auto_complete: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FakeQueue {
    pub size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

pub struct FakeState {
    pub behaviour: FakeDeviceBehaviour,
    pub status: u8,
    pub status_writes: Vec<u8>,
    pub resets: u32,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config: DeviceConfig,
    pub generation: u8,
    pub queue_select: u16,
    pub queues: Vec<FakeQueue>,
    pub rings: Vec<Option<FakeRing>>,
    pub notifies: Vec<u16>,
    pub models: Vec<ModelInfo>,
    pub trace: TraceCounters,
    pub corruption: Option<Corruption>,
    /// Request ids of INFERs seen, in processing order.
    pub seen: Vec<u64>,
    /// Priority and deadline of each INFER seen, in processing order.
    pub infer_options: Vec<(PriorityClass, u64)>,
    pool: DmaPool,
    /// More guest memory the device can reach (daemon session pools).
    pub extra_pools: Vec<DmaPool>,
}

impl FakeState {
    fn connected(&self) -> bool {
        self.resets >= self.behaviour.connect_after_resets
    }
}

/// The fake function: one BAR holding every structure.
#[derive(Clone)]
pub struct FakeVirtioPci {
    state: Arc<Mutex<FakeState>>,
}

/// The fake's models: 1 doubles f32 vectors, 2 summarises UTF-8 text.
pub fn fake_models() -> Vec<ModelInfo> {
    vec![
        ModelInfo {
            id: 1,
            name: "double".into(),
            max_batch: 1,
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                dims: vec![DimRange::fixed(1), DimRange::dynamic(1024)],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                dims: vec![DimRange::fixed(1), DimRange::dynamic(1024)],
            }],
        },
        ModelInfo {
            id: 2,
            name: "text-stats".into(),
            max_batch: 8,
            inputs: vec![TensorSpec {
                name: "text".into(),
                dtype: DType::U8,
                dims: vec![DimRange::dynamic(4096)],
            }],
            outputs: vec![TensorSpec {
                name: "stats".into(),
                dtype: DType::F32,
                dims: vec![DimRange::fixed(1), DimRange::fixed(4)],
            }],
        },
    ]
}

impl FakeVirtioPci {
    pub fn new(behaviour: FakeDeviceBehaviour) -> Self {
        // 256 pages of 4 KiB: two physically separate runs of 128.
        let pages: Vec<u64> = (0..256u64)
            .map(|i| {
                if i < 128 {
                    0x1000_0000 + i * 4096
                } else {
                    0x4000_0000 + (i - 128) * 4096
                }
            })
            .collect();
        let pool = DmaPool::fake(4096, &pages).expect("fake pool");
        let config = DeviceConfig {
            num_request_queues: NUM_QUEUES,
            ..DeviceConfig::default()
        };
        FakeVirtioPci {
            state: Arc::new(Mutex::new(FakeState {
                behaviour,
                status: 0,
                status_writes: Vec::new(),
                resets: 0,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                config,
                generation: 0,
                queue_select: 0,
                queues: vec![FakeQueue::default(); usize::from(NUM_QUEUES)],
                rings: (0..NUM_QUEUES).map(|_| None).collect(),
                notifies: Vec::new(),
                models: fake_models(),
                trace: TraceCounters::default(),
                corruption: None,
                seen: Vec::new(),
                infer_options: Vec::new(),
                pool,
                extra_pools: Vec::new(),
            })),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub fn pool(&self) -> DmaPool {
        self.state().pool.clone()
    }

    pub fn caps() -> VirtioCaps {
        let r = |offset: u64, length: u32| CapRegion {
            bar: 0,
            offset: offset as u32,
            length,
        };
        VirtioCaps {
            common: r(COMMON, 0x40),
            notify: r(NOTIFY, 0x1000),
            notify_off_multiplier: NOTIFY_MULT,
            isr: None,
            device: r(DEVICE, 0x28),
        }
    }

    pub fn transport(&self) -> VirtioPciTransport {
        let regs: Arc<dyn Registers> = Arc::new(self.clone());
        VirtioPciTransport::new(&Self::caps(), |_| Ok(regs.clone())).expect("fake transport")
    }

    /// Publishes a used element on `queue` directly.
    pub fn complete_raw(&self, queue: u16, id: u32, len: u32) {
        let mut st = self.state();
        st.rings[usize::from(queue)]
            .as_mut()
            .expect("ring")
            .complete(id, len);
    }
}

fn process(st: &mut FakeState) -> usize {
    let mut done = 0;
    for q in 0..st.rings.len() {
        let mut taken = Vec::new();
        while let Some(chain) = st.rings[q].as_mut().and_then(FakeRing::take) {
            taken.push(chain);
        }
        for (head, chain) in taken {
            let len = handle_chain(st, &chain);
            st.rings[q]
                .as_mut()
                .expect("ring")
                .complete(u32::from(head), len);
            done += 1;
        }
    }
    done
}

/// The device's handling of one chain; returns used.len.
fn handle_chain(st: &mut FakeState, chain: &[(u64, u32, bool)]) -> u32 {
    let mut pools = vec![st.pool.clone()];
    pools.extend(st.extra_pools.iter().cloned());
    let readable: Vec<u8> = chain
        .iter()
        .filter(|c| !c.2)
        .flat_map(|c| device_read(&pools, c.0, c.1 as usize))
        .collect();
    let writable: Vec<(u64, u32)> = chain.iter().filter(|c| c.2).map(|c| (c.0, c.1)).collect();
    let w_len: u64 = writable.iter().map(|w| u64::from(w.1)).sum();
    if w_len < RESPONSE_HEADER_LEN as u64 {
        return 0;
    }
    let mut w = vec![0u8; w_len as usize];
    let request_id = ai_infer_protocol::RequestHeader::peek_request_id(&readable).unwrap_or(0);
    let mut response = match serve(st, &readable, w_len, &mut w) {
        Ok(r) => r,
        Err(e) => Response {
            header: ResponseHeader::from_error(request_id, &e),
            outputs: vec![],
        },
    };
    let corruption = st.corruption.take();
    match corruption {
        Some(Corruption::WrongRequestId) => response.header.request_id ^= 1,
        Some(Corruption::ExtraShapes) => {
            let extra =
                response.outputs.first().copied().unwrap_or(
                    TensorDesc::produced(DType::F32, Shape::new(&[1]).unwrap()).unwrap(),
                );
            response.outputs.push(extra);
            response.header.num_outputs += 1;
        }
        Some(Corruption::OversizedOutput) => {
            if let Some(o) = response.outputs.first_mut() {
                o.data_len += 4;
            }
        }
        _ => {}
    }
    let tail = response.encoded_len();
    let at = w.len().saturating_sub(tail);
    if tail <= w.len() {
        response.encode(&mut w[at..]).expect("encode response");
    } else {
        // Cannot fit the shapes: report the header only.
        let mut h = response.header;
        h.num_outputs = 0;
        let n = w.len();
        h.encode(&mut w[n - RESPONSE_HEADER_LEN..])
            .expect("encode header");
    }
    if corruption == Some(Corruption::UnknownStatus) {
        let n = w.len();
        w[n - 48..n - 44].copy_from_slice(&13u32.to_le_bytes());
    }
    // Scatter W back into the chain's writable buffers.
    let mut off = 0usize;
    for (addr, len) in &writable {
        device_write(&pools, *addr, &w[off..off + *len as usize]);
        off += *len as usize;
    }
    match corruption {
        Some(Corruption::UsedLenZero) => 0,
        Some(Corruption::ShortUsedLen) => (w_len - 1) as u32,
        _ => w_len as u32,
    }
}

fn serve(
    st: &mut FakeState,
    r: &[u8],
    w_len: u64,
    w: &mut [u8],
) -> Result<Response, ProtocolError> {
    let req = Request::parse(r, &st.config)?;
    let layout = ChainLayout::from_chain(&req, r.len() as u64, w_len)?;
    let id = req.header.request_id;
    let ok = |outputs: Vec<TensorDesc>, payload_len: u64| Response {
        header: ResponseHeader {
            payload_len,
            batch_size: u32::from(!outputs.is_empty()),
            num_outputs: outputs.len() as u32,
            queue_ns: 1000,
            compute_ns: if outputs.is_empty() { 0 } else { 5000 },
            ..ResponseHeader::new(Status::Ok, id)
        },
        outputs,
    };
    match req.header.opcode {
        Opcode::Infer => {
            st.seen.push(id);
            st.infer_options
                .push((req.header.priority, req.header.deadline_us));
            let Some(model) = st.models.iter().find(|m| m.id == req.header.model_id) else {
                return Ok(Response {
                    header: ResponseHeader::new(Status::UnknownModel, id),
                    outputs: vec![],
                });
            };
            model.check_request(&req)?;
            let input = &r[layout.inputs[0].offset as usize..layout.inputs[0].end() as usize];
            let (shape, data): (Shape, Vec<u8>) = match model.id {
                1 => (
                    req.inputs[0].shape,
                    input
                        .chunks_exact(4)
                        .flat_map(|c| {
                            (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 2.0).to_le_bytes()
                        })
                        .collect(),
                ),
                _ => {
                    let sum: u32 = input.iter().map(|b| u32::from(*b)).sum();
                    let stats = [
                        input.len() as f32,
                        sum as f32,
                        input[0] as f32,
                        input[input.len() - 1] as f32,
                    ];
                    (
                        Shape::new(&[1, 4]).unwrap(),
                        stats.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    )
                }
            };
            let produced = req.outputs[0].check_produced(&shape);
            let entry = match produced {
                Ok(e) => e,
                Err(e) => {
                    let needed = TensorDesc::produced(req.outputs[0].dtype, shape)?;
                    let mut resp = Response {
                        header: ResponseHeader::from_error(id, &ProtocolError::in_tensor(1, e)),
                        outputs: vec![needed],
                    };
                    resp.header.num_outputs = 1;
                    return Ok(resp);
                }
            };
            let at = layout.outputs[0].offset as usize;
            w[at..at + data.len()].copy_from_slice(&data);
            st.trace.record_infer(Status::Ok, 1000, 5000, 1);
            Ok(ok(vec![entry], data.len() as u64))
        }
        Opcode::Models => {
            let list = ModelList {
                models: st.models.clone(),
            };
            let needed = list.encoded_len() as u64;
            if needed > layout.payload.len {
                let mut h = ResponseHeader::new(Status::BufferTooSmall, id);
                h.payload_len = needed;
                return Ok(Response {
                    header: h,
                    outputs: vec![],
                });
            }
            list.encode(&mut w[..needed as usize])?;
            Ok(ok(vec![], needed))
        }
        Opcode::Trace => {
            let n = TraceCounters::LEN as u64;
            if n > layout.payload.len {
                let mut h = ResponseHeader::new(Status::BufferTooSmall, id);
                h.payload_len = n;
                return Ok(Response {
                    header: h,
                    outputs: vec![],
                });
            }
            st.trace.encode(&mut w[..n as usize])?;
            Ok(ok(vec![], n))
        }
        Opcode::Cancel => Ok(Response {
            header: ResponseHeader::cancel(id, CancelOutcome::NotFound),
            outputs: vec![],
        }),
    }
}

impl Registers for FakeVirtioPci {
    fn len(&self) -> u64 {
        BAR_LEN
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut st = self.state();
        let value: u32 = if (DEVICE..DEVICE + 0x28).contains(&offset) {
            let mut cfg = [0u8; 40];
            if st.connected() {
                st.config.encode(&mut cfg).unwrap();
            }
            let o = (offset - DEVICE) as usize;
            let mut v = [0u8; 4];
            v[..data.len()].copy_from_slice(&cfg[o..o + data.len()]);
            u32::from_le_bytes(v)
        } else {
            let sel = usize::from(st.queue_select);
            match offset - COMMON {
                common::DEVICE_FEATURE => {
                    let f = if st.connected() {
                        st.behaviour.features
                    } else {
                        0
                    };
                    (f >> (32 * st.device_feature_select.min(1))) as u32
                }
                common::NUM_QUEUES => u32::from(NUM_QUEUES),
                common::DEVICE_STATUS => u32::from(st.status),
                common::CONFIG_GENERATION => {
                    let g = st.generation;
                    if st.behaviour.generation_bumps > 0 {
                        st.behaviour.generation_bumps -= 1;
                        st.generation = st.generation.wrapping_add(1);
                    }
                    u32::from(g)
                }
                common::QUEUE_SIZE => st.queues.get(sel).map_or(0, |q| {
                    u32::from(if q.size == 0 {
                        st.behaviour.max_queue_size
                    } else {
                        q.size
                    })
                }),
                common::QUEUE_MSIX_VECTOR => st.queues.get(sel).map_or(0, |q| u32::from(q.vector)),
                common::QUEUE_ENABLE => st.queues.get(sel).map_or(0, |q| u32::from(q.enabled)),
                common::QUEUE_NOTIFY_OFF => u32::from(st.queue_select),
                _ => 0,
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(v);
        let mut st = self.state();
        if offset >= NOTIFY {
            st.notifies.push(value as u16);
            if st.behaviour.auto_complete {
                process(&mut st);
            }
            return;
        }
        let sel = usize::from(st.queue_select);
        let half = |old: u64, hi: bool| {
            if hi {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        match offset - COMMON {
            common::DEVICE_FEATURE_SELECT => st.device_feature_select = value,
            common::DRIVER_FEATURE_SELECT => st.driver_feature_select = value,
            common::DRIVER_FEATURE => {
                let shift = 32 * st.driver_feature_select.min(1);
                st.driver_features =
                    (st.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
            }
            common::DEVICE_STATUS => {
                let mut s = value as u8;
                st.status_writes.push(s);
                if s == 0 {
                    st.resets += 1;
                    st.queues = vec![FakeQueue::default(); usize::from(NUM_QUEUES)];
                    st.rings = (0..NUM_QUEUES).map(|_| None).collect();
                } else if s & status::FEATURES_OK != 0
                    && (!st.connected()
                        || st.behaviour.refuse_features
                        || st.driver_features & !st.behaviour.features != 0)
                {
                    s &= !status::FEATURES_OK;
                }
                st.status = s;
            }
            common::QUEUE_SELECT => st.queue_select = value as u16,
            common::QUEUE_SIZE => {
                if let Some(q) = st.queues.get_mut(sel) {
                    q.size = value as u16;
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                if let Some(q) = st.queues.get_mut(sel) {
                    q.vector = value as u16;
                }
            }
            common::QUEUE_ENABLE => {
                let pool = st.pool.clone();
                if let Some(q) = st.queues.get_mut(sel) {
                    q.enabled = value == 1;
                    let q = *q;
                    st.rings[sel] = Some(FakeRing::new(pool, q.size, q.desc, q.driver, q.device));
                }
            }
            o @ common::QUEUE_DESC_LO..common::LEN => {
                if let Some(q) = st.queues.get_mut(sel) {
                    let hi = o % 8 == 4;
                    match o & !7 {
                        common::QUEUE_DESC_LO => q.desc = half(q.desc, hi),
                        common::QUEUE_DRIVER_LO => q.driver = half(q.driver, hi),
                        _ => q.device = half(q.device, hi),
                    }
                }
            }
            _ => {}
        }
    }
}
