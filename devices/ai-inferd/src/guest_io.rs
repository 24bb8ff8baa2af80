//! Byte access to a chain's R and W streams in guest memory.
//!
//! Offsets in a stream (as computed by `ChainLayout`) map to pieces of the chain's
//! segments. Small structures (the request prefix, shapes, response header, MODELS and
//! TRACE payloads) are copied. Tensor data stays in guest memory: a tensor that is
//! contiguous inside one memory region and aligned to its element size is handed to
//! the backend in place ([`TensorPlace::InPlace`]); any other tensor goes through a
//! bounce buffer ([`TensorPlace::Scattered`]), gathered before compute for inputs and
//! scattered back after compute for outputs — correct, but a copy (§6 of the spec).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::chain::Segment;

/// A stream access that does not fit the chain or guest memory.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum GuestIoError {
    /// The range runs past the end of the stream.
    #[error("range {offset}+{len} is beyond the {stream_len}-byte stream")]
    OutOfStream {
        /// Offset in the stream.
        offset: u64,
        /// Length.
        len: u64,
        /// Stream length.
        stream_len: u64,
    },
    /// Guest memory access failed (the mapping no longer covers the address).
    #[error("guest memory access at {addr:#x} failed")]
    Memory {
        /// Guest-physical address.
        addr: u64,
    },
    /// A bounce buffer of this size cannot be allocated on this host.
    #[error("a bounce buffer of {0} bytes does not fit the host address space")]
    TooLarge(u64),
    /// A bounce buffer above [`MAX_BOUNCE_LEN`] was asked for.
    #[error("a bounce buffer of {0} bytes is above the {MAX_BOUNCE_LEN}-byte limit")]
    BounceOverLimit(u64),
    /// The host could not allocate the bounce buffer (the request fails, not the daemon).
    #[error("cannot allocate a bounce buffer of {0} bytes")]
    BounceAllocation(u64),
}

/// Largest bounce buffer: what one chain's device-writable part can hold (a used
/// element reports at most `u32::MAX` bytes), and far above the default per-request
/// limits (256 MiB), which normally bound tensors first. It only stops a tenant whose
/// configured limits are larger from having the daemon reserve arbitrary amounts.
pub const MAX_BOUNCE_LEN: u64 = u32::MAX as u64;

/// The pieces of `segments` (a stream) that hold `offset .. offset + len`, in order,
/// without allocating (the stream accessors run on every request).
fn stream_pieces(
    segments: &[Segment],
    offset: u64,
    len: u64,
) -> Result<impl Iterator<Item = Segment> + '_, GuestIoError> {
    let stream_len: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    let out_of_stream = GuestIoError::OutOfStream {
        offset,
        len,
        stream_len,
    };
    let end = offset.checked_add(len).ok_or(out_of_stream.clone())?;
    if end > stream_len {
        return Err(out_of_stream);
    }
    let mut seg_start = 0u64;
    Ok(segments
        .iter()
        .map_while(move |seg| {
            let start = seg_start;
            seg_start += u64::from(seg.len);
            (start < end).then_some((start, seg))
        })
        .filter_map(move |(seg_start, seg)| {
            let from = offset.max(seg_start);
            let to = end.min(seg_start + u64::from(seg.len));
            (from < to).then(|| Segment {
                addr: seg.addr + (from - seg_start),
                // Fits: a sub-range of a u32-long segment.
                len: (to - from) as u32,
            })
        }))
}

/// The pieces of `segments` (a stream) that hold `offset .. offset + len`.
pub fn pieces(segments: &[Segment], offset: u64, len: u64) -> Result<Vec<Segment>, GuestIoError> {
    Ok(stream_pieces(segments, offset, len)?.collect())
}

/// Copies `buf.len()` bytes from the stream at `offset`.
pub fn read_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), GuestIoError> {
    let mut at = 0usize;
    for piece in stream_pieces(segments, offset, buf.len() as u64)? {
        let n = piece.len as usize;
        mem.read_slice(&mut buf[at..at + n], GuestAddress(piece.addr))
            .map_err(|_| GuestIoError::Memory { addr: piece.addr })?;
        at += n;
    }
    Ok(())
}

