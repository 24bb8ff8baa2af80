//! Who the vhost-user backend must be: an optional uid/gid checked with
//! `SO_PEERCRED` on the connected socket before the first request, so a process
//! that put its own socket at the backend's path is never sent guest memory.

use std::io;
use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

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
    let cred = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let (pid, uid, gid) = (cred.pid(), cred.uid(), cred.gid());
    let uid_ok = expected.uid.is_none_or(|u| u == uid);
    let gid_ok = expected.gid.is_none_or(|g| g == gid);
    if uid_ok && gid_ok {
        return Ok(());
    }
    let show = |v: Option<u32>| v.map_or_else(|| "any".to_string(), |v| v.to_string());
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "the backend is pid {} uid {} gid {}, expected uid {} gid {}",
            pid,
            uid,
            gid,
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
