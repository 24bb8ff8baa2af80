//! A virtio device whose queues are served by a vhost-user backend process.
//!
//! The VMM keeps the PCI function, the transport and the interrupt wiring; the backend
//! (for ai_infer: `ai-inferd`) gets the guest memory as file descriptors, the ring
//! addresses, a kick eventfd per queue (an ioeventfd: guest notifications go straight
//! from KVM to the backend) and a call eventfd per queue (an irqfd: the backend raises
//! the guest's MSI-X vector without the VMM).
//!
//! The backend may not be there when the VM boots, it may restart, stop or hang. The
//! device owns one thread ("vhost-user-<socket name>") that alone talks to the backend:
//! it retries the socket with exponential back-off (100 ms doubling to 5 s), watches the
//! connection for hang-up, and performs the round trips of activation and reset. Every
//! reply is awaited at most [`REPLY_TIMEOUT`]; a backend that does not answer in time
//! loses its connection (its state is unknown, and closing the socket makes it stop the
//! rings). `activate` and `reset` run on vCPU threads with the transport and PCI locks
//! held, so they only check what the guest programmed and hand the work to the thread:
//! a stopped backend never freezes a vCPU.
//!
//! Until connected the device offers no features, its configuration space reads as zeros
//! and FEATURES_OK does not stick, so a driver sees a device it cannot start yet and
//! retries. After DRIVER_OK the device reports DEVICE_NEEDS_RESET and raises the
//! configuration vector when the backend cannot be started, goes away, or reports a
//! broken ring on the error eventfd each ring gets (VHOST_USER_SET_VRING_ERR); after the
//! driver resets it, it starts again, on a new connection if the old one was dropped.
//!
//! A kick the guest sends before the backend enabled its ring is not lost: it stays in
//! the kick eventfd, and the backend only watches that eventfd once the ring is enabled.

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use virtio_queue::{Queue, QueueT};

use super::{read_config_bytes, ActivateParams, VirtioDevice};

mod backend_peer;
pub use backend_peer::{check_backend_peer, BackendPeer};

/// First and longest wait between connection attempts.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest the device thread waits for one reply (or to send one request) of the
/// backend. A healthy backend answers in microseconds; ai-inferd's queue stop may wait
/// for a running batch, and a batch longer than this costs the connection, not a vCPU.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the device thread looks at the shutdown flag while nothing happens.
const POLL_MS: i32 = 200;
/// How often the watchdog compares the device thread's exchange with its deadline.
const WATCHDOG_TICK: Duration = Duration::from_millis(20);
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
    /// Who the backend must be (`SO_PEERCRED`), checked before SET_OWNER.
    pub backend_peer: BackendPeer,
}

/// What vCPU threads see of the live connection: what the handshake learned.
struct Link {
    features: u64,
    config: Vec<u8>,
    /// Bumped on every new connection: work meant for an old one must not touch a new one.
    generation: u64,
}

/// One activation (DRIVER_OK) of the device, until its reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Generation of the connection it was started on.
    connection: u64,
    /// Distinguishes activations on the same connection.
    id: u64,
    /// The backend could not be started or reported a broken ring.
    failed: bool,
}

#[derive(Default)]
struct Shared {
    link: Option<Link>,
    generation: u64,
    runs: u64,
    /// The current activation; `None` after reset.
    started: Option<Run>,
    /// Raised when the running device is lost (the config vector).
    config_irq: Option<EventFd>,
    /// A second handle on the socket of the connection being set up or served: shutting
    /// it down fails at once whatever request the device thread waits in.
    socket: Option<UnixStream>,
    /// When the device thread's current exchange with the backend must have ended (the
    /// watchdog shuts the socket down after it).
    deadline: Option<Instant>,
}

impl Shared {
    /// Started, and its backend failed or the connection it was started on is gone (a
    /// new one does not count: the backend lost the rings): the driver must reset it.
    fn lost(&self) -> bool {
        self.started.is_some_and(|run| {
            run.failed || Some(run.connection) != self.link.as_ref().map(|l| l.generation)
        })
    }

