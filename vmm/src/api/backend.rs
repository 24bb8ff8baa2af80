//! The link between the controller (on API threads) and the thread that owns the VM (the
//! main thread): the controller sends a validated config to start and runtime actions;
//! the owner builds and runs the VM with [`vm::run_controlled`] and answers.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use super::VmBackend;
use crate::config::ValidatedConfig;
use crate::event_loop::install_stop_signals;
use crate::host::HostTopology;
use crate::vcpu::StopReason;
use crate::vm::{self, GuestImage, RunControl, RuntimeAction, RuntimeRequest, VmError};

/// How long a runtime action may take before the API answers with an error.
const ACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the owner, waiting for a start, looks for a stop signal.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

type Reply = Sender<Result<(), String>>;

/// A config to boot and where to say whether it started.
pub struct StartRequest {
    pub cfg: ValidatedConfig,
    pub reply: Reply,
}

/// The controller's side.
pub struct ChannelBackend {
    starts: Sender<StartRequest>,
    actions: Sender<RuntimeRequest>,
    wake: EventFd,
}

/// The VM owner's side.
pub struct VmOwner {
    starts: Receiver<StartRequest>,
    actions: Receiver<RuntimeRequest>,
    wake: EventFd,
}

/// A connected pair.
pub fn link() -> std::io::Result<(ChannelBackend, VmOwner)> {
    let (starts_tx, starts) = channel();
    let (actions_tx, actions) = channel();
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    Ok((
        ChannelBackend {
            starts: starts_tx,
            actions: actions_tx,
            wake: wake.try_clone()?,
        },
        VmOwner {
            starts,
            actions,
            wake,
        },
    ))
}

const GONE: &str = "the VM's owner thread has exited";

impl VmBackend for ChannelBackend {
    fn start(&mut self, cfg: ValidatedConfig) -> Result<(), String> {
        let (reply, answer) = channel();
        self.starts
            .send(StartRequest { cfg, reply })
            .map_err(|_| GONE.to_string())?;
        answer.recv().map_err(|_| GONE.to_string())?
    }

    fn runtime(&mut self, action: RuntimeAction) -> Result<(), String> {
        let what = format!("{action:?}");
        let (reply, answer) = channel();
        self.actions
            .send(RuntimeRequest { action, reply })
            .map_err(|_| GONE.to_string())?;
        self.wake.write(1).map_err(|e| e.to_string())?;
        match answer.recv_timeout(ACTION_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "the VM did not act on {what} within {ACTION_TIMEOUT:?}"
            )),
            Err(RecvTimeoutError::Disconnected) => Err(GONE.to_string()),
        }
    }
}

/// Why the owner's loop ended.
pub enum Ended {
    /// A stop signal arrived before any VM started.
    SignalBeforeStart(i32),
    /// The VM ran and stopped.
    Stopped(StopReason),
}

impl VmOwner {
    /// Waits for start requests and runs the VM of the first that starts; a start that
    /// fails is answered with its error and the owner waits again. Returns when the VM
    /// stops, or when SIGTERM/SIGINT arrives before any start.
    pub fn run(self, kvm: &Kvm, host: &dyn HostTopology, start: Instant) -> Result<Ended, VmError> {
        let signal = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
            what: "the signal event",
            source,
        })?;
        let install = || {
            install_stop_signals(&signal).map_err(|source| VmError::Io {
                what: "signal handlers",
                source,
            })
        };
        install()?;
        loop {
            if signal.read().is_ok() {
                return Ok(Ended::SignalBeforeStart(crate::event_loop::last_signal()));
            }
            let req = match self.starts.recv_timeout(SIGNAL_POLL) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => continue,
                // The controller is gone: nothing can start a VM any more.
                Err(RecvTimeoutError::Disconnected) => {
                    return Ok(Ended::SignalBeforeStart(0));
                }
            };
            let pending: Rc<Cell<Option<Reply>>> = Rc::new(Cell::new(Some(req.reply)));
            let on_started = {
                let pending = pending.clone();
                Box::new(move || {
                    if let Some(reply) = pending.take() {
                        let _ = reply.send(Ok(()));
                    }
                })
            };
            let wake = self.wake.try_clone().map_err(|source| VmError::Io {
                what: "the control event",
                source,
            })?;
            let outcome = vm::run_controlled(
                &req.cfg,
                kvm,
                host,
                start,
                GuestImage::Linux,
                Some(RunControl {
                    requests: &self.actions,
                    wake,
                    on_started,
                }),
            );
            match (pending.take(), outcome) {
                // Never started: say why, and wait for the next attempt.
                (Some(reply), Err(e)) => {
                    let _ = reply.send(Err(e.to_string()));
                    // run_controlled pointed the signal handler at its own event.
                    install()?;
                }
                (Some(reply), Ok(reason)) => {
                    let _ = reply.send(Err(format!("the VM stopped while starting: {reason}")));
                    return Ok(Ended::Stopped(reason));
                }
                (None, outcome) => return outcome.map(Ended::Stopped),
            }
        }
    }
}
