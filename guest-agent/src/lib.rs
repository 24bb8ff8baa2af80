//! The aivmm guest agent: runs inside a tenant microVM and drives the `ai_infer` device from
//! userspace (see docs/ai_infer.md). Not implemented yet: the device and its host daemon
//! come first (issue "The ai_infer paravirtual device"); the wire format it will speak is
//! already fixed in `devices/ai-infer-protocol`.
