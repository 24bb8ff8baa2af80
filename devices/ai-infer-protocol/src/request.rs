//! The request: a 40-byte header followed by tensor descriptors.

use crate::config::DeviceConfig;
use crate::consts::{MAX_TENSORS, REQUEST_HEADER_LEN, TENSOR_DESC_LEN};
use crate::error::ProtocolError;
use crate::opcode::{Opcode, PriorityClass};
use crate::tensor::{Direction, TensorDesc};
use crate::wire::{Reader, Writer};

/// The fixed request header (`virtio_ai_infer_req`), first bytes of every chain.
///
/// There is deliberately no tenant field: the device knows the tenant from the
/// vhost-user connection the chain arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// What to do.
    pub opcode: Opcode,
    /// Model to run (INFER only; 0 otherwise). Ids come from a MODELS response.
    pub model_id: u32,
    /// Driver-chosen id, echoed in the response and used by CANCEL.
    pub request_id: u64,
    /// Relative deadline in microseconds from when the device takes the chain from
    /// the available ring; 0 = none (INFER only).
    pub deadline_us: u64,
    /// The `request_id` to cancel (CANCEL only; 0 otherwise).
    pub cancel_id: u64,
    /// Number of input tensor descriptors following the header.
    pub num_inputs: u16,
    /// Number of output tensor descriptors following the inputs'.
    pub num_outputs: u16,
    /// Requested scheduling class (clamped to the tenant's ceiling).
    pub priority: PriorityClass,
}

impl RequestHeader {
    /// Size on the wire.
    pub const LEN: usize = REQUEST_HEADER_LEN;

    /// A header for `opcode` with every other field zero / default.
    pub fn new(opcode: Opcode, request_id: u64) -> Self {
        RequestHeader {
            opcode,
            model_id: 0,
            request_id,
            deadline_us: 0,
            cancel_id: 0,
            num_inputs: 0,
            num_outputs: 0,
            priority: PriorityClass::Normal,
        }
    }

    /// The request id of a possibly malformed header, so that even a rejected request
    /// gets its id echoed. `None` if the bytes do not reach that far.
    pub fn peek_request_id(buf: &[u8]) -> Option<u64> {
        let bytes = buf.get(8..16)?;
        let mut id = [0u8; 8];
        id.copy_from_slice(bytes);
        Some(u64::from_le_bytes(id))
    }

    /// Writes the 40-byte wire form; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut w = Writer::new(buf, "request header", Self::LEN)?;
        w.u32(self.opcode.into())?;
        w.u32(self.model_id)?;
        w.u64(self.request_id)?;
        w.u64(self.deadline_us)?;
        w.u64(self.cancel_id)?;
        w.u16(self.num_inputs)?;
        w.u16(self.num_outputs)?;
        w.u8(self.priority.into())?;
        w.u8(0)?; // flags: none defined
        w.u16(0)?; // reserved
        Ok(w.position())
    }

    /// Reads the first 40 bytes of `buf`. Checks the layout only (enum values, flags,
    /// reserved bytes); [`RequestHeader::validate`] checks the per-opcode rules.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "request header", Self::LEN)?;
        let opcode = Opcode::try_from(r.u32()?)?;
        let model_id = r.u32()?;
        let request_id = r.u64()?;
        let deadline_us = r.u64()?;
        let cancel_id = r.u64()?;
        let num_inputs = r.u16()?;
        let num_outputs = r.u16()?;
        let priority = PriorityClass::try_from(r.u8()?)?;
        let flags = r.u8()?;
        if flags != 0 {
            return Err(ProtocolError::UnsupportedFlags(flags));
        }
        r.reserved_u16("request.reserved")?;
        Ok(RequestHeader {
            opcode,
            model_id,
            request_id,
            deadline_us,
            cancel_id,
            num_inputs,
            num_outputs,
            priority,
        })
    }

    /// Per-opcode rules: fields an opcode does not use must be 0, so that a future
    /// version can give them a meaning; INFER needs a model and tensors both ways.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let op = self.opcode;
        let must_be_zero = |field: &'static str, value: u64| {
            if value == 0 {
                Ok(())
            } else {
                Err(ProtocolError::FieldNotAllowed {
                    field,
                    opcode: op,
                    value,
                })
            }
        };
        match op {
            Opcode::Infer => {
                if self.model_id == 0 {
                    return Err(ProtocolError::ZeroModelId);
                }
                must_be_zero("cancel_id", self.cancel_id)?;
                if self.num_inputs == 0 {
                    return Err(ProtocolError::NoTensors(Direction::Input));
                }
                if self.num_outputs == 0 {
                    return Err(ProtocolError::NoTensors(Direction::Output));
                }
            }
            Opcode::Models | Opcode::Trace | Opcode::Cancel => {
                must_be_zero("model_id", self.model_id.into())?;
                must_be_zero("deadline_us", self.deadline_us)?;
                if op != Opcode::Cancel {
                    must_be_zero("cancel_id", self.cancel_id)?;
                }
                must_be_zero("num_inputs", self.num_inputs.into())?;
                must_be_zero("num_outputs", self.num_outputs.into())?;
            }
        }
        Ok(())
    }
}

