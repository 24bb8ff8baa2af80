//! What aivmm and ai-inferd share to confine themselves once they are set up:
//!
//! - [`seccomp`]: named per-thread filters compiled from a program's reviewed JSON, each
//!   thread installing its own, and a SIGSYS handler that names the offending thread and
//!   syscall and ends the process; [`codegen`]: compiling the JSON in a program's build
//!   script, so that the program starts with static BPF tables;
//! - [`privilege`]: leaving root for good (`--run-as UID:GID`);
//! - [`bpf`]: a classic-BPF evaluator, so that a program's tests can ask its filters what
//!   they answer for a syscall without installing them; [`seccomp_child`]: running a test in a
//!   child process, where a violation may end it.
//!
//! Which threads exist and what each may call is each program's own (`vmm/seccomp/`,
//! `devices/ai-inferd/seccomp/`); see docs/security.md.

pub mod bpf;
pub mod codegen;
pub mod privilege;
pub mod seccomp;
pub mod seccomp_child;
