//! Guest RAM: memory zones placed into the guest-physical address space.
//!
//! Zones are laid out in config order from guest-physical 0, each aligned to its page size;
//! a zone that would cross the 32-bit MMIO hole is split around it. Each piece is one host
//! mapping and one KVM memory slot.

pub mod numa;
pub mod zone;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use crate::config::MemoryZoneConfig;
use crate::host::HostTopology;
pub use zone::{ZoneBacking, ZoneError, ZONE_SEALS};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Zone(#[from] ZoneError),
    #[error("guest memory regions overlap or overflow: {0}")]
    Regions(String),
}

/// A contiguous piece of one zone in the guest-physical address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub zone: usize,
    pub guest_addr: u64,
    pub zone_offset: u64,
    pub len: u64,
}

/// Places zones of the given sizes and alignments; pure, so it is unit tested.
pub fn place_zones(zones: &[(u64, u64)]) -> Vec<Placement> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    for (idx, &(size, align)) in zones.iter().enumerate() {
        cursor = cursor.next_multiple_of(align);
        let mut offset = 0;
        while offset < size {
            if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&cursor) {
                cursor = MMIO_HOLE_END;
            }
            let remaining = size - offset;
            let len = if cursor < MMIO_HOLE_START {
                remaining.min(MMIO_HOLE_START - cursor)
            } else {
                remaining
            };
            out.push(Placement {
                zone: idx,
                guest_addr: cursor,
                zone_offset: offset,
                len,
            });
            cursor += len;
            offset += len;
        }
    }
    out
}

/// The guest's RAM and the host backings it came from.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub zones: Vec<ZoneBacking>,
    pub placements: Vec<Placement>,
}

impl GuestRam {
    /// Creates, binds, prefaults and locks every zone, then assembles the guest memory map.
    /// On error everything created so far is unmapped and closed (RAII).
    pub fn create(
        configs: &[MemoryZoneConfig],
        host: &dyn HostTopology,
    ) -> Result<Self, MemoryError> {
        let zones = configs
            .iter()
            .map(ZoneBacking::create)
            .collect::<Result<Vec<_>, _>>()?;
        let sizes: Vec<(u64, u64)> = configs
            .iter()
            .map(|z| (z.size_mib << 20, z.backing.page_size()))
            .collect();
        let placements = place_zones(&sizes);
        let mut regions = Vec::with_capacity(placements.len());
        for p in &placements {
            let zone = &zones[p.zone];
            let cpus = zone.config.host_node.and_then(|n| host.node_cpus(n));
            let len = usize::try_from(p.len).map_err(|_| {
                MemoryError::Regions(format!("region of {:#x} bytes is too large", p.len))
            })?;
            let mmap = zone.map(p.zone_offset, len, cpus.as_ref())?;
            let region =
                GuestRegionMmap::new(mmap, GuestAddress(p.guest_addr)).ok_or_else(|| {
                    MemoryError::Regions(format!("region at {:#x} overflows", p.guest_addr))
                })?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Regions(e.to_string()))?;
        Ok(GuestRam {
            memory,
            zones,
            placements,
        })
    }

    /// Fails naming the first file-backed zone that could not be sealed against
    /// resizing: a VM sharing its RAM with ai-inferd calls this at start, since the daemon
    /// refuses unsealed memory at SET_MEM_TABLE.
    pub fn require_sealed(&self) -> Result<(), MemoryError> {
        self.zones
            .iter()
            .try_for_each(ZoneBacking::require_sealed)
            .map_err(MemoryError::from)
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.placements.iter().map(|p| p.len).sum()
    }

    /// Guest RAM ranges, sorted, for the e820 map.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self
            .placements
            .iter()
            .map(|p| (p.guest_addr, p.len))
            .collect();
        r.sort_unstable();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn single_small_zone_starts_at_zero() {
        let p = place_zones(&[(256 * MIB, 2 * MIB)]);
        assert_eq!(
            p,
            vec![Placement {
                zone: 0,
                guest_addr: 0,
                zone_offset: 0,
                len: 256 * MIB
            }]
        );
    }

