//! What can go wrong with one HTTP request, and the HTTP status each failure gets.

use ai_infer_protocol::Status;
use thiserror::Error;

use crate::api::ApiError;
use crate::chain::ChainError;
use crate::engine::EngineError;
use crate::ipc::IpcError;

/// A failed request: the message goes to the client in the protocol's error body.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ServeError {
    /// Malformed or inconsistent input (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such model or route (404).
    #[error("{0}")]
    NotFound(String),
    /// A method the route does not have (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A body or tensor beyond a limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The tenant is over its rate or quota (429).
    #[error("{0}")]
    Throttled(String),
    /// The device, the daemon or tensor memory is not available, or the queue is full
    /// (503).
    #[error("{0}")]
    Unavailable(String),
    /// The deadline cannot be or was not met (504).
    #[error("{0}")]
    Deadline(String),
    /// The device completed the request with a non-OK status.
    #[error("{message}")]
    Device {
        /// The device's status.
        status: Status,
        /// What to tell the client.
        message: String,
    },
    /// Anything else (500).
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    /// The HTTP status code.
    pub fn http_status(&self) -> u16 {
        match self {
            ServeError::BadRequest(_) => 400,
            ServeError::NotFound(_) => 404,
            ServeError::MethodNotAllowed(_) => 405,
            ServeError::TooLarge(_) => 413,
            ServeError::Throttled(_) => 429,
            ServeError::Unavailable(_) => 503,
            ServeError::Deadline(_) => 504,
            ServeError::Device { status, .. } => match status {
                Status::BadRequest | Status::BadTensor | Status::Unsupported => 400,
                Status::UnknownModel | Status::ModelNotAllowed => 404,
                Status::Throttled => 429,
                Status::QueueFull => 503,
                Status::Deadline => 504,
                _ => 500,
            },
            ServeError::Internal(_) => 500,
        }
    }

    /// The error for a request the device completed with a non-OK `status`.
    pub fn from_device(status: Status, detail: Option<u32>, model: &str) -> Self {
        let tensor = detail.map_or(String::new(), |d| format!(" (tensor {d})"));
        ServeError::Device {
            status,
            message: format!(
                "model {model:?}: the device answered {}{tensor}",
                status.name()
            ),
        }
    }
}

impl From<ApiError> for ServeError {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::UnknownModel(_) => ServeError::NotFound(msg),
            ApiError::Engine(EngineError::Chain(ChainError::Request(_)))
            | ApiError::Ipc(IpcError::Engine(EngineError::Chain(ChainError::Request(_)))) => {
                ServeError::BadRequest(msg)
            }
            // The daemon refused the request with a device status: as if the device had,
            // except that its own failures mean it is not available.
            ApiError::Ipc(IpcError::Daemon {
                status: Some(status),
                ..
            }) if ServeError::from_device(status, None, "").http_status() != 500 => {
                ServeError::Device {
                    status,
                    message: msg,
                }
            }
            ApiError::BadFlags(_)
            | ApiError::ForeignBuffer(_)
            | ApiError::BufferTooShort { .. } => ServeError::Internal(msg),
            // The driver, the device, the daemon connection or tensor memory failed.
            _ => ServeError::Unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_statuses_map_to_http_statuses() {
        let cases = [
            (Status::BadRequest, 400),
            (Status::UnknownOpcode, 500),
            (Status::UnknownModel, 404),
            (Status::ModelNotAllowed, 404),
            (Status::BadTensor, 400),
            (Status::BufferTooSmall, 500),
            (Status::Throttled, 429),
            (Status::QueueFull, 503),
            (Status::Deadline, 504),
            (Status::Cancelled, 500),
            (Status::BackendError, 500),
            (Status::Unsupported, 400),
        ];
        for (status, code) in cases {
            let e = ServeError::from_device(status, Some(1), "m");
            assert_eq!(e.http_status(), code, "{status:?}");
            assert!(e.to_string().contains(status.name()), "{e}");
        }
    }

    #[test]
    fn agent_errors_are_unavailable_or_not_found() {
        let e: ServeError = ApiError::UnknownModel("x".into()).into();
        assert_eq!(e.http_status(), 404);
        let e: ServeError = ApiError::Ipc(IpcError::NoDescriptor).into();
        assert_eq!(e.http_status(), 503);
        let e: ServeError = ApiError::Ipc(IpcError::Daemon {
            status: Some(Status::QueueFull),
            message: "busy".into(),
        })
        .into();
        assert_eq!(e.http_status(), 503);
        assert!(e.to_string().contains("busy"), "{e}");
    }
}
