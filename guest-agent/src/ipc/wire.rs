//! Messages between agent clients and the agent daemon, over its unix socket.
//!
//! Frames are `le32 length, le32 kind, body`. Requests and responses reuse the
//! ai_infer encodings (`Request`, `Response`, `ModelList`, `TraceCounters`,
//! `DeviceConfig`); around them only what the daemon needs to find the client's
//! tensors: their offsets in the shared memory the daemon gave this client.

use std::io::{Read, Write};

use ai_infer_protocol::{DeviceConfig, ProtocolError, Request, TENSOR_DESC_LEN};
use thiserror::Error;

use crate::dma::Segment;

/// Version of this socket protocol, sent in HELLO.
pub const IPC_VERSION: u32 = 1;
/// Largest frame accepted (a MODELS list of 1024 full models is about 5.6 MB).
pub const MAX_FRAME: usize = 16 << 20;

/// Longest frame a client sends (HELLO, ATTACH, an INFER of 16+16 tensors: under 3 KiB):
/// the daemon reads nothing longer from a client.
pub const MAX_REQUEST_FRAME: usize = 16 << 10;

/// Errors of the socket protocol.
#[derive(Debug, Error)]
pub enum WireError {
    /// Reading or writing the socket failed.
    #[error("Agent socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// A frame longer than [`MAX_FRAME`] or shorter than its kind.
    #[error("Agent socket frame of {0} bytes is out of range")]
    FrameLength(usize),
    /// A frame that does not parse.
    #[error("Malformed agent message: {0}")]
    Malformed(String),
    /// An ai_infer structure inside a message does not parse.
    #[error("Malformed ai_infer structure in agent message: {0}")]
    Protocol(#[from] ProtocolError),
}

/// Message kinds.
pub mod kind {
    /// Client: open a session (`le32 version, le64 bytes of shared memory`).
    pub const HELLO: u32 = 1;
    /// Client: join an existing session from another connection (`le64 token`).
    pub const ATTACH: u32 = 2;
    /// Client: run a request (`Request` bytes, then `le64` offset per tensor).
    pub const INFER: u32 = 3;
    /// Client: list models.
    pub const MODELS: u32 = 4;
    /// Client: read counters.
    pub const TRACE: u32 = 5;
    /// Client: cancel (`le64 request id`).
    pub const CANCEL: u32 = 6;
    /// Daemon: the session (`le64 token, le64 length, le64 page size, config,
    /// le32 count, (le64 start, le64 end) per segment`), memory descriptor attached
    /// to HELLO replies.
    pub const SESSION: u32 = 101;
    /// Daemon: INFER result (`Response` bytes, request id = the client's).
    pub const INFER_DONE: u32 = 103;
    /// Daemon: `ModelList` bytes.
    pub const MODELS_DONE: u32 = 104;
    /// Daemon: `TraceCounters` bytes, then the daemon's guest counters as `le64`s.
    pub const TRACE_DONE: u32 = 105;
    /// Daemon: `le32` CANCEL outcome.
    pub const CANCEL_DONE: u32 = 106;
    /// Daemon: the request failed (`le32 status or 0, UTF-8 message`).
    pub const ERROR: u32 = 199;
}

/// A frame: kind and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// One of [`kind`].
    pub kind: u32,
    /// The body.
    pub body: Vec<u8>,
}

impl Frame {
    /// A frame of `kind` with an empty body.
    pub fn new(kind: u32) -> Self {
        Frame {
            kind,
            body: Vec::new(),
        }
    }

    /// Appends a little-endian `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.body.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.body.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.body.extend_from_slice(b);
        self
    }

    /// The wire form: length, kind, body.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let len = 4 + self.body.len();
        if len > MAX_FRAME {
            return Err(WireError::FrameLength(len));
        }
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), WireError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Reads the rest of a frame whose 4-byte length prefix was already read; frames
    /// longer than `max` bytes (at most [`MAX_FRAME`]) are refused before allocating.
    pub fn read_after_length(
        len_bytes: [u8; 4],
        r: &mut impl Read,
        max: usize,
    ) -> Result<Self, WireError> {
        let len = u32::from_le_bytes(len_bytes) as usize;
        if !(4..=max.min(MAX_FRAME)).contains(&len) {
            return Err(WireError::FrameLength(len));
        }
        let mut kind = [0u8; 4];
        r.read_exact(&mut kind)?;
        let mut body = vec![0u8; len - 4];
        r.read_exact(&mut body)?;
        Ok(Frame {
            kind: u32::from_le_bytes(kind),
            body,
        })
    }

    /// Reads one frame of at most `max` bytes.
    pub fn read_from(r: &mut impl Read, max: usize) -> Result<Self, WireError> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        Self::read_after_length(len, r, max)
    }

    /// A reader over the body.
    pub fn reader(&self) -> BodyReader<'_> {
        BodyReader {
            buf: &self.body,
            pos: 0,
        }
    }
}

/// Bounds-checked reader of a frame body.
pub struct BodyReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BodyReader<'a> {
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| {
                WireError::Malformed(format!(
                    "body of {} bytes ends before {n} more at {}",
                    self.buf.len(),
                    self.pos
                ))
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails unless everything was read.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.pos != self.buf.len() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// What the daemon tells a client about its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Token to attach further connections.
    pub token: u64,
    /// Bytes of shared memory.
    pub pool_len: u64,
    /// Its page size.
    pub page_size: u64,
    /// The device's limits.
    pub config: DeviceConfig,
    /// Physically contiguous runs of the memory.
    pub segments: Vec<Segment>,
}

