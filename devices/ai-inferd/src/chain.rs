//! Step 0 of docs/ai_infer.md §9: walking one descriptor chain.
//!
//! The walk reads each 16-byte descriptor out of guest memory exactly once and keeps
//! only its own copy (address, length), so the guest rewriting its descriptor table
//! later changes nothing. It enforces everything §9 step 0 and §12 list: indices
//! below the table size, a bound on the number of descriptors (which also ends
//! loops), the virtio rules for indirect tables, readable before writable, every
//! buffer inside guest memory without `addr + len` overflow, and a device-writable
//! part long enough for the response header. A chain that fails any of this is
//! completed with `used.len = 0` and nothing written.
//!
//! The walk does not use virtio-queue's `DescriptorChain` iterator because that
//! iterator ends silently on a malformed descriptor, which is indistinguishable from
//! the end of the chain.

use ai_infer_protocol::RESPONSE_HEADER_LEN;
use thiserror::Error;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Size of one split-virtqueue descriptor.
pub const DESCRIPTOR_LEN: u64 = 16;

/// Why a chain cannot be served (it completes with `used.len = 0`).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index (or the head) is outside its descriptor table.
    #[error("descriptor index {index} is outside a table of {table_len} entries")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Entries in the table it indexes.
        table_len: u32,
    },
    /// More buffer descriptors than allowed (also what a loop runs into).
    #[error("chain has more than {max} descriptors")]
    TooManyDescriptors {
        /// The limit: min(queue size, max_chain_descriptors).
        max: usize,
    },
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has NEXT set.
    #[error("indirect descriptor with the NEXT flag")]
    IndirectWithNext,
    /// An indirect table whose length is 0 or not a multiple of 16.
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    IndirectBadLength(u32),
    /// A device-readable descriptor after a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// `addr + len` overflows.
    #[error("buffer at {addr:#x} of {len} bytes overflows the address space")]
    AddressOverflow {
        /// Guest-physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A buffer (or a descriptor or indirect table) is not entirely inside guest
    /// memory shared with the daemon.
    #[error("buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory {
        /// Guest-physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The device-writable part cannot hold a response header.
    #[error("writable part is {0} bytes, less than the 48-byte response header")]
    NoRoomForResponse(u64),
    /// The device-writable part is longer than a used element can report.
    #[error("writable part is {0} bytes, more than a used element's 32-bit length")]
    WritableTooLong(u64),
}

/// One buffer of a chain: a guest-physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Segment {
    /// End (exclusive); cannot overflow for walked segments.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(u64::from(self.len))
    }
}

/// A chain that passed step 0: its readable and writable buffers in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkedChain {
    /// Head descriptor index (the used element's id).
    pub head: u16,
    /// Device-readable buffers (the R stream, in order).
    pub readable: Vec<Segment>,
    /// Device-writable buffers (the W stream, in order).
    pub writable: Vec<Segment>,
    /// Total bytes of R.
    pub readable_len: u64,
    /// Total bytes of W (≥ 48, ≤ `u32::MAX`).
    pub writable_len: u64,
}

/// Whether a writable buffer overlaps any other buffer of a chain (§6: the device
/// relies on outputs never aliasing inputs). Readable buffers may overlap each other.
/// Runs in O(n log n).
pub fn writable_overlap(readable: &[Segment], writable: &[Segment]) -> bool {
    let mut all: Vec<(Segment, bool)> = readable
        .iter()
        .map(|s| (*s, false))
        .chain(writable.iter().map(|s| (*s, true)))
        .filter(|(s, _)| s.len > 0)
        .collect();
    all.sort_unstable_by_key(|(s, _)| s.addr);
    // Sorted by start, B overlaps an earlier A iff B.start < A.end.
    let (mut any_end, mut writable_end) = (0u64, 0u64);
    for (seg, writable) in all {
        let limit = if writable { any_end } else { writable_end };
        if seg.addr < limit {
            return true;
        }
        any_end = any_end.max(seg.end());
        if writable {
            writable_end = writable_end.max(seg.end());
        }
    }
    false
}

