//! Per-request status codes and CANCEL outcomes.

use std::fmt;

use crate::error::ProtocolError;

/// Outcome of one request (`le32 status` in the response header).
///
/// A status only ever describes its own request: no code means "the device is broken"
/// or affects other requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The request succeeded.
    Ok = 0,
    /// The request is malformed (lengths, counts, reserved fields, enum values, chain).
    BadRequest = 1,
    /// The opcode is not one this protocol version defines.
    UnknownOpcode = 2,
    /// No model with this id exists.
    UnknownModel = 3,
    /// The model exists but the tenant's policy does not allow it.
    ModelNotAllowed = 4,
    /// A tensor does not match the model's signature (count, dtype, rank, shape).
    BadTensor = 5,
    /// A device-writable buffer is too small; the response says how much is needed.
    BufferTooSmall = 6,
    /// The tenant is over its rate or quota; retry later.
    Throttled = 7,
    /// The tenant's in-flight limit or the device's queue is full; retry later.
    QueueFull = 8,
    /// The deadline cannot be met (or passed while queued); the request did not run.
    Deadline = 9,
    /// The request was cancelled by a CANCEL before it started to compute.
    Cancelled = 10,
    /// The inference runtime failed.
    BackendError = 11,
    /// A well-formed request uses something this device does not support.
    Unsupported = 12,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 13] = [
        Status::Ok,
        Status::BadRequest,
        Status::UnknownOpcode,
        Status::UnknownModel,
        Status::ModelNotAllowed,
        Status::BadTensor,
        Status::BufferTooSmall,
        Status::Throttled,
        Status::QueueFull,
        Status::Deadline,
        Status::Cancelled,
        Status::BackendError,
        Status::Unsupported,
    ];

    /// Upper-case name as written in the specification.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "BAD_REQUEST",
            Status::UnknownOpcode => "UNKNOWN_OPCODE",
            Status::UnknownModel => "UNKNOWN_MODEL",
            Status::ModelNotAllowed => "MODEL_NOT_ALLOWED",
            Status::BadTensor => "BAD_TENSOR",
            Status::BufferTooSmall => "BUFFER_TOO_SMALL",
            Status::Throttled => "THROTTLED",
            Status::QueueFull => "QUEUE_FULL",
            Status::Deadline => "DEADLINE",
            Status::Cancelled => "CANCELLED",
            Status::BackendError => "BACKEND_ERROR",
            Status::Unsupported => "UNSUPPORTED",
        }
    }

    /// Whether the same request may succeed if resubmitted unchanged later.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Status::Throttled | Status::QueueFull | Status::Deadline
        )
    }
}

impl TryFrom<u32> for Status {
    type Error = ProtocolError;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Status::ALL
            .iter()
            .copied()
            .find(|s| *s as u32 == value)
            .ok_or(ProtocolError::UnknownStatus(value))
    }
}

impl From<Status> for u32 {
    fn from(s: Status) -> u32 {
        s as u32
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a CANCEL found (`detail` of an OK CANCEL response).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CancelOutcome {
    /// The target had not started computing; it has been completed with CANCELLED
    /// (its used element is published before the CANCEL's).
    Cancelled = 1,
    /// No in-flight INFER of this tenant has that request id (never submitted,
    /// already completed, or not yet taken from its queue).
    NotFound = 2,
    /// The target is already computing; it will complete normally.
    AlreadyRunning = 3,
}

impl TryFrom<u32> for CancelOutcome {
    type Error = ProtocolError;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(CancelOutcome::Cancelled),
            2 => Ok(CancelOutcome::NotFound),
            3 => Ok(CancelOutcome::AlreadyRunning),
            other => Err(ProtocolError::UnknownCancelOutcome(other)),
        }
    }
}

impl From<CancelOutcome> for u32 {
    fn from(c: CancelOutcome) -> u32 {
        c as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::STATUS_SLOTS;

    #[test]
    fn status_round_trips_and_rejects_unknown_values() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(u32::from(*s), i as u32);
            assert_eq!(Status::try_from(i as u32), Ok(*s));
        }
        for bad in [13u32, 16, 0xffff, u32::MAX] {
            assert_eq!(
                Status::try_from(bad),
                Err(ProtocolError::UnknownStatus(bad))
            );
        }
        // TRACE keeps one counter per status code.
        assert!(Status::ALL.len() <= STATUS_SLOTS);
    }

    #[test]
    fn status_names_and_retryability() {
        assert_eq!(Status::ModelNotAllowed.to_string(), "MODEL_NOT_ALLOWED");
        assert!(Status::Throttled.is_retryable());
        assert!(!Status::BadTensor.is_retryable());
    }

    #[test]
    fn cancel_outcome_round_trips_and_rejects_unknown_values() {
        for c in [
            CancelOutcome::Cancelled,
            CancelOutcome::NotFound,
            CancelOutcome::AlreadyRunning,
        ] {
            assert_eq!(CancelOutcome::try_from(u32::from(c)), Ok(c));
        }
        for bad in [0u32, 4, u32::MAX] {
            assert_eq!(
                CancelOutcome::try_from(bad),
                Err(ProtocolError::UnknownCancelOutcome(bad))
            );
        }
    }
}