/// Most segments a session reply may list (one per page of a 1 GiB session).
const MAX_SEGMENTS: u32 = 512;

impl SessionInfo {
    /// The SESSION frame.
    pub fn to_frame(&self) -> Result<Frame, WireError> {
        let mut cfg = [0u8; DeviceConfig::LEN];
        self.config.encode(&mut cfg)?;
        let mut f = Frame::new(kind::SESSION)
            .u64(self.token)
            .u64(self.pool_len)
            .u64(self.page_size)
            .bytes(&cfg)
            .u32(self.segments.len() as u32);
        for s in &self.segments {
            f = f.u64(s.start as u64).u64(s.end as u64);
        }
        Ok(f)
    }

    /// Parses a SESSION frame.
    pub fn from_frame(f: &Frame) -> Result<Self, WireError> {
        let mut r = f.reader();
        let token = r.u64()?;
        let pool_len = r.u64()?;
        let page_size = r.u64()?;
        let config = DeviceConfig::decode(r.bytes(DeviceConfig::LEN)?)?;
        config.validate()?;
        let n = r.u32()?;
        if n > MAX_SEGMENTS {
            return Err(WireError::Malformed(format!("{n} segments")));
        }
        let mut segments = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let start = usize::try_from(r.u64()?)
                .map_err(|_| WireError::Malformed("segment start".into()))?;
            let end = usize::try_from(r.u64()?)
                .map_err(|_| WireError::Malformed("segment end".into()))?;
            segments.push(Segment { start, end });
        }
        r.finish()?;
        Ok(SessionInfo {
            token,
            pool_len,
            page_size,
            config,
            segments,
        })
    }
}

/// An INFER message: the request and where each tensor is in the shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InferMessage {
    /// The request (ids and descriptors as the client built them).
    pub request: Request,
    /// Offset of each tensor (inputs, then outputs) in the client's shared memory.
    pub offsets: Vec<u64>,
}

impl InferMessage {
    /// The INFER frame.
    pub fn to_frame(&self) -> Result<Frame, WireError> {
        let mut req = vec![0u8; self.request.encoded_len()];
        self.request.encode(&mut req)?;
        let mut f = Frame::new(kind::INFER).bytes(&req);
        for o in &self.offsets {
            f = f.u64(*o);
        }
        Ok(f)
    }

    /// Parses an INFER frame (the request's layout only; the daemon validates it
    /// against the device limits).
    pub fn from_frame(f: &Frame) -> Result<Self, WireError> {
        let request = Request::decode(&f.body)?;
        let n = request.inputs.len() + request.outputs.len();
        let mut r = f.reader();
        r.bytes(request.encoded_len())?;
        let offsets = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        debug_assert_eq!(request.encoded_len(), 40 + n * TENSOR_DESC_LEN);
        Ok(InferMessage { request, offsets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ai_infer_protocol::{DType, TensorDesc};

    #[test]
    fn frames_round_trip_and_reject_bad_lengths() {
        let f = Frame::new(kind::CANCEL).u64(42);
        let bytes = f.encode().unwrap();
        assert_eq!(bytes.len(), 4 + 4 + 8);
        assert_eq!(Frame::read_from(&mut &bytes[..], MAX_FRAME).unwrap(), f);
        let mut r = f.reader();
        assert_eq!(r.u64().unwrap(), 42);
        assert!(r.u32().is_err());
        for bad in [0u32, 3, (MAX_FRAME + 1) as u32] {
            let b = bad.to_le_bytes();
            assert!(matches!(
                Frame::read_from(&mut &b[..], MAX_FRAME),
                Err(WireError::FrameLength(_))
            ));
        }
        // Longer than the reader's limit: refused before the body is read.
        assert!(matches!(
            Frame::read_from(&mut &bytes[..], 8),
            Err(WireError::FrameLength(12))
        ));
        // Truncated body.
        assert!(matches!(
            Frame::read_from(&mut &bytes[..10], MAX_FRAME),
            Err(WireError::Io(_))
        ));
    }

    #[test]
    fn session_and_infer_messages_round_trip() {
        let s = SessionInfo {
            token: 7,
            pool_len: 4 << 20,
            page_size: 2 << 20,
            config: DeviceConfig::default(),
            segments: vec![
                Segment {
                    start: 0,
                    end: 2 << 20,
                },
                Segment {
                    start: 2 << 20,
                    end: 4 << 20,
                },
            ],
        };
        assert_eq!(SessionInfo::from_frame(&s.to_frame().unwrap()).unwrap(), s);
        let mut bad = s.to_frame().unwrap();
        bad.body.push(0);
        assert!(SessionInfo::from_frame(&bad).is_err());

        let m = InferMessage {
            request: Request::infer(
                9,
                1,
                vec![TensorDesc::input(DType::U8, &[5]).unwrap()],
                vec![TensorDesc::output(DType::F32, &[1, 4], 16).unwrap()],
            )
            .unwrap(),
            offsets: vec![0, 4096],
        };
        let f = m.to_frame().unwrap();
        assert_eq!(InferMessage::from_frame(&f).unwrap(), m);
        let mut short = f.clone();
        short.body.truncate(short.body.len() - 1);
        assert!(InferMessage::from_frame(&short).is_err());
    }
}
