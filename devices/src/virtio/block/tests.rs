//! Tests of the block device against guest memory and a split ring written here, with a
//! temporary file as the image.

// Test values are small constants and counters; truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::device::{BlockWorker, LIMITER_TOKEN};
use super::disk::DiskImage;
use super::*;
use crate::rate_limiter::tests::fake_clock;
use crate::rate_limiter::{RateLimiter, TokenBucketConfig};
use crate::virtio::test_support::{
    activate, activate_params, memory, read_guest, DriverEnds, DriverRing, Rng,
};
use crate::virtio::{VirtioDevice, VirtioInterrupt, WorkerLoop};

const MEM_SIZE: u64 = 0x10_0000;
/// Where the ring the test drives starts.
const RING: u64 = 0x0;
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const DATA: u64 = 0x1_0000;
const DATA2: u64 = 0x2_0000;
/// Image size used by most tests: 64 KiB, 128 sectors.
const IMAGE_LEN: u64 = 64 * 1024;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const R: bool = false;
const W: bool = true;

/// A temporary image of `len` bytes, each byte `fill`.
fn image(len: u64, fill: u8) -> TempFile {
    let f = TempFile::new().unwrap();
    f.as_file()
        .write_all_at(&vec![fill; len as usize], 0)
        .unwrap();
    f
}

fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, num_sectors: u32, flags: u32) {
    let mut s = [0u8; SEGMENT_LEN];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn read_file(f: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

/// A worker served synchronously by the test, which drives its ring.
struct Harness {
    mem: GuestMemoryMmap,
    ring: DriverRing,
    worker: BlockWorker,
    image: TempFile,
}

impl Harness {
    fn new(image: TempFile, read_only: bool, limiter: RateLimiter) -> Self {
        Self::build(memory(MEM_SIZE as usize), image, read_only, limiter, 16)
    }

    /// A worker over a ring of `ring_size` entries at [`RING`] in `mem`.
    fn build(
        mem: GuestMemoryMmap,
        image: TempFile,
        read_only: bool,
        limiter: RateLimiter,
        ring_size: u16,
    ) -> Self {
        let ring = DriverRing::new(&mem, RING, ring_size);
        let disk = DiskImage::open(image.as_path(), read_only).unwrap();
        let mut serial = [0u8; ID_LEN];
        serial[..11].copy_from_slice(b"test-serial");
        let worker = BlockWorker {
            mem: mem.clone(),
            queue: ring.queue(),
            interrupt: Arc::new(VirtioInterrupt::unconnected(1).unwrap()),
            disk: Arc::new(Mutex::new(disk)),
            limiter: Arc::new(Mutex::new(limiter)),
            serial,
            self_kick: None,
            metrics: Arc::default(),
        };
        Self {
            mem,
            ring,
            worker,
            image,
        }
    }

    fn plain() -> Self {
        Self::new(
            image(IMAGE_LEN, 0xAA),
            false,
            RateLimiter::unlimited().unwrap(),
        )
    }

    fn file(&self) -> &File {
        self.image.as_file()
    }

    /// Submits `descs`, serves the queue and returns the chain's used length.
    fn run(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        let before = self.ring.used_idx();
        let head = self.ring.add_chain(descs);
        self.worker.serve_queue();
        assert_eq!(
            self.ring.used_idx(),
            before.wrapping_add(1),
            "chain returned"
        );
        let (id, len) = self.ring.used(before);
        assert_eq!(id, head);
        len
    }

    fn interrupts(&self) -> u64 {
        self.worker
            .interrupt
            .queue_eventfd(0)
            .unwrap()
            .read()
            .unwrap_or(0)
    }
}

#[test]
fn write_then_read_round_trip() {
    let mut h = Harness::plain();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 2);
    // The data split over two descriptors.
    let len = h.run(&[
        (HDR, 16, R),
        (DATA, 100, R),
        (DATA + 100, 924, R),
        (STATUS, 1, W),
    ]);
    assert_eq!((status(&h.mem), len), (OK, 1));
    assert_eq!(read_file(h.file(), 1024, 1024), pattern);
    assert_eq!(read_file(h.file(), 0, 1024), vec![0xAA; 1024], "untouched");
    assert_eq!(
        read_file(h.file(), 2048, 1024),
        vec![0xAA; 1024],
        "untouched"
    );

    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 2);
    let len = h.run(&[
        (HDR, 16, R),
        (DATA2, 512, W),
        (DATA2 + 0x1000, 512, W),
        (STATUS, 1, W),
    ]);
    assert_eq!((status(&h.mem), len), (OK, 1025));
    assert_eq!(read_guest(&h.mem, DATA2, 512), pattern[..512]);
    assert_eq!(read_guest(&h.mem, DATA2 + 0x1000, 512), pattern[512..]);
    assert_eq!(read_guest(&h.mem, DATA2 + 512, 16), vec![0; 16]);
    assert!(h.interrupts() > 0);
    assert_eq!(h.worker.metrics.requests.load(Ordering::Relaxed), 2);
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    let mut h = Harness::plain();
    // Header and data in one readable descriptor.
    header(&h.mem, DATA, VIRTIO_BLK_T_OUT, 0);
    h.mem
        .write_slice(&[0x5A; 512], GuestAddress(DATA + 16))
        .unwrap();
    let len = h.run(&[(DATA, 16 + 512, R), (STATUS, 1, W)]);
    assert_eq!((status(&h.mem), len), (OK, 1));
    assert_eq!(read_file(h.file(), 0, 512), vec![0x5A; 512]);
    // Data and status in one writable descriptor.
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let len = h.run(&[(HDR, 16, R), (DATA2, 513, W)]);
    assert_eq!(len, 513);
    assert_eq!(read_guest(&h.mem, DATA2, 512), vec![0x5A; 512]);
    assert_eq!(read_guest(&h.mem, DATA2 + 512, 1), vec![OK]);
}