    /// Marks activation `id` failed and tells the driver; false if it is not current.
    fn fail(&mut self, id: u64) -> bool {
        match self.started.as_mut() {
            Some(run) if run.id == id => {
                run.failed = true;
                self.raise_config();
                true
            }
            _ => false,
        }
    }

    fn raise_config(&self) {
        if let Some(irq) = &self.config_irq {
            if let Err(e) = irq.write(1) {
                log::warn!("cannot raise the configuration interrupt: {e}");
            }
        }
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

    /// Gives the device thread's next exchange [`REPLY_TIMEOUT`].
    fn arm(&self) {
        self.lock().deadline = Some(Instant::now() + REPLY_TIMEOUT);
    }

    fn disarm(&self) {
        self.lock().deadline = None;
    }

    /// Ends an exchange that overran its deadline: the vhost crate retries a timed-out
    /// socket read forever, so the deadline is enforced from outside by shutting the
    /// socket down, which fails the request and ends the connection.
    fn watchdog(&self) {
        while !self.shutdown.load(Ordering::SeqCst) {
            std::thread::sleep(WATCHDOG_TICK);
            let mut s = self.lock();
            if s.deadline.is_some_and(|d| Instant::now() >= d) {
                s.deadline = None;
                if let Some(socket) = &s.socket {
                    log::warn!(
                        "the vhost-user backend did not answer within {REPLY_TIMEOUT:?}; dropping its connection"
                    );
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }
}

/// Errors of the vhost-user conversation.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserDeviceError {
    /// The backend is not connected.
    #[error("the vhost-user backend at {0} is not connected")]
    NotConnected(PathBuf),
    /// A request to the backend failed (or got no answer within the timeout).
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
    /// An eventfd, a socket option or a thread could not be set up.
    #[error("cannot set up the vhost-user device ({what}): {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The device thread is gone.
    #[error("the vhost-user device thread for {0} is gone")]
    ThreadGone(PathBuf),
}

impl From<VhostUserDeviceError> for io::Error {
    fn from(e: VhostUserDeviceError) -> Self {
        io::Error::other(e.to_string())
    }
}

fn req(what: &'static str) -> impl Fn(vhost::Error) -> VhostUserDeviceError {
    move |source| VhostUserDeviceError::Request { what, source }
}

fn setup(what: &'static str) -> impl Fn(io::Error) -> VhostUserDeviceError {
    move |source| VhostUserDeviceError::Setup { what, source }
}

/// One enabled ring as the backend gets it.
struct Ring {
    index: usize,
    config: VringConfigData,
    call: EventFd,
    kick: EventFd,
}

/// Work for the device thread.
enum Command {
    /// Start the backend's rings (activation `run`).
    Start {
        run: Run,
        features: u64,
        memory: GuestMemoryMmap,
        rings: Vec<Ring>,
    },
    /// Stop the backend's rings `queues` of activation `run`.
    Stop { run: Run, queues: Vec<usize> },
}

/// A vhost-user frontend device.
pub struct VhostUserDevice {
    cfg: VhostUserDeviceConfig,
    memory: GuestMemoryMmap,
    state: Arc<State>,
    commands: Sender<Command>,
    /// Wakes the device thread when a command is queued.
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    /// The queues of the running device (handed back at reset); the backend serves the
    /// enabled ones.
    queues: Vec<Queue>,
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
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("wake eventfd"))?;
        let (commands, receiver) = mpsc::channel();
        let thread = {
            let worker = DeviceThread {
                cfg: cfg.clone(),
                state: state.clone(),
                commands: receiver,
                wake: wake.try_clone().map_err(setup("wake eventfd"))?,
            };
            let name = cfg
                .socket
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            crate::thread_start::spawn_device_thread(
                crate::thread_start::DeviceThread::VhostUser,
                format!("vhost-user-{name}"),
                move || worker.run(),
            )
            .map_err(setup("device thread"))?
        };
        Ok(Self {
            cfg,
            memory,
            state,
            commands,
            wake,
            thread: Some(thread),
            queues: Vec::new(),
        })
    }

    /// Whether the device was activated and its backend has not (yet) failed: false
    /// before activation, after reset, and once it needs a reset.
    pub fn running(&self) -> bool {
        let s = self.state.lock();
        s.started.is_some() && !s.lost()
    }

    fn send(&self, command: Command) -> Result<(), VhostUserDeviceError> {
        self.commands
            .send(command)
            .map_err(|_| VhostUserDeviceError::ThreadGone(self.cfg.socket.clone()))?;
        // A failed wake-up only delays the command to the thread's next poll round.
        let _ = self.wake.write(1);
        Ok(())
    }

    /// The enabled rings of `params`, checked and with their eventfds.
    fn rings(&self, params: &ActivateParams) -> Result<Vec<Ring>, VhostUserDeviceError> {
        let mut rings = Vec::new();
        for (index, q) in params.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let missing = || VhostUserDeviceError::Queues {
                got: index as u64,
                needed: index + 1,
            };
            let call = params.interrupt.queue_eventfd(index).ok_or_else(missing)?;
            let kick = params.kicks.get(index).ok_or_else(missing)?;
            rings.push(Ring {
                index,
                config: self.ring_config(index, q)?,
                call: call.try_clone().map_err(setup("call eventfd"))?,
                kick: kick.try_clone().map_err(setup("kick eventfd"))?,
            });
        }
        Ok(rings)
    }

