//! The driver side of a split virtqueue (virtio 1.2 §2.7) in DMA memory.
//!
//! The driver keeps its own record of every chain in flight (descriptor indices and
//! writable length), so nothing it needs is re-read from memory the device can write.
//! What the device does write, the used ring, is checked: an index that advances past
//! what is in flight, a head that is not in flight, or a length longer than the chain's
//! writable part is reported, never trusted.

use std::sync::atomic::{fence, Ordering};

use thiserror::Error;

use crate::dma::{DmaBuffer, DmaError, DmaPool};

/// Descriptor flag: the chain continues at `next`.
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Available ring flag: the driver does not want interrupts (it polls).
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not need notifications.
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Bytes of one descriptor.
const DESC_LEN: usize = 16;
/// Bytes of one used element.
const USED_ELEM_LEN: usize = 8;
/// Largest queue size the virtio spec allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors of the virtqueue.
#[derive(Debug, Error)]
pub enum VirtqueueError {
    /// A queue size that is zero, not a power of two, or too large.
    #[error("Invalid queue size {0} (a power of two up to 32768)")]
    BadSize(u16),
    /// Ring memory allocation or access failed.
    #[error("Ring memory: {0}")]
    Memory(#[from] DmaError),
    /// A chain with no buffers.
    #[error("A chain needs at least one buffer")]
    EmptyChain,
    /// More buffers than free descriptors.
    #[error("Chain of {needed} descriptors does not fit, {free} free")]
    Full {
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A readable buffer after a writable one.
    #[error("Buffer {0} is device-readable but follows a device-writable buffer")]
    ReadableAfterWritable(usize),
    /// A zero-length buffer or one whose end overflows.
    #[error("Buffer {index} at {addr:#x} with length {len} is invalid")]
    BadBuffer {
        /// Position in the chain.
        index: usize,
        /// Device address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The device advanced `used.idx` by more than the chains in flight.
    #[error("Device advanced the used index by {advanced} with {in_flight} chains in flight")]
    UsedIndexJump {
        /// `used.idx - last seen`.
        advanced: u16,
        /// Chains in flight.
        in_flight: usize,
    },
    /// The device returned a head that is out of range or not in flight.
    #[error("Device returned descriptor {id}, which is not the head of a chain in flight")]
    BogusUsedId {
        /// The used element's id.
        id: u32,
    },
    /// The device reported writing more than the chain's writable bytes.
    #[error("Device reported {len} bytes written to chain {head}, which has {max} writable")]
    BadUsedLen {
        /// Head of the chain (it has been returned and freed).
        head: u16,
        /// The token the chain was added with.
        token: u64,
        /// Reported length.
        len: u32,
        /// Writable bytes of the chain.
        max: u64,
    },
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainBuffer {
    /// Device address.
    pub addr: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

/// A chain the device returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedChain {
    /// Head descriptor index (what `add_chain` returned).
    pub head: u16,
    /// Bytes the device says it wrote (≤ the chain's writable length).
    pub len: u32,
    /// What the submitter tagged the chain with ([`SplitQueue::add_chain_tagged`]).
    pub token: u64,
}

/// Where the three parts of a split ring of a given size sit inside its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size.
    pub size: u16,
    /// Offset of the descriptor table (16-byte aligned).
    pub desc: usize,
    /// Offset of the available ring (2-byte aligned).
    pub avail: usize,
    /// Offset of the used ring (4-byte aligned).
    pub used: usize,
    /// Total bytes.
    pub total: usize,
}

impl RingLayout {
    /// The layout for `size` descriptors: each part on its own cache lines, so the
    /// device's writes to the used ring do not bounce the driver's lines.
    pub fn new(size: u16) -> Result<Self, VirtqueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(VirtqueueError::BadSize(size));
        }
        let n = usize::from(size);
        let line = |x: usize| (x + 63) & !63;
        let desc = 0;
        let avail = line(desc + DESC_LEN * n);
        let used = line(avail + 6 + 2 * n);
        let total = line(used + 6 + USED_ELEM_LEN * n);
        Ok(RingLayout {
            size,
            desc,
            avail,
            used,
            total,
        })
    }
}

struct InFlight {
    /// Descriptors in the chain (followed through `SplitQueue::next` from the head).
    count: u16,
    writable_len: u64,
    token: u64,
}

/// A split virtqueue, driver side.
pub struct SplitQueue {
    mem: DmaBuffer,
    layout: RingLayout,
    free: Vec<u16>,
    /// The driver's own copy of each descriptor's `next`, so freeing a chain neither
    /// trusts the table in shared memory nor needs a list per chain.
    next: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
    num_in_flight: usize,
    next_avail: u16,
    last_used: u16,
}

impl std::fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("size", &self.layout.size)
            .field("in_flight", &self.num_in_flight)
            .finish()
    }
}

