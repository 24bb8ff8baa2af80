//! The vsock device as the transport sees it: features, configuration space, and the
//! listening unix socket, which lives as long as the device (not the worker), so host
//! processes can connect across guest resets.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::muxer::{MuxerConfig, VsockWorker};
use super::{VsockConfig, VsockMetrics, MAX_CONNECTIONS, NUM_QUEUES, QUEUE_MAX_SIZE};
use crate::virtio::{
    read_config_bytes, ActivateParams, Queue, QueueT, VirtioDevice, VirtioWorker, WorkerThread,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Errors creating a vsock device.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The device's worker thread cannot be started.
    #[error("Cannot start the vsock worker thread: {0}")]
    Thread(#[source] io::Error),
    /// CIDs 0–2 are reserved and 2^32 − 1 means "any".
    #[error("Guest CID {0} is invalid: it must be at least 3 and below 4294967295")]
    InvalidGuestCid(u64),
    /// Something already exists at the socket path (perhaps a stale socket).
    #[error("Vsock socket path {} already exists", .0.display())]
    SocketExists(PathBuf),
    /// The socket path's directory does not exist.
    #[error("Directory of the vsock socket path {} does not exist", .0.display())]
    DirectoryMissing(PathBuf),
    /// `bind()` or `listen()` failed.
    #[error("Cannot listen on the vsock socket {}: {source}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A virtio-vsock device whose host side is unix sockets.
pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    /// Device and inode of the socket file this device created, so that drop removes
    /// that file and not one somebody put in its place.
    socket_id: Option<(u64, u64)>,
    metrics: Arc<VsockMetrics>,
    max_connections: usize,
    worker: Option<VirtioWorker<VsockWorker>>,
    /// The thread `worker` runs on, started with the device.
    thread: WorkerThread,
    lost: bool,
}

impl Vsock {
    /// Binds the listening socket at `config.uds_path`. The path must not exist yet and
    /// its directory must.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < 3 || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidGuestCid(config.guest_cid));
        }
        let path = &config.uds_path;
        if path.symlink_metadata().is_ok() {
            return Err(VsockError::SocketExists(path.clone()));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(VsockError::DirectoryMissing(path.clone()));
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                VsockError::SocketExists(path.clone())
            } else {
                VsockError::Bind {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let socket_id = path.metadata().ok().map(|m| (m.dev(), m.ino()));
        let thread = WorkerThread::spawn(&format!("virtio-vsock-{}", config.guest_cid))
            .map_err(VsockError::Thread)?;
        let device = Self {
            config,
            listener,
            socket_id,
            metrics: Arc::new(VsockMetrics::default()),
            max_connections: MAX_CONNECTIONS,
            worker: None,
            thread,
            lost: false,
        };
        device
            .listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Bind {
                path: device.config.uds_path.clone(),
                source,
            })?;
        Ok(device)
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    /// Where host processes connect.
    pub fn uds_path(&self) -> &Path {
        &self.config.uds_path
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Lowers the connection limit from the next activation on (tests, so they need
    /// few file descriptors).
    #[cfg(test)]
    pub(super) fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, params: ActivateParams) -> io::Result<()> {
        if self.worker.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "vsock device is already active",
            ));
        }
        if params.queues.len() != NUM_QUEUES || params.kicks.len() != NUM_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "vsock device needs {NUM_QUEUES} queues, got {} queues and {} kicks",
                    params.queues.len(),
                    params.kicks.len()
                ),
            ));
        }
        let event_idx = params.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues: Vec<Queue> = params.queues;
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
        }
        let state = VsockWorker::new(
            params.memory,
            queues,
            params.interrupt,
            MuxerConfig {
                guest_cid: self.config.guest_cid,
                uds_path: self.config.uds_path.clone(),
                max_connections: self.max_connections,
            },
            self.listener.try_clone()?,
            Arc::clone(&self.metrics),
        )?;
        self.worker = Some(VirtioWorker::spawn(&self.thread, params.kicks, state)?);
        self.lost = false;
        Ok(())
    }

    fn reset(&mut self) -> Option<Vec<Queue>> {
        let worker = self.worker.take()?;
        match worker.stop() {
            Some(state) => Some(state.into_queues()),
            None => {
                self.lost = true;
                None
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.lost
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Stop serving before the socket file goes.
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        let path = &self.config.uds_path;
        let same = path
            .symlink_metadata()
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|id| Some(id) == self.socket_id);
        if same {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("vsock: cannot remove {}: {e}", path.display());
            }
        }
    }
}
