//! Filling a receive chain with (part of) a frame (virtio 1.2 §5.1.6.3-4).
//!
//! A pure function over guest memory and one descriptor chain, so the worker, the unit
//! tests and a fuzz target share it. Only the chain's device-writable buffers are
//! written, each range checked to lie in guest memory before any byte is written.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Why a receive chain cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxBufferError {
    /// Receive buffers are only written by the device.
    #[error("receive descriptor {index} of the chain is device-readable")]
    ReadOnlyDescriptor {
        /// Position in the chain.
        index: usize,
    },
    /// A buffer is not (entirely) inside guest memory.
    #[error("receive buffer at {addr:#x} ({len} bytes) is not inside guest memory")]
    OutsideMemory {
        /// Guest-physical address of the part to write.
        addr: u64,
        /// Bytes to write there.
        len: usize,
    },
    /// The chain ends on a descriptor still flagged NEXT: a bad index, a loop or an
    /// unreadable descriptor.
    #[error("receive chain is broken after {descriptors} descriptors")]
    BrokenChain {
        /// Descriptors read before it broke.
        descriptors: usize,
    },
}

/// Writes `data` into the device-writable buffers of `chain`, starting `offset` bytes
/// into them, and returns how many bytes of `data` fit (less than `data.len()` when the
/// chain is too small).
///
/// Descriptors past the last one needed are not looked at. On an error some of `data`
/// may already be in the chain's buffers, never anywhere else.
pub fn write_rx_chain<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    offset: usize,
    data: &[u8],
) -> Result<usize, RxBufferError> {
    let mut skip = offset;
    let mut written = 0usize;
    let mut descriptors = 0usize;
    let mut ends_with_next = false;
    for desc in chain {
        ends_with_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(RxBufferError::ReadOnlyDescriptor { index: descriptors });
        }
        descriptors += 1;
        let dlen = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(data.len() - written);
        let outside = || RxBufferError::OutsideMemory {
            addr: desc.addr().0.wrapping_add(skip as u64),
            len: n,
        };
        let addr = desc
            .addr()
            .0
            .checked_add(skip as u64)
            .map(GuestAddress)
            .ok_or_else(outside)?;
        if !mem.check_range(addr, n, Permissions::Write) {
            return Err(outside());
        }
        let src = data.get(written..written + n).ok_or_else(outside)?;
        mem.write_slice(src, addr).map_err(|_| outside())?;
        written += n;
        skip = 0;
        if written == data.len() {
            return Ok(written);
        }
    }
    if descriptors == 0 || ends_with_next {
        return Err(RxBufferError::BrokenChain { descriptors });
    }
    Ok(written)
}