/// A whole request: the header and its input and output tensor descriptors, i.e. the
/// device-readable bytes of a chain up to the input data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// The header; its counts equal the lengths of `inputs` and `outputs`.
    pub header: RequestHeader,
    /// Input descriptors, in the order their data follows in the chain.
    pub inputs: Vec<TensorDesc>,
    /// Output descriptors, in the order their buffers appear in the chain.
    pub outputs: Vec<TensorDesc>,
}

fn count_u16(direction: Direction, count: usize) -> Result<u16, ProtocolError> {
    if count > MAX_TENSORS {
        return Err(ProtocolError::TooManyTensors {
            direction,
            count,
            max: MAX_TENSORS,
        });
    }
    // Fits: count <= MAX_TENSORS = 16.
    Ok(count as u16)
}

impl Request {
    /// An INFER request with normal priority and no deadline.
    pub fn infer(
        request_id: u64,
        model_id: u32,
        inputs: Vec<TensorDesc>,
        outputs: Vec<TensorDesc>,
    ) -> Result<Self, ProtocolError> {
        let mut header = RequestHeader::new(Opcode::Infer, request_id);
        header.model_id = model_id;
        header.num_inputs = count_u16(Direction::Input, inputs.len())?;
        header.num_outputs = count_u16(Direction::Output, outputs.len())?;
        Ok(Request {
            header,
            inputs,
            outputs,
        })
    }

    /// A MODELS request.
    pub fn models(request_id: u64) -> Self {
        Self::bare(RequestHeader::new(Opcode::Models, request_id))
    }

    /// A TRACE request.
    pub fn trace(request_id: u64) -> Self {
        Self::bare(RequestHeader::new(Opcode::Trace, request_id))
    }

    /// A CANCEL request for the in-flight INFER whose id is `target`.
    pub fn cancel(request_id: u64, target: u64) -> Self {
        let mut header = RequestHeader::new(Opcode::Cancel, request_id);
        header.cancel_id = target;
        Self::bare(header)
    }

