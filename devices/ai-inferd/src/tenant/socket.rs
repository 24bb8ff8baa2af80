//! Who may speak for a tenant. Its socket is created 0600 in a directory no other
//! user can write; every connecting peer's credentials (`SO_PEERCRED`) are checked
//! against the tenant's [`PeerRule`], and the vhost-user handler waits for that
//! verdict ([`Door`]) before the device answers anything, so a refused peer gets
//! nothing but a closed socket.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io::{self, Result as IoResult};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserShMemConfig, VhostUserSharedMsg,
};
use vhost::vhost_user::{Backend, GpuBackend};
use vhost_user_backend::VhostUserBackend;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::device::TenantDevice;

/// Pending connections the kernel queues before the listener thread takes them (it
/// takes them at once, refusing all but one).
const BACKLOG: libc::c_int = 8;

/// Longest the vhost-user handler waits for the listener thread's verdict on a new
/// peer (normally microseconds); past it the peer is treated as refused.
const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// Why a tenant socket could not be set up.
#[derive(Debug, Error)]
pub enum SocketError {
    /// The socket directory could not be created.
    #[error("cannot create the socket directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The socket directory could not be inspected.
    #[error("cannot inspect the socket directory {path}: {source}")]
    InspectDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The socket's parent is not a directory.
    #[error("the socket directory {0} is not a directory")]
    NotDir(PathBuf),
    /// The socket directory belongs to another user.
    #[error(
        "the socket directory {path} is owned by uid {owner}, not by the daemon's uid \
         {daemon}; another user could replace the sockets"
    )]
    DirOwner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The daemon's effective uid.
        daemon: u32,
    },
    /// Other users may write the socket directory.
    #[error(
        "the socket directory {path} has mode {mode:04o}: group or others may write it and \
         replace the sockets; make it 0700 (or 0711/0750 without write bits)"
    )]
    DirWritable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file that is not a socket is where the socket goes.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotSocket(PathBuf),
    /// The path does not fit in a unix socket address.
    #[error("socket path {0} is too long for a unix socket address")]
    PathTooLong(PathBuf),
    /// A step of creating the socket failed.
    #[error("cannot {step} socket {path}: {source}")]
    Create {
        /// What failed (create, bind, chmod, chown, listen).
        step: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The credentials of a connected peer (`SO_PEERCRED`: taken when it connected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id.
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

impl fmt::Display for PeerCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// The credentials of the peer of `socket`.
pub fn peer_cred(socket: &impl AsFd) -> IoResult<PeerCred> {
    let cred = getsockopt(socket, PeerCredentials).map_err(io::Error::from)?;
    Ok(PeerCred {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// Which peers a tenant admits (`uid`/`gid` of its config section); an absent
/// field admits any value. With neither, any peer that can open the 0600 socket
/// is admitted: the daemon's own uid, or root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerRule {
    /// The only uid admitted, if set.
    pub uid: Option<u32>,
    /// The only gid admitted, if set.
    pub gid: Option<u32>,
}

impl PeerRule {
    /// Whether `peer` may be this tenant's VMM.
    pub fn admits(&self, peer: &PeerCred) -> bool {
        self.uid.is_none_or(|u| u == peer.uid) && self.gid.is_none_or(|g| g == peer.gid)
    }
}

impl fmt::Display for PeerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let any = |v: Option<u32>| v.map_or_else(|| "any".to_string(), |v| v.to_string());
        write!(f, "uid {} gid {}", any(self.uid), any(self.gid))
    }
}

/// The daemon's effective uid.
pub fn daemon_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure `dir` may hold tenant sockets: created 0700 if missing; an existing
/// one must be a directory owned by the daemon's uid that group and others cannot
/// write (else another user could replace a socket with their own).
pub fn prepare_dir(dir: &Path) -> Result<(), SocketError> {
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                .map_err(|source| SocketError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                });
        }
        Err(source) => {
            return Err(SocketError::InspectDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(SocketError::NotDir(dir.to_path_buf()));
    }
    let daemon = daemon_uid();
    if meta.uid() != daemon {
        return Err(SocketError::DirOwner {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            daemon,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(SocketError::DirWritable {
            path: dir.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Creates the listening socket `path` with mode 0600 set before it listens (so
/// no connection is ever taken under a looser mode), in a directory checked by
/// [`prepare_dir`]. A stale socket is replaced, any other file is not. If the
/// daemon runs as root and `owner` names a uid or gid, the socket is given to them
/// so that VMM (and no other non-root user) can connect.
pub fn bind(path: &Path, owner: &PeerRule) -> Result<UnixListener, SocketError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    prepare_dir(dir)?;
    let step = |step: &'static str| {
        move |source: io::Error| SocketError::Create {
            step,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SocketError::NotSocket(path.to_path_buf()));
        }
        fs::remove_file(path).map_err(step("replace the stale"))?;
    }
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Keep a terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(SocketError::PathTooLong(path.to_path_buf()));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(step("create")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Fits: sockaddr_un is 110 bytes.
    #[allow(clippy::cast_possible_truncation)]
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, the fd is ours.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(step("bind")(io::Error::last_os_error()));
    }
    let undo = |e: SocketError| {
        let _ = fs::remove_file(path);
        e
    };
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(step("chmod"))
        .map_err(undo)?;
    if daemon_uid() == 0 && (owner.uid.is_some() || owner.gid.is_some()) {
        std::os::unix::fs::chown(path, owner.uid, owner.gid)
            .map_err(step("chown"))
            .map_err(undo)?;
    }
    // SAFETY: the fd is a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(undo(step("listen")(io::Error::last_os_error())));
    }
    Ok(UnixListener::from(fd))
}

/// The process's open descriptors (`/proc/self/fd`), opened once by a listener thread
/// before its seccomp filter (which has no `openat`) and read again for each connection.
pub struct OpenDescriptors(nix::dir::Dir);

impl OpenDescriptors {
    /// Opens `/proc/self/fd`.
    pub fn open() -> nix::Result<Self> {
        use nix::fcntl::OFlag;
        nix::dir::Dir::open(
            "/proc/self/fd",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map(Self)
    }
}

/// The connection the vhost-user daemon last accepted on the listening socket
/// `local`: a duplicate of its descriptor, found among the process's descriptors as
/// the connected socket whose own address is `local`. (The vhost-user library
/// accepts and keeps the connection to itself; each tenant socket has one listener
/// thread, which calls this right after the accept, so there is one such socket.)
pub fn find_accepted(fds: &mut OpenDescriptors, local: &Path) -> Option<UnixStream> {
    // The iterator starts from the top and rewinds the directory when dropped.
    let numbers: Vec<RawFd> = fds
        .0
        .iter()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().ok()?.parse().ok())
        .collect();
    for fd in numbers {
        // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a closed or foreign number fails
        // with EBADF or duplicates it, and the duplicate is ours alone.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a new descriptor nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        if !is_stream_socket(&owned) {
            continue;
        }
        let stream = UnixStream::from(owned);
        let named = stream
            .local_addr()
            .ok()
            .is_some_and(|a| a.as_pathname() == Some(local));
        // A listening socket has no peer.
        if named && stream.peer_addr().is_ok() {
            return Some(stream);
        }
    }
    None
}

fn is_stream_socket(fd: &OwnedFd) -> bool {
    let mut kind: libc::c_int = 0;
    // Fits: c_int is 4 bytes.
    #[allow(clippy::cast_possible_truncation)]
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, out pointers to a c_int and its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::addr_of_mut!(kind).cast(),
            &mut len,
        )
    };
    rc == 0 && kind == libc::SOCK_STREAM
}

const PENDING: u8 = 0;
const ADMITTED: u8 = 1;
const REFUSED: u8 = 2;

/// One connection's verdict and handshake progress, shared by the listener thread
/// (which decides) and the vhost-user handler (which waits for the decision before
/// the device answers, and reports the handshake milestone).
#[derive(Default)]
pub struct Door {
    verdict: AtomicU8,
    lock: Mutex<()>,
    decided: Condvar,
    negotiated: AtomicBool,
}

impl Door {
    /// A door with no verdict yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits or refuses the peer; wakes a handler waiting for it.
    pub fn decide(&self, admit: bool) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.verdict
            .store(if admit { ADMITTED } else { REFUSED }, Ordering::SeqCst);
        self.decided.notify_all();
    }

    /// Whether the peer is admitted, waiting for the verdict at most
    /// [`VERDICT_WAIT`] (no verdict by then counts as refused).
    pub fn pass(&self) -> bool {
        match self.verdict.load(Ordering::SeqCst) {
            ADMITTED => return true,
            REFUSED => return false,
            _ => {}
        }
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let wait = self.decided.wait_timeout_while(guard, VERDICT_WAIT, |()| {
            self.verdict.load(Ordering::SeqCst) == PENDING
        });
        drop(wait);
        self.verdict.load(Ordering::SeqCst) == ADMITTED
    }

    /// Whether the VMM reached the handshake milestone: it asked for the protocol
    /// features (GET_PROTOCOL_FEATURES), which every frontend of this device does
    /// right after connecting, long before the guest activates the device.
    pub fn negotiated(&self) -> bool {
        self.negotiated.load(Ordering::SeqCst)
    }
}

fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the peer was not admitted to this tenant",
    )
}

type Mem = GuestMemoryAtomic<GuestMemoryMmap<<TenantDevice as VhostUserBackend>::Bitmap>>;

/// The tenant device behind its [`Door`]: every request the peer can cause waits
/// for the verdict and does nothing for a refused peer. The calls made when the
/// handler is created (queue counts, threads, exit events) pass straight through.
#[derive(Clone)]
pub struct GuardedDevice {
    device: Arc<TenantDevice>,
    door: Arc<Door>,
}

impl GuardedDevice {
    /// `device`, answering only once `door` admits the peer.
    pub fn new(device: Arc<TenantDevice>, door: Arc<Door>) -> Self {
        GuardedDevice { device, door }
    }

    fn check(&self) -> IoResult<()> {
        if self.door.pass() {
            Ok(())
        } else {
            Err(refused())
        }
    }
}

impl VhostUserBackend for GuardedDevice {
    type Bitmap = <TenantDevice as VhostUserBackend>::Bitmap;
    type Vring = <TenantDevice as VhostUserBackend>::Vring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.device.max_queue_size()
    }

    fn features(&self) -> u64 {
        if self.door.pass() {
            self.device.features()
        } else {
            0
        }
    }

    fn acked_features(&self, features: u64) {
        if self.door.pass() {
            self.device.acked_features(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if self.door.pass() {
            self.door.negotiated.store(true, Ordering::SeqCst);
            self.device.protocol_features()
        } else {
            VhostUserProtocolFeatures::empty()
        }
    }

    fn reset_device(&self) {
        if self.door.pass() {
            self.device.reset_device();
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        if self.door.pass() {
            self.device.set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        if self.door.pass() {
            self.device.get_config(offset, size)
        } else {
            Vec::new()
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> IoResult<()> {
        self.check()?;
        self.device.set_config(offset, buf)
    }

    fn update_memory(&self, mem: Mem) -> IoResult<()> {
        self.check()?;
        self.device.update_memory(mem)
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if self.door.pass() {
            self.device.set_backend_req_fd(backend);
        }
    }

    fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> IoResult<fs::File> {
        self.check()?;
        self.device.get_shared_object(uuid)
    }

    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> IoResult<()> {
        self.check()?;
        self.device.set_gpu_socket(gpu_backend)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.device.queues_per_thread()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.device.exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> IoResult<()> {
        self.check()?;
        self.device.stop_vring(queue_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> IoResult<()> {
        // The first code a vring worker runs for the guest.
        crate::seccomp::apply_once_on_vring_worker();
        self.check()?;
        self.device
            .handle_event(device_event, evset, vrings, thread_id)
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: fs::File,
    ) -> IoResult<Option<fs::File>> {
        self.check()?;
        self.device.set_device_state_fd(direction, phase, file)
    }

    fn check_device_state(&self) -> IoResult<()> {
        self.check()?;
        self.device.check_device_state()
    }

    fn get_shmem_config(&self) -> IoResult<VhostUserShMemConfig> {
        self.check()?;
        self.device.get_shmem_config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name` (not created) in a new temporary directory, removed when the guard drops.
    fn dir(name: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join(name);
        (tmp, d)
    }

    #[test]
    fn peer_rule_matches_each_given_field() {
        let peer = PeerCred {
            pid: 1,
            uid: 1000,
            gid: 100,
        };
        assert!(PeerRule::default().admits(&peer));
        assert!(PeerRule {
            uid: Some(1000),
            gid: None
        }
        .admits(&peer));
        assert!(!PeerRule {
            uid: Some(1001),
            gid: None
        }
        .admits(&peer));
        assert!(!PeerRule {
            uid: Some(1000),
            gid: Some(0)
        }
        .admits(&peer));
    }

    #[test]
    fn peer_cred_of_a_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_cred(&a).unwrap();
        assert_eq!(c.uid, daemon_uid());
        assert_eq!(c.pid, i32::try_from(std::process::id()).unwrap());
    }

    #[test]
    fn sockets_are_0600_in_a_new_0700_directory() {
        let (_tmp, d) = dir("modes");
        let path = d.join("sub").join("t.sock");
        let l = bind(&path, &PeerRule::default()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        // It listens: a client connects and is accepted.
        let _c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(peer_cred(&s).unwrap().uid, daemon_uid());
        let mut fds = OpenDescriptors::open().unwrap();
        assert!(
            find_accepted(&mut fds, &path).is_some(),
            "the accepted end is found"
        );
        // Read again from the top: found again.
        assert!(find_accepted(&mut fds, &path).is_some());
        drop(s);
        // A stale socket is replaced, another file is not.
        drop(l);
        bind(&path, &PeerRule::default()).unwrap();
        let plain = d.join("sub").join("plain");
        fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            bind(&plain, &PeerRule::default()),
            Err(SocketError::NotSocket(_))
        ));
    }

    #[test]
    fn a_writable_or_foreign_directory_is_refused() {
        let (_tmp, d) = dir("writable");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o775)).unwrap();
        let err = bind(&d.join("t.sock"), &PeerRule::default()).unwrap_err();
        assert!(
            matches!(err, SocketError::DirWritable { mode: 0o775, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&d.display().to_string()), "{err}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o711)).unwrap();
        bind(&d.join("t.sock"), &PeerRule::default()).unwrap();
        if daemon_uid() == 0 {
            std::os::unix::fs::chown(&d, Some(12345), None).unwrap();
            let err = prepare_dir(&d).unwrap_err();
            assert!(
                matches!(err, SocketError::DirOwner { owner: 12345, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn the_door_waits_for_the_verdict() {
        let door = Arc::new(Door::new());
        let d2 = Arc::clone(&door);
        let h = std::thread::spawn(move || d2.pass());
        std::thread::sleep(Duration::from_millis(20));
        door.decide(true);
        assert!(h.join().unwrap());
        let refused = Door::new();
        refused.decide(false);
        assert!(!refused.pass());
    }
}
