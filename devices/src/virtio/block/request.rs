//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.2 §5.2.6).
//!
//! A request is a 16-byte header and, for some types, data in the device-readable part
//! of the chain, then data and a 1-byte status in the device-writable part; the status
//! is the last writable byte. The guest controls every field, so [`parse_request`]
//! checks each buffer against guest memory, the data direction and length for the
//! request type and the sector range against the disk before any I/O is done. It only
//! reads guest memory, so a fuzzer can drive it directly.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes per sector: the unit of `sector` fields and of the capacity, whatever the
/// advertised block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const SEGMENT_LEN: usize = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most sectors one DISCARD may cover (1 GiB): bounds the work of the zero-writing
/// fallback.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most sectors one WRITE_ZEROES may cover (1 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Most descriptors read from one chain. A chain is already bounded by the queue size
/// (and an indirect table by its length); a driver that follows `seg_max` never comes
/// close to this.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain is longer than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("Descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// No device-writable byte for the status.
    #[error("Descriptor chain has no device-writable byte for the status")]
    NoStatus,
    /// The status byte is not in guest memory.
    #[error("Status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    /// A buffer is not in guest memory.
    #[error("Buffer at {addr:#x} of {len} bytes is outside guest memory")]
    BufferOutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The device-readable part is shorter than the header.
    #[error("Device-readable part of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    HeaderTooShort(u64),
    /// Reading guest memory failed although the buffers were checked.
    #[error("Cannot read the request from guest memory")]
    Unreadable,
    /// Data in the device-readable part of a request that only returns data.
    #[error("Request type {request_type} has {len} unexpected device-readable data bytes")]
    UnexpectedReadable {
        /// Request type.
        request_type: u32,
        /// Extra bytes.
        len: u64,
    },
    /// Data in the device-writable part of a request that only sends data.
    #[error("Request type {request_type} has {len} unexpected device-writable data bytes")]
    UnexpectedWritable {
        /// Request type.
        request_type: u32,
        /// Extra bytes.
        len: u64,
    },
    /// Data length not a multiple of the sector size.
    #[error("Data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// `sector * 512 + len` does not fit in 64 bits.
    #[error("Sector {sector} with {len} bytes overflows")]
    SectorOverflow {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
    },
    /// The range goes past the end of the disk.
    #[error("Sector {sector} with {len} bytes is beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A request that changes a read-only disk.
    #[error("Request type {0} on a read-only disk")]
    ReadOnly(u32),
    /// The GET_ID buffer cannot hold the id.
    #[error("GET_ID buffer of {0} bytes is shorter than {ID_LEN}")]
    IdBufferTooSmall(u64),
    /// The DISCARD/WRITE_ZEROES data is not exactly one segment.
    #[error("DISCARD/WRITE_ZEROES data of {0} bytes is not one {SEGMENT_LEN}-byte segment")]
    SegmentCount(u64),
    /// Unknown flags in a DISCARD/WRITE_ZEROES segment (or unmap on DISCARD).
    #[error("Request type {request_type} has unsupported segment flags {flags:#x}")]
    UnsupportedFlags {
        /// Request type.
        request_type: u32,
        /// The segment's flags.
        flags: u32,
    },
    /// A DISCARD/WRITE_ZEROES segment covering more than the advertised maximum.
    #[error("Segment of {num_sectors} sectors exceeds the maximum of {max}")]
    TooManySectors {
        /// Sectors in the segment.
        num_sectors: u32,
        /// The advertised maximum.
        max: u32,
    },
}

impl RequestError {
    /// The status the driver gets for this error.
    pub fn status(&self) -> u8 {
        status_byte(match self {
            RequestError::UnsupportedFlags { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        })
    }
}

/// A `VIRTIO_BLK_S_*` constant as the byte the driver reads.
pub fn status_byte(status: u32) -> u8 {
    // The status codes are all below 256.
    u8::try_from(status).unwrap_or(u8::MAX)
}

/// A request that cannot be served: `status` is where the error status goes, `None`
/// when the chain has no usable status byte (it is then returned with length 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// Address of the status byte, if the chain has one in guest memory.
    pub status: Option<GuestAddress>,
    /// What is wrong.
    pub error: RequestError,
}

