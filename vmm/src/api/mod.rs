//! The control API: Firecracker's REST API over a unix socket (the subset aivmm can
//! honour, swagger version 1.17.0-dev), plus aivmm's extensions, and Firecracker's JSON
//! `--config-file`.
//!
//! - [`server`]: the socket and HTTP/1.1 framing (one accept thread, one short-lived thread
//!   per request, so a stalled client holds only its own thread);
//! - [`routes`]: method + path + body → [`routes::Request`], or a 400 naming the problem;
//! - [`types`]: the JSON bodies (Firecracker's shapes, unknown fields refused);
//! - [`convert`]: those bodies as aivmm's [`crate::config::VmConfig`], and back;
//! - [`controller`]: the pre-boot/post-boot rules, applied to the config and the VM;
//! - [`metrics`]: the metrics file's JSON lines and the Prometheus text.
//!
//! docs/api.md has the compatibility table; a new endpoint is a variant in
//! [`routes::Request`], its route in [`routes::parse`] and its arm in the controller.

pub mod backend;
pub mod controller;
pub mod convert;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod types;

pub use controller::{Controller, VmBackend};
pub use server::{bind, ApiServer};

/// An HTTP response: a status and an optional body (JSON unless `text`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
    /// The body is `text/plain` (Prometheus), not JSON.
    pub text: bool,
}

impl Response {
    /// 204, what every successful `PUT`, `PATCH` and action answers.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            text: false,
        }
    }

    /// 200 with `v` as JSON.
    pub fn json<T: serde::Serialize>(v: &T) -> Self {
        Response {
            status: 200,
            body: Some(controller::to_json(v)),
            text: false,
        }
    }

    /// 200 with a plain-text body.
    pub fn text(body: String) -> Self {
        Response {
            status: 200,
            body: Some(body),
            text: true,
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": "..."}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let message: String = message.into();
        Response {
            status,
            body: Some(serde_json::json!({ "fault_message": message }).to_string()),
            text: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::error(400, message)
    }
}
