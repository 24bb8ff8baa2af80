//! `[[passthrough]]`: host PCI devices given to the guest with VFIO. The host checks live in
//! [`crate::passthrough`], the NUMA placement they imply in [`crate::placement`].

use serde::Deserialize;

use super::{ConfigError, MemoryZoneConfig};
use crate::host::MemlockLimit;
use crate::passthrough::{self as host_pci, DeviceRequest, PassthroughDevice, PciHost};

/// A host PCI device given to the guest with VFIO (`[[passthrough]]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassthroughConfig {
    /// The host device: its PCI address (`"0000:81:00.0"`, or `"81:00.0"` in domain 0) or
    /// its sysfs directory (`"/sys/bus/pci/devices/0000:81:00.0"`). It must be bound to
    /// vfio-pci. By default the tenant's memory zones and vCPUs go to its NUMA node.
    pub device: String,
    /// Map the device's BARs into the guest so its accesses go straight to the device
    /// (default). `false` traps every BAR access in the VMM: for debugging, and to measure
    /// what the mapped path saves.
    #[serde(default = "super::default_true")]
    pub mmap: bool,
}

/// Checks every device on the host (exists, on vfio-pci, a viable IOMMU group), in order.
pub(super) fn validate(
    entries: &[PassthroughConfig],
    host: &dyn PciHost,
) -> Result<Vec<PassthroughDevice>, ConfigError> {
    let requests: Vec<DeviceRequest<'_>> = entries
        .iter()
        .map(|e| DeviceRequest {
            device: &e.device,
            mmap: e.mmap,
        })
        .collect();
    Ok(host_pci::resolve(&requests, host)?)
}

/// The soft RLIMIT_MEMLOCK to raise to before VFIO pins the zones, if any: `None` without
/// devices or when `limit` already covers them.
pub(super) fn memlock_raise(
    devices: &[PassthroughDevice],
    zones: &[MemoryZoneConfig],
    limit: impl FnOnce() -> MemlockLimit,
) -> Result<Option<u64>, ConfigError> {
    if devices.is_empty() {
        return Ok(None);
    }
    Ok(host_pci::check_memlock(memlock_needed(zones), limit())?)
}

/// Bytes of guest RAM VFIO pins, plus the zones that are mlocked themselves (the kernel
/// charges both to the same `locked_vm` count). Hugetlb zones are never charged by mlock.
pub fn memlock_needed(zones: &[MemoryZoneConfig]) -> u64 {
    let ram: u64 = zones.iter().map(|z| z.size_mib << 20).sum();
    let mlocked: u64 = zones
        .iter()
        .filter(|z| z.lock && !z.backing.is_hugetlb())
        .map(|z| z.size_mib << 20)
        .sum();
    ram.saturating_add(mlocked)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{base, parse, pt_base};
    use super::super::Backing;
    use super::*;
    use crate::host::CpuSet;
    use crate::test_support::FakeSys;

    #[test]
    fn memlock_needs_ram_plus_mlocked_small_pages() {
        let mut zones = vec![
            MemoryZoneConfig::memfd("a", 64),
            MemoryZoneConfig::memfd("b", 32),
        ];
        zones[1].lock = true;
        assert_eq!(memlock_needed(&zones), (64 + 32 + 32) << 20);
        zones[1].backing = Backing::Hugetlb2M;
        assert_eq!(memlock_needed(&zones), (64 + 32) << 20);
    }

    #[test]
    fn passthrough_device_places_zones_and_vcpus_on_its_node() {
        let sys = FakeSys::new("pt-config", 16);
        sys.pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32\nbacking = \"hugetlb-2m\"")
            + "[[passthrough]]\ndevice = \"/sys/bus/pci/devices/0000:81:00.0\"\n";
        let v = parse(&text).unwrap().validate(&sys.host(), 64).unwrap();
        assert_eq!(v.zones[0].host_node, Some(1));
        assert_eq!(v.vcpu_affinity, Some(CpuSet::from_cpus([1])));
        assert_eq!(v.passthrough.len(), 1);
        assert_eq!(v.passthrough[0].iommu_group, 7);
        assert!(v.passthrough[0].mmap, "BARs are mapped by default");
        assert_eq!(v.memlock_raise, None);
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);

        // The hugepage check follows the zone to the device's node: node 1 has only 10 free.
        let sys = FakeSys::new("pt-config-hp", 10);
        sys.pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32\nbacking = \"hugetlb-2m\"")
            + "[[passthrough]]\ndevice = \"0000:81:00.0\"\n";
        let msg = parse(&text)
            .unwrap()
            .validate(&sys.host(), 64)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("on host node 1"), "{msg}");
    }

    #[test]
    fn passthrough_problems_are_config_errors() {
        let sys = FakeSys::new("pt-config-err", 16);
        sys.pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        let off = parse("[[passthrough]]\ndevice = \"0000:81:00.0\"\nmmap = false\n").unwrap();
        assert!(!off.passthrough[0].mmap);
        let err = parse("[[passthrough]]\ndevice = \"0000:81:00.0\"\nbar = 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `bar`"), "{err}");

        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 64")
            + "[[passthrough]]\ndevice = \"0000:81:00.1\"\n";
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::Passthrough(_)), "{err}");

        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 64")
            + "[[passthrough]]\ndevice = \"0000:81:00.0\"\n";
        let low = crate::passthrough::MemlockLimit {
            soft: 8 << 20,
            hard: 16 << 20,
            ipc_lock: false,
        };
        let msg = parse(&text)
            .unwrap()
            .validate(&sys.host().with_memlock(low), 64)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("pins 64 MiB") && msg.contains("RLIMIT_MEMLOCK"),
            "{msg}"
        );
        let enough = crate::passthrough::MemlockLimit {
            hard: 1 << 30,
            ..low
        };
        let v = parse(&text)
            .unwrap()
            .validate(&sys.host().with_memlock(enough), 64)
            .unwrap();
        assert_eq!(v.memlock_raise, Some(64 << 20));

        let text = base(&sys, "id = \"m\"\nsize_mib = 64")
            + "[[passthrough]]\ndevice = \"0000:81:00.0\"\n";
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::PassthroughPciOff), "{err}");
    }

    #[test]
    fn explicit_cpus_across_nodes_warn_but_validate() {
        let sys = FakeSys::new("pt-config-warn", 16);
        sys.pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32\nhost_node = 0")
            + "[[passthrough]]\ndevice = \"0000:81:00.0\"\n";
        let mut cfg = parse(&text).unwrap();
        cfg.machine.cpus = Some("0".into());
        let v = cfg.validate(&sys.host(), 64).unwrap();
        assert_eq!(v.zones[0].host_node, Some(0));
        assert_eq!(v.vcpu_affinity, Some(CpuSet::from_cpus([0])));
        assert_eq!(v.warnings.len(), 2, "{:?}", v.warnings);
    }
}
