//! The daemon's vring: vhost-user-backend's, plus the error eventfd the frontend gives
//! each ring (VHOST_USER_SET_VRING_ERR). vhost-user-backend stores that eventfd but
//! offers no way to signal it, so this wrapper keeps its own handle: a queue the guest
//! broke is then reported to the VMM, which raises DEVICE_NEEDS_RESET.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// A vring that can tell the frontend it is broken.
#[derive(Clone)]
pub struct ReportingVring {
    inner: VringRwLock<Mem>,
    err: Arc<Mutex<Option<File>>>,
}

impl ReportingVring {
    /// Signals the ring's error eventfd; `Ok(false)` if the frontend gave none.
    pub fn signal_error(&self) -> io::Result<bool> {
        let err = self.err.lock().unwrap_or_else(|p| p.into_inner());
        match err.as_ref() {
            Some(mut file) => file.write_all(&1u64.to_ne_bytes()).map(|()| true),
            None => Ok(false),
        }
    }
}

impl<'a> VringStateGuard<'a, Mem> for ReportingVring {
    type G = <VringRwLock<Mem> as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for ReportingVring {
    type G = <VringRwLock<Mem> as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for ReportingVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(Self {
            inner: VringRwLock::new(mem, max_queue_size)?,
            err: Arc::new(Mutex::new(None)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        // Our handle is a duplicate; one that cannot be made only costs the report.
        let ours = file.as_ref().and_then(|f| f.try_clone().ok());
        *self.err.lock().unwrap_or_else(|p| p.into_inner()) = ours;
        self.inner.set_err(file)
    }
}
