//! Keeps one empty KVM VM open until killed, so that L1's kernel never re-patches its
//! scheduler while the rig runs.
//!
//! Why: every KVM VM takes a reference on the kernel's `preempt_notifier_key`, a static key
//! with a jump site in `__schedule()`. When the count goes 0 -> 1 (a first VM) or 1 -> 0 (the
//! last one gone) the kernel live-patches that site with `int3` breakpoints while both CPUs
//! keep scheduling. Under QEMU TCG this has wedged the rig's L1: both vCPUs were found
//! spinning at `__schedule+0x2ab` (the `preempt_notifier_key` site) and in `exc_int3` right
//! after aivmm started a VM. Holding one VM from boot keeps the count at least 1, so the
//! site is patched once, before any scenario runs, and never again.
//!
//! Usage (tests/rig/l1-init): `rig-kvm-hold &`. Prints nothing unless it cannot create the
//! VM (then it exits 1); l1-init checks that it is still running.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Kept (never dropped) until the process is killed; the kernel closes the VM then.
    let _vm = match kvm_ioctls::Kvm::new().and_then(|kvm| kvm.create_vm()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("rig-kvm-hold: cannot create a KVM VM: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        std::thread::park();
    }
}
