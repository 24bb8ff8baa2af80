//! The command line (Firecracker's jailer flags) and the checks on each value that need
//! nothing from the host.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use clap::Parser;

/// The longest `--id` accepted (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;

/// Start a program (aivmm) confined: in a chroot of its own, its own mount namespace,
/// optionally a network and a PID namespace, a cgroup v2, resource limits and an
/// unprivileged uid and gid. See docs/jailer.md.
#[derive(Debug, Parser)]
#[command(name = "aivmm-jailer", version, about)]
pub struct Cli {
    /// Unique id of the microVM: letters, digits and '-', at most 64 characters. Names the
    /// jail directory and the cgroup, and is passed to the program as `--id <ID>`.
    #[arg(long, value_parser = parse_id)]
    pub id: String,
    /// The program to run (an absolute path); it is copied into the jail with the shared
    /// libraries it needs, and its file name names the jail's parent directory.
    #[arg(long, value_name = "PATH", value_parser = parse_absolute)]
    pub exec_file: PathBuf,
    /// The uid the program runs as.
    #[arg(long)]
    pub uid: u32,
    /// The gid the program runs as (no supplementary groups).
    #[arg(long)]
    pub gid: u32,
    /// Where jails are built: `<DIR>/<exec file name>/<id>/root`.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer", value_parser = parse_absolute)]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (a file such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Detach: start a new session and point stdin, stdout and stderr at /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the program as pid 1 of a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// The cgroup hierarchy version; only 2 (the unified hierarchy) is supported.
    #[arg(long, value_name = "2", default_value = "2", value_parser = parse_cgroup_version)]
    pub cgroup_version: u8,
    /// A value to write into the microVM's cgroup before the program starts, e.g.
    /// `memory.max=536870912`, `cpu.max=50000 100000`, `pids.max=100`. Repeatable.
    #[arg(long = "cgroup", value_name = "FILE=VALUE", value_parser = parse_cgroup)]
    pub cgroups: Vec<CgroupValue>,
    /// The cgroup (relative to the cgroup v2 mount) under which `<id>` is created.
    #[arg(long, value_name = "NAME", default_value = "aivmm", value_parser = parse_parent_cgroup)]
    pub parent_cgroup: PathBuf,
    /// A resource limit, `fsize=BYTES`, `no-file=N` or `memlock=BYTES` (defaults:
    /// no-file=2048, fsize unlimited, memlock the caller's). Repeatable.
    #[arg(long = "resource-limit", value_name = "RESOURCE=N", value_parser = parse_resource_limit)]
    pub resource_limits: Vec<ResourceLimit>,
    /// Arguments for the program, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

/// One `--cgroup FILE=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupValue {
    /// A file of the microVM's cgroup directory, e.g. `pids.max`.
    pub file: String,
    pub value: String,
}

impl CgroupValue {
    /// The controller that owns the file (`pids` for `pids.max`), or `None` for the core
    /// `cgroup.*` files, which every cgroup has.
    pub fn controller(&self) -> Option<&str> {
        let controller = self.file.split('.').next().unwrap_or_default();
        (controller != "cgroup").then_some(controller)
    }
}

/// The resources `--resource-limit` may set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitedResource {
    /// RLIMIT_FSIZE: the largest file the program may write.
    FileSize,
    /// RLIMIT_NOFILE: one more than the highest file descriptor it may open.
    OpenFiles,
    /// RLIMIT_MEMLOCK: the memory it may lock, in bytes (`lock = true` zones, and the guest
    /// RAM a passthrough device pins for DMA). Not in Firecracker's jailer, which has
    /// neither.
    LockedMemory,
}

/// One `--resource-limit RESOURCE=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceLimit {
    pub resource: LimitedResource,
    pub value: u64,
}

fn parse_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(format!(
            "the id must have 1 to {MAX_ID_LEN} characters, it has {}",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "the id may hold only letters, digits and '-', not {c:?}"
        ));
    }
    Ok(s.to_string())
}

fn parse_absolute(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(format!("{s:?} is not an absolute path"));
    }
    Ok(path)
}

