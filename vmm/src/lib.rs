//! aivmm: a rust-vmm based virtual machine monitor that runs one inference tenant per
//! microVM. This crate wires: config → host memory zones → KVM VM → boot → devices →
//! vCPU threads → event loop. Device models live in the `devices` crate.

pub mod api;
pub mod arch;
pub mod cli;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod host;
pub mod interrupts;
pub mod logger;
pub mod memory;
pub mod passthrough;
pub mod placement;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod test_support;

/// Exit codes of the `aivmm` binary (a process exit status is one byte).
pub mod exit_code {
    /// The guest powered off or reset, or the VMM was asked to stop (SIGTERM/SIGINT).
    pub const OK: u8 = 0;
    /// A runtime failure: a vCPU error, a KVM ioctl that failed.
    pub const RUNTIME_ERROR: u8 = 1;
    /// Bad input: the config, a path, a resource the host cannot provide.
    pub const BAD_INPUT: u8 = 2;
    /// A thread made a system call outside its seccomp filter (the SIGSYS handler ends
    /// the process with this code).
    pub const SECCOMP_VIOLATION: u8 = 3;
}
