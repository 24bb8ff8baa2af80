//! Wire format of the ai_infer virtio device, as specified in `docs/ai_infer.md`.
//!
//! This crate is the single definition of the protocol shared by the host daemon
//! (`ai-inferd`, the device) and the guest agent (the driver): constants, enums,
//! structure layouts with explicit little-endian encode/decode, and the stateless
//! validation every request goes through. It has no host-only dependencies and no
//! `unsafe`, so it builds for the guest as well.
//!
//! Every `decode` treats its input as hostile: it bounds-checks every read, rejects
//! unknown enum values and non-zero reserved fields, and never allocates according to
//! an unchecked count. Every [`ProtocolError`] maps to the [`Status`] a device puts in
//! the response of the request that caused it.
//!
//! A device handles a chain roughly like this:
//!
//! ```
//! use ai_infer_protocol::{ChainLayout, DeviceConfig, DType, Request, ResponseHeader, TensorDesc};
//!
//! # fn main() -> Result<(), ai_infer_protocol::ProtocolError> {
//! let config = DeviceConfig::default();
//! // What a driver would have put in the device-readable descriptors...
//! let req = Request::infer(
//!     42,
//!     7,
//!     vec![TensorDesc::input(DType::F32, &[1, 4])?],
//!     vec![TensorDesc::output(DType::F32, &[1, 2], 8)?],
//! )?;
//! let mut readable = vec![0u8; req.encoded_len()];
//! req.encode(&mut readable)?;
//!
//! // ...and what the device does with a copy of those bytes.
//! let parsed = Request::parse(&readable, &config)?;
//! let layout = ChainLayout::from_chain(&parsed, 40 + 2 * 80 + 16, 8 + 80 + 48)?;
//! assert_eq!(layout.response.offset, 88);
//! let resp = ResponseHeader::new(ai_infer_protocol::Status::Ok, parsed.header.request_id);
//! assert_eq!(resp.request_id, 42);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
pub mod consts;
mod dtype;
mod error;
mod layout;
mod models;
mod opcode;
mod request;
mod response;
mod spec;
mod status;
mod tensor;
mod trace;
/// The virtio-pci transport layout ai_infer uses (`docs/ai_infer.md` §1).
pub use virtio_pci_layout as virtio_pci;
mod wire;

pub use config::{negotiate_features, DeviceConfig};
pub use consts::*;
pub use dtype::DType;
pub use error::{ChainPart, ProtocolError};
pub use layout::{response_range, ByteRange, ChainLayout};
pub use models::{ModelInfo, ModelList};
pub use opcode::{Opcode, PriorityClass};
pub use request::{Request, RequestHeader};
pub use response::{Response, ResponseHeader};
pub use spec::{check_model_name, DimRange, TensorSpec};
pub use status::{CancelOutcome, Status};
pub use tensor::{Direction, Shape, TensorDesc};
pub use trace::{latency_bucket, latency_bucket_bounds_ns, TraceCounters};
