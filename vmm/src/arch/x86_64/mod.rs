//! x86_64: guest-physical layout, boot protocols, CPUID, vCPU register state, MP table.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod image;
pub mod layout;
pub mod mptable;
pub mod regs;
