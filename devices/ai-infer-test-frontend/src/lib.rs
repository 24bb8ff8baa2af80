//! A small vhost-user frontend with a split-virtqueue driver, standing in for a VMM
//! and a guest driver: the tool for the daemon's integration tests and for load
//! generation against a running daemon.
//!
//! [`TestFrontend::connect`] creates memfd-backed "guest memory", connects to a
//! tenant socket, negotiates features, shares the memory (SET_MEM_TABLE) and sets up
//! the request queues with kick and call eventfds. Requests are then built with the
//! protocol crate and laid out one buffer per part, as the spec recommends:
//!
//! ```no_run
//! use ai_infer_protocol::{DType, Request, TensorDesc};
//! use ai_infer_test_frontend::{FrontendOptions, TestFrontend};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut fe = TestFrontend::connect("/run/ai-inferd/vm-a.sock".as_ref(), FrontendOptions::default())?;
//! let models = fe.models()?;
//! let req = Request::infer(
//!     1,
//!     models.models[0].id,
//!     vec![TensorDesc::input(DType::F32, &[1, 4])?],
//!     vec![TensorDesc::output(DType::F32, &[1, 4], 16)?],
//! )?;
//! let input: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let done = fe.call(0, &req, &[&input], 0)?;
//! println!("{:?}: {:?}", done.header, done.outputs);
//! # Ok(())
//! # }
//! ```
//!
//! For load generation, [`TestFrontend::submit`] and [`TestFrontend::wait_any`] /
//! [`TestFrontend::finish`] keep many requests in flight. For malformed chains, the
//! raw calls ([`TestFrontend::alloc_descriptors`], [`TestFrontend::write_descriptor`],
//! [`TestFrontend::publish`]) write descriptors exactly as given.
//!
//! [`load`] runs synthetic tenants on these frontends: closed or open loop, every
//! completion recorded.
//!
//! This is test code with production-grade checks on what it reads back, but it
//! trusts the daemon to follow the virtio rules (it is the driver, not the device).
//! ai-inferd's tests and its `bench` command use it; the daemon's library does not.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use ai_infer_protocol::{
    DeviceConfig, ModelList, ProtocolError, Request, Response, ResponseHeader, TensorDesc,
    TraceCounters, CONFIG_SPACE_LEN, DEVICE_FEATURES, RESPONSE_HEADER_LEN, TENSOR_DESC_LEN,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod load;

/// What went wrong on the frontend side.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// A vhost-user message failed.
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// Creating or accessing the test's guest memory failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// An eventfd or memfd operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// No used element arrived in time.
    #[error("queue {queue}: no used element within {timeout:?}")]
    Timeout {
        /// The queue.
        queue: u16,
        /// How long we waited.
        timeout: Duration,
    },
    /// The queue has no free descriptors left.
    #[error("queue {0}: out of descriptors")]
    NoDescriptors(u16),
    /// Guest memory has no free range that large.
    #[error("no free guest buffer of {0} bytes")]
    NoBuffer(u64),
    /// A request or a response could not be encoded or decoded.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The device answered something unexpected.
    #[error("device: {0}")]
    Device(String),
    /// The queue index is not one of this frontend's queues.
    #[error("no queue {0}")]
    NoQueue(u16),
}

/// How to set the frontend up.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Guest memory regions: (guest-physical start, size), each its own memfd.
    pub regions: Vec<(u64, usize)>,
    /// Entries per queue (a power of two, ≤ 256).
    pub queue_size: u16,
    /// Request queues to set up (≤ the device's `num_request_queues`).
    pub num_queues: u16,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Put each request's descriptors in an indirect table.
    pub indirect: bool,
    /// How long [`TestFrontend::call`] and friends wait for a completion.
    pub timeout: Duration,
    /// Seal each memfd against shrinking and growing before sharing it, as aivmm does
    /// (the daemon refuses unsealed memory); false plays a careless or hostile VMM.
    pub seal_memory: bool,
}

