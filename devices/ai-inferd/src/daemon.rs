//! Wiring: the model registry, the scheduler, one listener thread per tenant socket,
//! the executor threads and the metrics endpoint; reloads; an orderly shutdown.
//!
//! Each listener thread accepts one VMM connection at a time on its tenant's socket
//! and serves it with a `VhostUserDaemon`. When the VMM disconnects, the tenant's
//! queued work is dropped, running work is waited for (its results discarded), the
//! guest memory mapping goes with the last reference, and the socket listens again.
//!
//! Sockets are 0600 in a directory only the daemon's uid may write
//! ([`crate::tenant::socket`]). A connected peer whose credentials the tenant's
//! `uid`/`gid` do not admit is closed before the device answers it; one that does not
//! reach the handshake milestone within `handshake_timeout_ms` is closed; and while a
//! VMM is connected, any further connection is accepted and closed at once, so none
//! waits in the backlog. Each is logged and counted
//! (`ai_inferd_tenant_connections_refused_total`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ai_infer_scheduler::{
    render_prometheus_named, ExecutorId, ModelPolicy, Scheduler, SchedulerConfig, SeriesNames,
    TenantId,
};
use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::Backend;
use crate::config::{Config, DaemonSection};
use crate::device::TenantDevice;
use crate::engine::Engine;
use crate::executor;
use crate::metrics::{MetricsEndpoint, MetricsError, MetricsServer, MetricsSource};
use crate::models::ModelServing;
use crate::numa::{self, NumaError};
use crate::privilege::{self, PrivilegeError, RunAs};
use crate::registry::{ModelRegistry, RegistryError};
use crate::reload::{self, ReloadError};
use crate::seccomp::{self, ThreadKind};
use crate::tenant::socket::{self, Door, GuardedDevice, PeerCred, SocketError};
use crate::tenant::{Refusal, Tenant, TenantSpec};

/// Why the daemon could not start.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The models do not fit together or with the tenants' allowed lists.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The executors' NUMA placement cannot be resolved.
    #[error(transparent)]
    Numa(#[from] NumaError),
    /// A tenant socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: vhost::vhost_user::Error,
    },
    /// A tenant socket or its directory is unsafe or could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The metrics endpoint could not be started.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The switch to the unprivileged user failed.
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What every thread of the daemon shares.
pub struct Shared {
    /// The scheduler and the models, which the tenant devices and executors use.
    pub engine: Arc<Engine>,
    /// Every configured tenant; index = tenant id.
    pub tenants: Vec<Arc<Tenant>>,
    /// How each model is served (manifest settings), by model id.
    serving: BTreeMap<u32, ModelServing>,
    /// Every executor, in id order.
    executors: Vec<ExecutorId>,
    /// The configuration in effect; its lock also serialises reloads.
    running: Mutex<Config>,
    /// Reloads applied and refused.
    reloads: [AtomicU64; 2],
}

impl Shared {
    /// The scheduler's policy for `backend`'s model: its own batch limit, the manifest's
    /// delay (else the daemon's) and `instances` executors (else all), the executors
    /// taken in turn from one after the model's id so models spread over them.
    fn model_policy(&self, backend: &dyn Backend, daemon: &DaemonSection) -> ModelPolicy {
        let id = backend.info().id;
        let serving = self.serving.get(&id).copied().unwrap_or_default();
        let all = self.executors.len();
        let instances = serving.instances.map_or(all, |n| (n as usize).min(all));
        let executors = (0..instances)
            .map(|k| self.executors[(id as usize + k) % all.max(1)])
            .collect();
        ModelPolicy {
            max_batch: u32::try_from(backend.max_batch().max(1)).unwrap_or(u32::MAX),
            max_queue_delay_ns: serving
                .max_queue_delay_ns
                .unwrap_or_else(|| daemon.max_batch_delay_us.saturating_mul(1000)),
            executors,
            ..ModelPolicy::default()
        }
    }