/// The raw fields of one descriptor.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc<M: GuestMemoryBackend>(
    mem: &M,
    table: u64,
    index: u16,
) -> Result<RawDesc, ChainError> {
    let outside = ChainError::OutsideMemory {
        addr: table,
        len: DESCRIPTOR_LEN,
    };
    let addr = table
        .checked_add(u64::from(index) * DESCRIPTOR_LEN)
        .ok_or(outside.clone())?;
    let mut b = [0u8; DESCRIPTOR_LEN as usize];
    mem.read_slice(&mut b, GuestAddress(addr))
        .map_err(|_| ChainError::OutsideMemory {
            addr,
            len: DESCRIPTOR_LEN,
        })?;
    let le64 = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    Ok(RawDesc {
        addr: le64(0..8),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

fn check_in_memory<M: GuestMemoryBackend>(mem: &M, addr: u64, len: u64) -> Result<(), ChainError> {
    let Ok(len_usize) = usize::try_from(len) else {
        return Err(ChainError::OutsideMemory { addr, len });
    };
    if len > 0 && !mem.check_range(GuestAddress(addr), len_usize) {
        return Err(ChainError::OutsideMemory { addr, len });
    }
    Ok(())
}

/// Walks the chain starting at `head` in the descriptor table at `desc_table`
/// (`queue_size` entries), allowing at most `min(queue_size, max_descriptors)` buffer
/// descriptors (direct plus indirect; the descriptor pointing at an indirect table is
/// framing and not counted).
pub fn walk<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    max_descriptors: u16,
) -> Result<WalkedChain, ChainError> {
    let limit = usize::from(queue_size.min(max_descriptors));
    let mut chain = WalkedChain {
        head,
        readable: Vec::new(),
        writable: Vec::new(),
        readable_len: 0,
        writable_len: 0,
    };
    let mut table = desc_table.0;
    let mut table_len = u32::from(queue_size);
    let mut in_indirect = false;
    let mut index = head;
    loop {
        if u32::from(index) >= table_len {
            return Err(ChainError::IndexOutOfRange { index, table_len });
        }
        let desc = read_desc(mem, table, index)?;
        let flags = u32::from(desc.flags);
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if flags & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            if desc.len == 0 || u64::from(desc.len) % DESCRIPTOR_LEN != 0 {
                return Err(ChainError::IndirectBadLength(desc.len));
            }
            if desc.addr.checked_add(u64::from(desc.len)).is_none() {
                return Err(ChainError::AddressOverflow {
                    addr: desc.addr,
                    len: desc.len,
                });
            }
            check_in_memory(mem, desc.addr, desc.len.into())?;
            table = desc.addr;
            table_len = desc.len / DESCRIPTOR_LEN as u32;
            in_indirect = true;
            index = 0;
            continue;
        }
        if chain.readable.len() + chain.writable.len() >= limit {
            return Err(ChainError::TooManyDescriptors { max: limit });
        }
        if desc.addr.checked_add(u64::from(desc.len)).is_none() {
            return Err(ChainError::AddressOverflow {
                addr: desc.addr,
                len: desc.len,
            });
        }
        check_in_memory(mem, desc.addr, desc.len.into())?;
        let seg = Segment {
            addr: desc.addr,
            len: desc.len,
        };
        if flags & VRING_DESC_F_WRITE != 0 {
            chain.writable.push(seg);
            chain.writable_len += u64::from(desc.len);
        } else {
            if !chain.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            chain.readable.push(seg);
            chain.readable_len += u64::from(desc.len);
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            break;
        }
        index = desc.next;
    }
    if chain.writable_len < RESPONSE_HEADER_LEN as u64 {
        return Err(ChainError::NoRoomForResponse(chain.writable_len));
    }
    if chain.writable_len > u64::from(u32::MAX) {
        return Err(ChainError::WritableTooLong(chain.writable_len));
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const DATA: u64 = 0x8000;
    const MEM_END: u64 = 0x10_0000;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap()
    }

    fn put(
        mem: &GuestMemoryMmap,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    fn walk_default(mem: &GuestMemoryMmap, head: u16) -> Result<WalkedChain, ChainError> {
        walk(mem, GuestAddress(TABLE), 16, head, 256)
    }

    #[test]
    fn walks_a_well_formed_chain() {
        let mem = memory();
        put(&mem, TABLE, 3, DATA, 200, R | N, 5);
        put(&mem, TABLE, 5, DATA + 0x1000, 16, R | N, 0);
        put(&mem, TABLE, 0, DATA + 0x2000, 8, W | N, 1);
        put(&mem, TABLE, 1, DATA + 0x2040, 128, W, 9);
        let c = walk_default(&mem, 3).unwrap();
        assert_eq!(c.head, 3);
        assert_eq!(
            c.readable,
            vec![
                Segment {
                    addr: DATA,
                    len: 200
                },
                Segment {
                    addr: DATA + 0x1000,
                    len: 16
                }
            ]
        );
        assert_eq!(c.writable.len(), 2);
        assert_eq!((c.readable_len, c.writable_len), (216, 136));
        assert!(!writable_overlap(&c.readable, &c.writable));
    }

    #[test]
    fn index_beyond_the_queue_size_is_rejected() {
        let mem = memory();
        assert_eq!(
            walk_default(&mem, 16),
            Err(ChainError::IndexOutOfRange {
                index: 16,
                table_len: 16
            })
        );
        put(&mem, TABLE, 0, DATA, 40, R | N, 200);
        assert_eq!(
            walk_default(&mem, 0),
            Err(ChainError::IndexOutOfRange {
                index: 200,
                table_len: 16
            })
        );
    }

    #[test]
    fn loops_and_long_chains_are_bounded() {
        let mem = memory();
        // 0 -> 1 -> 0 -> ... : a loop.
        put(&mem, TABLE, 0, DATA, 40, R | N, 1);
        put(&mem, TABLE, 1, DATA, 40, R | N, 0);
        assert_eq!(
            walk_default(&mem, 0),
            Err(ChainError::TooManyDescriptors { max: 16 })
        );
        // A self-loop.
        put(&mem, TABLE, 2, DATA, 48, W | N, 2);
        assert_eq!(
            walk_default(&mem, 2),
            Err(ChainError::TooManyDescriptors { max: 16 })
        );
        // A straight chain of 5 against max_chain_descriptors = 4.
        for i in 0..5u16 {
            let flags = if i == 4 { W } else { W | N };
            put(&mem, TABLE, i, DATA + u64::from(i) * 64, 48, flags, i + 1);
        }
        assert_eq!(
            walk(&mem, GuestAddress(TABLE), 16, 0, 4),
            Err(ChainError::TooManyDescriptors { max: 4 })
        );
        assert!(walk(&mem, GuestAddress(TABLE), 16, 0, 5).is_ok());
    }

    #[test]
    fn indirect_tables_follow_the_virtio_rules() {
        let mem = memory();
        let ind = 0x4000;
        put(&mem, ind, 0, DATA, 40, R | N, 1);
        put(&mem, ind, 1, DATA + 0x100, 48, W, 0);
        put(&mem, TABLE, 0, ind, 32, I, 0);
        let c = walk_default(&mem, 0).unwrap();
        assert_eq!((c.readable_len, c.writable_len), (40, 48));

        // Indirect combined with NEXT.
        put(&mem, TABLE, 1, ind, 32, I | N, 0);
        assert_eq!(walk_default(&mem, 1), Err(ChainError::IndirectWithNext));
        // Length not a multiple of 16, or zero.
        put(&mem, TABLE, 2, ind, 24, I, 0);
        assert_eq!(
            walk_default(&mem, 2),
            Err(ChainError::IndirectBadLength(24))
        );
        put(&mem, TABLE, 3, ind, 0, I, 0);
        assert_eq!(walk_default(&mem, 3), Err(ChainError::IndirectBadLength(0)));
        // Nested indirect.
        let nested = 0x5000;
        put(&mem, nested, 0, ind, 32, I, 0);
        put(&mem, TABLE, 4, nested, 16, I, 0);
        assert_eq!(walk_default(&mem, 4), Err(ChainError::NestedIndirect));
        // A next index beyond the indirect table's own length.
        let short = 0x6000;
        put(&mem, short, 0, DATA, 48, W | N, 2);
        put(&mem, TABLE, 5, short, 32, I, 0);
        assert_eq!(
            walk_default(&mem, 5),
            Err(ChainError::IndexOutOfRange {
                index: 2,
                table_len: 2
            })
        );
        // A loop inside an indirect table is bounded too.
        let looped = 0x7000;
        put(&mem, looped, 0, DATA, 48, W | N, 0);
        put(&mem, TABLE, 6, looped, 16, I, 0);
        assert_eq!(
            walk_default(&mem, 6),
            Err(ChainError::TooManyDescriptors { max: 16 })
        );
        // An indirect table outside guest memory, or overflowing.
        put(&mem, TABLE, 7, MEM_END - 16, 32, I, 0);
        assert!(matches!(
            walk_default(&mem, 7),
            Err(ChainError::OutsideMemory { .. })
        ));
        put(&mem, TABLE, 8, u64::MAX - 15, 32, I, 0);
        assert!(matches!(
            walk_default(&mem, 8),
            Err(ChainError::AddressOverflow { .. })
        ));
    }

    #[test]
    fn readable_after_writable_is_rejected() {
        let mem = memory();
        put(&mem, TABLE, 0, DATA, 48, W | N, 1);
        put(&mem, TABLE, 1, DATA + 0x100, 40, R, 0);
        assert_eq!(
            walk_default(&mem, 0),
            Err(ChainError::ReadableAfterWritable)
        );
    }

    #[test]
    fn buffers_must_be_inside_memory_without_overflow() {
        let mem = memory();
        put(&mem, TABLE, 0, MEM_END - 10, 40, R | N, 1);
        put(&mem, TABLE, 1, DATA, 48, W, 0);
        assert_eq!(
            walk_default(&mem, 0),
            Err(ChainError::OutsideMemory {
                addr: MEM_END - 10,
                len: 40
            })
        );
        put(&mem, TABLE, 0, 0x1_0000_0000, 40, R | N, 1);
        assert!(matches!(
            walk_default(&mem, 0),
            Err(ChainError::OutsideMemory { .. })
        ));
        put(&mem, TABLE, 0, u64::MAX - 8, 40, R | N, 1);
        assert_eq!(
            walk_default(&mem, 0),
            Err(ChainError::AddressOverflow {
                addr: u64::MAX - 8,
                len: 40
            })
        );
        // The descriptor table itself outside memory.
        assert!(matches!(
            walk(&mem, GuestAddress(MEM_END - 8), 16, 0, 256),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn writable_part_must_hold_a_response() {
        let mem = memory();
        put(&mem, TABLE, 0, DATA, 40, R | N, 1);
        put(&mem, TABLE, 1, DATA + 0x100, 47, W, 0);
        assert_eq!(
            walk_default(&mem, 0),
            Err(ChainError::NoRoomForResponse(47))
        );
        put(&mem, TABLE, 1, DATA + 0x100, 20, W | N, 2);
        put(&mem, TABLE, 2, DATA + 0x200, 28, W, 0);
        assert_eq!(walk_default(&mem, 0).unwrap().writable_len, 48);
        // No writable part at all.
        put(&mem, TABLE, 3, DATA, 40, R, 0);
        assert_eq!(walk_default(&mem, 3), Err(ChainError::NoRoomForResponse(0)));
    }

    #[test]
    fn overlap_rules() {
        let segs = |list: Vec<(u64, u32)>| -> Vec<Segment> {
            list.into_iter()
                .map(|(addr, len)| Segment { addr, len })
                .collect()
        };
        let overlaps = |readable: Vec<(u64, u32)>, writable: Vec<(u64, u32)>| {
            writable_overlap(&segs(readable), &segs(writable))
        };
        // Readable buffers may overlap each other.
        assert!(!overlaps(vec![(0, 100), (50, 100)], vec![(200, 48)]));
        // Writable overlapping readable, in either order of addresses.
        assert!(overlaps(vec![(0, 100)], vec![(99, 48)]));
        assert!(overlaps(vec![(140, 100)], vec![(100, 48)]));
        // Writable overlapping writable.
        assert!(overlaps(vec![], vec![(0, 48), (40, 48)]));
        // A writable buffer containing a readable one.
        assert!(overlaps(vec![(10, 4)], vec![(0, 48)]));
        // A readable buffer spanning past a writable one further on.
        assert!(overlaps(vec![(0, 1000), (5, 1)], vec![(500, 48)]));
        // Adjacent is fine; zero-length buffers overlap nothing.
        assert!(!overlaps(vec![(0, 100), (100, 0)], vec![(100, 48)]));
    }
}
