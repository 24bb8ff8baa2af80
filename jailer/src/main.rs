//! `aivmm-jailer`: starts aivmm (or another program) confined, with Firecracker's jailer
//! command line. docs/jailer.md describes what it does and in which order.
//!
//! Exit codes: 2 for bad input (one `aivmm-jailer: error:` line, nothing created), 1 for
//! a failure while building the jail; on success the process becomes the program.

mod cgroup;
mod cli;
mod jail;
mod libs;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use crate::cli::Cli;
use crate::jail::Jail;

fn main() -> ExitCode {
    close_inherited_fds();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("aivmm-jailer: error: {}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    let jail = match Jail::prepare(cli) {
        Ok(jail) => jail,
        Err(e) => {
            eprintln!("aivmm-jailer: error: {e}");
            return ExitCode::from(2);
        }
    };
    match jail.run() {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("aivmm-jailer: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Clap's message without its usage hint, on one line.
fn one_line(rendered: &str) -> String {
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    message.join(" ").trim_start_matches("error: ").to_string()
}

/// Closes every descriptor above stderr the caller left open, so none reaches the jail.
/// (Everything the jailer opens itself is close-on-exec.)
fn close_inherited_fds() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collected first: the directory's own descriptor is open while it is read.
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
            // The directory's own descriptor, closed by now.
            continue;
        }
        // SAFETY: nothing in this process owns `fd`: it was inherited (the jailer has opened
        // nothing yet), so taking ownership and dropping it closes it exactly once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_fit_on_one_line() {
        let e = Cli::try_parse_from(["aivmm-jailer", "--id", "a/b"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(!line.contains('\n'));
        assert!(line.contains("only letters, digits"), "{line}");
        let e = Cli::try_parse_from(["aivmm-jailer"]).unwrap_err();
        assert!(one_line(&e.render().to_string()).contains("--id"));
    }
}