/// What the parser needs to know about the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// A guest buffer, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes (non-zero).
    pub len: u32,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read `len` bytes at `sector` into `data`.
    Read {
        /// First sector.
        sector: u64,
        /// Device-writable buffers.
        data: Vec<Buffer>,
        /// Their total length, a multiple of 512.
        len: u64,
    },
    /// Write `data` (`len` bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Device-readable buffers.
        data: Vec<Buffer>,
        /// Their total length, a multiple of 512.
        len: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the 20-byte id into `data` (exactly 20 bytes of buffers).
    GetId {
        /// Device-writable buffers.
        data: Vec<Buffer>,
    },
    /// Deallocate (or zero) a sector range.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
    },
    /// Zero a sector range, deallocating it if `unmap`.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
        /// Whether the range may be deallocated.
        unmap: bool,
    },
    /// A request type this device does not implement.
    Unsupported(u32),
}

impl Operation {
    /// The request type's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Read { .. } => "IN",
            Operation::Write { .. } => "OUT",
            Operation::Flush => "FLUSH",
            Operation::GetId { .. } => "GET_ID",
            Operation::Discard { .. } => "DISCARD",
            Operation::WriteZeroes { .. } => "WRITE_ZEROES",
            Operation::Unsupported(_) => "unsupported",
        }
    }
}

/// A checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub operation: Operation,
    /// Where the status byte goes (in guest memory).
    pub status: GuestAddress,
}

impl Request {
    /// Bytes moved between guest memory and the disk (what a bandwidth limit counts).
    pub fn data_len(&self) -> u64 {
        match &self.operation {
            Operation::Read { len, .. } | Operation::Write { len, .. } => *len,
            _ => 0,
        }
    }
}

fn total_len(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// Drops the first `n` bytes of `buffers` (all of them if shorter).
fn skip_front(buffers: &[Buffer], mut n: u64) -> Vec<Buffer> {
    let mut out = Vec::with_capacity(buffers.len());
    for b in buffers {
        let len = u64::from(b.len);
        if n >= len {
            n -= len;
            continue;
        }
        // `n < len <= u32::MAX`.
        let skip = u32::try_from(n).unwrap_or(0);
        n = 0;
        out.push(Buffer {
            addr: b.addr.unchecked_add(u64::from(skip)),
            len: b.len - skip,
        });
    }
    out
}

/// Keeps the first `n` bytes of `buffers`.
fn take_front(buffers: &[Buffer], mut n: u64) -> Vec<Buffer> {
    let mut out = Vec::new();
    for b in buffers {
        if n == 0 {
            break;
        }
        let len = u64::from(b.len).min(n);
        n -= len;
        out.push(Buffer {
            addr: b.addr,
            // `len <= b.len`.
            len: u32::try_from(len).unwrap_or(b.len),
        });
    }
    out
}

/// Reads `buf.len()` bytes from the front of `buffers` (which hold at least that many).
fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    buffers: &[Buffer],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0;
    for b in buffers {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(b.len as usize);
        mem.read_slice(&mut buf[done..done + n], b.addr)
            .map_err(|_| RequestError::Unreadable)?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(RequestError::Unreadable)
    }
}

/// Checks that `len` bytes at `sector` lie on a disk of `capacity` sectors.
fn check_sectors(sector: u64, len: u64, capacity: u64) -> Result<(), RequestError> {
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len))
        .ok_or(RequestError::SectorOverflow { sector, len })?;
    if end > capacity.saturating_mul(SECTOR_SIZE) {
        return Err(RequestError::OutOfRange {
            sector,
            len,
            capacity,
        });
    }
    Ok(())
}

/// Parses and checks the request in `descriptors` (a chain's descriptors in order).
///
/// Reads at most [`MAX_CHAIN_DESCRIPTORS`] descriptors and only the header and segment
/// bytes of guest memory; writes nothing.
pub fn parse_request<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
    disk: &DiskLimits,
) -> Result<Request, ParseError> {
    let no_status = |error| ParseError {
        status: None,
        error,
    };

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut readable_after_writable = false;
    for (index, desc) in descriptors.into_iter().enumerate() {
        if index >= MAX_CHAIN_DESCRIPTORS {
            return Err(no_status(RequestError::TooManyDescriptors));
        }
        if desc.len() == 0 {
            continue;
        }
        let buffer = Buffer {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(buffer);
        } else {
            readable_after_writable |= !writable.is_empty();
            readable.push(buffer);
        }
    }

    // The status byte: the last writable byte, found before anything else is checked so
    // that every other error can be reported through it.
    let last = writable
        .pop()
        .ok_or_else(|| no_status(RequestError::NoStatus))?;
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or_else(|| no_status(RequestError::StatusOutsideMemory(u64::MAX)))?;
    if !mem.check_range(status, 1, Permissions::Write) {
        return Err(no_status(RequestError::StatusOutsideMemory(status.0)));
    }
    if last.len > 1 {
        writable.push(Buffer {
            addr: last.addr,
            len: last.len - 1,
        });
    }

    parse_body(mem, &readable, &writable, readable_after_writable, disk)
        .map(|operation| Request { operation, status })
        .map_err(|error| ParseError {
            status: Some(status),
            error,
        })
}

