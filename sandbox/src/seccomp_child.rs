//! For the filters' tests: a violation ends the whole process, so it is provoked in a
//! child, the calling test binary run again for one test.

use std::process::Command;

/// Runs test `test` of the calling test binary alone in a child process with `env` set;
/// returns its exit code and stderr.
///
/// # Panics
/// When the test binary cannot be run again.
pub fn run_test(test: &str, env: (&str, &str)) -> (Option<i32>, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .output()
        .expect("the test binary runs again");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// On a new thread named `name`: runs `install` (which installs a filter), then opens an
/// internet socket, which the filter must stop; then ends the process with exit code 0,
/// which the caller sees only when the filter let the call through.
///
/// # Panics
/// When the thread cannot be started.
pub fn open_inet_socket_after(name: String, install: impl FnOnce() + Send + 'static) -> ! {
    let t = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            install();
            // SAFETY: socket(2) takes no pointers; the filter stops it before the kernel.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            eprintln!("socket returned {fd}");
        })
        .expect("a thread");
    let _ = t.join();
    std::process::exit(0);
}
