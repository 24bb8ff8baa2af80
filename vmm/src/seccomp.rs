//! Per-thread seccomp filters.
//!
//! The filters are data: `vmm/seccomp/x86_64.json` (seccompiler's JSON format, one named
//! filter per thread type, every syscall with the reason it is needed), compiled into
//! static BPF tables when aivmm is built (`vmm/build.rs`), so that starting parses no
//! JSON. Each thread installs its own filter when it starts, before it touches
//! guest memory or anything the guest controls; a thread's children inherit its filter
//! (filters stack, and the stricter wins), so threads are started by a thread whose
//! filter is not yet installed, or that lets them do what they need:
//!
//! - the main thread sets up the VM unfiltered and installs `main` once the vCPUs run;
//! - `vcpu` on each vCPU thread, before its first `KVM_RUN`;
//! - `api` on the API server's thread, which then starts the HTTP server's threads and one
//!   thread per request (they inherit it), and on the metrics thread;
//! - `config_start` on the thread that starts the VM from `--config-file`;
//! - `virtio_worker` and `vhost_user` on the device threads, started with their devices
//!   during setup (`devices::thread_start`), never at activation on a vCPU thread.
//!
//! A syscall outside a thread's filter raises SIGSYS; the handler (`sandbox::seccomp`)
//! writes one line naming the thread and the syscall number and ends the process with
//! [`crate::exit_code::SECCOMP_VIOLATION`]. `--no-seccomp` leaves the filters off.

use std::io;

use devices::thread_start::{self, DeviceThread};
use sandbox::seccomp::Filters;
pub use sandbox::seccomp::SeccompError;

use crate::exit_code;

/// The reviewed filters.
pub const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

// `COMPILED_FILTERS`: `FILTERS_JSON` compiled by build.rs for the target.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// The thread types, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the event loop, runtime requests, teardown.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The API server, its HTTP and request threads, and the metrics thread.
    Api,
    /// The thread that starts the VM from `--config-file`.
    ConfigStart,
    /// An in-process virtio device's queue thread (virtio-blk, virtio-net, vsock).
    VirtioWorker,
    /// The vhost-user (ai_infer) device thread and its watchdog.
    VhostUser,
}

impl ThreadKind {
    /// Every thread type.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::ConfigStart,
        ThreadKind::VirtioWorker,
        ThreadKind::VhostUser,
    ];

    /// The filter's name in the JSON.
    pub fn filter_name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::ConfigStart => "config_start",
            ThreadKind::VirtioWorker => "virtio_worker",
            ThreadKind::VhostUser => "vhost_user",
        }
    }

    fn names() -> [&'static str; 6] {
        Self::ALL.map(Self::filter_name)
    }
}

/// Compiles [`FILTERS_JSON`] (the filters of every [`ThreadKind`]) for this host, as
/// build.rs does for the target.
pub fn compile() -> Result<Filters, SeccompError> {
    Filters::compile(FILTERS_JSON, &ThreadKind::names())
}

/// Turns the filters on for this process: loads them, installs the SIGSYS handler and
/// the device threads' start hook. Threads then install theirs with [`apply`].
pub fn enable() -> Result<(), SeccompError> {
    sandbox::seccomp::enable(
        "aivmm",
        exit_code::SECCOMP_VIOLATION,
        COMPILED_FILTERS,
        &ThreadKind::names(),
    )?;
    thread_start::set_start_hook(device_thread_start);
    Ok(())
}

/// Whether [`enable`] has run.
pub fn enabled() -> bool {
    sandbox::seccomp::enabled()
}

/// Installs the filter of `kind` on the calling thread when the filters are enabled;
/// does nothing otherwise.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    sandbox::seccomp::apply(kind.filter_name())
}

