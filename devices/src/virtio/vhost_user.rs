//! A virtio device whose queues are served by a vhost-user backend process.
//!
//! The VMM keeps the PCI function, the transport and the interrupt wiring; the backend
//! (for ai_infer: `ai-inferd`) gets the guest memory as file descriptors, the ring
//! addresses, a kick eventfd per queue (an ioeventfd: guest notifications go straight
//! from KVM to the backend) and a call eventfd per queue (an irqfd: the backend raises
//! the guest's MSI-X vector without the VMM).
//!
//! The backend may not be there when the VM boots, and it may restart. A connector
//! thread retries the socket with exponential back-off (100 ms doubling to 5 s) and,
//! once connected, watches the socket for hang-up. Until connected the device offers no
//! features, its configuration space reads as zeros and FEATURES_OK does not stick, so a
//! driver sees a device it cannot start yet and retries. If the connection drops after
//! DRIVER_OK the device reports DEVICE_NEEDS_RESET and raises the configuration vector;
//! after the driver resets it, it starts again on the new connection.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateParams, QueueConfig, VirtioDevice};

/// First and longest wait between connection attempts.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Protocol features we use when the backend has them.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

/// What the VMM configures for one vhost-user device.
#[derive(Clone, Debug)]
pub struct VhostUserDeviceConfig {
    /// Virtio device id shown to the guest.
    pub device_type: u32,
    /// Queues the device has.
    pub num_queues: usize,
    /// Largest ring size.
    pub queue_max_size: u16,
    /// Bytes of device configuration space to fetch from the backend (GET_CONFIG).
    pub config_len: u32,
    /// Features the device may show the guest (the backend's are masked by these).
    pub allowed_features: u64,
    /// The backend's unix socket.
    pub socket: PathBuf,
}

/// The live connection and what the handshake learned.
struct Connection {
    frontend: Frontend,
    features: u64,
    config: Vec<u8>,
    /// Bumped on every new connection: the watcher of an old one must not touch a new one.
    generation: u64,
}

impl Connection {
    /// Whether the backend offers VHOST_USER_F_PROTOCOL_FEATURES: then its rings start
    /// disabled and are switched with SET_VRING_ENABLE.
    fn has_protocol_features(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }
}

#[derive(Default)]
struct Shared {
    connection: Option<Connection>,
    generation: u64,
    /// Generation of the connection the device was started on (DRIVER_OK); `None` after
    /// reset. Once that connection is gone the device is lost (see [`Shared::lost`]).
    started_on: Option<u64>,
    /// Raised when the connection the device runs on is lost (the config vector).
    config_irq: Option<EventFd>,
}

impl Shared {
    /// Started, and the connection it was started on is gone (a new one does not count:
    /// the backend lost the rings): the driver must reset the device.
    fn lost(&self) -> bool {
        self.started_on.is_some()
            && self.started_on != self.connection.as_ref().map(|c| c.generation)
    }
}

struct State {
    shared: Mutex<Shared>,
    shutdown: AtomicBool,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Errors of the vhost-user conversation.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserDeviceError {
    /// The backend is not connected.
    #[error("the vhost-user backend at {0} is not connected")]
    NotConnected(PathBuf),
    /// A request to the backend failed.
    #[error("vhost-user {what} failed: {source}")]
    Request {
        /// The request.
        what: &'static str,
        /// Why.
        source: vhost::Error,
    },
    /// The backend has fewer queues than the device needs.
    #[error("the vhost-user backend serves {got} queues, the device needs {needed}")]
    Queues {
        /// Queues it serves.
        got: u64,
        /// Queues needed.
        needed: usize,
    },
    /// A ring the guest configured is not inside guest memory.
    #[error("queue {queue}: {what} at {addr:#x} is not inside guest memory")]
    RingAddress {
        /// Queue index.
        queue: usize,
        /// Which ring.
        what: &'static str,
        /// Its guest address.
        addr: u64,
    },
    /// Guest memory that cannot be shared (anonymous memory has no fd).
    #[error(
        "guest memory at {0:#x} is not file-backed and cannot be shared with a vhost-user backend"
    )]
    MemoryNotShareable(u64),
}

impl From<VhostUserDeviceError> for io::Error {
    fn from(e: VhostUserDeviceError) -> Self {
        io::Error::other(e.to_string())
    }
}

fn req(what: &'static str) -> impl Fn(vhost::Error) -> VhostUserDeviceError {
    move |source| VhostUserDeviceError::Request { what, source }
}

/// A vhost-user frontend device.
pub struct VhostUserDevice {
    cfg: VhostUserDeviceConfig,
    memory: GuestMemoryMmap,
    state: Arc<State>,
    connector: Option<JoinHandle<()>>,
    enabled_queues: Vec<usize>,
}

