//! Containment of guest memory sharing: a frontend that could shrink the memory it
//! shared (and so make the daemon fault with SIGBUS on its next access, taking every
//! tenant down with it) is refused at SET_MEM_TABLE, and sealed memory cannot shrink.
//! The daemon runs in this test process: a SIGBUS in it would kill the test.

mod common;

use ai_infer_protocol::Status;
use ai_infer_test_frontend::{FrontendError, FrontendOptions, TestFrontend};
use common::*;

/// Runs one add-one INFER of `values` on queue 0 and checks the result.
fn check_add_one(fe: &mut TestFrontend, id: u64, values: &[f32]) {
    let req = add_one_request(id, ADD_ONE, values.len() as u64);
    let done = fe.call(0, &req, &[&f32_bytes(values)], 0).unwrap();
    let h = done.header().unwrap();
    assert_eq!(h.status, Status::Ok, "{h:?}");
    assert_eq!(h.request_id, id);
    let expected: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
    assert_eq!(f32_values(&done.outputs[0]), expected);
}

fn two_tenants() -> Harness {
    Harness::start(
        1,
        &[
            TenantOpts::new("a", "[\"add-one\"]"),
            TenantOpts::new("b", "[\"add-one\"]"),
        ],
    )
}

#[test]
fn unsealed_memory_is_refused_and_the_other_tenant_keeps_being_served() {
    let h = two_tenants();
    let mut b = h.connect("b");
    check_add_one(&mut b, 1, &[1.0, 2.0]);

    // Tenant a's VMM shares memfds it could still shrink: refused at SET_MEM_TABLE.
    let unsealed = FrontendOptions {
        seal_memory: false,
        ..FrontendOptions::default()
    };
    match TestFrontend::connect(&h.socket("a"), unsealed) {
        Ok(_) => panic!("the daemon accepted guest memory that can shrink"),
        Err(FrontendError::Vhost(_)) => {}
        Err(e) => panic!("unexpected error: {e}"),
    }

    // The other tenant's connection is untouched and still served.
    for id in 2..6 {
        check_add_one(&mut b, id, &[id as f32]);
    }
    // Only a's connection ended: a VMM with sealed memory is served on the same slot.
    let mut a = h.connect("a");
    check_add_one(&mut a, 10, &[5.0, 6.0, 7.0]);
    check_add_one(&mut b, 11, &[8.0]);
}

#[test]
fn sealed_memory_cannot_shrink_and_the_daemon_keeps_serving() {
    let h = two_tenants();
    let mut a = h.connect("a");
    let mut b = h.connect("b");
    check_add_one(&mut a, 1, &[1.0]);

    // The attack: shrink (or grow) the shared memfd after SET_MEM_TABLE, then kick.
    for len in [0, 4096, 64 << 20] {
        match a.truncate_region(0, len) {
            Ok(()) => panic!("the shared memfd was resized to {len} bytes"),
            Err(FrontendError::Io(e)) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "resize to {len}: {e}")
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    // The daemon is alive and serves both tenants, the attacker included.
    check_add_one(&mut a, 2, &[2.0, 3.0]);
    check_add_one(&mut b, 3, &[4.0]);
}
