//! Ready-made engines and daemons over the fake device.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{FakeDeviceBehaviour, FakeVirtioPci};
use crate::backoff::BackoffPolicy;
use crate::device::{AiInferDevice, DeviceOptions};
use crate::dma::DmaPool;
use crate::engine::Engine;
use crate::ipc::{Daemon, DaemonOptions, SessionMemory};

/// An engine over a new fake device (two queues of 64, fast polling).
pub fn fake_engine(behaviour: FakeDeviceBehaviour) -> (FakeVirtioPci, Engine) {
    let fake = FakeVirtioPci::new(behaviour);
    let opts = DeviceOptions {
        queues: 2,
        queue_size: 64,
        connect_timeout: Duration::from_millis(100),
    };
    let dev = AiInferDevice::new(fake.transport(), fake.pool(), opts).expect("fake device");
    let policy = BackoffPolicy {
        spins: 10,
        yields: 2,
        min_sleep: Duration::from_micros(20),
        max_sleep: Duration::from_micros(100),
    };
    (fake, Engine::with_device(dev, policy))
}

/// An agent daemon over a new fake device, serving on `dir/agent.sock` from a
/// background thread. Session memory is a memfd the fake device can reach, so clients
/// in other processes (the C ABI, Python) work as with a real daemon.
pub fn fake_daemon(dir: &Path, max_session_bytes: usize) -> (FakeVirtioPci, PathBuf) {
    let (fake, engine) = fake_engine(FakeDeviceBehaviour::default());
    std::fs::create_dir_all(dir).expect("daemon directory");
    let socket = dir.join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let device = fake.clone();
    let base = AtomicU64::new(0x8000_0000);
    let memory: Box<SessionMemory> = Box::new(move |bytes| {
        let start = base.fetch_add(bytes as u64, Ordering::Relaxed);
        let addrs: Vec<u64> = (0..(bytes / 4096) as u64)
            .map(|i| start + i * 4096)
            .collect();
        let pool = DmaPool::fake_shareable(4096, &addrs)?;
        device.state().extra_pools.push(pool.clone());
        Ok(pool)
    });
    let options = DaemonOptions {
        socket: socket.clone(),
        max_session_bytes,
    };
    let daemon = Arc::new(Daemon::new(Arc::new(engine), options, memory));
    let listener = UnixListener::bind(&socket).expect("daemon socket");
    std::thread::spawn(move || daemon.serve(listener));
    (fake, socket)
}