fn parse_cgroup_version(s: &str) -> Result<u8, String> {
    match s {
        "2" => Ok(2),
        "1" => Err("cgroup v1 is not supported: only cgroup v2 (--cgroup-version 2) is".into()),
        _ => Err(format!(
            "{s:?} is not a cgroup version: only 2 is supported"
        )),
    }
}

fn parse_cgroup(s: &str) -> Result<CgroupValue, String> {
    let (file, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not FILE=VALUE"))?;
    if value.is_empty() {
        return Err(format!("{s:?} has no value after '='"));
    }
    if file.contains('/') || file.contains("..") || file.contains('\0') {
        return Err(format!(
            "cgroup file {file:?} may not contain '/' or '..': name a file of the cgroup itself"
        ));
    }
    match file.split_once('.') {
        Some((controller, property)) if !controller.is_empty() && !property.is_empty() => {}
        _ => {
            return Err(format!(
                "cgroup file {file:?} is not CONTROLLER.PROPERTY (e.g. pids.max)"
            ))
        }
    }
    if value.contains('\n') {
        return Err(format!("the value for {file:?} may not contain a newline"));
    }
    Ok(CgroupValue {
        file: file.to_string(),
        value: value.to_string(),
    })
}

fn parse_parent_cgroup(s: &str) -> Result<PathBuf, String> {
    let path = Path::new(s);
    if s.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "parent cgroup {s:?} must be a relative path without '.' or '..' components"
        ));
    }
    Ok(path.to_path_buf())
}

fn parse_resource_limit(s: &str) -> Result<ResourceLimit, String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not RESOURCE=N"))?;
    let resource = match name {
        "fsize" => LimitedResource::FileSize,
        "no-file" => LimitedResource::OpenFiles,
        "memlock" => LimitedResource::LockedMemory,
        _ => {
            return Err(format!(
                "unknown resource {name:?}: use fsize, no-file or memlock"
            ))
        }
    };
    let value = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number for {name}"))?;
    Ok(ResourceLimit { resource, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(parse_id("551e7604-e35c-42b3-b825-416853441234").is_ok());
        assert!(parse_id("").is_err());
        assert!(parse_id(&"a".repeat(64)).is_ok());
        assert!(parse_id(&"a".repeat(65)).is_err());
        assert!(parse_id("a/b").is_err());
        assert!(parse_id("a_b").is_err());
        assert!(parse_id("..").is_err());
    }

    #[test]
    fn cgroup_values() {
        let v = parse_cgroup("cpu.max=50000 100000").unwrap();
        assert_eq!(
            (v.file.as_str(), v.value.as_str()),
            ("cpu.max", "50000 100000")
        );
        assert_eq!(v.controller(), Some("cpu"));
        assert_eq!(
            parse_cgroup("cgroup.max.descendants=0")
                .unwrap()
                .controller(),
            None
        );
        assert_eq!(parse_cgroup("memory.max=1=2").unwrap().value, "1=2");
        for bad in [
            "pids.max",
            "pids.max=",
            "../pids.max=1",
            "a/pids.max=1",
            "pids=1",
            ".max=1",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parent_cgroups() {
        assert!(parse_parent_cgroup("aivmm").is_ok());
        assert!(parse_parent_cgroup("all/tenants").is_ok());
        for bad in ["", "/aivmm", "../x", "a/../b", "./a"] {
            assert!(parse_parent_cgroup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_limits() {
        assert_eq!(
            parse_resource_limit("no-file=1024").unwrap(),
            ResourceLimit {
                resource: LimitedResource::OpenFiles,
                value: 1024
            }
        );
        assert_eq!(
            parse_resource_limit("memlock=1048576").unwrap(),
            ResourceLimit {
                resource: LimitedResource::LockedMemory,
                value: 1 << 20
            }
        );
        assert!(parse_resource_limit("nofile=1").is_err());
        assert!(parse_resource_limit("fsize=-1").is_err());
        assert!(parse_resource_limit("fsize").is_err());
    }

    #[test]
    fn cgroup_versions() {
        assert_eq!(parse_cgroup_version("2"), Ok(2));
        assert!(parse_cgroup_version("1")
            .unwrap_err()
            .contains("only cgroup v2"));
        assert!(parse_cgroup_version("3").is_err());
    }
}
