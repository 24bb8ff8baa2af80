//! Per-thread seccomp filters.
//!
//! The filters are data: `vmm/seccomp/x86_64.json` (seccompiler's JSON format, one named
//! filter per thread type, every syscall with the reason it is needed), compiled when
//! aivmm starts. Each thread installs its own filter when it starts, before it touches
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
//! A syscall outside a thread's filter raises SIGSYS; the handler writes one line naming
//! the thread and the syscall number and ends the process with
//! [`crate::exit_code::SECCOMP_VIOLATION`]. `--no-seccomp` leaves the filters off.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::sync::OnceLock;

use devices::thread_start::{self, DeviceThread};
use seccompiler::{BpfProgram, TargetArch};

use crate::exit_code;

/// The reviewed filters.
pub const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

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
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot compile the seccomp filters: {0}")]
    Compile(String),
    #[error("the seccomp filters have no filter named {0:?}")]
    Missing(&'static str),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
}

/// The compiled filters, one per [`ThreadKind`].
pub struct Filters {
    programs: HashMap<ThreadKind, BpfProgram>,
}

impl Filters {
    /// Compiles [`FILTERS_JSON`] for this host's architecture.
    pub fn compile() -> Result<Self, SeccompError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut map = seccompiler::compile_from_json(FILTERS_JSON.as_bytes(), arch)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            let program = map
                .remove(kind.filter_name())
                .ok_or(SeccompError::Missing(kind.filter_name()))?;
            programs.insert(kind, program);
        }
        Ok(Self { programs })
    }

    /// The BPF program of `kind`.
    pub fn program(&self, kind: ThreadKind) -> &BpfProgram {
        &self.programs[&kind]
    }

    /// Installs the filter of `kind` on the calling thread (for good).
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        remember_thread_name();
        seccompiler::apply_filter(self.program(kind)).map_err(|source| SeccompError::Install {
            kind: kind.filter_name(),
            source,
        })
    }
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Turns the filters on for this process: compiles them, installs the SIGSYS handler and
/// the device threads' start hook. Threads then install theirs with [`apply`].
pub fn enable() -> Result<(), SeccompError> {
    let filters = Filters::compile()?;
    install_sigsys_handler().map_err(SeccompError::Handler)?;
    warm_up_allocator();
    let _ = FILTERS.set(filters);
    thread_start::set_start_hook(device_thread_start);
    Ok(())
}

/// Whether [`enable`] has run.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs the filter of `kind` on the calling thread when the filters are enabled;
/// does nothing otherwise.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    filters.install(kind)?;
    log::info!(
        "seccomp: {} filter installed on thread {}",
        kind.filter_name(),
        std::thread::current().name().unwrap_or("(unnamed)")
    );
    Ok(())
}

/// glibc's allocator reads two files lazily, each once per process: the number of CPUs
/// (`/sys/devices/system/cpu/online`) when a thread needs a new arena beyond the eighth,
/// and `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread arena's heap.
/// Left alone, either can first happen on a filtered thread (an API request thread's
/// first allocation; a virtio worker freeing its memory at exit, seen in the rig), and no
/// filter should allow `openat` for it. So the arena limit is set here to glibc's own
/// default (8 per CPU), which it then never computes, and a short thread shrinks its
/// arena's heap before any filter is installed.
fn warm_up_allocator() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive
    // count.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
        log::warn!("seccomp: cannot set the allocator's arena limit");
    }
    let warm_up = devices::thread::named("seccomp-warm-up").spawn(|| {
        let blocks: Vec<Vec<u8>> = (0..64)
            .map(|_| std::hint::black_box(vec![1u8; 64 << 10]))
            .collect();
        drop(std::hint::black_box(blocks));
    });
    match warm_up.map(std::thread::JoinHandle::join) {
        Ok(Ok(())) => {}
        _ => log::warn!("seccomp: the allocator warm-up thread failed"),
    }
}

fn device_thread_start(kind: DeviceThread) -> io::Result<()> {
    let kind = match kind {
        DeviceThread::VirtioWorker => ThreadKind::VirtioWorker,
        DeviceThread::VhostUser => ThreadKind::VhostUser,
    };
    apply(kind).map_err(io::Error::other)
}

/// The longest thread name the violation line shows.
const NAME_MAX: usize = 32;

thread_local! {
    /// The thread's name (or id), kept where the SIGSYS handler can read it without a
    /// syscall or an allocation.
    static THREAD_NAME: Cell<([u8; NAME_MAX], usize)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

fn remember_thread_name() {
    let mut buf = [0u8; NAME_MAX];
    let name = match std::thread::current().name() {
        Some(n) => n.to_string(),
        None => format!("tid {}", gettid()),
    };
    let len = name.len().min(NAME_MAX);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|n| n.set((buf, len)));
}