#[test]
fn flush_succeeds() {
    let mut h = Harness::plain();
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
    let len = h.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!((status(&h.mem), len), (OK, 1));
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = Harness::plain();
    h.mem.write_slice(&[0xEE; 32], GuestAddress(DATA)).unwrap();
    header(&h.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let len = h.run(&[(HDR, 16, R), (DATA, 32, W), (STATUS, 1, W)]);
    assert_eq!((status(&h.mem), len), (OK, 21));
    let mut expected = b"test-serial".to_vec();
    expected.resize(20, 0);
    assert_eq!(read_guest(&h.mem, DATA, 20), expected);
    assert_eq!(
        read_guest(&h.mem, DATA + 20, 12),
        vec![0xEE; 12],
        "only 20 bytes"
    );

    // A buffer shorter than 20 bytes.
    header(&h.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    h.mem.write_slice(&[0xEE; 32], GuestAddress(DATA)).unwrap();
    let len = h.run(&[(HDR, 16, R), (DATA, 19, W), (STATUS, 1, W)]);
    assert_eq!((status(&h.mem), len), (IOERR, 1));
    assert_eq!(read_guest(&h.mem, DATA, 19), vec![0xEE; 19]);
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let mut h = Harness::plain();
    for (request_type, flags, sector) in [
        (VIRTIO_BLK_T_DISCARD, 0, 4),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0, 20),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            40,
        ),
    ] {
        header(&h.mem, HDR, request_type, 0);
        segment(&h.mem, DATA, sector, 8, flags);
        let len = h.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
        assert_eq!((status(&h.mem), len), (OK, 1), "type {request_type}");
        let at = sector * SECTOR_SIZE;
        assert_eq!(read_file(h.file(), at, 4096), vec![0; 4096]);
        assert_eq!(read_file(h.file(), at - 512, 512), vec![0xAA; 512]);
        assert_eq!(read_file(h.file(), at + 4096, 512), vec![0xAA; 512]);
        // And through the queue.
        header(&h.mem, HDR, VIRTIO_BLK_T_IN, sector);
        h.run(&[(HDR, 16, R), (DATA2, 4096, W), (STATUS, 1, W)]);
        assert_eq!(read_guest(&h.mem, DATA2, 4096), vec![0; 4096]);
    }
    assert_eq!(h.file().metadata().unwrap().len(), IMAGE_LEN, "size kept");

    // Unknown flags: UNSUPP; unmap on DISCARD: UNSUPP; out of range: IOERR.
    for (request_type, flags, sector, num, expected) in [
        (VIRTIO_BLK_T_WRITE_ZEROES, 0x8, 0, 1, UNSUPP),
        (
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            0,
            1,
            UNSUPP,
        ),
        (VIRTIO_BLK_T_DISCARD, 0, 127, 2, IOERR),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0, u64::MAX, 1, IOERR),
        (VIRTIO_BLK_T_DISCARD, 0, 0, MAX_DISCARD_SECTORS + 1, IOERR),
    ] {
        header(&h.mem, HDR, request_type, 0);
        segment(&h.mem, DATA, sector, num, flags);
        h.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
        assert_eq!(
            status(&h.mem),
            expected,
            "type {request_type} flags {flags}"
        );
    }
    // Two segments: more than max_discard_seg.
    header(&h.mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&h.mem, DATA, 0, 1, 0);
    segment(&h.mem, DATA + 16, 2, 1, 0);
    h.run(&[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]);
    assert_eq!(status(&h.mem), IOERR);
    assert_eq!(read_file(h.file(), 0, 512), vec![0xAA; 512]);
}

