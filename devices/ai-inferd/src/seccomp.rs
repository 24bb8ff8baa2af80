//! ai-inferd's per-thread seccomp filters.
//!
//! The filters are data: `devices/ai-inferd/seccomp/x86_64.json` (seccompiler's JSON, one
//! named filter per thread type, every syscall with the reason it is needed), compiled
//! into static BPF tables when the daemon is built (`devices/ai-inferd/build.rs`), so
//! that starting parses no JSON (`sandbox::seccomp`). Each thread that touches something
//! a tenant or a local client controls installs its filter first:
//!
//! - `listener` on each tenant's listener thread, before it accepts a VMM; the
//!   vhost-user request thread and the vring workers it starts inherit it;
//! - `vring_worker` on each vring worker, on its first event, before it reads a ring
//!   (stacked on `listener`: a worker may only do what both allow);
//! - `executor` on each executor thread once it is pinned, before its first batch; the
//!   backends' own worker threads inherit it;
//! - `metrics` on the metrics thread, before it accepts a client.
//!
//! The main thread stays unfiltered: it only loads the models, binds the sockets, waits
//! for signals and reloads the operator's configuration file, and reads nothing a tenant
//! or a client sends. A syscall outside a thread's filter ends the daemon with exit code
//! [`SECCOMP_VIOLATION`] and one line naming the thread and the syscall: a thread that
//! strays is a bug or an attacker, and nothing in a shared address space is safe after
//! it. `serve --no-seccomp` leaves the filters off.

use std::cell::Cell;

pub use sandbox::seccomp::SeccompError;

/// The reviewed filters.
pub const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

// `COMPILED_FILTERS`: `FILTERS_JSON` compiled by build.rs for the target.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// The exit code of a syscall outside a thread's filter (as aivmm's).
pub const SECCOMP_VIOLATION: u8 = 3;

/// The thread types, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A tenant's listener, its vhost-user request thread and its vring workers.
    Listener,
    /// A vring worker, on top of [`ThreadKind::Listener`].
    VringWorker,
    /// An executor and the backends' threads it starts.
    Executor,
    /// The metrics endpoint.
    Metrics,
}

impl ThreadKind {
    /// Every thread type.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Listener,
        ThreadKind::VringWorker,
        ThreadKind::Executor,
        ThreadKind::Metrics,
    ];

    /// The filter's name in the JSON.
    pub fn filter_name(self) -> &'static str {
        match self {
            ThreadKind::Listener => "listener",
            ThreadKind::VringWorker => "vring_worker",
            ThreadKind::Executor => "executor",
            ThreadKind::Metrics => "metrics",
        }
    }

    /// The name of every filter.
    pub fn names() -> [&'static str; 4] {
        Self::ALL.map(Self::filter_name)
    }
}

/// Turns the filters on for this process: loads them and installs the SIGSYS handler.
/// Call it once, before the daemon starts a thread.
pub fn enable() -> Result<(), SeccompError> {
    sandbox::seccomp::enable(
        "ai-inferd",
        SECCOMP_VIOLATION,
        COMPILED_FILTERS,
        &ThreadKind::names(),
    )
}

/// Installs the filter of `kind` on the calling thread when the filters are enabled.
/// A thread that cannot install its filter must not go on unfiltered, and a failure
/// here is a kernel refusal no retry mends: the daemon stops.
pub fn apply(kind: ThreadKind) {
    if let Err(e) = sandbox::seccomp::apply(kind.filter_name()) {
        log::error!("{e}; stopping");
        std::process::exit(1);
    }
}

thread_local! {
    static VRING_WORKER_FILTERED: Cell<bool> = const { Cell::new(false) };
}