impl Default for FrontendOptions {
    /// 32 MiB at 1 GiB, one queue of 256, no EVENT_IDX, direct descriptors, 10 s,
    /// sealed memfds.
    fn default() -> Self {
        FrontendOptions {
            regions: vec![(0x4000_0000, 32 << 20)],
            queue_size: 256,
            num_queues: 1,
            event_idx: false,
            indirect: false,
            timeout: Duration::from_secs(10),
            seal_memory: true,
        }
    }
}

/// The descriptors of a chain over `buffers` placed in `slots` (ring or indirect-table
/// indices, one per buffer): each links to the next slot, and the last ends the chain.
fn chain_descriptors<'a>(
    buffers: &'a [Buffer],
    slots: &'a [u16],
) -> impl Iterator<Item = (usize, RawDesc)> + 'a {
    buffers.iter().enumerate().map(move |(i, b)| {
        let next = slots.get(i + 1).copied();
        let mut flags = 0u16;
        if b.writable {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let d = RawDesc {
            addr: b.addr,
            len: b.len,
            flags,
            next: next.unwrap_or(0),
        };
        (i, d)
    })
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

/// One buffer of a chain to build: address, length, device-writable or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head index of the completed chain.
    pub id: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// A request made available and not yet finished.
#[derive(Debug)]
pub struct Pending {
    /// Queue it went to.
    pub queue: u16,
    /// Its chain's head index (the used element's id).
    pub head: u16,
    /// Its request id.
    pub request_id: u64,
    outputs: Vec<(u64, u64)>,
    tail: (u64, u64),
    payload_capacity: u64,
    buffers: Vec<(u64, u64)>,
}

/// A finished request, decoded.
#[derive(Debug)]
pub struct Completed {
    /// The used element.
    pub used: UsedElem,
    /// The response header, if `used.len` ≥ 48 (else the chain was rejected unanswered).
    pub header: Option<ResponseHeader>,
    /// Output shape entries (`header.num_outputs` of them).
    pub shapes: Vec<TensorDesc>,
    /// Each output buffer's whole contents.
    pub outputs: Vec<Vec<u8>>,
    /// MODELS / TRACE payload (`header.payload_len` bytes when OK).
    pub payload: Vec<u8>,
}

impl Completed {
    /// The header, or an error for an unanswered chain.
    pub fn header(&self) -> Result<&ResponseHeader, FrontendError> {
        self.header.as_ref().ok_or_else(|| {
            FrontendError::Device(format!("chain returned with used.len {}", self.used.len))
        })
    }
}

/// First-fit allocator over the guest memory regions.
struct BufferPool {
    free: Vec<(u64, u64)>,
}

impl BufferPool {
    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = len.max(1);
        for i in 0..self.free.len() {
            let (start, size) = self.free[i];
            let aligned = start.checked_next_multiple_of(align)?;
            let pad = aligned - start;
            if pad.checked_add(len)? <= size {
                self.free.remove(i);
                if aligned + len < start + size {
                    self.free
                        .insert(i, (aligned + len, start + size - aligned - len));
                }
                if pad > 0 {
                    self.free.insert(i, (start, pad));
                }
                return Some(aligned);
            }
        }
        None
    }

    fn release(&mut self, addr: u64, len: u64) {
        let len = len.max(1);
        let pos = self.free.partition_point(|(s, _)| *s < addr);
        self.free.insert(pos, (addr, len));
        // Coalesce with the neighbours.
        if pos + 1 < self.free.len() && self.free[pos].0 + self.free[pos].1 == self.free[pos + 1].0
        {
            self.free[pos].1 += self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0 && self.free[pos - 1].0 + self.free[pos - 1].1 == self.free[pos].0 {
            self.free[pos - 1].1 += self.free[pos].1;
            self.free.remove(pos);
        }
    }
}

/// The driver side of one split virtqueue.
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free_descs: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    next_avail: u16,
    last_used: u16,
    stash: VecDeque<UsedElem>,
    kick: EventFd,
    call: EventFd,
    interrupts: u64,
}