/// Copies `data` into the stream at `offset`.
pub fn write_stream(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    data: &[u8],
) -> Result<(), GuestIoError> {
    let mut at = 0usize;
    for piece in stream_pieces(segments, offset, data.len() as u64)? {
        let n = piece.len as usize;
        mem.write_slice(&data[at..at + n], GuestAddress(piece.addr))
            .map_err(|_| GuestIoError::Memory { addr: piece.addr })?;
        at += n;
    }
    Ok(())
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorPlace {
    /// Contiguous and aligned in one memory region: used in place.
    InPlace {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Anything else: these pieces, copied through a bounce buffer.
    Scattered(Vec<Segment>),
}

impl TensorPlace {
    /// Locates `offset .. offset + len` of a stream; `align` is the element size.
    pub fn locate(
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
        len: u64,
        align: usize,
    ) -> Result<Self, GuestIoError> {
        // The start of the range if its pieces are adjacent (no list is built for that).
        let mut parts = stream_pieces(segments, offset, len)?;
        let contiguous = parts.next().and_then(|first| {
            let mut end = first.end();
            parts
                .all(|p| {
                    let adjacent = p.addr == end;
                    end = p.end();
                    adjacent
                })
                .then_some(first.addr)
        });
        if let (Some(addr), Ok(len_usize)) = (contiguous, usize::try_from(len)) {
            // One region: get_slice fails when the range crosses a region boundary.
            if let Ok(slice) = mem.get_slice(GuestAddress(addr), len_usize) {
                if (slice.ptr_guard().as_ptr() as usize).is_multiple_of(align.max(1)) {
                    return Ok(TensorPlace::InPlace { addr, len });
                }
            }
        }
        Ok(TensorPlace::Scattered(pieces(segments, offset, len)?))
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            TensorPlace::InPlace { len, .. } => *len,
            TensorPlace::Scattered(parts) => parts.iter().map(|p| u64::from(p.len)).sum(),
        }
    }

    /// Whether the tensor has no bytes (never true for validated requests).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A heap buffer aligned to 8 bytes (enough for every dtype) for a scattered tensor.
pub struct BounceBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl BounceBuffer {
    /// A zeroed buffer of `len` bytes (at most [`MAX_BOUNCE_LEN`]). The length comes
    /// from the guest, so an allocation the host cannot make is an error for this
    /// request, never an abort of the daemon.
    pub fn new(len: u64) -> Result<Self, GuestIoError> {
        if len > MAX_BOUNCE_LEN {
            return Err(GuestIoError::BounceOverLimit(len));
        }
        let len_usize = usize::try_from(len).map_err(|_| GuestIoError::TooLarge(len))?;
        let total = len_usize
            .checked_add(7)
            .ok_or(GuestIoError::TooLarge(len))?;
        let mut storage = Vec::new();
        storage
            .try_reserve_exact(total)
            .map_err(|_| GuestIoError::BounceAllocation(len))?;
        storage.resize(total, 0);
        let start = storage.as_ptr().align_offset(8).min(7);
        Ok(BounceBuffer {
            storage,
            start,
            len: len_usize,
        })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Fills the buffer from the tensor's pieces.
    pub fn gather(&mut self, mem: &GuestMemoryMmap, parts: &[Segment]) -> Result<(), GuestIoError> {
        let mut at = 0usize;
        let buf = self.bytes_mut();
        for p in parts {
            let n = p.len as usize;
            let dst = buf
                .get_mut(at..at + n)
                .ok_or(GuestIoError::Memory { addr: p.addr })?;
            mem.read_slice(dst, GuestAddress(p.addr))
                .map_err(|_| GuestIoError::Memory { addr: p.addr })?;
            at += n;
        }
        Ok(())
    }

    /// Writes the first `count` bytes back to the tensor's pieces.
    pub fn scatter(
        &self,
        mem: &GuestMemoryMmap,
        parts: &[Segment],
        count: u64,
    ) -> Result<(), GuestIoError> {
        let mut left = count.min(self.len as u64) as usize;
        let mut at = 0usize;
        for p in parts {
            if left == 0 {
                break;
            }
            let n = (p.len as usize).min(left);
            mem.write_slice(&self.bytes()[at..at + n], GuestAddress(p.addr))
                .map_err(|_| GuestIoError::Memory { addr: p.addr })?;
            at += n;
            left -= n;
        }
        Ok(())
    }

    /// The buffer as a volatile slice for a backend.
    pub fn as_volatile(&mut self) -> VolatileSlice<'_> {
        VolatileSlice::from(self.bytes_mut())
    }
}

/// The slice a backend reads or writes for `place`: guest memory in place, or
/// `bounce` (which the caller allocated for a scattered place).
pub fn tensor_slice<'a>(
    mem: &'a GuestMemoryMmap,
    place: &TensorPlace,
    bounce: Option<&'a mut BounceBuffer>,
) -> Result<VolatileSlice<'a>, GuestIoError> {
    match (place, bounce) {
        (_, Some(b)) => Ok(b.as_volatile()),
        (TensorPlace::InPlace { addr, len }, None) => {
            let len = usize::try_from(*len).map_err(|_| GuestIoError::TooLarge(*len))?;
            mem.get_slice(GuestAddress(*addr), len)
                .map_err(|_| GuestIoError::Memory { addr: *addr })
        }
        (TensorPlace::Scattered(parts), None) => Err(GuestIoError::Memory {
            addr: parts.first().map(|p| p.addr).unwrap_or(0),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(list: &[(u64, u32)]) -> Vec<Segment> {
        list.iter()
            .map(|(addr, len)| Segment {
                addr: *addr,
                len: *len,
            })
            .collect()
    }

    #[test]
    fn bounce_buffers_are_bounded_and_fallible() {
        assert_eq!(
            BounceBuffer::new(MAX_BOUNCE_LEN + 1).err(),
            Some(GuestIoError::BounceOverLimit(MAX_BOUNCE_LEN + 1))
        );
        assert_eq!(
            BounceBuffer::new(u64::MAX).err(),
            Some(GuestIoError::BounceOverLimit(u64::MAX))
        );
        let b = BounceBuffer::new(4096).unwrap();
        assert_eq!(b.bytes().len(), 4096);
        assert!(b.bytes().iter().all(|&x| x == 0));
    }

    #[test]
    fn pieces_split_ranges_across_segments() {
        let s = segs(&[(0x1000, 10), (0x2000, 10), (0x3000, 10)]);
        assert_eq!(pieces(&s, 0, 10).unwrap(), segs(&[(0x1000, 10)]));
        assert_eq!(
            pieces(&s, 5, 20).unwrap(),
            segs(&[(0x1005, 5), (0x2000, 10), (0x3000, 5)])
        );
        assert_eq!(pieces(&s, 29, 1).unwrap(), segs(&[(0x3009, 1)]));
        assert_eq!(pieces(&s, 30, 0).unwrap(), segs(&[]));
        assert!(matches!(
            pieces(&s, 25, 6),
            Err(GuestIoError::OutOfStream { stream_len: 30, .. })
        ));
        assert!(pieces(&s, u64::MAX, 2).is_err());
    }

    #[test]
    fn read_and_write_streams_and_tensor_places() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x4000),
        ])
        .unwrap();
        let s = segs(&[(0x100, 4), (0x200, 4), (0x3ffc, 4), (0x4000, 4)]);
        write_stream(&mem, &s, 2, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
        let mut back = [0u8; 16];
        read_stream(&mem, &s, 0, &mut back).unwrap();
        assert_eq!(back, [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0, 0]);

        // One segment, aligned: in place. Misaligned for 4-byte elements: scattered.
        assert_eq!(
            TensorPlace::locate(&mem, &s, 0, 4, 4).unwrap(),
            TensorPlace::InPlace {
                addr: 0x100,
                len: 4
            }
        );
        assert!(matches!(
            TensorPlace::locate(&mem, &s, 2, 2, 4).unwrap(),
            TensorPlace::Scattered(_)
        ));
        // Two non-adjacent segments: scattered; adjacent but across regions: scattered.
        assert!(matches!(
            TensorPlace::locate(&mem, &s, 0, 8, 1).unwrap(),
            TensorPlace::Scattered(_)
        ));
        let across = TensorPlace::locate(&mem, &s, 8, 8, 1).unwrap();
        assert_eq!(
            across,
            TensorPlace::Scattered(segs(&[(0x3ffc, 4), (0x4000, 4)]))
        );
        // Adjacent segments inside one region: in place.
        let adj = segs(&[(0x100, 4), (0x104, 4)]);
        assert_eq!(
            TensorPlace::locate(&mem, &adj, 0, 8, 4).unwrap(),
            TensorPlace::InPlace {
                addr: 0x100,
                len: 8
            }
        );

        // Bounce buffers gather and scatter only what is asked.
        let TensorPlace::Scattered(parts) = across else {
            unreachable!()
        };
        let mut b = BounceBuffer::new(8).unwrap();
        assert_eq!(b.bytes().as_ptr() as usize % 8, 0);
        b.gather(&mem, &parts).unwrap();
        assert_eq!(b.bytes(), &[7, 8, 9, 10, 0, 0, 0, 0]);
        b.bytes_mut()
            .copy_from_slice(&[20, 21, 22, 23, 24, 25, 26, 27]);
        b.scatter(&mem, &parts, 5).unwrap();
        read_stream(&mem, &s, 8, &mut back[..8]).unwrap();
        assert_eq!(&back[..8], &[20, 21, 22, 23, 24, 0, 0, 0]);
    }
}
