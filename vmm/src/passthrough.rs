//! Host PCI devices passed through to the guest with VFIO: which device a `[[passthrough]]`
//! entry names, and the host checks that must pass before anything is allocated.
//!
//! A device can be passed when it exists, is bound to `vfio-pci`, and every other device of
//! its IOMMU group is passed too or cannot interfere (no driver, `vfio-pci`, `pci-stub`, or a
//! bridge — the kernel's own viability rule), and nobody else holds the group open. VFIO pins
//! all guest RAM for DMA, so RLIMIT_MEMLOCK must cover it unless the process has
//! CAP_IPC_LOCK. The device's NUMA node (sysfs `numa_node`) is the default placement of the
//! tenant's memory and vCPUs ([`crate::placement`]): the accelerator's DMA and the guest's CPU
//! work stay local.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use crate::host::MemlockLimit;
use crate::host::SysfsHost;

/// Drivers a non-passed device of the group may be bound to (besides none): those the
/// kernel's VFIO group viability check accepts.
const HARMLESS_DRIVERS: [&str; 2] = ["vfio-pci", "pci-stub"];
/// The driver a passed device must be bound to.
const VFIO_PCI_DRIVER: &str = "vfio-pci";
/// Offset of the header type byte in PCI config space; bits 6:0 are the layout (0 for an
/// endpoint, 1 for a PCI-to-PCI bridge, 2 for CardBus).
const HEADER_TYPE_OFFSET: usize = 0x0e;

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("passthrough device '{value}' is neither a PCI address (DDDD:BB:DD.F) nor a sysfs PCI device path: {reason}")]
    BadAddress { value: String, reason: String },
    #[error("passthrough device {addr} does not exist on this host ({path} is missing)")]
    NoSuchDevice { addr: PciAddress, path: PathBuf },
    #[error("passthrough device {addr} is listed twice")]
    Duplicate { addr: PciAddress },
    #[error(
        "passthrough device {addr} is {bound} but must be bound to vfio-pci: \
         echo vfio-pci > {dir}/driver_override, unbind it from its driver, \
         then echo {addr} > /sys/bus/pci/drivers_probe"
    )]
    NotVfio {
        addr: PciAddress,
        bound: String,
        dir: PathBuf,
    },
    #[error("passthrough device {addr} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) and load vfio-pci")]
    NoIommuGroup { addr: PciAddress },
    #[error(
        "IOMMU group {group} of passthrough device {addr} also holds {other}, bound to {driver}: \
         pass it through too, or unbind it from {driver}"
    )]
    GroupMemberBound {
        addr: PciAddress,
        group: u32,
        other: PciAddress,
        driver: String,
    },
    #[error("IOMMU group {group} of passthrough device {addr} is in use by another process ({path} is busy)")]
    GroupInUse {
        addr: PciAddress,
        group: u32,
        path: PathBuf,
    },
    #[error("cannot open IOMMU group {group} of passthrough device {addr} at {path}: {source}")]
    GroupOpen {
        addr: PciAddress,
        group: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "passthrough pins {needed_mib} MiB of guest memory but RLIMIT_MEMLOCK allows {hard}: \
         raise the hard limit (ulimit -l, systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK"
    )]
    Memlock { needed_mib: u64, hard: String },
    #[error("cannot raise RLIMIT_MEMLOCK to {bytes} bytes: {source}")]
    RaiseMemlock { bytes: u64, source: io::Error },
}