    #[test]
    fn zone_crossing_the_hole_is_split() {
        let p = place_zones(&[(4 * GIB, 4096)]);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].guest_addr, 0);
        assert_eq!(p[0].len, MMIO_HOLE_START);
        assert_eq!(p[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(p[1].zone_offset, MMIO_HOLE_START);
        assert_eq!(p[1].len, 4 * GIB - MMIO_HOLE_START);
    }

    #[test]
    fn zones_are_aligned_to_their_page_size() {
        let p = place_zones(&[(3 * MIB, 4096), (2 * MIB, 2 * MIB), (GIB, GIB)]);
        assert_eq!(p[1].guest_addr, 4 * MIB);
        assert_eq!(p[2].guest_addr, GIB);
        assert!(p.iter().all(|x| x.zone_offset == 0));
    }

    #[test]
    fn zone_starting_inside_the_hole_moves_above_it() {
        let p = place_zones(&[(MMIO_HOLE_START, 4096), (GIB, GIB)]);
        assert_eq!(p[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn anonymous_and_memfd_zones_map_and_read_back() {
        use crate::config::Backing;
        use vm_memory::Bytes;
        let host = crate::host::SysfsHost::default();
        let zones = vec![
            MemoryZoneConfig {
                id: "a".into(),
                size_mib: 2,
                backing: Backing::Anonymous,
                host_node: None,
                prefault: true,
                lock: false,
                transparent_hugepages: false,
            },
            MemoryZoneConfig {
                id: "b".into(),
                size_mib: 4,
                backing: Backing::Memfd,
                host_node: Some(0),
                prefault: true,
                lock: true,
                transparent_hugepages: true,
            },
        ];
        let ram = GuestRam::create(&zones, &host).expect("create guest RAM");
        assert_eq!(ram.size(), 6 * MIB);
        assert_eq!(ram.ranges(), vec![(0, 2 * MIB), (2 * MIB, 4 * MIB)]);
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(5 * MIB))
            .unwrap();
        let v: u32 = ram.memory.read_obj(GuestAddress(5 * MIB)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(ram.zones[0].file.is_none());
        assert!(ram.zones[1].file.is_some());
    }

    /// The seals on `file` (F_GET_SEALS).
    fn seals(file: &std::fs::File) -> libc::c_int {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GET_SEALS on an open fd; it takes no argument and touches no memory.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(
            seals >= 0,
            "F_GET_SEALS: {}",
            std::io::Error::last_os_error()
        );
        seals
    }

    /// A 4 MiB zone, unbound, neither prefaulted nor locked.
    fn small_zone(id: &str, backing: crate::config::Backing, thp: bool) -> MemoryZoneConfig {
        MemoryZoneConfig {
            id: id.into(),
            size_mib: 4,
            backing,
            host_node: None,
            prefault: false,
            lock: false,
            transparent_hugepages: thp,
        }
    }

    #[test]
    fn shareable_zones_are_sealed_against_resizing() {
        use crate::config::Backing;
        use vm_memory::Bytes;
        let host = crate::host::SysfsHost::default();
        let zone = |id: &str, backing| small_zone(id, backing, false);
        let zones = vec![zone("m", Backing::Memfd), zone("a", Backing::Anonymous)];
        let ram = GuestRam::create(&zones, &host).expect("create guest RAM");
        ram.require_sealed().expect("every zone sealed");
        assert!(ram.zones[1].file.is_none(), "anonymous zones stay private");
        // Hugetlb memfds accept seals since Linux 4.16. Creating the backing sizes and
        // seals it without mapping it, so no page of the host's pool is needed.
        let mut backings: Vec<&ZoneBacking> = vec![&ram.zones[0]];
        let mut huge = Vec::new();
        for (dir, backing) in [
            ("hugepages-2048kB", Backing::Hugetlb2M),
            ("hugepages-1048576kB", Backing::Hugetlb1G),
        ] {
            if std::path::Path::new("/sys/kernel/mm/hugepages")
                .join(dir)
                .exists()
            {
                let mut z = zone("h", backing);
                z.size_mib = backing.page_size() >> 20;
                huge.push(ZoneBacking::create(&z).expect("create a hugetlb backing"));
            } else {
                eprintln!("{dir}: not on this host, skipped");
            }
        }
        backings.extend(huge.iter());
        for z in backings {
            let id = format!("{} ({:?})", z.config.id, z.config.backing);
            z.require_sealed().unwrap();
            let file = z.file.as_deref().unwrap();
            assert_eq!(seals(file) & ZONE_SEALS, ZONE_SEALS, "zone {id}");
            let size = z.config.size_mib << 20;
            // Page-aligned lengths: hugetlbfs refuses others (EINVAL) before seals count.
            let page = z.config.backing.page_size();
            for len in [size - page, 0, size * 2] {
                let err = file.set_len(len).expect_err("a sealed zone was resized");
                assert_eq!(err.raw_os_error(), Some(libc::EPERM), "zone {id}");
            }
            assert_eq!(file.metadata().unwrap().len(), size);
            // F_SEAL_SEAL: no further seal (say, one that forbids future writes).
            // SAFETY: F_ADD_SEALS on an open fd with an int argument.
            let ret = unsafe {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(file),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_FUTURE_WRITE,
                )
            };
            assert_eq!(ret, -1, "zone {id} accepted another seal");
        }
        // The guest still reads and writes every zone.
        for gpa in [0, 4 * MIB] {
            ram.memory.write_obj(0x5ea1_u32, GuestAddress(gpa)).unwrap();
            let v: u32 = ram.memory.read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(v, 0x5ea1);
        }
    }

    #[test]
    fn an_unsealed_zone_is_reported_by_require_sealed() {
        use crate::config::Backing;
        let host = crate::host::SysfsHost::default();
        let mut ram = GuestRam::create(
            &[MemoryZoneConfig {
                id: "z".into(),
                size_mib: 2,
                backing: Backing::Memfd,
                host_node: None,
                prefault: false,
                lock: false,
                transparent_hugepages: false,
            }],
            &host,
        )
        .unwrap();
        ram.zones[0].unsealed = Some("refused by the kernel".into());
        let err = ram.require_sealed().unwrap_err().to_string();
        assert!(err.contains("memory zone 'z' cannot be sealed"), "{err}");
        assert!(err.contains("refused by the kernel"), "{err}");
    }

    /// The kernel's VMA flags ("VmFlags:" in /proc/self/smaps) of the mapping at `addr`.
    fn vma_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if inside {
                    return flags.split_whitespace().map(String::from).collect();
                }
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn small_page_zones_ask_for_transparent_hugepages_unless_told_not_to() {
        use crate::config::Backing;
        use vm_memory::GuestMemoryBackend;
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: this kernel has no transparent hugepages");
            return;
        }
        let host = crate::host::SysfsHost::default();
        let zone = small_zone;
        let zones = vec![
            zone("memfd-thp", Backing::Memfd, true),
            zone("anon-thp", Backing::Anonymous, true),
            zone("memfd-4k", Backing::Memfd, false),
        ];
        let ram = GuestRam::create(&zones, &host).expect("create guest RAM");
        // "hg" is VM_HUGEPAGE: the mapping carries MADV_HUGEPAGE.
        let huge = |gpa: u64| {
            let addr = ram.memory.get_host_address(GuestAddress(gpa)).unwrap() as usize;
            vma_flags(addr).iter().any(|f| f == "hg")
        };
        assert!(huge(0), "memfd zone without MADV_HUGEPAGE");
        assert!(huge(4 * MIB), "anonymous zone without MADV_HUGEPAGE");
        assert!(!huge(8 * MIB), "transparent_hugepages = false was ignored");
    }
}
