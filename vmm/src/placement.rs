//! Placement policy: which host NUMA node a tenant's memory zones and vCPUs go to when its
//! passthrough devices sit on one, and what the operator should hear when the config places
//! them elsewhere.
//!
//! Policy only: the host facts come from [`crate::host`], the devices from
//! [`crate::passthrough`]; the config calls this and knows nothing of how it decides.

use crate::host::{CpuSet, HostTopology};
use crate::passthrough::PassthroughDevice;

/// A memory zone as placement sees it: its name (for warnings) and its host node, which
/// placement fills in when the config left it open.
#[derive(Debug)]
pub struct ZoneNode<'a> {
    pub id: &'a str,
    pub host_node: &'a mut Option<u32>,
}

/// Where a tenant with passthrough devices is placed, and what the operator should hear
/// about an explicit placement that moves it away from its devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The devices' node (the first device's when they disagree).
    pub node: Option<u32>,
    /// The CPUs of that node: the default vCPU affinity.
    pub cpus: Option<CpuSet>,
    pub warnings: Vec<String>,
}

/// Binds every zone without `host_node` to the devices' node and reports zones and an
/// explicit vCPU set that cross to other nodes.
pub fn place_near_devices(
    devices: &[PassthroughDevice],
    zones: &mut [ZoneNode<'_>],
    explicit_cpus: Option<&CpuSet>,
    host: &dyn HostTopology,
) -> Placement {
    let mut warnings = Vec::new();
    let nodes = host.nodes();
    let mut node = None;
    for d in devices {
        match (d.numa_node, node) {
            (Some(n), _) if !nodes.contains(&n) => warnings.push(format!(
                "passthrough device {} reports NUMA node {n}, which the host does not list; \
                 it is not used for placement",
                d.addr
            )),
            (Some(n), None) => node = Some((n, d.addr)),
            (Some(n), Some((first, first_addr))) if n != first => warnings.push(format!(
                "passthrough devices {first_addr} (node {first}) and {} (node {n}) sit on \
                 different NUMA nodes; the tenant is placed on node {first}",
                d.addr
            )),
            _ => {}
        }
    }
    let Some((node, dev)) = node else {
        return Placement {
            warnings,
            ..Placement::default()
        };
    };
    for z in zones.iter_mut() {
        match *z.host_node {
            None => *z.host_node = Some(node),
            Some(n) if n != node => warnings.push(format!(
                "memory zone '{}' is on host node {n} but passthrough device {dev} is on node \
                 {node}: its DMA crosses NUMA nodes",
                z.id
            )),
            Some(_) => {}
        }
    }
    let cpus = host.node_cpus(node).filter(|c| !c.is_empty());
    if let (Some(explicit), Some(local)) = (explicit_cpus, &cpus) {
        let remote: Vec<usize> = explicit.iter().filter(|c| !local.contains(*c)).collect();
        if !remote.is_empty() {
            warnings.push(format!(
                "machine.cpus {explicit} includes CPUs {} outside node {node} of passthrough \
                 device {dev} (its CPUs: {local})",
                CpuSet::from_cpus(remote)
            ));
        }
    }
    Placement {
        node: Some(node),
        cpus,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::test_support::FakeSys;

    fn device(node: Option<u32>, a: &str) -> PassthroughDevice {
        PassthroughDevice {
            addr: a.parse().unwrap(),
            sysfs_path: PathBuf::new(),
            iommu_group: 1,
            numa_node: node,
            mmap: true,
        }
    }

    /// Places zones named `a`, `b`, ... with the given nodes; returns the placement and the
    /// zones' nodes afterwards.
    fn place(
        devices: &[PassthroughDevice],
        mut nodes: Vec<Option<u32>>,
        explicit_cpus: Option<&CpuSet>,
        host: &dyn HostTopology,
    ) -> (Placement, Vec<Option<u32>>) {
        let ids = ["a", "b", "c"];
        let mut zones: Vec<ZoneNode<'_>> = nodes
            .iter_mut()
            .zip(ids)
            .map(|(host_node, id)| ZoneNode { id, host_node })
            .collect();
        let p = place_near_devices(devices, &mut zones, explicit_cpus, host);
        drop(zones);
        (p, nodes)
    }

    #[test]
    fn zones_and_vcpus_default_to_the_device_node() {
        let sys = FakeSys::new("pt-place", 0);
        let (p, nodes) = place(
            &[device(Some(1), "0000:81:00.0")],
            vec![None, Some(1)],
            None,
            &sys.host(),
        );
        assert_eq!(nodes, vec![Some(1), Some(1)]);
        assert_eq!(p.node, Some(1));
        assert_eq!(p.cpus, Some(CpuSet::from_cpus([1])));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn explicit_placement_across_nodes_warns() {
        let sys = FakeSys::new("pt-cross", 0);
        let (p, nodes) = place(
            &[
                device(Some(1), "0000:81:00.0"),
                device(Some(0), "0000:01:00.0"),
                device(Some(9), "0000:02:00.0"),
            ],
            vec![Some(0)],
            Some(&CpuSet::from_cpus([0, 1])),
            &sys.host(),
        );
        assert_eq!(nodes, vec![Some(0)], "explicit node kept");
        assert_eq!(p.node, Some(1));
        let all = p.warnings.join("\n");
        assert_eq!(p.warnings.len(), 4, "{all}");
        assert!(all.contains("memory zone 'a' is on host node 0"), "{all}");
        assert!(all.contains("includes CPUs 0 outside node 1"), "{all}");
        assert!(all.contains("different NUMA nodes"), "{all}");
        assert!(
            all.contains("NUMA node 9, which the host does not list"),
            "{all}"
        );
    }

    #[test]
    fn devices_without_a_node_leave_placement_alone() {
        let sys = FakeSys::new("pt-nonode", 0);
        let (p, nodes) = place(
            &[device(None, "0000:81:00.0")],
            vec![None],
            None,
            &sys.host(),
        );
        assert_eq!(p, Placement::default());
        assert_eq!(nodes, vec![None]);
    }
}
