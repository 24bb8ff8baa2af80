//! Who the vhost-user backend must be: an optional uid/gid checked with
//! `SO_PEERCRED` on the connected socket before the first request, so a process
//! that put its own socket at the backend's path is never sent guest memory.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The credentials the backend process must have; `None` fields are not checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendPeer {
    /// The backend's effective uid.
    pub uid: Option<u32>,
    /// The backend's effective gid.
    pub gid: Option<u32>,
}

/// Checks the peer of `stream` against `expected`. A mismatch is a
/// `PermissionDenied` error naming the expected and the actual credentials.
pub fn check_backend_peer(stream: &UnixStream, expected: &BackendPeer) -> io::Result<()> {
    if expected.uid.is_none() && expected.gid.is_none() {
        return Ok(());
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    // Fits: ucred is 12 bytes.
    #[allow(clippy::cast_possible_truncation)]
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is valid while `stream` is borrowed; `cred` and `len` are valid
    // out pointers and `len` is the size of `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let uid_ok = expected.uid.is_none_or(|u| u == cred.uid);
    let gid_ok = expected.gid.is_none_or(|g| g == cred.gid);
    if uid_ok && gid_ok {
        return Ok(());
    }
    let show = |v: Option<u32>| v.map_or_else(|| "any".to_string(), |v| v.to_string());
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "the backend is pid {} uid {} gid {}, expected uid {} gid {}",
            cred.pid,
            cred.uid,
            cred.gid,
            show(expected.uid),
            show(expected.gid)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_credentials_match_and_others_are_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        check_backend_peer(&a, &BackendPeer::default()).unwrap();
        check_backend_peer(
            &a,
            &BackendPeer {
                uid: Some(uid),
                gid: Some(gid),
            },
        )
        .unwrap();
        let other = uid.wrapping_add(4242);
        let err = check_backend_peer(
            &a,
            &BackendPeer {
                uid: Some(other),
                gid: None,
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            err.to_string().contains(&format!("expected uid {other}")),
            "{err}"
        );
        let err = check_backend_peer(
            &a,
            &BackendPeer {
                uid: None,
                gid: Some(gid.wrapping_add(1)),
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
