//! The host and guest set-up rig-io does besides sockets: a persistent tap for aivmm's
//! virtio-net, and random O_DIRECT reads of a disk.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Failures of tap creation and disk reads.
#[derive(Debug)]
pub enum SysError {
    /// An interface name the kernel would refuse or change.
    BadTapName { name: String },
    /// A block size that O_DIRECT cannot use.
    BadBlockSize { bs: usize },
    /// A device or file too small for one block.
    TooSmall { path: PathBuf, size: u64, bs: usize },
    /// A system call failed.
    Io { what: String, source: io::Error },
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SysError::BadTapName { name } => write!(
                f,
                "tap name {name:?} must be 1 to 15 characters of [A-Za-z0-9_.-] and not start with '.' or '-'"
            ),
            SysError::BadBlockSize { bs } => {
                write!(f, "block size {bs} must be a multiple of 512 from 512 to 1048576")
            }
            SysError::TooSmall { path, size, bs } => {
                write!(f, "{} has {size} bytes, less than one {bs}-byte block", path.display())
            }
            SysError::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for SysError {}

fn io_err(what: impl Into<String>, source: io::Error) -> SysError {
    SysError::Io {
        what: what.into(),
        source,
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a short) at the start of
/// the 24-byte union. 40 bytes, like the kernel's.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks a tap name: what the kernel accepts as an interface name, without '%' (which
/// would ask the kernel to pick a number) or characters a shell or `ip` would trip on.
pub fn check_tap_name(name: &str) -> Result<[u8; libc::IFNAMSIZ], SysError> {
    let bad = || SysError::BadTapName {
        name: name.to_string(),
    };
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ || b[0] == b'.' || b[0] == b'-' {
        return Err(bad());
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(bad());
    }
    let mut out = [0u8; libc::IFNAMSIZ];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

/// Creates the persistent tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the flags aivmm
/// opens it with), owned by root. An existing tap of that name is reused. Needs
/// CAP_NET_ADMIN and /dev/net/tun (the tun module).
pub fn make_tap(name: &str) -> Result<(), SysError> {
    let ifname = check_tap_name(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io_err("open /dev/net/tun (is the tun module loaded?)", e))?;
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let mut req = IfReqFlags {
        name: ifname,
        // The three flags are below 0x8000: they fit a short.
        flags: libc::c_short::try_from(flags).unwrap_or_default(),
        _pad: [0; 22],
    };
    // SAFETY: TUNSETIFF reads and writes one struct ifreq; `req` has its size and layout and
    // lives across the call.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF,
            std::ptr::from_mut(&mut req),
        )
    } < 0
    {
        return Err(io_err(
            format!("TUNSETIFF {name}"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNSETPERSIST takes its argument by value and touches no memory.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io_err(
            format!("TUNSETPERSIST {name}"),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The result of a random-read run.
#[derive(Debug)]
pub struct RandRead {
    pub count: u64,
    pub bs: usize,
    pub secs: f64,
    /// Per-read latencies, microseconds, sorted.
    pub samples_us: Vec<u64>,
}

impl RandRead {
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.count as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// `count` reads of `bs` bytes at block-aligned offsets spread over all of `path` by a
/// xorshift sequence, with O_DIRECT (no page cache: each read reaches the device).
pub fn random_reads(path: &Path, count: u64, bs: usize) -> Result<RandRead, SysError> {
    if !(512..=1 << 20).contains(&bs) || !bs.is_multiple_of(512) {
        return Err(SysError::BadBlockSize { bs });
    }
    let mut f: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_err(format!("open {} with O_DIRECT", path.display()), e))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| io_err(format!("size of {}", path.display()), e))?;
    let blocks = size / bs as u64;
    if blocks == 0 {
        return Err(SysError::TooSmall {
            path: path.to_path_buf(),
            size,
            bs,
        });
    }
    // O_DIRECT wants a buffer aligned to the logical block size: 4 KiB covers every disk.
    let mut raw = vec![0u8; bs + 4096];
    let off = raw.as_ptr().align_offset(4096).min(4096);
    let buf = &mut raw[off..off + bs];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let start = Instant::now();
    for i in 0..count {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let pos = (state % blocks) * bs as u64;
        let t = Instant::now();
        let n = f
            .read_at(buf, pos)
            .map_err(|e| io_err(format!("read {} at {pos} (read {i})", path.display()), e))?;
        if n != bs {
            return Err(io_err(
                format!("read {} at {pos}", path.display()),
                io::Error::new(io::ErrorKind::UnexpectedEof, format!("{n} of {bs} bytes")),
            ));
        }
        samples.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_unstable();
    Ok(RandRead {
        count,
        bs,
        secs,
        samples_us: samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        assert!(check_tap_name("aivmm-tap0").is_ok());
        assert!(check_tap_name("tap_1.2").is_ok());
        assert_eq!(&check_tap_name("t0").unwrap()[..3], b"t0\0");
        for bad in [
            "",
            "0123456789abcdef",
            "tap%d",
            "a/b",
            "a b",
            "-tap",
            ".tap",
            "tap\n",
            "täp",
        ] {
            assert!(check_tap_name(bad).is_err(), "accepted {bad:?}");
        }
        assert!(
            check_tap_name("0123456789abcde").is_ok(),
            "15 characters fit"
        );
    }

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }

    #[test]
    fn random_reads_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
        let direct = match random_reads(&img, 100, 4096) {
            Ok(r) => {
                assert_eq!(r.samples_us.len(), 100);
                assert!(r.iops() > 0.0);
                true
            }
            // tmpfs has no O_DIRECT: nothing to measure there.
            Err(SysError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                false
            }
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(
            random_reads(&img, 1, 1000),
            Err(SysError::BadBlockSize { bs: 1000 })
        ));
        if direct {
            std::fs::write(&img, b"tiny").unwrap();
            assert!(matches!(
                random_reads(&img, 1, 4096),
                Err(SysError::TooSmall { .. })
            ));
        }
    }
}
