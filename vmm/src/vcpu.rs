//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port and MMIO exits to the
//! buses. A vCPU never exits the process: it reports why it stopped through [`Stop`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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
    pub fn exit_code(&self) -> u8 {
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

/// One vCPU's exits by kind, on a cache line of its own: each vCPU adds to its own
/// counters (a relaxed add per exit that no other vCPU's exits contend with), and readers
/// sum the slots ([`exit_totals`]).
#[derive(Debug)]
#[repr(align(64))]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    /// `KVM_RUN` returned EINTR/EAGAIN (kicks: pause, stop).
    pub interrupted: AtomicU64,
    /// Exits that stopped the VM with an error.
    pub failures: AtomicU64,
}

impl ExitCounters {
    const fn new() -> Self {
        ExitCounters {
            io_in: AtomicU64::new(0),
            io_out: AtomicU64::new(0),
            mmio_read: AtomicU64::new(0),
            mmio_write: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

/// Counter slots, one per vCPU id (ids beyond share a slot, which stays correct).
const EXIT_SLOTS: usize = 64;

/// The process's exit counters (one VM per process), by vCPU id.
static EXITS: [ExitCounters; EXIT_SLOTS] = [const { ExitCounters::new() }; EXIT_SLOTS];

/// Exits by kind, summed over every vCPU: io_in, io_out, mmio_read, mmio_write,
/// interrupted, failures.
pub fn exit_totals() -> [(&'static str, u64); 6] {
    let sum = |f: fn(&ExitCounters) -> &AtomicU64| {
        EXITS
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum::<u64>()
    };
    [
        ("exit_io_in", sum(|c| &c.io_in)),
        ("exit_io_out", sum(|c| &c.io_out)),
        ("exit_mmio_read", sum(|c| &c.mmio_read)),
        ("exit_mmio_write", sum(|c| &c.mmio_write)),
        ("exit_interrupted", sum(|c| &c.interrupted)),
        ("failures", sum(|c| &c.failures)),
    ]
}

fn exits(id: u8) -> &'static ExitCounters {
    &EXITS[usize::from(id) % EXIT_SLOTS]
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Pausing: the control thread raises the request and kicks the vCPUs out of `KVM_RUN`;
/// each parks here (never inside `KVM_RUN`) until the request is lowered or the VM stops.
#[derive(Debug, Default)]
pub struct Pause {
    requested: AtomicBool,
    /// vCPU threads parked now.
    parked: Mutex<usize>,
    changed: Condvar,
}

/// How often a parked vCPU looks at the stop flag (a stop does not lower the request).
const PARK_POLL: Duration = Duration::from_millis(50);

impl Pause {
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Raises the request; the caller then kicks the vCPUs until [`Pause::parked`] says
    /// all of them are parked.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Lowers the request and wakes the parked vCPUs.
    pub fn release(&self) {
        self.requested.store(false, Ordering::SeqCst);
        let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    /// vCPUs parked now.
    pub fn parked(&self) -> usize {
        *self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for the parked count to change.
    fn wait_change(&self, timeout: Duration) {
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.changed.wait_timeout(parked, timeout);
    }

    /// Called by a vCPU thread: parks while the request stands and the VM runs.
    fn park(&self, stop: &Stop) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *parked += 1;
        self.changed.notify_all();
        while self.is_requested() && !stop.is_requested() {
            parked = match self.changed.wait_timeout(parked, PARK_POLL) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        *parked -= 1;
        self.changed.notify_all();
    }
}

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    pub id: u8,
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub stop: Arc<Stop>,
    pub affinity: Option<CpuSet>,
    pub pause: Arc<Pause>,
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
        let thread = devices::thread::named(format!("vcpu{id}")).spawn(move || run(fd, ctx))?;
        Ok(VcpuHandle { id, thread })
    }

    /// Sends the kick signal once: a thread in `KVM_RUN` returns from it.
    pub fn kick(&self) {
        let _ = self.thread.kill(kick_signal());
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
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

/// Parks every running vCPU of `handles` (kicking them out of `KVM_RUN` until they are),
/// waiting at most `timeout`. On a timeout the request is lowered again and the VM runs on.
pub fn pause_all(handles: &[VcpuHandle], pause: &Pause, timeout: Duration) -> Result<(), String> {
    pause.request();
    let deadline = Instant::now() + timeout;
    loop {
        let running = handles.iter().filter(|h| !h.is_finished()).count();
        if pause.parked() >= running {
            return Ok(());
        }
        if Instant::now() > deadline {
            pause.release();
            return Err(format!(
                "{} of {running} vCPU(s) did not leave the guest within {timeout:?}",
                running - pause.parked()
            ));
        }
        for h in handles.iter().filter(|h| !h.is_finished()) {
            h.kick();
        }
        pause.wait_change(Duration::from_millis(2));
    }
}

fn run(mut fd: VcpuFd, ctx: VcpuContext) {
    if let Some(cpus) = &ctx.affinity {
        if let Err(e) = numa::pin_current_thread(cpus) {
            log::warn!("cannot pin vCPU {} to CPUs {cpus}: {e}", ctx.id);
        }
    }
    // Before the first KVM_RUN: from here on the guest drives this thread.
    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
        ctx.stop
            .request(StopReason::VcpuError(format!("vCPU {}: {e}", ctx.id)));
        return;
    }
    while !ctx.stop.is_requested() {
        if ctx.pause.is_requested() {
            ctx.pause.park(&ctx.stop);
            continue;
        }
        match fd.run() {
            Ok(exit) => {
                if let Some(reason) = handle_exit(exit, &ctx) {
                    if reason.exit_code() != 0 {
                        count(&exits(ctx.id).failures);
                    }
                    ctx.stop.request(reason);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&exits(ctx.id).interrupted);
            }
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
            count(&exits(ctx.id).io_in);
            ctx.io_bus.read(u64::from(port), data);
        }
        VcpuExit::IoOut(port, data) => {
            count(&exits(ctx.id).io_out);
            ctx.io_bus.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            count(&exits(ctx.id).mmio_read);
            ctx.mmio_bus.read(addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            count(&exits(ctx.id).mmio_write);
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
            pause: Arc::new(Pause::default()),
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

    #[test]
    fn a_parked_vcpu_waits_for_release_or_stop() {
        let pause = Arc::new(Pause::default());
        let stop = Arc::new(Stop::new().unwrap());
        pause.request();
        let (p, s) = (pause.clone(), stop.clone());
        let t = std::thread::spawn(move || p.park(&s));
        while pause.parked() != 1 {
            pause.wait_change(Duration::from_millis(10));
        }
        pause.release();
        t.join().unwrap();
        assert_eq!(pause.parked(), 0);

        pause.request();
        let (p, s) = (pause.clone(), stop.clone());
        let t = std::thread::spawn(move || p.park(&s));
        stop.request(StopReason::Signal(15));
        t.join().unwrap();
        assert!(pause.is_requested());
    }
}
