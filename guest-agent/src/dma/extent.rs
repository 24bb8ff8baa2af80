//! First-fit allocator of byte ranges inside a pool of pages, where a range may only
//! cross a page boundary if the two pages are physically adjacent.
//!
//! The device sees one descriptor per buffer, so each buffer must be one contiguous
//! range of guest-physical memory. The pool is a list of *segments*: maximal runs of
//! pages that are contiguous both virtually and physically. A buffer never leaves its
//! segment.

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

/// Alignment of every allocation: a cache line, and what the spec recommends for
/// tensors (§6), enough for any element type.
pub const DMA_ALIGN: usize = 64;

/// Errors of the allocator.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ExtentError {
    /// A zero-byte allocation.
    #[error("Cannot allocate 0 bytes")]
    ZeroSize,
    /// No free range of this size inside one segment.
    #[error(
        "No free physically contiguous range of {size} bytes (largest segment {largest} bytes)"
    )]
    Exhausted {
        /// Bytes asked for (after alignment).
        size: usize,
        /// Longest segment of the pool.
        largest: usize,
    },
    /// Freeing an offset that is not the start of a live allocation.
    #[error("Offset {0:#x} is not an allocation of this pool")]
    NotAllocated(usize),
}

/// A run of physically contiguous pages: `start..end` in pool offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// Splits a pool of `page_addrs.len()` pages of `page_size` bytes into segments of
/// physically adjacent pages.
pub fn segments_from_pages(page_addrs: &[u64], page_size: usize) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for (i, addr) in page_addrs.iter().enumerate() {
        let start = i * page_size;
        let adjacent = i > 0 && page_addrs[i - 1].checked_add(page_size as u64) == Some(*addr);
        match segments.last_mut() {
            Some(last) if adjacent => last.end = start + page_size,
            _ => segments.push(Segment {
                start,
                end: start + page_size,
            }),
        }
    }
    segments
}

fn align_up(value: usize, align: usize) -> Option<usize> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// The allocator state: free ranges and live allocations, in pool offsets.
#[derive(Debug)]
pub struct ExtentAllocator {
    segments: Vec<Segment>,
    /// Free ranges, start -> end; never adjacent to each other (coalesced).
    free: BTreeMap<usize, usize>,
    /// Live allocations, start -> length.
    live: HashMap<usize, usize>,
}

impl ExtentAllocator {
    /// An allocator over `segments`, all free.
    pub fn new(segments: Vec<Segment>) -> Self {
        let mut a = ExtentAllocator {
            segments,
            free: BTreeMap::new(),
            live: HashMap::new(),
        };
        let ranges: Vec<_> = a.segments.iter().map(|s| (s.start, s.end)).collect();
        for (start, end) in ranges {
            if end > start {
                a.insert_free(start, end);
            }
        }
        a
    }

    /// Allocates `size` bytes (rounded up to [`DMA_ALIGN`]) at a [`DMA_ALIGN`]-aligned
    /// offset, inside one segment. Returns `(offset, rounded length)`.
    pub fn alloc(&mut self, size: usize) -> Result<(usize, usize), ExtentError> {
        if size == 0 {
            return Err(ExtentError::ZeroSize);
        }
        let largest = self
            .segments
            .iter()
            .map(|s| s.end - s.start)
            .max()
            .unwrap_or(0);
        let exhausted = ExtentError::Exhausted { size, largest };
        let len = align_up(size, DMA_ALIGN).ok_or(exhausted.clone())?;
        let found = self.free.iter().find_map(|(&free_start, &free_end)| {
            self.segments.iter().find_map(|seg| {
                let lo = free_start.max(seg.start);
                let hi = free_end.min(seg.end);
                let start = align_up(lo, DMA_ALIGN)?;
                (start.checked_add(len)? <= hi).then_some((free_start, free_end, start))
            })
        });
        let (free_start, free_end, start) = found.ok_or(exhausted)?;
        self.free.remove(&free_start);
        if free_start < start {
            self.free.insert(free_start, start);
        }
        if start + len < free_end {
            self.free.insert(start + len, free_end);
        }
        self.live.insert(start, len);
        Ok((start, len))
    }

    /// Frees the allocation starting at `offset`.
    pub fn free(&mut self, offset: usize) -> Result<(), ExtentError> {
        let len = self
            .live
            .remove(&offset)
            .ok_or(ExtentError::NotAllocated(offset))?;
        self.insert_free(offset, offset + len);
        Ok(())
    }

