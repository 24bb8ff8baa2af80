//! Building the jail and starting the program in it, in the order docs/jailer.md gives.

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid};

use crate::cgroup::{CgroupError, CgroupPlan};
use crate::cli::{Cli, LimitedResource};
use crate::libs::{self, LibsError};

/// Firecracker's default RLIMIT_NOFILE for the jailed process.
const DEFAULT_NO_FILE: u64 = 2048;
/// Host directory whose character devices (VFIO groups, the container, iommufd device
/// files under `devices/`) are recreated in the jail.
const HOST_VFIO: &str = "/dev/vfio";
/// The host's CPU and NUMA topology, bound read-only into the jail when the host has it:
/// aivmm places guest memory and vCPUs by it (a zone's `host_node`, the node's CPUs and
/// hugepage pools).
const TOPOLOGY_DIRS: [&str; 2] = ["/sys/devices/system/cpu", "/sys/devices/system/node"];

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jailer must run as root (euid 0), not euid {0}")]
    NotRoot(u32),
    #[error("exec file {0}: {1}")]
    ExecFile(PathBuf, String),
    #[error("cannot open network namespace {0}: {1}")]
    Netns(PathBuf, io::Error),
    #[error(transparent)]
    Libs(#[from] LibsError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("the jail {0} was set up before ({1} exists): remove {2} and start again")]
    InUse(PathBuf, PathBuf, PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{link} in the jail is a symbolic link (to {to}): the jail's directories must be real ones; remove it")]
    LinkInJail { link: PathBuf, to: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("the credentials did not stick: real/effective/saved uid {uid:?}, gid {gid:?}, {groups} supplementary groups")]
    CredentialsKept {
        uid: (u32, u32, u32),
        gid: (u32, u32, u32),
        groups: usize,
    },
    #[error("a program argument or path contains a NUL byte")]
    Nul,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { what, path, source }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// A device node the jail gets.
#[derive(Debug)]
struct DeviceNode {
    /// Path inside the jail.
    path: PathBuf,
    dev: u64,
    mode: u32,
    /// Owned by the jailed uid:gid (else root).
    owned: bool,
}

/// Everything checked and gathered from the host before the jail is built.
#[derive(Debug)]
pub struct Jail {
    id: String,
    exec_file: PathBuf,
    exec_name: String,
    uid: Uid,
    gid: Gid,
    /// `<chroot base>/<exec name>/<id>/root`.
    root: PathBuf,
    runtime_files: Vec<PathBuf>,
    netns: Option<File>,
    cgroup: CgroupPlan,
    devices: Vec<DeviceNode>,
    no_file: u64,
    fsize: u64,
    /// RLIMIT_MEMLOCK, when asked for; otherwise the caller's stays.
    memlock: Option<u64>,
    daemonize: bool,
    new_pid_ns: bool,
    args: Vec<OsString>,
}

impl Jail {
    /// Checks the command line against the host; nothing is created.
    pub fn prepare(cli: Cli) -> Result<Self, JailError> {
        let euid = Uid::effective();
        if !euid.is_root() {
            return Err(JailError::NotRoot(euid.as_raw()));
        }
        let exec_err = |msg: String| JailError::ExecFile(cli.exec_file.clone(), msg);
        let exec_file = fs::canonicalize(&cli.exec_file).map_err(|e| exec_err(e.to_string()))?;
        let meta = fs::metadata(&exec_file).map_err(|e| exec_err(e.to_string()))?;
        if !meta.is_file() {
            return Err(exec_err("not a regular file".into()));
        }
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| exec_err("its file name is not UTF-8".into()))?
            .to_string();
        let runtime_files = libs::runtime_files(&exec_file)?;
        // The program sits in the jail's root beside the directories the jailer makes.
        let mut library_dirs = runtime_files.iter().filter_map(|f| f.components().nth(1));
        if ["dev", "run"].contains(&exec_name.as_str())
            || library_dirs.any(|dir| dir.as_os_str() == exec_name.as_str())
        {
            return Err(exec_err(format!(
                "its file name collides with the jail's /{exec_name}: link or copy it under \
                 another name"
            )));
        }
        let netns = match &cli.netns {
            Some(path) => Some(open_netns(path)?),
            None => None,
        };
        let cgroup = CgroupPlan::new(&cli.parent_cgroup, &cli.id, &cli.cgroups)?;
        let mut no_file = DEFAULT_NO_FILE;
        let mut fsize = RLIM_INFINITY;
        let mut memlock = None;
        for limit in &cli.resource_limits {
            match limit.resource {
                LimitedResource::OpenFiles => no_file = limit.value,
                LimitedResource::FileSize => fsize = limit.value,
                LimitedResource::LockedMemory => memlock = Some(limit.value),
            }
        }
        let root = cli
            .chroot_base_dir
            .join(&exec_name)
            .join(&cli.id)
            .join("root");
        Ok(Jail {
            id: cli.id,
            exec_file,
            exec_name,
            uid: Uid::from_raw(cli.uid),
            gid: Gid::from_raw(cli.gid),
            root,
            runtime_files,
            netns,
            cgroup,
            devices: device_nodes(cli.daemonize)?,
            no_file,
            fsize,
            memlock,
            daemonize: cli.daemonize,
            new_pid_ns: cli.new_pid_ns,
            args: cli.args,
        })
    }

    /// Builds the jail and execs the program in it; returns only on failure.
    pub fn run(self) -> Result<Infallible, JailError> {
        // Modes below are exact; the program gets the caller's umask back.
        let caller_umask = umask(Mode::empty());
        self.populate_root()?;
        self.cgroup.apply()?;
        if let Some(netns) = &self.netns {
            setns(netns, CloneFlags::CLONE_NEWNET)
                .map_err(sys_err("join the network namespace"))?;
        }
        self.enter_root()?;
        self.create_devices()?;
        setrlimit(Resource::RLIMIT_NOFILE, self.no_file, self.no_file)
            .map_err(sys_err(format!("set RLIMIT_NOFILE to {}", self.no_file)))?;
        setrlimit(Resource::RLIMIT_FSIZE, self.fsize, self.fsize)
            .map_err(sys_err(format!("set RLIMIT_FSIZE to {}", self.fsize)))?;
        if let Some(bytes) = self.memlock {
            setrlimit(Resource::RLIMIT_MEMLOCK, bytes, bytes)
                .map_err(sys_err(format!("set RLIMIT_MEMLOCK to {bytes}")))?;
        }
        self.detach()?;
        umask(caller_umask);
        self.drop_privileges()?;
        self.exec()
    }

    /// Creates the jail root and copies the program and its runtime files in (on the
    /// host's file system, before the pivot).
    fn populate_root(&self) -> Result<(), JailError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io_err("create the jail directory", &self.root))?;
        let meta = fs::symlink_metadata(&self.root).map_err(io_err("stat", &self.root))?;
        if !meta.is_dir() {
            return Err(JailError::NotADirectory(self.root.clone()));
        }
        for used in [self.exec_name.as_str(), "dev"] {
            let path = self.root.join(used);
            if fs::symlink_metadata(&path).is_ok() {
                let instance = self.root.parent().unwrap_or(&self.root).to_path_buf();
                return Err(JailError::InUse(self.root.clone(), path, instance));
            }
        }
        // The program is copied, not linked: two jailed processes share no page of it.
        let src_mode = fs::metadata(&self.exec_file)
            .map_err(io_err("stat", &self.exec_file))?
            .mode();
        let dst = self.root.join(&self.exec_name);
        copy_new(&self.exec_file, &dst, src_mode & 0o777)?;
        unistd::chown(&dst, Some(self.uid), Some(self.gid))
            .map_err(sys_err(format!("chown {}", dst.display())))?;
        for file in &self.runtime_files {
            let relative = file.strip_prefix("/").unwrap_or(file);
            let dst = self.root.join(relative);
            if let Some(dir) = dst.parent() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)
                    .map_err(io_err("create the directory", dir))?;
            }
            copy_new(file, &dst, 0o755)?;
        }
        Ok(())
    }

    /// A mount namespace of its own whose root is the jail.
    fn enter_root(&self) -> Result<(), JailError> {
        unshare(CloneFlags::CLONE_NEWNS).map_err(sys_err("unshare the mount namespace"))?;
        // Nothing done from here on propagates back to the host's mounts.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err("make / private"))?;
        // pivot_root needs the new root to be a mount point.
        mount(
            Some(&self.root),
            &self.root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err(format!("bind-mount {}", self.root.display())))?;
        for dir in TOPOLOGY_DIRS {
            self.bind_read_only(Path::new(dir))?;
        }
        unistd::chdir(&self.root).map_err(sys_err(format!("chdir {}", self.root.display())))?;
        // Stack the old root under the new one, then detach it: no path leads out.
        unistd::pivot_root(".", ".").map_err(sys_err("pivot_root into the jail"))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(sys_err("unmount the old root"))?;
        unistd::chdir("/").map_err(sys_err("chdir /"))?;
        Ok(())
    }

    /// Binds the host directory `host_dir`, if it exists, read-only (and nosuid, nodev,
    /// noexec) at the same path in the jail. Runs in the jail's mount namespace, before
    /// the pivot, so nothing shows on the host.
    fn bind_read_only(&self, host_dir: &Path) -> Result<(), JailError> {
        if !host_dir.is_dir() {
            return Ok(());
        }
        let rel = host_dir.strip_prefix("/").unwrap_or(host_dir);
        let target = self.root.join(rel);
        // The jail's contents are trusted until the jailer has run, but a link among the
        // directories would put the mount (and the directories made for it) outside the
        // jail: refuse rather than follow.
        if let Some((link, to)) = first_link(&self.root, rel) {
            return Err(JailError::LinkInJail { link, to });
        }
        DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&target)
            .map_err(io_err("create the directory", &target))?;
        // Again now that the path exists: a link made since the check above is caught too.
        if let Some((link, to)) = first_link(&self.root, rel) {
            return Err(JailError::LinkInJail { link, to });
        }
        mount(
            Some(host_dir),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys_err(format!("bind-mount {}", host_dir.display())))?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(sys_err(format!("make {} read-only", target.display())))
    }

    /// Inside the jail: the directories the program may write to and the device nodes.
    fn create_devices(&self) -> Result<(), JailError> {
        for dir in ["/dev", "/dev/net", "/run"] {
            mkdir_owned(Path::new(dir), self.uid, self.gid)?;
        }
        if self.devices.iter().any(|d| d.path.starts_with("/dev/vfio")) {
            mkdir_owned(Path::new("/dev/vfio"), self.uid, self.gid)?;
        }
        if self
            .devices
            .iter()
            .any(|d| d.path.starts_with("/dev/vfio/devices"))
        {
            mkdir_owned(Path::new("/dev/vfio/devices"), self.uid, self.gid)?;
        }
        for node in &self.devices {
            mknod(
                &node.path,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(node.mode),
                node.dev,
            )
            .map_err(sys_err(format!("create {}", node.path.display())))?;
            if node.owned {
                unistd::chown(&node.path, Some(self.uid), Some(self.gid))
                    .map_err(sys_err(format!("chown {}", node.path.display())))?;
            }
        }
        // The jail's root belongs to the program: it creates its sockets there.
        unistd::chown("/", Some(self.uid), Some(self.gid)).map_err(sys_err("chown /"))?;
        fs::set_permissions("/", std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_err("chmod", Path::new("/")))?;
        Ok(())
    }

    /// `--new-pid-ns` and `--daemonize`; writes `<exec name>.pid` with the program's pid.
    fn detach(&self) -> Result<(), JailError> {
        let session_leader = unistd::getsid(None).map_err(sys_err("getsid"))? == unistd::getpid();
        if self.new_pid_ns {
            unshare(CloneFlags::CLONE_NEWPID).map_err(sys_err("unshare the PID namespace"))?;
        }
        if self.new_pid_ns || self.daemonize {
            // The child is pid 1 of the new namespace, or (daemonizing) a process that is
            // no group leader and so may start a session.
            // SAFETY: the jailer is single-threaded (it never starts a thread), so the
            // child may run any code.
            match unsafe { unistd::fork() }.map_err(sys_err("fork"))? {
                ForkResult::Parent { child } => {
                    self.write_pid_file(child)?;
                    std::process::exit(0);
                }
                ForkResult::Child => {}
            }
            // Leave the jailer's session (it may end with a SIGHUP when the jailer exits).
            if self.daemonize || session_leader {
                unistd::setsid().map_err(sys_err("setsid"))?;
            }
        } else {
            self.write_pid_file(unistd::getpid())?;
        }
        if self.daemonize {
            let null = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(io_err("open", Path::new("/dev/null")))?;
            unistd::dup2_stdin(&null).map_err(sys_err("redirect stdin to /dev/null"))?;
            unistd::dup2_stdout(&null).map_err(sys_err("redirect stdout to /dev/null"))?;
            unistd::dup2_stderr(&null).map_err(sys_err("redirect stderr to /dev/null"))?;
        }
        Ok(())
    }

    fn write_pid_file(&self, pid: Pid) -> Result<(), JailError> {
        let path = PathBuf::from(format!("/{}.pid", self.exec_name));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(io_err("create", &path))?;
        io::Write::write_all(&mut file, pid.to_string().as_bytes()).map_err(io_err("write", &path))
    }

    /// No supplementary groups, the jailed gid and uid (checked), no new privileges.
    fn drop_privileges(&self) -> Result<(), JailError> {
        unistd::setgroups(&[]).map_err(sys_err("clear the supplementary groups"))?;
        unistd::setresgid(self.gid, self.gid, self.gid)
            .map_err(sys_err(format!("set gid {}", self.gid)))?;
        unistd::setresuid(self.uid, self.uid, self.uid)
            .map_err(sys_err(format!("set uid {}", self.uid)))?;
        let uid = unistd::getresuid().map_err(sys_err("getresuid"))?;
        let gid = unistd::getresgid().map_err(sys_err("getresgid"))?;
        let groups = unistd::getgroups().map_err(sys_err("getgroups"))?;
        let uids = (
            uid.real.as_raw(),
            uid.effective.as_raw(),
            uid.saved.as_raw(),
        );
        let gids = (
            gid.real.as_raw(),
            gid.effective.as_raw(),
            gid.saved.as_raw(),
        );
        let (u, g) = (self.uid.as_raw(), self.gid.as_raw());
        if uids != (u, u, u) || gids != (g, g, g) || !groups.is_empty() {
            return Err(JailError::CredentialsKept {
                uid: uids,
                gid: gids,
                groups: groups.len(),
            });
        }
        prctl::set_no_new_privs().map_err(sys_err("set no_new_privs"))?;
        Ok(())
    }

    /// `/<exec name> --id <id> ARGS...` with an empty environment.
    fn exec(&self) -> Result<Infallible, JailError> {
        let path = CString::new(format!("/{}", self.exec_name)).map_err(|_| JailError::Nul)?;
        let mut argv = vec![path.clone(), c"--id".to_owned()];
        argv.push(CString::new(self.id.as_str()).map_err(|_| JailError::Nul)?);
        for arg in &self.args {
            argv.push(CString::new(arg.as_bytes()).map_err(|_| JailError::Nul)?);
        }
        let env: [CString; 0] = [];
        unistd::execve(&path, &argv, &env)
            .map_err(sys_err(format!("exec {}", path.to_string_lossy())))
    }
}

