//! Feeds `vmm::api::routes::parse` (vmm/src/api/routes.rs) an HTTP method, path and body
//! as the API server hands them over, then takes an accepted request through the
//! pure conversions the controller applies before boot (vmm/src/api/convert.rs) and
//! renders the resulting `GET /vm/config`.
//!
//! Hostile because any local client of the API socket writes the path and the JSON
//! body: unknown and duplicate fields, wrong types, huge numbers, odd ids, bad MAC
//! addresses, bodies on GETs. Every problem must become a 400, never a panic.
//!
//! Input: byte 0 picks the method, byte 1 the path (one of the real endpoints), byte 2
//! is the length of a suffix appended to the path (ids, extra segments, a query), then
//! that suffix and the body.

#![no_main]

use aivmm_fuzz::api::{METHODS, PATHS};
use libfuzzer_sys::fuzz_target;
use vmm::api::routes::{metric_of, parse, Request};
use vmm::api::{controller, convert};

fuzz_target!(|data: &[u8]| {
    let [m, p, n, rest @ ..] = data else {
        return;
    };
    let method = METHODS[usize::from(*m) % METHODS.len()];
    let (suffix, body) = rest.split_at(usize::from(*n).min(rest.len()));
    let path = format!(
        "{}{}",
        PATHS[usize::from(*p) % PATHS.len()],
        String::from_utf8_lossy(suffix)
    );

    let req = match parse(method, &path, body) {
        Ok(req) => req,
        Err(response) => {
            assert_eq!(response.status, 400, "a refusal is a 400");
            let _ = metric_of(method, &path);
            return;
        }
    };
    let _ = req.metric();

    let mut cfg = convert::default_config();
    let mut passthrough_ids = Vec::new();
    match &req {
        Request::PutBootSource(b) => convert::apply_boot_source(&mut cfg, b),
        Request::PutMachineConfig(m) => {
            let _ = convert::apply_machine_config(&mut cfg, &convert::update_of(m));
        }
        Request::PatchMachineConfig(u) => {
            let _ = convert::apply_machine_config(&mut cfg, u);
        }
        Request::PutDrive(id, d) => {
            let _ = convert::check_path_id("drive", id, &d.drive_id);
            if let Ok(d) = convert::drive_config(d) {
                cfg.drives.push(d);
            }
        }
        Request::PutNet(id, n) => {
            let _ = convert::check_path_id("network interface", id, &n.iface_id);
            if let Ok(n) = convert::net_config(n) {
                cfg.net.push(n);
            }
        }
        Request::PutVsock(v) => cfg.vsock = Some(convert::vsock_config(v)),
        Request::PutPassthrough(id, p) => {
            cfg.passthrough.push(convert::passthrough_config(p));
            passthrough_ids.push(id.clone());
        }
        _ => {}
    }
    let _ = controller::to_json(&convert::full_config(&cfg, &passthrough_ids));
});