/// A vhost-user frontend and virtio driver for one tenant socket.
pub struct TestFrontend {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    pool: BufferPool,
    queues: Vec<DriverQueue>,
    options: FrontendOptions,
    acked_features: u64,
    indirect_tables: HashMap<(u16, u16), (u64, u64)>,
}

fn memfd(size: usize, seal: bool) -> Result<File, FrontendError> {
    let name =
        CString::new("ai-inferd-test-guest").map_err(|e| FrontendError::Memory(e.to_string()))?;
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on the memfd we own, with an int argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(file)
}

fn mem_err(e: impl std::fmt::Display) -> FrontendError {
    FrontendError::Memory(e.to_string())
}

impl TestFrontend {
    /// Connects to `socket` and brings the device up with `options`.
    pub fn connect(socket: &Path, options: FrontendOptions) -> Result<Self, FrontendError> {
        let mut ranges = Vec::new();
        for (gpa, size) in &options.regions {
            ranges.push((
                GuestAddress(*gpa),
                *size,
                Some(FileOffset::new(memfd(*size, options.seal_memory)?, 0)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(mem_err)?;
        let mut pool = BufferPool {
            free: options
                .regions
                .iter()
                .map(|(gpa, size)| (*gpa, *size as u64))
                .collect(),
        };
        pool.free.sort_unstable();

        let mut frontend = Frontend::connect(socket, u64::from(options.num_queues))?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut wanted = (1u64 << ai_infer_protocol::VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if options.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let acked = offered & wanted;
        if acked & DEVICE_FEATURES & (1 << ai_infer_protocol::VIRTIO_F_VERSION_1) == 0 {
            return Err(FrontendError::Device(format!(
                "device offers {offered:#x} without VERSION_1"
            )));
        }
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let protocol = frontend.get_protocol_features()?;
            let want = VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::REPLY_ACK;
            frontend.set_protocol_features(protocol & want)?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // As aivmm does: a kick must not overtake SET_VRING_ENABLE.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        frontend.set_features(acked)?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()?;
        frontend.set_mem_table(&regions)?;

        let mut fe = TestFrontend {
            frontend,
            mem,
            pool,
            queues: Vec::new(),
            options,
            acked_features: acked,
            indirect_tables: HashMap::new(),
        };
        for q in 0..fe.options.num_queues {
            fe.setup_queue(q)?;
        }
        Ok(fe)
    }

    fn host_addr(&self, gpa: u64) -> Result<u64, FrontendError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(mem_err)
    }

    fn setup_queue(&mut self, q: u16) -> Result<(), FrontendError> {
        let size = self.options.queue_size;
        let n = u64::from(size);
        let desc = self.alloc_aligned(16 * n, 4096)?;
        let avail = self.alloc_aligned(6 + 2 * n, 4096)?;
        let used = self.alloc_aligned(6 + 8 * n, 4096)?;
        for (addr, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
            self.write(addr, &vec![0u8; len as usize])?;
        }
        let index = usize::from(q);
        self.frontend.set_vring_num(index, size)?;
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.host_addr(desc)?,
            used_ring_addr: self.host_addr(used)?,
            avail_ring_addr: self.host_addr(avail)?,
            log_addr: None,
        };
        self.frontend.set_vring_addr(index, &config)?;
        self.frontend.set_vring_base(index, 0)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        self.frontend.set_vring_call(index, &call)?;
        self.frontend.set_vring_kick(index, &kick)?;
        self.frontend.set_vring_enable(index, true)?;
        self.queues.push(DriverQueue {
            size,
            desc,
            avail,
            used,
            free_descs: (0..size).rev().collect(),
            chains: HashMap::new(),
            next_avail: 0,
            last_used: 0,
            stash: VecDeque::new(),
            kick,
            call,
            interrupts: 0,
        });
        Ok(())
    }

    /// The feature bits this frontend acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Reads the device configuration space (GET_CONFIG).
    pub fn device_config(&mut self) -> Result<DeviceConfig, FrontendError> {
        let buf = [0u8; CONFIG_SPACE_LEN];
        let (_, payload) = self.frontend.get_config(
            0,
            CONFIG_SPACE_LEN as u32,
            VhostUserConfigFlags::empty(),
            &buf,
        )?;
        Ok(DeviceConfig::decode(&payload)?)
    }

    /// Sends RESET_DEVICE: the device abandons every request in flight.
    pub fn reset_device(&mut self) -> Result<(), FrontendError> {
        self.frontend.reset_device()?;
        Ok(())
    }

    /// The shared guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Resizes the memfd behind region `index` (in guest-address order) to
    /// `len` bytes after it was shared: what a hostile VMM does to make the daemon's
    /// mapping fault. Sealed memory refuses (an I/O error with EPERM). This frontend
    /// must not touch the region past `len` afterwards.
    pub fn truncate_region(&self, index: usize, len: u64) -> Result<(), FrontendError> {
        let region = self
            .mem
            .iter()
            .nth(index)
            .ok_or_else(|| FrontendError::Memory(format!("no region {index}")))?;
        let file = vm_memory::GuestMemoryRegion::file_offset(region)
            .ok_or_else(|| FrontendError::Memory(format!("region {index} has no file")))?
            .file();
        file.set_len(len)?;
        Ok(())
    }

    /// Allocates `len` bytes of guest memory aligned to 64 bytes.
    pub fn alloc(&mut self, len: u64) -> Result<u64, FrontendError> {
        self.alloc_aligned(len, 64)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc_aligned(&mut self, len: u64, align: u64) -> Result<u64, FrontendError> {
        self.pool
            .alloc(len, align)
            .ok_or(FrontendError::NoBuffer(len))
    }

    /// Returns a buffer from [`TestFrontend::alloc`].
    pub fn free(&mut self, addr: u64, len: u64) {
        self.pool.release(addr, len);
    }

    /// Writes guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), FrontendError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(mem_err)
    }

    /// Reads guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, FrontendError> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(mem_err)?;
        Ok(buf)
    }

    fn queue(&mut self, q: u16) -> Result<&mut DriverQueue, FrontendError> {
        self.queues
            .get_mut(usize::from(q))
            .ok_or(FrontendError::NoQueue(q))
    }

    /// Entries in queue `q`.
    pub fn queue_size(&self, q: u16) -> Result<u16, FrontendError> {
        self.queues
            .get(usize::from(q))
            .map(|dq| dq.size)
            .ok_or(FrontendError::NoQueue(q))
    }

    /// Interrupts (call eventfd signals) seen on queue `q` so far.
    pub fn interrupts(&self, q: u16) -> Result<u64, FrontendError> {
        self.queues
            .get(usize::from(q))
            .map(|dq| dq.interrupts)
            .ok_or(FrontendError::NoQueue(q))
    }

    /// Takes `n` free descriptor slots of queue `q` (for hand-made chains).
    pub fn alloc_descriptors(&mut self, q: u16, n: usize) -> Result<Vec<u16>, FrontendError> {
        let dq = self.queue(q)?;
        if dq.free_descs.len() < n {
            return Err(FrontendError::NoDescriptors(q));
        }
        let at = dq.free_descs.len() - n;
        Ok(dq.free_descs.split_off(at))
    }

    /// Returns descriptor slots taken with [`TestFrontend::alloc_descriptors`].
    pub fn free_descriptors(&mut self, q: u16, slots: &[u16]) -> Result<(), FrontendError> {
        self.queue(q)?.free_descs.extend_from_slice(slots);
        Ok(())
    }

    /// Writes descriptor `index` of queue `q`'s table exactly as given.
    pub fn write_descriptor(
        &mut self,
        q: u16,
        index: u16,
        d: RawDesc,
    ) -> Result<(), FrontendError> {
        let table = self.queue(q)?.desc;
        self.write_raw_desc(table + u64::from(index) * 16, d)
    }

    fn write_raw_desc(&self, at: u64, d: RawDesc) -> Result<(), FrontendError> {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.write(at, &b)
    }

    /// Makes `head` available on queue `q` and kicks.
    pub fn publish(&mut self, q: u16, head: u16) -> Result<(), FrontendError> {
        let (avail, size, idx) = {
            let dq = self.queue(q)?;
            (dq.avail, dq.size, dq.next_avail)
        };
        let slot = avail + 4 + 2 * u64::from(idx % size);
        self.write(slot, &head.to_le_bytes())?;
        fence(Ordering::Release);
        self.set_avail_idx(q, idx.wrapping_add(1))
    }

    /// Sets the available index of queue `q` to any value and continues from there
    /// (ring-corruption tests), then kicks.
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) -> Result<(), FrontendError> {
        let avail = self.queue(q)?.avail;
        self.mem
            .store(idx.to_le(), GuestAddress(avail + 2), Ordering::Release)
            .map_err(mem_err)?;
        let dq = self.queue(q)?;
        dq.next_avail = idx;
        dq.kick.write(1)?;
        Ok(())
    }

    /// Builds a chain over `buffers` (direct, or through an indirect table if the
    /// options say so), makes it available and kicks. Returns the head index.
    pub fn submit_chain(&mut self, q: u16, buffers: &[Buffer]) -> Result<u16, FrontendError> {
        let head = if self.options.indirect {
            let table_len = 16 * buffers.len() as u64;
            let table = self.alloc_aligned(table_len, 16)?;
            let table_slots: Vec<u16> = (0..buffers.len() as u16).collect();
            for (i, d) in chain_descriptors(buffers, &table_slots) {
                self.write_raw_desc(table + 16 * i as u64, d)?;
            }
            let slots = self.alloc_descriptors(q, 1)?;
            let d = RawDesc {
                addr: table,
                len: table_len as u32,
                flags: VRING_DESC_F_INDIRECT as u16,
                next: 0,
            };
            self.write_descriptor(q, slots[0], d)?;
            self.queue(q)?.chains.insert(slots[0], slots.clone());
            // Freed with the chain in `release_chain`.
            self.indirect_tables
                .insert((q, slots[0]), (table, table_len));
            slots[0]
        } else {
            let slots = self.alloc_descriptors(q, buffers.len())?;
            for (i, d) in chain_descriptors(buffers, &slots) {
                self.write_descriptor(q, slots[i], d)?;
            }
            let head = slots[0];
            self.queue(q)?.chains.insert(head, slots);
            head
        };
        self.publish(q, head)?;
        Ok(head)
    }

    /// Returns the descriptors (and indirect table) of a completed chain.
    pub fn release_chain(&mut self, q: u16, head: u16) -> Result<(), FrontendError> {
        if let Some((table, len)) = self.indirect_tables.remove(&(q, head)) {
            self.pool.release(table, len);
        }
        let dq = self.queue(q)?;
        if let Some(slots) = dq.chains.remove(&head) {
            dq.free_descs.extend(slots);
        }
        Ok(())
    }

    /// The next used element of queue `q`, if one is there now.
    pub fn poll_used(&mut self, q: u16) -> Result<Option<UsedElem>, FrontendError> {
        if let Some(e) = self.queue(q)?.stash.pop_front() {
            return Ok(Some(e));
        }
        self.read_used(q)
    }

    fn read_used(&mut self, q: u16) -> Result<Option<UsedElem>, FrontendError> {
        let (used, size, last) = {
            let dq = self.queue(q)?;
            (dq.used, dq.size, dq.last_used)
        };
        let idx: u16 = self
            .mem
            .load(GuestAddress(used + 2), Ordering::Acquire)
            .map_err(mem_err)?;
        if u16::from_le(idx) == last {
            return Ok(None);
        }
        let elem = self.read(used + 4 + 8 * u64::from(last % size), 8)?;
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        let id = u16::try_from(id)
            .ok()
            .filter(|id| *id < size)
            .ok_or_else(|| FrontendError::Device(format!("used id {id} out of range")))?;
        let next = last.wrapping_add(1);
        // With EVENT_IDX, ask for an interrupt on the next used element.
        if self.options.event_idx {
            let used_event = self.queue(q)?.avail + 4 + 2 * u64::from(size);
            self.mem
                .store(next.to_le(), GuestAddress(used_event), Ordering::Release)
                .map_err(mem_err)?;
        }
        self.queue(q)?.last_used = next;
        Ok(Some(UsedElem { id, len }))
    }

    /// Waits for the next used element of queue `q`.
    pub fn wait_any(&mut self, q: u16, timeout: Duration) -> Result<UsedElem, FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.poll_used(q)? {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout { queue: q, timeout });
            }
            self.wait_interrupt(q, left.min(Duration::from_millis(5)))?;
        }
    }

    /// Waits for the used element of chain `head` on queue `q`; other elements seen
    /// meanwhile are kept for [`TestFrontend::poll_used`] / [`TestFrontend::wait_any`].
    pub fn wait_for(
        &mut self,
        q: u16,
        head: u16,
        timeout: Duration,
    ) -> Result<UsedElem, FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let dq = self.queue(q)?;
            if let Some(pos) = dq.stash.iter().position(|e| e.id == head) {
                if let Some(e) = dq.stash.remove(pos) {
                    return Ok(e);
                }
            }
            match self.read_used(q)? {
                Some(e) if e.id == head => return Ok(e),
                Some(e) => self.queue(q)?.stash.push_back(e),
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(FrontendError::Timeout { queue: q, timeout });
                    }
                    self.wait_interrupt(q, left.min(Duration::from_millis(5)))?;
                }
            }
        }
    }

    fn wait_interrupt(&mut self, q: u16, timeout: Duration) -> Result<(), FrontendError> {
        let dq = self.queue(q)?;
        let mut pfd = libc::pollfd {
            fd: dq.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis())
            .unwrap_or(i32::MAX)
            .max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 && dq.call.read().is_ok() {
            dq.interrupts += 1;
        }
        Ok(())
    }

    /// Lays `req` out (one buffer for header and descriptors, one per input, one per
    /// output, one for the payload area, shapes and response header), makes it
    /// available on queue `q` and kicks. `payload_capacity` is the MODELS/TRACE
    /// payload area (0 for INFER and CANCEL).
    pub fn submit(
        &mut self,
        q: u16,
        req: &Request,
        inputs: &[&[u8]],
        payload_capacity: u64,
    ) -> Result<Pending, FrontendError> {
        let mut bytes = vec![0u8; req.encoded_len()];
        req.encode(&mut bytes)?;
        let mut parts: Vec<(Vec<u8>, bool)> = vec![(bytes, false)];
        for data in inputs {
            parts.push((data.to_vec(), false));
        }
        let output_lens: Vec<u64> = req.outputs.iter().map(|d| d.data_len).collect();
        let tail_len =
            payload_capacity + (req.outputs.len() * TENSOR_DESC_LEN + RESPONSE_HEADER_LEN) as u64;
        let mut buffers = Vec::new();
        let mut chain = Vec::new();
        let mut outputs = Vec::new();
        let result = (|| {
            for (data, _) in &parts {
                let addr = self.alloc(data.len() as u64)?;
                buffers.push((addr, data.len() as u64));
                self.write(addr, data)?;
                chain.push(Buffer {
                    addr,
                    len: data.len() as u32,
                    writable: false,
                });
            }
            for len in &output_lens {
                let addr = self.alloc(*len)?;
                buffers.push((addr, *len));
                outputs.push((addr, *len));
                chain.push(Buffer {
                    addr,
                    len: *len as u32,
                    writable: true,
                });
            }
            let tail = self.alloc(tail_len)?;
            buffers.push((tail, tail_len));
            chain.push(Buffer {
                addr: tail,
                len: tail_len as u32,
                writable: true,
            });
            let head = self.submit_chain(q, &chain)?;
            Ok::<_, FrontendError>((head, tail))
        })();
        match result {
            Ok((head, tail)) => Ok(Pending {
                queue: q,
                head,
                request_id: req.header.request_id,
                outputs,
                tail: (tail, tail_len),
                payload_capacity,
                buffers,
            }),
            Err(e) => {
                for (addr, len) in buffers {
                    self.pool.release(addr, len);
                }
                Err(e)
            }
        }
    }

    /// The current contents of output `k`'s buffer of a pending request.
    pub fn read_output(&self, pending: &Pending, k: usize) -> Result<Vec<u8>, FrontendError> {
        let (addr, len) = pending
            .outputs
            .get(k)
            .ok_or_else(|| FrontendError::Device(format!("no output {k}")))?;
        self.read(*addr, *len as usize)
    }

    /// Decodes a finished request and frees its buffers and descriptors.
    pub fn finish(&mut self, pending: Pending, used: UsedElem) -> Result<Completed, FrontendError> {
        let result = self.decode(&pending, used);
        for (addr, len) in &pending.buffers {
            self.pool.release(*addr, *len);
        }
        self.release_chain(pending.queue, pending.head)?;
        result
    }

    fn decode(&self, pending: &Pending, used: UsedElem) -> Result<Completed, FrontendError> {
        let mut done = Completed {
            used,
            header: None,
            shapes: Vec::new(),
            outputs: Vec::new(),
            payload: Vec::new(),
        };
        for (addr, len) in &pending.outputs {
            done.outputs.push(self.read(*addr, *len as usize)?);
        }
        if (used.len as usize) < RESPONSE_HEADER_LEN {
            return Ok(done);
        }
        let tail = self.read(pending.tail.0, pending.tail.1 as usize)?;
        let header = ResponseHeader::decode(&tail[tail.len() - RESPONSE_HEADER_LEN..])?;
        if header.num_outputs > 0 {
            done.shapes = Response::decode(&tail)?.outputs;
        }
        let payload_len = header.payload_len.min(pending.payload_capacity) as usize;
        done.payload = tail[..payload_len].to_vec();
        done.header = Some(header);
        Ok(done)
    }

    /// Waits for a submitted request and decodes it.
    pub fn wait(
        &mut self,
        pending: Pending,
        timeout: Duration,
    ) -> Result<Completed, FrontendError> {
        let used = self.wait_for(pending.queue, pending.head, timeout)?;
        self.finish(pending, used)
    }

    /// Submits `req`, waits for it and decodes it.
    pub fn call(
        &mut self,
        q: u16,
        req: &Request,
        inputs: &[&[u8]],
        payload_capacity: u64,
    ) -> Result<Completed, FrontendError> {
        let pending = self.submit(q, req, inputs, payload_capacity)?;
        self.wait(pending, self.options.timeout)
    }

    /// MODELS on queue 0 with a 64 KiB payload area.
    pub fn models(&mut self) -> Result<ModelList, FrontendError> {
        let done = self.call(0, &Request::models(u64::MAX - 1), &[], 64 << 10)?;
        let header = done.header()?;
        if header.status != ai_infer_protocol::Status::Ok {
            return Err(FrontendError::Device(format!(
                "MODELS: {:?}",
                header.status
            )));
        }
        Ok(ModelList::decode(&done.payload)?)
    }

    /// TRACE on queue 0.
    pub fn trace(&mut self) -> Result<TraceCounters, FrontendError> {
        let done = self.call(
            0,
            &Request::trace(u64::MAX - 2),
            &[],
            TraceCounters::LEN as u64,
        )?;
        let header = done.header()?;
        if header.status != ai_infer_protocol::Status::Ok {
            return Err(FrontendError::Device(format!("TRACE: {:?}", header.status)));
        }
        Ok(TraceCounters::decode(&done.payload)?)
    }

    /// CANCEL of `target` on queue `q`; returns the outcome.
    pub fn cancel(
        &mut self,
        q: u16,
        request_id: u64,
        target: u64,
    ) -> Result<ai_infer_protocol::CancelOutcome, FrontendError> {
        let done = self.call(q, &Request::cancel(request_id, target), &[], 0)?;
        let header = done.header()?;
        if header.status != ai_infer_protocol::Status::Ok {
            return Err(FrontendError::Device(format!(
                "CANCEL: {:?}",
                header.status
            )));
        }
        Ok(header.cancel_outcome()?)
    }
}
