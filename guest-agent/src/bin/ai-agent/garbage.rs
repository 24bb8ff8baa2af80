//! `ai-agent garbage`: plays a hostile driver against the device and reports what came
//! back, so the rig can show that garbage gets errors (and only errors) while the
//! device keeps serving this tenant and others.
//!
//! Each case submits one deliberately broken chain straight onto the ring. The device
//! must answer every case without hanging: a ring-level error (buffer outside guest
//! memory, device-writable part too short for a response) completes with used length
//! 0; a request-level error comes back with its status in the response header.

use ai_infer_protocol::{
    DType, Opcode, Request, RequestHeader, ResponseHeader, Status, TensorDesc, RESPONSE_HEADER_LEN,
};
use guest_agent::dma::DmaBuffer;
use guest_agent::engine::Engine;
use guest_agent::virtqueue::ChainBuffer;

/// What a case expects back.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Completed with used length 0 (nothing written).
    Dropped,
    /// A response with this status.
    Status(Status),
    /// A response with any non-OK status.
    AnyError,
}

struct Case {
    name: &'static str,
    readable: Vec<u8>,
    /// Overrides the readable buffer's address (to point outside guest memory).
    readable_addr: Option<u64>,
    writable_len: u32,
    expect: Expect,
}

fn header_bytes(h: &RequestHeader) -> Vec<u8> {
    let mut b = vec![0u8; 40];
    // A header built from valid fields always encodes.
    let _ = h.encode(&mut b);
    b
}

fn cases() -> Vec<Case> {
    let models = header_bytes(&RequestHeader::new(Opcode::Models, 0x6a00));
    let mut unknown_opcode = models.clone();
    unknown_opcode[0..4].copy_from_slice(&99u32.to_le_bytes());
    let mut reserved = models.clone();
    reserved[0x26] = 0xff;
    let mut bad_priority = models.clone();
    bad_priority[0x24] = 9;
    let mut unknown_model = Vec::new();
    if let Ok(req) = Request::infer(
        0x6a05,
        0xdead,
        vec![TensorDesc::input(DType::F32, &[1, 16]).unwrap_or_else(|_| unreachable!())],
        vec![TensorDesc::output(DType::F32, &[1, 4], 16).unwrap_or_else(|_| unreachable!())],
    ) {
        unknown_model = vec![0u8; req.encoded_len()];
        let _ = req.encode(&mut unknown_model);
        unknown_model.extend_from_slice(&[0u8; 64]); // the input's 64 bytes of data
    }
    let noise: Vec<u8> = (0..40u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    vec![
        Case {
            name: "buffer-outside-guest-memory",
            readable: models.clone(),
            readable_addr: Some(0x7fff_ffff_f000),
            writable_len: 48,
            expect: Expect::Dropped,
        },
        Case {
            name: "response-area-too-short",
            readable: models.clone(),
            readable_addr: None,
            writable_len: 16,
            expect: Expect::Dropped,
        },
        Case {
            name: "unknown-opcode",
            readable: unknown_opcode,
            readable_addr: None,
            writable_len: 48,
            expect: Expect::Status(Status::UnknownOpcode),
        },
        Case {
            name: "reserved-bytes-set",
            readable: reserved,
            readable_addr: None,
            writable_len: 48,
            expect: Expect::Status(Status::BadRequest),
        },
        Case {
            name: "bad-priority",
            readable: bad_priority,
            readable_addr: None,
            writable_len: 48,
            expect: Expect::Status(Status::BadRequest),
        },
        Case {
            name: "truncated-header",
            readable: models[..20].to_vec(),
            readable_addr: None,
            writable_len: 48,
            expect: Expect::Status(Status::BadRequest),
        },
        Case {
            name: "random-bytes",
            readable: noise,
            readable_addr: None,
            writable_len: 48,
            expect: Expect::AnyError,
        },
        Case {
            name: "unknown-model",
            readable: unknown_model,
            readable_addr: None,
            writable_len: 16 + 80 + 48,
            expect: Expect::Status(Status::UnknownModel),
        },
    ]
}

fn alloc(engine: &Engine, len: usize) -> Result<DmaBuffer, String> {
    engine
        .pool()
        .alloc(len.max(1))
        .map_err(|e| format!("cannot allocate {len} bytes of DMA memory: {e}"))
}

fn addr(buf: &DmaBuffer) -> Result<u64, String> {
    buf.device_addr()
        .ok_or_else(|| "a DMA buffer spans non-contiguous pages".to_string())
}

/// Runs every case; prints one `GARBAGE case=... used_len=... status=... ok=yes|no` line
/// each. Returns how many cases behaved as expected and how many ran.
pub fn run(engine: &Engine) -> Result<(usize, usize), String> {
    let all = cases();
    let mut passed = 0;
    for case in &all {
        let r = alloc(engine, case.readable.len())?;
        r.write_at(0, &case.readable)
            .map_err(|e| format!("cannot fill a DMA buffer: {e}"))?;
        let w = alloc(engine, case.writable_len as usize)?;
        let chain = [
            ChainBuffer {
                addr: match case.readable_addr {
                    Some(a) => a,
                    None => addr(&r)?,
                },
                len: case.readable.len() as u32,
                writable: false,
            },
            ChainBuffer {
                addr: addr(&w)?,
                len: case.writable_len,
                writable: true,
            },
        ];
        let used = engine
            .call_raw(0, &chain)
            .map_err(|e| format!("case {}: {e}", case.name))?;
        let status = if used as usize >= RESPONSE_HEADER_LEN {
            let bytes = w.as_slice();
            let start = case.writable_len as usize - RESPONSE_HEADER_LEN;
            ResponseHeader::decode(&bytes[start..])
                .ok()
                .map(|h| h.status)
        } else {
            None
        };
        let ok = match (case.expect, used, status) {
            (Expect::Dropped, 0, _) => true,
            (Expect::Status(want), _, Some(got)) => want == got,
            (Expect::AnyError, _, Some(got)) => got != Status::Ok,
            _ => false,
        };
        passed += usize::from(ok);
        println!(
            "GARBAGE case={} used_len={used} status={} ok={}",
            case.name,
            status.map_or("none".to_string(), |s| format!("{s:?}")),
            if ok { "yes" } else { "no" }
        );
    }
    Ok((passed, all.len()))
}
