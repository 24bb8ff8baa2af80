//! CUDA devices for the candle runtime (the bert backend), behind the cargo feature
//! `cuda`, which enables candle's CUDA backend (building it needs the CUDA toolkit).
//!
//! UNTESTED: the development and CI machines have no GPU and no CUDA toolkit; this
//! module is only compiled with the feature on. tract (the onnx backend) has no CUDA
//! support, so ONNX models always run on the CPU.

use candle_core::Device;
use thiserror::Error;

/// Why a CUDA device could not be opened.
#[derive(Debug, Error)]
pub enum CudaError {
    /// The driver, the device or its context failed.
    #[error("cannot open CUDA device {ordinal}: {reason}")]
    Open {
        /// The device ordinal asked for.
        ordinal: usize,
        /// candle's (cudarc's) explanation.
        reason: String,
    },
}

/// Opens CUDA device `ordinal` (as numbered by the driver, `CUDA_VISIBLE_DEVICES`
/// applied) for a bert model; its weights are loaded there and its forward passes run
/// there, only token ids in and embeddings out cross the bus.
pub fn cuda_device(ordinal: usize) -> Result<Device, CudaError> {
    Device::new_cuda(ordinal).map_err(|e| CudaError::Open {
        ordinal,
        reason: e.to_string(),
    })
}
