//! The MODELS payload: the models a tenant may use, with their signatures.

use crate::consts::{
    MAX_MODELS, MAX_MODEL_NAME_LEN, MAX_TENSORS, MODEL_INFO_FIXED_LEN, MODEL_LIST_HEADER_LEN,
    TENSOR_SPEC_LEN,
};
use crate::error::ProtocolError;
use crate::request::Request;
use crate::spec::{check_model_name, read_name, write_name, TensorSpec};
use crate::tensor::{Direction, TensorDesc};
use crate::wire::{Reader, Writer};

/// One model entry: 80 fixed bytes followed by its input then output tensor specs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelInfo {
    /// Id to put in INFER requests; never 0. Stable for the daemon's lifetime.
    pub id: u32,
    /// Operator-given name (UTF-8, 1 to [`MAX_MODEL_NAME_LEN`] bytes, no NUL).
    pub name: String,
    /// Largest batch the device forms for this model across requests (1 = none);
    /// informational, requests are not required to use it.
    pub max_batch: u32,
    /// Input signature, in request order.
    pub inputs: Vec<TensorSpec>,
    /// Output signature, in request order.
    pub outputs: Vec<TensorSpec>,
}

fn check_spec_count(direction: Direction, count: usize) -> Result<(), ProtocolError> {
    if count == 0 {
        return Err(ProtocolError::NoTensors(direction));
    }
    if count > MAX_TENSORS {
        return Err(ProtocolError::TooManyTensors {
            direction,
            count,
            max: MAX_TENSORS,
        });
    }
    Ok(())
}