fn parse_body<M: GuestMemory + ?Sized>(
    mem: &M,
    readable: &[Buffer],
    writable: &[Buffer],
    readable_after_writable: bool,
    disk: &DiskLimits,
) -> Result<Operation, RequestError> {
    if readable_after_writable {
        return Err(RequestError::ReadableAfterWritable);
    }
    for (buffers, access) in [
        (readable, Permissions::Read),
        (writable, Permissions::Write),
    ] {
        for b in buffers {
            if !mem.check_range(b.addr, b.len as usize, access) {
                return Err(RequestError::BufferOutsideMemory {
                    addr: b.addr.0,
                    len: b.len,
                });
            }
        }
    }

    let readable_len = total_len(readable);
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let mut header = [0u8; HEADER_LEN];
    gather(mem, readable, &mut header)?;
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let in_data = skip_front(readable, HEADER_LEN as u64);
    let in_len = readable_len - HEADER_LEN as u64;
    let out_len = total_len(writable);

    let no_readable = || match in_len {
        0 => Ok(()),
        len => Err(RequestError::UnexpectedReadable { request_type, len }),
    };
    let no_writable = || match out_len {
        0 => Ok(()),
        len => Err(RequestError::UnexpectedWritable { request_type, len }),
    };
    let writes_disk = || match disk.read_only {
        true => Err(RequestError::ReadOnly(request_type)),
        false => Ok(()),
    };

    match request_type {
        VIRTIO_BLK_T_IN => {
            no_readable()?;
            if !out_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(out_len));
            }
            check_sectors(sector, out_len, disk.capacity_sectors)?;
            Ok(Operation::Read {
                sector,
                data: writable.to_vec(),
                len: out_len,
            })
        }
        VIRTIO_BLK_T_OUT => {
            writes_disk()?;
            no_writable()?;
            if !in_len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(in_len));
            }
            check_sectors(sector, in_len, disk.capacity_sectors)?;
            Ok(Operation::Write {
                sector,
                data: in_data,
                len: in_len,
            })
        }
        // Data in a FLUSH is a driver bug the spec only discourages: ignored.
        VIRTIO_BLK_T_FLUSH => Ok(Operation::Flush),
        VIRTIO_BLK_T_GET_ID => {
            no_readable()?;
            if out_len < ID_LEN as u64 {
                return Err(RequestError::IdBufferTooSmall(out_len));
            }
            Ok(Operation::GetId {
                data: take_front(writable, ID_LEN as u64),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            writes_disk()?;
            no_writable()?;
            if in_len != SEGMENT_LEN as u64 {
                return Err(RequestError::SegmentCount(in_len));
            }
            let mut segment = [0u8; SEGMENT_LEN];
            gather(mem, &in_data, &mut segment)?;
            let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = segment;
            let seg_sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let (allowed_flags, max) = if request_type == VIRTIO_BLK_T_DISCARD {
                (0, MAX_DISCARD_SECTORS)
            } else {
                (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, MAX_WRITE_ZEROES_SECTORS)
            };
            if flags & !allowed_flags != 0 {
                return Err(RequestError::UnsupportedFlags {
                    request_type,
                    flags,
                });
            }
            if num_sectors > max {
                return Err(RequestError::TooManySectors { num_sectors, max });
            }
            check_sectors(
                seg_sector,
                u64::from(num_sectors) * SECTOR_SIZE,
                disk.capacity_sectors,
            )?;
            Ok(if request_type == VIRTIO_BLK_T_DISCARD {
                Operation::Discard {
                    sector: seg_sector,
                    num_sectors,
                }
            } else {
                Operation::WriteZeroes {
                    sector: seg_sector,
                    num_sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            })
        }
        other => Ok(Operation::Unsupported(other)),
    }
}