    /// Applies `new` if the running configuration may become it (see [`reload`]),
    /// and logs one line either way. Returns the summary of the changes.
    pub fn reload(&self, new: Config) -> Result<String, ReloadError> {
        let result = self.apply(new);
        match &result {
            Ok(summary) => {
                self.reloads[0].fetch_add(1, Ordering::Relaxed);
                info!("reload: applied: {summary}");
            }
            Err(e) => {
                self.reloads[1].fetch_add(1, Ordering::Relaxed);
                error!("reload refused, the running configuration stays: {e}");
            }
        }
        result
    }

    /// Reads the running configuration's file again and applies it ([`Shared::reload`]).
    pub fn reload_from_source(&self) -> Result<String, ReloadError> {
        let source = lock(&self.running).source.clone();
        let loaded = match source {
            Some(path) => Config::load(&path).map_err(ReloadError::from),
            None => Err(ReloadError::NoSource),
        };
        match loaded {
            Ok(config) => self.reload(config),
            Err(e) => {
                self.reloads[1].fetch_add(1, Ordering::Relaxed);
                error!("reload refused, the running configuration stays: {e}");
                Err(e)
            }
        }
    }

    fn apply(&self, new: Config) -> Result<String, ReloadError> {
        let mut running = lock(&self.running);
        let plan = reload::plan(&running, new, &self.engine.registry)?;
        let daemon = &plan.config.daemon;
        // Grants change under the scheduler lock, as connections read them to
        // register: a tenant is never registered with a stale policy.
        self.engine.scheduler.with_core(|core| {
            core.set_config(reload::scheduler_config(core.config(), daemon));
            for backend in self.engine.registry.iter() {
                let id = backend.info().id;
                if core.model_policy(id).is_some() {
                    core.set_model(id, self.model_policy(backend.as_ref(), daemon));
                }
            }
            for (index, grant) in &plan.grants {
                if let Some(tenant) = self.tenants.get(*index) {
                    tenant.set_grant(grant.clone());
                    core.update_tenant(tenant.spec.id, grant.policy.clone());
                }
            }
        });
        let summary = plan.summary();
        *running = plan.config;
        Ok(summary)
    }

