//! A PCI function seen through `/sys/bus/pci/devices/<BDF>`: finding it by id,
//! taking it from a kernel driver, enabling memory decode and bus mastering, and
//! mapping its BARs.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::mmio::{MmioBar, MmioError};

/// Where the kernel lists PCI functions.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Offset of the PCI command register.
const COMMAND_OFFSET: u64 = 0x04;
/// Command register: respond to memory-space accesses.
const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA).
const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// Errors of sysfs PCI access.
#[derive(Debug, Error)]
pub enum SysfsError {
    /// Reading or writing a sysfs file failed.
    #[error("Cannot access {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A sysfs id file held something that is not a hex number.
    #[error("Unexpected content {content:?} in {path}")]
    Parse {
        /// The file.
        path: String,
        /// What it held.
        content: String,
    },
    /// No function with the wanted vendor and device id.
    #[error("No PCI function {vendor:04x}:{device:04x} under {root}")]
    NotFound {
        /// Vendor id looked for.
        vendor: u16,
        /// Device id looked for.
        device: u16,
        /// Directory searched.
        root: String,
    },
    /// The BDF given by the user is not a PCI address or names another device.
    #[error("PCI function {bdf} is {found_vendor:04x}:{found_device:04x}, expected {vendor:04x}:{device:04x}")]
    WrongDevice {
        /// The address.
        bdf: String,
        /// Vendor id expected.
        vendor: u16,
        /// Device id expected.
        device: u16,
        /// Vendor id found.
        found_vendor: u16,
        /// Device id found.
        found_device: u16,
    },
    /// A BDF with characters that cannot be a PCI address (it becomes a path).
    #[error("{0:?} is not a PCI address like 0000:00:05.0")]
    BadAddress(String),
    /// A kernel driver stayed bound after unbinding it.
    #[error("Kernel driver {driver} is still bound to {bdf}")]
    StillBound {
        /// The address.
        bdf: String,
        /// The driver.
        driver: String,
    },
    /// Mapping a BAR failed.
    #[error(transparent)]
    Mmio(#[from] MmioError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SysfsError + '_ {
    move |source| SysfsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Parses a sysfs id file such as `0x1af4\n`.
pub fn parse_hex_id(content: &str) -> Option<u16> {
    let t = content.trim();
    let digits = t.strip_prefix("0x").unwrap_or(t);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u16::from_str_radix(digits, 16).ok()
}

/// Whether `bdf` looks like `DDDD:BB:DD.F` (so it is safe to use as a path component).
pub fn is_pci_address(bdf: &str) -> bool {
    let b = bdf.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b':',
            10 => *c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

/// One PCI function in sysfs.
#[derive(Clone, Debug)]
pub struct PciFunction {
    bdf: String,
    dir: PathBuf,
}

impl PciFunction {
    /// The function at `bdf` under `root` (normally [`SYSFS_PCI_DEVICES`]), checked to
    /// have the given ids.
    pub fn open(root: &Path, bdf: &str, vendor: u16, device: u16) -> Result<Self, SysfsError> {
        if !is_pci_address(bdf) {
            return Err(SysfsError::BadAddress(bdf.to_string()));
        }
        let f = PciFunction {
            bdf: bdf.to_string(),
            dir: root.join(bdf),
        };
        let (found_vendor, found_device) = f.ids()?;
        if (found_vendor, found_device) != (vendor, device) {
            return Err(SysfsError::WrongDevice {
                bdf: bdf.to_string(),
                vendor,
                device,
                found_vendor,
                found_device,
            });
        }
        Ok(f)
    }

    /// The first function (in address order) with the given ids under `root`.
    pub fn find(root: &Path, vendor: u16, device: u16) -> Result<Self, SysfsError> {
        let mut names: Vec<String> = fs::read_dir(root)
            .map_err(io_err(root))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_pci_address(n))
            .collect();
        names.sort();
        for bdf in names {
            let f = PciFunction {
                dir: root.join(&bdf),
                bdf,
            };
            if matches!(f.ids(), Ok(ids) if ids == (vendor, device)) {
                return Ok(f);
            }
        }
        Err(SysfsError::NotFound {
            vendor,
            device,
            root: root.display().to_string(),
        })
    }

    /// The PCI address, e.g. `0000:00:05.0`.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    fn read_id(&self, name: &str) -> Result<u16, SysfsError> {
        let path = self.dir.join(name);
        let content = fs::read_to_string(&path).map_err(io_err(&path))?;
        parse_hex_id(&content).ok_or(SysfsError::Parse {
            path: path.display().to_string(),
            content,
        })
    }

    /// Vendor and device id.
    pub fn ids(&self) -> Result<(u16, u16), SysfsError> {
        Ok((self.read_id("vendor")?, self.read_id("device")?))
    }

    /// Name of the kernel driver bound to the function, if any.
    pub fn driver(&self) -> Option<String> {
        let link = fs::read_link(self.dir.join("driver")).ok()?;
        link.file_name()?.to_str().map(str::to_string)
    }

    /// Unbinds the kernel driver if one is bound (virtio-pci binds every 1af4 function,
    /// and unbinding also resets the device). Returns the driver's name.
    pub fn unbind_driver(&self) -> Result<Option<String>, SysfsError> {
        let Some(driver) = self.driver() else {
            return Ok(None);
        };
        let path = self.dir.join("driver/unbind");
        fs::write(&path, self.bdf.as_bytes()).map_err(io_err(&path))?;
        if self.driver().is_some() {
            return Err(SysfsError::StillBound {
                bdf: self.bdf.clone(),
                driver,
            });
        }
        Ok(Some(driver))
    }

    /// Reads the configuration space (256 bytes for a conventional function, up to 4 KiB
    /// for PCIe as root).
    pub fn read_config(&self) -> Result<Vec<u8>, SysfsError> {
        let path = self.dir.join("config");
        fs::read(&path).map_err(io_err(&path))
    }

    /// Sets Memory Space and Bus Master in the command register (unbinding a driver
    /// clears Bus Master; without it the device must not touch guest memory).
    pub fn enable_memory_and_bus_master(&self) -> Result<u16, SysfsError> {
        let path = self.dir.join("config");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut cmd = [0u8; 2];
        file.seek(SeekFrom::Start(COMMAND_OFFSET))
            .and_then(|_| file.read_exact(&mut cmd))
            .map_err(io_err(&path))?;
        let value = u16::from_le_bytes(cmd) | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        file.seek(SeekFrom::Start(COMMAND_OFFSET))
            .and_then(|_| file.write_all(&value.to_le_bytes()))
            .map_err(io_err(&path))?;
        Ok(value)
    }

    /// Maps memory BAR `index` (0..=5) through its `resource<index>` file.
    pub fn map_bar(&self, index: u8) -> Result<Arc<MmioBar>, SysfsError> {
        Ok(Arc::new(MmioBar::map(
            &self.dir.join(format!("resource{index}")),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_ids() {
        assert_eq!(parse_hex_id("0x1af4\n"), Some(0x1af4));
        assert_eq!(parse_hex_id("107c"), Some(0x107c));
        assert_eq!(parse_hex_id("0x"), None);
        assert_eq!(parse_hex_id("0x12345"), None);
        assert_eq!(parse_hex_id("zz"), None);
    }

    #[test]
    fn pci_addresses() {
        assert!(is_pci_address("0000:00:05.0"));
        assert!(is_pci_address("0000:81:1f.7"));
        assert!(!is_pci_address("../../etc/x"));
        assert!(!is_pci_address("0000:00:05.00"));
        assert!(!is_pci_address("0000-00:05.0"));
    }

    fn fake_function(root: &Path, bdf: &str, vendor: &str, device: &str) {
        let dir = root.join(bdf);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), vendor).unwrap();
        fs::write(dir.join("device"), device).unwrap();
        let mut cfg = vec![0u8; 256];
        cfg[4] = 0x01; // I/O space on, memory and bus master off
        fs::write(dir.join("config"), cfg).unwrap();
    }

    #[test]
    fn finds_opens_and_enables_in_a_fake_sysfs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fake_function(&root, "0000:00:03.0", "0x1af4\n", "0x1000\n");
        fake_function(&root, "0000:00:05.0", "0x1af4\n", "0x107c\n");
        fake_function(&root, "0000:00:04.0", "0x8086\n", "0x107c\n");
        fs::create_dir_all(root.join("not-a-bdf")).unwrap();

        let f = PciFunction::find(&root, 0x1af4, 0x107c).unwrap();
        assert_eq!(f.bdf(), "0000:00:05.0");
        assert!(f.driver().is_none());
        assert_eq!(f.unbind_driver().unwrap(), None);
        assert_eq!(f.enable_memory_and_bus_master().unwrap(), 0x07);
        assert_eq!(f.read_config().unwrap()[4..6], [0x07, 0x00]);

        assert!(matches!(
            PciFunction::open(&root, "0000:00:04.0", 0x1af4, 0x107c),
            Err(SysfsError::WrongDevice {
                found_vendor: 0x8086,
                ..
            })
        ));
        assert!(matches!(
            PciFunction::open(&root, "../x", 0x1af4, 0x107c),
            Err(SysfsError::BadAddress(_))
        ));
        assert!(matches!(
            PciFunction::find(&root, 0x1af4, 0x1041),
            Err(SysfsError::NotFound { .. })
        ));
    }
}
