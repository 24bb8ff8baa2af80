//! The interrupt object a virtio device raises when it has used buffers or its
//! configuration changed.
//!
//! The transport builds it at activation from the MSI-X vectors the driver chose: each
//! queue's eventfd is that vector's irqfd, so a device thread (or a vhost-user backend)
//! interrupts the guest without passing through the VMM. A queue without a vector gets
//! an eventfd nobody listens to.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// Per-queue and configuration-change notifications towards the driver.
#[derive(Debug)]
pub struct VirtioInterrupt {
    queues: Vec<EventFd>,
    config: Option<EventFd>,
}

impl VirtioInterrupt {
    /// `queues[i]` raises queue `i`'s interrupt; `config` the configuration-change one.
    pub fn new(queues: Vec<EventFd>, config: Option<EventFd>) -> Self {
        Self { queues, config }
    }

    /// An interrupt with fresh eventfds that nobody listens to (tests read them back).
    pub fn unconnected(num_queues: usize) -> io::Result<Self> {
        let queues = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(queues, Some(EventFd::new(libc::EFD_NONBLOCK)?)))
    }

    /// Signals that queue `index` has used buffers. An unknown index is ignored.
    pub fn signal_queue(&self, index: usize) -> io::Result<()> {
        match self.queues.get(index) {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }

    /// Signals a configuration change.
    pub fn signal_config(&self) -> io::Result<()> {
        match &self.config {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }

    /// Queue `index`'s eventfd, for devices served outside the process (vhost-user).
    pub fn queue_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.queues.get(index)
    }

    /// The configuration-change eventfd, when the driver set a vector for it.
    pub fn config_eventfd(&self) -> Option<&EventFd> {
        self.config.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_reach_the_queue_and_config_eventfds() {
        let irq = VirtioInterrupt::unconnected(2).unwrap();
        irq.signal_queue(1).unwrap();
        irq.signal_queue(1).unwrap();
        irq.signal_queue(7).unwrap();
        irq.signal_config().unwrap();
        assert_eq!(irq.queue_eventfd(1).unwrap().read().unwrap(), 2);
        assert!(
            irq.queue_eventfd(0).unwrap().read().is_err(),
            "queue 0 untouched"
        );
        assert_eq!(irq.config_eventfd().unwrap().read().unwrap(), 1);
    }
}