#[test]
fn out_of_range_and_overflowing_sectors_fail() {
    let mut h = Harness::plain();
    let capacity = IMAGE_LEN / SECTOR_SIZE;
    for (sector, len) in [
        (capacity, 512),
        (capacity - 1, 1024),
        (u64::MAX / SECTOR_SIZE, 512),
        (u64::MAX / SECTOR_SIZE + 1, 512),
        (u64::MAX, 512),
    ] {
        h.mem
            .write_slice(&[0xEE; 1024], GuestAddress(DATA))
            .unwrap();
        header(&h.mem, HDR, VIRTIO_BLK_T_IN, sector);
        let used = h.run(&[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)]);
        assert_eq!((status(&h.mem), used), (IOERR, 1), "sector {sector}");
        assert_eq!(read_guest(&h.mem, DATA, 1024), vec![0xEE; 1024]);
        header(&h.mem, HDR, VIRTIO_BLK_T_OUT, sector);
        h.run(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(status(&h.mem), IOERR);
    }
    assert_eq!(h.file().metadata().unwrap().len(), IMAGE_LEN, "not grown");
    // The last sector is in range.
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, capacity - 1);
    h.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(status(&h.mem), OK);
    assert_eq!(
        h.worker.metrics.invalid_requests.load(Ordering::Relaxed),
        10
    );
}

#[test]
fn malformed_chains_get_ioerr_or_len_zero() {
    let mut h = Harness::plain();
    // No writable byte at all: returned with length 0.
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 0);
    h.mem.write_obj(0x77u8, GuestAddress(STATUS)).unwrap();
    assert_eq!(h.run(&[(HDR, 16, R), (STATUS, 1, R)]), 0);
    assert_eq!(status(&h.mem), 0x77);
    // Header only.
    assert_eq!(h.run(&[(HDR, 16, R)]), 0);
    // Zero-length writable descriptor does not count as a status byte.
    assert_eq!(h.run(&[(HDR, 16, R), (STATUS, 0, W)]), 0);
    assert_eq!(status(&h.mem), 0x77);
    // Status byte outside guest memory.
    assert_eq!(h.run(&[(HDR, 16, R), (MEM_SIZE, 1, W)]), 0);
    assert_eq!(h.run(&[(HDR, 16, R), (u64::MAX, 1, W)]), 0);

    // Status "buffer" readable after the data: the last writable byte (end of the data
    // buffer) gets IOERR, nothing else is written.
    h.mem.write_slice(&[0xEE; 512], GuestAddress(DATA)).unwrap();
    let len = h.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]);
    assert_eq!(len, 1);
    assert_eq!(read_guest(&h.mem, DATA + 511, 1), vec![IOERR]);
    assert_eq!(read_guest(&h.mem, DATA, 511), vec![0xEE; 511]);
    assert_eq!(status(&h.mem), 0x77);

    type Chain = Vec<(u64, u32, bool)>;
    let cases: &[(&str, u32, Chain)] = &[
        (
            "short header",
            VIRTIO_BLK_T_IN,
            vec![(HDR, 15, R), (STATUS, 1, W)],
        ),
        (
            "data buffer outside memory",
            VIRTIO_BLK_T_IN,
            vec![(HDR, 16, R), (MEM_SIZE - 256, 512, W), (STATUS, 1, W)],
        ),
        (
            "address overflow",
            VIRTIO_BLK_T_IN,
            vec![(HDR, 16, R), (u64::MAX - 10, 512, W), (STATUS, 1, W)],
        ),
        (
            "read with readable data",
            VIRTIO_BLK_T_IN,
            vec![(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
        ),
        (
            "write with writable data",
            VIRTIO_BLK_T_OUT,
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)],
        ),
        (
            "unaligned length",
            VIRTIO_BLK_T_OUT,
            vec![(HDR, 16, R), (DATA, 100, R), (STATUS, 1, W)],
        ),
        (
            "readable after writable",
            VIRTIO_BLK_T_OUT,
            vec![(HDR, 16, R), (DATA2, 4, W), (DATA, 512, R), (STATUS, 1, W)],
        ),
    ];
    let file_before = read_file(h.file(), 0, IMAGE_LEN as usize);
    for (name, request_type, descs) in cases {
        header(&h.mem, HDR, *request_type, 0);
        h.mem
            .write_slice(&[0xEE; 1024], GuestAddress(DATA))
            .unwrap();
        h.mem.write_obj(0x77u8, GuestAddress(STATUS)).unwrap();
        let len = h.run(descs);
        assert_eq!((status(&h.mem), len), (IOERR, 1), "{name}");
        assert_eq!(read_guest(&h.mem, DATA, 1024), vec![0xEE; 1024], "{name}");
    }
    assert_eq!(read_file(h.file(), 0, IMAGE_LEN as usize), file_before);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mut h = Harness::plain();
    for request_type in [2, 3, 14, 0xFFFF_FFFF] {
        header(&h.mem, HDR, request_type, 0);
        let len = h.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!((status(&h.mem), len), (UNSUPP, 1), "type {request_type}");
    }
}