    fn bare(header: RequestHeader) -> Self {
        Request {
            header,
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Sets the priority class.
    pub fn with_priority(mut self, priority: PriorityClass) -> Self {
        self.header.priority = priority;
        self
    }

    /// Sets the relative deadline in microseconds (0 = none).
    pub fn with_deadline_us(mut self, deadline_us: u64) -> Self {
        self.header.deadline_us = deadline_us;
        self
    }

    /// Bytes of header plus descriptors.
    pub fn encoded_len(&self) -> usize {
        REQUEST_HEADER_LEN + (self.inputs.len() + self.outputs.len()) * TENSOR_DESC_LEN
    }

    /// Writes the header and descriptors; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        for (direction, header, actual) in [
            (Direction::Input, self.header.num_inputs, self.inputs.len()),
            (
                Direction::Output,
                self.header.num_outputs,
                self.outputs.len(),
            ),
        ] {
            if usize::from(header) != actual {
                return Err(ProtocolError::HeaderCountMismatch {
                    direction,
                    header: header.into(),
                    actual,
                });
            }
        }
        let needed = self.encoded_len();
        if buf.len() < needed {
            return Err(ProtocolError::BufferTooSmall {
                what: "request",
                needed,
                got: buf.len(),
            });
        }
        let mut off = self.header.encode(buf)?;
        for desc in self.inputs.iter().chain(&self.outputs) {
            off += desc.encode(&mut buf[off..])?;
        }
        Ok(off)
    }

