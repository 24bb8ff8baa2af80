//! The worked INFER example of docs/ai_infer.md, byte for byte. If this test fails,
//! the specification and the code disagree: fix one of them.

use ai_infer_protocol::{
    ChainLayout, DType, DeviceConfig, PriorityClass, Request, Response, ResponseHeader, Shape,
    Status, TensorDesc, DETAIL_NONE,
};

/// Formats bytes as the specification shows them: 16 per line, offset first.
fn hex_dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, line)| {
            let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}: {}\n", i * 16, hex.join(" "))
        })
        .collect()
}

fn example_request() -> Request {
    Request::infer(
        0x0102_0304_0506_0708,
        7,
        vec![TensorDesc::input(DType::F32, &[1, 4]).unwrap()],
        vec![TensorDesc::output(DType::F32, &[1, 2], 8).unwrap()],
    )
    .unwrap()
    .with_priority(PriorityClass::Interactive)
    .with_deadline_us(5000)
}

const REQUEST_DESCRIPTOR_0: &str = "\
0000: 01 00 00 00 07 00 00 00 08 07 06 05 04 03 02 01
0010: 88 13 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0020: 01 00 01 00 02 00 00 00 01 02 00 00 00 00 00 00
0030: 01 00 00 00 00 00 00 00 04 00 00 00 00 00 00 00
0040: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0050: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0060: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0070: 10 00 00 00 00 00 00 00 01 02 00 00 00 00 00 00
0080: 01 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00
0090: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00a0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00b0: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
00c0: 08 00 00 00 00 00 00 00
";

const INPUT_DESCRIPTOR_1: &str = "\
0000: 00 00 80 3f 00 00 00 40 00 00 40 40 00 00 80 40
";

const OUTPUT_DESCRIPTOR_2: &str = "\
0000: 00 00 00 3f 00 00 80 bf
";

const RESPONSE_DESCRIPTOR_3: &str = "\
0000: 01 02 00 00 00 00 00 00 01 00 00 00 00 00 00 00
0010: 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0020: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0030: 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
0040: 00 00 00 00 00 00 00 00 08 00 00 00 00 00 00 00
0050: 00 00 00 00 ff ff ff ff 08 07 06 05 04 03 02 01
0060: e0 2e 00 00 00 00 00 00 08 4c 01 00 00 00 00 00
0070: 08 00 00 00 00 00 00 00 01 00 00 00 01 00 00 00
";

#[test]
fn request_bytes_match_the_specification() {
    let req = example_request();
    let mut desc0 = vec![0u8; req.encoded_len()];
    assert_eq!(req.encode(&mut desc0), Ok(200));
    assert_eq!(hex_dump(&desc0), REQUEST_DESCRIPTOR_0);

    let input: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(hex_dump(&input), INPUT_DESCRIPTOR_1);

    // The device side: parse the copy, then check the chain's lengths.
    let parsed = Request::parse(&desc0, &DeviceConfig::default()).unwrap();
    assert_eq!(parsed, req);
    let layout = ChainLayout::from_chain(&parsed, 200 + 16, 8 + 128).unwrap();
    assert_eq!(layout.inputs[0].offset, 200);
    assert_eq!(layout.outputs[0].offset, 0);
    assert_eq!(layout.shapes.offset, 8);
    assert_eq!(layout.response.offset, 88);
}

#[test]
fn response_bytes_match_the_specification() {
    let req = example_request();
    let produced = req.outputs[0]
        .check_produced(&Shape::new(&[1, 2]).unwrap())
        .unwrap();
    let resp = Response {
        header: ResponseHeader {
            status: Status::Ok,
            detail: DETAIL_NONE,
            request_id: req.header.request_id,
            queue_ns: 12_000,
            compute_ns: 85_000,
            payload_len: 8,
            batch_size: 1,
            num_outputs: 1,
        },
        outputs: vec![produced],
    };
    let output: Vec<u8> = [0.5f32, -1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(hex_dump(&output), OUTPUT_DESCRIPTOR_2);

    let mut desc3 = vec![0u8; resp.encoded_len()];
    assert_eq!(resp.encode(&mut desc3), Ok(128));
    assert_eq!(hex_dump(&desc3), RESPONSE_DESCRIPTOR_3);

    // The driver side: the writable stream is desc2 then desc3.
    let mut writable = output;
    writable.extend_from_slice(&desc3);
    assert_eq!(Response::decode(&writable), Ok(resp));
}

#[test]
fn malformed_variant_of_the_example_gets_bad_request_for_tensor_0() {
    let req = example_request();
    let mut desc0 = vec![0u8; req.encoded_len()];
    req.encode(&mut desc0).unwrap();
    // data_len of input descriptor 0 (at 0x28 + 0x48) := 12.
    desc0[0x70] = 12;
    let err = Request::parse(&desc0, &DeviceConfig::default()).unwrap_err();
    let resp = ResponseHeader::from_error(req.header.request_id, &err);
    assert_eq!(resp.status, Status::BadRequest);
    assert_eq!(resp.detail, 0);
    assert_eq!(resp.num_outputs, 0);
    assert_eq!(resp.request_id, 0x0102_0304_0506_0708);
}
