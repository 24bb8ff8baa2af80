//! A program for the jailer's tests to run inside a jail: it prints what it sees (its
//! ids, its arguments, every path under `/`), then waits for stdin to close so the test
//! can inspect it from outside through /proc (the jail has no /proc of its own).

use std::io::Read;
use std::path::Path;

fn walk(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        out.push(format!("unreadable {}", dir.display()));
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        out.push(path.display().to_string());
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&path, out);
        }
    }
}

fn main() {
    println!("pid={}", nix::unistd::getpid());
    println!("uid={}", nix::unistd::getuid());
    println!("gid={}", nix::unistd::getgid());
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("args={}", args.join(" "));
    println!("env={}", std::env::vars().count());
    let mut paths = Vec::new();
    walk(Path::new("/"), &mut paths);
    paths.sort();
    for path in paths {
        println!("path={path}");
    }
    println!("ready");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    println!("bye");
}
