//! `[[memory.zones]]`: guest RAM, as host memory areas with a backing, a NUMA node and
//! page-size policy; checked against the host's nodes and hugepage pools.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::host::HostTopology;

/// The guest-physical range we can place RAM in (below the 40-bit physical address width
/// every x86_64 CPU we target supports).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// How a memory zone is backed on the host.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Backing {
    /// Private anonymous memory. Cannot be shared with a vhost-user backend.
    Anonymous,
    /// A memfd with 4 KiB pages: shareable, the default.
    #[default]
    Memfd,
    /// A memfd on 2 MiB hugepages (from the host's hugetlb pool).
    #[serde(rename = "hugetlb-2m")]
    Hugetlb2M,
    /// A memfd on 1 GiB hugepages.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1G,
}

impl Backing {
    /// Page size of the backing in bytes.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Anonymous | Backing::Memfd => 4096,
            Backing::Hugetlb2M => 2 << 20,
            Backing::Hugetlb1G => 1 << 30,
        }
    }

    pub fn is_hugetlb(self) -> bool {
        matches!(self, Backing::Hugetlb2M | Backing::Hugetlb1G)
    }
}

/// One host memory area mapped into the guest's physical address space. Zones are laid out
/// in the guest in the order they are listed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryZoneConfig {
    /// Name used in logs and errors.
    pub id: String,
    /// Size in MiB; a multiple of the backing's page size.
    pub size_mib: u64,
    #[serde(default)]
    pub backing: Backing,
    /// Host NUMA node the pages are bound to (mbind, MPOL_BIND) before they are touched.
    #[serde(default)]
    pub host_node: Option<u32>,
    /// Touch every page at start (MADV_POPULATE_WRITE). Always done for hugetlb backings,
    /// so a short pool fails at start instead of with SIGBUS later.
    #[serde(default)]
    pub prefault: bool,
    /// mlock the zone so it is never swapped (pinned for DMA).
    #[serde(default)]
    pub lock: bool,
    /// For 4 KiB backings: ask the kernel for transparent hugepages (MADV_HUGEPAGE), so that
    /// the guest's memory is mapped in 2 MiB pages where the host's THP settings allow it
    /// (memfd zones: `/sys/kernel/mm/transparent_hugepage/shmem_enabled`). Fewer nested page
    /// faults and TLB misses; the pages stay movable. Ignored for hugetlb backings.
    #[serde(default = "super::default_true")]
    pub transparent_hugepages: bool,
}

impl MemoryZoneConfig {
    /// The zone `--memory MiB` creates: 4 KiB memfd pages, no node, no prefault, no lock.
    pub(super) fn memfd(id: &str, size_mib: u64) -> Self {
        MemoryZoneConfig {
            id: id.into(),
            size_mib,
            backing: Backing::Memfd,
            host_node: None,
            prefault: false,
            lock: false,
            transparent_hugepages: true,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    #[serde(default)]
    pub zones: Vec<MemoryZoneConfig>,
}

/// Checks the zones on their own and against the host's nodes; returns them for placement
/// to complete.
pub(super) fn validate(
    memory: &MemoryConfig,
    host: &dyn HostTopology,
) -> Result<Vec<MemoryZoneConfig>, ConfigError> {
    let zones = &memory.zones;
    if zones.is_empty() {
        return Err(ConfigError::NoMemory);
    }
    let mut ids = HashSet::new();
    let mut total_mib: u64 = 0;
    for z in zones {
        if !ids.insert(z.id.as_str()) {
            return Err(ConfigError::DuplicateZone(z.id.clone()));
        }
        if z.size_mib == 0 {
            return Err(ConfigError::ZeroMemory { id: z.id.clone() });
        }
        let page = z.backing.page_size();
        if (z.size_mib << 20) % page != 0 {
            return Err(ConfigError::Unaligned {
                id: z.id.clone(),
                size_mib: z.size_mib,
                page_kib: page >> 10,
            });
        }
        total_mib = total_mib.saturating_add(z.size_mib);
        if let Some(node) = z.host_node {
            let nodes = host.nodes();
            if !nodes.contains(&node) {
                return Err(ConfigError::NoSuchNode {
                    id: z.id.clone(),
                    node,
                    available: format_list(&nodes),
                });
            }
        }
    }
    if total_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::TooMuchMemory {
            total_mib,
            max_mib: MAX_MEMORY_MIB,
        });
    }
    Ok(zones.clone())
}

