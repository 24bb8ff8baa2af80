//! What the device tests share: guest memory, the driver side of a split virtqueue (the
//! test posts chains and reads the used ring, as a guest driver would), activation over
//! such queues, and a seeded generator for fuzz-style tests.

// Ring indices, lengths and random picks are small test values.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateParams, VirtioDevice, VirtioInterrupt};

/// Guest memory of `len` bytes from address 0.
pub(crate) fn memory(len: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap()
}

/// `len` bytes of guest memory from `addr`.
pub(crate) fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// The driver side of one split virtqueue (virtio 1.2 §2.7), laid out as a driver would:
/// the descriptor table, then the available ring, then the used ring (4-byte aligned).
///
/// The indices are stored and loaded with release and acquire ordering, so a device
/// serving the queue on its own thread sees a chain before the index that publishes it.
/// (`virtio_queue::mock::MockSplitQueue::create` is not used for rings: in virtio-queue
/// 0.18 it places the used ring at the available ring's start plus its length in entries
/// rather than bytes, so with more than a few entries the two overlap.)
pub(crate) struct DriverRing {
    mem: GuestMemoryMmap,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub size: u16,
    /// The descriptor [`DriverRing::add_chain`] writes next.
    pub next_desc: u16,
    /// The available index: chains published so far.
    pub avail_idx: u16,
    /// Used entries read so far.
    pub used_seen: u16,
}

impl DriverRing {
    /// A ring of `size` entries from `at`, its memory zeroed.
    pub(crate) fn new(mem: &GuestMemoryMmap, at: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail_ring = at + 16 * n;
        let used_ring = (avail_ring + 6 + 2 * n + 3) & !3;
        let end = used_ring + 6 + 8 * n;
        mem.write_slice(&vec![0; (end - at) as usize], GuestAddress(at))
            .unwrap();
        Self {
            mem: mem.clone(),
            desc_table: at,
            avail_ring,
            used_ring,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device's view of this ring, as the transport would hand it over.
    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Writes descriptor `index` (modulo the ring size) as is.
    pub(crate) fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let at = self.desc_table + 16 * u64::from(index % self.size);
        self.mem.write_obj(desc, GuestAddress(at)).unwrap();
    }

    /// Makes the chain at `head` available to the device.
    pub(crate) fn publish(&mut self, head: u16) {
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail_ring + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Writes `bufs` (address, length, device-writable) as one chain from the next free
    /// descriptor on and publishes it; returns its head.
    pub(crate) fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc % self.size;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The device's used index.
    pub(crate) fn used_idx(&self) -> u16 {
        let idx: u16 = self
            .mem
            .load(GuestAddress(self.used_ring + 2), Ordering::Acquire)
            .unwrap();
        u16::from_le(idx)
    }

    /// Chains published and not yet used.
    pub(crate) fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx())
    }

    /// The `i`-th used element (modulo the ring size): (head, length written).
    pub(crate) fn used(&self, i: u16) -> (u16, u32) {
        let at = self.used_ring + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        let id = u16::try_from(u32::from_le(id)).expect("used id is a descriptor index");
        (id, u32::from_le(len))
    }

    /// The next used element not read yet.
    pub(crate) fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let elem = self.used(self.used_seen);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some(elem)
    }

    /// Every used element not read yet.
    pub(crate) fn take_used(&mut self) -> Vec<(u16, u32)> {
        std::iter::from_fn(|| self.pop_used()).collect()
    }

    /// Sets `used_event`, the used index past which the driver wants an interrupt
    /// (EVENT_IDX).
    pub(crate) fn set_used_event(&self, idx: u16) {
        let at = self.avail_ring + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    /// `avail_event`: the available index past which the device wants a kick (EVENT_IDX).
    pub(crate) fn avail_event(&self) -> u16 {
        let at = self.used_ring + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }
}

/// The test's ends of what a device gets at activation.
pub(crate) struct DriverEnds {
    /// Per queue: writing it notifies the device, as the guest's kick would.
    pub kicks: Vec<EventFd>,
    /// The interrupt the device raises.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Activation parameters for `queues`: a fresh non-blocking kick per queue and an
/// interrupt nobody listens to; the test keeps clones of both.
pub(crate) fn activate_params(
    features: u64,
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
) -> (ActivateParams, DriverEnds) {
    let kicks: Vec<EventFd> = (0..queues.len())
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let ends = DriverEnds {
        kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        interrupt: Arc::new(VirtioInterrupt::unconnected(queues.len()).unwrap()),
    };
    let params = ActivateParams {
        features,
        memory: mem.clone(),
        queues,
        kicks,
        interrupt: Arc::clone(&ends.interrupt),
    };
    (params, ends)
}

/// Activates `dev` over `queues` with `features`, which must succeed.
pub(crate) fn activate(
    dev: &mut dyn VirtioDevice,
    features: u64,
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
) -> DriverEnds {
    let (params, ends) = activate_params(features, mem, queues);
    dev.activate(params).unwrap();
    ends
}

/// xorshift64*: a seeded, dependency-free generator for fuzz-style tests.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with `percent` % probability.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