/// A PCI function's address on the host: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = String;

    /// Parses `DDDD:BB:DD.F` (sysfs form) or `BB:DD.F` (domain 0), hexadecimal.
    fn from_str(s: &str) -> Result<Self, String> {
        let (head, function) = s
            .rsplit_once('.')
            .ok_or_else(|| "no '.function' part".to_string())?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [b, dev] => ("0", *b, *dev),
            _ => return Err("expected DDDD:BB:DD.F".into()),
        };
        let hex = |what: &str, v: &str, digits: usize| {
            if v.is_empty() || v.len() > digits || !v.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!(
                    "{what} '{v}' is not a hex number of 1 to {digits} digits"
                ));
            }
            u32::from_str_radix(v, 16).map_err(|e| format!("{what} '{v}': {e}"))
        };
        // At most two hex digits: always fits.
        let byte = |what: &str, v: &str, digits: usize| {
            u8::try_from(hex(what, v, digits)?).map_err(|_| format!("{what} '{v}' is above 0xff"))
        };
        let domain = hex("domain", domain, 8)?;
        let bus = byte("bus", bus, 2)?;
        let device = byte("device", device, 2)?;
        if device > 0x1f {
            return Err(format!("device {device:#x} is above 0x1f"));
        }
        let function = byte("function", function, 1)?;
        if function > 7 {
            return Err(format!("function {function} is above 7"));
        }
        Ok(PciAddress {
            domain,
            bus,
            device,
            function,
        })
    }
}

/// A host PCI function as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDeviceFacts {
    /// Name of the bound driver, `None` when unbound.
    pub driver: Option<String>,
    /// IOMMU group number, `None` when the device has none (no IOMMU).
    pub iommu_group: Option<u32>,
    /// NUMA node, `None` when sysfs says -1 (no affinity) or has no `numa_node`.
    pub numa_node: Option<u32>,
    /// A bridge (type-1 or CardBus header) rather than an endpoint.
    pub bridge: bool,
}

/// What the passthrough checks need from the host; [`SysfsHost`] reads the real one.
pub trait PciHost {
    /// The sysfs directory of `addr` (whether or not it exists).
    fn device_dir(&self, addr: &PciAddress) -> PathBuf;
    /// Facts about `addr`, `None` when the host has no such device.
    fn device(&self, addr: &PciAddress) -> Option<PciDeviceFacts>;
    /// The devices of IOMMU group `group`.
    fn group_devices(&self, group: u32) -> Vec<PciAddress>;
    /// The VFIO group file of `group` (`/dev/vfio/N`).
    fn group_file(&self, group: u32) -> PathBuf;
    /// Opens and closes the VFIO group file: fails with EBUSY while another process has it.
    fn probe_group(&self, group: u32) -> io::Result<()>;
    /// This process's memory lock limits.
    fn memlock(&self) -> MemlockLimit;
}

impl SysfsHost {
    fn pci_dir(&self) -> PathBuf {
        self.root().join("bus/pci/devices")
    }
}

/// The last component of a symlink's target, e.g. the driver name of `driver`.
fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

impl PciHost for SysfsHost {
    fn device_dir(&self, addr: &PciAddress) -> PathBuf {
        self.pci_dir().join(addr.to_string())
    }

    fn device(&self, addr: &PciAddress) -> Option<PciDeviceFacts> {
        let dir = self.device_dir(addr);
        if !dir.is_dir() {
            return None;
        }
        let numa_node = std::fs::read_to_string(dir.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        // Unprivileged readers see the first 64 bytes of `config`, enough for the header type.
        let bridge = std::fs::read(dir.join("config"))
            .ok()
            .and_then(|c| c.get(HEADER_TYPE_OFFSET).copied())
            .is_some_and(|h| h & 0x7f != 0);
        Some(PciDeviceFacts {
            driver: link_name(&dir.join("driver")),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
            numa_node,
            bridge,
        })
    }

    fn group_devices(&self, group: u32) -> Vec<PciAddress> {
        let dir = self
            .root()
            .join(format!("kernel/iommu_groups/{group}/devices"));
        let mut devices: Vec<PciAddress> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        devices.sort_unstable();
        devices
    }

    fn group_file(&self, group: u32) -> PathBuf {
        self.dev_root().join(format!("vfio/{group}"))
    }

    fn probe_group(&self, group: u32) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.group_file(group))
            .map(drop)
    }

    fn memlock(&self) -> MemlockLimit {
        self.memlock_override()
            .unwrap_or_else(MemlockLimit::current)
    }
}

