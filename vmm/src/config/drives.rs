//! `[[drives]]`: virtio-blk disks backed by raw image files (or block devices), one of which
//! may be the root device.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use devices::rate_limiter::RateLimiterConfig;
use serde::Deserialize;

use super::{check_id, ConfigError};

/// Longest serial number (virtio-blk `GET_ID`, `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

/// A virtio-blk disk. After validation the root drive comes first and `serial` is set.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique among drives; 1-64 characters of `[A-Za-z0-9_-]`. Names the device's thread.
    pub id: String,
    /// Raw disk image (a regular file or a block device).
    pub path: PathBuf,
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`); the image is then opened read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The guest's root device: attached first, so it is `/dev/vda`, and `root=/dev/vda`
    /// goes on the kernel command line. At most one.
    #[serde(default)]
    pub root: bool,
    /// What `GET_ID` answers: at most 20 printable ASCII characters. Default: the id,
    /// truncated to 20.
    #[serde(default)]
    pub serial: Option<String>,
    /// Bandwidth (bytes) and operations limits, Firecracker's token buckets.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Checks every drive and the set of them; returns them root drive first, then in config
/// order, each with its serial filled in.
pub(super) fn validate(drives: &[DriveConfig]) -> Result<Vec<DriveConfig>, ConfigError> {
    let mut ids = HashSet::new();
    let mut root: Option<&str> = None;
    for d in drives {
        check_id("drive", &d.id)?;
        if !ids.insert(d.id.as_str()) {
            return Err(ConfigError::DuplicateId {
                what: "drive",
                id: d.id.clone(),
            });
        }
        if d.root {
            if let Some(first) = root {
                return Err(ConfigError::TwoRootDrives {
                    first: first.to_string(),
                    second: d.id.clone(),
                });
            }
            root = Some(&d.id);
        }
        if let Some(serial) = &d.serial {
            let printable = serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
            if serial.len() > MAX_SERIAL_LEN || !printable {
                return Err(ConfigError::BadSerial {
                    id: d.id.clone(),
                    serial: serial.clone(),
                });
            }
        }
        if let Some(rl) = &d.rate_limiter {
            rl.validate().map_err(|source| ConfigError::RateLimiter {
                device: format!("drive '{}'", d.id),
                field: "rate_limiter",
                source,
            })?;
        }
        check_image(d)?;
    }
    let ordered = drives
        .iter()
        .filter(|d| d.root)
        .chain(drives.iter().filter(|d| !d.root));
    Ok(ordered
        .map(|d| DriveConfig {
            serial: Some(d.serial.clone().unwrap_or_else(|| default_serial(&d.id))),
            ..d.clone()
        })
        .collect())
}

/// The id, cut to the serial's length (ids are ASCII, so any cut is a character boundary).
fn default_serial(id: &str) -> String {
    id.chars().take(MAX_SERIAL_LEN).collect()
}

/// The image exists, is a file or block device, opens for reading, and for writing unless
/// the drive is read-only. A file without write permission counts as read-only even for
/// root, who could open it anyway: the operator meant it not to change.
fn check_image(d: &DriveConfig) -> Result<(), ConfigError> {
    let unreadable = |source| ConfigError::DriveUnreadable {
        id: d.id.clone(),
        path: d.path.clone(),
        source,
    };
    let meta = std::fs::metadata(&d.path).map_err(unreadable)?;
    let kind = meta.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(unreadable(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    }
    std::fs::File::open(&d.path).map(drop).map_err(unreadable)?;
    if d.read_only {
        return Ok(());
    }
    if meta.permissions().readonly() {
        return Err(ConfigError::DriveReadOnly {
            id: d.id.clone(),
            path: d.path.clone(),
            reason: "the file has no write permission".into(),
        });
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d.path)
        .map(drop)
        .map_err(|e| open_rw_error(d, e))
}

/// Names a failed read-write open: a read-only mount or a permission is a read-only image.
fn open_rw_error(d: &DriveConfig, e: io::Error) -> ConfigError {
    let reason = match e.raw_os_error() {
        Some(libc::EROFS) => "it is on a read-only file system",
        Some(libc::EACCES | libc::EPERM) => "this process may not write it",
        _ => {
            return ConfigError::DriveUnwritable {
                id: d.id.clone(),
                path: d.path.clone(),
                source: e,
            }
        }
    };
    ConfigError::DriveReadOnly {
        id: d.id.clone(),
        path: d.path.clone(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::super::testing::{parse, pt_base, TempDir};
    use super::*;
    use crate::test_support::FakeSys;

    fn drive(id: &str, path: &Path) -> DriveConfig {
        DriveConfig {
            id: id.into(),
            path: path.to_path_buf(),
            read_only: false,
            root: false,
            serial: None,
            rate_limiter: None,
        }
    }

    #[test]
    fn toml_drive_defaults_and_unknown_fields() {
        let cfg = parse("[[drives]]\nid = \"data\"\npath = \"d.img\"\n").unwrap();
        assert_eq!(cfg.drives, vec![drive("data", Path::new("d.img"))]);
        let err = parse("[[drives]]\nid = \"d\"\npath = \"d.img\"\nreadonly = true\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `readonly`"),
            "{err}"
        );
        let err = parse("[[drives]]\nid = \"d\"\n").unwrap_err();
        assert!(err.to_string().contains("missing field `path`"), "{err}");
    }

    #[test]
    fn root_drive_goes_first_and_serials_default_to_the_id() {
        let dir = TempDir::new("drives-order");
        let a = dir.file("a.img", b"a");
        let b = dir.file("b.img", b"b");
        let c = dir.file("c.img", b"c");
        let mut root = drive("rootfs", &b);
        root.root = true;
        let mut named = drive("data-with-a-very-long-name", &c);
        named.serial = Some("SN 0001".into());
        let v = validate(&[drive("scratch", &a), root, named.clone()]).unwrap();
        let ids: Vec<&str> = v.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["rootfs", "scratch", "data-with-a-very-long-name"]);
        assert_eq!(v[0].serial.as_deref(), Some("rootfs"));
        assert_eq!(v[2].serial.as_deref(), Some("SN 0001"));
        let v = validate(&[drive("data-with-a-very-long-name", &c)]).unwrap();
        assert_eq!(v[0].serial.as_deref(), Some("data-with-a-very-lon"));
    }

    #[test]
    fn ids_must_be_valid_and_unique_and_one_root_at_most() {
        let dir = TempDir::new("drives-ids");
        let a = dir.file("a.img", b"a");
        for bad in ["", "has space", "a/b", "é", &"x".repeat(65)] {
            let err = validate(&[drive(bad, &a)]).unwrap_err();
            assert!(
                matches!(err, ConfigError::BadId { what: "drive", .. }),
                "{bad}: {err}"
            );
        }
        assert!(validate(&[drive(&"x".repeat(64), &a)]).is_ok());
        let err = validate(&[drive("d", &a), drive("d", &a)]).unwrap_err();
        assert_eq!(err.to_string(), "drive id 'd' is used twice");
        let mut r1 = drive("r1", &a);
        r1.root = true;
        let mut r2 = drive("r2", &a);
        r2.root = true;
        let err = validate(&[r1, r2]).unwrap_err();
        assert!(matches!(err, ConfigError::TwoRootDrives { .. }), "{err}");
        assert!(err.to_string().contains("'r1' and 'r2'"), "{err}");
    }

    #[test]
    fn serials_are_short_printable_ascii() {
        let dir = TempDir::new("drives-serial");
        let a = dir.file("a.img", b"a");
        for bad in ["x".repeat(21), "tab\there".into(), "sérial".into()] {
            let mut d = drive("d", &a);
            d.serial = Some(bad.clone());
            let err = validate(&[d]).unwrap_err();
            assert!(matches!(err, ConfigError::BadSerial { .. }), "{bad}: {err}");
        }
        let mut d = drive("d", &a);
        d.serial = Some("x".repeat(20));
        assert!(validate(&[d]).is_ok());
    }

    #[test]
    fn missing_or_odd_images_are_unreadable() {
        let dir = TempDir::new("drives-missing");
        let err = validate(&[drive("d", &dir.path().join("nope.img"))]).unwrap_err();
        assert!(matches!(err, ConfigError::DriveUnreadable { .. }), "{err}");
        assert!(err.to_string().contains("nope.img"), "{err}");
        let err = validate(&[drive("d", dir.path())]).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a regular file or block device"),
            "{err}"
        );
    }

    #[test]
    fn a_read_only_image_needs_read_only() {
        let dir = TempDir::new("drives-ro");
        let img = dir.file("ro.img", b"ro");
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = validate(&[drive("d", &img)]).unwrap_err();
        assert!(matches!(err, ConfigError::DriveReadOnly { .. }), "{err}");
        assert!(
            err.to_string().contains("read_only = true") && err.to_string().contains("ro.img"),
            "{err}"
        );
        let mut ro = drive("d", &img);
        ro.read_only = true;
        assert!(validate(&[ro]).is_ok());
        // What a read-only mount or a missing permission looks like when opening.
        let d = drive("d", &img);
        for errno in [libc::EROFS, libc::EACCES] {
            let err = open_rw_error(&d, io::Error::from_raw_os_error(errno));
            assert!(matches!(err, ConfigError::DriveReadOnly { .. }), "{err}");
        }
        let err = open_rw_error(&d, io::Error::from_raw_os_error(libc::ETXTBSY));
        assert!(matches!(err, ConfigError::DriveUnwritable { .. }), "{err}");
    }

    #[test]
    fn rate_limiters_are_parsed_and_checked() {
        let dir = TempDir::new("drives-rl");
        let img = dir.file("a.img", b"a");
        let text = format!(
            "[[drives]]\nid = \"d\"\npath = \"{}\"\n\
             rate_limiter = {{ bandwidth = {{ size = 1048576, refill_time = 1000 }} }}\n",
            img.display()
        );
        let cfg = parse(&text).unwrap();
        let rl = cfg.drives[0].rate_limiter.unwrap();
        assert_eq!(
            rl.bandwidth.map(|b| (b.size, b.one_time_burst)),
            Some((1 << 20, 0))
        );
        assert!(rl.ops.is_none());
        assert!(validate(&cfg.drives).is_ok());

        let bad = parse(&text.replace("refill_time = 1000", "refill_time = 0")).unwrap();
        let err = validate(&bad.drives).unwrap_err();
        assert!(matches!(err, ConfigError::RateLimiter { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("drive 'd' rate_limiter is invalid: "),
            "{err}"
        );
        let err = parse(&text.replace("refill_time = 1000", "refill_time = 1000, burst = 1"))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `burst`"), "{err}");
    }

    #[test]
    fn drives_go_through_validate_root_first() {
        let sys = FakeSys::new("drives-validate", 0);
        let dir = TempDir::new("drives-validate");
        let data = dir.file("data.img", b"d");
        let root = dir.file("root.img", b"r");
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32")
            + &format!(
                "[[drives]]\nid = \"data\"\npath = \"{}\"\n\
                 [[drives]]\nid = \"rootfs\"\npath = \"{}\"\nroot = true\nread_only = true\n",
                data.display(),
                root.display()
            );
        let v = parse(&text).unwrap().validate(&sys.host(), 64).unwrap();
        assert_eq!(v.drives.len(), 2);
        assert_eq!(
            (v.drives[0].id.as_str(), v.drives[0].root),
            ("rootfs", true)
        );
        assert_eq!(v.drives[1].id, "data");
        assert!(v.cmdline.ends_with("root=/dev/vda ro"), "{}", v.cmdline);
    }
}
