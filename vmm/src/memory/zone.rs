//! One memory zone: the host backing (anonymous, memfd, hugetlb memfd), its NUMA binding,
//! prefaulting and locking.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};

use super::numa;
use crate::config::{Backing, MemoryZoneConfig};
use crate::host::CpuSet;

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault pages in writable without writing to them,
/// and return an error instead of raising SIGBUS when the pool is exhausted.
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// Prefault in chunks no smaller than this per thread, so small zones use one thread.
const MIN_PREFAULT_CHUNK: usize = 64 << 20;
const MAX_PREFAULT_THREADS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("cannot create the backing file of memory zone '{id}': {source}")]
    Create { id: String, source: io::Error },
    #[error("cannot size memory zone '{id}' to {size} bytes: {source}")]
    Truncate {
        id: String,
        size: u64,
        source: io::Error,
    },
    #[error("cannot map {len} bytes of memory zone '{id}': {source}{hint}")]
    Map {
        id: String,
        len: usize,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot bind memory zone '{id}' to host node {node}: {source}")]
    Bind {
        id: String,
        node: u32,
        source: io::Error,
    },
    #[error("cannot prefault memory zone '{id}': {source}{hint}")]
    Prefault {
        id: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot lock memory zone '{id}' ({len} bytes): {source} (raise RLIMIT_MEMLOCK)")]
    Lock {
        id: String,
        len: usize,
        source: io::Error,
    },
}

const POOL_HINT: &str = " (the hugepage pool is too small: reserve more hugepages)";

/// The host side of a zone: an fd (for fd-backed zones) that the mappings come from.
pub struct ZoneBacking {
    pub config: MemoryZoneConfig,
    /// `None` for anonymous zones; shared with vhost-user backends later.
    pub file: Option<Arc<File>>,
}

impl ZoneBacking {
    pub fn create(config: &MemoryZoneConfig) -> Result<Self, ZoneError> {
        let size = config.size_mib << 20;
        let file = match config.backing {
            Backing::Anonymous => None,
            b => {
                let flags = libc::MFD_CLOEXEC
                    | match b {
                        Backing::Hugetlb2M => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
                        Backing::Hugetlb1G => libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
                        _ => 0,
                    };
                let name = CString::new(format!("aivmm-{}", config.id))
                    .unwrap_or_else(|_| CString::from(c"aivmm-zone"));
                // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new
                // fd or -1 and touches no memory of ours.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
                if fd < 0 {
                    return Err(ZoneError::Create {
                        id: config.id.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
                let file = unsafe { File::from_raw_fd(fd) };
                file.set_len(size).map_err(|source| ZoneError::Truncate {
                    id: config.id.clone(),
                    size,
                    source,
                })?;
                Some(Arc::new(file))
            }
        };
        Ok(ZoneBacking {
            config: config.clone(),
            file,
        })
    }

    /// Maps `len` bytes of the zone starting at `offset` into this process, bound to the
    /// zone's node, prefaulted and locked as configured.
    pub fn map(
        &self,
        offset: u64,
        len: usize,
        prefault_cpus: Option<&CpuSet>,
    ) -> Result<MmapRegion, ZoneError> {
        let id = &self.config.id;
        let hugetlb = self.config.backing.is_hugetlb();
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let builder = vm_memory::mmap::MmapRegionBuilder::new(len).with_mmap_prot(prot);
        let builder = match &self.file {
            Some(f) => builder
                .with_file_offset(FileOffset::from_arc(f.clone(), offset))
                .with_mmap_flags(libc::MAP_SHARED)
                .with_hugetlbfs(hugetlb),
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
        };
        let region = builder.build().map_err(|e| ZoneError::Map {
            id: id.clone(),
            len,
            source: match e {
                vm_memory::mmap::MmapRegionError::Mmap(io) => io,
                other => io::Error::other(other.to_string()),
            },
            hint: if hugetlb { POOL_HINT } else { "" },
        })?;
        let addr = region.as_ptr();

        if let Some(node) = self.config.host_node {
            numa::bind_to_node(addr, len, node).map_err(|source| ZoneError::Bind {
                id: id.clone(),
                node,
                source,
            })?;
        }
        if self.config.transparent_hugepages && !hugetlb {
            // Before the first touch, so faults can already allocate 2 MiB pages. A kernel
            // without THP refuses (EINVAL): the zone then simply stays on 4 KiB pages, which
            // validation has warned about where the host says so.
            // SAFETY: advice on a mapping we own for its whole length; it changes no contents.
            let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
            if ret != 0 {
                log::info!(
                    "memory zone '{id}': no transparent hugepages ({})",
                    io::Error::last_os_error()
                );
            }
        }
        if self.config.prefault || hugetlb {
            prefault(
                addr,
                len,
                self.config.backing.page_size() as usize,
                prefault_cpus,
            )
            .map_err(|source| ZoneError::Prefault {
                id: id.clone(),
                hint: if hugetlb { POOL_HINT } else { "" },
                source,
            })?;
        }
        if self.config.lock {
            // SAFETY: locks pages of a mapping we own for its whole length.
            if unsafe { libc::mlock(addr as *const libc::c_void, len) } != 0 {
                return Err(ZoneError::Lock {
                    id: id.clone(),
                    len,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(region)
    }
}

/// Faults in `[addr, addr+len)` from several threads, each pinned to `cpus` (the zone's
/// node) so the kernel's page clearing runs next to the memory.
pub fn prefault(
    addr: *mut u8,
    len: usize,
    page_size: usize,
    cpus: Option<&CpuSet>,
) -> io::Result<()> {
    let threads = cpus
        .map(|c| c.len())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, MAX_PREFAULT_THREADS)
        .min(len.div_ceil(MIN_PREFAULT_CHUNK).max(1));
    let chunk = len.div_ceil(threads).next_multiple_of(page_size);
    let base = addr as usize;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| i * chunk)
            .filter(|&start| start < len)
            .map(|start| {
                let this_len = chunk.min(len - start);
                s.spawn(move || {
                    if let Some(c) = cpus {
                        // Best effort: placement is enforced by mbind, pinning only speeds up.
                        let _ = numa::pin_current_thread(c);
                    }
                    populate_write(base + start, this_len)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("prefault thread panicked")))
            })
            .collect::<io::Result<Vec<()>>>()
            .map(drop)
    })
}

fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range lies inside a mapping owned by the caller; MADV_POPULATE_WRITE only
    // faults pages in and does not change their contents.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