#[test]
fn write_to_read_only_disk_fails_and_leaves_the_file() {
    let mut h = Harness::new(
        image(IMAGE_LEN, 0xAA),
        true,
        RateLimiter::unlimited().unwrap(),
    );
    h.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    for request_type in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        header(&h.mem, HDR, request_type, 0);
        segment(&h.mem, DATA, 0, 1, 0);
        let len = h.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
        assert_eq!((status(&h.mem), len), (IOERR, 1), "type {request_type}");
    }
    header(&h.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    h.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(status(&h.mem), IOERR);
    assert_eq!(
        read_file(h.file(), 0, IMAGE_LEN as usize),
        vec![0xAA; IMAGE_LEN as usize]
    );
    // Reads work.
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 0);
    h.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(status(&h.mem), OK);
    assert_eq!(read_guest(&h.mem, DATA, 512), vec![0xAA; 512]);
}

#[test]
fn descriptor_loop_terminates() {
    let mut h = Harness::plain();
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let flags_r = VRING_DESC_F_NEXT as u16;
    let flags_w = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
    // 0 -> 1 -> 0 -> ... with only readable descriptors: no status.
    h.ring.write_desc(0, HDR, 16, flags_r, 1);
    h.ring.write_desc(1, DATA, 512, flags_r, 0);
    h.ring.publish(0);
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 1);
    assert_eq!(h.ring.used(0), (0, 0));
    // 2 -> 3 -> 2 -> ... header then a writable byte, repeated: IOERR, terminated.
    h.ring.write_desc(2, HDR, 16, flags_r, 3);
    h.ring.write_desc(3, STATUS, 1, flags_w, 2);
    h.ring.publish(2);
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 2);
    assert_eq!(h.ring.used(1), (2, 1));
    assert_eq!(status(&h.mem), IOERR);
    // A self loop.
    h.ring.write_desc(4, STATUS, 1, flags_w, 4);
    h.ring.publish(4);
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 3);
}

#[test]
fn kicks_on_a_queue_the_driver_did_not_enable_touch_nothing() {
    let mut h = Harness::plain();
    h.worker.queue = Queue::new(16).unwrap();
    h.mem.write_slice(&[0x99; 64], GuestAddress(0)).unwrap();
    h.worker.serve_queue();
    assert_eq!(read_guest(&h.mem, 0, 64), vec![0x99; 64]);
    assert_eq!(h.interrupts(), 0);
}

#[test]
fn an_available_index_beyond_the_ring_stops_the_device() {
    let mut h = Harness::plain();
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    // 17 new chains claimed on a 16-entry ring.
    h.mem
        .write_obj(18u16.to_le(), GuestAddress(h.ring.avail_ring + 2))
        .unwrap();
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 1);
    assert!(h.worker.metrics.broken.load(Ordering::Relaxed));
    // Nothing more is served, even once the index looks sane again.
    h.mem
        .write_obj(2u16.to_le(), GuestAddress(h.ring.avail_ring + 2))
        .unwrap();
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 1);
}

#[test]
fn head_index_outside_the_ring_is_counted_and_skipped() {
    let mut h = Harness::plain();
    h.ring.publish(100);
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 0);
    assert_eq!(h.worker.metrics.lost_chains.load(Ordering::Relaxed), 1);
    // The queue goes on.
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(status(&h.mem), OK);
}

fn ops_limiter(size: u64, refill_ms: u64) -> (RateLimiter, Arc<std::sync::atomic::AtomicU64>) {
    let (clock, t) = fake_clock();
    let cfg = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time: refill_ms,
        }),
    };
    (RateLimiter::with_clock(&cfg, clock).unwrap(), t)
}