fn gettid() -> i64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// The start of the kernel's `siginfo_t` for SIGSYS (`_sigsys` in the union): the
/// libc crate does not expose `si_syscall`.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Writes `aivmm: seccomp: thread <name> made syscall <nr>, outside its filter; exiting`
/// and ends the process. Only write(2) and _exit(2), which every filter allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler, and for
    // SIGSYS its union holds `_sigsys`, laid out as `SigsysInfo`.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"aivmm: seccomp: thread ");
    let (name, name_len) = THREAD_NAME.with(Cell::get);
    if name_len == 0 {
        put(b"(unnamed)");
    } else {
        put(&name[..name_len]);
    }
    put(b" made syscall ");
    let mut digits = [0u8; 12];
    put(decimal(i64::from(nr), &mut digits));
    put(b", outside its filter; exiting\n");
    // SAFETY: write(2) from a buffer we own, of its filled length; async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len) };
    // SAFETY: _exit(2) is async-signal-safe and does not return.
    unsafe { libc::_exit(i32::from(exit_code::SECCOMP_VIOLATION)) };
}

/// `n` in decimal, in `buf`, without allocating.
fn decimal(n: i64, buf: &mut [u8; 12]) -> &[u8] {
    let negative = n < 0;
    let mut v = n.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        v /= 10;
        if v == 0 || i == 1 {
            break;
        }
    }
    if negative {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigsys;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigemptyset on the mask of the struct we own.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: a valid sigaction for SIGSYS, whose handler only calls async-signal-safe
    // functions; the old action is not wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::sock_filter;

    const KVM_RUN: u64 = 0xae80;
    const KVM_CREATE_VM: u64 = 0xae01;
    const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
    const KVM_IRQFD: u64 = 0x4020_ae76;
    const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3b72;
    const TCSETS: u64 = 0x5402;
    const TIOCSTI: u64 = 0x5412;

    /// What `program` answers for syscall `nr` with `args` on x86_64: runs the classic
    /// BPF the kernel would, over a `seccomp_data` built here.
    fn verdict(program: &[sock_filter], nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&u32::try_from(nr).unwrap().to_le_bytes());
        // AUDIT_ARCH_X86_64
        data[4..8].copy_from_slice(&0xc000_003e_u32.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = &program[pc];
            pc += 1;
            match ins.code {
                // BPF_LD | BPF_W | BPF_ABS
                0x20 => {
                    let k = usize::try_from(ins.k).unwrap();
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                // BPF_ALU | BPF_AND | BPF_K
                0x54 => acc &= ins.k,
                // BPF_JMP | BPF_JA
                0x05 => pc += usize::try_from(ins.k).unwrap(),
                // BPF_JMP | BPF_JEQ / BPF_JGT / BPF_JGE | BPF_K
                0x15 | 0x25 | 0x35 => {
                    let taken = match ins.code {
                        0x15 => acc == ins.k,
                        0x25 => acc > ins.k,
                        _ => acc >= ins.k,
                    };
                    pc += usize::from(if taken { ins.jt } else { ins.jf });
                }
                // BPF_RET | BPF_K
                0x06 => return ins.k,
                other => panic!("instruction {other:#x} not understood by this test"),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const TRAP: u32 = libc::SECCOMP_RET_TRAP;

    fn check(filters: &Filters, kind: ThreadKind, nr: i64, args: [u64; 6]) -> u32 {
        verdict(filters.program(kind), nr, args) & libc::SECCOMP_RET_ACTION_FULL
    }

    fn ioctl(req: u64) -> [u64; 6] {
        [3, req, 0, 0, 0, 0]
    }

    #[test]
    fn every_filter_compiles_and_traps_what_it_does_not_list() {
        let filters = Filters::compile().unwrap();
        for kind in ThreadKind::ALL {
            assert!(!filters.program(kind).is_empty(), "{kind:?}");
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
        let f = Filters::compile().unwrap();
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
        let f = Filters::compile().unwrap();
        let allowed = |kind, nr, args| check(&f, kind, nr, args) == ALLOW;
        let unix = [libc::AF_UNIX as u64, 1, 0, 0, 0, 0];
        let inet = [libc::AF_INET as u64, 1, 0, 0, 0, 0];
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
        let thread_flags = u64::try_from(
            libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM,
        )
        .unwrap();
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
    fn every_rule_says_why() {
        let json: serde_json::Value = serde_json::from_str(FILTERS_JSON).unwrap();
        for kind in ThreadKind::ALL {
            let rules = json[kind.filter_name()]["filter"].as_array().unwrap();
            assert!(!rules.is_empty(), "{kind:?}");
            for rule in rules {
                let comment = rule["comment"].as_str().unwrap_or_default();
                assert!(!comment.is_empty(), "{kind:?}: {rule} has no comment");
            }
        }
    }

    #[test]
    fn decimal_writes_numbers() {
        let mut b = [0u8; 12];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(41, &mut b), b"41");
        assert_eq!(decimal(-7, &mut b), b"-7");
        assert_eq!(decimal(2147483647, &mut b), b"2147483647");
    }
}