impl ModelInfo {
    /// Checks id, name, tensor counts and every tensor spec.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        if self.id == 0 {
            return Err(ProtocolError::ZeroModelId);
        }
        check_model_name(&self.name)?;
        check_spec_count(Direction::Input, self.inputs.len())?;
        check_spec_count(Direction::Output, self.outputs.len())?;
        for (index, spec) in self.inputs.iter().chain(&self.outputs).enumerate() {
            spec.validate()
                .map_err(|e| ProtocolError::in_tensor(index, e))?;
        }
        Ok(())
    }

    /// Checks an INFER request against this model's signature: same number of inputs
    /// and outputs, each input matching its spec exactly (dims within range), each
    /// output matching its spec where the driver gave a shape. Errors carry the
    /// tensor index and map to BAD_TENSOR.
    pub fn check_request(&self, req: &Request) -> Result<(), ProtocolError> {
        self.check_tensors(&req.inputs, &req.outputs)
    }

    /// [`ModelInfo::check_request`] on the request's tensor descriptors, wherever they
    /// are kept (a backend checks its requests' tensors with it).
    pub fn check_tensors<'a, I, O>(&self, inputs: I, outputs: O) -> Result<(), ProtocolError>
    where
        I: IntoIterator<Item = &'a TensorDesc>,
        I::IntoIter: ExactSizeIterator,
        O: IntoIterator<Item = &'a TensorDesc>,
        O::IntoIter: ExactSizeIterator,
    {
        let (inputs, outputs) = (inputs.into_iter(), outputs.into_iter());
        let first_output = inputs.len();
        for (direction, expected, got) in [
            (Direction::Input, self.inputs.len(), inputs.len()),
            (Direction::Output, self.outputs.len(), outputs.len()),
        ] {
            if expected != got {
                return Err(ProtocolError::TensorCountMismatch {
                    direction,
                    expected,
                    got,
                });
            }
        }
        for (index, (desc, spec)) in inputs.zip(&self.inputs).enumerate() {
            desc.validate_against(spec)
                .map_err(|e| ProtocolError::in_tensor(index, e))?;
        }
        for (k, (desc, spec)) in outputs.zip(&self.outputs).enumerate() {
            desc.validate_output_against(spec)
                .map_err(|e| ProtocolError::in_tensor(first_output + k, e))?;
        }
        Ok(())
    }

    /// Bytes of this entry on the wire.
    pub fn encoded_len(&self) -> usize {
        MODEL_INFO_FIXED_LEN + (self.inputs.len() + self.outputs.len()) * TENSOR_SPEC_LEN
    }

    /// Writes the entry; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        self.validate()?;
        let needed = self.encoded_len();
        let mut w = Writer::new(buf, "model entry", needed)?;
        w.u32(self.id)?;
        w.u32(self.max_batch)?;
        // All fit in a byte: validate() bounded them by 64 and 16.
        w.u8(self.name.len() as u8)?;
        w.u8(self.inputs.len() as u8)?;
        w.u8(self.outputs.len() as u8)?;
        w.zeros(5)?;
        write_name(&mut w, &self.name, MAX_MODEL_NAME_LEN)?;
        let mut off = w.position();
        for spec in self.inputs.iter().chain(&self.outputs) {
            off += spec.encode(&mut buf[off..])?;
        }
        Ok(off)
    }

    /// Reads one entry from the start of `buf`; [`ModelInfo::encoded_len`] of the
    /// result tells where the next entry starts.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "model entry", MODEL_INFO_FIXED_LEN)?;
        let id = r.u32()?;
        if id == 0 {
            return Err(ProtocolError::ZeroModelId);
        }
        let max_batch = r.u32()?;
        let name_len = usize::from(r.u8()?);
        let num_inputs = usize::from(r.u8()?);
        let num_outputs = usize::from(r.u8()?);
        r.reserved_u8("model.reserved0")?;
        r.reserved_u32("model.reserved1")?;
        let name = read_name(&mut r, name_len, "model name", MAX_MODEL_NAME_LEN, false)?;
        check_spec_count(Direction::Input, num_inputs)?;
        check_spec_count(Direction::Output, num_outputs)?;
        let needed = MODEL_INFO_FIXED_LEN + (num_inputs + num_outputs) * TENSOR_SPEC_LEN;
        let mut r = Reader::new(buf, "model entry", needed)?;
        r.bytes(MODEL_INFO_FIXED_LEN)?;
        let mut specs = (0..num_inputs + num_outputs)
            .map(|index| {
                TensorSpec::decode(r.bytes(TENSOR_SPEC_LEN)?)
                    .map_err(|e| ProtocolError::in_tensor(index, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = specs.split_off(num_inputs);
        Ok(ModelInfo {
            id,
            name,
            max_batch,
            inputs: specs,
            outputs,
        })
    }
}

/// A MODELS payload: `le32 num_models`, `le32 reserved`, then the entries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ModelList {
    /// The entries, in the device's order.
    pub models: Vec<ModelInfo>,
}

impl ModelList {
    /// Bytes of the whole payload; a driver whose payload area was smaller gets
    /// BUFFER_TOO_SMALL with this value in `payload_len`.
    pub fn encoded_len(&self) -> usize {
        MODEL_LIST_HEADER_LEN
            + self
                .models
                .iter()
                .map(ModelInfo::encoded_len)
                .sum::<usize>()
    }

    fn check_count(count: usize) -> Result<(), ProtocolError> {
        if count > MAX_MODELS {
            return Err(ProtocolError::TooManyModels {
                count,
                max: MAX_MODELS,
            });
        }
        Ok(())
    }

    fn check_unique(models: &[ModelInfo]) -> Result<(), ProtocolError> {
        let mut ids: Vec<u32> = models.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        match ids.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(ProtocolError::DuplicateModelId(w[0])),
            None => Ok(()),
        }
    }

    /// Writes the payload; returns the number of bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        Self::check_count(self.models.len())?;
        Self::check_unique(&self.models)?;
        let needed = self.encoded_len();
        let mut w = Writer::new(buf, "model list", needed)?;
        // Fits: at most MAX_MODELS = 1024.
        w.u32(self.models.len() as u32)?;
        w.zeros(4)?;
        let mut off = w.position();
        for model in &self.models {
            off += model.encode(&mut buf[off..])?;
        }
        Ok(off)
    }

    /// Reads a payload from the start of `buf` (`payload_len` bytes of the chain).
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(buf, "model list", MODEL_LIST_HEADER_LEN)?;
        let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        r.reserved_u32("model_list.reserved")?;
        Self::check_count(count)?;
        let mut models = Vec::new();
        let mut off = MODEL_LIST_HEADER_LEN;
        for _ in 0..count {
            let model = ModelInfo::decode(buf.get(off..).unwrap_or_default())?;
            off += model.encoded_len();
            models.push(model);
        }
        Self::check_unique(&models)?;
        Ok(ModelList { models })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::spec::DimRange;
    use crate::status::Status;
    use crate::tensor::TensorDesc;

    fn minilm() -> ModelInfo {
        let ids = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DType::I64,
            dims: vec![DimRange::dynamic(32), DimRange::dynamic(512)],
        };
        ModelInfo {
            id: 1,
            name: "all-MiniLM-L6-v2".into(),
            max_batch: 32,
            inputs: vec![ids("input_ids"), ids("attention_mask")],
            outputs: vec![TensorSpec {
                name: "embeddings".into(),
                dtype: DType::F32,
                dims: vec![DimRange::dynamic(32), DimRange::fixed(384)],
            }],
        }
    }

    fn tiny() -> ModelInfo {
        ModelInfo {
            id: 7,
            name: "tiny-mlp".into(),
            max_batch: 1,
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                dims: vec![DimRange::fixed(1), DimRange::fixed(4)],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                dims: vec![DimRange::fixed(1), DimRange::fixed(2)],
            }],
        }
    }

    fn encoded_list(list: &ModelList) -> Vec<u8> {
        let mut buf = vec![0u8; list.encoded_len()];
        assert_eq!(list.encode(&mut buf), Ok(list.encoded_len()));
        buf
    }

    #[test]
    fn round_trip() {
        let list = ModelList {
            models: vec![minilm(), tiny()],
        };
        let bytes = encoded_list(&list);
        assert_eq!(bytes.len(), 8 + (80 + 3 * 168) + (80 + 2 * 168));
        assert_eq!(ModelList::decode(&bytes), Ok(list));
        let empty = ModelList::default();
        assert_eq!(ModelList::decode(&encoded_list(&empty)), Ok(empty));
        let mut long = tiny();
        long.name = "m".repeat(MAX_MODEL_NAME_LEN);
        let mut buf = vec![0u8; long.encoded_len()];
        long.encode(&mut buf).unwrap();
        assert_eq!(ModelInfo::decode(&buf), Ok(long));
    }

    #[test]
    fn entry_wire_layout_is_exact() {
        let m = tiny();
        let mut b = vec![0u8; m.encoded_len()];
        m.encode(&mut b).unwrap();
        assert_eq!(&b[0..4], &7u32.to_le_bytes());
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..16], &[8, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..24], b"tiny-mlp");
        assert!(b[24..80].iter().all(|x| *x == 0));
        assert_eq!(TensorSpec::decode(&b[80..]).unwrap(), m.inputs[0]);
        assert_eq!(TensorSpec::decode(&b[248..]).unwrap(), m.outputs[0]);
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let bytes = encoded_list(&ModelList {
            models: vec![tiny()],
        });
        for len in 0..bytes.len() {
            let err = ModelList::decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Truncated { .. })
                    || matches!(&err, ProtocolError::InTensor { error, .. }
                        if matches!(**error, ProtocolError::Truncated { .. })),
                "len {len}: {err:?}"
            );
        }
    }

    #[test]
    fn decode_rejects_bad_entries() {
        let good = encoded_list(&ModelList {
            models: vec![tiny()],
        });
        let entry = MODEL_LIST_HEADER_LEN;

        let mut b = good.clone();
        b[0..4].copy_from_slice(&(MAX_MODELS as u32 + 1).to_le_bytes());
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::TooManyModels {
                count: 1025,
                max: 1024
            })
        );

        let mut b = good.clone();
        b[entry..entry + 4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(ModelList::decode(&b), Err(ProtocolError::ZeroModelId));

        let mut b = good.clone();
        b[entry + 8] = 65;
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::NameTooLong {
                what: "model name",
                len: 65,
                max: 64
            })
        );

        let mut b = good.clone();
        b[entry + 8] = 0;
        // name bytes now count as padding and are not zero
        assert!(matches!(
            ModelList::decode(&b),
            Err(ProtocolError::ReservedNotZero {
                field: "name padding",
                ..
            })
        ));

        let mut b = good.clone();
        b[entry + 16] = 0xc3; // a lone UTF-8 lead byte
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::NameNotUtf8 { what: "model name" })
        );

        let mut b = good.clone();
        b[entry + 9] = 0;
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::NoTensors(Direction::Input))
        );
        let mut b = good.clone();
        b[entry + 10] = 17;
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::TooManyTensors {
                direction: Direction::Output,
                count: 17,
                max: 16
            })
        );

        // Bad dtype in the output spec (index 1).
        let mut b = good.clone();
        b[entry + 80 + 168] = 0;
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::in_tensor(1, ProtocolError::UnknownDType(0)))
        );

        let mut b = good;
        b[4] = 1;
        assert_eq!(
            ModelList::decode(&b),
            Err(ProtocolError::ReservedNotZero {
                field: "model_list.reserved",
                value: 1
            })
        );
    }

    #[test]
    fn check_request_against_signature() {
        let model = minilm();
        let ids = || TensorDesc::input(DType::I64, &[2, 17]).unwrap();
        let out = || TensorDesc::output(DType::F32, &[0, 384], 2 * 384 * 4).unwrap();
        let req = |inputs, outputs| Request::infer(1, model.id, inputs, outputs).unwrap();

        assert_eq!(
            model.check_request(&req(vec![ids(), ids()], vec![out()])),
            Ok(())
        );

        let err = model
            .check_request(&req(vec![ids()], vec![out()]))
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::TensorCountMismatch {
                direction: Direction::Input,
                expected: 2,
                got: 1
            }
        );
        assert_eq!(err.status(), Status::BadTensor);
        assert_eq!(
            model.check_request(&req(vec![ids(), ids()], vec![out(), out()])),
            Err(ProtocolError::TensorCountMismatch {
                direction: Direction::Output,
                expected: 1,
                got: 2
            })
        );

        let float_mask = TensorDesc::input(DType::F32, &[2, 17]).unwrap();
        let err = model
            .check_request(&req(vec![ids(), float_mask], vec![out()]))
            .unwrap_err();
        assert_eq!(
            err,
            ProtocolError::in_tensor(
                1,
                ProtocolError::DTypeMismatch {
                    expected: DType::I64,
                    got: DType::F32
                }
            )
        );
        assert_eq!((err.status(), err.detail()), (Status::BadTensor, 1));

        let long = TensorDesc::input(DType::I64, &[2, 513]).unwrap();
        assert_eq!(
            model.check_request(&req(vec![long, ids()], vec![out()])),
            Err(ProtocolError::in_tensor(
                0,
                ProtocolError::DimOutOfRange {
                    index: 1,
                    value: 513,
                    min: 1,
                    max: 512
                }
            ))
        );

        let wrong_width = TensorDesc::output(DType::F32, &[0, 768], 8192).unwrap();
        assert_eq!(
            model
                .check_request(&req(vec![ids(), ids()], vec![wrong_width]))
                .unwrap_err()
                .detail(),
            2
        );
    }

    #[test]
    fn encode_rejects_invalid_models() {
        let mut buf = vec![0u8; 4096];
        let mut m = tiny();
        m.name = "m".repeat(65);
        assert_eq!(
            m.encode(&mut buf),
            Err(ProtocolError::NameTooLong {
                what: "model name",
                len: 65,
                max: 64
            })
        );
        let mut m = tiny();
        m.name.clear();
        assert_eq!(
            m.encode(&mut buf),
            Err(ProtocolError::NameEmpty { what: "model name" })
        );
        let mut m = tiny();
        m.id = 0;
        assert_eq!(m.encode(&mut buf), Err(ProtocolError::ZeroModelId));
        let mut m = tiny();
        m.outputs.clear();
        assert_eq!(
            m.encode(&mut buf),
            Err(ProtocolError::NoTensors(Direction::Output))
        );
        let dup = ModelList {
            models: vec![tiny(), tiny()],
        };
        assert_eq!(
            dup.encode(&mut buf),
            Err(ProtocolError::DuplicateModelId(7))
        );
        let list = ModelList {
            models: vec![minilm()],
        };
        assert_eq!(
            list.encode(&mut buf[..100]),
            Err(ProtocolError::BufferTooSmall {
                what: "model list",
                needed: list.encoded_len(),
                got: 100
            })
        );
    }
}