    /// Reads a header and its descriptors from the start of `buf` (trailing bytes,
    /// such as input data, are ignored). Counts above [`MAX_TENSORS`] are rejected
    /// before anything is allocated; descriptor errors carry the tensor's index.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let header = RequestHeader::decode(buf)?;
        let num_inputs = usize::from(header.num_inputs);
        let num_outputs = usize::from(header.num_outputs);
        count_u16(Direction::Input, num_inputs)?;
        count_u16(Direction::Output, num_outputs)?;
        let needed = REQUEST_HEADER_LEN + (num_inputs + num_outputs) * TENSOR_DESC_LEN;
        let mut r = Reader::new(buf, "request", needed)?;
        r.bytes(REQUEST_HEADER_LEN)?;
        let mut decode_all = |count: usize, first_index: usize| {
            (0..count)
                .map(|i| {
                    TensorDesc::decode(r.bytes(TENSOR_DESC_LEN)?)
                        .map_err(|e| ProtocolError::in_tensor(first_index + i, e))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let inputs = decode_all(num_inputs, 0)?;
        let outputs = decode_all(num_outputs, num_inputs)?;
        Ok(Request {
            header,
            inputs,
            outputs,
        })
    }

    /// Checks the request against the per-opcode rules and the limits a device
    /// advertises: counts, ranks, every descriptor, and total bytes each way.
    pub fn validate(&self, config: &DeviceConfig) -> Result<(), ProtocolError> {
        self.header.validate()?;
        let limits = [
            (
                Direction::Input,
                self.inputs.len(),
                config.max_input_tensors,
            ),
            (
                Direction::Output,
                self.outputs.len(),
                config.max_output_tensors,
            ),
        ];
        for (direction, count, max) in limits {
            if count > usize::from(max) {
                return Err(ProtocolError::TooManyTensors {
                    direction,
                    count,
                    max: max.into(),
                });
            }
        }
        let max_rank = usize::from(config.max_rank);
        let descs = self.inputs.iter().map(|d| (Direction::Input, d));
        let descs = descs.chain(self.outputs.iter().map(|d| (Direction::Output, d)));
        for (index, (direction, desc)) in descs.enumerate() {
            let check = || {
                if desc.shape.rank() > max_rank {
                    return Err(ProtocolError::RankTooLarge {
                        rank: desc.shape.rank(),
                        max: max_rank,
                    });
                }
                match direction {
                    Direction::Input => desc.validate_input(),
                    Direction::Output => desc.validate_output(),
                }
            };
            check().map_err(|e| ProtocolError::in_tensor(index, e))?;
        }
        check_total(Direction::Input, &self.inputs, config.max_input_bytes)?;
        check_total(Direction::Output, &self.outputs, config.max_output_bytes)?;
        Ok(())
    }

    /// [`Request::decode`] then [`Request::validate`]: what a device does with the
    /// device-readable bytes it copied out of guest memory.
    pub fn parse(buf: &[u8], config: &DeviceConfig) -> Result<Self, ProtocolError> {
        let req = Self::decode(buf)?;
        req.validate(config)?;
        Ok(req)
    }
}

/// Sum of `data_len` over `descs`, or `None` on overflow.
pub(crate) fn total_data_len(descs: &[TensorDesc]) -> Option<u64> {
    descs
        .iter()
        .try_fold(0u64, |acc, d| acc.checked_add(d.data_len))
}

fn check_total(direction: Direction, descs: &[TensorDesc], max: u64) -> Result<(), ProtocolError> {
    let total = total_data_len(descs).unwrap_or(u64::MAX);
    if total > max {
        return Err(ProtocolError::TotalBytesTooLarge {
            direction,
            total,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::status::Status;
    use crate::tensor::Shape;

    fn sample() -> Request {
        Request::infer(
            0x1122_3344_5566_7788,
            7,
            vec![
                TensorDesc::input(DType::I64, &[1, 17]).unwrap(),
                TensorDesc::input(DType::I64, &[1, 17]).unwrap(),
            ],
            vec![TensorDesc::output(DType::F32, &[0, 384], 1536).unwrap()],
        )
        .unwrap()
        .with_priority(PriorityClass::Interactive)
        .with_deadline_us(5000)
    }

    fn encoded(req: &Request) -> Vec<u8> {
        let mut buf = vec![0u8; req.encoded_len()];
        assert_eq!(req.encode(&mut buf), Ok(req.encoded_len()));
        buf
    }

    #[test]
    fn header_wire_layout_is_exact() {
        let b = encoded(&sample());
        assert_eq!(&b[0..4], &1u32.to_le_bytes(), "opcode");
        assert_eq!(&b[4..8], &7u32.to_le_bytes(), "model_id");
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[16..24], &5000u64.to_le_bytes(), "deadline_us");
        assert_eq!(&b[24..32], &[0; 8], "cancel_id");
        assert_eq!(&b[32..34], &2u16.to_le_bytes(), "num_inputs");
        assert_eq!(&b[34..36], &1u16.to_le_bytes(), "num_outputs");
        assert_eq!(b[36], 2, "priority");
        assert_eq!(&b[37..40], &[0; 3], "flags, reserved");
        assert_eq!(b.len(), 40 + 3 * 80);
        assert_eq!(
            RequestHeader::peek_request_id(&b),
            Some(0x1122_3344_5566_7788)
        );
        assert_eq!(RequestHeader::peek_request_id(&b[..15]), None);
    }

    #[test]
    fn round_trip_every_opcode() {
        let cfg = DeviceConfig::default();
        for req in [
            sample(),
            Request::models(1),
            Request::trace(2).with_priority(PriorityClass::Batch),
            Request::cancel(3, 0x1122_3344_5566_7788),
        ] {
            let bytes = encoded(&req);
            assert_eq!(Request::decode(&bytes), Ok(req.clone()));
            assert_eq!(Request::parse(&bytes, &cfg), Ok(req.clone()));
            assert_eq!(RequestHeader::decode(&bytes), Ok(req.header));
        }
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let bytes = encoded(&sample());
        for len in 0..REQUEST_HEADER_LEN {
            assert_eq!(
                Request::decode(&bytes[..len]),
                Err(ProtocolError::Truncated {
                    what: "request header",
                    needed: 40,
                    got: len
                })
            );
        }
        for len in REQUEST_HEADER_LEN..bytes.len() {
            assert_eq!(
                Request::decode(&bytes[..len]),
                Err(ProtocolError::Truncated {
                    what: "request",
                    needed: 280,
                    got: len
                })
            );
        }
    }

    #[test]
    fn decode_rejects_unknown_enum_values_and_flags() {
        let good = encoded(&sample());
        let mut b = good.clone();
        b[0..4].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(Request::decode(&b), Err(ProtocolError::UnknownOpcode(9)));
        b[0..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Request::decode(&b), Err(ProtocolError::UnknownOpcode(0)));
        assert_eq!(
            Request::decode(&b).unwrap_err().status(),
            Status::UnknownOpcode
        );

        let mut b = good.clone();
        b[36] = 4;
        assert_eq!(Request::decode(&b), Err(ProtocolError::UnknownPriority(4)));

        let mut b = good.clone();
        b[37] = 0x80;
        let err = Request::decode(&b).unwrap_err();
        assert_eq!(err, ProtocolError::UnsupportedFlags(0x80));
        assert_eq!(err.status(), Status::Unsupported);

        let mut b = good.clone();
        b[39] = 1;
        assert_eq!(
            Request::decode(&b),
            Err(ProtocolError::ReservedNotZero {
                field: "request.reserved",
                value: 256
            })
        );

        // A bad dtype in the output descriptor (tensor index 2).
        let mut b = good;
        b[40 + 2 * 80] = 0;
        let err = Request::decode(&b).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::in_tensor(2, ProtocolError::UnknownDType(0))
        );
        assert_eq!(err.detail(), 2);
        assert_eq!(err.status(), Status::BadRequest);
    }

    #[test]
    fn decode_rejects_too_many_tensors_before_reading_them() {
        let mut b = encoded(&sample());
        b[32..34].copy_from_slice(&17u16.to_le_bytes());
        assert_eq!(
            Request::decode(&b),
            Err(ProtocolError::TooManyTensors {
                direction: Direction::Input,
                count: 17,
                max: 16
            })
        );
        b[32..34].copy_from_slice(&1u16.to_le_bytes());
        b[34..36].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            Request::decode(&b),
            Err(ProtocolError::TooManyTensors {
                direction: Direction::Output,
                count: 65535,
                max: 16
            })
        );
        let too_many = vec![TensorDesc::input(DType::U8, &[1]).unwrap(); 17];
        assert_eq!(
            Request::infer(1, 1, too_many, vec![]),
            Err(ProtocolError::TooManyTensors {
                direction: Direction::Input,
                count: 17,
                max: 16
            })
        );
    }

    #[test]
    fn header_per_opcode_rules() {
        let mut h = sample().header;
        h.model_id = 0;
        assert_eq!(h.validate(), Err(ProtocolError::ZeroModelId));

        let mut h = sample().header;
        h.cancel_id = 5;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::FieldNotAllowed {
                field: "cancel_id",
                opcode: Opcode::Infer,
                value: 5
            })
        );

        let mut h = sample().header;
        h.num_inputs = 0;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::NoTensors(Direction::Input))
        );
        let mut h = sample().header;
        h.num_outputs = 0;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::NoTensors(Direction::Output))
        );

        let mut h = Request::trace(1).header;
        h.model_id = 3;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::FieldNotAllowed {
                field: "model_id",
                opcode: Opcode::Trace,
                value: 3
            })
        );
        let mut h = Request::models(1).header;
        h.cancel_id = 3;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::FieldNotAllowed {
                field: "cancel_id",
                opcode: Opcode::Models,
                value: 3
            })
        );
        let mut h = Request::cancel(1, 2).header;
        assert_eq!(h.validate(), Ok(()));
        h.deadline_us = 10;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::FieldNotAllowed {
                field: "deadline_us",
                opcode: Opcode::Cancel,
                value: 10
            })
        );
        let mut h = Request::cancel(1, 2).header;
        h.num_outputs = 1;
        assert_eq!(
            h.validate(),
            Err(ProtocolError::FieldNotAllowed {
                field: "num_outputs",
                opcode: Opcode::Cancel,
                value: 1
            })
        );
    }

    #[test]
    fn encode_rejects_inconsistent_counts_and_small_buffers() {
        let mut req = sample();
        req.header.num_inputs = 1;
        let mut buf = vec![0u8; 1024];
        assert_eq!(
            req.encode(&mut buf),
            Err(ProtocolError::HeaderCountMismatch {
                direction: Direction::Input,
                header: 1,
                actual: 2
            })
        );
        let req = sample();
        assert_eq!(
            req.encode(&mut buf[..279]),
            Err(ProtocolError::BufferTooSmall {
                what: "request",
                needed: 280,
                got: 279
            })
        );
    }

    #[test]
    fn validate_against_device_limits() {
        let cfg = DeviceConfig {
            max_input_tensors: 1,
            ..DeviceConfig::default()
        };
        assert_eq!(
            sample().validate(&cfg),
            Err(ProtocolError::TooManyTensors {
                direction: Direction::Input,
                count: 2,
                max: 1
            })
        );

        let cfg = DeviceConfig {
            max_rank: 1,
            ..DeviceConfig::default()
        };
        assert_eq!(
            sample().validate(&cfg),
            Err(ProtocolError::in_tensor(
                0,
                ProtocolError::RankTooLarge { rank: 2, max: 1 }
            ))
        );

        let cfg = DeviceConfig {
            max_input_bytes: 271,
            ..DeviceConfig::default()
        };
        assert_eq!(
            sample().validate(&cfg),
            Err(ProtocolError::TotalBytesTooLarge {
                direction: Direction::Input,
                total: 272,
                max: 271
            })
        );
        let cfg = DeviceConfig {
            max_output_bytes: 1535,
            ..DeviceConfig::default()
        };
        assert_eq!(
            sample().validate(&cfg),
            Err(ProtocolError::TotalBytesTooLarge {
                direction: Direction::Output,
                total: 1536,
                max: 1535
            })
        );
    }

    #[test]
    fn validate_checks_each_descriptor() {
        let cfg = DeviceConfig::default();
        // Input whose data_len disagrees with its shape.
        let mut req = sample();
        req.inputs[1].data_len = 8;
        assert_eq!(
            req.validate(&cfg),
            Err(ProtocolError::in_tensor(
                1,
                ProtocolError::ByteLenMismatch {
                    declared: 8,
                    expected: 136
                }
            ))
        );
        // Input with an empty dimension (as a guest could encode it).
        let mut req = sample();
        req.inputs[0] = TensorDesc {
            dtype: DType::I64,
            shape: Shape::new(&[0, 17]).unwrap(),
            data_len: 0,
        };
        assert!(matches!(
            req.validate(&cfg),
            Err(ProtocolError::InTensor { index: 0, ref error })
                if matches!(**error, ProtocolError::ZeroDim { index: 0, .. })
        ));
        // Output buffer of zero bytes (index 2 = first output).
        let mut req = sample();
        req.outputs[0].data_len = 0;
        assert_eq!(
            req.validate(&cfg),
            Err(ProtocolError::in_tensor(2, ProtocolError::ZeroCapacity))
        );
        // Shape whose byte size overflows.
        let mut req = sample();
        req.inputs[0] = TensorDesc {
            dtype: DType::I64,
            shape: Shape::new(&[1 << 62, 1]).unwrap(),
            data_len: 8,
        };
        let err = req.validate(&cfg).unwrap_err();
        assert_eq!(err.detail(), 0);
        assert!(
            matches!(&err, ProtocolError::InTensor { error, .. } if matches!(**error, ProtocolError::ShapeOverflow { .. })),
            "{err:?}"
        );
        // Two huge outputs whose capacities overflow when summed.
        let mut req = sample();
        req.outputs = vec![TensorDesc::output(DType::U8, &[0], u64::MAX).unwrap(); 2];
        req.header.num_outputs = 2;
        assert_eq!(
            req.validate(&cfg),
            Err(ProtocolError::TotalBytesTooLarge {
                direction: Direction::Output,
                total: u64::MAX,
                max: 256 << 20
            })
        );
    }
}