/// Sums hugepage demand per (page size, node) and compares it with the free pool, so a
/// short pool is reported at start with the number needed.
pub(super) fn check_hugepages(
    zones: &[MemoryZoneConfig],
    host: &dyn HostTopology,
) -> Result<(), ConfigError> {
    let mut demand: Vec<(u64, Option<u32>, u64)> = Vec::new();
    for z in zones.iter().filter(|z| z.backing.is_hugetlb()) {
        let page = z.backing.page_size();
        let pages = (z.size_mib << 20) / page;
        match demand
            .iter_mut()
            .find(|(p, n, _)| *p == page && *n == z.host_node)
        {
            Some(entry) => entry.2 += pages,
            None => demand.push((page, z.host_node, pages)),
        }
    }
    for (page, node, needed) in demand {
        let page_kib = page >> 10;
        let free = host.free_hugepages(page_kib, node);
        if free < needed {
            let total = host.total_hugepages(page_kib, node);
            let (where_, sysfs) = match node {
                Some(n) => (
                    format!(" on host node {n}"),
                    format!(
                        "/sys/devices/system/node/node{n}/hugepages/hugepages-{page_kib}kB/nr_hugepages"
                    ),
                ),
                None => (
                    String::new(),
                    format!("/sys/kernel/mm/hugepages/hugepages-{page_kib}kB/nr_hugepages"),
                ),
            };
            return Err(ConfigError::NotEnoughHugepages {
                needed,
                free,
                page_kib,
                where_,
                suggest: total + (needed - free),
                sysfs,
            });
        }
    }
    Ok(())
}

/// What the operator should know about the zones on this host (after placement).
pub(super) fn warnings(zones: &[MemoryZoneConfig], host: &dyn HostTopology) -> Vec<String> {
    let mut w = unbound_zone_warnings(zones, host);
    w.extend(thp_zone_warnings(zones, host));
    w
}

/// Zones the host's automatic NUMA balancing may migrate under the running guest: on a
/// multi-node host with it on, 4 KiB zones without `host_node` (an explicit binding exempts
/// a mapping; hugetlb pages are never moved by it). The guest stalls on every migrated page,
/// and so does the ai_infer daemon that maps the zone.
fn unbound_zone_warnings(zones: &[MemoryZoneConfig], host: &dyn HostTopology) -> Vec<String> {
    if host.nodes().len() < 2 || !host.numa_balancing() {
        return Vec::new();
    }
    zones
        .iter()
        .filter(|z| z.host_node.is_none() && !z.backing.is_hugetlb())
        .map(|z| {
            format!(
                "memory zone `{}` is not bound to a NUMA node and this host's automatic NUMA \
                 balancing is on: the kernel may migrate its pages while the guest runs; set \
                 host_node (or hugetlb backing) to pin it",
                z.id
            )
        })
        .collect()
}

/// 4 KiB zones that ask for transparent hugepages on a host whose THP settings give them
/// none (shared memory's `shmem_enabled` is `never` by default), so the guest runs on
/// 4 KiB pages after all.
fn thp_zone_warnings(zones: &[MemoryZoneConfig], host: &dyn HostTopology) -> Vec<String> {
    zones
        .iter()
        .filter(|z| z.transparent_hugepages && !z.backing.is_hugetlb())
        .filter_map(|z| {
            let shared = z.backing == Backing::Memfd;
            if host.transparent_hugepages(shared) != Some(false) {
                return None;
            }
            let knob = if shared { "shmem_enabled" } else { "enabled" };
            let mode = if shared { "advise" } else { "madvise" };
            Some(format!(
                "memory zone `{}` gets no transparent hugepages on this host \
                 (/sys/kernel/mm/transparent_hugepage/{knob}): the guest runs on 4 KiB pages; \
                 `echo {mode} > /sys/kernel/mm/transparent_hugepage/{knob}` or a hugetlb \
                 backing gives it 2 MiB pages",
                z.id
            ))
        })
        .collect()
}

