//! Gathering a transmit chain into one frame (virtio 1.2 §5.1.6.2).
//!
//! A pure function over guest memory and one descriptor chain, so the worker, the unit
//! tests and a fuzz target share it. The guest is hostile: every descriptor is checked
//! and nothing is read outside guest memory or written outside the caller's buffer.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

use super::{MAX_FRAME_LEN, VNET_HDR_LEN};

/// Why a transmit chain is dropped instead of sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxFrameError {
    /// Transmit buffers are only read by the device.
    #[error("transmit descriptor {index} of the chain is device-writable")]
    WritableDescriptor {
        /// Position in the chain.
        index: usize,
    },
    /// A buffer is not (entirely) inside guest memory.
    #[error("transmit buffer at {addr:#x} ({len} bytes) is not inside guest memory")]
    OutsideMemory {
        /// Guest-physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain ends on a descriptor still flagged NEXT: a bad index, a loop or an
    /// unreadable descriptor.
    #[error("transmit chain is broken after {descriptors} descriptors")]
    BrokenChain {
        /// Descriptors read before it broke.
        descriptors: usize,
    },
    /// More than a frame can be.
    #[error("transmit frame is larger than {MAX_FRAME_LEN} bytes")]
    TooLarge,
    /// Not even a virtio-net header.
    #[error("transmit frame of {0} bytes is shorter than the {VNET_HDR_LEN}-byte header")]
    TooShort(usize),
}

impl TxFrameError {
    /// Whether the frame was dropped for its size (the rest are malformed chains).
    pub fn is_oversize(&self) -> bool {
        matches!(self, TxFrameError::TooLarge)
    }
}

/// Copies the device-readable buffers of `chain` into `buf`, in order, as one frame
/// (virtio-net header then packet) and returns its length.
///
/// Fails, without reading past what it checked, on a device-writable descriptor, a
/// buffer outside `mem`, a broken chain, a frame larger than `buf` or
/// [`MAX_FRAME_LEN`], or one shorter than the header. `buf` may be partly overwritten
/// on failure.
pub fn gather_tx_frame<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    buf: &mut [u8],
) -> Result<usize, TxFrameError> {
    let cap = buf.len().min(MAX_FRAME_LEN);
    let mut len = 0usize;
    let mut descriptors = 0usize;
    let mut ends_with_next = false;
    for desc in chain {
        ends_with_next = desc.has_next();
        if desc.is_write_only() {
            return Err(TxFrameError::WritableDescriptor { index: descriptors });
        }
        descriptors += 1;
        let dlen = usize::try_from(desc.len()).map_err(|_| TxFrameError::TooLarge)?;
        let end = len
            .checked_add(dlen)
            .filter(|&end| end <= cap)
            .ok_or(TxFrameError::TooLarge)?;
        let dst = buf.get_mut(len..end).ok_or(TxFrameError::TooLarge)?;
        mem.read_slice(dst, desc.addr())
            .map_err(|_| TxFrameError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            })?;
        len = end;
    }
    if descriptors == 0 || ends_with_next {
        return Err(TxFrameError::BrokenChain { descriptors });
    }
    if len < VNET_HDR_LEN {
        return Err(TxFrameError::TooShort(len));
    }
    Ok(len)
}
