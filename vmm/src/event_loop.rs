//! The VMM's main thread: an event-manager loop that waits for the VM to stop (vCPU
//! report, guest reset, host signal) and feeds host stdin to the serial console.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use devices::SerialConsole;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::{Stop, StopReason};

/// Event data tags of the fds the loop watches.
const TAG_STOP: u32 = 1;
const TAG_RESET: u32 = 2;
const TAG_SIGNAL: u32 = 3;
const TAG_STDIN: u32 = 4;
const TAG_POWEROFF: u32 = 5;
const TAG_CONTROL: u32 = 6;

/// The eventfd the SIGTERM/SIGINT handler writes to, and the last signal received.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; we pass a valid pointer to 8 bytes and the
        // fd is an eventfd that lives as long as the process's VM.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// The last SIGTERM/SIGINT received (0: none).
pub fn last_signal() -> i32 {
    LAST_SIGNAL.load(Ordering::SeqCst)
}

/// Routes SIGTERM and SIGINT to `evt`, so the loop can stop the VM in an orderly way.
pub fn install_stop_signals(evt: &EventFd) -> std::io::Result<()> {
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Watches the stop, reset and signal events and host stdin.
pub struct ControlLoop {
    stop: Arc<Stop>,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    signal_evt: EventFd,
    serial: Arc<Mutex<SerialConsole>>,
    stdin_enabled: bool,
    dropped_input: u64,
    /// Written by the control API when it queued a runtime request; reading it makes
    /// the loop return, and the VM's owner serves the queue.
    control_evt: Option<EventFd>,
}

impl ControlLoop {
    pub fn new(
        stop: Arc<Stop>,
        reset_evt: EventFd,
        poweroff_evt: EventFd,
        signal_evt: EventFd,
        serial: Arc<Mutex<SerialConsole>>,
        stdin_enabled: bool,
    ) -> Self {
        ControlLoop {
            stop,
            reset_evt,
            poweroff_evt,
            signal_evt,
            serial,
            stdin_enabled,
            dropped_input: 0,
            control_evt: None,
        }
    }

    /// Also watches `evt`, which the control API writes when it has queued a request.
    pub fn with_control_events(mut self, evt: EventFd) -> Self {
        self.control_evt = Some(evt);
        self
    }

    fn forward_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or a broken stdin: stop watching it, the guest keeps running.
                let _ = ops.remove(Events::with_data_raw(
                    libc::STDIN_FILENO,
                    TAG_STDIN,
                    EventSet::IN,
                ));
            }
            Ok(n) => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                match serial.enqueue_input(&buf[..n]) {
                    Ok(accepted) if accepted < n => {
                        self.dropped_input += (n - accepted) as u64;
                        log::warn!(
                            "serial input FIFO full: dropped {} bytes ({} so far)",
                            n - accepted,
                            self.dropped_input
                        );
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("serial input: {e}"),
                }
            }
        }
    }
}

impl MutEventSubscriber for ControlLoop {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAG_STOP => {
                let _ = self.stop.evt.read();
            }
            TAG_RESET => {
                let _ = self.reset_evt.read();
                self.stop.request(StopReason::GuestReset);
            }
            TAG_POWEROFF => {
                let _ = self.poweroff_evt.read();
                self.stop
                    .request(StopReason::GuestShutdown("ACPI power off"));
            }
            TAG_SIGNAL => {
                let _ = self.signal_evt.read();
                self.stop
                    .request(StopReason::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
            }
            TAG_STDIN => self.forward_stdin(ops),
            TAG_CONTROL => {
                if let Some(evt) = &self.control_evt {
                    let _ = evt.read();
                }
            }
            other => log::warn!("event loop: unexpected event tag {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd, tag| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.stop.evt.as_raw_fd(), TAG_STOP);
        add(self.reset_evt.as_raw_fd(), TAG_RESET);
        add(self.poweroff_evt.as_raw_fd(), TAG_POWEROFF);
        add(self.signal_evt.as_raw_fd(), TAG_SIGNAL);
        if self.stdin_enabled {
            add(libc::STDIN_FILENO, TAG_STDIN);
        }
        if let Some(evt) = &self.control_evt {
            add(evt.as_raw_fd(), TAG_CONTROL);
        }
    }
}
