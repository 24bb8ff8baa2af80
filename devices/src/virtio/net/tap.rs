//! The host side of a virtio-net device: a tap interface the host already created.
//!
//! aivmm never configures host networking (as Firecracker): the operator creates and
//! wires the tap, aivmm attaches to it by name. The tap is opened with virtio-net
//! headers (`IFF_VNET_HDR`, 12 bytes) so checksum and segmentation offloads pass
//! between the guest and the host kernel without being redone in the VMM.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::VNET_HDR_LEN;

const TUN_DEVICE: &str = "/dev/net/tun";

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("tap name {0:?} is invalid: it needs 1 to 15 bytes and no '/', NUL or whitespace")]
    InvalidName(String),
    /// Nothing by that name exists on the host.
    #[error("no network interface named {0:?} exists on the host: create the tap first")]
    NoSuchInterface(String),
    /// The process may not attach to the tap.
    #[error(
        "permission denied attaching to tap {name:?}: {source} (needs CAP_NET_ADMIN or the \
         tap's owner or group)"
    )]
    PermissionDenied {
        /// The interface.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_DEVICE}: {0}")]
    OpenTun(io::Error),
    /// The interface exists but is not a single-queue tap.
    #[error("interface {name:?} is not a single-queue tap: {source}")]
    NotATap {
        /// The interface.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// Another process holds the tap's only queue.
    #[error("tap {name:?} is already in use by another process: {source}")]
    Busy {
        /// The interface.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// TUNSETIFF failed for another reason.
    #[error("cannot attach to tap {name:?}: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the vnet header size of tap {name:?} to {VNET_HDR_LEN}: {source}")]
    VnetHeaderSize {
        /// The interface.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// TUNSETOFFLOAD failed.
    #[error("cannot set offloads {flags:#x} on tap {name:?}: {source}")]
    Offload {
        /// The interface.
        name: String,
        /// The TUN_F_* flags asked for.
        flags: u32,
        /// What the kernel said.
        source: io::Error,
    },
}

/// Where a virtio-net device's frames go to and come from: whole frames, each starting
/// with a 12-byte `virtio_net_hdr_v1`, one per call, never blocking.
///
/// [`Tap`] is the real one; tests use a `SOCK_SEQPACKET` socket pair, which keeps frame
/// boundaries the same way.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame; `WouldBlock` when the host cannot take it now.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;

    /// Tells the host which offloads (TUN_F_* flags) the guest can receive.
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// An attached tap interface, non-blocking, with 12-byte virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name`.
    ///
    /// The interface must already exist: TUNSETIFF on an unknown name would create a new
    /// tap, and aivmm does not set up host networking, so the name is looked up in the
    /// network namespace first.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let ifr_name = interface_name(name)?;
        // By index in this network namespace, not through /sys, which a jail lacks.
        if nix::net::if_::if_nametoindex(name).is_err() {
            return Err(TapError::NoSuchInterface(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // std adds O_CLOEXEC itself.
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(|source| match source.kind() {
                io::ErrorKind::PermissionDenied => TapError::PermissionDenied {
                    name: name.to_string(),
                    source,
                },
                _ => TapError::OpenTun(source),
            })?;

        // SAFETY: `ifreq` is plain old data (a name array and a union of integers and
        // byte arrays); all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        // The flags fit a c_short (0x4000 | 0x1000 | 0x0002).
        #[allow(clippy::cast_possible_truncation)]
        {
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        }
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which lives on this stack frame
        // for the whole call; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TapError::PermissionDenied { name, source }
                }
                Some(libc::EINVAL) => TapError::NotATap { name, source },
                Some(libc::EBUSY) => TapError::Busy { name, source },
                _ => TapError::Attach { name, source },
            });
        }

        let size = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which points to a
        // live local; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(TapError::VnetHeaderSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads (TUN_F_* flags) the tap may hand us, i.e. what the guest
    /// accepted; see [`super::tap_offload_flags`].
    pub fn set_offload_flags(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours;
        // the fd is ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.set_offload_flags(flags).map_err(|e| match e {
            TapError::Offload { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })
    }
}

/// `name` as an `ifr_name`, refusing what cannot be a plain interface name (it is also
/// joined to a /sys path, so no '/' and no "." or "..").
fn interface_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && bytes
            .iter()
            .all(|&b| b != b'/' && b != 0 && b != b':' && !b.is_ascii_whitespace());
    if !valid {
        return Err(TapError::InvalidName(name.to_string()));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, &src) in out.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_refuses_an_interface_that_does_not_exist() {
        let err = Tap::open("aivmm-nope0").unwrap_err();
        assert!(
            matches!(&err, TapError::NoSuchInterface(n) if n == "aivmm-nope0"),
            "{err}"
        );
        assert!(err.to_string().contains("aivmm-nope0"));
    }

    #[test]
    fn open_refuses_names_that_are_not_interface_names() {
        for bad in ["", "..", "a/b", "sixteen-bytes-xx", "a b", "x\0y"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
                "{bad:?} accepted"
            );
        }
        assert!(interface_name("tap0").is_ok());
        assert!(interface_name("fifteen-bytes-x").is_ok());
    }

    /// Needs root and `ip`: `cargo test -p devices -- --ignored real_tap`.
    #[test]
    #[ignore]
    fn real_tap_opens_with_vnet_headers_and_offloads() {
        let name = "aivmmtap-t0";
        let run = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        assert!(run(&["tuntap", "add", "dev", name, "mode", "tap"]));
        let result = std::panic::catch_unwind(|| {
            let tap = Tap::open(name).unwrap();
            tap.set_offload_flags(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            let mut tap = tap;
            let mut buf = [0u8; 128];
            // The link is down and nothing is queued: a read does not block.
            let err = tap.read_frame(&mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            // A second attach to a single-queue tap is refused.
            assert!(matches!(Tap::open(name), Err(TapError::Busy { .. })));
        });
        run(&["tuntap", "del", "dev", name, "mode", "tap"]);
        result.unwrap();
    }
}