    /// The Prometheus text: the scheduler's series labelled with tenant and model
    /// names, plus the daemon's own (connections, reloads).
    pub fn render_metrics(&self) -> String {
        let mut names = SeriesNames::default();
        for t in &self.tenants {
            names.tenants.insert(t.spec.id, t.spec.name.clone());
        }
        for b in self.engine.registry.iter() {
            names.models.insert(b.info().id, b.info().name.clone());
        }
        let mut out = render_prometheus_named(&self.engine.scheduler.stats(), &names);
        let _ = writeln!(
            out,
            "# HELP ai_inferd_tenant_connected Whether the tenant's VMM is connected.\n\
             # TYPE ai_inferd_tenant_connected gauge"
        );
        for t in &self.tenants {
            let _ = writeln!(
                out,
                "ai_inferd_tenant_connected{{tenant=\"{}\"}} {}",
                t.spec.name,
                u8::from(t.is_connected())
            );
        }
        let _ = writeln!(
            out,
            "# HELP ai_inferd_tenant_connections_refused_total Connections to a tenant socket \
             closed at once: peer credentials not admitted, tenant busy, or handshake timeout.\n\
             # TYPE ai_inferd_tenant_connections_refused_total counter"
        );
        for t in &self.tenants {
            for why in Refusal::ALL {
                let _ = writeln!(
                    out,
                    "ai_inferd_tenant_connections_refused_total{{tenant=\"{}\",reason=\"{}\"}} {}",
                    t.spec.name,
                    why.label(),
                    t.refusals(why)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP ai_inferd_reloads_total Configuration reloads, by result.\n\
             # TYPE ai_inferd_reloads_total counter\n\
             ai_inferd_reloads_total{{result=\"applied\"}} {}\n\
             ai_inferd_reloads_total{{result=\"refused\"}} {}",
            self.reloads[0].load(Ordering::Relaxed),
            self.reloads[1].load(Ordering::Relaxed)
        );
        crate::executor::render_fault_metrics(&mut out);
        out
    }
}

/// The metrics endpoint's view of the daemon.
struct DaemonMetrics(Arc<Shared>);

impl MetricsSource for DaemonMetrics {
    fn render(&self) -> String {
        self.0.render_metrics()
    }

    fn reload(&self) -> Result<String, String> {
        self.0.reload_from_source().map_err(|e| e.to_string())
    }
}

/// One tenant's listener: its socket and the connection being served, if any.
struct TenantSlot {
    socket: PathBuf,
    connection: Mutex<Option<ShutdownHandle>>,
    /// The listening socket (a second descriptor of it): shutting it down wakes the
    /// listener thread's accept(), whatever user the daemon runs as by then.
    wake: std::os::unix::net::UnixListener,
}

/// A running daemon; [`Daemon::shutdown`] stops it.
pub struct Daemon {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    slots: Vec<Arc<TenantSlot>>,
    listeners: Vec<JoinHandle<()>>,
    executors: Vec<JoinHandle<()>>,
    metrics: Option<MetricsServer>,
}

impl Daemon {
    /// Loads the tenants and models and starts serving every tenant socket, with
    /// the executors placed as the config says (NUMA nodes read from sysfs).
    pub fn start(config: &Config, backends: Vec<Arc<dyn Backend>>) -> Result<Daemon, DaemonError> {
        Self::start_with(
            config,
            backends,
            BTreeMap::new(),
            Path::new(numa::NODE_ROOT),
            None,
        )
    }

    /// [`Daemon::start`] with each model served as `serving` says (by model id; the
    /// manifest's [`Manifest::serving`](crate::models::Manifest::serving)).
    pub fn start_serving(
        config: &Config,
        backends: Vec<Arc<dyn Backend>>,
        serving: BTreeMap<u32, ModelServing>,
    ) -> Result<Daemon, DaemonError> {
        Self::start_with(config, backends, serving, Path::new(numa::NODE_ROOT), None)
    }

    /// [`Daemon::start_serving`] that becomes `run_as` (see [`privilege`]) once the tenant
    /// sockets are bound, before any of its threads starts.
    pub fn start_serving_as(
        config: &Config,
        backends: Vec<Arc<dyn Backend>>,
        serving: BTreeMap<u32, ModelServing>,
        run_as: Option<RunAs>,
    ) -> Result<Daemon, DaemonError> {
        Self::start_with(
            config,
            backends,
            serving,
            Path::new(numa::NODE_ROOT),
            run_as,
        )
    }

    /// [`Daemon::start_serving_as`] with the NUMA nodes listed under `node_root`.
    pub fn start_with(
        config: &Config,
        backends: Vec<Arc<dyn Backend>>,
        serving: BTreeMap<u32, ModelServing>,
        node_root: &Path,
        run_as: Option<RunAs>,
    ) -> Result<Daemon, DaemonError> {
        let registry = ModelRegistry::new(backends)?;
        let mut tenants = Vec::new();
        for (index, t) in config.tenants.iter().enumerate() {
            let spec = TenantSpec {
                // Fits: a config with more than 2^32 tenants cannot be loaded.
                id: TenantId(index as u32),
                name: t.name.clone(),
            };
            tenants.push(Arc::new(Tenant::new(spec, reload::grant(t, &registry)?)));
        }
        let placement = numa::executor_placement(&config.daemon, node_root)?;
        let executor_ids: Vec<ExecutorId> = (0..config.daemon.executor_threads)
            .map(ExecutorId)
            .collect();
        let scheduler = Scheduler::with_config(reload::scheduler_config(
            &SchedulerConfig::default(),
            &config.daemon,
        ));

        // Bind every socket before starting anything, so a bad path or an unsafe
        // directory fails start-up; a start that fails from here on removes the sockets
        // it made (and only those: a path that is not a socket is never touched).
        let mut made: Vec<&Path> = Vec::new();
        let remove_made = |made: &[&Path]| {
            for path in made {
                let _ = std::fs::remove_file(path);
            }
        };
        let mut listeners = Vec::new();
        for (t, tenant) in config.tenants.iter().zip(&tenants) {
            let bound = socket::bind(&t.socket, &tenant.grant().peer).and_then(|listener| {
                made.push(&t.socket);
                // The second descriptor wakes the listener at shutdown (TenantSlot::wake).
                let wake = listener.try_clone().map_err(|source| SocketError::Create {
                    step: "duplicate",
                    path: t.socket.clone(),
                    source,
                })?;
                Ok((Listener::from(listener), wake))
            });
            match bound {
                Ok(pair) => listeners.push(pair),
                Err(e) => {
                    remove_made(&made);
                    return Err(e.into());
                }
            }
        }
        if let Some(to) = run_as {
            if let Err(e) = privilege::drop_to(to) {
                remove_made(&made);
                return Err(e.into());
            }
            info!("running as uid:gid {to}, no-new-privs");
        }
        let shared = Arc::new(Shared {
            engine: Arc::new(Engine {
                scheduler,
                registry,
            }),
            tenants,
            serving,
            executors: executor_ids,
            running: Mutex::new(config.clone()),
            reloads: Default::default(),
        });
        shared.engine.scheduler.with_core(|core| {
            for backend in shared.engine.registry.iter() {
                let policy = shared.model_policy(backend.as_ref(), &config.daemon);
                core.set_model(backend.info().id, policy);
            }
        });

        let stop = Arc::new(AtomicBool::new(false));
        let mut daemon = Daemon {
            shared: Arc::clone(&shared),
            stop: Arc::clone(&stop),
            slots: Vec::new(),
            listeners: Vec::new(),
            executors: Vec::new(),
            metrics: None,
        };
        for (&id, cpus) in shared.executors.iter().zip(placement) {
            let (engine, stop) = (Arc::clone(&shared.engine), Arc::clone(&stop));
            let name = format!("executor-{}", id.0);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || executor::run(&engine, id, cpus.as_deref(), &stop))
                .map_err(|source| DaemonError::Spawn { name, source });
            match handle {
                Ok(h) => daemon.executors.push(h),
                Err(e) => {
                    daemon.stop_threads();
                    return Err(e);
                }
            }
        }
        for (tenant, (listener, wake)) in shared.tenants.iter().zip(listeners) {
            let slot = Arc::new(TenantSlot {
                socket: listener_path(config, tenant.spec.id),
                connection: Mutex::new(None),
                wake,
            });
            let tenant = Arc::clone(tenant);
            let (shared, stop, slot2) = (Arc::clone(&shared), Arc::clone(&stop), Arc::clone(&slot));
            let name = format!("tenant-{}", tenant.spec.name);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || serve_tenant(&shared, &tenant, listener, &slot2, &stop))
                .map_err(|source| DaemonError::Spawn { name, source });
            daemon.slots.push(slot);
            match handle {
                Ok(h) => daemon.listeners.push(h),
                Err(e) => {
                    daemon.stop_threads();
                    return Err(e);
                }
            }
        }
        if let Some(endpoint) = &config.daemon.metrics_socket {
            let source = Arc::new(DaemonMetrics(Arc::clone(&shared)));
            match MetricsServer::start(endpoint, source) {
                Ok(server) => {
                    info!("metrics on {}", server.endpoint());
                    daemon.metrics = Some(server);
                }
                Err(e) => {
                    daemon.stop_threads();
                    return Err(e.into());
                }
            }
        }
        info!(
            "serving {} tenant(s) with {} model(s) on {} executor(s), {} reserved",
            daemon.slots.len(),
            daemon.shared.engine.registry.iter().count(),
            daemon.executors.len(),
            config.daemon.reserved_executors
        );
        Ok(daemon)
    }

    /// What the daemon's threads share (scheduler statistics, tenants).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Where metrics are served (with the port chosen for `tcp:…:0`), if anywhere.
    pub fn metrics_endpoint(&self) -> Option<&MetricsEndpoint> {
        self.metrics.as_ref().map(MetricsServer::endpoint)
    }

    /// Applies `config` live if allowed (see [`crate::reload`]); logs one line.
    pub fn reload(&self, config: Config) -> Result<String, ReloadError> {
        self.shared.reload(config)
    }

    /// Reads the config file again and applies it (SIGHUP); logs one line.
    pub fn reload_from_source(&self) -> Result<String, ReloadError> {
        self.shared.reload_from_source()
    }

    /// Stops serving: disconnects every VMM, lets running batches finish, joins all
    /// threads and removes the sockets.
    pub fn shutdown(mut self) {
        self.stop_threads();
        info!("stopped");
    }

    fn stop_threads(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            metrics.stop();
        }
        self.stop.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            if let Some(conn) = lock(&slot.connection).as_ref() {
                conn.shutdown();
            }
            // Wakes a listener blocked in accept() (it fails with EINVAL); it sees the
            // stop flag next. No connection is made: connecting to the socket would hand
            // the listener a peer to serve, and once the daemon runs as another user
            // (`--run-as`) the socket's mode may shut it out.
            let _ =
                nix::sys::socket::shutdown(slot.wake.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        for h in self.listeners.drain(..) {
            let _ = h.join();
        }
        for slot in &self.slots {
            let _ = std::fs::remove_file(&slot.socket);
        }
        self.shared.engine.scheduler.with_core(|_| ());
        for h in self.executors.drain(..) {
            let _ = h.join();
        }
    }
}

fn listener_path(config: &Config, id: TenantId) -> PathBuf {
    config
        .tenants
        .get(id.0 as usize)
        .map(|t| t.socket.clone())
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tenant's listener thread: one connection at a time, until stopped.
fn serve_tenant(
    shared: &Arc<Shared>,
    tenant: &Arc<Tenant>,
    mut listener: Listener,
    slot: &TenantSlot,
    stop: &AtomicBool,
) {
    let name = tenant.spec.name.clone();
    // Opened before the filter, which has no openat; read again for each connection.
    let mut fds = match socket::OpenDescriptors::open() {
        Ok(fds) => fds,
        Err(e) => {
            error!("{name}: cannot open /proc/self/fd to check connections: {e}");
            return;
        }
    };
    seccomp::apply(ThreadKind::Listener);
    while !stop.load(Ordering::SeqCst) {
        let device = Arc::new(TenantDevice::new(
            Arc::clone(&shared.engine),
            Arc::clone(tenant),
        ));
        let door = Arc::new(Door::new());
        let guarded = GuardedDevice::new(Arc::clone(&device), Arc::clone(&door));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), guarded, mem) {
            Ok(d) => d,
            Err(e) => {
                error!("{name}: cannot create the vhost-user daemon: {e}");
                return;
            }
        };
        // Counters start when the connection is accepted; no chain can arrive before.
        tenant.begin_connection(shared.engine.scheduler.now());
        // The grant is read under the scheduler lock, which a reload holds while it
        // replaces grants.
        shared
            .engine
            .scheduler
            .with_core(|core| core.set_tenant(tenant.spec.id, tenant.grant().policy.clone()));
        if let Err(e) = daemon.start(&mut listener) {
            if !stop.load(Ordering::SeqCst) {
                error!("{name}: cannot accept a connection: {e}");
            }
            door.decide(false);
            end_connection(shared, tenant, &device, daemon);
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            door.decide(false);
            daemon.request_shutdown();
            let _ = daemon.wait();
            end_connection(shared, tenant, &device, daemon);
            break;
        }
        // The device answers nothing until the door has the verdict.
        let Some(conn) = admit(tenant, &mut fds, &slot.socket) else {
            door.decide(false);
            daemon.request_shutdown();
            let _ = daemon.wait();
            end_connection(shared, tenant, &device, daemon);
            continue;
        };
        door.decide(true);
        *lock(&slot.connection) = daemon.shutdown_handle();
        tenant.set_connected(true);
        let timeout = Duration::from_millis(lock(&shared.running).daemon.handshake_timeout_ms);
        watch_connection(tenant, &listener, &conn, &door, timeout, stop);
        if !door.negotiated() || stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            // A VMM that exits (or is killed) just closes the socket: routine.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(VhostUserError::Disconnected)) => {
                info!("{name}: VMM disconnected")
            }
            Err(e) => warn!("{name}: connection ended with an error: {e}"),
        }
        *lock(&slot.connection) = None;
        tenant.set_connected(false);
        end_connection(shared, tenant, &device, daemon);
        if !stop.load(Ordering::SeqCst) {
            info!("{name}: listening again");
        }
    }
}