impl VhostUserDevice {
    /// Creates the device and starts connecting to `cfg.socket` in the background.
    ///
    /// Every region of `memory` must be file-backed (memfd / hugetlbfs), else the
    /// backend cannot map it; that is checked here, before the guest runs.
    pub fn new(
        cfg: VhostUserDeviceConfig,
        memory: GuestMemoryMmap,
    ) -> Result<Self, VhostUserDeviceError> {
        memory_regions(&memory)?;
        let state = Arc::new(State {
            shared: Mutex::new(Shared::default()),
            shutdown: AtomicBool::new(false),
        });
        let connector = {
            let state = state.clone();
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .name("vhost-user-connect".into())
                .spawn(move || connector_loop(&cfg, &state))
                .map_err(|e| VhostUserDeviceError::Request {
                    what: "connector thread start",
                    source: vhost::Error::IOError(e),
                })?
        };
        Ok(Self {
            cfg,
            memory,
            state,
            connector: Some(connector),
            enabled_queues: Vec::new(),
        })
    }

    fn start(&mut self, params: &ActivateParams<'_>) -> Result<(), VhostUserDeviceError> {
        let regions = memory_regions(&self.memory)?;
        let mut rings = Vec::new();
        for (index, q) in params.queues.iter().enumerate() {
            if q.enabled {
                rings.push((index, self.ring_config(index, q)?));
            }
        }
        let mut shared = self.state.lock();
        let conn = shared
            .connection
            .as_mut()
            .ok_or_else(|| VhostUserDeviceError::NotConnected(self.cfg.socket.clone()))?;
        let protocol_features = conn.has_protocol_features();
        let generation = conn.generation;
        let f = &mut conn.frontend;
        let mut features = params.features;
        if protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        f.set_features(features).map_err(req("SET_FEATURES"))?;
        f.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;
        for (index, ring) in &rings {
            let index = *index;
            f.set_vring_num(index, ring.queue_size)
                .map_err(req("SET_VRING_NUM"))?;
            f.set_vring_addr(index, ring)
                .map_err(req("SET_VRING_ADDR"))?;
            f.set_vring_base(index, 0).map_err(req("SET_VRING_BASE"))?;
            f.set_vring_call(index, &params.calls[index])
                .map_err(req("SET_VRING_CALL"))?;
            f.set_vring_kick(index, &params.kicks[index])
                .map_err(req("SET_VRING_KICK"))?;
        }
        if protocol_features {
            for (index, _) in &rings {
                f.set_vring_enable(*index, true)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        self.enabled_queues = rings.iter().map(|(i, _)| *i).collect();
        shared.started_on = Some(generation);
        Ok(())
    }

    /// Translates a queue's rings to this process's addresses, checking each lies
    /// entirely inside guest memory (the guest chose them).
    fn ring_config(
        &self,
        queue: usize,
        q: &QueueConfig,
    ) -> Result<VringConfigData, VhostUserDeviceError> {
        let size = u64::from(q.size);
        let host = |what: &'static str, addr: u64, len: u64| {
            let err = || VhostUserDeviceError::RingAddress { queue, what, addr };
            let end = addr.checked_add(len).ok_or_else(err)?;
            // The whole ring must be in one region: the backend maps regions one by one.
            let region = self
                .memory
                .find_region(GuestAddress(addr))
                .ok_or_else(err)?;
            if end > region.start_addr().0 + region.len() {
                return Err(err());
            }
            self.memory
                .get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| err())
        };
        Ok(VringConfigData {
            queue_max_size: self.cfg.queue_max_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: host("descriptor table", q.desc_table, 16 * size)?,
            avail_ring_addr: host("available ring", q.avail_ring, 6 + 2 * size)?,
            used_ring_addr: host("used ring", q.used_ring, 6 + 8 * size)?,
            log_addr: None,
        })
    }
}

/// The SET_MEM_TABLE entries for every region of guest memory.
fn memory_regions(
    memory: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserDeviceError> {
    memory
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| VhostUserDeviceError::MemoryNotShareable(region.start_addr().0))
        })
        .collect()
}

