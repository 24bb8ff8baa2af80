//! Leaving root after start-up. A program starts as root to open what only root may open
//! (ai-inferd: the models and each tenant socket given to its tenant's uid; aivmm:
//! `/dev/kvm`, hugetlb, tap, VFIO), then, before any thread runs and before anything
//! hostile reaches it, becomes an unprivileged user for good: no supplementary groups,
//! real, effective and saved ids all switched, and no-new-privs set (no exec can gain
//! privileges again).

use std::fmt;
use std::str::FromStr;

use nix::unistd::{getegid, geteuid, setgroups, setresgid, setresuid, Gid, Uid};
use thiserror::Error;

/// The user to run as: `UID:GID`, numeric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id (the only group kept).
    pub gid: u32,
}

impl FromStr for RunAs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (uid, gid) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: expected UID:GID, numeric"))?;
        let id = |v: &str| {
            v.parse::<u32>()
                .ok()
                // (uid_t)-1 means "leave unchanged" to the set*id calls.
                .filter(|&n| n != u32::MAX)
                .ok_or_else(|| format!("`{v}` is not a user or group id"))
        };
        Ok(Self {
            uid: id(uid)?,
            gid: id(gid)?,
        })
    }
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Why the switch failed; the program must not go on in that case.
#[derive(Debug, Error)]
pub enum PrivilegeError {
    /// A set*id or setgroups call failed (not root, or a kernel refusal).
    #[error("cannot switch to {to}: {call}: {source}")]
    Call {
        /// The target user.
        to: RunAs,
        /// The failing call.
        call: &'static str,
        /// The error.
        source: nix::Error,
    },
    /// The ids read back are not the requested ones, or root could be regained.
    #[error("switched to {to}, but the process still runs as uid {uid}, gid {gid}")]
    NotDropped {
        /// The target user.
        to: RunAs,
        /// Effective uid read back.
        uid: u32,
        /// Effective gid read back.
        gid: u32,
    },
}

/// Becomes `to` for good. Call it while the process has one thread: glibc applies the
/// set*id calls to every thread, but a thread started earlier would have run as root.
pub fn drop_to(to: RunAs) -> Result<(), PrivilegeError> {
    let call = |call, source| PrivilegeError::Call { to, call, source };
    let (uid, gid) = (Uid::from_raw(to.uid), Gid::from_raw(to.gid));
    // Groups first: once the uid is not 0 there is no permission left to change them.
    setgroups(&[gid]).map_err(|e| call("setgroups", e))?;
    setresgid(gid, gid, gid).map_err(|e| call("setresgid", e))?;
    setresuid(uid, uid, uid).map_err(|e| call("setresuid", e))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| call("prctl(PR_SET_NO_NEW_PRIVS)", e))?;
    let regained =
        to.uid != 0 && setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok();
    if regained || geteuid() != uid || getegid() != gid {
        return Err(PrivilegeError::NotDropped {
            to,
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_parses_uid_colon_gid_and_nothing_else() {
        assert_eq!(
            "65534:100".parse::<RunAs>(),
            Ok(RunAs {
                uid: 65534,
                gid: 100
            })
        );
        for bad in [
            "",
            "1000",
            "1000:",
            ":1000",
            "a:b",
            "-1:0",
            "4294967295:0",
            "1:2:3",
        ] {
            assert!(bad.parse::<RunAs>().is_err(), "{bad}");
        }
        assert_eq!("7:8".parse::<RunAs>().unwrap().to_string(), "7:8");
    }
}