#[test]
fn rate_limiter_delays_requests_until_its_timer() {
    let (limiter, t) = ops_limiter(1, 1000);
    let mut h = Harness::new(image(IMAGE_LEN, 0xAA), false, limiter);
    let epoll = Epoll::new().unwrap();
    h.worker.register(&epoll).unwrap();
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.ring.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    h.ring.add_chain(&[(HDR, 16, R), (DATA, 1, W)]);
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 1, "second request waits");
    assert!(h.worker.limiter.lock().unwrap().is_blocked());
    // A kick while blocked does nothing.
    h.worker.queue_event(0, &epoll);
    assert_eq!(h.ring.used_idx(), 1);
    // The timer is due in 1 s; with the clock moved, its event serves the request.
    t.fetch_add(1_000_000_000, Ordering::SeqCst);
    h.worker.device_event(LIMITER_TOKEN, EventSet::IN, &epoll);
    assert_eq!(h.ring.used_idx(), 2);
    assert_eq!(h.ring.used(1), (2, 1));
    assert_eq!(read_guest(&h.mem, DATA, 1), vec![OK]);
    assert_eq!(h.worker.metrics.rate_limited.load(Ordering::Relaxed), 1);
}

#[test]
fn bandwidth_limit_gives_back_the_op() {
    let (clock, t) = fake_clock();
    let cfg = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 1024,
            one_time_burst: 0,
            refill_time: 100,
        }),
        ops: Some(TokenBucketConfig {
            size: 10,
            one_time_burst: 0,
            refill_time: 100_000,
        }),
    };
    let limiter = RateLimiter::with_clock(&cfg, clock).unwrap();
    let mut h = Harness::new(image(IMAGE_LEN, 0xAA), false, limiter);
    let epoll = Epoll::new().unwrap();
    header(&h.mem, HDR, VIRTIO_BLK_T_IN, 0);
    for _ in 0..3 {
        h.ring
            .add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    }
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), 2, "1024 bytes allowed");
    // The third took an op and gave it back when the bytes were short.
    assert_eq!(h.worker.limiter.lock().unwrap().ops().unwrap().budget(), 8);
    t.fetch_add(50_000_000, Ordering::SeqCst);
    h.worker.device_event(LIMITER_TOKEN, EventSet::IN, &epoll);
    assert_eq!(h.ring.used_idx(), 3);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
    let mut h = Harness::plain();
    h.worker.queue.set_event_idx(true);
    // used_event = 0: interrupt when used idx moves past 0, not after.
    h.ring.set_used_event(0);
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    h.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(h.interrupts(), 1);
    h.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(h.interrupts(), 0, "driver asked for none");
    h.ring.set_used_event(2);
    h.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(h.interrupts(), 1);
    // The device published avail_event so the driver kicks for the next request.
    assert_eq!(h.ring.avail_event(), 3);
}

#[test]
fn a_full_ring_is_served_in_bounded_passes() {
    let mut h = Harness::build(
        memory(MEM_SIZE as usize),
        image(IMAGE_LEN, 0),
        false,
        RateLimiter::unlimited().unwrap(),
        QUEUE_MAX_SIZE,
    );
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    h.worker.self_kick = Some(kick.try_clone().unwrap());
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..QUEUE_MAX_SIZE {
        h.ring.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    }
    h.worker.serve_queue();
    assert_eq!(h.ring.used_idx(), QUEUE_MAX_SIZE);
    assert_eq!(kick.read().unwrap(), 1, "rescheduled itself");
}

fn config(path: &std::path::Path) -> BlockConfig {
    BlockConfig {
        id: "rootfs".into(),
        path: path.to_path_buf(),
        ..Default::default()
    }
}

#[test]
fn config_space_holds_capacity_and_limits() {
    let img = image(IMAGE_LEN * 4 + 100, 0);
    let block = Block::new(config(img.as_path())).unwrap();
    assert_eq!(block.capacity_sectors(), 512, "size rounded down");
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 512);
    let mut four = [0u8; 4];
    block.read_config(12, &mut four);
    assert_eq!(
        u32::from_le_bytes(four),
        u32::from(QUEUE_MAX_SIZE) - 2,
        "seg_max"
    );
    block.read_config(20, &mut four);
    assert_eq!(u32::from_le_bytes(four), 512, "blk_size");
    block.read_config(36, &mut four);
    assert_eq!(u32::from_le_bytes(four), MAX_DISCARD_SECTORS);
    block.read_config(40, &mut four);
    assert_eq!(u32::from_le_bytes(four), 1, "max_discard_seg");
    block.read_config(48, &mut four);
    assert_eq!(u32::from_le_bytes(four), MAX_WRITE_ZEROES_SECTORS);
    block.read_config(1, &mut four);
    assert_eq!(four, [2, 0, 0, 0], "unaligned read of capacity bytes");
    block.read_config(4096, &mut four);
    assert_eq!(four, [0; 4]);

    assert_eq!(block.device_type(), 2);
    assert_eq!(block.num_queues(), 1);
    let f = block.features();
    assert_ne!(f & crate::virtio::VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_ne!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);

    let ro = Block::new(BlockConfig {
        read_only: true,
        ..config(img.as_path())
    })
    .unwrap();
    let f = ro.features();
    assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
}

