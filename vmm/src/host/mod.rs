//! What the host offers, read from sysfs and procfs: NUMA nodes, their CPUs and hugepage
//! pools, the memory lock limits, network interfaces.
//!
//! Facts only, no policy: this module imports nothing from the config, the passthrough checks
//! or the placement, which all build on it. Behind traits so config validation can be tested
//! against a fake sysfs tree.

mod cpu_set;
mod memlock;
mod net;

use std::path::{Path, PathBuf};

pub use cpu_set::CpuSet;
pub use memlock::MemlockLimit;
pub use net::{NetInterface, NetInterfaces};

/// Host facts needed to validate and place a VM.
pub trait HostTopology {
    /// NUMA node ids present on the host (a non-NUMA host reports node 0).
    fn nodes(&self) -> Vec<u32>;
    fn node_cpus(&self, node: u32) -> Option<CpuSet>;
    fn online_cpus(&self) -> CpuSet;
    /// Free hugepages of `page_kib` size on `node`, or in the whole pool for `None`.
    fn free_hugepages(&self, page_kib: u64, node: Option<u32>) -> u64;
    fn total_hugepages(&self, page_kib: u64, node: Option<u32>) -> u64;
    /// Whether the kernel's automatic NUMA balancing is on: it migrates the pages of memory
    /// that no policy binds, guest memory included, while the guest runs.
    fn numa_balancing(&self) -> bool;
    /// Whether the kernel backs a mapping that asks for it (MADV_HUGEPAGE) with transparent
    /// hugepages: `shared` for shmem/memfd memory, else private anonymous memory. `None` when
    /// the kernel does not say (no THP support, or no sysfs).
    fn transparent_hugepages(&self, shared: bool) -> Option<bool>;
}

/// Reads the real host (or a fake tree rooted elsewhere, for tests).
pub struct SysfsHost {
    root: PathBuf,
    /// Where device nodes live (`/dev`); VFIO group files are under `vfio/`.
    dev_root: PathBuf,
    /// procfs (`/proc`).
    proc_root: PathBuf,
    /// Memory lock limits to report instead of this process's own.
    memlock: Option<MemlockLimit>,
}

impl Default for SysfsHost {
    fn default() -> Self {
        SysfsHost {
            root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            proc_root: PathBuf::from("/proc"),
            memlock: None,
        }
    }
}

impl SysfsHost {
    /// A host whose sysfs is `root`, whose `/dev` is `root/dev` and whose `/proc` is
    /// `root/proc` (a fake tree).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        SysfsHost {
            dev_root: root.join("dev"),
            proc_root: root.join("proc"),
            root,
            memlock: None,
        }
    }

    /// Reports `limit` as the memory lock limits instead of reading them.
    pub fn with_memlock(mut self, limit: MemlockLimit) -> Self {
        self.memlock = Some(limit);
        self
    }

    /// The sysfs root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `/dev` root.
    pub fn dev_root(&self) -> &Path {
        &self.dev_root
    }

    /// The limits given with [`Self::with_memlock`], if any.
    pub fn memlock_override(&self) -> Option<MemlockLimit> {
        self.memlock
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    fn hugepage_count(&self, page_kib: u64, node: Option<u32>, file: &str) -> u64 {
        let rel = match node {
            Some(n) => {
                format!("devices/system/node/node{n}/hugepages/hugepages-{page_kib}kB/{file}")
            }
            None => format!("kernel/mm/hugepages/hugepages-{page_kib}kB/{file}"),
        };
        self.read(&rel)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl HostTopology for SysfsHost {
    fn nodes(&self) -> Vec<u32> {
        let dir = self.root.join("devices/system/node");
        let mut nodes: Vec<u32> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_prefix("node"))
                            .and_then(|n| n.parse().ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        if nodes.is_empty() {
            // Kernels built without NUMA have no node directory: everything is node 0.
            nodes.push(0);
        }
        nodes.sort_unstable();
        nodes
    }

    fn node_cpus(&self, node: u32) -> Option<CpuSet> {
        match self.read(&format!("devices/system/node/node{node}/cpulist")) {
            Some(s) => CpuSet::parse(&s).ok(),
            None if node == 0 => Some(self.online_cpus()),
            None => None,
        }
    }

    fn online_cpus(&self) -> CpuSet {
        self.read("devices/system/cpu/online")
            .and_then(|s| CpuSet::parse(&s).ok())
            .unwrap_or_default()
    }

    fn free_hugepages(&self, page_kib: u64, node: Option<u32>) -> u64 {
        self.hugepage_count(page_kib, node, "free_hugepages")
    }

    fn total_hugepages(&self, page_kib: u64, node: Option<u32>) -> u64 {
        self.hugepage_count(page_kib, node, "nr_hugepages")
    }

    fn numa_balancing(&self) -> bool {
        // 0 = off; 1 = on; 2 = memory tiering only (does not move pages between DRAM nodes).
        std::fs::read_to_string(self.proc_root.join("sys/kernel/numa_balancing"))
            .is_ok_and(|s| s.trim() == "1")
    }

    fn transparent_hugepages(&self, shared: bool) -> Option<bool> {
        // The active mode is the bracketed word, e.g. "always [madvise] never".
        let (file, yes): (&str, &[&str]) = if shared {
            (
                "shmem_enabled",
                &["always", "within_size", "advise", "force"],
            )
        } else {
            ("enabled", &["always", "madvise"])
        };
        let modes = self.read(&format!("kernel/mm/transparent_hugepage/{file}"))?;
        let start = modes.find('[')? + 1;
        let end = start + modes[start..].find(']')?;
        Some(yes.contains(&&modes[start..end]))
    }
}
