//! Feeds the ai_infer request parsers (devices/ai-infer-protocol/src/request.rs:
//! `RequestHeader::peek_request_id`, `RequestHeader::decode`, `TensorDesc::decode`,
//! `Request::decode`, `Request::parse`) and `ChainLayout::from_chain` the bytes a guest
//! driver put in a chain, as ai-inferd's intake does.
//!
//! Input: 8 bytes of little-endian `writable_len` (the device-writable bytes of the
//! chain), then the device-readable stream (request header, tensor descriptors, input
//! data). Hostile because the guest writes all of it: opcodes, counts that size
//! allocations, ranks, dimensions whose products overflow, data lengths, reserved
//! fields, and chain lengths that must match what the request declares.

#![no_main]

use ai_infer_protocol::{
    ChainLayout, DeviceConfig, Request, RequestHeader, ResponseHeader, TensorDesc,
    REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, TENSOR_DESC_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, readable)) = data.split_first_chunk::<8>() else {
        return;
    };
    let writable_len = u64::from_le_bytes(*len);
    let request_id = RequestHeader::peek_request_id(readable).unwrap_or(0);

    // The header and each descriptor slot on their own.
    if let Ok(header) = RequestHeader::decode(readable) {
        assert_eq!(header.request_id, request_id);
        let _ = header.validate();
        let mut buf = [0u8; RequestHeader::LEN];
        assert_eq!(header.encode(&mut buf), Ok(RequestHeader::LEN));
        assert_eq!(RequestHeader::decode(&buf), Ok(header), "header round trip");
    }
    for slot in readable
        .get(REQUEST_HEADER_LEN..)
        .unwrap_or_default()
        .chunks(TENSOR_DESC_LEN)
        .take(4)
    {
        if let Ok(desc) = TensorDesc::decode(slot) {
            let _ = (
                desc.byte_len(),
                desc.validate_input(),
                desc.validate_output(),
            );
            let mut buf = [0u8; TENSOR_DESC_LEN];
            assert_eq!(desc.encode(&mut buf), Ok(TENSOR_DESC_LEN));
            assert_eq!(TensorDesc::decode(&buf), Ok(desc), "descriptor round trip");
        }
    }

    // The whole request, as the device parses it.
    if let Ok(req) = Request::decode(readable) {
        let mut buf = vec![0u8; req.encoded_len()];
        assert_eq!(req.encode(&mut buf), Ok(req.encoded_len()));
        assert_eq!(
            Request::decode(&buf).as_ref(),
            Ok(&req),
            "request round trip"
        );
    }
    let config = DeviceConfig::default();
    let result = Request::parse(readable, &config).and_then(|req| {
        let layout = ChainLayout::from_chain(&req, readable.len() as u64, writable_len)?;
        Ok((req, layout))
    });
    match result {
        Ok((req, layout)) => {
            assert_eq!(layout.readable_len, readable.len() as u64);
            assert_eq!(layout.writable_len, writable_len);
            assert_eq!(layout.response.end(), writable_len);
            assert_eq!(layout.response.len, RESPONSE_HEADER_LEN as u64);
            assert_eq!(layout.inputs.len(), req.inputs.len());
            assert_eq!(layout.outputs.len(), req.outputs.len());
            for range in &layout.inputs {
                assert!(range.end() <= layout.readable_len, "input past the chain");
            }
            for range in layout
                .outputs
                .iter()
                .chain([&layout.payload, &layout.shapes])
            {
                assert!(
                    range.end() <= layout.response.offset,
                    "output over the response"
                );
            }
        }
        Err(e) => {
            // What the device answers for a rejected request.
            let header = ResponseHeader::from_error(request_id, &e);
            let mut buf = [0u8; RESPONSE_HEADER_LEN];
            assert_eq!(header.encode(&mut buf), Ok(RESPONSE_HEADER_LEN));
            assert_eq!(
                ResponseHeader::decode(&buf),
                Ok(header),
                "response round trip"
            );
            let _ = (e.status(), e.detail(), e.needed_bytes(), e.to_string());
        }
    }
});