#[test]
fn new_refuses_bad_configurations() {
    let img = image(IMAGE_LEN, 0);
    let missing = img.as_path().with_extension("missing");
    let e = Block::new(config(&missing)).err().unwrap();
    assert!(matches!(e, BlockError::Open { .. }));
    assert!(e.to_string().contains(&missing.display().to_string()));

    let ro = image(IMAGE_LEN, 0);
    std::fs::set_permissions(ro.as_path(), std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = Block::new(config(ro.as_path())).err().unwrap();
    assert!(matches!(e, BlockError::ReadOnlyFile { .. }), "{e}");
    assert!(e.to_string().contains(&ro.as_path().display().to_string()));
    assert!(Block::new(BlockConfig {
        read_only: true,
        ..config(ro.as_path())
    })
    .is_ok());

    let e = Block::new(BlockConfig {
        serial: Some("x".repeat(21)),
        ..config(img.as_path())
    })
    .err()
    .unwrap();
    assert!(matches!(e, BlockError::SerialTooLong { .. }));

    let e = Block::new(BlockConfig {
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time: 10,
            }),
            ops: None,
        }),
        ..config(img.as_path())
    })
    .err()
    .unwrap();
    assert!(matches!(e, BlockError::RateLimiter { .. }), "{e}");
}

/// Waits up to `ms` for `fd` to be readable.
fn wait_readable(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

/// `block` activated over a fresh 16-entry ring, without EVENT_IDX (this driver does not
/// maintain used_event).
fn activate_block(block: &mut Block) -> (GuestMemoryMmap, DriverRing, DriverEnds) {
    let mem = memory(MEM_SIZE as usize);
    let ring = DriverRing::new(&mem, RING, 16);
    let features = block.features() & !crate::virtio::VIRTIO_RING_F_EVENT_IDX;
    let ends = activate(block, features, &mem, vec![ring.queue()]);
    (mem, ring, ends)
}

#[test]
fn activated_device_serves_on_its_thread_and_reset_returns_the_queue() {
    let img = image(IMAGE_LEN, 0x3C);
    let mut block = Block::new(BlockConfig {
        serial: Some("serial-1".into()),
        ..config(img.as_path())
    })
    .unwrap();
    let (mem, mut ring, ends) = activate_block(&mut block);
    let (kick, interrupt) = (&ends.kicks[0], &ends.interrupt);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    ring.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    kick.write(1).unwrap();
    let irq = interrupt.queue_eventfd(0).unwrap();
    assert!(wait_readable(irq.as_raw_fd(), 5000), "request served");
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(read_guest(&mem, DATA, 512), vec![0x3C; 512]);
    assert_eq!(status(&mem), OK);

    // Swapping the image while running: new capacity, config interrupt.
    let bigger = image(IMAGE_LEN * 2, 0x4D);
    block.update_path(bigger.as_path()).unwrap();
    assert_eq!(block.capacity_sectors(), 256);
    assert_eq!(interrupt.config_eventfd().unwrap().read().unwrap(), 1);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 200);
    ring.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    irq.read().unwrap();
    kick.write(1).unwrap();
    assert!(wait_readable(irq.as_raw_fd(), 5000));
    assert_eq!(read_guest(&mem, DATA, 512), vec![0x4D; 512]);

    let queues = block.reset().expect("queues back");
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].next_used(), 2);
    assert!(block.reset().is_none(), "not active any more");
    assert_eq!(block.metrics().requests.load(Ordering::Relaxed), 2);
}

#[test]
fn activate_rejects_a_wrong_number_of_queues() {
    let img = image(IMAGE_LEN, 0);
    let mut block = Block::new(config(img.as_path())).unwrap();
    let (params, _) = activate_params(0, &memory(MEM_SIZE as usize), vec![]);
    assert!(block.activate(params).is_err());
    assert!(block.reset().is_none());
}

