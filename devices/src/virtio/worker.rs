//! The thread an in-process virtio device serves its queues on.
//!
//! A device's activation hands its state (queues, guest memory, interrupt, backend) to a
//! [`VirtioWorker`]: one thread that waits with epoll on the queues' kick eventfds, the
//! device's own file descriptors (a tap, sockets, a rate limiter's timer) and a stop
//! eventfd. vCPU threads never run device I/O: a guest notification is an ioeventfd that
//! wakes this thread. [`VirtioWorker::stop`] ends the thread and gives the state back,
//! so reset can return the queues to the transport.
//!
//! The thread itself is a [`WorkerThread`], started with the device and idle between
//! activations: activation runs on a vCPU thread, and a thread started there would
//! inherit the vCPU's seccomp filter (see [`crate::thread_start`]).

use std::io;
use std::os::unix::io::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Tokens below this are queue indices (kicks); devices register their own fds at or
/// above it.
pub const DEVICE_TOKEN_BASE: u64 = 1 << 32;
const STOP_TOKEN: u64 = u64::MAX;
const MAX_EVENTS: usize = 32;

/// What a worker thread runs: the device's serving half.
pub trait WorkerLoop: Send + 'static {
    /// Registers the device's own fds with `epoll` (tokens ≥ [`DEVICE_TOKEN_BASE`]).
    /// Called once, on the worker thread, before any event is handled.
    fn register(&mut self, _epoll: &Epoll) -> io::Result<()> {
        Ok(())
    }

    /// Queue `index` was notified by the driver (its kick eventfd has been drained).
    fn queue_event(&mut self, index: usize, epoll: &Epoll);

    /// A device fd registered with `token` is ready with `events`.
    fn device_event(&mut self, _token: u64, _events: EventSet, _epoll: &Epoll) {}
}

/// Registers `fd` for `events` under `token`.
pub fn epoll_add(epoll: &Epoll, fd: &impl AsRawFd, events: EventSet, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd.as_raw_fd(),
        EpollEvent::new(events, token),
    )
}

/// Changes the events `fd` is watched for.
pub fn epoll_modify(
    epoll: &Epoll,
    fd: &impl AsRawFd,
    events: EventSet,
    token: u64,
) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Modify,
        fd.as_raw_fd(),
        EpollEvent::new(events, token),
    )
}

/// Stops watching `fd`.
pub fn epoll_delete(epoll: &Epoll, fd: &impl AsRawFd) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Delete,
        fd.as_raw_fd(),
        EpollEvent::default(),
    )
}

/// Work for a [`WorkerThread`]: one activation's serving loop.
type Job = Box<dyn FnOnce() + Send>;

/// A device's worker thread, started when the device is created. It runs the device's
/// start hook (its seccomp filter) first, then serves one activation at a time.
pub struct WorkerThread {
    jobs: Sender<Job>,
}

impl WorkerThread {
    /// Starts thread `name` and waits until its start hook has run; an error of the hook
    /// is returned and the thread has ended.
    pub fn spawn(name: &str) -> io::Result<Self> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        crate::thread_start::spawn_device_thread(
            crate::thread_start::DeviceThread::VirtioWorker,
            name,
            move || {
                while let Ok(job) = receiver.recv() {
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            },
        )?;
        Ok(Self { jobs })
    }

    fn run(&self, job: Job) -> io::Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other("the device's worker thread is gone"))
    }
}

/// A running activation of a device on its [`WorkerThread`], owning the device's state
/// `T` until [`VirtioWorker::stop`].
pub struct VirtioWorker<T: WorkerLoop> {
    stop: EventFd,
    done: Option<Receiver<T>>,
}

impl<T: WorkerLoop> VirtioWorker<T> {
    /// Serves `state` on `thread`; `kicks[i]` is queue `i`'s notification.
    pub fn spawn(thread: &WorkerThread, kicks: Vec<EventFd>, state: T) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (index, kick) in kicks.iter().enumerate() {
            epoll_add(&epoll, kick, EventSet::IN, index as u64)?;
        }
        epoll_add(&epoll, &stop, EventSet::IN, STOP_TOKEN)?;
        let (finished, done) = mpsc::sync_channel(1);
        thread.run(Box::new(move || {
            let _ = finished.send(run(epoll, kicks, state));
        }))?;
        Ok(Self {
            stop,
            done: Some(done),
        })
    }

    /// Ends the activation and returns the state it served. `None` if its loop panicked
    /// (the panic is logged; the device must then be treated as lost).
    pub fn stop(mut self) -> Option<T> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Option<T> {
        let done = self.done.take()?;
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop a virtio worker: {e}");
        }
        match done.recv() {
            Ok(state) => Some(state),
            Err(_) => {
                log::error!("a virtio worker thread panicked");
                None
            }
        }
    }
}

impl<T: WorkerLoop> Drop for VirtioWorker<T> {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn run<T: WorkerLoop>(epoll: Epoll, kicks: Vec<EventFd>, mut state: T) -> T {
    if let Err(e) = state.register(&epoll) {
        log::error!("virtio worker cannot watch its device: {e}");
    }
    let mut events = vec![EpollEvent::default(); MAX_EVENTS];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio worker: epoll_wait failed: {e}");
                return state;
            }
        };
        for event in &events[..n] {
            match event.data() {
                STOP_TOKEN => return state,
                token if token < DEVICE_TOKEN_BASE => {
                    let Ok(index) = usize::try_from(token) else {
                        continue;
                    };
                    if let Some(kick) = kicks.get(index) {
                        // Drained before handling: a kick that arrives meanwhile wakes us again.
                        let _ = kick.read();
                        state.queue_event(index, &epoll);
                    }
                }
                token => state.device_event(token, event.event_set(), &epoll),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Counter {
        kicks: Vec<usize>,
        seen: mpsc::Sender<usize>,
    }

    impl WorkerLoop for Counter {
        fn queue_event(&mut self, index: usize, _epoll: &Epoll) {
            self.kicks.push(index);
            let _ = self.seen.send(index);
        }
    }

    #[test]
    fn kicks_reach_the_loop_and_stop_returns_the_state() {
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let k1 = kicks[1].try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let thread = WorkerThread::spawn("test-worker").unwrap();
        let worker = VirtioWorker::spawn(
            &thread,
            kicks,
            Counter {
                kicks: Vec::new(),
                seen: tx,
            },
        )
        .unwrap();
        k1.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            1
        );
        let state = worker.stop().unwrap();
        assert_eq!(state.kicks, vec![1]);
    }
}
