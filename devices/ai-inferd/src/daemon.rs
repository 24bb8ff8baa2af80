//! Wiring: the model registry, the scheduler, one listener thread per tenant socket
//! and the executor threads; and an orderly shutdown.
//!
//! Each listener thread accepts one VMM connection at a time on its tenant's socket
//! and serves it with a `VhostUserDaemon`. When the VMM disconnects, the tenant's
//! queued work is dropped, running work is waited for (its results discarded), the
//! guest memory mapping goes with the last reference, and the socket listens again.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ai_infer_protocol::DeviceConfig;
use log::{error, info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::Backend;
use crate::config::Config;
use crate::device::TenantDevice;
use crate::executor;
use crate::job::Job;
use crate::registry::{ModelRegistry, RegistryError};
use crate::scheduler::{ExecutorId, ModelPolicy, Scheduler, TenantId};
use crate::tenant::{Tenant, TenantSpec};

/// Why the daemon could not start.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The models do not fit together or with the tenants' allowed lists.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A tenant socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: vhost::vhost_user::Error,
    },
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
    /// The cross-tenant scheduler; its jobs are admitted INFER requests.
    pub scheduler: Scheduler<Job>,
    /// The loaded models.
    pub registry: ModelRegistry,
}

/// One tenant's listener: its socket and the connection being served, if any.
struct TenantSlot {
    socket: PathBuf,
    connection: Mutex<Option<ShutdownHandle>>,
}

/// A running daemon; [`Daemon::shutdown`] stops it.
pub struct Daemon {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    slots: Vec<Arc<TenantSlot>>,
    listeners: Vec<JoinHandle<()>>,
    executors: Vec<JoinHandle<()>>,
}

impl Daemon {
    /// Loads the tenants and models and starts serving every tenant socket.
    pub fn start(config: &Config, backends: Vec<Arc<dyn Backend>>) -> Result<Daemon, DaemonError> {
        let registry = ModelRegistry::new(backends)?;
        let mut specs = Vec::new();
        for (index, t) in config.tenants.iter().enumerate() {
            let allowed_ids = registry.allowed_ids(&t.name, &t.allowed())?;
            specs.push(TenantSpec {
                // Fits: a config with more than 2^32 tenants cannot be loaded.
                id: TenantId(index as u32),
                name: t.name.clone(),
                policy: t.policy(),
                allowed_ids,
                device_config: DeviceConfig {
                    num_request_queues: t.num_request_queues,
                    max_in_flight: t.max_in_flight,
                    ..DeviceConfig::default()
                },
            });
        }
        let executor_ids: Vec<ExecutorId> = (0..config.daemon.executor_threads)
            .map(ExecutorId)
            .collect();
        let scheduler = Scheduler::new();
        scheduler.with_core(|core| {
            for backend in registry.iter() {
                core.set_model(
                    backend.info().id,
                    ModelPolicy {
                        max_batch: u32::try_from(backend.max_batch().max(1)).unwrap_or(u32::MAX),
                        max_queue_delay_ns: config.daemon.max_batch_delay_us.saturating_mul(1000),
                        executors: executor_ids.clone(),
                        ..ModelPolicy::default()
                    },
                );
            }
        });
        let shared = Arc::new(Shared {
            scheduler,
            registry,
        });

        // Bind every socket before starting anything, so a bad path fails start-up.
        let mut listeners = Vec::new();
        for t in &config.tenants {
            let listener =
                Listener::new(&t.socket, true).map_err(|source| DaemonError::Listen {
                    path: t.socket.clone(),
                    source,
                })?;
            listeners.push(listener);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut daemon = Daemon {
            shared: Arc::clone(&shared),
            stop: Arc::clone(&stop),
            slots: Vec::new(),
            listeners: Vec::new(),
            executors: Vec::new(),
        };
        for (id, cpu) in executor_ids.iter().map(|id| {
            let cpus = &config.daemon.executor_cpus;
            let cpu = (!cpus.is_empty()).then(|| cpus[id.0 as usize % cpus.len()]);
            (*id, cpu)
        }) {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            let name = format!("executor-{}", id.0);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || executor::run(&shared, id, cpu, &stop))
                .map_err(|source| DaemonError::Spawn { name, source });
            match handle {
                Ok(h) => daemon.executors.push(h),
                Err(e) => {
                    daemon.stop_threads();
                    return Err(e);
                }
            }
        }
        for (spec, listener) in specs.into_iter().zip(listeners) {
            let slot = Arc::new(TenantSlot {
                socket: listener_path(config, spec.id),
                connection: Mutex::new(None),
            });
            let tenant = Arc::new(Tenant::new(spec));
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
        info!(
            "serving {} tenant(s) with {} model(s) on {} executor(s)",
            daemon.slots.len(),
            daemon.shared.registry.iter().count(),
            daemon.executors.len()
        );
        Ok(daemon)
    }

    /// Stops serving: disconnects every VMM, lets running batches finish, joins all
    /// threads and removes the sockets.
    pub fn shutdown(mut self) {
        self.stop_threads();
        info!("stopped");
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            if let Some(conn) = lock(&slot.connection).as_ref() {
                conn.shutdown();
            }
            // Wakes a listener blocked in accept(); it sees the stop flag next.
            let _ = UnixStream::connect(&slot.socket);
        }
        for h in self.listeners.drain(..) {
            let _ = h.join();
        }
        self.shared.scheduler.with_core(|_| ());
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
    while !stop.load(Ordering::SeqCst) {
        let device = Arc::new(TenantDevice::new(Arc::clone(shared), Arc::clone(tenant)));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new(name.clone(), Arc::clone(&device), mem) {
            Ok(d) => d,
            Err(e) => {
                error!("{name}: cannot create the vhost-user daemon: {e}");
                return;
            }
        };
        // Counters start when the connection is accepted; no chain can arrive before.
        tenant.begin_connection(shared.scheduler.now());
        shared
            .scheduler
            .with_core(|core| core.set_tenant(tenant.spec.id, tenant.spec.policy.clone()));
        if let Err(e) = daemon.start(&mut listener) {
            error!("{name}: cannot accept a connection: {e}");
            end_connection(shared, tenant, &device, daemon);
            continue;
        }
        *lock(&slot.connection) = daemon.shutdown_handle();
        if stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            info!("{name}: VMM connected");
        }
        if let Err(e) = daemon.wait() {
            warn!("{name}: connection ended with an error: {e}");
        }
        *lock(&slot.connection) = None;
        end_connection(shared, tenant, &device, daemon);
        if !stop.load(Ordering::SeqCst) {
            info!("{name}: VMM disconnected; listening again");
        }
    }
}

/// After a disconnect: stop the vring workers, drop queued work, wait for running
/// work (its results are discarded) and unregister the tenant from the scheduler.
fn end_connection(
    shared: &Shared,
    tenant: &Tenant,
    device: &TenantDevice,
    daemon: VhostUserDaemon<Arc<TenantDevice>>,
) {
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins its vring workers: no chain is taken after this.
    drop(daemon);
    device.abandon(|_| true);
    drop(
        shared
            .scheduler
            .with_core(|core| core.remove_tenant(tenant.spec.id)),
    );
}