    /// Length of the live allocation at `offset`.
    pub fn allocation_len(&self, offset: usize) -> Option<usize> {
        self.live.get(&offset).copied()
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> usize {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    /// The pool's segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    fn insert_free(&mut self, mut start: usize, mut end: usize) {
        if let Some((&prev_start, &prev_end)) = self.free.range(..start).next_back() {
            if prev_end == start {
                self.free.remove(&prev_start);
                start = prev_start;
            }
        }
        if let Some(&next_end) = self.free.get(&end) {
            self.free.remove(&end);
            end = next_end;
        }
        self.free.insert(start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 2 << 20;

    #[test]
    fn segments_follow_physical_adjacency() {
        let pages = [
            0x4000_0000,
            0x4020_0000,
            0x1000_0000,
            0x8000_0000,
            0x8020_0000,
            0x8040_0000,
        ];
        assert_eq!(
            segments_from_pages(&pages, PAGE),
            vec![
                Segment {
                    start: 0,
                    end: 2 * PAGE
                },
                Segment {
                    start: 2 * PAGE,
                    end: 3 * PAGE
                },
                Segment {
                    start: 3 * PAGE,
                    end: 6 * PAGE
                },
            ]
        );
        // Descending physical order is not contiguous.
        assert_eq!(segments_from_pages(&[0x40_0000, 0x20_0000], PAGE).len(), 2);
        assert_eq!(segments_from_pages(&[u64::MAX - 5, 0], PAGE).len(), 2);
        assert!(segments_from_pages(&[], PAGE).is_empty());
    }

    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let mut a = ExtentAllocator::new(vec![Segment {
            start: 0,
            end: 4096,
        }]);
        let x = a.alloc(1).unwrap();
        let y = a.alloc(65).unwrap();
        let z = a.alloc(64).unwrap();
        assert_eq!(x, (0, 64));
        assert_eq!(y, (64, 128));
        assert_eq!(z, (192, 64));
        assert_eq!(a.free_bytes(), 4096 - 256);
        assert_eq!(a.alloc(0), Err(ExtentError::ZeroSize));
        assert!(matches!(
            a.alloc(usize::MAX),
            Err(ExtentError::Exhausted { .. })
        ));
    }

    #[test]
    fn never_crosses_into_a_physically_distant_page() {
        // Two pages, not adjacent physically: a buffer of 1.5 pages fits in neither.
        let segs = segments_from_pages(&[0x4000_0000, 0x9000_0000], PAGE);
        let mut a = ExtentAllocator::new(segs);
        assert!(matches!(
            a.alloc(PAGE + PAGE / 2),
            Err(ExtentError::Exhausted { largest, .. }) if largest == PAGE
        ));
        // Fill most of the first page, then ask for more than its rest: it must go to
        // the start of the second page, not straddle the boundary.
        let (first, _) = a.alloc(PAGE - 4096).unwrap();
        assert_eq!(first, 0);
        let (second, _) = a.alloc(8192).unwrap();
        assert_eq!(second, PAGE);
        // The 4 KiB hole at the end of page 0 is still usable.
        assert_eq!(a.alloc(4096).unwrap(), (PAGE - 4096, 4096));
    }

    #[test]
    fn may_cross_into_a_physically_adjacent_page() {
        let segs = segments_from_pages(&[0x4000_0000, 0x4020_0000], PAGE);
        let mut a = ExtentAllocator::new(segs);
        a.alloc(PAGE - 64).unwrap();
        assert_eq!(a.alloc(4096).unwrap(), (PAGE - 64, 4096));
    }

    #[test]
    fn free_coalesces_and_rejects_unknown_offsets() {
        let mut a = ExtentAllocator::new(vec![Segment {
            start: 0,
            end: 1024,
        }]);
        let offs: Vec<_> = (0..16).map(|_| a.alloc(64).unwrap().0).collect();
        assert!(a.alloc(64).is_err());
        for o in offs.iter().step_by(2) {
            a.free(*o).unwrap();
        }
        assert!(a.alloc(128).is_err(), "only 64-byte holes");
        for o in offs.iter().skip(1).step_by(2) {
            a.free(*o).unwrap();
        }
        assert_eq!(a.alloc(1024).unwrap(), (0, 1024));
        assert_eq!(a.free(64), Err(ExtentError::NotAllocated(64)));
        a.free(0).unwrap();
        assert_eq!(a.free(0), Err(ExtentError::NotAllocated(0)));
        assert_eq!(a.free_bytes(), 1024);
        assert_eq!(a.allocation_len(0), None);
    }
}
