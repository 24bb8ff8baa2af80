//! Register access: a trait for a device's register space, the memory-mapped BAR that
//! implements it on a real guest, and bounds-checked windows into it (one per virtio
//! capability).
//!
//! The trait lets the virtio init sequence run against a fake device in unit tests.
//! Only 8-, 16- and 32-bit accesses exist: virtio-pci asks drivers to split 64-bit
//! fields into two 32-bit accesses, so no device has to handle wider ones.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use thiserror::Error;

/// Errors of register access and BAR mapping.
#[derive(Debug, Error)]
pub enum MmioError {
    /// An access outside the window or register space.
    #[error("Register access of {size} bytes at offset {offset:#x} is outside a window of {len:#x} bytes")]
    OutOfBounds {
        /// Offset inside the window.
        offset: u64,
        /// Access width.
        size: u64,
        /// Window length.
        len: u64,
    },
    /// An access not aligned to its width.
    #[error("Register access of {size} bytes at offset {offset:#x} is not naturally aligned")]
    Misaligned {
        /// Offset inside the window.
        offset: u64,
        /// Access width.
        size: u64,
    },
    /// Opening the BAR's resource file failed.
    #[error("Cannot open BAR resource {path}: {source}")]
    Open {
        /// The sysfs resource file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The resource file has a size that cannot be mapped.
    #[error("BAR resource {path} has unusable size {len:#x}")]
    BadSize {
        /// The sysfs resource file.
        path: String,
        /// Its size.
        len: u64,
    },
    /// mmap of the resource file failed.
    #[error("Cannot map BAR resource {path} ({len:#x} bytes): {source}")]
    Map {
        /// The sysfs resource file.
        path: String,
        /// Bytes requested.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A device's register space, accessed with naturally aligned 8/16/32-bit accesses.
pub trait Registers: Send + Sync {
    /// Size of the space in bytes.
    fn len(&self) -> u64;
    /// Whether the space is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads 1, 2 or 4 bytes (`data.len()`) at `offset`; the caller checked bounds and
    /// alignment.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Writes 1, 2 or 4 bytes (`data.len()`) at `offset`; the caller checked bounds and
    /// alignment.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Checks that an access of `size` bytes at `offset` fits in `len` and is aligned.
fn check_access(offset: u64, size: u64, len: u64) -> Result<(), MmioError> {
    let end = offset.checked_add(size);
    if end.map_or(true, |end| end > len) {
        return Err(MmioError::OutOfBounds { offset, size, len });
    }
    if offset % size != 0 {
        return Err(MmioError::Misaligned { offset, size });
    }
    Ok(())
}

/// A window `base..base+len` of a register space, e.g. the virtio common configuration
/// structure inside a BAR. Every access is checked against the window.
#[derive(Clone)]
pub struct RegisterWindow {
    regs: Arc<dyn Registers>,
    base: u64,
    len: u64,
}

impl std::fmt::Debug for RegisterWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterWindow")
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &format_args!("{:#x}", self.len))
            .finish()
    }
}

impl RegisterWindow {
    /// The window `base..base+len` of `regs`; fails if it does not fit inside it.
    pub fn new(regs: Arc<dyn Registers>, base: u64, len: u64) -> Result<Self, MmioError> {
        let space = regs.len();
        if base.checked_add(len).map_or(true, |end| end > space) {
            return Err(MmioError::OutOfBounds {
                offset: base,
                size: len,
                len: space,
            });
        }
        Ok(RegisterWindow { regs, base, len })
    }

    /// Length of the window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn read_bytes<const N: usize>(&self, offset: u64) -> Result<[u8; N], MmioError> {
        check_access(offset, N as u64, self.len)?;
        let mut data = [0u8; N];
        self.regs.read(self.base + offset, &mut data);
        Ok(data)
    }

    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), MmioError> {
        check_access(offset, data.len() as u64, self.len)?;
        self.regs.write(self.base + offset, data);
        Ok(())
    }

    /// Reads a byte.
    pub fn read8(&self, offset: u64) -> Result<u8, MmioError> {
        Ok(self.read_bytes::<1>(offset)?[0])
    }
    /// Reads a little-endian 16-bit register.
    pub fn read16(&self, offset: u64) -> Result<u16, MmioError> {
        Ok(u16::from_le_bytes(self.read_bytes(offset)?))
    }
    /// Reads a little-endian 32-bit register.
    pub fn read32(&self, offset: u64) -> Result<u32, MmioError> {
        Ok(u32::from_le_bytes(self.read_bytes(offset)?))
    }
    /// Reads a 64-bit field as two 32-bit accesses, low half first.
    pub fn read64_split(&self, offset: u64) -> Result<u64, MmioError> {
        let lo = self.read32(offset)?;
        let hi = self.read32(offset.checked_add(4).ok_or(MmioError::OutOfBounds {
            offset,
            size: 8,
            len: self.len,
        })?)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }
    /// Writes a byte.
    pub fn write8(&self, offset: u64, value: u8) -> Result<(), MmioError> {
        self.write_bytes(offset, &[value])
    }
    /// Writes a little-endian 16-bit register.
    pub fn write16(&self, offset: u64, value: u16) -> Result<(), MmioError> {
        self.write_bytes(offset, &value.to_le_bytes())
    }
    /// Writes a little-endian 32-bit register.
    pub fn write32(&self, offset: u64, value: u32) -> Result<(), MmioError> {
        self.write_bytes(offset, &value.to_le_bytes())
    }
    /// Writes a 64-bit field as two 32-bit accesses, low half first.
    pub fn write64_split(&self, offset: u64, value: u64) -> Result<(), MmioError> {
        check_access(offset, 8, self.len)?;
        self.write32(offset, value as u32)?;
        self.write32(offset + 4, (value >> 32) as u32)
    }
}