/// The device nodes of every jail: KVM, TUN, urandom, the host's VFIO nodes, and
/// /dev/null when daemonizing.
fn device_nodes(daemonize: bool) -> Result<Vec<DeviceNode>, JailError> {
    let node = |path: &str, major: u64, minor: u64, mode: u32, owned: bool| DeviceNode {
        path: PathBuf::from(path),
        dev: makedev(major, minor),
        mode,
        owned,
    };
    let mut nodes = vec![
        node("/dev/kvm", 10, 232, 0o600, true),
        node("/dev/net/tun", 10, 200, 0o600, true),
        node("/dev/urandom", 1, 9, 0o666, true),
    ];
    if daemonize {
        nodes.push(node("/dev/null", 1, 3, 0o666, false));
    }
    for dir in [
        PathBuf::from(HOST_VFIO),
        Path::new(HOST_VFIO).join("devices"),
    ] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &dir))?;
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err("stat", &entry.path()))?;
            if meta.file_type().is_char_device() {
                found.push(DeviceNode {
                    path: entry.path(),
                    dev: meta.rdev(),
                    mode: 0o600,
                    owned: true,
                });
            }
        }
        found.sort_by(|a, b| a.path.cmp(&b.path));
        nodes.extend(found);
    }
    Ok(nodes)
}

