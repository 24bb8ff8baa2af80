//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port and MMIO exits to the
//! buses. A vCPU never exits the process: it reports why it stopped through [`Stop`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::host::CpuSet;
use crate::memory::numa;

/// Why the VM stopped; the first reason reported wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset the machine (i8042 reset, `reboot`, `poweroff -f` with `panic=-1`).
    GuestReset,
    /// The guest asked KVM for a shutdown or triple-faulted.
    GuestShutdown(&'static str),
    /// The host asked us to stop (SIGTERM/SIGINT).
    Signal(i32),
    /// A vCPU hit an error the VM cannot continue from.
    VcpuError(String),
}

impl StopReason {
    /// Process exit code: 0 for an orderly stop, 1 for an error.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::VcpuError(_) => 1,
            _ => 0,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestReset => write!(f, "the guest reset the machine"),
            StopReason::GuestShutdown(how) => write!(f, "the guest shut down ({how})"),
            StopReason::Signal(sig) => write!(f, "signal {sig}"),
            StopReason::VcpuError(msg) => write!(f, "vCPU error: {msg}"),
        }
    }
}

/// Shared stop state: a reason slot plus an EventFd the event loop waits on.
pub struct Stop {
    reason: Mutex<Option<StopReason>>,
    requested: AtomicBool,
    pub evt: EventFd,
}

impl Stop {
    pub fn new() -> std::io::Result<Self> {
        Ok(Stop {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` (unless one is already recorded) and wakes the event loop.
    pub fn request(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot signal the VM stop event: {e}");
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    pub id: u8,
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub stop: Arc<Stop>,
    pub affinity: Option<CpuSet>,
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler once per process; `KVM_RUN` then returns EINTR on a kick.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        let id = ctx.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run(fd, ctx))?;
        Ok(VcpuHandle { id, thread })
    }

    /// Kicks the thread until it leaves its run loop (the caller has set the stop flag),
    /// waiting at most `timeout`. A kick that lands outside `KVM_RUN` is lost, so repeat.
    pub fn stop(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() > deadline {
                log::warn!("vCPU {} did not stop within {:?}", self.id, timeout);
                return false;
            }
            let _ = self.thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        self.thread.join().is_ok()
    }
}

fn run(mut fd: VcpuFd, ctx: VcpuContext) {
    if let Some(cpus) = &ctx.affinity {
        if let Err(e) = numa::pin_current_thread(cpus) {
            log::warn!("cannot pin vCPU {} to CPUs {cpus}: {e}", ctx.id);
        }
    }
    while !ctx.stop.is_requested() {
        match fd.run() {
            Ok(exit) => {
                if let Some(reason) = handle_exit(exit, &ctx) {
                    ctx.stop.request(reason);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => ctx.stop.request(StopReason::VcpuError(format!(
                "vCPU {} KVM_RUN failed: {e}",
                ctx.id
            ))),
        }
    }
}

fn handle_exit(exit: VcpuExit, ctx: &VcpuContext) -> Option<StopReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.io_bus.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            ctx.io_bus.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio_bus.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.mmio_bus.write(addr, data);
        }
        VcpuExit::Hlt => return Some(StopReason::GuestShutdown("vCPU halted")),
        VcpuExit::Shutdown => return Some(StopReason::GuestShutdown("triple fault / shutdown")),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::GuestReset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    StopReason::GuestShutdown("system event shutdown")
                }
                other => StopReason::VcpuError(format!(
                    "vCPU {} reported unexpected system event {other}",
                    ctx.id
                )),
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(StopReason::VcpuError(format!(
                "vCPU {} failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                ctx.id
            )))
        }
        VcpuExit::InternalError => {
            return Some(StopReason::VcpuError(format!(
                "vCPU {} hit a KVM internal error (an instruction KVM cannot emulate?)",
                ctx.id
            )))
        }
        other => {
            return Some(StopReason::VcpuError(format!(
                "vCPU {} stopped on an unhandled exit: {other:?}",
                ctx.id
            )))
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> VcpuContext {
        VcpuContext {
            id: 3,
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            stop: Arc::new(Stop::new().unwrap()),
            affinity: None,
        }
    }

    #[test]
    fn entry_failure_and_internal_error_are_vcpu_errors_with_exit_code_1() {
        let c = ctx();
        let r = handle_exit(VcpuExit::FailEntry(0x21, 1), &c).unwrap();
        assert!(
            matches!(&r, StopReason::VcpuError(m) if m.contains("vCPU 3") && m.contains("0x21"))
        );
        assert_eq!(r.exit_code(), 1);
        let r = handle_exit(VcpuExit::InternalError, &c).unwrap();
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn guest_initiated_stops_exit_cleanly() {
        let c = ctx();
        let r = handle_exit(VcpuExit::Shutdown, &c).unwrap();
        assert_eq!(r.exit_code(), 0);
        let data = [0u64; 16];
        let r = handle_exit(
            VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET, &data),
            &c,
        )
        .unwrap();
        assert_eq!(r, StopReason::GuestReset);
    }

    #[test]
    fn port_io_to_nothing_reads_all_ones_and_keeps_running() {
        let c = ctx();
        let mut data = [0u8; 2];
        assert!(handle_exit(VcpuExit::IoIn(0x1234, &mut data), &c).is_none());
        assert_eq!(data, [0xff, 0xff]);
        assert!(handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]), &c).is_none());
    }

    #[test]
    fn first_stop_reason_wins() {
        let stop = Stop::new().unwrap();
        stop.request(StopReason::GuestReset);
        stop.request(StopReason::Signal(15));
        assert_eq!(stop.reason(), Some(StopReason::GuestReset));
        assert!(stop.is_requested());
        assert_eq!(stop.evt.read().unwrap(), 2);
    }
}
