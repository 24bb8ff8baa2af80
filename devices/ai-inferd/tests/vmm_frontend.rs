//! aivmm's vhost-user frontend (`devices::virtio::VhostUserDevice`) against a real daemon,
//! without a VM: this file plays the guest driver on memfd "guest memory".

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_protocol::{Request, ResponseHeader, Status, RESPONSE_HEADER_LEN};
use common::*;
use devices::virtio::{
    ActivateParams, Queue, QueueT, VhostUserDevice, VhostUserDeviceConfig, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const REQUEST: u64 = 0x4000;
const TAIL: u64 = 0x10000;
const TAIL_LEN: u32 = 64 << 10;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

fn guest_memory() -> GuestMemoryMmap {
    let name = std::ffi::CString::new("vmm-frontend-test").unwrap();
    // SAFETY: memfd_create with a valid C string; the new fd is checked below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    // Sealed as aivmm seals its zones: the daemon refuses memory that could shrink.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on the memfd we own, with an int argument.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(ret, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// Writes a fresh ring holding one MODELS chain (request, then the writable tail).
fn write_ring_with_models_request(mem: &GuestMemoryMmap, id: u64) {
    mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
    let req = Request::models(id);
    let mut bytes = vec![0u8; req.encoded_len()];
    req.encode(&mut bytes).unwrap();
    mem.write_slice(&bytes, GuestAddress(REQUEST)).unwrap();
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = GuestAddress(DESC + 16 * i);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    };
    desc(0, REQUEST, bytes.len() as u32, VRING_DESC_F_NEXT, 1);
    desc(1, TAIL, TAIL_LEN, VRING_DESC_F_WRITE, 0);
    // avail: flags 0, idx 1, ring[0] = head 0.
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
}

/// Polls the used ring until the chain comes back; its response header.
fn wait_used(mem: &GuestMemoryMmap, timeout: Duration) -> Option<ResponseHeader> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if idx == 1 {
            let len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
            assert!(len as usize >= RESPONSE_HEADER_LEN, "used.len {len}");
            let mut tail = vec![0u8; TAIL_LEN as usize];
            mem.read_slice(&mut tail, GuestAddress(TAIL)).unwrap();
            return Some(
                ResponseHeader::decode(&tail[tail.len() - RESPONSE_HEADER_LEN..]).unwrap(),
            );
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    None
}

/// aivmm's vhost-user frontend for tenant `a` of `h`, connected to the daemon.
fn connected_device(h: &Harness, mem: &GuestMemoryMmap) -> VhostUserDevice {
    let device = VhostUserDevice::new(
        VhostUserDeviceConfig {
            device_type: ai_infer_protocol::VIRTIO_ID_AI_INFER,
            num_queues: 1,
            queue_max_size: QUEUE_SIZE,
            config_len: ai_infer_protocol::CONFIG_SPACE_LEN as u32,
            allowed_features: VIRTIO_F_VERSION_1,
            socket: h.socket("a"),
            backend_peer: Default::default(),
        },
        mem.clone(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !device.ready() {
        assert!(Instant::now() < deadline, "the frontend never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    device
}

/// A guest driver that kicks the moment DRIVER_OK returns is served, activation after
/// activation: every request the frontend sends during activation waits for the
/// backend's acknowledgement (REPLY_ACK), so the ring is enabled before the guest runs
/// on, and a reset leaves nothing behind that stops the next start.
#[test]
fn a_kick_right_after_activation_is_never_lost() {
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"*\"]")]);
    let mem = guest_memory();
    let mut device = connected_device(&h, &mem);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let queue = || {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        q
    };
    for round in 0..200u64 {
        write_ring_with_models_request(&mem, round);
        device
            .activate(ActivateParams {
                features: VIRTIO_F_VERSION_1 & device.features(),
                memory: mem.clone(),
                queues: vec![queue()],
                kicks: vec![kick.try_clone().unwrap()],
                interrupt: Arc::new(VirtioInterrupt::unconnected(1).unwrap()),
            })
            .unwrap();
        kick.write(1).unwrap();
        let header = wait_used(&mem, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("round {round}: the kick right after activation was lost"));
        assert_eq!((header.status, header.request_id), (Status::Ok, round));
        device.reset();
    }
}

/// A guest that makes a head index beyond the queue size available breaks the queue: the
/// daemon stops serving it and reports it on the ring's error eventfd, and the device
/// then needs a reset and raises the configuration interrupt (virtio 1.2 §2.1.2).
#[test]
fn a_broken_queue_makes_the_device_need_a_reset() {
    let h = Harness::start(1, &[TenantOpts::new("a", "[\"*\"]")]);
    let mem = guest_memory();
    let mut device = connected_device(&h, &mem);
    write_ring_with_models_request(&mem, 1);
    // ring[0] names descriptor 200 of a 16-entry table.
    mem.write_obj(200u16, GuestAddress(AVAIL + 4)).unwrap();
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let config_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    device
        .activate(ActivateParams {
            features: VIRTIO_F_VERSION_1 & device.features(),
            memory: mem.clone(),
            queues: vec![q],
            kicks: vec![kick.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(
                vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
                Some(config_irq.try_clone().unwrap()),
            )),
        })
        .unwrap();
    assert!(!device.needs_reset());
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !device.needs_reset() {
        assert!(
            Instant::now() < deadline,
            "the broken queue was never reported: the device does not need a reset"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(config_irq.read().unwrap(), 1, "the configuration interrupt");
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 0, "nothing of the broken queue was completed");
    // After the driver's reset the device serves again.
    device.reset();
    assert!(!device.needs_reset());
}
