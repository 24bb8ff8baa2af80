//! The memory behind a DMA pool: hugetlbfs pages (shareable through their file
//! descriptor), a mapping of such a descriptor received from another process, or
//! plain heap memory for tests and fake devices.

use std::alloc::Layout;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use thiserror::Error;

/// Size of a 2 MiB huge page.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Errors creating or mapping pool memory.
#[derive(Debug, Error)]
pub enum MappingError {
    /// No hugetlbfs file could be created.
    #[error("Cannot create a hugetlbfs file (memfd: {memfd}; {dir}: {file})")]
    Create {
        /// Why memfd_create(MFD_HUGETLB) failed.
        memfd: std::io::Error,
        /// The hugetlbfs mount tried as fallback.
        dir: String,
        /// Why creating a file there failed.
        file: std::io::Error,
    },
    /// Sizing the file failed.
    #[error("Cannot size the hugetlbfs file to {len} bytes: {source}")]
    Truncate {
        /// Bytes.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// mmap failed (for hugetlbfs usually: not enough free huge pages).
    #[error("Cannot map {len} bytes of huge pages ({source}); reserve more with /proc/sys/vm/nr_hugepages or hugepages= on the kernel command line")]
    Map {
        /// Bytes.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// mlock failed.
    #[error("Cannot lock {len} bytes of pool memory: {source}")]
    Lock {
        /// Bytes.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// A size that is zero, not a multiple of the page size, or too large.
    #[error("Invalid pool size {len} (must be a non-zero multiple of {page_size})")]
    BadSize {
        /// Bytes.
        len: usize,
        /// Page size.
        page_size: usize,
    },
}

/// Where a pool's bytes come from.
pub(crate) enum Mapping {
    /// A shared mapping of a file (hugetlbfs memfd), optionally with its descriptor.
    Mapped {
        ptr: NonNull<u8>,
        len: usize,
        fd: OwnedFd,
    },
    /// Heap memory (tests, fake devices): not usable by a real device.
    Heap { ptr: NonNull<u8>, layout: Layout },
}

// SAFETY: the mapping is owned memory; the raw pointer carries no thread affinity.
unsafe impl Send for Mapping {}
// SAFETY: as above; concurrent access discipline is the pool's and buffers' business.
unsafe impl Sync for Mapping {}

fn check_size(len: usize, page_size: usize) -> Result<(), MappingError> {
    if len == 0 || page_size == 0 || len % page_size != 0 || len > isize::MAX as usize {
        return Err(MappingError::BadSize { len, page_size });
    }
    Ok(())
}

/// Opens an anonymous hugetlbfs file: a memfd with MFD_HUGETLB, or if the kernel
/// refuses that, an unlinked file in the hugetlbfs mount `dir`.
fn hugetlb_file(dir: &str) -> Result<OwnedFd, MappingError> {
    let name = c"ai-agent-dma";
    let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd >= 0 {
        // SAFETY: fd is a fresh descriptor this function owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let memfd = std::io::Error::last_os_error();
    let path = format!("{dir}/ai-agent-dma.{}", std::process::id());
    let file_err = |file| MappingError::Create {
        memfd: std::io::Error::from_raw_os_error(memfd.raw_os_error().unwrap_or(0)),
        dir: dir.to_string(),
        file,
    };
    let cpath = CString::new(path.clone())
        .map_err(|_| file_err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: open with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(file_err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // The descriptor keeps the pages; the name is only needed to create it.
    let _ = std::fs::remove_file(&path);
    Ok(owned)
}

fn mmap_shared(fd: &OwnedFd, len: usize, populate: bool) -> Result<NonNull<u8>, MappingError> {
    let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
    // SAFETY: a fresh shared mapping of a descriptor we hold; the kernel picks the
    // address and the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(MappingError::Map {
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(ptr.cast()).ok_or(MappingError::Map {
        len,
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

impl Mapping {
    /// `len` bytes of 2 MiB huge pages, locked and faulted in (so each has a fixed
    /// physical address), in a file that can be shared with other processes.
    pub(crate) fn hugetlb(len: usize, hugetlbfs_dir: &str) -> Result<Self, MappingError> {
        check_size(len, HUGE_PAGE_SIZE)?;
        let fd = hugetlb_file(hugetlbfs_dir)?;
        let off = libc::off_t::try_from(len).map_err(|_| MappingError::BadSize {
            len,
            page_size: HUGE_PAGE_SIZE,
        })?;
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off) } != 0 {
            return Err(MappingError::Truncate {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = mmap_shared(&fd, len, true)?;
        let mapping = Mapping::Mapped { ptr, len, fd };
        // SAFETY: locking exactly the mapping just created.
        if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } != 0 {
            return Err(MappingError::Lock {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        for page in (0..len).step_by(HUGE_PAGE_SIZE) {
            // SAFETY: page < len, inside the mapping; a write faults the page in for
            // certain even if MAP_POPULATE was ignored.
            unsafe { std::ptr::write_volatile(ptr.as_ptr().add(page), 0) };
        }
        Ok(mapping)
    }

    /// `len` bytes of an ordinary (not huge page) memfd: shareable like a hugetlbfs
    /// pool but without physical addresses; for tests and fake devices.
    pub(crate) fn memfd(len: usize, page_size: usize) -> Result<Self, MappingError> {
        check_size(len, page_size)?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ai-agent-fake".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MappingError::Create {
                memfd: std::io::Error::last_os_error(),
                dir: String::new(),
                file: std::io::Error::from(std::io::ErrorKind::Unsupported),
            });
        }
        // SAFETY: fd is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let off =
            libc::off_t::try_from(len).map_err(|_| MappingError::BadSize { len, page_size })?;
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), off) } != 0 {
            return Err(MappingError::Truncate {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = mmap_shared(&fd, len, true)?;
        Ok(Mapping::Mapped { ptr, len, fd })
    }

    /// Maps `len` bytes of a pool file received from another process.
    pub(crate) fn shared(fd: OwnedFd, len: usize, page_size: usize) -> Result<Self, MappingError> {
        check_size(len, page_size)?;
        let ptr = mmap_shared(&fd, len, true)?;
        Ok(Mapping::Mapped { ptr, len, fd })
    }

    /// `len` zeroed bytes of heap memory aligned to `page_size`.
    pub(crate) fn heap(len: usize, page_size: usize) -> Result<Self, MappingError> {
        check_size(len, page_size)?;
        let bad = MappingError::BadSize { len, page_size };
        let layout =
            Layout::from_size_align(len, page_size.next_power_of_two()).map_err(|_| bad)?;
        // SAFETY: layout has a non-zero size (checked above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(MappingError::BadSize { len, page_size })?;
        Ok(Mapping::Heap { ptr, layout })
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        match self {
            Mapping::Mapped { ptr, .. } | Mapping::Heap { ptr, .. } => *ptr,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Mapping::Mapped { len, .. } => *len,
            Mapping::Heap { layout, .. } => layout.size(),
        }
    }

    pub(crate) fn fd(&self) -> Option<&OwnedFd> {
        match self {
            Mapping::Mapped { fd, .. } => Some(fd),
            Mapping::Heap { .. } => None,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self {
            Mapping::Mapped { ptr, len, .. } => {
                // SAFETY: unmapping exactly our own mapping; no buffer outlives the pool
                // (buffers hold an Arc to it).
                unsafe { libc::munmap(ptr.as_ptr().cast(), *len) };
            }
            Mapping::Heap { ptr, layout } => {
                // SAFETY: allocated in `heap` with this very layout.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), *layout) };
            }
        }
    }
}