/// Checks the peer the vhost-user daemon just accepted on `socket` against the
/// tenant's rule; logs and counts a refusal. The connection (a duplicate) if admitted.
fn admit(tenant: &Tenant, fds: &mut socket::OpenDescriptors, socket: &Path) -> Option<UnixStream> {
    let name = &tenant.spec.name;
    let rule = tenant.grant().peer;
    let Some(conn) = socket::find_accepted(fds, socket) else {
        // The peer already left (its connection is closed) before it was checked.
        warn!("{name}: the new connection closed before its peer could be checked");
        return None;
    };
    match socket::peer_cred(&conn) {
        Ok(peer) if rule.admits(&peer) => {
            info!("{name}: VMM connected ({peer})");
            Some(conn)
        }
        Ok(peer) => {
            warn!("{name}: refused a connection from {peer}: the tenant admits {rule}");
            tenant.count_refusal(Refusal::Peer);
            None
        }
        Err(e) => {
            warn!("{name}: refused a connection whose credentials cannot be read: {e}");
            tenant.count_refusal(Refusal::Peer);
            None
        }
    }
}

/// How often a connected listener thread looks at the stop flag when nothing happens.
const WATCH_TICK: Duration = Duration::from_secs(1);

/// While `conn` is served: closes every further connection to the tenant socket at
/// once, and ends the wait if the handshake milestone is not reached within
/// `timeout`. Returns when the connection ends, the handshake timed out (then
/// `door.negotiated()` is false) or the daemon stops.
fn watch_connection(
    tenant: &Tenant,
    listener: &Listener,
    conn: &UnixStream,
    door: &Door,
    timeout: Duration,
    stop: &AtomicBool,
) {
    let name = &tenant.spec.name;
    let deadline = Instant::now() + timeout;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let wait = if door.negotiated() {
            WATCH_TICK
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    "{name}: closed a connection that did not complete the vhost-user \
                     handshake within {} ms",
                    timeout.as_millis()
                );
                tenant.count_refusal(Refusal::Handshake);
                return;
            }
            left.min(WATCH_TICK)
        };
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // At most WATCH_TICK (1 s): fits.
        #[allow(clippy::cast_possible_truncation)]
        let ms = wait.as_millis().max(1) as libc::c_int;
        // SAFETY: `fds` is a valid array of two pollfd; both fds stay open for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!("{name}: cannot wait on the connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[1].revents != 0 {
            // Hung up, or the handler ended and shut the socket down.
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            refuse_busy(tenant, listener, stop);
        }
    }
}