/// [`apply`]s the vring worker's filter the first time the calling thread asks.
pub fn apply_once_on_vring_worker() {
    if !VRING_WORKER_FILTERED.with(Cell::get) {
        apply(ThreadKind::VringWorker);
        VRING_WORKER_FILTERED.with(|f| f.set(true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox::bpf::{self, ALLOW, TRAP};
    use sandbox::seccomp::Filters;

    fn filters() -> Filters {
        Filters::compile(FILTERS_JSON, &ThreadKind::names()).unwrap()
    }

    fn answer(f: &Filters, kind: ThreadKind, nr: i64, args: [u64; 6]) -> u32 {
        bpf::verdict(f.program(kind.filter_name()).unwrap(), nr, args)
    }

    #[test]
    fn the_filters_compiled_at_build_time_are_the_json_compiled_now() {
        let checked = sandbox::seccomp::built_as_json_compiles(
            COMPILED_FILTERS,
            FILTERS_JSON,
            &ThreadKind::names(),
        );
        assert_eq!(checked, Ok(()));
    }

    #[test]
    fn every_rule_says_why() {
        let missing = sandbox::seccomp::uncommented_rules(FILTERS_JSON, &ThreadKind::names());
        assert_eq!(missing, Ok(vec![]));
    }

    #[test]
    fn no_filter_allows_a_new_program_a_network_socket_or_executable_memory() {
        let f = filters();
        let rwx = u64::try_from(libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC).unwrap();
        let fork = u64::try_from(libc::SIGCHLD).unwrap();
        for kind in ThreadKind::ALL {
            for nr in [
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_init_module,
                libc::SYS_connect,
                libc::SYS_bind,
                libc::SYS_setuid,
            ] {
                assert_eq!(answer(&f, kind, nr, [0; 6]), TRAP, "{kind:?} {nr}");
            }
            let inet = bpf::socket(libc::AF_INET);
            assert_eq!(answer(&f, kind, libc::SYS_socket, inet), TRAP, "{kind:?}");
            let exec_map = [0, 4096, rwx, 0, 0, 0];
            assert_eq!(answer(&f, kind, libc::SYS_mmap, exec_map), TRAP, "{kind:?}");
            assert_eq!(
                answer(&f, kind, libc::SYS_mprotect, exec_map),
                TRAP,
                "{kind:?}"
            );
            assert_eq!(
                answer(&f, kind, libc::SYS_clone, [fork, 0, 0, 0, 0, 0]),
                TRAP
            );
            // What the SIGSYS handler itself needs, and any thread's exit.
            for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_futex] {
                assert_eq!(answer(&f, kind, nr, [0; 6]), ALLOW, "{kind:?} {nr}");
            }
        }
    }

    #[test]
    fn each_thread_may_do_its_own_work_only() {
        let f = filters();
        let allowed = |kind, nr, args| answer(&f, kind, nr, args) == ALLOW;
        let thread = [bpf::thread_clone_flags(), 0, 0, 0, 0, 0];
        // The listener takes VMMs and their descriptors, and starts the vring workers.
        let listener = ThreadKind::Listener;
        for nr in [libc::SYS_accept4, libc::SYS_recvmsg, libc::SYS_sendmsg] {
            assert!(allowed(listener, nr, [0; 6]), "{nr}");
        }
        assert!(allowed(listener, libc::SYS_clone, thread));
        assert!(!allowed(listener, libc::SYS_openat, [0; 6]));
        // A vring worker reads rings and kicks: no descriptors, no threads.
        let worker = ThreadKind::VringWorker;
        assert!(allowed(worker, libc::SYS_epoll_wait, [0; 6]));
        for nr in [libc::SYS_recvmsg, libc::SYS_accept4, libc::SYS_openat] {
            assert!(!allowed(worker, nr, [0; 6]), "{nr}");
        }
        assert!(!allowed(worker, libc::SYS_clone, thread));
        // An executor runs batches on guest memory; the backends may start threads and
        // read the CPU topology, but never open a file for writing.
        let flags = |f: libc::c_int| [0, 0, u64::try_from(f).unwrap(), 0, 0, 0];
        let read_only = flags(libc::O_RDONLY | libc::O_CLOEXEC);
        let writes = [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_CREAT,
            libc::O_RDONLY | libc::O_TRUNC,
            libc::O_WRONLY | libc::O_APPEND,
            libc::O_TMPFILE | libc::O_RDWR,
        ];
        let executor = ThreadKind::Executor;
        assert!(allowed(executor, libc::SYS_clone, thread));
        assert!(allowed(executor, libc::SYS_openat, read_only));
        for nr in [libc::SYS_recvmsg, libc::SYS_accept4, libc::SYS_sendmsg] {
            assert!(!allowed(executor, nr, [0; 6]), "{nr}");
        }
        // The metrics thread answers clients and reads the configuration file for a
        // reload asked on its socket.
        let metrics = ThreadKind::Metrics;
        assert!(allowed(metrics, libc::SYS_accept4, [0; 6]));
        assert!(allowed(metrics, libc::SYS_openat, read_only));
        for kind in [executor, metrics] {
            for write in writes {
                assert!(
                    !allowed(kind, libc::SYS_openat, flags(write)),
                    "{kind:?} {write:#x}"
                );
            }
        }
        assert!(!allowed(metrics, libc::SYS_clone, thread));
        assert!(!allowed(metrics, libc::SYS_recvmsg, [0; 6]));
    }
}
