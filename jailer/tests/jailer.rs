//! The jailer as a user runs it: bad command lines, a program jailed with a network
//! namespace, a cgroup and a PID namespace, inspected from inside (what the jail-probe
//! example prints) and from outside (/proc), and aivmm itself started in a jail.
//!
//! These tests need root (as the jailer does), `ip` (iproute2) and a cgroup2 mount.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const UID: u32 = 1234;

/// Held by the tests that enable controllers in the cgroup2 root (one of them restores the
/// root's `cgroup.subtree_control` afterwards).
static CONTROLLERS: std::sync::Mutex<()> = std::sync::Mutex::new(());
const GID: u32 = 1234;

fn jailer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aivmm-jailer"))
}

/// `target/<profile>`, from this test's own path (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

/// The jail-probe example (cargo builds a package's examples for `cargo test`).
fn probe() -> PathBuf {
    let path = profile_dir().join("examples/jail-probe");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p aivmm-jailer --examples`",
        path.display()
    );
    path
}

fn assert_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the jailer tests must run as root"
    );
}

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = PathBuf::from(format!(
            "/tmp/aivmm-jailer-test-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace made with `ip netns add`, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let name = format!("ajt{}-{name}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add (iproute2)");
        assert!(status.success(), "ip netns add {name} failed");
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A `--parent-cgroup` of the test's own; its `<id>` children and itself are removed
/// when dropped (once their processes are gone).
struct ParentCgroup {
    mount: PathBuf,
    name: String,
    ids: Vec<String>,
}

impl ParentCgroup {
    fn new(name: &str) -> Self {
        ParentCgroup {
            mount: cgroup2_mount(),
            name: format!("aivmm-jailer-test-{}-{name}", std::process::id()),
            ids: Vec::new(),
        }
    }

    fn leaf(&mut self, id: &str) -> PathBuf {
        self.ids.push(id.to_string());
        self.mount.join(&self.name).join(id)
    }
}

impl Drop for ParentCgroup {
    fn drop(&mut self) {
        for id in &self.ids {
            let leaf = self.mount.join(&self.name).join(id);
            // Removable once empty: wait for the jailed processes to be gone.
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(&leaf).is_err() && leaf.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir(self.mount.join(&self.name));
    }
}

fn cgroup2_mount() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2")
                .then(|| PathBuf::from(before.split(' ').nth(4).unwrap_or_default()))
        })
        .expect("these tests need a cgroup2 mount")
}

fn controller_available(controller: &str) -> bool {
    fs::read_to_string(cgroup2_mount().join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == controller)
}

/// The jailer with the probe as `--id ID`, uid and gid 1234, jails under `base`.
fn probe_jailer(id: &str, probe: &Path, base: &Path) -> Command {
    let mut c = jailer();
    c.args(["--id", id, "--exec-file"])
        .arg(probe)
        .args(["--uid", "1234", "--gid", "1234", "--chroot-base-dir"])
        .arg(base);
    c
}

fn stderr_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .trim_end()
        .to_string()
}

/// A bad command line: exit 2, one `aivmm-jailer: error:` line naming `expected`, no
/// panic, nothing created under `base`.
fn assert_refused(args: &[&str], expected: &str, base: &Path) {
    let output = jailer().args(args).output().expect("run the jailer");
    let stderr = stderr_line(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("aivmm-jailer: error: ") && !stderr.contains('\n'),
        "{args:?}: not one error line: {stderr:?}"
    );
    assert!(
        stderr.contains(expected),
        "{args:?}: {stderr:?} lacks {expected:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        fs::read_dir(base).expect("list the chroot base").count(),
        0,
        "{args:?} created something under {}",
        base.display()
    );
}

#[test]
fn bad_command_lines_are_refused_before_anything_is_created() {
    assert_root();
    let base = TempDir::new("refused");
    let probe = probe();
    let probe = probe.to_str().unwrap();
    let b = base.0.to_str().unwrap();
    let ok = [
        "--exec-file",
        probe,
        "--uid",
        "1234",
        "--gid",
        "1234",
        "--chroot-base-dir",
        b,
    ];
    let with = |extra: &[&'static str], id: &'static str| -> Vec<&str> {
        let mut args = vec!["--id", id];
        args.extend_from_slice(&ok);
        args.extend_from_slice(extra);
        args
    };
    let long_id: &'static str = Box::leak("a".repeat(65).into_boxed_str());
    assert_refused(&with(&[], "a/b"), "only letters, digits and '-'", &base.0);
    assert_refused(&with(&[], "a_b"), "only letters, digits and '-'", &base.0);
    assert_refused(&with(&[], long_id), "1 to 64 characters", &base.0);
    assert_refused(&with(&[], ""), "1 to 64 characters", &base.0);
    let relative = [
        "--id",
        "x",
        "--exec-file",
        "target/debug/aivmm",
        "--uid",
        "1",
        "--gid",
        "1",
    ];
    assert_refused(&relative, "is not an absolute path", &base.0);
    let missing = [
        "--id",
        "x",
        "--exec-file",
        "/nonexistent/aivmm",
        "--uid",
        "1",
        "--gid",
        "1",
        "--chroot-base-dir",
        b,
    ];
    assert_refused(&missing, "/nonexistent/aivmm", &base.0);
    // Options that are each refused with this message.
    let refused_options: [(&[&'static str], &str); 9] = [
        (
            &["--cgroup", "../pids.max=1"],
            "may not contain '/' or '..'",
        ),
        (&["--cgroup", "x/pids.max=1"], "may not contain '/' or '..'"),
        (&["--cgroup", "pids.max"], "is not FILE=VALUE"),
        (&["--cgroup", "pids.max="], "has no value"),
        (&["--cgroup-version", "1"], "only cgroup v2"),
        (&["--cgroup-version", "3"], "only 2 is supported"),
        (&["--parent-cgroup", "../x"], "parent cgroup"),
        (
            &["--resource-limit", "nofile=3"],
            "use fsize, no-file or memlock",
        ),
        (&["--resource-limit", "fsize=big"], "not a number"),
    ];
    for (extra, expected) in refused_options {
        assert_refused(&with(extra, "x"), expected, &base.0);
    }
    let bad_uid = [
        "--id",
        "x",
        "--exec-file",
        probe,
        "--uid",
        "abc",
        "--gid",
        "1",
        "--chroot-base-dir",
        b,
    ];
    assert_refused(&bad_uid, "invalid value 'abc' for '--uid", &base.0);
    assert_refused(
        &with(&["--netns", "/nonexistent/netns"], "x"),
        "network namespace",
        &base.0,
    );
    let not_elf = [
        "--id",
        "x",
        "--exec-file",
        "/proc/self/status",
        "--uid",
        "1",
        "--gid",
        "1",
        "--chroot-base-dir",
        b,
    ];
    assert_refused(
        &not_elf,
        "is not a 64-bit little-endian ELF executable",
        &base.0,
    );
    let dir = [
        "--id",
        "x",
        "--exec-file",
        "/tmp",
        "--uid",
        "1",
        "--gid",
        "1",
        "--chroot-base-dir",
        b,
    ];
    assert_refused(&dir, "not a regular file", &base.0);
    assert_refused(
        &with(&["--netns", "/etc/hostname"], "x"),
        "not a namespace file",
        &base.0,
    );
    // A program named like a directory the jail needs.
    let named_dev = TempDir::new("named-dev");
    let dev = named_dev.0.join("dev");
    fs::copy(probe, &dev).unwrap();
    let dev_args = [
        "--id",
        "x",
        "--exec-file",
        dev.to_str().unwrap(),
        "--uid",
        "1",
        "--gid",
        "1",
        "--chroot-base-dir",
        b,
    ];
    assert_refused(&dev_args, "collides with the jail's /dev", &base.0);
    // A controller the cgroup2 hierarchy does not offer is refused up front.
    assert_refused(
        &with(&["--cgroup", "nosuchcontroller.max=1"], "x"),
        "is not available",
        &base.0,
    );
}

/// What the probe printed up to `ready`.
struct ProbeReport {
    values: Vec<(String, String)>,
}

impl ProbeReport {
    fn read(stdout: &mut impl BufRead) -> Self {
        let mut values = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = stdout
                .read_line(&mut line)
                .expect("read the probe's output");
            assert!(n > 0, "the probe ended before `ready`: {values:?}");
            let line = line.trim_end();
            if line == "ready" {
                return ProbeReport { values };
            }
            let (k, v) = line.split_once('=').unwrap_or((line, ""));
            values.push((k.to_string(), v.to_string()));
        }
    }

    fn get(&self, key: &str) -> &str {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the probe printed no {key}"))
    }

    fn paths(&self) -> BTreeSet<String> {
        self.values
            .iter()
            .filter(|(k, _)| k == "path")
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The jail holds the program, the pid file, /run, the device nodes, and the
/// interpreter and libraries (shared objects under lib directories), nothing else.
fn assert_only_jail_contents(paths: &BTreeSet<String>, program: &str, extra_devices: &[&str]) {
    let mut fixed: BTreeSet<String> = [
        "/dev",
        "/dev/kvm",
        "/dev/net",
        "/dev/net/tun",
        "/dev/urandom",
        "/run",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    fixed.insert(format!("/{program}"));
    fixed.insert(format!("/{program}.pid"));
    fixed.extend(extra_devices.iter().map(|s| s.to_string()));
    let host_vfio: Vec<String> = fs::read_dir("/dev/vfio")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default();
    for path in paths {
        if fixed.contains(path) {
            continue;
        }
        let library_dir = ["/lib", "/lib64", "/usr"]
            .iter()
            .any(|d| path == d || path.starts_with(&format!("{d}/")));
        let is_library_path = library_dir
            && (path.contains(".so") || !path.rsplit('/').next().unwrap_or("").contains('.'));
        let is_vfio = path == "/dev/vfio"
            || host_vfio
                .iter()
                .any(|h| path == h || path.starts_with(&format!("{h}/")));
        // The host's CPU and NUMA topology, read-only.
        let is_topology = ["/sys", "/sys/devices", "/sys/devices/system"].contains(&path.as_str())
            || TOPOLOGY
                .iter()
                .any(|t| path == t || path.starts_with(&format!("{t}/")));
        assert!(
            is_library_path || is_vfio || is_topology,
            "{path} is in the jail but the jailer did not put it there: {paths:?}"
        );
    }
    for path in &fixed {
        assert!(
            paths.contains(path),
            "{path} is missing from the jail: {paths:?}"
        );
    }
    for dir in TOPOLOGY.iter().filter(|d| Path::new(d).is_dir()) {
        assert!(
            paths.contains(*dir),
            "the host's {dir} is missing from the jail"
        );
    }
}

/// The host directories the jail shows read-only.
const TOPOLOGY: [&str; 2] = ["/sys/devices/system/cpu", "/sys/devices/system/node"];

#[test]
fn a_jailed_program_sees_only_its_jail_with_its_netns_cgroup_and_ids() {
    assert_root();
    let _controllers = CONTROLLERS.lock().unwrap_or_else(|e| e.into_inner());
    let base = TempDir::new("e2e");
    let netns = Netns::new("e2e");
    let mut cgroups = ParentCgroup::new("e2e");
    let probe = probe();
    let b = base.0.to_str().unwrap();
    let common = |id: &str| -> Vec<String> {
        [
            "--id",
            id,
            "--exec-file",
            probe.to_str().unwrap(),
            "--uid",
            "1234",
            "--gid",
            "1234",
            "--chroot-base-dir",
            b,
            "--netns",
            netns.path().to_str().unwrap(),
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            &cgroups.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // pids.max: written where the host's cgroup2 offers the pids controller, else a clear
    // error before anything is created.
    let pids = controller_available("pids");
    let mut args = common("t1");
    args.extend(["--cgroup".into(), "pids.max=64".into()]);
    if !pids {
        println!(
            "note: the cgroup2 hierarchy at {} does not offer the pids controller (a hybrid \
             host: cgroup v1 holds it); checking that the jailer refuses pids.max, then \
             jailing without it",
            cgroups.mount.display()
        );
        let output = jailer().args(&args).output().expect("run the jailer");
        let stderr = stderr_line(&output);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("cgroup controller \"pids\" (for pids.max) is not available"),
            "{stderr}"
        );
        assert!(!base.0.join("jail-probe").exists(), "a jail was created");
        assert!(
            !cgroups.mount.join(&cgroups.name).exists(),
            "a cgroup was created"
        );
        args = common("t1");
    }
    // A core cgroup file every cgroup has: proves values are written on any host.
    args.extend(["--cgroup".into(), "cgroup.max.descendants=0".into()]);
    args.extend(["--".into(), "hello".into(), "world".into()]);

    let leaf = cgroups.leaf("t1");
    // Through a shell that leaves descriptor 7 open: the jailer must not pass it on.
    let mut child: Child = Command::new("/bin/sh")
        .arg("-c")
        .arg("exec 7</dev/null; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_aivmm-jailer"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the jailer");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let report = ProbeReport::read(&mut stdout);

    // Inside: ids, arguments, environment, the file system.
    assert_eq!(report.get("uid"), UID.to_string());
    assert_eq!(report.get("gid"), GID.to_string());
    assert_eq!(
        report.get("pid"),
        pid.to_string(),
        "the jailer execs in place"
    );
    assert_eq!(report.get("args"), "--id t1 hello world");
    assert_eq!(report.get("env"), "0", "the environment is not cleared");
    assert_only_jail_contents(&report.paths(), "jail-probe", &[]);

    // Outside: credentials, no_new_privs, limits, cgroup, network namespace.
    assert_eq!(status_field(pid, "Uid"), "1234 1234 1234 1234");
    assert_eq!(status_field(pid, "Gid"), "1234 1234 1234 1234");
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let mut fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    fds.sort();
    assert_eq!(
        fds,
        ["0", "1", "2"],
        "descriptors beyond stdio reached the program"
    );
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(line("Max open files").contains("2048 2048"), "{limits}");
    assert!(
        line("Max file size").contains("unlimited unlimited"),
        "{limits}"
    );
    // The topology is bound read-only (mountinfo: mount point, then its options).
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    for dir in TOPOLOGY.iter().filter(|d| Path::new(d).is_dir()) {
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(*dir))
            .unwrap_or_else(|| panic!("{dir} is not a mount in the jail: {mountinfo}"));
        let options = line.split(' ').nth(5).unwrap_or_default();
        assert!(
            options.split(',').any(|o| o == "ro") && options.contains("nosuid"),
            "{dir} is not read-only, nosuid: {line}"
        );
    }
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let expected = format!("0::/{}/t1", cgroups.name);
    assert!(
        cgroup.lines().any(|l| l == expected),
        "{expected} not in {cgroup}"
    );
    assert_eq!(fs::metadata(&leaf).unwrap().mode() & 0o777, 0o755);
    assert_eq!(
        fs::read_to_string(leaf.join("cgroup.max.descendants"))
            .unwrap()
            .trim(),
        "0"
    );
    if pids {
        assert_eq!(
            fs::read_to_string(leaf.join("pids.max")).unwrap().trim(),
            "64"
        );
        println!("pids.max in {} reads 64", leaf.display());
    }
    let ns_ino = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(
        ns_ino,
        fs::metadata(netns.path()).unwrap().ino(),
        "not in the netns"
    );
    assert_ne!(ns_ino, fs::metadata("/proc/self/ns/net").unwrap().ino());
    assert_ne!(
        fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap().ino(),
        fs::metadata("/proc/self/ns/mnt").unwrap().ino(),
        "no mount namespace of its own"
    );

    // The jail from the host: device nodes, ownership, the pid file.
    let root = base.0.join("jail-probe/t1/root");
    for (node, dev, mode) in [
        ("dev/kvm", (10, 232), 0o600),
        ("dev/net/tun", (10, 200), 0o600),
        ("dev/urandom", (1, 9), 0o666),
    ] {
        let meta = fs::symlink_metadata(root.join(node)).unwrap();
        assert!(meta.file_type().is_char_device(), "{node}");
        assert_eq!(meta.rdev(), nix::sys::stat::makedev(dev.0, dev.1), "{node}");
        assert_eq!(meta.mode() & 0o7777, mode, "{node}");
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{node}");
    }
    let root_meta = fs::metadata(&root).unwrap();
    assert_eq!(
        (root_meta.uid(), root_meta.gid(), root_meta.mode() & 0o777),
        (UID, GID, 0o700)
    );
    assert_eq!(
        fs::read_to_string(root.join("jail-probe.pid")).unwrap(),
        pid.to_string()
    );
    // The jail's mounts stayed in its own namespace.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(root.to_str().unwrap()),
        "the bind mount leaked"
    );

    drop(child.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(rest.contains("bye"));

    // The same jail again is refused (its device nodes and program are there).
    let output = jailer().args(&args).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr_line(&output));
    assert!(
        stderr_line(&output).contains("was set up before"),
        "{}",
        stderr_line(&output)
    );
}

#[test]
fn new_pid_ns_makes_the_program_pid_1_and_records_its_pid() {
    assert_root();
    let base = TempDir::new("pidns");
    let mut cgroups = ParentCgroup::new("pidns");
    let _leaf = cgroups.leaf("t2");
    let probe = probe();
    let mut child = probe_jailer("t2", &probe, &base.0)
        .args(["--parent-cgroup", &cgroups.name, "--new-pid-ns"])
        .args([
            "--resource-limit",
            "no-file=100",
            "--resource-limit",
            "fsize=1000000",
            // Below any host's hard limit: raising it needs CAP_SYS_RESOURCE, which some
            // containers do not give root.
            "--resource-limit",
            "memlock=4194304",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the jailer");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let report = ProbeReport::read(&mut stdout);
    assert_eq!(report.get("pid"), "1");
    // The jailer itself is gone once the program runs.
    assert!(child.wait().unwrap().success());
    let root = base.0.join("jail-probe/t2/root");
    let host_pid: u32 = fs::read_to_string(root.join("jail-probe.pid"))
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(host_pid, child.id());
    assert_eq!(status_field(host_pid, "NSpid"), format!("{host_pid} 1"));
    assert_eq!(status_field(host_pid, "Uid"), "1234 1234 1234 1234");
    let limits = fs::read_to_string(format!("/proc/{host_pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 100 ")),
        "{limits}"
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.contains(" 1000000 ")),
        "{limits}"
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max locked memory") && l.contains(" 4194304 ")),
        "{limits}"
    );
    let _ = stdin.write_all(b"x");
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains("bye"));
}

#[test]
fn daemonize_detaches_to_dev_null() {
    assert_root();
    let base = TempDir::new("daemon");
    let mut cgroups = ParentCgroup::new("daemon");
    let _leaf = cgroups.leaf("t4");
    let probe = probe();
    let output = probe_jailer("t4", &probe, &base.0)
        .args(["--parent-cgroup", &cgroups.name, "--daemonize"])
        .output()
        .expect("run the jailer");
    assert!(output.status.success(), "{}", stderr_line(&output));
    assert!(
        output.stdout.is_empty(),
        "the daemon wrote to the caller's stdout"
    );
    let root = base.0.join("jail-probe/t4/root");
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    let pid: u32 = fs::read_to_string(root.join("jail-probe.pid"))
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(pid, 0);
}

#[test]
fn aivmm_starts_inside_a_jail() {
    assert_root();
    let aivmm = profile_dir().join("aivmm");
    assert!(
        aivmm.is_file(),
        "{} is missing: build it with `cargo build -p vmm`",
        aivmm.display()
    );
    let base = TempDir::new("aivmm");
    let mut cgroups = ParentCgroup::new("aivmm");
    let _leaf = cgroups.leaf("t3");
    let output = jailer()
        .args([
            "--id",
            "t3",
            "--exec-file",
            aivmm.to_str().unwrap(),
            "--uid",
            "1234",
        ])
        .args([
            "--gid",
            "1234",
            "--chroot-base-dir",
            base.0.to_str().unwrap(),
        ])
        .args(["--parent-cgroup", &cgroups.name, "--", "--help"])
        .output()
        .expect("run the jailer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr_line(&output));
    assert!(stdout.contains("Usage: aivmm"), "{stdout}");
    assert!(stdout.contains("--api-sock"), "{stdout}");
    // It ran from the copy in the jail, with the libraries copied beside it.
    let root = base.0.join("aivmm/t3/root");
    assert!(root.join("aivmm").is_file());
}

#[test]
fn controllers_are_enabled_from_the_root_down_to_the_parent_cgroup() {
    assert_root();
    let _controllers = CONTROLLERS.lock().unwrap_or_else(|e| e.into_inner());
    let mount = cgroup2_mount();
    let candidates = [
        ("pids", "pids.max", "64"),
        ("memory", "memory.max", "536870912"),
        ("cpu", "cpu.max", "50000 100000"),
        ("hugetlb", "hugetlb.2MB.max", "2097152"),
    ];
    let Some(&(controller, file, value)) = candidates.iter().find(|(c, _, _)| {
        controller_available(c)
            && (*c != "hugetlb" || Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists())
    }) else {
        println!(
            "note: the cgroup2 hierarchy at {} offers none of pids, memory, cpu, hugetlb: \
             nothing to enable",
            mount.display()
        );
        return;
    };
    println!("enabling {controller} and writing {file}={value}");
    let root_control = mount.join("cgroup.subtree_control");
    let enabled_before = fs::read_to_string(&root_control)
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == controller);

    let base = TempDir::new("controllers");
    let mut cgroups = ParentCgroup::new("controllers");
    // A nested parent: the controller must be enabled at every level.
    let outer = cgroups.name.clone();
    cgroups.name = format!("{outer}/inner");
    let leaf = cgroups.leaf("t6");
    let probe = probe();
    let mut child = probe_jailer("t6", &probe, &base.0)
        .args([
            "--parent-cgroup",
            &cgroups.name,
            "--cgroup",
            &format!("{file}={value}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the jailer");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let report = ProbeReport::read(&mut stdout);
    assert_eq!(report.get("uid"), UID.to_string());
    let result = std::panic::catch_unwind(|| {
        assert_eq!(fs::read_to_string(leaf.join(file)).unwrap().trim(), value);
        for dir in [mount.clone(), mount.join(&outer), mount.join(&cgroups.name)] {
            let control = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
            assert!(
                control.split_whitespace().any(|c| c == controller),
                "{controller} not enabled in {}: {control:?}",
                dir.display()
            );
        }
    });
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    drop(cgroups);
    let _ = fs::remove_dir(mount.join(&outer));
    if !enabled_before {
        let _ = fs::write(&root_control, format!("-{controller}"));
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
