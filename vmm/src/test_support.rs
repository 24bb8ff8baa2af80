//! A fake sysfs tree for unit tests of config validation and passthrough checks.

use std::path::Path;

use crate::host::SysfsHost;
use crate::passthrough::MemlockLimit;

/// A fake sysfs: 2 nodes (CPUs 0 and 1), node 1 with `free1` of 16 2 MiB hugepages free,
/// a kernel image, and PCI devices added with [`FakeSys::pci_device`].
pub struct FakeSys {
    root: tempfile::TempDir,
}

impl FakeSys {
    pub fn new(name: &str, free1: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("aivmm-fakesys-{name}-"))
            .tempdir()
            .unwrap();
        let root = dir.path();
        for (n, cpus, free) in [(0, "0", 0u64), (1, "1", free1)] {
            let hp = root.join(format!(
                "devices/system/node/node{n}/hugepages/hugepages-2048kB"
            ));
            std::fs::create_dir_all(&hp).unwrap();
            std::fs::write(hp.join("free_hugepages"), format!("{free}\n")).unwrap();
            std::fs::write(hp.join("nr_hugepages"), "16\n").unwrap();
            std::fs::write(
                root.join(format!("devices/system/node/node{n}/cpulist")),
                format!("{cpus}\n"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(root.join("devices/system/cpu")).unwrap();
        std::fs::write(root.join("devices/system/cpu/online"), "0-1\n").unwrap();
        // A host with sysfs and no interface yet (without the directory, taps are unknown).
        std::fs::create_dir_all(root.join("class/net")).unwrap();
        std::fs::write(root.join("vmlinuz"), b"kernel").unwrap();
        FakeSys { root: dir }
    }

    /// The host as validation sees it, with unlimited memory locking.
    pub fn host(&self) -> SysfsHost {
        SysfsHost::with_root(self.root.path()).with_memlock(MemlockLimit {
            soft: u64::MAX,
            hard: u64::MAX,
            ipc_lock: false,
        })
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn kernel(&self) -> String {
        self.root.path().join("vmlinuz").display().to_string()
    }

    /// Adds (or replaces) PCI function `name` bound to `driver`, in IOMMU group `group`
    /// (with its `/dev/vfio/N` file), on NUMA node `node` (-1: none), a bridge or not.
    pub fn pci_device(
        &self,
        name: &str,
        driver: Option<&str>,
        group: Option<u32>,
        node: i32,
        bridge: bool,
    ) {
        let dir = self.root.path().join("bus/pci/devices").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for link in ["driver", "iommu_group"] {
            let _ = std::fs::remove_file(dir.join(link));
        }
        if let Some(d) = driver {
            std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{d}"), dir.join("driver"))
                .unwrap();
        }
        if let Some(g) = group {
            let members = self
                .root
                .path()
                .join(format!("kernel/iommu_groups/{g}/devices"));
            std::fs::create_dir_all(&members).unwrap();
            std::fs::write(members.join(name), b"").unwrap();
            std::os::unix::fs::symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                dir.join("iommu_group"),
            )
            .unwrap();
            std::fs::create_dir_all(self.root.path().join("dev/vfio")).unwrap();
            std::fs::write(self.root.path().join(format!("dev/vfio/{g}")), b"").unwrap();
        }
        std::fs::write(dir.join("numa_node"), format!("{node}\n")).unwrap();
        let mut config = vec![0u8; 64];
        config[0x0e] = if bridge { 0x01 } else { 0x00 };
        std::fs::write(dir.join("config"), config).unwrap();
    }
}
