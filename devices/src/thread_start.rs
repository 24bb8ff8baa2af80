//! What every long-lived device thread runs first, before it touches guest memory or its
//! backend. The VMM sets the hook once (it installs the thread's seccomp filter); without
//! one, nothing runs.
//!
//! Device threads are started on the thread that creates the device (the VMM's main
//! thread during setup), never at activation: activation runs on a vCPU thread, and a
//! thread started there would be bound by the vCPU's filter as well as its own.

use std::io;
use std::sync::{mpsc, OnceLock};
use std::thread::JoinHandle;

/// The kinds of device thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceThread {
    /// An in-process virtio device's queue thread ([`crate::virtio::WorkerThread`]).
    VirtioWorker,
    /// The vhost-user device thread and its watchdog.
    VhostUser,
}

/// Runs on a new device thread before anything else; an error ends the thread.
pub type StartHook = fn(DeviceThread) -> io::Result<()>;

static HOOK: OnceLock<StartHook> = OnceLock::new();

/// Sets the hook for every device thread started from now on. Only the first call takes
/// effect; returns whether this one did.
pub fn set_start_hook(hook: StartHook) -> bool {
    HOOK.set(hook).is_ok()
}

/// Runs the hook, if any, for a thread of `kind` (called on that thread).
pub(crate) fn run_start_hook(kind: DeviceThread) -> io::Result<()> {
    match HOOK.get() {
        Some(hook) => hook(kind),
        None => Ok(()),
    }
}

/// Starts the device thread `name` of `kind`: it runs the start hook, then `body`. Returns
/// once the hook has run, with its error (the thread then ended without running `body`).
pub(crate) fn spawn_device_thread(
    kind: DeviceThread,
    name: impl Into<String>,
    body: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let name = name.into();
    let (ready, started) = mpsc::channel();
    let thread = crate::thread::named(name.clone()).spawn(move || {
        let hook = run_start_hook(kind);
        let ok = hook.is_ok();
        let _ = ready.send(hook);
        if ok {
            body();
        }
    })?;
    match started.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(io::Error::other(format!(
            "the device thread {name} ended while starting"
        ))),
    }
}
