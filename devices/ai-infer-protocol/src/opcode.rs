//! Request opcodes and priority classes.

use std::fmt;

use crate::error::ProtocolError;

/// What a request asks the device to do (`le32 opcode` in the request header).
///
/// Zero is not an opcode, so a zero-filled (never written) header is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Opcode {
    /// Run a model on input tensors and write output tensors.
    Infer = 1,
    /// List the models this tenant may use, with their signatures.
    Models = 2,
    /// Snapshot this tenant's device-side counters and latency histogram.
    Trace = 3,
    /// Cancel an in-flight INFER by request id.
    Cancel = 4,
}

impl Opcode {
    /// Every opcode, in wire order.
    pub const ALL: [Opcode; 4] = [Opcode::Infer, Opcode::Models, Opcode::Trace, Opcode::Cancel];
}

impl TryFrom<u32> for Opcode {
    type Error = ProtocolError;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Opcode::Infer),
            2 => Ok(Opcode::Models),
            3 => Ok(Opcode::Trace),
            4 => Ok(Opcode::Cancel),
            other => Err(ProtocolError::UnknownOpcode(other)),
        }
    }
}

impl From<Opcode> for u32 {
    fn from(op: Opcode) -> u32 {
        op as u32
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Opcode::Infer => "INFER",
            Opcode::Models => "MODELS",
            Opcode::Trace => "TRACE",
            Opcode::Cancel => "CANCEL",
        })
    }
}

/// Scheduling class requested by the guest (`u8 priority` in the request header).
///
/// The device clamps it to the tenant's priority ceiling from the operator's policy;
/// the guest can ask for more but never get more than it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum PriorityClass {
    /// Throughput work; may wait longer so it can be batched.
    Batch = 0,
    /// The default class.
    #[default]
    Normal = 1,
    /// Latency-sensitive work; scheduled before Normal and Batch.
    Interactive = 2,
    /// Scheduled before every other class.
    Realtime = 3,
}

impl PriorityClass {
    /// Every class, lowest first.
    pub const ALL: [PriorityClass; 4] = [
        PriorityClass::Batch,
        PriorityClass::Normal,
        PriorityClass::Interactive,
        PriorityClass::Realtime,
    ];
}

impl TryFrom<u8> for PriorityClass {
    type Error = ProtocolError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(PriorityClass::Batch),
            1 => Ok(PriorityClass::Normal),
            2 => Ok(PriorityClass::Interactive),
            3 => Ok(PriorityClass::Realtime),
            other => Err(ProtocolError::UnknownPriority(other)),
        }
    }
}

impl From<PriorityClass> for u8 {
    fn from(p: PriorityClass) -> u8 {
        p as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode_round_trips_and_rejects_unknown_values() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::try_from(u32::from(op)), Ok(op));
        }
        assert_eq!(u32::from(Opcode::Infer), 1);
        assert_eq!(u32::from(Opcode::Cancel), 4);
        for bad in [0, 5, 0x100, u32::MAX] {
            assert_eq!(
                Opcode::try_from(bad),
                Err(ProtocolError::UnknownOpcode(bad))
            );
        }
    }

    #[test]
    fn priority_round_trips_and_rejects_unknown_values() {
        for p in PriorityClass::ALL {
            assert_eq!(PriorityClass::try_from(u8::from(p)), Ok(p));
        }
        assert!(PriorityClass::Realtime > PriorityClass::Interactive);
        assert!(PriorityClass::Normal > PriorityClass::Batch);
        assert_eq!(PriorityClass::default(), PriorityClass::Normal);
        for bad in [4u8, 0x80, u8::MAX] {
            assert_eq!(
                PriorityClass::try_from(bad),
                Err(ProtocolError::UnknownPriority(bad))
            );
        }
    }
}
