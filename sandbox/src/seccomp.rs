//! Per-thread seccomp filters, the machinery both programs share.
//!
//! A program keeps its filters as data (seccompiler's JSON: one named filter per thread
//! type, every rule with a comment saying why), compiled when the program is built
//! ([`crate::codegen`]), and calls [`enable`] once at start with the compiled tables: the
//! filters are loaded, the SIGSYS handler is installed and the allocator is warmed up.
//! Each thread then installs its own filter with [`apply`] before it touches anything a
//! guest or a peer controls. Filters stack on the threads a filtered thread starts, and
//! the stricter answer wins.
//!
//! A syscall outside a thread's filter raises SIGSYS; the handler writes
//! `<program>: seccomp: thread <name> made syscall <nr>, outside its filter; exiting` and
//! ends the process with the program's exit code: a thread that strays is either a bug or
//! an attacker's, and no part of the process can be trusted after it.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{sock_filter, BpfProgram, TargetArch};

/// One BPF instruction as the fields of a `sock_filter`: code, jt, jf, k.
pub type Instruction = (u16, u8, u8, u32);

/// Filters compiled at build time, by name: the type of the `COMPILED_FILTERS` table that
/// [`crate::codegen`] writes.
pub type CompiledFilters<'a> = [(&'a str, &'a [Instruction])];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot compile the seccomp filters: {0}")]
    Compile(String),
    #[error("the seccomp filters have no filter named {0:?}")]
    Missing(&'static str),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
    #[error("cannot install the {name} seccomp filter: {source}")]
    Install {
        name: &'static str,
        source: seccompiler::Error,
    },
}

/// Compiled filters, by name.
pub struct Filters {
    programs: HashMap<&'static str, BpfProgram>,
}

impl Filters {
    /// Loads the filters compiled at build time ([`crate::codegen`]'s `COMPILED_FILTERS`);
    /// every name in `names` must be there.
    pub fn from_compiled(
        compiled: &CompiledFilters<'_>,
        names: &[&'static str],
    ) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        for &name in names {
            let (_, instructions) = compiled
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or(SeccompError::Missing(name))?;
            programs.insert(name, to_program(instructions));
        }
        Ok(Self { programs })
    }

    /// Compiles `json` for this host's architecture; every name in `names` must be there.
    /// The programs load [`Filters::from_compiled`] instead; the tests read the JSON.
    pub fn compile(json: &str, names: &[&'static str]) -> Result<Self, SeccompError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut map = seccompiler::compile_from_json(json.as_bytes(), arch)
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut programs = HashMap::new();
        for &name in names {
            let program = map.remove(name).ok_or(SeccompError::Missing(name))?;
            programs.insert(name, program);
        }
        Ok(Self { programs })
    }

    /// The BPF program of filter `name`.
    pub fn program(&self, name: &'static str) -> Result<&BpfProgram, SeccompError> {
        self.programs.get(name).ok_or(SeccompError::Missing(name))
    }

    /// Installs filter `name` on the calling thread (for good).
    pub fn install(&self, name: &'static str) -> Result<(), SeccompError> {
        let program = self.program(name)?;
        remember_thread_name();
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { name, source })
    }
}

