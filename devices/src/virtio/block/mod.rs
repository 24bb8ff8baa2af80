//! virtio-blk on a raw image file (virtio 1.2 §5.2).
//!
//! One request queue served on the device's own worker thread ([`crate::virtio::worker`]):
//! requests are parsed and checked by [`parse_request`] (a pure function over guest
//! memory, so it can be fuzzed), then run with positional I/O straight between the
//! image and guest memory. An optional token-bucket
//! [`RateLimiter`](crate::rate_limiter::RateLimiter) charges each request
//! one op and its data bytes before it runs; while it is blocked the queue waits (no
//! request is dropped) and the worker resumes on the limiter's timer. The backing file
//! and the limits can be changed while the device runs.

mod device;
mod disk;
mod request;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use device::{Block, BlockMetrics, QUEUE_MAX_SIZE};
pub use request::{
    parse_request, Buffer, DiskLimits, Operation, ParseError, Request, RequestError, HEADER_LEN,
    ID_LEN, MAX_CHAIN_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE,
    SEGMENT_LEN,
};

use crate::rate_limiter::{RateLimiterConfig, RateLimiterError};

/// Errors of setting up or changing a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened (missing, not permitted...).
    #[error("Cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A read-write drive on an image that is not writable.
    #[error("Disk image {} is not writable but the drive is not read_only: set read_only = true or make the file writable", path.display())]
    ReadOnlyFile {
        /// The image.
        path: PathBuf,
    },
    /// The image's size cannot be read.
    #[error("Cannot get the size of disk image {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A serial longer than GET_ID can return.
    #[error("Serial {serial:?} is {} bytes, more than the {ID_LEN} GET_ID returns", serial.len())]
    SerialTooLong {
        /// The serial.
        serial: String,
    },
    /// An invalid rate limiter configuration.
    #[error("Invalid rate limiter for drive {id}: {source}")]
    RateLimiter {
        /// The drive.
        id: String,
        /// What is wrong.
        #[source]
        source: RateLimiterError,
    },
    /// The rate limiter's timer cannot be created.
    #[error("Cannot create the rate limiter of drive {id}: {source}")]
    RateLimiterTimer {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The drive's worker thread cannot be started.
    #[error("Cannot start the worker thread of drive {id}: {source}")]
    Thread {
        /// The drive.
        id: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A drive as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Name of the drive (thread name, logs, API).
    pub id: String,
    /// The raw image (a regular file or a block device).
    pub path: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// What GET_ID returns, at most 20 bytes; default: `id` truncated to 20 bytes.
    pub serial: Option<String>,
    /// Limits on bytes and requests.
    pub rate_limiter: Option<RateLimiterConfig>,
}