/// A device that passed the checks: everything the VMM needs to open it with VFIO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassthroughDevice {
    pub addr: PciAddress,
    /// Its sysfs directory, which VFIO opens the device by.
    pub sysfs_path: PathBuf,
    pub iommu_group: u32,
    pub numa_node: Option<u32>,
    /// Map BARs into the guest (else every BAR access traps).
    pub mmap: bool,
}

/// Turns a config value (a PCI address or a sysfs device path) into an address.
pub fn parse_device(value: &str) -> Result<PciAddress, PassthroughError> {
    let bad = |reason: String| PassthroughError::BadAddress {
        value: value.to_string(),
        reason,
    };
    if value.contains('/') {
        // A sysfs path: /sys/bus/pci/devices/<addr> or the /sys/devices/... directory it
        // links to; either way the last component is the address.
        let name = Path::new(value.trim_end_matches('/'))
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("the path has no final component".into()))?;
        return name
            .parse()
            .map_err(|e| bad(format!("its last component: {e}")));
    }
    value.parse().map_err(bad)
}

/// One device the config asks for: the `device` value of a `[[passthrough]]` entry and
/// whether to map its BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRequest<'a> {
    pub device: &'a str,
    pub mmap: bool,
}

/// Checks every requested device on the host, in order; the first failure is the error.
pub fn resolve(
    entries: &[DeviceRequest<'_>],
    host: &dyn PciHost,
) -> Result<Vec<PassthroughDevice>, PassthroughError> {
    let addrs = entries
        .iter()
        .map(|e| parse_device(e.device))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, addr) in addrs.iter().enumerate() {
        if addrs[..i].contains(addr) {
            return Err(PassthroughError::Duplicate { addr: *addr });
        }
    }
    let mut out: Vec<PassthroughDevice> = Vec::with_capacity(addrs.len());
    for (addr, entry) in addrs.iter().zip(entries) {
        let dir = host.device_dir(addr);
        let facts = host
            .device(addr)
            .ok_or_else(|| PassthroughError::NoSuchDevice {
                addr: *addr,
                path: dir.clone(),
            })?;
        if facts.driver.as_deref() != Some(VFIO_PCI_DRIVER) {
            return Err(PassthroughError::NotVfio {
                addr: *addr,
                bound: match &facts.driver {
                    Some(d) => format!("bound to {d}"),
                    None => "not bound to any driver".into(),
                },
                dir,
            });
        }
        let group = facts
            .iommu_group
            .ok_or(PassthroughError::NoIommuGroup { addr: *addr })?;
        check_group(*addr, group, &addrs, host)?;
        out.push(PassthroughDevice {
            addr: *addr,
            sysfs_path: dir,
            iommu_group: group,
            numa_node: facts.numa_node,
            mmap: entry.mmap,
        });
    }
    Ok(out)
}

/// The group rule: every member is passed, harmless (no driver, vfio-pci, pci-stub) or a
/// bridge; and no other process has the group open.
fn check_group(
    addr: PciAddress,
    group: u32,
    passed: &[PciAddress],
    host: &dyn PciHost,
) -> Result<(), PassthroughError> {
    for other in host.group_devices(group) {
        if passed.contains(&other) {
            continue;
        }
        let Some(facts) = host.device(&other) else {
            continue;
        };
        match facts.driver {
            Some(driver) if !facts.bridge && !HARMLESS_DRIVERS.contains(&driver.as_str()) => {
                return Err(PassthroughError::GroupMemberBound {
                    addr,
                    group,
                    other,
                    driver,
                });
            }
            _ => {}
        }
    }
    host.probe_group(group)
        .map_err(|e| group_open_error(addr, group, host.group_file(group), e))
}

