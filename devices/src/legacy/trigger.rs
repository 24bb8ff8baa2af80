//! An `EventFd` that `vm-superio` devices can signal.
//!
//! `vm-superio` notifies through its `Trigger` trait; the VMM wants `EventFd`s, which it
//! registers with KVM as irqfds (interrupts) or with its event loop (reset). This newtype
//! joins the two, since neither the trait nor `EventFd` is defined in this crate.

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An `EventFd` that is signalled (its counter incremented by one) on every trigger.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `event`. Signalling the trigger writes 1 to it.
    pub fn new(event: EventFd) -> Self {
        Self(event)
    }

    /// The wrapped `EventFd`.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_signals_the_event_fd() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let trigger = EventFdTrigger::new(event.try_clone().unwrap());
        // Nothing pending yet.
        assert_eq!(event.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        trigger.trigger().unwrap();
        trigger.trigger().unwrap();
        assert_eq!(event.read().unwrap(), 2);
    }
}
