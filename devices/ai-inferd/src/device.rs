//! The vhost-user backend of one tenant connection: feature and config negotiation,
//! guest memory, and taking chains off the request queues.
//!
//! One [`TenantDevice`] exists per accepted VMM connection. Its vring worker thread
//! (owned by `vhost-user-backend`) calls [`VhostUserBackend::handle_event`] on a kick;
//! the device then takes every available chain in ring order, walks it (§9 step 0)
//! and hands it to [`crate::intake`]. Queue resets (GET_VRING_BASE, RESET_DEVICE)
//! abandon the queue's work and wait until no executor still computes for it, so
//! that after the reset nothing the guest made available before is read or written.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ai_infer_protocol::{DeviceConfig, DEVICE_FEATURES, QUEUE_SIZE_MAX};
use log::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::{Error as QueueError, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain;
use crate::engine::Engine;
use crate::intake;
use crate::tenant::Tenant;
use crate::ticket::{ChainTicket, Vring};

/// Longest a queue reset waits for a running batch of that queue to finish.
pub const RESET_WAIT: Duration = Duration::from_secs(60);

/// The vhost-user backend for one tenant connection.
pub struct TenantDevice {
    engine: Arc<Engine>,
    tenant: Arc<Tenant>,
    /// The tenant's limits when the connection started (its config space).
    limits: DeviceConfig,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    event_idx: AtomicBool,
    /// Queues that showed ring-level corruption; not served until reset.
    broken: Vec<AtomicBool>,
}

impl TenantDevice {
    /// A device for a new connection of `tenant`.
    pub fn new(engine: Arc<Engine>, tenant: Arc<Tenant>) -> Self {
        let limits = tenant.grant().device_config;
        let queues = usize::from(limits.num_request_queues);
        TenantDevice {
            engine,
            tenant,
            limits,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            broken: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Abandons the work of the queues `which` selects (reset or disconnect): queued
    /// jobs are dropped unanswered, running ones are waited for and their results
    /// discarded.
    pub fn abandon(&self, which: impl Fn(u16) -> bool) {
        let queued = self.tenant.abandon(&which);
        let id = self.tenant.spec.id;
        for request_id in queued {
            // Dropping the job drops its memory reference; it is never completed.
            drop(
                self.engine
                    .scheduler
                    .with_core(|core| core.cancel(id, request_id)),
            );
        }
        if !self.tenant.wait_idle(&which, RESET_WAIT) {
            error!(
                "{}: a batch still runs {}s after a reset; its outputs may land late",
                self.tenant.spec.name,
                RESET_WAIT.as_secs()
            );
        }
        for (q, flag) in self.broken.iter().enumerate() {
            if which(q as u16) {
                flag.store(false, Ordering::SeqCst);
            }
        }
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn mark_broken(&self, queue: u16, vring: &Vring, why: &str) {
        error!(
            "{}: queue {queue}: {why}; the queue is not served until the driver resets it",
            self.tenant.spec.name
        );
        if let Some(flag) = self.broken.get(usize::from(queue)) {
            flag.store(true, Ordering::SeqCst);
        }
        // Tell the VMM, which raises DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2).
        if let Err(e) = vring.signal_error() {
            warn!(
                "{}: queue {queue}: cannot report the broken queue to the VMM: {e}",
                self.tenant.spec.name
            );
        }
    }

    fn is_broken(&self, queue: u16) -> bool {
        self.broken
            .get(usize::from(queue))
            .is_none_or(|flag| flag.load(Ordering::SeqCst))
    }

    /// Serves `queue` until its available ring is empty (re-checking after enabling
    /// notifications when EVENT_IDX is on, so no kick is lost).
    fn serve_queue(&self, queue: u16, vring: &Vring) {
        let Some(atomic) = self.memory() else {
            debug!("{}: kick before the memory table", self.tenant.spec.name);
            return;
        };
        let event_idx = self.event_idx.load(Ordering::SeqCst);
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    warn!(
                        "{}: cannot disable notifications: {e}",
                        self.tenant.spec.name
                    );
                }
            }
            while self.take_one(queue, vring, &atomic) {}
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(
                        "{}: cannot enable notifications: {e}",
                        self.tenant.spec.name
                    );
                    break;
                }
            }
        }
    }

    /// Takes and handles one chain; false when there is none (or the queue stopped).
    fn take_one(
        &self,
        queue: u16,
        vring: &Vring,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> bool {
        if self.is_broken(queue) {
            return false;
        }
        let mem = atomic.memory().into_inner();
        let taken = {
            let mut state = vring.get_mut();
            // A reset disables the vring (RESET_DEVICE) or marks it not ready
            // (GET_VRING_BASE) before it abandons the queue's work: from then on
            // nothing is taken until the driver sets the queue up again.
            if !state.is_enabled() {
                return false;
            }
            let q = state.get_queue_mut();
            if !q.ready() {
                return false;
            }
            // Read with the vring lock held and the ring live, so the generation is the
            // one the chain belongs to: a reset bumps it only after stopping the ring,
            // and the ring is live again only after the bump. (Read before the lock, a
            // reset and restart in between made a new chain look stale: dropped
            // unanswered, its kick lost.)
            let generation = self.tenant.generation(queue);
            let (size, desc_table) = (q.size(), q.desc_table());
            match q.iter(&*mem) {
                Ok(mut avail) => avail
                    .next()
                    .map(|c| (c.head_index(), size, desc_table, generation)),
                Err(QueueError::InvalidAvailRingIndex) => {
                    drop(state);
                    self.mark_broken(
                        queue,
                        vring,
                        "available index moved by more than the queue size",
                    );
                    return false;
                }
                Err(e) => {
                    drop(state);
                    self.mark_broken(
                        queue,
                        vring,
                        &format!("cannot read the available ring: {e}"),
                    );
                    return false;
                }
            }
        };
        let Some((head, size, desc_table, generation)) = taken else {
            return false;
        };
        if head >= size {
            self.mark_broken(
                queue,
                vring,
                &format!("head index {head} ≥ queue size {size}"),
            );
            return false;
        }
        let arrival = self.engine.scheduler.now();
        let max_descriptors = self.limits.max_chain_descriptors;
        let walked = chain::walk(&*mem, GuestAddress(desc_table), size, head, max_descriptors);
        let ticket = |writable, writable_len| ChainTicket {
            tenant: Arc::clone(&self.tenant),
            queue,
            generation,
            vring: vring.clone(),
            mem: Arc::clone(&mem),
            head,
            writable,
            writable_len,
            arrival,
            running: AtomicBool::new(false),
        };
        match walked {
            Ok(walked) => {
                let t = ticket(walked.writable, walked.writable_len);
                intake::handle_chain(
                    &self.engine,
                    &walked.readable,
                    walked.readable_len,
                    t,
                    &self.limits,
                );
            }
            Err(e) => {
                debug!(
                    "{}: queue {queue}: chain {head}: {e}",
                    self.tenant.spec.name
                );
                ticket(Vec::new(), 0).complete_unanswerable();
            }
        }
        true
    }
}