#[test]
fn rate_limiter_on_a_running_device_is_timed_and_updatable() {
    let img = image(IMAGE_LEN, 0);
    let mut block = Block::new(BlockConfig {
        rate_limiter: Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time: 20,
            }),
        }),
        ..config(img.as_path())
    })
    .unwrap();
    let (mem, mut ring, ends) = activate_block(&mut block);
    let (kick, interrupt) = (&ends.kicks[0], &ends.interrupt);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..3 {
        ring.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    }
    kick.write(1).unwrap();
    let irq = interrupt.queue_eventfd(0).unwrap();
    // One op per 20 ms: all three done after ~40 ms, through the timer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ring.used_idx() < 3 && std::time::Instant::now() < deadline {
        wait_readable(irq.as_raw_fd(), 100);
        let _ = irq.read();
    }
    assert_eq!(ring.used_idx(), 3);
    assert!(block.metrics().rate_limited.load(Ordering::Relaxed) >= 1);
    block.update_rate_limiter(None).unwrap();
    assert!(block
        .update_rate_limiter(Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 5,
                one_time_burst: 0,
                refill_time: 0,
            }),
        }))
        .is_err());
    assert!(block.reset().is_some());
}

const FUZZ_MEM: u64 = 0x4_0000;
const FUZZ_AREA: u64 = 0x1_0000;
const FUZZ_RING: u16 = 16;

/// One descriptor as the fuzzer writes it: (addr, len, device-writable, next).
type FuzzDesc = (u64, u32, bool, Option<u16>);

/// An address: mostly inside the fuzzed area, sometimes outside memory, straddling its
/// end, near the top of the address space or anywhere.
fn fuzz_addr(rng: &mut Rng) -> u64 {
    match rng.below(12) {
        0 => FUZZ_MEM + rng.below(0x1000),
        1 => u64::MAX - rng.below(0x1000),
        2 => FUZZ_MEM - rng.below(64),
        3 => rng.next(),
        _ => FUZZ_AREA + rng.below(FUZZ_MEM - FUZZ_AREA - 0x2000),
    }
}

fn fuzz_len(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 17,
        4 => 512,
        5 => 1024 + 1,
        6 => u32::MAX,
        _ => rng.below(4096) as u32,
    }
}