/// Whether the tables `compiled` at build time hold, for every name in `names`, the
/// program `json` compiles to now: a program's test that its build script is right.
pub fn built_as_json_compiles(
    compiled: &CompiledFilters<'_>,
    json: &str,
    names: &[&'static str],
) -> Result<(), String> {
    let built = Filters::from_compiled(compiled, names).map_err(|e| e.to_string())?;
    let now = Filters::compile(json, names).map_err(|e| e.to_string())?;
    for &name in names {
        // A filter missing from both is an error too, not a match.
        let built = built.program(name).map_err(|e| e.to_string())?;
        if built != now.program(name).map_err(|e| e.to_string())? {
            return Err(format!(
                "filter {name}: the built table differs from the JSON"
            ));
        }
    }
    Ok(())
}

fn to_program(instructions: &[Instruction]) -> BpfProgram {
    instructions
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect()
}

/// What the process enabled: its filters, and how a violation is reported.
struct Enabled {
    filters: Filters,
    program: &'static str,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();
/// The exit code of a violation; an atomic so that the signal handler reads it safely.
static EXIT_CODE: AtomicU8 = AtomicU8::new(1);

/// Turns the filters on for this process: `compiled` is its `COMPILED_FILTERS`, which
/// must hold every filter in `names`; `program` names it in the violation line, which
/// ends it with `exit_code`. Call it once, early, while one thread runs. Threads then
/// install theirs with [`apply`].
pub fn enable(
    program: &'static str,
    exit_code: u8,
    compiled: &CompiledFilters<'_>,
    names: &[&'static str],
) -> Result<(), SeccompError> {
    let filters = Filters::from_compiled(compiled, names)?;
    EXIT_CODE.store(exit_code, Ordering::SeqCst);
    let _ = ENABLED.set(Enabled { filters, program });
    install_sigsys_handler().map_err(SeccompError::Handler)?;
    warm_up_allocator();
    Ok(())
}

/// Whether [`enable`] has run.
pub fn enabled() -> bool {
    ENABLED.get().is_some()
}

/// Installs filter `name` on the calling thread when the filters are enabled; does
/// nothing otherwise.
pub fn apply(name: &'static str) -> Result<(), SeccompError> {
    let Some(enabled) = ENABLED.get() else {
        return Ok(());
    };
    enabled.filters.install(name)?;
    log::info!(
        "seccomp: {name} filter installed on thread {}",
        std::thread::current().name().unwrap_or("(unnamed)")
    );
    Ok(())
}

/// glibc's allocator reads two files lazily, each once per process: the number of CPUs
/// (`/sys/devices/system/cpu/online`) when a thread needs a new arena beyond the eighth,
/// and `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread arena's heap.
/// Left alone, either can first happen on a filtered thread (a request thread's first
/// allocation; a worker freeing its memory at exit), and no filter should allow `openat`
/// for it. So the arena limit is set here to glibc's own default (8 per CPU), which it
/// then never computes, and a short thread shrinks its arena's heap before any filter is
/// installed.
fn warm_up_allocator() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive
    // count.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
        log::warn!("seccomp: cannot set the allocator's arena limit");
    }
    let warm_up = std::thread::Builder::new()
        .name("seccomp-warm-up".into())
        .stack_size(256 << 10)
        .spawn(|| {
            // Blocks below the mmap threshold come from the thread's arena; freed, they
            // leave a top chunk above the trim threshold (128 KiB), so the arena's heap
            // shrinks. Allocated, not written: only the chunk headers are touched.
            let blocks: Vec<Vec<u8>> = (0..8)
                .map(|_| std::hint::black_box(Vec::with_capacity(64 << 10)))
                .collect();
            drop(std::hint::black_box(blocks));
        });
    match warm_up.map(std::thread::JoinHandle::join) {
        Ok(Ok(())) => {}
        _ => log::warn!("seccomp: the allocator warm-up thread failed"),
    }
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

/// Writes the violation line and ends the process. Only write(2) and _exit(2), which
/// every filter allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler, and for
    // SIGSYS its union holds `_sigsys`, laid out as `SigsysInfo`.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut line = [0u8; 192];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    // Set before the handler was installed; a plain load.
    put(ENABLED.get().map_or("", |e| e.program).as_bytes());
    put(b": seccomp: thread ");
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
    unsafe { libc::_exit(i32::from(EXIT_CODE.load(Ordering::SeqCst))) };
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

/// The rules of filters `names` in `json` that have no `comment` (as `filter: rule`),
/// or why `json` cannot be read. The JSON is reviewed data: a rule nobody explains
/// should not be there.
pub fn uncommented_rules(json: &str, names: &[&str]) -> Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut missing = Vec::new();
    for name in names {
        let rules = value[name]["filter"]
            .as_array()
            .ok_or_else(|| format!("no filter named {name:?}"))?;
        if rules.is_empty() {
            missing.push(format!("{name}: (no rules)"));
        }
        for rule in rules {
            if rule["comment"].as_str().unwrap_or_default().is_empty() {
                missing.push(format!("{name}: {rule}"));
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARM_UP_CHILD: &str = "SANDBOX_TEST_WARM_UP_CHILD";

    /// In the child: after the warm-up, a thread whose filter traps `openat` allocates and
    /// frees enough to shrink its arena's heap; glibc must not open a file for that.
    #[test]
    fn after_the_warm_up_a_filtered_thread_frees_memory_without_opening_a_file() {
        if std::env::var_os(WARM_UP_CHILD).is_none() {
            let (code, stderr) = crate::seccomp_child::run_test(
                "seccomp::tests::after_the_warm_up_a_filtered_thread_frees_memory_without_opening_a_file",
                (WARM_UP_CHILD, "1"),
            );
            assert_eq!(code, Some(0), "the child died: {stderr}");
            return;
        }
        warm_up_allocator();
        let rules = [(libc::SYS_openat, vec![])].into_iter().collect();
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Trap,
            arch,
        )
        .unwrap();
        let program = BpfProgram::try_from(filter).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&program).unwrap();
            for _ in 0..4 {
                let blocks: Vec<Vec<u8>> = (0..16)
                    .map(|_| std::hint::black_box(vec![1u8; 64 << 10]))
                    .collect();
                drop(std::hint::black_box(blocks));
            }
        })
        .join()
        .unwrap();
        std::process::exit(0);
    }

    #[test]
    fn decimal_writes_numbers() {
        let mut b = [0u8; 12];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(41, &mut b), b"41");
        assert_eq!(decimal(-7, &mut b), b"-7");
        assert_eq!(decimal(2147483647, &mut b), b"2147483647");
    }

    const JSON: &str = r#"{
        "a": {"default_action": "trap", "filter_action": "allow", "filter": [
            {"syscall": "read", "comment": "reads"},
            {"syscall": "write"}
        ]},
        "b": {"default_action": "trap", "filter_action": "allow", "filter": [
            {"syscall": "write", "comment": "writes"}
        ]}
    }"#;

    #[test]
    fn filters_compile_by_name_and_answer_for_their_syscalls() {
        let f = Filters::compile(JSON, &["a", "b"]).unwrap();
        let a = f.program("a").unwrap();
        assert_eq!(
            crate::bpf::verdict(a, libc::SYS_read, [0; 6]),
            crate::bpf::ALLOW
        );
        let b = f.program("b").unwrap();
        assert_eq!(
            crate::bpf::verdict(b, libc::SYS_read, [0; 6]),
            crate::bpf::TRAP
        );
        assert_eq!(
            crate::bpf::verdict(b, libc::SYS_write, [0; 6]),
            crate::bpf::ALLOW
        );
        assert!(matches!(f.program("c"), Err(SeccompError::Missing("c"))));
        assert!(matches!(
            Filters::compile(JSON, &["a", "c"]),
            Err(SeccompError::Missing("c"))
        ));
        assert!(matches!(
            Filters::compile("{", &["a"]),
            Err(SeccompError::Compile(_))
        ));
    }

    #[test]
    fn compiled_tables_load_as_the_programs_they_came_from() {
        let from_json = Filters::compile(JSON, &["a"]).unwrap();
        let program_a = from_json.program("a").unwrap();
        let a: Vec<Instruction> = program_a
            .iter()
            .map(|i| (i.code, i.jt, i.jf, i.k))
            .collect();
        let compiled: &CompiledFilters = &[("a", &a), ("b", &[(6, 0, 0, 0)])];
        let f = Filters::from_compiled(compiled, &["a", "b"]).unwrap();
        assert_eq!(f.program("a").unwrap(), program_a);
        let ret_kill = sock_filter {
            code: 6,
            jt: 0,
            jf: 0,
            k: 0,
        };
        assert_eq!(f.program("b").unwrap(), &vec![ret_kill]);
        assert!(matches!(
            Filters::from_compiled(compiled, &["a", "c"]),
            Err(SeccompError::Missing("c"))
        ));
    }

    #[test]
    fn a_rule_without_a_comment_is_found() {
        let missing = uncommented_rules(JSON, &["a", "b"]).unwrap();
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].starts_with("a: ") && missing[0].contains("write"));
        assert!(uncommented_rules(JSON, &["b"]).unwrap().is_empty());
        assert!(uncommented_rules(JSON, &["z"]).is_err());
    }
}