/// A PCI memory BAR mapped from its sysfs `resourceN` file (uncached, `O_SYNC`).
pub struct MmioBar {
    ptr: NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is plain device memory owned by this value; every access goes
// through volatile reads/writes, which are fine from any thread.
unsafe impl Send for MmioBar {}
// SAFETY: as above; the struct holds no thread-affine state.
unsafe impl Sync for MmioBar {}

impl MmioBar {
    /// Maps the whole BAR behind `path` (a `/sys/bus/pci/devices/*/resourceN` file).
    pub fn map(path: &Path) -> Result<Self, MmioError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(path)
            .map_err(|source| MmioError::Open {
                path: name.clone(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| MmioError::Open {
                path: name.clone(),
                source,
            })?
            .len();
        let map_len = usize::try_from(len)
            .ok()
            .filter(|l| *l > 0)
            .ok_or(MmioError::BadSize {
                path: name.clone(),
                len,
            })?;
        // SAFETY: a fresh shared mapping of a file we opened read-write; the kernel picks
        // the address, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MmioError::Map {
                path: name,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(MmioError::BadSize { path: name, len })?;
        Ok(MmioBar { ptr, len })
    }
}

impl Drop for MmioBar {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`; nothing borrows it any
        // more (windows hold an `Arc` to this value).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len as usize);
        }
    }
}

impl Registers for MmioBar {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        // Callers checked offset + width <= len and natural alignment (RegisterWindow).
        let p = self.ptr.as_ptr().wrapping_add(offset as usize);
        match data.len() {
            // SAFETY: in bounds and aligned (checked by the window); volatile because
            // this is device memory with side effects.
            1 => data[0] = unsafe { std::ptr::read_volatile(p) },
            // SAFETY: as above, for an aligned 16-bit register.
            2 => data.copy_from_slice(
                &unsafe { std::ptr::read_volatile(p.cast::<u16>()) }.to_ne_bytes(),
            ),
            // SAFETY: as above, for an aligned 32-bit register.
            4 => data.copy_from_slice(
                &unsafe { std::ptr::read_volatile(p.cast::<u32>()) }.to_ne_bytes(),
            ),
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let p = self.ptr.as_ptr().wrapping_add(offset as usize);
        match *data {
            // SAFETY: in bounds and aligned (checked by the window); volatile because
            // this is device memory with side effects.
            [b] => unsafe { std::ptr::write_volatile(p, b) },
            // SAFETY: as above, for an aligned 16-bit register.
            [a, b] => unsafe {
                std::ptr::write_volatile(p.cast::<u16>(), u16::from_ne_bytes([a, b]))
            },
            // SAFETY: as above, for an aligned 32-bit register.
            [a, b, c, d] => unsafe {
                std::ptr::write_volatile(p.cast::<u32>(), u32::from_ne_bytes([a, b, c, d]))
            },
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Register space backed by a byte vector, recording every access.
    pub(crate) struct RamRegisters {
        pub bytes: Mutex<Vec<u8>>,
        pub log: Mutex<Vec<(bool, u64, usize)>>,
    }

    impl RamRegisters {
        pub fn new(len: usize) -> Self {
            RamRegisters {
                bytes: Mutex::new(vec![0; len]),
                log: Mutex::new(Vec::new()),
            }
        }
    }

    impl Registers for RamRegisters {
        fn len(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
        fn read(&self, offset: u64, data: &mut [u8]) {
            let b = self.bytes.lock().unwrap();
            data.copy_from_slice(&b[offset as usize..offset as usize + data.len()]);
            self.log.lock().unwrap().push((false, offset, data.len()));
        }
        fn write(&self, offset: u64, data: &[u8]) {
            let mut b = self.bytes.lock().unwrap();
            b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            self.log.lock().unwrap().push((true, offset, data.len()));
        }
    }

    #[test]
    fn window_checks_bounds_and_alignment() {
        let regs = Arc::new(RamRegisters::new(0x100));
        assert!(RegisterWindow::new(regs.clone(), 0xf0, 0x20).is_err());
        assert!(RegisterWindow::new(regs.clone(), u64::MAX, 2).is_err());
        let w = RegisterWindow::new(regs.clone(), 0x40, 0x10).unwrap();
        w.write32(0xc, 0xdead_beef).unwrap();
        assert_eq!(
            regs.bytes.lock().unwrap()[0x4c..0x50],
            [0xef, 0xbe, 0xad, 0xde]
        );
        assert_eq!(w.read16(0xe).unwrap(), 0xdead);
        assert!(matches!(w.read32(0x10), Err(MmioError::OutOfBounds { .. })));
        assert!(matches!(w.read32(0xe), Err(MmioError::OutOfBounds { .. })));
        assert!(matches!(w.read32(2), Err(MmioError::Misaligned { .. })));
        assert!(matches!(
            w.read16(u64::MAX),
            Err(MmioError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn split_64_bit_access_is_two_32_bit_accesses_low_first() {
        let regs = Arc::new(RamRegisters::new(0x20));
        let w = RegisterWindow::new(regs.clone(), 0, 0x20).unwrap();
        w.write64_split(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(w.read64_split(8).unwrap(), 0x1122_3344_5566_7788);
        let log = regs.log.lock().unwrap();
        assert_eq!(
            log[..],
            [(true, 8, 4), (true, 12, 4), (false, 8, 4), (false, 12, 4)]
        );
        assert!(w.write64_split(0x1c, 0).is_err());
    }
}