impl VhostUserBackend for TenantDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.limits.num_request_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE_MAX)
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut space = [0u8; ai_infer_protocol::CONFIG_SPACE_LEN];
        if self.limits.encode(&mut space).is_err() {
            return Vec::new();
        }
        let start = offset as usize;
        // An empty answer is how vhost-user reports a bad range.
        match start.checked_add(size as usize) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let table = mem.memory().into_inner();
        if let Err(e) = check_memory_table(&table) {
            error!(
                "{}: memory table refused, closing the connection: {e}",
                self.tenant.spec.name
            );
            *self.mem.write().unwrap_or_else(|p| p.into_inner()) = None;
            // The crate installed the table in the vrings before asking: take it out at
            // once, so that nothing touches the refused mappings until the connection
            // ends (the error returned here ends it).
            match mem.lock() {
                Ok(guard) => guard.replace(GuestMemoryMmap::new()),
                Err(p) => p.into_inner().replace(GuestMemoryMmap::new()),
            }
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
        }
        // Chains are taken from this private copy, which only ever holds checked tables.
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(GuestMemoryAtomic::from(table));
        Ok(())
    }

    fn reset_device(&self) {
        self.abandon(|_| true);
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Ok(queue) = u16::try_from(queue_index) else {
            return Ok(());
        };
        self.abandon(|q| q == queue);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread serves every queue of the connection, so CANCEL and its
        // target are handled in order even across queues of one tenant.
        let n = self.num_queues();
        vec![if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!(
                    "{}: cannot create an exit event: {e}",
                    self.tenant.spec.name
                );
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned here would end the worker thread; guest-caused problems are
        // handled per chain or per queue instead.
        if let Some(vring) = vrings.get(usize::from(device_event)) {
            self.serve_queue(device_event, vring);
        }
        Ok(())
    }
}