fn device_thread_start(kind: DeviceThread) -> io::Result<()> {
    let kind = match kind {
        DeviceThread::VirtioWorker => ThreadKind::VirtioWorker,
        DeviceThread::VhostUser => ThreadKind::VhostUser,
    };
    apply(kind).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_RUN: u64 = 0xae80;
    const KVM_CREATE_VM: u64 = 0xae01;
    const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
    const KVM_IRQFD: u64 = 0x4020_ae76;
    const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3b72;
    const TCSETS: u64 = 0x5402;
    const TIOCSTI: u64 = 0x5412;

    use sandbox::bpf::{self, ALLOW, TRAP};

    fn check(filters: &Filters, kind: ThreadKind, nr: i64, args: [u64; 6]) -> u32 {
        bpf::verdict(filters.program(kind.filter_name()).unwrap(), nr, args)
    }

    use bpf::ioctl;

    #[test]
    fn every_filter_compiles_and_traps_what_it_does_not_list() {
        let filters = compile().unwrap();
        for kind in ThreadKind::ALL {
            assert!(
                !filters.program(kind.filter_name()).unwrap().is_empty(),
                "{kind:?}"
            );
            // Nothing aivmm does after setup: module loading, ptrace, a new program.
            for nr in [libc::SYS_init_module, libc::SYS_ptrace, libc::SYS_execve] {
                assert_eq!(check(&filters, kind, nr, [0; 6]), TRAP, "{kind:?} {nr}");
            }
            // What the SIGSYS handler itself needs, and any thread's exit.
            for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_futex] {
                assert_eq!(check(&filters, kind, nr, [0; 6]), ALLOW, "{kind:?} {nr}");
            }
        }
    }

    #[test]
    fn the_vcpu_filter_allows_its_kvm_ioctls_and_nothing_like_a_socket() {
        let f = compile().unwrap();
        let vcpu = ThreadKind::Vcpu;
        for req in [KVM_RUN, KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IOEVENTFD] {
            assert_eq!(
                check(&f, vcpu, libc::SYS_ioctl, ioctl(req)),
                ALLOW,
                "{req:#x}"
            );
        }
        for req in [KVM_CREATE_VM, VFIO_IOMMU_UNMAP_DMA, TIOCSTI] {
            assert_eq!(
                check(&f, vcpu, libc::SYS_ioctl, ioctl(req)),
                TRAP,
                "{req:#x}"
            );
        }
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_openat,
            libc::SYS_clone,
            libc::SYS_clone3,
        ] {
            assert_eq!(check(&f, vcpu, nr, [1, 1, 0, 0, 0, 0]), TRAP, "{nr}");
        }
        // No executable mappings.
        let rw = u64::try_from(libc::PROT_READ | libc::PROT_WRITE).unwrap();
        let rwx = rw | u64::try_from(libc::PROT_EXEC).unwrap();
        assert_eq!(
            check(&f, vcpu, libc::SYS_mmap, [0, 4096, rw, 0, 0, 0]),
            ALLOW
        );
        assert_eq!(
            check(&f, vcpu, libc::SYS_mmap, [0, 4096, rwx, 0, 0, 0]),
            TRAP
        );
        assert_eq!(
            check(&f, vcpu, libc::SYS_mprotect, [0, 4096, rwx, 0, 0, 0]),
            TRAP
        );
    }

    #[test]
    fn device_and_control_filters_allow_what_their_threads_do() {
        let f = compile().unwrap();
        let allowed = |kind, nr, args| check(&f, kind, nr, args) == ALLOW;
        let unix = bpf::socket(libc::AF_UNIX);
        let inet = bpf::socket(libc::AF_INET);
        // virtio-blk, virtio-net and vsock serve their queues; vsock connects to unix
        // sockets only.
        let worker = ThreadKind::VirtioWorker;
        for nr in [
            libc::SYS_epoll_wait,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_accept4,
        ] {
            assert!(allowed(worker, nr, [0; 6]), "{nr}");
        }
        assert!(allowed(worker, libc::SYS_socket, unix));
        assert!(!allowed(worker, libc::SYS_socket, inet));
        assert!(!allowed(worker, libc::SYS_ioctl, ioctl(KVM_RUN)));
        assert!(!allowed(worker, libc::SYS_openat, [0; 6]));
        // The vhost-user thread talks to ai-inferd and starts its watchdog.
        let vu = ThreadKind::VhostUser;
        for nr in [libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_clone3] {
            assert!(allowed(vu, nr, [0; 6]), "{nr}");
        }
        assert!(allowed(vu, libc::SYS_socket, unix));
        assert!(!allowed(vu, libc::SYS_socket, inet));
        // The API serves its socket and starts request threads.
        let api = ThreadKind::Api;
        for nr in [libc::SYS_accept4, libc::SYS_clone3, libc::SYS_recvfrom] {
            assert!(allowed(api, nr, [0; 6]), "{nr}");
        }
        // clone(2) makes threads only: without CLONE_THREAD it would be a fork.
        let thread_flags = bpf::thread_clone_flags();
        assert!(allowed(api, libc::SYS_clone, [thread_flags, 0, 0, 0, 0, 0]));
        let sigchld = u64::try_from(libc::SIGCHLD).unwrap();
        assert!(!allowed(api, libc::SYS_clone, [sigchld, 0, 0, 0, 0, 0]));
        assert!(!allowed(api, libc::SYS_ioctl, ioctl(KVM_RUN)));
        // The main thread: the event loop, vCPU kicks, KVM and VFIO teardown.
        let main = ThreadKind::Main;
        for nr in [libc::SYS_epoll_wait, libc::SYS_tgkill] {
            assert!(allowed(main, nr, [0; 6]), "{nr}");
        }
        for req in [KVM_IRQFD, VFIO_IOMMU_UNMAP_DMA, TCSETS] {
            assert!(allowed(main, libc::SYS_ioctl, ioctl(req)), "{req:#x}");
        }
        assert!(!allowed(main, libc::SYS_ioctl, ioctl(TIOCSTI)));
        assert!(!allowed(main, libc::SYS_socket, inet));
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
}