fn group_open_error(addr: PciAddress, group: u32, path: PathBuf, e: io::Error) -> PassthroughError {
    if e.raw_os_error() == Some(libc::EBUSY) {
        PassthroughError::GroupInUse { addr, group, path }
    } else {
        PassthroughError::GroupOpen {
            addr,
            group,
            path,
            source: e,
        }
    }
}

/// Whether `needed` bytes can be locked: `Ok(None)` already fine, `Ok(Some(n))` after
/// raising the soft limit to `n` (see [`raise_memlock`]), or the error.
pub fn check_memlock(needed: u64, limit: MemlockLimit) -> Result<Option<u64>, PassthroughError> {
    if limit.ipc_lock || limit.soft >= needed {
        return Ok(None);
    }
    if limit.hard >= needed {
        return Ok(Some(needed));
    }
    Err(PassthroughError::Memlock {
        needed_mib: needed.div_ceil(1 << 20),
        hard: if limit.hard == u64::MAX {
            "unlimited".into()
        } else {
            format!("{} KiB", limit.hard >> 10)
        },
    })
}

/// Raises the soft RLIMIT_MEMLOCK of this process to `bytes` (below the hard limit).
pub fn raise_memlock(bytes: u64) -> Result<(), PassthroughError> {
    let limit = MemlockLimit::current();
    let rl = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: if limit.hard == u64::MAX {
            libc::RLIM_INFINITY
        } else {
            limit.hard
        },
    };
    // SAFETY: setrlimit reads the struct we pass and changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        return Err(PassthroughError::RaiseMemlock {
            bytes,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::FakeSys;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    /// Requests for `devices`, BARs mapped.
    fn entries<'a>(devices: &[&'a str]) -> Vec<DeviceRequest<'a>> {
        devices
            .iter()
            .map(|d| DeviceRequest {
                device: d,
                mmap: true,
            })
            .collect()
    }

    #[test]
    fn pci_addresses_parse_and_print_in_sysfs_form() {
        assert_eq!(addr("0000:81:00.0").to_string(), "0000:81:00.0");
        assert_eq!(addr("81:1f.7").to_string(), "0000:81:1f.7");
        assert_eq!(addr("10000:00:02.1").domain, 0x10000);
        for bad in [
            "",
            "81:00",
            "81:00.8",
            "81:20.0",
            "zz:00.0",
            "1:2:3:4.0",
            "81:00.",
            "811:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn sysfs_paths_name_their_device() {
        assert_eq!(
            parse_device("/sys/bus/pci/devices/0000:81:00.0/").unwrap(),
            addr("0000:81:00.0")
        );
        assert_eq!(
            parse_device("/sys/devices/pci0000:80/0000:80:00.0/0000:81:00.0").unwrap(),
            addr("0000:81:00.0")
        );
        let msg = parse_device("/sys/bus/pci/devices/eth0")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("'/sys/bus/pci/devices/eth0'"), "{msg}");
    }

    #[test]
    fn a_vfio_bound_device_alone_in_its_group_resolves() {
        let sys = FakeSys::new("pt-ok", 0);
        sys.pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        let host = sys.host();
        let devs = resolve(&entries(&["0000:81:00.0"]), &host).unwrap();
        assert_eq!(
            devs,
            vec![PassthroughDevice {
                addr: addr("0000:81:00.0"),
                sysfs_path: sys.root().join("bus/pci/devices/0000:81:00.0"),
                iommu_group: 7,
                numa_node: Some(1),
                mmap: true,
            }]
        );
    }

    #[test]
    fn each_host_problem_is_its_own_error() {
        let sys = FakeSys::new("pt-errors", 0);
        sys.pci_device("0000:81:00.0", Some("edu"), Some(7), 1, false);
        sys.pci_device("0000:82:00.0", None, Some(8), 0, false);
        sys.pci_device("0000:83:00.0", Some("vfio-pci"), None, 0, false);
        let host = sys.host();
        let err = |dev: &str| resolve(&entries(&[dev]), &host).unwrap_err();

        let e = err("0000:99:00.0");
        assert!(matches!(e, PassthroughError::NoSuchDevice { .. }), "{e}");
        assert!(e.to_string().contains("0000:99:00.0 does not exist"), "{e}");
        let e = err("0000:81:00.0");
        assert!(
            e.to_string()
                .contains("is bound to edu but must be bound to vfio-pci"),
            "{e}"
        );
        let e = err("0000:82:00.0");
        assert!(e.to_string().contains("not bound to any driver"), "{e}");
        let e = err("0000:83:00.0");
        assert!(matches!(e, PassthroughError::NoIommuGroup { .. }), "{e}");
        let e = resolve(&entries(&["81:00.0", "0000:81:00.0"]), &host).unwrap_err();
        assert!(matches!(e, PassthroughError::Duplicate { .. }), "{e}");
        let e = err("not-a-device");
        assert!(matches!(e, PassthroughError::BadAddress { .. }), "{e}");
    }

    #[test]
    fn group_members_must_be_passed_harmless_or_bridges() {
        let sys = FakeSys::new("pt-group", 0);
        sys.pci_device("0000:01:00.0", Some("vfio-pci"), Some(3), 0, false);
        // The GPU's audio function, still bound to its host driver.
        sys.pci_device("0000:01:00.1", Some("snd_hda_intel"), Some(3), 0, false);
        let host = sys.host();
        let e = resolve(&entries(&["0000:01:00.0"]), &host).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("also holds 0000:01:00.1, bound to snd_hda_intel"),
            "{msg}"
        );
        // Passing both is fine.
        let both = resolve(&entries(&["0000:01:00.0", "0000:01:00.1"]), &host);
        assert!(
            matches!(both, Err(PassthroughError::NotVfio { .. })),
            "the audio function itself must be on vfio-pci"
        );
        sys.pci_device("0000:01:00.1", Some("vfio-pci"), Some(3), 0, false);
        assert_eq!(
            resolve(&entries(&["0000:01:00.0", "0000:01:00.1"]), &host)
                .unwrap()
                .len(),
            2
        );
        // Unbound, pci-stub, vfio-pci and bridge members do not block.
        sys.pci_device("0000:01:00.1", None, Some(3), 0, false);
        sys.pci_device("0000:01:00.2", Some("pci-stub"), Some(3), 0, false);
        sys.pci_device("0000:00:01.0", Some("pcieport"), Some(3), 0, true);
        assert!(resolve(&entries(&["0000:01:00.0"]), &host).is_ok());
    }

    #[test]
    fn a_group_held_by_another_process_is_reported_as_in_use() {
        let sys = FakeSys::new("pt-busy", 0);
        sys.pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        let host = sys.host();
        std::fs::remove_file(sys.root().join("dev/vfio/7")).unwrap();
        let e = resolve(&entries(&["0000:81:00.0"]), &host).unwrap_err();
        assert!(
            matches!(&e, PassthroughError::GroupOpen { group: 7, .. }),
            "{e}"
        );
        let busy = group_open_error(
            addr("0000:81:00.0"),
            7,
            "/dev/vfio/7".into(),
            io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert_eq!(
            busy.to_string(),
            "IOMMU group 7 of passthrough device 0000:81:00.0 is in use by another process \
             (/dev/vfio/7 is busy)"
        );
    }

    #[test]
    fn memlock_is_checked_against_soft_hard_and_capability() {
        let lim = |soft, hard, ipc_lock| MemlockLimit {
            soft,
            hard,
            ipc_lock,
        };
        assert_eq!(check_memlock(100, lim(100, 100, false)).unwrap(), None);
        assert_eq!(check_memlock(100, lim(0, 0, true)).unwrap(), None);
        assert_eq!(check_memlock(100, lim(64, 200, false)).unwrap(), Some(100));
        let msg = check_memlock(3 << 20, lim(64 << 10, 64 << 10, false))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("pins 3 MiB") && msg.contains("allows 64 KiB"),
            "{msg}"
        );
    }
}