/// Why a memory table (SET_MEM_TABLE) is refused. The daemon maps every region of
/// every tenant; a region whose file can shrink under that mapping would turn the next
/// access into SIGBUS for the whole daemon, so only files sealed against resizing and
/// long enough for the region are accepted.
#[derive(Debug, thiserror::Error)]
pub enum MemoryTableError {
    /// The region has no file behind it.
    #[error("region {index} at guest address {gpa:#x} ({len} bytes) has no file")]
    NoFile {
        /// Position in the table.
        index: usize,
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The region's seals cannot be read (the file is not a memfd).
    #[error("region {index} at guest address {gpa:#x}: cannot read the file's seals ({source}); guest memory must be a sealed memfd")]
    Seals {
        /// Position in the table.
        index: usize,
        /// Guest-physical start.
        gpa: u64,
        /// The fcntl error.
        source: io::Error,
    },
    /// The region's file may still shrink or grow.
    #[error("region {index} at guest address {gpa:#x}: the file is not sealed against shrinking and growing (seals {seals:#x}, F_SEAL_SHRINK | F_SEAL_GROW needed)")]
    Unsealed {
        /// Position in the table.
        index: usize,
        /// Guest-physical start.
        gpa: u64,
        /// The seals it has.
        seals: libc::c_int,
    },
    /// The region's file cannot be examined.
    #[error("region {index} at guest address {gpa:#x}: cannot stat the file: {source}")]
    Stat {
        /// Position in the table.
        index: usize,
        /// Guest-physical start.
        gpa: u64,
        /// The fstat error.
        source: io::Error,
    },
    /// The region reaches past the end of its file.
    #[error("region {index} at guest address {gpa:#x}: file offset {offset} + length {len} is beyond the {file_len}-byte file")]
    TooShort {
        /// Position in the table.
        index: usize,
        /// Guest-physical start.
        gpa: u64,
        /// Offset of the region in the file.
        offset: u64,
        /// Length.
        len: u64,
        /// The file's size.
        file_len: u64,
    },
}

/// Seals a region's file must carry: together they fix its size for good.
pub const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Checks every region of a memory table: backed by a file sealed against shrinking and
/// growing, and lying entirely inside that file. With both, no access through the
/// region's mapping can fault for lack of a page, whatever the frontend does with the fd.
pub fn check_memory_table(mem: &GuestMemoryMmap) -> Result<(), MemoryTableError> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    for (index, region) in mem.iter().enumerate() {
        let gpa = region.start_addr().0;
        let len = region.len();
        let Some(file_offset) = region.file_offset() else {
            return Err(MemoryTableError::NoFile { index, gpa, len });
        };
        let file = file_offset.file();
        // SAFETY: F_GET_SEALS on an fd this mapping owns; it takes no argument and
        // touches no memory of ours.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(MemoryTableError::Seals {
                index,
                gpa,
                source: io::Error::last_os_error(),
            });
        }
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(MemoryTableError::Unsealed { index, gpa, seals });
        }
        let file_len = file
            .metadata()
            .map_err(|source| MemoryTableError::Stat { index, gpa, source })?
            .len();
        let offset = file_offset.start();
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(MemoryTableError::TooShort {
                index,
                gpa,
                offset,
                len,
                file_len,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A memfd of `len` bytes with `seals` added (none: not even sealable).
    fn memfd(len: u64, seals: Option<libc::c_int>) -> File {
        let flags = libc::MFD_CLOEXEC | seals.map_or(0, |_| libc::MFD_ALLOW_SEALING);
        // SAFETY: a valid C string; the fd is checked below.
        let fd = unsafe { libc::memfd_create(c"device-test".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        if let Some(seals) = seals {
            // SAFETY: F_ADD_SEALS on our memfd with an int argument.
            assert_eq!(
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) },
                0
            );
        }
        file
    }

    /// A one-region table: `len` bytes at 1 GiB mapped from `file` at `offset`.
    fn table(file: File, offset: u64, len: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(1 << 30),
            usize::try_from(len).unwrap(),
            Some(FileOffset::new(file, offset)),
        )])
        .unwrap()
    }

    #[test]
    fn sealed_regions_inside_their_file_are_accepted() {
        let sealed = memfd(2 * MIB, Some(REQUIRED_SEALS | libc::F_SEAL_SEAL));
        check_memory_table(&table(sealed, 0, 2 * MIB)).unwrap();
        let sealed = memfd(2 * MIB, Some(REQUIRED_SEALS));
        check_memory_table(&table(sealed, MIB, MIB)).unwrap();
        check_memory_table(&GuestMemoryMmap::new()).unwrap();
    }

    #[test]
    fn regions_that_could_fault_are_refused() {
        let err = check_memory_table(&table(memfd(MIB, None), 0, MIB)).unwrap_err();
        assert!(
            matches!(err, MemoryTableError::Unsealed { index: 0, gpa: 0x4000_0000, seals } if seals & REQUIRED_SEALS == 0),
            "{err}"
        );
        // Sealed against shrinking only: it could still grow.
        let half = memfd(MIB, Some(libc::F_SEAL_SHRINK));
        let err = check_memory_table(&table(half, 0, MIB)).unwrap_err();
        assert!(matches!(err, MemoryTableError::Unsealed { .. }), "{err}");
        // Sealed, but the region reaches past the end of the file.
        let short = memfd(MIB, Some(REQUIRED_SEALS));
        let err = check_memory_table(&table(short, 0, 2 * MIB)).unwrap_err();
        assert!(
            matches!(err, MemoryTableError::TooShort { offset: 0, len, file_len, .. } if len == 2 * MIB && file_len == MIB),
            "{err}"
        );
        let short = memfd(2 * MIB, Some(REQUIRED_SEALS));
        let err = check_memory_table(&table(short, 2 * MIB - 4096, MIB)).unwrap_err();
        assert!(matches!(err, MemoryTableError::TooShort { .. }), "{err}");
        // Not a memfd at all: its seals cannot be read.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(MIB).unwrap();
        let err = check_memory_table(&table(plain, 0, MIB)).unwrap_err();
        assert!(matches!(err, MemoryTableError::Seals { .. }), "{err}");
        assert!(err.to_string().contains("sealed memfd"), "{err}");
    }
}
