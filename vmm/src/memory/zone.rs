//! One memory zone: the host backing (anonymous, memfd, hugetlb memfd), its NUMA binding,
//! prefaulting and locking.
//!
//! File-backed zones are sealed against shrinking and growing before anything maps them:
//! their fds go to vhost-user backends (ai-inferd) that map the whole file, and a file
//! that shrank under such a mapping would kill the backend with SIGBUS on its next access.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
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
    #[error(
        "memory zone '{id}' cannot be sealed against resizing ({reason}); ai-inferd refuses \
         unsealed guest memory: use backing = \"memfd\", or a kernel that seals hugetlb \
         memfds (4.16 or later)"
    )]
    Unsealed { id: String, reason: String },
}

/// The seals every shareable zone carries: its size is fixed for good, and no other seal
/// (such as `F_SEAL_FUTURE_WRITE`, which would break later mappings) can be added.
pub const ZONE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

const POOL_HINT: &str = " (the hugepage pool is too small: reserve more hugepages)";

/// The host side of a zone: an fd (for fd-backed zones) that the mappings come from.
pub struct ZoneBacking {
    pub config: MemoryZoneConfig,
    /// `None` for anonymous zones; shared with vhost-user backends later.
    pub file: Option<Arc<File>>,
    /// Why a file-backed zone carries no [`ZONE_SEALS`] (this kernel refused them), if so.
    pub unsealed: Option<String>,
}

impl ZoneBacking {
    pub fn create(config: &MemoryZoneConfig) -> Result<Self, ZoneError> {
        let size = config.size_mib << 20;
        let (file, unsealed) = match config.backing {
            Backing::Anonymous => (None, None),
            b => {
                let flags = libc::MFD_CLOEXEC
                    | match b {
                        Backing::Hugetlb2M => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
                        Backing::Hugetlb1G => libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
                        _ => 0,
                    };
                let name = CString::new(format!("aivmm-{}", config.id))
                    .unwrap_or_else(|_| CString::from(c"aivmm-zone"));
                let created = memfd_create(&name, flags | libc::MFD_ALLOW_SEALING);
                // Kernels before 4.16 refuse sealing on hugetlb memfds (EINVAL): such a
                // zone still works for a VM that shares it with nobody.
                let (file, unsealed) = match created {
                    Ok(file) => (file, None),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        let file =
                            memfd_create(&name, flags).map_err(|source| ZoneError::Create {
                                id: config.id.clone(),
                                source,
                            })?;
                        (
                            file,
                            Some(format!("memfd_create with MFD_ALLOW_SEALING: {e}")),
                        )
                    }
                    Err(source) => {
                        return Err(ZoneError::Create {
                            id: config.id.clone(),
                            source,
                        })
                    }
                };
                file.set_len(size).map_err(|source| ZoneError::Truncate {
                    id: config.id.clone(),
                    size,
                    source,
                })?;
                let unsealed = match unsealed {
                    Some(why) => Some(why),
                    None => add_seals(&file, ZONE_SEALS)
                        .err()
                        .map(|e| format!("F_ADD_SEALS: {e}")),
                };
                if let Some(why) = &unsealed {
                    log::warn!("memory zone '{}' is not sealed: {why}", config.id);
                }
                (Some(Arc::new(file)), unsealed)
            }
        };
        Ok(ZoneBacking {
            config: config.clone(),
            file,
            unsealed,
        })
    }

    /// Fails for a file-backed zone without [`ZONE_SEALS`]: what a VM that shares its
    /// memory with ai-inferd checks at start, since the daemon would refuse the zone.
    pub fn require_sealed(&self) -> Result<(), ZoneError> {
        match &self.unsealed {
            Some(reason) => Err(ZoneError::Unsealed {
                id: self.config.id.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
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
            usize::try_from(self.config.backing.page_size())
                .map_err(io::Error::other)
                .and_then(|page_size| prefault(addr, len, page_size, prefault_cpus))
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

/// A new memfd named `name` created with `flags`.
fn memfd_create(name: &CString, flags: libc::c_uint) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new fd or -1
    // and touches no memory of ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Adds `seals` to the memfd `file`.
fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on an fd we own; it takes an int argument and touches no memory.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
                devices::thread::named("prefault").spawn_scoped(s, move || {
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
                h?.join()
                    .unwrap_or_else(|_| Err(io::Error::other("prefault thread panicked")))
            })
            .collect::<io::Result<Vec<()>>>()
            .map(drop)
    })
}

/// Faults in `[addr, addr+len)` (page-aligned `addr`) writable, without writing to it.
fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range lies inside a mapping owned by the caller; MADV_POPULATE_WRITE only
    // faults pages in and does not change their contents.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
