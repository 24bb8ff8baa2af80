use std::ffi::CStr;
use std::mem::{offset_of, size_of};

use super::*;
use crate::api::AI_ALLOC_ZERO;
use crate::engine::tests::fake_engine;
use crate::testing::FakeDeviceBehaviour;
use ai_infer_protocol::{DType, TensorDesc};

const HEADER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include/ai_agent.h");

#[test]
fn checked_in_header_is_the_generated_one() {
    let generated = c_header();
    if std::env::var_os("AI_AGENT_WRITE_HEADER").is_some() {
        std::fs::write(HEADER, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(HEADER).unwrap_or_default();
    assert!(
        on_disk == generated,
        "include/ai_agent.h is stale: AI_AGENT_WRITE_HEADER=1 cargo test -p guest-agent --lib capi"
    );
}

/// Compiles a C file with static assertions that every struct has the Rust size and
/// field offsets (needs a C compiler; the CI machines and the dev container have one).
#[test]
fn header_layouts_match_the_rust_structs() {
    let checks = [
        ("sizeof(ai_tensor_desc)", size_of::<AiTensorDesc>()),
        (
            "offsetof(ai_tensor_desc, dims)",
            offset_of!(AiTensorDesc, dims),
        ),
        (
            "offsetof(ai_tensor_desc, data_len)",
            offset_of!(AiTensorDesc, data_len),
        ),
        ("sizeof(ai_input)", size_of::<AiInput>()),
        ("offsetof(ai_input, buffer)", offset_of!(AiInput, buffer)),
        ("sizeof(ai_output)", size_of::<AiOutput>()),
        ("sizeof(ai_infer_options)", size_of::<AiInferOptions>()),
        (
            "offsetof(ai_infer_options, request_id)",
            offset_of!(AiInferOptions, request_id),
        ),
        ("sizeof(ai_infer_result)", size_of::<AiInferResult>()),
        (
            "offsetof(ai_infer_result, batch_size)",
            offset_of!(AiInferResult, batch_size),
        ),
        (
            "offsetof(ai_infer_result, outputs)",
            offset_of!(AiInferResult, outputs),
        ),
        ("sizeof(ai_tensor_spec)", size_of::<AiTensorSpec>()),
        (
            "offsetof(ai_tensor_spec, dims_min)",
            offset_of!(AiTensorSpec, dims_min),
        ),
        (
            "offsetof(ai_tensor_spec, dims_max)",
            offset_of!(AiTensorSpec, dims_max),
        ),
        ("sizeof(ai_model_info)", size_of::<AiModelInfo>()),
        (
            "offsetof(ai_model_info, name)",
            offset_of!(AiModelInfo, name),
        ),
        (
            "offsetof(ai_model_info, inputs)",
            offset_of!(AiModelInfo, inputs),
        ),
        (
            "offsetof(ai_model_info, outputs)",
            offset_of!(AiModelInfo, outputs),
        ),
        ("sizeof(ai_guest_trace)", size_of::<AiGuestTrace>()),
        (
            "offsetof(ai_guest_trace, by_status)",
            offset_of!(AiGuestTrace, by_status),
        ),
        ("sizeof(ai_device_trace)", size_of::<AiDeviceTrace>()),
        (
            "offsetof(ai_device_trace, latency_hist)",
            offset_of!(AiDeviceTrace, latency_hist),
        ),
        ("sizeof(ai_trace_counters)", size_of::<AiTrace>()),
        (
            "offsetof(ai_trace_counters, device)",
            offset_of!(AiTrace, device),
        ),
        ("sizeof(ai_open_options)", size_of::<AiOpenOptions>()),
        (
            "offsetof(ai_open_options, socket)",
            offset_of!(AiOpenOptions, socket),
        ),
        (
            "offsetof(ai_open_options, bdf)",
            offset_of!(AiOpenOptions, bdf),
        ),
    ];
    let mut c = format!("#include <stddef.h>\n#include \"{HEADER}\"\n");
    for (expr, value) in checks {
        c.push_str(&format!("_Static_assert({expr} == {value}, \"{expr}\");\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    std::fs::write(&src, c).unwrap();
    let out = std::process::Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-fsyntax-only"])
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn status_names_match_the_protocol() {
    for s in Status::ALL {
        // SAFETY: ai_status_name returns static NUL-terminated strings.
        let name = unsafe { CStr::from_ptr(ai_status_name(s.into())) };
        assert_eq!(name.to_str().unwrap(), s.name());
    }
    // SAFETY: as above.
    assert_eq!(
        unsafe { CStr::from_ptr(ai_status_name(13)) }
            .to_str()
            .unwrap(),
        "UNKNOWN"
    );
}

fn last_error() -> String {
    // SAFETY: ai_last_error returns this thread's NUL-terminated message.
    unsafe { CStr::from_ptr(ai_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn handle() -> (crate::testing::FakeVirtioPci, *mut AiAgent) {
    let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
    (fake, into_handle(Agent::from_engine(engine)))
}

#[test]
fn null_and_stale_handles_are_refused() {
    let mut buf: *mut AiBuffer = std::ptr::null_mut();
    // SAFETY (all calls below): the arguments are NULL, dangling or made up on purpose;
    // the library must reject them without dereferencing.
    unsafe {
        assert_eq!(
            ai_alloc(std::ptr::null_mut(), 64, 0, &mut buf),
            AI_E_INVALID
        );
        assert!(last_error().contains("ai_agent"));
        let bogus = 0x1234usize as *mut AiAgent;
        assert_eq!(ai_alloc(bogus, 64, 0, &mut buf), AI_E_INVALID);
        assert_eq!(
            ai_open(std::ptr::null(), std::ptr::null_mut()),
            AI_E_INVALID
        );
        ai_close(bogus); // ignored

        let (_fake, agent) = handle();
        assert_eq!(ai_alloc(agent, 64, 0, std::ptr::null_mut()), AI_E_INVALID);
        assert_eq!(ai_alloc(agent, 64, 0x80, &mut buf), AI_E_INVALID);
        assert_eq!(ai_alloc(agent, 1 << 40, 0, &mut buf), AI_E_NO_MEMORY);
        assert_eq!(ai_alloc(agent, 64, AI_ALLOC_ZERO, &mut buf), AI_OK);
        assert_eq!(ai_buffer_len(agent, buf), 64);
        assert_eq!(ai_buffer_len(agent, 0x40 as *const AiBuffer), 0);
        assert!(ai_buffer_data(agent, std::ptr::null_mut()).is_null());
        assert_eq!(ai_free(agent, buf), AI_OK);
        assert_eq!(ai_free(agent, buf), AI_E_INVALID, "double free");
        assert_eq!(ai_free(agent, std::ptr::null_mut()), AI_E_INVALID);
        let mut result = AiInferResult::default();
        assert_eq!(
            ai_infer(
                agent,
                1,
                std::ptr::null(),
                1,
                std::ptr::null(),
                0,
                std::ptr::null(),
                &mut result
            ),
            AI_E_INVALID
        );
        assert_eq!(
            ai_infer(
                agent,
                1,
                std::ptr::null(),
                17,
                std::ptr::null(),
                0,
                std::ptr::null(),
                &mut result
            ),
            AI_E_INVALID
        );
        let mut count = 0usize;
        assert_eq!(
            ai_models(agent, std::ptr::null_mut(), 3, &mut count),
            AI_E_INVALID
        );
        assert_eq!(ai_trace(agent, std::ptr::null_mut()), AI_E_INVALID);
        assert_eq!(ai_cancel(agent, 1, std::ptr::null_mut()), AI_E_INVALID);
        ai_close(agent);
        assert_eq!(
            ai_alloc(agent, 64, 0, &mut buf),
            AI_E_INVALID,
            "closed handle"
        );
    }
}

#[test]
fn inference_through_the_c_abi() {
    let (_fake, agent) = handle();
    let desc = |d: TensorDesc| AiTensorDesc::from_desc(&d);
    let infer = |model: u32,
                 ins: &[AiInput],
                 outs: &[AiOutput],
                 opts: *const AiInferOptions,
                 r: &mut AiInferResult| {
        // SAFETY: both arrays are live for the call and passed with their lengths.
        unsafe {
            ai_infer(
                agent,
                model,
                ins.as_ptr(),
                ins.len(),
                outs.as_ptr(),
                outs.len(),
                opts,
                r,
            )
        }
    };
    // SAFETY: every pointer passed is live and sized as the header requires.
    unsafe {
        let (mut input, mut output) = (std::ptr::null_mut(), std::ptr::null_mut());
        assert_eq!(ai_alloc(agent, 16, 0, &mut input), AI_OK);
        assert_eq!(ai_alloc(agent, 64, 0, &mut output), AI_OK);
        let data = ai_buffer_data(agent, input);
        for (i, v) in [1.0f32, 2.0, 3.0, 4.0].iter().enumerate() {
            std::ptr::copy_nonoverlapping(v.to_le_bytes().as_ptr(), data.add(4 * i), 4);
        }
        let ins = [AiInput {
            desc: desc(TensorDesc::input(DType::F32, &[1, 4]).unwrap()),
            buffer: input,
        }];
        let outs = [AiOutput {
            desc: desc(TensorDesc::output(DType::F32, &[1, 0], 64).unwrap()),
            buffer: output,
        }];
        let opts = AiInferOptions {
            priority: 2,
            request_id: 99,
            ..Default::default()
        };
        let mut r = AiInferResult::default();
        assert_eq!(infer(1, &ins, &outs, &opts, &mut r), AI_OK);
        assert_eq!((r.status, r.request_id, r.num_outputs), (0, 99, 1));
        assert_eq!(
            (
                r.outputs[0].rank,
                r.outputs[0].dims[1],
                r.outputs[0].data_len
            ),
            (2, 4, 16)
        );
        let out = std::slice::from_raw_parts(ai_buffer_data(agent, output), 16);
        assert_eq!(out[12..16], 8.0f32.to_le_bytes());

        // A device status is a completed call: UNKNOWN_MODEL in the result.
        assert_eq!(infer(42, &ins, &outs, std::ptr::null(), &mut r), AI_OK);
        assert_eq!(r.status, Status::UnknownModel as u32);
        // Output aliasing an input, bad priority, bad dtype: refused before the device.
        let alias = [AiOutput {
            desc: outs[0].desc,
            buffer: input,
        }];
        assert_eq!(
            infer(1, &ins, &alias, std::ptr::null(), &mut r),
            AI_E_INVALID
        );
        let bad_prio = AiInferOptions {
            priority: 9,
            ..Default::default()
        };
        assert_eq!(infer(1, &ins, &outs, &bad_prio, &mut r), AI_E_INVALID);
        let mut bad = ins;
        bad[0].desc.dtype = 0;
        assert_eq!(
            infer(1, &bad, &outs, std::ptr::null(), &mut r),
            AI_E_INVALID
        );
        bad[0].desc.dtype = 1;
        bad[0].desc.rank = 9;
        assert_eq!(
            infer(1, &bad, &outs, std::ptr::null(), &mut r),
            AI_E_INVALID
        );

        let mut count = 0usize;
        let mut one = [AiModelInfo::from_model(&crate::testing::fake_models()[0])];
        assert_eq!(
            ai_models(agent, one.as_mut_ptr(), 1, &mut count),
            AI_E_TOO_SMALL
        );
        assert_eq!(count, 2);
        let mut all = vec![one[0]; 2];
        assert_eq!(ai_models(agent, all.as_mut_ptr(), 2, &mut count), AI_OK);
        assert_eq!(
            CStr::from_ptr(all[1].name.as_ptr()).to_str().unwrap(),
            "text-stats"
        );
        assert_eq!(
            (
                all[1].num_inputs,
                all[1].inputs[0].dtype,
                all[1].inputs[0].dims_max[0]
            ),
            (1, 6, 4096)
        );

        let mut t = AiTrace::default();
        assert_eq!(ai_trace(agent, &mut t), AI_OK);
        assert_eq!((t.guest.submitted, t.device.infer_status[0]), (2, 1));
        let mut outcome = 0;
        assert_eq!(ai_cancel(agent, 5, &mut outcome), AI_OK);
        assert_eq!(outcome, 2);
        ai_close(agent);
    }
}
