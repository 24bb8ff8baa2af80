//! A syscall outside a thread's seccomp filter ends the process: the SIGSYS handler names
//! the thread and the syscall and exits with `exit_code::SECCOMP_VIOLATION`.
//!
//! The filter is installed in a child process (this test binary run again for one test,
//! told so by an environment variable), so the test harness itself stays unfiltered.

use std::process::Command;

use vmm::exit_code;
use vmm::seccomp::{self, ThreadKind};

/// Set in the child: which thread type's filter to install before the forbidden call.
const CHILD_ENV: &str = "AIVMM_SECCOMP_TEST_CHILD";

/// Runs `test` of this binary in a child with `CHILD_ENV=kind`; returns its exit code
/// and stderr.
fn run_child(test: &str, kind: &str) -> (Option<i32>, String) {
    sandbox::seccomp_child::run_test(test, (CHILD_ENV, kind))
}

fn child_kind() -> Option<ThreadKind> {
    let name = std::env::var(CHILD_ENV).ok()?;
    ThreadKind::ALL
        .into_iter()
        .find(|k| k.filter_name() == name)
}

/// In the child: installs the filter on a thread named like the thread type's, then
/// opens a socket, which none of these filters allows for AF_INET.
#[test]
fn child_socket_outside_the_filter() {
    let Some(kind) = child_kind() else {
        return;
    };
    seccomp::enable().unwrap();
    let name = format!("{}-under-test", kind.filter_name());
    sandbox::seccomp_child::open_inet_socket_after(name, move || {
        seccomp::apply(kind).unwrap();
    });
}

#[test]
fn a_syscall_outside_the_filter_ends_the_process_with_its_exit_code() {
    if child_kind().is_some() {
        return;
    }
    for kind in [ThreadKind::Vcpu, ThreadKind::VirtioWorker, ThreadKind::Api] {
        let (code, stderr) = run_child("child_socket_outside_the_filter", kind.filter_name());
        assert_eq!(
            code,
            Some(i32::from(exit_code::SECCOMP_VIOLATION)),
            "{kind:?}: {stderr}"
        );
        let line = format!(
            "aivmm: seccomp: thread {}-under-test made syscall {}, outside its filter; exiting",
            kind.filter_name(),
            libc::SYS_socket
        );
        assert!(
            stderr.contains(&line),
            "{kind:?}: expected {line:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("socket returned"), "{stderr}");
    }
}

/// Without `enable`, `apply` installs nothing: the same call goes through.
#[test]
fn without_enable_apply_installs_nothing() {
    if child_kind().is_some() {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child_apply_without_enable", "--exact", "--nocapture"])
        .env(CHILD_ENV, "vcpu")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("socket opened"), "{stderr}");
}

#[test]
fn child_apply_without_enable() {
    if child_kind().is_none() {
        return;
    }
    seccomp::apply(ThreadKind::Vcpu).unwrap();
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    // SAFETY: closing the socket just opened.
    unsafe { libc::close(fd) };
    eprintln!("socket opened");
}