    /// Translates a queue's rings to this process's addresses, checking each lies
    /// entirely inside guest memory (the guest chose them).
    fn ring_config(
        &self,
        queue: usize,
        q: &Queue,
    ) -> Result<VringConfigData, VhostUserDeviceError> {
        let size = u64::from(q.size());
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
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: host("descriptor table", q.desc_table(), 16 * size)?,
            avail_ring_addr: host("available ring", q.avail_ring(), 6 + 2 * size)?,
            used_ring_addr: host("used ring", q.used_ring(), 6 + 8 * size)?,
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

/// The device thread's side of a connection.
struct Connection {
    frontend: Frontend,
    /// Whether the backend offers VHOST_USER_F_PROTOCOL_FEATURES: then its rings start
    /// disabled and are switched with SET_VRING_ENABLE.
    protocol_features: bool,
    generation: u64,
    /// The running activation's id and the error eventfd of each of its rings.
    errors: Option<(u64, Vec<(usize, EventFd)>)>,
}

/// The thread that alone talks to the backend.
struct DeviceThread {
    cfg: VhostUserDeviceConfig,
    state: Arc<State>,
    commands: Receiver<Command>,
    wake: EventFd,
}

impl DeviceThread {
    /// Runs the device thread and its watchdog until the device is dropped; called once
    /// the thread's start hook (its filter) is in place, so the watchdog inherits it.
    fn run(self) {
        std::thread::scope(|scope| {
            let watchdog = crate::thread::named("vhost-user-wdog")
                .spawn_scoped(scope, || self.state.watchdog());
            if let Err(e) = watchdog {
                log::error!("cannot start the vhost-user watchdog: {e}; the device stays offline");
                return;
            }
            self.connect_and_serve();
        });
    }

    /// Connects, serves until the connection ends, reconnects; until the device is dropped.
    fn connect_and_serve(&self) {
        let mut wait = RETRY_FIRST;
        let mut warned = false;
        while !self.shutdown() {
            match self.watched_handshake() {
                Ok((frontend, link)) => {
                    let protocol_features = link_has_protocol_features(link.features);
                    wait = RETRY_FIRST;
                    warned = false;
                    let generation = {
                        let mut s = self.state.lock();
                        s.generation += 1;
                        s.link = Some(Link {
                            generation: s.generation,
                            ..link
                        });
                        s.generation
                    };
                    log::info!(
                        "vhost-user backend connected at {}",
                        self.cfg.socket.display()
                    );
                    let mut conn = Connection {
                        protocol_features,
                        frontend,
                        generation,
                        errors: None,
                    };
                    let why = self.serve(&mut conn);
                    // Closing the socket makes the backend stop the rings and forget them.
                    drop(conn);
                    self.state.lock().socket = None;
                    self.connection_ended(generation, &why);
                }
                Err(e) => {
                    if !warned {
                        log::warn!("{e}; retrying in the background");
                        warned = true;
                    } else {
                        log::debug!("{e}");
                    }
                    self.idle(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn shutdown(&self) -> bool {
        self.state.shutdown.load(Ordering::SeqCst)
    }

    /// Connects and shakes hands within [`REPLY_TIMEOUT`].
    fn watched_handshake(&self) -> Result<(Frontend, Link), VhostUserDeviceError> {
        let socket = &self.cfg.socket;
        let stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
        self.state.lock().socket = Some(stream.try_clone().map_err(setup("socket handle"))?);
        self.state.arm();
        let shaken = handshake(&self.cfg, stream);
        self.state.disarm();
        if shaken.is_err() {
            self.state.lock().socket = None;
        }
        shaken
    }

    /// Waits `total` without a connection. Commands that arrive meanwhile were meant for
    /// a connection that is gone: the device already reports it lost, nothing to do.
    fn idle(&self, total: Duration) {
        let deadline = Instant::now() + total;
        while !self.shutdown() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let _ = self
                .commands
                .recv_timeout(left.min(Duration::from_millis(50)));
        }
    }

    fn connection_ended(&self, generation: u64, why: &str) {
        let mut s = self.state.lock();
        if s.link.as_ref().map(|l| l.generation) != Some(generation) {
            return;
        }
        s.link = None;
        if s.started
            .is_some_and(|run| run.connection == generation && !run.failed)
        {
            s.raise_config();
        }
        if !self.shutdown() {
            log::warn!(
                "vhost-user backend at {}: {why}; reconnecting",
                self.cfg.socket.display()
            );
        }
    }

    /// Serves one connection: commands, hang-up and the rings' error eventfds. Returns
    /// why the connection must end.
    fn serve(&self, conn: &mut Connection) -> String {
        let socket = conn.frontend.as_raw_fd();
        loop {
            if self.shutdown() {
                return "the device is shutting down".into();
            }
            let mut fds = vec![
                libc::pollfd {
                    fd: socket,
                    // Only hang-up: replies are read by the request that waits for them.
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if let Some((_, errors)) = &conn.errors {
                fds.extend(errors.iter().map(|(_, evt)| libc::pollfd {
                    fd: evt.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }));
            }
            let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(2);
            // SAFETY: `fds` is a live array of `nfds` pollfds that poll only writes the
            // `revents` of; it waits at most POLL_MS.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, POLL_MS) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return format!("cannot poll the connection: {e}");
                }
                continue;
            }
            let hangup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
            if fds[0].revents & hangup != 0 {
                return "the backend went away".into();
            }
            // Reset the wake-up before taking the commands, so none is left unseen.
            let _ = self.wake.read();
            while let Ok(command) = self.commands.try_recv() {
                self.state.arm();
                let handled = self.handle(conn, command);
                self.state.disarm();
                if let Err(e) = handled {
                    return e.to_string();
                }
            }
            let signalled: Vec<bool> = fds.iter().skip(2).map(|p| p.revents != 0).collect();
            self.check_errors(conn, &signalled);
        }
    }

    /// Reports the rings whose error eventfd the backend signalled.
    fn check_errors(&self, conn: &Connection, signalled: &[bool]) {
        let Some((id, errors)) = &conn.errors else {
            return;
        };
        for ((queue, evt), _) in errors.iter().zip(signalled).filter(|(_, s)| **s) {
            if evt.read().is_err() {
                continue;
            }
            if self.state.lock().fail(*id) {
                log::error!(
                    "vhost-user backend at {} reports queue {queue} broken; the device needs a reset",
                    self.cfg.socket.display()
                );
            }
        }
    }

    /// Runs one command; an error means the connection is in an unknown state.
    fn handle(&self, conn: &mut Connection, command: Command) -> Result<(), VhostUserDeviceError> {
        match command {
            // Work for a connection that is gone: the device reports that by itself.
            Command::Start { run, .. } | Command::Stop { run, .. }
                if run.connection != conn.generation =>
            {
                Ok(())
            }
            Command::Start {
                run,
                features,
                memory,
                rings,
            } => {
                conn.errors = Some((run.id, Vec::new()));
                let started = start(conn, features, &memory, &rings);
                if let Err(e) = &started {
                    log::error!("cannot start the vhost-user device: {e}");
                    self.state.lock().fail(run.id);
                }
                started
            }
            Command::Stop { queues, .. } => {
                conn.errors = None;
                stop(conn, &queues)
            }
        }
    }
}

fn link_has_protocol_features(features: u64) -> bool {
    features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
}

/// Hands the backend the memory and the rings, and enables them.
fn start(
    conn: &mut Connection,
    features: u64,
    memory: &GuestMemoryMmap,
    rings: &[Ring],
) -> Result<(), VhostUserDeviceError> {
    let regions = memory_regions(memory)?;
    let mut features = features;
    if conn.protocol_features {
        features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    }
    let f = &mut conn.frontend;
    f.set_features(features).map_err(req("SET_FEATURES"))?;
    f.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;
    let mut errors = Vec::new();
    for ring in rings {
        let index = ring.index;
        let err = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("error eventfd"))?;
        f.set_vring_num(index, ring.config.queue_size)
            .map_err(req("SET_VRING_NUM"))?;
        f.set_vring_addr(index, &ring.config)
            .map_err(req("SET_VRING_ADDR"))?;
        f.set_vring_base(index, 0).map_err(req("SET_VRING_BASE"))?;
        f.set_vring_call(index, &ring.call)
            .map_err(req("SET_VRING_CALL"))?;
        f.set_vring_err(index, &err).map_err(req("SET_VRING_ERR"))?;
        f.set_vring_kick(index, &ring.kick)
            .map_err(req("SET_VRING_KICK"))?;
        errors.push((index, err));
    }
    if conn.protocol_features {
        for ring in rings {
            f.set_vring_enable(ring.index, true)
                .map_err(req("SET_VRING_ENABLE"))?;
        }
    }
    if let Some((_, watched)) = conn.errors.as_mut() {
        *watched = errors;
    }
    Ok(())
}

/// Stops the backend's rings: from the reply to GET_VRING_BASE on, the backend no longer
/// touches the guest's rings or buffers.
fn stop(conn: &mut Connection, queues: &[usize]) -> Result<(), VhostUserDeviceError> {
    for &q in queues {
        if conn.protocol_features {
            conn.frontend
                .set_vring_enable(q, false)
                .map_err(req("SET_VRING_ENABLE"))?;
        }
        conn.frontend
            .get_vring_base(q)
            .map_err(req("GET_VRING_BASE"))?;
    }
    Ok(())
}

/// Learns what the backend on `stream` offers.
fn handshake(
    cfg: &VhostUserDeviceConfig,
    stream: UnixStream,
) -> Result<(Frontend, Link), VhostUserDeviceError> {
    check_backend_peer(&stream, &cfg.backend_peer).map_err(setup("backend credentials"))?;
    let mut frontend = Frontend::from_stream(stream, cfg.num_queues as u64);
    frontend.set_owner().map_err(req("SET_OWNER"))?;
    let features = frontend.get_features().map_err(req("GET_FEATURES"))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if link_has_protocol_features(features) {
        let offered = frontend
            .get_protocol_features()
            .map_err(req("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & WANTED_PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(protocol)
            .map_err(req("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request waits for the backend to have handled it, so a ring is
            // enabled in the backend before the device thread takes the next command
            // (a stop then finds it started), and a backend that hangs is noticed at
            // the request it hangs on.
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
    Ok((
        frontend,
        Link {
            features,
            config,
            generation: 0,
        },
    ))
}

fn connect_error(socket: &Path, e: io::Error) -> VhostUserDeviceError {
    VhostUserDeviceError::Request {
        what: match socket.to_str() {
            Some(_) => "connect",
            None => "connect (non-UTF-8 path)",
        },
        source: vhost::Error::IOError(e),
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
            .link
            .as_ref()
            .map(|l| l.features & self.cfg.allowed_features)
            .unwrap_or(0)
    }

    fn ready(&self) -> bool {
        let s = self.state.lock();
        s.link.is_some() && !s.lost()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.state.lock();
        let config = s.link.as_ref().map_or(&[][..], |l| &l.config[..]);
        read_config_bytes(config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("ignoring a write to read-only device config at {offset:#x}");
    }

    /// Checks what the guest programmed and hands the start to the device thread; the
    /// backend's answers are not waited for. If the start fails the device reports
    /// needs-reset and raises the configuration interrupt.
    fn activate(&mut self, params: ActivateParams) -> io::Result<()> {
        let fail = |e: VhostUserDeviceError| {
            log::error!("cannot start the vhost-user device: {e}");
            io::Error::from(e)
        };
        let rings = self.rings(&params).map_err(fail)?;
        let config_irq = params
            .interrupt
            .config_eventfd()
            .map(EventFd::try_clone)
            .transpose()?;
        let run = {
            let mut s = self.state.lock();
            let connection =
                s.link.as_ref().map(|l| l.generation).ok_or_else(|| {
                    fail(VhostUserDeviceError::NotConnected(self.cfg.socket.clone()))
                })?;
            s.runs += 1;
            let run = Run {
                connection,
                id: s.runs,
                failed: false,
            };
            s.config_irq = config_irq;
            s.started = Some(run);
            run
        };
        let sent = self.send(Command::Start {
            run,
            features: params.features,
            memory: self.memory.clone(),
            rings,
        });
        if let Err(e) = sent {
            self.state.lock().started = None;
            return Err(fail(e));
        }
        self.queues = params.queues;
        Ok(())
    }

    /// Hands the queues back at once; the device thread stops the backend's rings. A
    /// backend that does not acknowledge the stop in time loses its connection.
    fn reset(&mut self) -> Option<Vec<Queue>> {
        let queues = std::mem::take(&mut self.queues);
        let started = {
            let mut s = self.state.lock();
            s.config_irq = None;
            s.started.take()
        };
        if let Some(run) = started {
            let enabled = queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.ready())
                .map(|(i, _)| i)
                .collect();
            if let Err(e) = self.send(Command::Stop {
                run,
                queues: enabled,
            }) {
                log::error!("cannot stop the vhost-user backend: {e}");
            }
        }
        Some(queues)
    }

    fn needs_reset(&self) -> bool {
        self.state.lock().lost()
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.state.shutdown.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        // Fail a request the device thread may be waiting in, so the join is quick.
        if let Some(socket) = &self.state.lock().socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::AtomicUsize;
    use vhost::vhost_user::message::FrontendReq;
    use vm_memory::FileOffset;

    use crate::virtio::{VirtioInterrupt, VIRTIO_F_VERSION_1};

    fn link(generation: u64) -> Link {
        Link {
            features: 0,
            config: Vec::new(),
            generation,
        }
    }

    #[test]
    fn a_started_device_is_lost_from_its_connections_end_until_reset() {
        let mut s = Shared {
            link: Some(link(1)),
            ..Shared::default()
        };
        assert!(!s.lost(), "not started");
        s.started = Some(Run {
            connection: 1,
            id: 1,
            failed: false,
        });
        assert!(!s.lost(), "running on its connection");
        s.link = None;
        assert!(s.lost(), "the backend went away");
        s.link = Some(link(2));
        assert!(s.lost(), "a new backend does not have the rings");
        s.started = None;
        assert!(!s.lost(), "reset");
        s.started = Some(Run {
            connection: 2,
            id: 2,
            failed: false,
        });
        assert!(!s.fail(1), "an old activation cannot fail the current one");
        assert!(!s.lost());
        assert!(s.fail(2));
        assert!(s.lost(), "the backend failed the running activation");
    }

    /// What a fake backend saw.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: Mutex<Vec<u32>>,
    }

    const REPLY: u32 = 0x1 | 0x4; // version 1, reply
    const NEED_REPLY: u32 = 0x8;

    /// A vhost-user backend on `socket` that completes the handshake (offering
    /// REPLY_ACK) and answers every request until it receives `silent_from`; from then
    /// on it reads and never answers, like a stopped or hung daemon.
    fn fake_backend(socket: &Path, silent_from: FrontendReq) -> Arc<Seen> {
        let listener = UnixListener::bind(socket).unwrap();
        let seen = Arc::new(Seen::default());
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                seen2.connections.fetch_add(1, Ordering::SeqCst);
                serve_fake(stream, silent_from as u32, &seen2);
            }
        });
        seen
    }

    fn serve_fake(mut s: UnixStream, silent_from: u32, seen: &Seen) {
        let mut silent = false;
        loop {
            let mut hdr = [0u8; 12];
            if s.read_exact(&mut hdr).is_err() {
                return;
            }
            let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
            let (code, flags, size) = (word(0), word(4), word(8));
            let mut body = vec![0u8; size.min(4096) as usize];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            seen.requests.lock().unwrap().push(code);
            silent |= code == silent_from;
            if silent {
                continue;
            }
            let reply: Option<u64> = match code {
                c if c == FrontendReq::GET_FEATURES as u32 => {
                    Some(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
                }
                c if c == FrontendReq::GET_PROTOCOL_FEATURES as u32 => {
                    Some(VhostUserProtocolFeatures::REPLY_ACK.bits())
                }
                // VhostUserVringState { index, num: 0 }
                c if c == FrontendReq::GET_VRING_BASE as u32 => {
                    Some(u64::from(u32::from_le_bytes(body[..4].try_into().unwrap())))
                }
                _ if flags & NEED_REPLY != 0 => Some(0),
                _ => None,
            };
            if let Some(value) = reply {
                let mut msg = Vec::new();
                for w in [code, REPLY, 8] {
                    msg.extend_from_slice(&w.to_le_bytes());
                }
                msg.extend_from_slice(&value.to_le_bytes());
                if s.write_all(&msg).is_err() {
                    return;
                }
            }
        }
    }

    /// `name`.sock in a new temporary directory (removed when the guard drops).
    fn socket_path(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.sock"));
        (dir, path)
    }

    fn memfd_memory() -> GuestMemoryMmap {
        let name = std::ffi::CString::new("vhost-user-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is checked below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(0x10_0000).unwrap();
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            0x10_0000,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap()
    }

    fn device(socket: &Path, memory: &GuestMemoryMmap) -> VhostUserDevice {
        let dev = VhostUserDevice::new(
            VhostUserDeviceConfig {
                device_type: 60,
                num_queues: 1,
                queue_max_size: 16,
                config_len: 0,
                allowed_features: VIRTIO_F_VERSION_1,
                socket: socket.to_path_buf(),
                backend_peer: BackendPeer::default(),
            },
            memory.clone(),
        )
        .unwrap();
        wait_for("the handshake", Duration::from_secs(5), || dev.ready());
        dev
    }

    fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn params(memory: &GuestMemoryMmap, config_irq: &EventFd) -> ActivateParams {
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
        q.set_ready(true);
        ActivateParams {
            features: VIRTIO_F_VERSION_1,
            memory: memory.clone(),
            queues: vec![q],
            kicks: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(
                vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
                Some(config_irq.try_clone().unwrap()),
            )),
        }
    }

    /// Runs `op` on the device on another thread (a vCPU) and returns the device and how
    /// long `op` took; fails if it does not return within a second.
    fn on_vcpu(
        mut dev: VhostUserDevice,
        op: impl FnOnce(&mut VhostUserDevice) + Send + 'static,
    ) -> (VhostUserDevice, Duration) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            op(&mut dev);
            let _ = tx.send((dev, t.elapsed()));
        });
        rx.recv_timeout(Duration::from_secs(1))
            .expect("the vCPU is blocked on the backend")
    }

    #[test]
    fn activation_against_a_backend_that_never_answers_returns_at_once_then_needs_reset() {
        let (_dir, socket) = socket_path("silent-start");
        let seen = fake_backend(&socket, FrontendReq::SET_FEATURES);
        let memory = memfd_memory();
        let dev = device(&socket, &memory);
        let config_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let p = params(&memory, &config_irq);
        let (dev, took) = on_vcpu(dev, move |d| d.activate(p).unwrap());
        assert!(took < Duration::from_millis(100), "activate took {took:?}");
        assert!(!dev.needs_reset(), "the backend still has time to answer");
        wait_for(
            "needs-reset after the reply timeout",
            REPLY_TIMEOUT + Duration::from_secs(3),
            || dev.needs_reset(),
        );
        assert_eq!(config_irq.read().unwrap(), 1, "the driver was told");
        assert!(!dev.running());
        assert!(seen
            .requests
            .lock()
            .unwrap()
            .contains(&(FrontendReq::SET_FEATURES as u32)));
        // The driver resets the device; it starts again on a fresh connection.
        let (dev, took) = on_vcpu(dev, |d| {
            d.reset();
        });
        assert!(took < Duration::from_millis(100), "reset took {took:?}");
        wait_for("a new connection", Duration::from_secs(5), || {
            seen.connections.load(Ordering::SeqCst) >= 2 && dev.ready()
        });
        assert!(!dev.needs_reset());
        drop(dev);
    }

    #[test]
    fn reset_against_a_backend_that_never_acknowledges_the_stop_returns_at_once() {
        let (_dir, socket) = socket_path("silent-stop");
        let seen = fake_backend(&socket, FrontendReq::GET_VRING_BASE);
        let memory = memfd_memory();
        let dev = device(&socket, &memory);
        let config_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let p = params(&memory, &config_irq);
        let (dev, _) = on_vcpu(dev, move |d| d.activate(p).unwrap());
        wait_for("the rings enabled", Duration::from_secs(5), || {
            seen.requests
                .lock()
                .unwrap()
                .contains(&(FrontendReq::SET_VRING_ENABLE as u32))
        });
        assert!(dev.running());
        assert!(!dev.needs_reset());
        let (dev, took) = on_vcpu(dev, |d| {
            assert_eq!(d.reset().map(|q| q.len()), Some(1), "the queues come back");
        });
        assert!(took < Duration::from_millis(100), "reset took {took:?}");
        // The unacknowledged stop costs the connection; the device is not lost (it was
        // reset) and comes back on a new connection.
        wait_for(
            "the connection dropped and renewed",
            REPLY_TIMEOUT + Duration::from_secs(5),
            || seen.connections.load(Ordering::SeqCst) >= 2 && dev.ready(),
        );
        assert!(!dev.needs_reset());
        assert!(config_irq.read().is_err(), "a reset device raises nothing");
        drop(dev);
    }
}