impl SplitQueue {
    /// A queue of `size` descriptors with its rings allocated from `pool` (zeroed, with
    /// interrupts suppressed).
    pub fn new(pool: &DmaPool, size: u16) -> Result<Self, VirtqueueError> {
        let layout = RingLayout::new(size)?;
        let mut mem = pool.alloc(layout.total)?;
        mem.as_mut_slice().fill(0);
        if mem.device_addr().is_none() {
            return Err(VirtqueueError::Memory(DmaError::NoDeviceAddresses));
        }
        mem.write_volatile::<u16>(layout.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)?;
        Ok(SplitQueue {
            mem,
            layout,
            // Popped from the end: hand out 0, 1, 2, ... first.
            free: (0..size).rev().collect(),
            next: vec![0; usize::from(size)],
            in_flight: (0..size).map(|_| None).collect(),
            num_in_flight: 0,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Device addresses of the descriptor table, available ring and used ring (what
    /// the device's `queue_desc`, `queue_driver` and `queue_device` registers take).
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        // new() checked the buffer has a device address.
        let base = self.mem.device_addr().unwrap_or(0);
        (
            base + self.layout.desc as u64,
            base + self.layout.avail as u64,
            base + self.layout.used as u64,
        )
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains in flight.
    pub fn in_flight(&self) -> usize {
        self.num_in_flight
    }

    /// Makes a chain available to the device; returns its head index. Readable buffers
    /// must come before writable ones.
    pub fn add_chain(&mut self, buffers: &[ChainBuffer]) -> Result<u16, VirtqueueError> {
        self.add_chain_tagged(buffers, 0)
    }

    /// [`SplitQueue::add_chain`], with a `token` its [`UsedChain`] carries back (the
    /// driver's submission number: no lookup from head to submitter needed).
    pub fn add_chain_tagged(
        &mut self,
        buffers: &[ChainBuffer],
        token: u64,
    ) -> Result<u16, VirtqueueError> {
        if buffers.is_empty() {
            return Err(VirtqueueError::EmptyChain);
        }
        if buffers.len() > self.free.len() {
            return Err(VirtqueueError::Full {
                needed: buffers.len(),
                free: self.free.len(),
            });
        }
        let mut seen_writable = false;
        let mut writable_len = 0u64;
        for (index, b) in buffers.iter().enumerate() {
            if b.len == 0 || b.addr.checked_add(u64::from(b.len)).is_none() {
                return Err(VirtqueueError::BadBuffer {
                    index,
                    addr: b.addr,
                    len: b.len,
                });
            }
            if b.writable {
                seen_writable = true;
                writable_len += u64::from(b.len);
            } else if seen_writable {
                return Err(VirtqueueError::ReadableAfterWritable(index));
            }
        }
        // The chain takes the last free descriptors, the last one first (so a fresh
        // queue hands out 0, 1, 2, ...); they leave the free list once written.
        let start = self.free.len() - buffers.len();
        let chain = &self.free[start..];
        for (i, b) in buffers.iter().enumerate() {
            let idx = chain[chain.len() - 1 - i];
            let at = self.layout.desc + usize::from(idx) * DESC_LEN;
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = match (chain.len() - 1 - i).checked_sub(1) {
                Some(n) => {
                    flags |= VIRTQ_DESC_F_NEXT;
                    chain[n]
                }
                None => 0,
            };
            self.next[usize::from(idx)] = next;
            self.mem.write_volatile::<u64>(at, b.addr)?;
            self.mem.write_volatile::<u32>(at + 8, b.len)?;
            self.mem.write_volatile::<u16>(at + 12, flags)?;
            self.mem.write_volatile::<u16>(at + 14, next)?;
        }
        let head = chain[chain.len() - 1];
        self.free.truncate(start);
        let slot = usize::from(self.next_avail % self.layout.size);
        self.mem
            .write_volatile::<u16>(self.layout.avail + 4 + 2 * slot, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: descriptors and ring entry are visible before the new index.
        self.mem
            .store_release_u16(self.layout.avail + 2, self.next_avail)?;
        self.in_flight[usize::from(head)] = Some(InFlight {
            // At most `free.len()` <= size <= 32768 buffers.
            count: buffers.len() as u16,
            writable_len,
            token,
        });
        self.num_in_flight += 1;
        Ok(head)
    }

    /// Whether the device wants a notification for what was just made available.
    pub fn needs_notify(&self) -> Result<bool, VirtqueueError> {
        // The avail.idx store must be globally visible before reading the device's
        // flag, or both sides could decide the other will act.
        fence(Ordering::SeqCst);
        let flags = self.mem.read_volatile::<u16>(self.layout.used)?;
        Ok(flags & VIRTQ_USED_F_NO_NOTIFY == 0)
    }

    /// Takes the next chain the device returned, if any. A bad used element is
    /// consumed and reported as an error.
    pub fn poll_used(&mut self) -> Result<Option<UsedChain>, VirtqueueError> {
        let used_idx = self.mem.load_acquire_u16(self.layout.used + 2)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let advanced = used_idx.wrapping_sub(self.last_used);
        if usize::from(advanced) > self.num_in_flight {
            return Err(VirtqueueError::UsedIndexJump {
                advanced,
                in_flight: self.num_in_flight,
            });
        }
        let slot = usize::from(self.last_used % self.layout.size);
        let at = self.layout.used + 4 + USED_ELEM_LEN * slot;
        let id = self.mem.read_volatile::<u32>(at)?;
        let len = self.mem.read_volatile::<u32>(at + 4)?;
        self.last_used = self.last_used.wrapping_add(1);
        let entry = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or(VirtqueueError::BogusUsedId { id })?;
        // id < size <= 32768: fits in u16.
        let head = id as u16;
        self.num_in_flight -= 1;
        // Back on the free list in the order add_chain took them (the list never
        // holds more than `size` entries, so this does not allocate).
        let base = self.free.len();
        let count = usize::from(entry.count);
        self.free.resize(base + count, 0);
        let mut desc = head;
        for i in 0..count {
            self.free[base + count - 1 - i] = desc;
            desc = self.next[usize::from(desc)];
        }
        if u64::from(len) > entry.writable_len {
            return Err(VirtqueueError::BadUsedLen {
                head,
                token: entry.token,
                len,
                max: entry.writable_len,
            });
        }
        Ok(Some(UsedChain {
            head,
            len,
            token: entry.token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeRing;

    fn pool() -> DmaPool {
        DmaPool::fake(4096, &[0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000]).unwrap()
    }

    fn rd(addr: u64, len: u32) -> ChainBuffer {
        ChainBuffer {
            addr,
            len,
            writable: false,
        }
    }

    fn wr(addr: u64, len: u32) -> ChainBuffer {
        ChainBuffer {
            addr,
            len,
            writable: true,
        }
    }

    fn device(pool: &DmaPool, q: &SplitQueue) -> FakeRing {
        let (d, a, u) = q.ring_addresses();
        FakeRing::new(pool.clone(), q.size(), d, a, u)
    }

    #[test]
    fn layout_follows_the_alignment_rules() {
        let l = RingLayout::new(256).unwrap();
        assert_eq!((l.desc, l.avail, l.used), (0, 4096, 4672));
        assert_eq!(l.total, 4672 + 2112);
        for bad in [0, 3, 100, 65535] {
            assert!(matches!(
                RingLayout::new(bad),
                Err(VirtqueueError::BadSize(_))
            ));
        }
    }

    #[test]
    fn device_sees_the_chain_as_written() {
        let pool = pool();
        let mut q = SplitQueue::new(&pool, 8).unwrap();
        let mut dev = device(&pool, &q);
        assert_eq!(dev.avail_flags(), VIRTQ_AVAIL_F_NO_INTERRUPT);
        let head = q
            .add_chain(&[
                rd(0x20_0000, 40),
                rd(0x20_1000, 16),
                wr(0x30_0000, 8),
                wr(0x30_1000, 128),
            ])
            .unwrap();
        assert!(q.needs_notify().unwrap());
        let (dhead, chain) = dev.take().unwrap();
        assert_eq!(dhead, head);
        assert_eq!(
            chain,
            vec![
                (0x20_0000, 40, false),
                (0x20_1000, 16, false),
                (0x30_0000, 8, true),
                (0x30_1000, 128, true),
            ]
        );
        assert!(dev.take().is_none());
        assert_eq!(q.poll_used().unwrap(), None);
        dev.complete(u32::from(dhead), 136);
        assert_eq!(
            q.poll_used().unwrap(),
            Some(UsedChain {
                head,
                len: 136,
                token: 0
            })
        );
        assert_eq!(q.free_descriptors(), 8);
        assert_eq!(q.in_flight(), 0);
        dev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY);
        assert!(!q.needs_notify().unwrap());
    }

    #[test]
    fn completions_out_of_order_and_index_wraparound() {
        let pool = pool();
        let mut q = SplitQueue::new(&pool, 4).unwrap();
        let mut dev = device(&pool, &q);
        // Enough rounds that both 16-bit indices wrap around.
        for round in 0..70_000u32 {
            let a = q
                .add_chain_tagged(&[rd(0x1000, 4), wr(0x2000, 48)], 11)
                .unwrap();
            let b = q
                .add_chain_tagged(&[rd(0x3000, 4), wr(0x4000, 64)], 22)
                .unwrap();
            let (ha, _) = dev.take().unwrap();
            let (hb, cb) = dev.take().unwrap();
            assert_eq!((ha, hb), (a, b));
            assert_eq!(cb[1], (0x4000, 64, true));
            // The device finishes the second first.
            dev.complete(u32::from(hb), 64);
            dev.complete(u32::from(ha), round % 49);
            assert_eq!(
                q.poll_used().unwrap(),
                Some(UsedChain {
                    head: b,
                    len: 64,
                    token: 22
                })
            );
            assert_eq!(
                q.poll_used().unwrap(),
                Some(UsedChain {
                    head: a,
                    len: round % 49,
                    token: 11
                })
            );
            assert_eq!(q.poll_used().unwrap(), None);
        }
        assert_eq!(q.free_descriptors(), 4);
    }

    #[test]
    fn rejects_bad_chains_without_consuming_descriptors() {
        let pool = pool();
        let mut q = SplitQueue::new(&pool, 4).unwrap();
        assert!(matches!(q.add_chain(&[]), Err(VirtqueueError::EmptyChain)));
        assert!(matches!(
            q.add_chain(&[wr(0x1000, 4), rd(0x2000, 4)]),
            Err(VirtqueueError::ReadableAfterWritable(1))
        ));
        assert!(matches!(
            q.add_chain(&[rd(0x1000, 0)]),
            Err(VirtqueueError::BadBuffer { index: 0, .. })
        ));
        assert!(matches!(
            q.add_chain(&[rd(u64::MAX - 1, 4)]),
            Err(VirtqueueError::BadBuffer { .. })
        ));
        assert!(matches!(
            q.add_chain(&[rd(0x1000, 1); 5]),
            Err(VirtqueueError::Full { needed: 5, free: 4 })
        ));
        assert_eq!(q.free_descriptors(), 4);
        q.add_chain(&[rd(0x1000, 1); 3]).unwrap();
        assert!(matches!(
            q.add_chain(&[rd(0x1000, 1); 2]),
            Err(VirtqueueError::Full { .. })
        ));
    }

    #[test]
    fn rejects_bogus_used_ids_and_lengths() {
        let pool = pool();
        let mut q = SplitQueue::new(&pool, 4).unwrap();
        let mut dev = device(&pool, &q);
        let head = q.add_chain(&[rd(0x1000, 4), wr(0x2000, 48)]).unwrap();
        let (dhead, chain) = dev.take().unwrap();
        assert_eq!(chain.len(), 2);
        // An id beyond the queue size.
        dev.complete(4, 48);
        assert!(matches!(
            q.poll_used(),
            Err(VirtqueueError::BogusUsedId { id: 4 })
        ));
        // A non-head descriptor of the chain in flight (head + 1).
        let second = (dhead + 1) % 4;
        dev.complete(u32::from(second), 48);
        assert!(matches!(
            q.poll_used(),
            Err(VirtqueueError::BogusUsedId { .. })
        ));
        // Index jumps past what is in flight (2 more with 1 in flight).
        dev.advance_used_idx(2);
        assert!(matches!(
            q.poll_used(),
            Err(VirtqueueError::UsedIndexJump {
                advanced: 2,
                in_flight: 1
            })
        ));
        dev.advance_used_idx(u16::MAX - 1); // undo: back to the last consumed index
                                            // A length longer than the writable part: the chain is freed, error reported.
        dev.complete(u32::from(dhead), 49);
        assert!(matches!(
            q.poll_used(),
            Err(VirtqueueError::BadUsedLen { head: h, len: 49, max: 48, .. }) if h == head
        ));
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), 4);
        // The same head again is no longer in flight.
        dev.complete(u32::from(dhead), 0);
        assert!(matches!(
            q.poll_used(),
            Err(VirtqueueError::UsedIndexJump { .. })
        ));
    }
}
