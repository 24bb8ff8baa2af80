//! Property-style checks over random and mutated bytes: decoding never panics, and
//! whatever decodes re-encodes to exactly the same bytes (the encoding is canonical,
//! so a device can never be fooled by two spellings of one request).

use ai_infer_protocol::{
    ChainLayout, DType, DeviceConfig, DimRange, ModelInfo, ModelList, PriorityClass, Request,
    Response, ResponseHeader, Shape, Status, TensorDesc, TensorSpec, TraceCounters,
};

/// A tiny xorshift64* generator: deterministic, no dependencies.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Decodes `bytes` with every decoder; for those that succeed, checks the canonical
/// re-encoding. Returns how many decoders accepted the bytes.
fn decode_all(bytes: &[u8]) -> usize {
    let mut accepted = 0;
    let config = DeviceConfig::default();

    if let Ok(req) = Request::decode(bytes) {
        accepted += 1;
        let mut out = vec![0u8; req.encoded_len()];
        assert_eq!(req.encode(&mut out), Ok(out.len()));
        assert_eq!(out, &bytes[..out.len()]);
        // Validation and layout must not panic either, whatever the values.
        let _ = req.validate(&config);
        let _ = ChainLayout::new(&req, 0);
        let _ = ChainLayout::from_chain(&req, bytes.len() as u64, u64::MAX);
    }
    macro_rules! canonical {
        ($ty:ty, $len:expr) => {
            if let Ok(v) = <$ty>::decode(bytes) {
                accepted += 1;
                let len = $len(&v);
                let mut out = vec![0u8; len];
                assert_eq!(v.encode(&mut out), Ok(len), "{}", stringify!($ty));
                assert_eq!(out, &bytes[..len], "{}", stringify!($ty));
            }
        };
    }
    canonical!(TensorDesc, |_: &TensorDesc| TensorDesc::LEN);
    canonical!(TensorSpec, |_: &TensorSpec| TensorSpec::LEN);
    canonical!(ModelInfo, ModelInfo::encoded_len);
    canonical!(ModelList, ModelList::encoded_len);
    canonical!(ResponseHeader, |_: &ResponseHeader| ResponseHeader::LEN);
    canonical!(DeviceConfig, |_: &DeviceConfig| DeviceConfig::LEN);
    canonical!(TraceCounters, |_: &TraceCounters| TraceCounters::LEN);

    if let Ok(resp) = Response::decode(bytes) {
        accepted += 1;
        let mut out = vec![0u8; resp.encoded_len()];
        assert_eq!(resp.encode(&mut out), Ok(out.len()));
        assert_eq!(out, &bytes[bytes.len() - out.len()..]);
    }
    accepted
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut push = |f: &dyn Fn(&mut [u8]) -> usize| {
        let mut buf = vec![0u8; 8192];
        let len = f(&mut buf);
        buf.truncate(len);
        seeds.push(buf);
    };
    let infer = Request::infer(
        9,
        3,
        vec![
            TensorDesc::input(DType::I64, &[2, 17]).unwrap(),
            TensorDesc::input(DType::F16, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap(),
        ],
        vec![TensorDesc::output(DType::F32, &[0, 384], 4096).unwrap()],
    )
    .unwrap()
    .with_priority(PriorityClass::Realtime);
    push(&|b| infer.encode(b).unwrap());
    push(&|b| Request::cancel(1, 9).encode(b).unwrap());
    let model = ModelInfo {
        id: 3,
        name: "modèle".into(),
        max_batch: 8,
        inputs: vec![TensorSpec {
            name: "x".into(),
            dtype: DType::I64,
            dims: vec![DimRange::dynamic(8), DimRange::ANY],
        }],
        outputs: vec![TensorSpec {
            name: String::new(),
            dtype: DType::F32,
            dims: vec![DimRange::fixed(384)],
        }],
    };
    let list = ModelList {
        models: vec![model.clone()],
    };
    push(&|b| list.encode(b).unwrap());
    push(&|b| model.encode(b).unwrap());
    push(&|b| DeviceConfig::default().encode(b).unwrap());
    push(&|b| TraceCounters::default().encode(b).unwrap());
    let resp = Response {
        header: ResponseHeader {
            num_outputs: 1,
            ..ResponseHeader::new(Status::Ok, 9)
        },
        outputs: vec![TensorDesc {
            dtype: DType::F32,
            shape: Shape::new(&[2, 384]).unwrap(),
            data_len: 3072,
        }],
    };
    push(&|b| resp.encode(b).unwrap());
    seeds
}

#[test]
fn every_seed_decodes() {
    for seed in seeds() {
        assert!(
            decode_all(&seed) >= 1,
            "seed of {} bytes rejected",
            seed.len()
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = rng.below(1200);
        let bytes = rng.bytes(len);
        decode_all(&bytes);
    }
}

#[test]
fn mutated_encodings_never_panic_and_stay_canonical() {
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let seeds = seeds();
    let mut accepted = 0;
    for _ in 0..30_000 {
        let mut bytes = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(4) {
                // Overwrite one byte with a random value.
                0 | 1 => {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
                // Overwrite one byte with an interesting value.
                2 => {
                    let i = rng.below(bytes.len());
                    bytes[i] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
                }
                // Truncate.
                _ => {
                    let len = rng.below(bytes.len() + 1);
                    bytes.truncate(len.max(1));
                }
            }
        }
        accepted += decode_all(&bytes);
    }
    // The mutations must leave a good share decodable, or this test explores nothing.
    assert!(accepted > 20_000, "only {accepted} mutated inputs decoded");
}
