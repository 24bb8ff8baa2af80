//! `[vsock]`: a virtio-vsock device in Firecracker's hybrid model: the host side is a unix
//! socket that aivmm creates and host programs connect to (`CONNECT <port>`).

use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// CIDs 0-2 are the hypervisor, local and host addresses.
pub const MIN_GUEST_CID: u32 = 3;
/// `VMADDR_CID_ANY`, never an address.
const CID_ANY: u32 = u32::MAX;
/// `sun_path` holds 108 bytes, the last a NUL.
pub const MAX_UDS_PATH_LEN: usize = 107;

/// The guest's vsock device.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 to 4294967294, unique among the host's VMs.
    pub guest_cid: u32,
    /// The host-side unix socket aivmm creates: it must not exist yet, its directory must.
    pub uds_path: PathBuf,
}

pub(super) fn validate(v: &VsockConfig) -> Result<(), ConfigError> {
    if v.guest_cid < MIN_GUEST_CID || v.guest_cid == CID_ANY {
        return Err(ConfigError::BadCid { cid: v.guest_cid });
    }
    let path = &v.uds_path;
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(ConfigError::UdsPathEmpty);
    }
    if len > MAX_UDS_PATH_LEN {
        return Err(ConfigError::UdsPathTooLong {
            path: path.clone(),
            len,
        });
    }
    let dir = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("/"),
    };
    if !dir.is_dir() {
        return Err(ConfigError::UdsDirMissing {
            path: path.clone(),
            dir: dir.to_path_buf(),
        });
    }
    // Not followed: a dangling symlink is in the way too.
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(ConfigError::UdsPathExists { path: path.clone() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ConfigError::UdsPathUnusable {
            path: path.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parse, pt_base, TempDir};
    use super::*;
    use crate::test_support::FakeSys;

    fn vsock(cid: u32, path: impl Into<PathBuf>) -> VsockConfig {
        VsockConfig {
            guest_cid: cid,
            uds_path: path.into(),
        }
    }

    #[test]
    fn cid_must_be_a_guest_address() {
        let dir = TempDir::new("vsock-cid");
        let p = dir.path().join("v.sock");
        for bad in [0, 1, 2, u32::MAX] {
            let err = validate(&vsock(bad, &p)).unwrap_err();
            assert!(matches!(err, ConfigError::BadCid { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(&bad.to_string()), "{err}");
        }
        assert!(validate(&vsock(3, &p)).is_ok());
        assert!(validate(&vsock(u32::MAX - 1, &p)).is_ok());
    }

    #[test]
    fn socket_path_must_be_new_in_an_existing_directory() {
        let dir = TempDir::new("vsock-path");
        let stale = dir.file("stale.sock", b"");
        let err = validate(&vsock(3, &stale)).unwrap_err();
        assert!(matches!(err, ConfigError::UdsPathExists { .. }), "{err}");
        assert!(err.to_string().contains("stale.sock"), "{err}");
        let dangling = dir.path().join("dangling.sock");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let err = validate(&vsock(3, &dangling)).unwrap_err();
        assert!(matches!(err, ConfigError::UdsPathExists { .. }), "{err}");

        let err = validate(&vsock(3, dir.path().join("no/such/dir/v.sock"))).unwrap_err();
        assert!(matches!(err, ConfigError::UdsDirMissing { .. }), "{err}");
        assert!(err.to_string().contains("no/such/dir"), "{err}");
        let err = validate(&vsock(3, "")).unwrap_err();
        assert!(matches!(err, ConfigError::UdsPathEmpty), "{err}");
        let long = dir.path().join("x".repeat(MAX_UDS_PATH_LEN));
        let err = validate(&vsock(3, long)).unwrap_err();
        assert!(matches!(err, ConfigError::UdsPathTooLong { .. }), "{err}");
        // A bare name is relative to the working directory, which exists.
        assert!(validate(&vsock(3, "aivmm-test-no-such-file.sock")).is_ok());
    }

    #[test]
    fn vsock_in_toml_and_through_validate() {
        let err = parse("[vsock]\nguest_cid = 3\n").unwrap_err();
        assert!(
            err.to_string().contains("missing field `uds_path`"),
            "{err}"
        );
        let err =
            parse("[vsock]\nguest_cid = 3\nuds_path = \"/x\"\nvsock_id = \"v\"\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `vsock_id`"),
            "{err}"
        );
        let err = parse("[vsock]\nguest_cid = -1\nuds_path = \"/x\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");

        let sys = FakeSys::new("vsock-validate", 0);
        let dir = TempDir::new("vsock-validate");
        let sock = dir.path().join("t1.vsock");
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32")
            + &format!(
                "[vsock]\nguest_cid = 3\nuds_path = \"{}\"\n",
                sock.display()
            );
        let v = parse(&text).unwrap().validate(&sys.host(), 64).unwrap();
        assert_eq!(v.vsock, Some(vsock(3, sock)));
        let text = text.replace("guest_cid = 3", "guest_cid = 2");
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::BadCid { cid: 2 }), "{err}");
    }
}