/// Accepts the pending connection and closes it: the tenant has its VMM.
fn refuse_busy(tenant: &Tenant, listener: &Listener, stop: &AtomicBool) {
    match listener.accept() {
        Ok(Some(extra)) => {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let peer = socket::peer_cred(&extra).map_or_else(
                |e| format!("unknown peer ({e})"),
                |p: PeerCred| p.to_string(),
            );
            warn!(
                "{}: refused a second connection from {peer}: a VMM is already connected",
                tenant.spec.name
            );
            tenant.count_refusal(Refusal::Busy);
            let _ = extra.shutdown(std::net::Shutdown::Both);
        }
        Ok(None) => {}
        Err(e) => {
            warn!("{}: cannot accept: {e}", tenant.spec.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// After a disconnect: stop the vring workers, drop queued work, wait for running
/// work (its results are discarded) and unregister the tenant from the scheduler.
fn end_connection(
    shared: &Shared,
    tenant: &Tenant,
    device: &TenantDevice,
    daemon: VhostUserDaemon<GuardedDevice>,
) {
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins its vring workers: no chain is taken after this.
    drop(daemon);
    device.abandon(|_| true);
    drop(
        shared
            .engine
            .scheduler
            .with_core(|core| core.remove_tenant(tenant.spec.id)),
    );
}