/// A chain shaped like a request of a random type, then possibly mangled.
fn fuzz_structured_chain(rng: &mut Rng, request_type: u32) -> Vec<FuzzDesc> {
    let area = |rng: &mut Rng| FUZZ_AREA + rng.below(FUZZ_MEM - FUZZ_AREA - 0x2000);
    let mut descs = vec![(area(rng), 16, false, None)];
    let data_len = rng.pick(&[0u32, 20, 512, 1024, 4096, 513]);
    let writable_data = matches!(request_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    if matches!(
        request_type,
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    ) {
        descs.push((area(rng), 16, false, None));
    } else if data_len > 0 {
        // Split the data over one or two buffers.
        let first = if rng.below(2) == 0 {
            data_len
        } else {
            1 + rng.below(u64::from(data_len)) as u32
        };
        descs.push((area(rng), first, writable_data, None));
        if first < data_len {
            descs.push((area(rng), data_len - first, writable_data, None));
        }
    }
    descs.push((area(rng), 1, true, None));
    // Mangle: a field of one descriptor, or a loop.
    if rng.below(3) == 0 {
        let i = rng.below(descs.len() as u64) as usize;
        match rng.below(4) {
            0 => descs[i].0 = fuzz_addr(rng),
            1 => descs[i].1 = fuzz_len(rng),
            2 => descs[i].2 = !descs[i].2,
            _ => descs[i].3 = Some(rng.below(u64::from(FUZZ_RING) + 2) as u16),
        }
    }
    descs
}

fn fuzz_random_chain(rng: &mut Rng) -> Vec<FuzzDesc> {
    (0..1 + rng.below(6))
        .map(|_| {
            let next = (rng.below(8) == 0).then(|| rng.below(u64::from(FUZZ_RING) + 2) as u16);
            (fuzz_addr(rng), fuzz_len(rng), rng.below(2) == 0, next)
        })
        .collect()
}

/// Random chains, headers and addresses (some outside memory): nothing panics, every
/// chain with a valid head comes back, and guest memory changes only inside buffers the
/// descriptor table marks device-writable.
#[test]
fn fuzz_random_chains_write_only_inside_writable_buffers() {
    let Harness {
        mem,
        mut ring,
        mut worker,
        image: img,
    } = Harness::build(
        memory(FUZZ_MEM as usize),
        image(IMAGE_LEN, 0xAA),
        false,
        RateLimiter::unlimited().unwrap(),
        FUZZ_RING,
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let types = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        2,
        0xFFFF_FFFF,
    ];
    let capacity = IMAGE_LEN / SECTOR_SIZE;
    let area_len = (FUZZ_MEM - FUZZ_AREA) as usize;
    let canaries: Vec<Vec<u8>> = (0..2u8)
        .map(|k| {
            (0..area_len)
                .map(|i| (i as u8) ^ k.wrapping_mul(0xA5))
                .collect()
        })
        .collect();
    let mut returned = 0u16;
    let mut statuses = [0u32; 256];
    for round in 0..2000 {
        mem.write_slice(&canaries[round % 2], GuestAddress(FUZZ_AREA))
            .unwrap();
        let request_type = rng.pick(&types);
        let descs = if rng.below(4) == 0 {
            fuzz_random_chain(&mut rng)
        } else {
            fuzz_structured_chain(&mut rng, request_type)
        };
        for i in 0..FUZZ_RING {
            match descs.get(usize::from(i)) {
                Some(&(addr, len, write, next)) => {
                    let last = usize::from(i) + 1 == descs.len();
                    let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if !last || next.is_some() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    ring.write_desc(i, addr, len, flags, next.unwrap_or(i + 1));
                }
                None => ring.write_desc(i, 0, 0, 0, 0),
            }
        }
        // A plausible header (and segment) in the first readable buffer inside memory.
        if let Some(&(addr, len, _, _)) = descs.iter().find(|(a, l, w, _)| {
            !w && *l >= 16 && *a >= FUZZ_AREA && a.checked_add(32).is_some_and(|e| e <= FUZZ_MEM)
        }) {
            let sector = match rng.below(8) {
                0 => capacity - 1,
                1 => capacity,
                2 => u64::MAX,
                3 => u64::MAX / SECTOR_SIZE,
                _ => rng.below(capacity),
            };
            header(&mem, addr, request_type, sector);
            let seg = descs
                .get(1)
                .filter(|d| !d.2 && d.1 >= 16 && d.0 >= FUZZ_AREA && d.0 < FUZZ_MEM - 16)
                .map(|d| d.0)
                .or((len >= 32).then_some(addr + 16));
            if let Some(seg) = seg {
                let flags = rng.pick(&[0, 0, 0, 1, 2]);
                segment(&mem, seg, sector, rng.below(16) as u32, flags);
            }
        }
        let head = if rng.below(50) == 0 {
            FUZZ_RING + rng.below(100) as u16
        } else {
            0
        };
        let before = read_guest(&mem, FUZZ_AREA, area_len);
        ring.publish(head);
        worker.serve_queue();

        if head < FUZZ_RING {
            returned = returned.wrapping_add(1);
        }
        assert_eq!(ring.used_idx(), returned, "round {round}");
        let after = read_guest(&mem, FUZZ_AREA, area_len);
        let writable: Vec<(u64, u64)> = descs
            .iter()
            .filter(|d| d.2)
            .map(|&(a, l, _, _)| (a, a.saturating_add(u64::from(l))))
            .collect();
        for (chunk, (b, a)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
            if b == a {
                continue;
            }
            for (i, _) in b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y) {
                let addr = FUZZ_AREA + (chunk * 4096 + i) as u64;
                assert!(
                    writable.iter().any(|&(s, e)| addr >= s && addr < e),
                    "round {round}: byte {addr:#x} changed outside writable buffers {writable:x?}"
                );
            }
        }
        if head < FUZZ_RING {
            let (id, used_len) = ring.used(returned.wrapping_sub(1));
            assert_eq!(id, head);
            let writable_total: u64 = writable.iter().map(|(s, e)| e - s).sum();
            assert!(u64::from(used_len) <= writable_total, "round {round}");
            if used_len > 0 {
                // The status is the last writable byte of the chain as laid out.
                if let Some(&(a, l, _, _)) = descs.iter().rev().find(|d| d.2 && d.1 > 0) {
                    let end = a.saturating_add(u64::from(l));
                    if descs.iter().all(|d| d.3.is_none()) && end <= FUZZ_MEM {
                        let s: u8 = mem.read_obj(GuestAddress(end - 1)).unwrap();
                        statuses[usize::from(s)] += 1;
                    }
                }
            }
        }
    }
    assert_eq!(img.as_file().metadata().unwrap().len(), IMAGE_LEN);
    let m = &worker.metrics;
    let valid = m.requests.load(Ordering::Relaxed)
        - m.invalid_requests.load(Ordering::Relaxed)
        - m.lost_chains.load(Ordering::Relaxed);
    assert!(m.invalid_requests.load(Ordering::Relaxed) > 200, "{m:?}");
    assert!(valid > 200, "{m:?}");
    assert!(statuses[usize::from(OK)] > 200, "{statuses:?}");
    assert!(statuses[usize::from(IOERR)] > 200, "{statuses:?}");
    assert!(statuses[usize::from(UNSUPP)] > 20, "{statuses:?}");
}
