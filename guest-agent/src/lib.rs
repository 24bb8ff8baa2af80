//! The aivmm guest agent: runs inside a tenant microVM and drives the `ai_infer`
//! device (docs/ai_infer.md) from userspace, DPDK style: it maps the device's BARs
//! through sysfs, keeps its virtqueues and tensors in locked huge pages whose
//! guest-physical addresses come from pagemap, and polls for completions. No guest
//! kernel driver is involved and the request path makes no system calls.

pub mod api;
pub mod backoff;
pub mod capi;
pub mod chain;
pub mod device;
pub mod dma;
pub mod driver;
pub mod engine;
pub mod ipc;
pub mod mmio;
pub mod pci;
pub mod serve;
pub mod stats;
pub mod tensor_io;
pub mod transport;
pub mod virtqueue;

#[cfg(any(test, feature = "fake-device"))]
pub mod testing;