fn format_list(v: &[u32]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::super::testing::{base, parse};
    use super::super::Overrides;
    use super::*;
    use crate::test_support::FakeSys;

    #[test]
    fn zero_memory_is_rejected() {
        let sys = FakeSys::new("zero", 0);
        let cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 0")).unwrap();
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::ZeroMemory { .. }), "{err}");
        assert!(err.to_string().contains("size 0"));
    }

    #[test]
    fn no_zone_at_all_is_rejected() {
        let sys = FakeSys::new("nozone", 0);
        let cfg = parse(&format!("[boot]\nkernel = \"{}\"\n", sys.kernel())).unwrap();
        assert!(matches!(
            cfg.validate(&sys.host(), 64),
            Err(ConfigError::NoMemory)
        ));
    }

    #[test]
    fn zone_ids_are_unique_and_the_total_is_bounded() {
        let sys = FakeSys::new("zone-ids", 0);
        let text = base(&sys, "id = \"m\"\nsize_mib = 32")
            + "[[memory.zones]]\nid = \"m\"\nsize_mib = 32\n";
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert_eq!(err.to_string(), "memory zone id 'm' is used twice");
        let big = format!("id = \"m\"\nsize_mib = {}", MAX_MEMORY_MIB + 1);
        let err = parse(&base(&sys, &big))
            .unwrap()
            .validate(&sys.host(), 64)
            .unwrap_err();
        assert!(matches!(err, ConfigError::TooMuchMemory { .. }), "{err}");
    }

    #[test]
    fn missing_numa_node_names_the_available_ones() {
        let sys = FakeSys::new("node", 0);
        let cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32\nhost_node = 7")).unwrap();
        let msg = cfg.validate(&sys.host(), 64).unwrap_err().to_string();
        assert!(msg.contains("node 7") && msg.contains("0,1"), "{msg}");
    }

    #[test]
    fn short_hugepage_pool_says_how_many_are_needed() {
        let sys = FakeSys::new("hp", 10);
        let cfg = parse(&base(
            &sys,
            "id = \"m\"\nsize_mib = 64\nbacking = \"hugetlb-2m\"\nhost_node = 1",
        ))
        .unwrap();
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        match &err {
            ConfigError::NotEnoughHugepages {
                needed,
                free,
                suggest,
                ..
            } => assert_eq!((*needed, *free, *suggest), (32, 10, 38)),
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("node1/hugepages/hugepages-2048kB"));
    }

    #[test]
    fn hugepage_size_alignment_is_checked() {
        let sys = FakeSys::new("align", 16);
        let cfg = parse(&base(
            &sys,
            "id = \"m\"\nsize_mib = 3\nbacking = \"hugetlb-2m\"",
        ))
        .unwrap();
        assert!(matches!(
            cfg.validate(&sys.host(), 64),
            Err(ConfigError::Unaligned { .. })
        ));
    }

    #[test]
    fn memory_override_resizes_a_single_zone_or_replaces_many() {
        let sys = FakeSys::new("override", 16);
        let mut cfg = parse(&base(
            &sys,
            "id = \"m\"\nsize_mib = 32\nbacking = \"hugetlb-2m\"",
        ))
        .unwrap();
        cfg.apply(&Overrides {
            memory_mib: Some(64),
            vcpus: Some(1),
            cmdline: Some("quiet".into()),
            ..Default::default()
        });
        assert_eq!(cfg.memory.zones[0].size_mib, 64);
        assert_eq!(cfg.memory.zones[0].backing, Backing::Hugetlb2M);
        assert_eq!(cfg.machine.vcpus, 1);
        assert_eq!(cfg.boot.cmdline, "quiet");

        cfg.memory.zones.push(MemoryZoneConfig::memfd("n", 32));
        cfg.apply(&Overrides {
            memory_mib: Some(128),
            ..Default::default()
        });
        assert_eq!(cfg.memory.zones, vec![MemoryZoneConfig::memfd("mem0", 128)]);
    }

    #[test]
    fn zone_defaults() {
        let cfg = parse("[[memory.zones]]\nid = \"m\"\nsize_mib = 32\n").unwrap();
        assert_eq!(cfg.memory.zones, vec![MemoryZoneConfig::memfd("m", 32)]);
    }

    /// The start-up warnings of a config with `zone` as its one zone, on `sys`.
    fn zone_warnings(sys: &FakeSys, zone: &str) -> Vec<String> {
        parse(&base(sys, zone))
            .unwrap()
            .validate(&sys.host(), 64)
            .unwrap()
            .warnings
    }

    #[test]
    fn unbound_small_page_zones_warn_when_numa_balancing_is_on() {
        let sys = FakeSys::new("numa-balancing", 16);
        let warnings = |zone: &str| zone_warnings(&sys, zone);
        let unbound = "id = \"m\"\nsize_mib = 32\nbacking = \"memfd\"";
        // No procfs knob (or off): nothing to say.
        assert!(warnings(unbound).is_empty());
        std::fs::create_dir_all(sys.root().join("proc/sys/kernel")).unwrap();
        std::fs::write(sys.root().join("proc/sys/kernel/numa_balancing"), "0\n").unwrap();
        assert!(warnings(unbound).is_empty());

        std::fs::write(sys.root().join("proc/sys/kernel/numa_balancing"), "1\n").unwrap();
        let w = warnings(unbound);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("`m`") && w[0].contains("host_node"), "{w:?}");
        assert!(warnings(&format!("{unbound}\nhost_node = 0")).is_empty());
        // Unbound hugetlb comes from the global pool.
        let pool = sys.root().join("kernel/mm/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::write(pool.join("free_hugepages"), "16\n").unwrap();
        assert!(warnings("id = \"m\"\nsize_mib = 32\nbacking = \"hugetlb-2m\"").is_empty());
    }

    #[test]
    fn small_page_zones_warn_when_the_host_gives_them_no_thp() {
        let sys = FakeSys::new("thp", 16);
        let warnings = |zone: &str| zone_warnings(&sys, zone);
        let memfd = "id = \"m\"\nsize_mib = 32";
        let anon = "id = \"a\"\nsize_mib = 32\nbacking = \"anonymous\"";
        // A kernel that does not say (no THP knobs): nothing to warn about.
        assert!(warnings(memfd).is_empty());
        let knobs = sys.root().join("kernel/mm/transparent_hugepage");
        std::fs::create_dir_all(&knobs).unwrap();
        std::fs::write(knobs.join("enabled"), "always [madvise] never\n").unwrap();
        std::fs::write(
            knobs.join("shmem_enabled"),
            "always within_size advise [never] deny force\n",
        )
        .unwrap();
        let w = warnings(memfd);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("`m`") && w[0].contains("shmem_enabled"),
            "{w:?}"
        );
        assert!(warnings(anon).is_empty());
        assert!(warnings(&format!("{memfd}\ntransparent_hugepages = false")).is_empty());

        std::fs::write(
            knobs.join("shmem_enabled"),
            "always within_size [advise] never deny force\n",
        )
        .unwrap();
        assert!(warnings(memfd).is_empty());
        std::fs::write(knobs.join("enabled"), "always madvise [never]\n").unwrap();
        let w = warnings(anon);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("`a`") && w[0].contains("echo madvise"),
            "{w:?}"
        );
    }
}
