//! The virtio-vsock packet: a 44-byte little-endian header (`struct virtio_vsock_hdr`,
//! virtio 1.2 §5.10.6) followed by `len` payload bytes.
//!
//! Parsing is a pure function of guest memory and one descriptor chain, so it can be
//! fuzzed on its own: it never trusts `len`, the descriptor lengths or their addresses.

use std::io::{self, Read, Write};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HEADER_SIZE: usize = 44;
const HEADER_SIZE_U32: u32 = 44;
const _: () = assert!(HEADER_SIZE_U32 as usize == HEADER_SIZE);
/// Largest payload the device accepts or sends in one packet (Linux uses the same bound).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;

/// Stream sockets, the only socket type this device offers.
pub const TYPE_STREAM: u16 = 1;

/// Operations (`op`).
pub const OP_REQUEST: u16 = 1;
/// Accepts a connection request.
pub const OP_RESPONSE: u16 = 2;
/// Resets (refuses or aborts) a connection.
pub const OP_RST: u16 = 3;
/// One side will no longer receive and/or send (see the `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Carries stream data.
pub const OP_RW: u16 = 5;
/// Tells the peer the sender's `buf_alloc` and `fwd_cnt`.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for an `OP_CREDIT_UPDATE`.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `OP_SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `OP_SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Errors reading or writing a packet in guest buffers.
#[derive(Debug, Error)]
pub enum PacketError {
    /// The chain's descriptors cannot be mapped (outside guest memory, a loop, a bad
    /// indirect table, ...).
    #[error("Descriptor chain is invalid: {0}")]
    Chain(virtio_queue::Error),
    /// The readable part of a tx chain is shorter than a header.
    #[error("Packet header needs {HEADER_SIZE} bytes, the chain has {0}")]
    HeaderTooShort(usize),
    /// The header's `len` is above [`MAX_PAYLOAD`].
    #[error("Packet payload length {} is above the maximum of {MAX_PAYLOAD}", .0.len)]
    PayloadTooLong(PacketHeader),
    /// The chain holds fewer payload bytes than the header's `len`.
    #[error("Packet payload length {} is more than the {available} bytes the chain holds", .header.len)]
    PayloadShort {
        /// The header.
        header: PacketHeader,
        /// Readable bytes after the header.
        available: usize,
    },
    /// The writable part of an rx chain cannot hold the packet.
    #[error("Rx buffer of {available} bytes cannot hold a packet of {needed} bytes")]
    RxBufferTooSmall {
        /// Bytes needed (header and payload).
        needed: usize,
        /// Writable bytes in the chain.
        available: usize,
    },
    /// A payload for the guest is longer than [`MAX_PAYLOAD`].
    #[error("Rx payload of {0} bytes is above the maximum of {MAX_PAYLOAD}")]
    RxPayloadTooLong(usize),
    /// Copying from or to guest memory failed.
    #[error("Cannot access the packet in guest memory: {0}")]
    Memory(io::Error),
}

impl PacketError {
    /// The header of a packet that was readable but had a bad length: it still names
    /// the connection the packet was meant for.
    pub fn header(&self) -> Option<&PacketHeader> {
        match self {
            Self::PayloadTooLong(header) | Self::PayloadShort { header, .. } => Some(header),
            _ => None,
        }
    }
}

/// `struct virtio_vsock_hdr`, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// Receive buffer space the sender has for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes the wire layout.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(v)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet the guest put on the tx queue: its header and a reader positioned at its
/// payload, which holds at least `header.len` bytes.
pub struct TxPacket<'a> {
    /// The decoded header.
    pub header: PacketHeader,
    /// The payload (further readable bytes past `header.len` are ignored).
    pub payload: Reader<'a>,
}

impl TxPacket<'_> {
    /// Copies the `header.len` payload bytes into `buf`, which must be at least that long
    /// (`MAX_PAYLOAD` is enough).
    pub fn read_payload(&mut self, buf: &mut [u8]) -> Result<usize, PacketError> {
        let len = self.header.len as usize;
        let dst = buf
            .get_mut(..len)
            .ok_or(PacketError::PayloadTooLong(self.header))?;
        self.payload.read_exact(dst).map_err(PacketError::Memory)?;
        Ok(len)
    }
}

/// Decodes the packet in a tx descriptor chain. Checks that the header is complete,
/// that `len` is at most [`MAX_PAYLOAD`] and that the chain holds `len` payload bytes;
/// the header's other fields are the caller's to judge.
pub fn read_tx_packet<'a, M>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<TxPacket<'a>, PacketError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory + Sized,
{
    let mut reader = Reader::new(mem, chain).map_err(PacketError::Chain)?;
    let available = reader.available_bytes();
    if available < HEADER_SIZE {
        return Err(PacketError::HeaderTooShort(available));
    }
    let mut raw = [0u8; HEADER_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Memory)?;
    let header = PacketHeader::from_bytes(&raw);
    if header.len > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLong(header));
    }
    let available = reader.available_bytes();
    if available < header.len as usize {
        return Err(PacketError::PayloadShort { header, available });
    }
    Ok(TxPacket {
        header,
        payload: reader,
    })
}

/// The writable buffers of one rx descriptor chain, where the device puts one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Maps the writable descriptors of `chain`.
    pub fn new<M>(mem: &'a GuestMemoryMmap, chain: DescriptorChain<M>) -> Result<Self, PacketError>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory + Sized,
    {
        let writer = Writer::new(mem, chain).map_err(PacketError::Chain)?;
        Ok(Self { writer })
    }

    /// Payload bytes a packet in this buffer can carry (0 if even a header does not fit).
    pub fn payload_capacity(&self) -> usize {
        self.writer.available_bytes().saturating_sub(HEADER_SIZE)
    }

    /// Writes `header` (with `len` set to the payload's length) and `payload`; returns the
    /// bytes written. Nothing is written unless the whole packet fits.
    pub fn write_packet(
        &mut self,
        header: &PacketHeader,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let available = self.writer.available_bytes();
        let needed = HEADER_SIZE + payload.len();
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or(PacketError::RxPayloadTooLong(payload.len()))?;
        if needed > available {
            return Err(PacketError::RxBufferTooSmall { needed, available });
        }
        let header = PacketHeader { len, ..*header };
        self.writer
            .write_all(&header.to_bytes())
            .and_then(|()| self.writer.write_all(payload))
            .map_err(PacketError::Memory)?;
        // `len` ≤ MAX_PAYLOAD: no overflow.
        Ok(HEADER_SIZE_U32 + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 5000,
            len: 17,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 0x40000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..30], &[1, 0]);
        assert_eq!(&b[30..32], &[5, 0]);
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&b), h);
    }
}