/// The first of `root`'s subpaths along `rel` that is a symbolic link, with where it
/// points; `None` when every existing one is a real directory or file.
fn first_link(root: &Path, rel: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut path = root.to_path_buf();
    for part in rel.components() {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let to = fs::read_link(&path).unwrap_or_default();
                return Some((path, to));
            }
            Ok(_) => {}
            // Nothing further along exists yet: no link to follow.
            Err(_) => return None,
        }
    }
    None
}

/// Opens a network namespace file; anything but a namespace file is refused here rather
/// than by setns once the jail is half built.
fn open_netns(path: &Path) -> Result<File, JailError> {
    let file = File::open(path).map_err(|e| JailError::Netns(path.to_path_buf(), e))?;
    let fs = fstatfs(&file).map_err(|e| JailError::Netns(path.to_path_buf(), e.into()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(JailError::Netns(
            path.to_path_buf(),
            io::Error::other(
                "not a namespace file (e.g. /var/run/netns/NAME from `ip netns add NAME`)",
            ),
        ));
    }
    Ok(file)
}

/// Creates `dir` (mode 0700) owned by uid:gid; an existing directory is re-owned.
fn mkdir_owned(dir: &Path, uid: Uid, gid: Gid) -> Result<(), JailError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(io_err("create the directory", dir)(e)),
    }
    unistd::chown(dir, Some(uid), Some(gid)).map_err(sys_err(format!("chown {}", dir.display())))
}

/// Copies `src` to a new file `dst` (never through an existing file or link).
fn copy_new(src: &Path, dst: &Path, mode: u32) -> Result<(), JailError> {
    let mut from = File::open(src).map_err(io_err("open", src))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)
        .map_err(io_err("create", dst))?;
    io::copy(&mut from, &mut to).map_err(io_err("copy into", dst))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_link_names_the_link_and_its_target() {
        let jail = tempfile::Builder::new()
            .prefix("aivmm-jail-")
            .tempdir()
            .unwrap();
        let root = jail.path();
        let rel = Path::new("sys/devices/system/cpu");
        assert_eq!(first_link(root, rel), None, "nothing exists yet");
        fs::create_dir_all(root.join("sys/devices")).unwrap();
        assert_eq!(first_link(root, rel), None, "real directories only");
        std::os::unix::fs::symlink("/etc", root.join("sys/devices/system")).unwrap();
        assert_eq!(
            first_link(root, rel),
            Some((root.join("sys/devices/system"), PathBuf::from("/etc")))
        );
    }
}