/// Connects, serves until hang-up, reconnects; until the device is dropped.
fn connector_loop(cfg: &VhostUserDeviceConfig, state: &State) {
    let mut wait = RETRY_FIRST;
    let mut warned = false;
    while !state.shutdown.load(Ordering::SeqCst) {
        match handshake(cfg) {
            Ok(mut conn) => {
                wait = RETRY_FIRST;
                warned = false;
                let fd = conn.frontend.as_raw_fd();
                let generation = {
                    let mut s = state.lock();
                    s.generation += 1;
                    conn.generation = s.generation;
                    s.connection = Some(conn);
                    s.generation
                };
                log::info!("vhost-user backend connected at {}", cfg.socket.display());
                wait_for_hangup(fd, &state.shutdown);
                let mut s = state.lock();
                if s.connection.as_ref().map(|c| c.generation) == Some(generation) {
                    s.connection = None;
                    if s.started_on == Some(generation) {
                        if let Some(irq) = &s.config_irq {
                            let _ = irq.write(1);
                        }
                    }
                    if !state.shutdown.load(Ordering::SeqCst) {
                        log::warn!(
                            "vhost-user backend at {} went away; reconnecting",
                            cfg.socket.display()
                        );
                    }
                }
            }
            Err(e) => {
                if !warned {
                    log::warn!("{e}; retrying in the background");
                    warned = true;
                } else {
                    log::debug!("{e}");
                }
                sleep_unless_shutdown(wait, &state.shutdown);
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

fn sleep_unless_shutdown(total: Duration, shutdown: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() && !shutdown.load(Ordering::SeqCst) {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

/// Blocks until the peer closes `fd` (or shutdown). Only hang-up is polled for, so data
/// the request path is about to read does not wake us.
fn wait_for_hangup(fd: i32, shutdown: &AtomicBool) {
    while !shutdown.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd we own for at most 200 ms.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n > 0
            && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
        {
            return;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Connects and learns what the backend offers.
fn handshake(cfg: &VhostUserDeviceConfig) -> Result<Connection, VhostUserDeviceError> {
    let mut frontend = Frontend::connect(&cfg.socket, cfg.num_queues as u64)
        .map_err(|e| connect_error(&cfg.socket, e))?;
    frontend.set_owner().map_err(req("SET_OWNER"))?;
    let features = frontend.get_features().map_err(req("GET_FEATURES"))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(req("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & WANTED_PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(protocol)
            .map_err(req("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request waits for the backend to have handled it. Without this,
            // activation returns to the guest before the backend has processed
            // SET_VRING_ENABLE, and a kick arriving in between is consumed while the
            // ring is still disabled: the request is never looked at.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let got = frontend.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
        if got < cfg.num_queues as u64 {
            return Err(VhostUserDeviceError::Queues {
                got,
                needed: cfg.num_queues,
            });
        }
    }
    let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) && cfg.config_len > 0 {
        let buf = vec![0u8; cfg.config_len as usize];
        let (_, payload) = frontend
            .get_config(0, cfg.config_len, VhostUserConfigFlags::empty(), &buf)
            .map_err(req("GET_CONFIG"))?;
        payload
    } else {
        Vec::new()
    };
    Ok(Connection {
        frontend,
        features,
        config,
        generation: 0,
    })
}

fn connect_error(socket: &Path, e: vhost::Error) -> VhostUserDeviceError {
    VhostUserDeviceError::Request {
        what: match socket.to_str() {
            Some(_) => "connect",
            None => "connect (non-UTF-8 path)",
        },
        source: e,
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.cfg.device_type
    }

    fn num_queues(&self) -> usize {
        self.cfg.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.cfg.queue_max_size
    }

    fn features(&self) -> u64 {
        self.state
            .lock()
            .connection
            .as_ref()
            .map(|c| c.features & self.cfg.allowed_features)
            .unwrap_or(0)
    }

    fn ready(&self) -> bool {
        let s = self.state.lock();
        s.connection.is_some() && !s.lost()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = self.state.lock();
        let Some(conn) = s.connection.as_ref() else {
            return;
        };
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok());
            if let Some(b) = at.and_then(|o| conn.config.get(o)) {
                *byte = *b;
            }
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("ignoring a write to read-only device config at {offset:#x}");
    }

    fn activate(&mut self, params: ActivateParams<'_>) -> io::Result<()> {
        self.state.lock().config_irq = params.config_irq.map(EventFd::try_clone).transpose()?;
        self.start(&params).map_err(|e| {
            log::error!("cannot start the vhost-user device: {e}");
            io::Error::from(e)
        })
    }

    fn reset(&mut self) {
        let mut s = self.state.lock();
        let started_on = s.started_on.take();
        s.config_irq = None;
        let queues = std::mem::take(&mut self.enabled_queues);
        // Only the connection the rings were started on has them to stop: a backend that
        // went away took its rings along, and a new connection never had them.
        let Some(conn) = s
            .connection
            .as_mut()
            .filter(|c| Some(c.generation) == started_on)
        else {
            return;
        };
        // GET_VRING_BASE stops each ring in the backend: from its reply on, the backend
        // no longer touches the guest's rings or buffers.
        let mut failed = false;
        for q in queues {
            if conn.has_protocol_features() {
                let _ = conn.frontend.set_vring_enable(q, false);
            }
            if let Err(e) = conn.frontend.get_vring_base(q) {
                log::warn!("vhost-user GET_VRING_BASE on reset failed: {e}");
                failed = true;
            }
        }
        if failed {
            // The backend is in an unknown state: drop the connection, the connector
            // reconnects and the next activation starts clean.
            s.connection = None;
        }
    }

    fn needs_reset(&self) -> bool {
        self.state.lock().lost()
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.state.shutdown.store(true, Ordering::SeqCst);
        if let Some(handle) = self.connector.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn connection(generation: u64) -> Connection {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        Connection {
            frontend: Frontend::from_stream(ours, 1),
            features: 0,
            config: Vec::new(),
            generation,
        }
    }

    #[test]
    fn a_started_device_is_lost_from_its_connections_end_until_reset() {
        let mut s = Shared {
            connection: Some(connection(1)),
            ..Shared::default()
        };
        assert!(!s.lost(), "not started");
        s.started_on = Some(1);
        assert!(!s.lost(), "running on its connection");
        s.connection = None;
        assert!(s.lost(), "the backend went away");
        s.connection = Some(connection(2));
        assert!(s.lost(), "a new backend does not have the rings");
        s.started_on = None;
        assert!(!s.lost(), "reset");
    }
}
