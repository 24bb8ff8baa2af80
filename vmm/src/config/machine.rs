//! `[machine]`: the vCPUs and the host CPUs their threads run on.

use serde::Deserialize;

use super::{ConfigError, MemoryZoneConfig};
use crate::host::{CpuSet, HostTopology};

/// The MP table (in the 1 KiB EBDA) describes at most this many vCPUs.
pub const MAX_VCPUS: u8 = crate::arch::x86_64::mptable::MAX_CPUS;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u64,
    /// Host CPUs the vCPU threads are pinned to, e.g. "0-3,8". Default: the CPUs of the
    /// first zone's host node, or no pinning when no zone names a node.
    #[serde(default)]
    pub cpus: Option<String>,
    /// How long (ns) KVM keeps a vCPU thread polling on its host CPU after the guest
    /// halts, for a wake-up that would spare it a sleep. Unset: the host's
    /// `kvm.halt_poll_ns` (KVM's default 200000). 0: an idle vCPU gives its CPU back at
    /// once, to the other tenants and ai-inferd's executors on a shared host. At most
    /// 4294967295 (KVM's limit).
    #[serde(default)]
    pub halt_poll_ns: Option<u64>,
}

fn default_vcpus() -> u64 {
    1
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            cpus: None,
            halt_poll_ns: None,
        }
    }
}

/// A `[machine]` that passed its checks.
pub(super) struct Machine {
    pub vcpus: u8,
    /// `cpus`, parsed; every CPU in it is online.
    pub cpus: Option<CpuSet>,
    pub halt_poll_ns: Option<u32>,
}

/// Checks the vCPU count against the MP table's and KVM's limits (`kvm_max_vcpus`), and
/// that every CPU of `cpus` is online on the host.
pub(super) fn validate(
    m: &MachineConfig,
    kvm_max_vcpus: usize,
    host: &dyn HostTopology,
) -> Result<Machine, ConfigError> {
    let max = u64::from(MAX_VCPUS);
    let vcpus = match u8::try_from(m.vcpus) {
        Ok(v) if v != 0 && m.vcpus <= max => v,
        _ => {
            return Err(ConfigError::Vcpus {
                value: m.vcpus,
                max,
            })
        }
    };
    if usize::from(vcpus) > kvm_max_vcpus {
        return Err(ConfigError::KvmVcpuLimit {
            vcpus,
            max: kvm_max_vcpus,
        });
    }
    let cpus = m
        .cpus
        .as_deref()
        .map(|s| {
            CpuSet::parse(s).map_err(|reason| ConfigError::CpuSet {
                field: "machine.cpus",
                value: s.to_string(),
                reason,
            })
        })
        .transpose()?;
    if let Some(set) = &cpus {
        let online = host.online_cpus();
        if let Some(cpu) = set.iter().find(|c| !online.contains(*c)) {
            return Err(ConfigError::NoSuchCpu {
                field: "machine.cpus",
                cpu,
                online: online.to_string(),
            });
        }
    }
    let halt_poll_ns = m
        .halt_poll_ns
        .map(|ns| u32::try_from(ns).map_err(|_| ConfigError::HaltPoll(ns)))
        .transpose()?;
    Ok(Machine {
        vcpus,
        cpus,
        halt_poll_ns,
    })
}

/// Where the vCPU threads are pinned: the explicit set, else the CPUs placement chose
/// (the passthrough devices' node), else those of the first zone bound to a node, else
/// nowhere.
pub(super) fn vcpu_affinity(
    explicit: Option<CpuSet>,
    placed: Option<CpuSet>,
    zones: &[MemoryZoneConfig],
    host: &dyn HostTopology,
) -> Option<CpuSet> {
    explicit.or(placed).or_else(|| {
        zones
            .iter()
            .find_map(|z| z.host_node)
            .and_then(|n| host.node_cpus(n))
            .filter(|s| !s.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{base, parse};
    use super::*;
    use crate::test_support::FakeSys;

    #[test]
    fn vcpu_limits_from_config_and_kvm() {
        let sys = FakeSys::new("vcpus", 0);
        let mut cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32")).unwrap();
        cfg.machine.vcpus = 0;
        assert!(matches!(
            cfg.validate(&sys.host(), 64),
            Err(ConfigError::Vcpus { .. })
        ));
        cfg.machine.vcpus = u64::from(MAX_VCPUS) + 1;
        assert!(matches!(
            cfg.validate(&sys.host(), 64),
            Err(ConfigError::Vcpus { .. })
        ));
        cfg.machine.vcpus = 1 << 40;
        assert!(matches!(
            cfg.validate(&sys.host(), 64),
            Err(ConfigError::Vcpus { .. })
        ));
        cfg.machine.vcpus = 8;
        let msg = cfg.validate(&sys.host(), 4).unwrap_err().to_string();
        assert!(msg.contains("more vCPUs (8) than KVM allows"), "{msg}");
    }

    #[test]
    fn halt_polling_is_the_hosts_unless_set_and_within_kvms_limit() {
        let sys = FakeSys::new("halt-poll", 0);
        let cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32")).unwrap();
        assert_eq!(cfg.validate(&sys.host(), 64).unwrap().halt_poll_ns, None);
        let text = base(&sys, "id = \"m\"\nsize_mib = 32")
            .replace("vcpus = 2\n", "vcpus = 2\nhalt_poll_ns = 0\n");
        let mut cfg = parse(&text).unwrap();
        assert_eq!(cfg.validate(&sys.host(), 64).unwrap().halt_poll_ns, Some(0));
        cfg.machine.halt_poll_ns = Some(u64::from(u32::MAX));
        assert_eq!(
            cfg.validate(&sys.host(), 64).unwrap().halt_poll_ns,
            Some(u32::MAX)
        );
        cfg.machine.halt_poll_ns = Some(u64::from(u32::MAX) + 1);
        let msg = cfg.validate(&sys.host(), 64).unwrap_err().to_string();
        assert!(msg.contains("machine.halt_poll_ns"), "{msg}");
    }

    #[test]
    fn cpu_set_must_exist_on_the_host() {
        let sys = FakeSys::new("cpus", 0);
        let mut cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32")).unwrap();
        cfg.machine.cpus = Some("0-3".into());
        let msg = cfg.validate(&sys.host(), 64).unwrap_err().to_string();
        assert!(msg.contains("CPU 2"), "{msg}");
        cfg.machine.cpus = Some("1-0".into());
        assert!(matches!(
            cfg.validate(&sys.host(), 64),
            Err(ConfigError::CpuSet { .. })
        ));
    }

    #[test]
    fn default_machine_is_one_unpinned_vcpu() {
        let m = MachineConfig::default();
        assert_eq!((m.vcpus, m.cpus), (1, None));
        let cfg = parse("[machine]\n").unwrap();
        assert_eq!(cfg.machine, MachineConfig::default());
    }
}
