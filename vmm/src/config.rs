//! Tenant microVM configuration: plain serde types, loaded from TOML, overridden from the CLI
//! and validated once, before any resource is allocated.
//!
//! Every field is documented in `configs/README.md`; defaults live here, next to the types.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::host::{CpuSet, HostTopology};
use crate::passthrough::{self, PassthroughDevice, PassthroughError, PciHost};

/// Largest kernel command line we accept (the boot protocol's `cmdline_size` is checked later
/// against the kernel's own limit).
pub const MAX_CMDLINE_LEN: usize = 4096;
/// The MP table (in the 1 KiB EBDA) describes at most this many vCPUs.
pub const MAX_VCPUS: u8 = crate::arch::x86_64::mptable::MAX_CPUS;
/// The guest-physical range we can place RAM in (below the 40-bit physical address width
/// every x86_64 CPU we target supports).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("machine.vcpus must be between 1 and {max} (got {value})")]
    Vcpus { value: u64, max: u64 },
    #[error("no memory zone configured: add a [[memory.zones]] entry or pass --memory")]
    NoMemory,
    #[error("memory zone '{id}' has size 0: give it size_mib > 0")]
    ZeroMemory { id: String },
    #[error(
        "memory zone '{id}' size {size_mib} MiB is not a multiple of its {page_kib} KiB page size"
    )]
    Unaligned {
        id: String,
        size_mib: u64,
        page_kib: u64,
    },
    #[error("total guest memory {total_mib} MiB exceeds the limit of {max_mib} MiB")]
    TooMuchMemory { total_mib: u64, max_mib: u64 },
    #[error("memory zone id '{0}' is used twice")]
    DuplicateZone(String),
    #[error("memory zone '{id}' wants host NUMA node {node}, which does not exist (host nodes: {available})")]
    NoSuchNode {
        id: String,
        node: u32,
        available: String,
    },
    #[error(
        "memory zone(s) need {needed} free {page_kib} KiB hugepages{where_}, only {free} are free; \
         reserve them first, e.g. echo {suggest} > {sysfs}"
    )]
    NotEnoughHugepages {
        needed: u64,
        free: u64,
        page_kib: u64,
        where_: String,
        suggest: u64,
        sysfs: String,
    },
    #[error("{what} {path} is not readable: {source}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("boot.kernel is not set: give it in the config or with --kernel")]
    NoKernel,
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid CPU set '{value}' in {field}: {reason}")]
    CpuSet {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field} names CPU {cpu}, which this host does not have (online: {online})")]
    NoSuchCpu {
        field: &'static str,
        cpu: usize,
        online: String,
    },
    #[error("console.mode = \"file\" needs console.path")]
    ConsoleNeedsPath,
    #[error("more vCPUs ({vcpus}) than KVM allows on this host ({max})")]
    KvmVcpuLimit { vcpus: u8, max: usize },
    #[error(
        "ai_infer needs guest memory the daemon can map, but memory zone '{id}' is anonymous: \
         use backing = \"memfd\" or a hugetlb backing"
    )]
    AiInferNeedsSharedMemory { id: String },
    #[error("ai_infer.{field} = {value} is out of range ({allowed})")]
    AiInferRange {
        field: &'static str,
        value: u64,
        allowed: &'static str,
    },
    #[error("ai_infer.socket is empty: give the path of the ai-inferd socket for this tenant")]
    AiInferNoSocket,
    #[error("ai_infer is a PCI device, but the kernel command line has pci=off: remove it")]
    AiInferPciOff,
    #[error(transparent)]
    Passthrough(#[from] PassthroughError),
    #[error(
        "[[passthrough]] devices sit on PCI, but the kernel command line has pci=off: remove it"
    )]
    PassthroughPciOff,
}

/// How a memory zone is backed on the host.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, Hash)]
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
#[derive(Clone, Debug, Deserialize, PartialEq)]
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
    #[serde(default = "default_true")]
    pub transparent_hugepages: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    #[serde(default)]
    pub zones: Vec<MemoryZoneConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u64,
    /// Host CPUs the vCPU threads are pinned to, e.g. "0-3,8". Default: the CPUs of the
    /// first zone's host node, or no pinning when no zone names a node.
    #[serde(default)]
    pub cpus: Option<String>,
}

fn default_vcpus() -> u64 {
    1
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            cpus: None,
        }
    }
}

pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// bzImage or ELF vmlinux (PVH entry used when the ELF has the note).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            kernel: None,
            initrd: None,
            cmdline: default_cmdline(),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// "stdout" (default), "file" (needs `path`) or "off".
    #[serde(default)]
    pub mode: ConsoleMode,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    #[default]
    Stdout,
    File,
    Off,
}

/// Zones the host's automatic NUMA balancing may migrate under the running guest: on a
/// multi-node host with it on, 4 KiB zones without `host_node` (an explicit binding exempts
/// a mapping; hugetlb pages are never moved by it). The guest stalls on every migrated page,
/// and so does the ai_infer daemon that maps the zone.
fn unbound_zone_warnings(zones: &[MemoryZoneConfig], host: &impl HostTopology) -> Vec<String> {
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
fn thp_zone_warnings(zones: &[MemoryZoneConfig], host: &impl HostTopology) -> Vec<String> {
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

fn validate_ai_infer(ai: &AiInferConfig, zones: &[MemoryZoneConfig]) -> Result<(), ConfigError> {
    if ai.socket.as_os_str().is_empty() {
        return Err(ConfigError::AiInferNoSocket);
    }
    if !(1..=64).contains(&ai.queues) {
        return Err(ConfigError::AiInferRange {
            field: "queues",
            value: ai.queues,
            allowed: "1 to 64",
        });
    }
    if !(2..=256).contains(&ai.queue_size) || !ai.queue_size.is_power_of_two() {
        return Err(ConfigError::AiInferRange {
            field: "queue_size",
            value: ai.queue_size,
            allowed: "a power of two from 2 to 256",
        });
    }
    if let Some(z) = zones.iter().find(|z| z.backing == Backing::Anonymous) {
        return Err(ConfigError::AiInferNeedsSharedMemory { id: z.id.clone() });
    }
    Ok(())
}

/// The paravirtual inference device, served by `ai-inferd` over vhost-user.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AiInferConfig {
    /// The daemon's unix socket for this tenant (the operator gives each tenant its own).
    pub socket: PathBuf,
    /// Request queues (1-64; default 1).
    #[serde(default = "default_ai_infer_queues")]
    pub queues: u64,
    /// Largest ring size offered to the driver (power of two, 2-256; default 256).
    #[serde(default = "default_ai_infer_queue_size")]
    pub queue_size: u64,
}

fn default_ai_infer_queues() -> u64 {
    1
}

fn default_ai_infer_queue_size() -> u64 {
    256
}

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
    #[serde(default = "default_true")]
    pub mmap: bool,
}

fn default_true() -> bool {
    true
}

/// The whole tenant VM description, as read from `--config`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    #[serde(default)]
    pub boot: BootConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub ai_infer: Option<AiInferConfig>,
    #[serde(default)]
    pub passthrough: Vec<PassthroughConfig>,
}

/// Command-line overrides applied on top of the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// Replaces all zones by a single memfd zone of this size (MiB) unless the config has
    /// exactly one zone, whose size is then changed.
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u64>,
    /// Adds (or re-points) the ai_infer device at this daemon socket.
    pub ai_infer_socket: Option<PathBuf>,
}

/// A configuration that passed validation; only this type reaches the VM builder.
#[derive(Clone, Debug)]
pub struct ValidatedConfig {
    pub vcpus: u8,
    pub vcpu_affinity: Option<CpuSet>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The zones, with `host_node` filled in from the passthrough devices' node where the
    /// config left it open.
    pub zones: Vec<MemoryZoneConfig>,
    pub console: ConsoleConfig,
    pub ai_infer: Option<AiInferConfig>,
    /// Host devices that passed the passthrough checks, in config order.
    pub passthrough: Vec<PassthroughDevice>,
    /// RLIMIT_MEMLOCK (bytes) to raise the soft limit to before VFIO pins guest RAM
    /// ([`passthrough::raise_memlock`]); `None` when the current limit suffices.
    pub memlock_raise: Option<u64>,
    /// Things the operator should know that do not stop the VM (placement that crosses
    /// NUMA nodes); the caller logs them.
    pub warnings: Vec<String>,
}

impl VmConfig {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(k) = &o.kernel {
            self.boot.kernel = Some(k.clone());
        }
        if let Some(i) = &o.initrd {
            self.boot.initrd = Some(i.clone());
        }
        if let Some(c) = &o.cmdline {
            self.boot.cmdline = c.clone();
        }
        if let Some(v) = o.vcpus {
            self.machine.vcpus = v;
        }
        if let Some(socket) = &o.ai_infer_socket {
            match &mut self.ai_infer {
                Some(ai) => ai.socket = socket.clone(),
                None => {
                    self.ai_infer = Some(AiInferConfig {
                        socket: socket.clone(),
                        queues: default_ai_infer_queues(),
                        queue_size: default_ai_infer_queue_size(),
                    })
                }
            }
        }
        if let Some(m) = o.memory_mib {
            if self.memory.zones.len() == 1 {
                self.memory.zones[0].size_mib = m;
            } else {
                self.memory.zones = vec![MemoryZoneConfig {
                    id: "mem0".into(),
                    size_mib: m,
                    backing: Backing::Memfd,
                    host_node: None,
                    prefault: false,
                    lock: false,
                    transparent_hugepages: true,
                }];
            }
        }
    }

    /// Checks everything that can be checked before touching KVM or allocating memory.
    /// `kvm_max_vcpus` is KVM's limit on this host.
    pub fn validate<H: HostTopology + PciHost>(
        &self,
        host: &H,
        kvm_max_vcpus: usize,
    ) -> Result<ValidatedConfig, ConfigError> {
        let max = u64::from(MAX_VCPUS);
        if self.machine.vcpus == 0 || self.machine.vcpus > max {
            return Err(ConfigError::Vcpus {
                value: self.machine.vcpus,
                max,
            });
        }
        let vcpus = self.machine.vcpus as u8;
        if usize::from(vcpus) > kvm_max_vcpus {
            return Err(ConfigError::KvmVcpuLimit {
                vcpus,
                max: kvm_max_vcpus,
            });
        }

        let mut zones = self.memory.zones.clone();
        if zones.is_empty() {
            return Err(ConfigError::NoMemory);
        }
        let mut ids = HashSet::new();
        let mut total_mib: u64 = 0;
        for z in &zones {
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

        // Passthrough devices: host checks, then their node becomes the default placement,
        // before the hugepage pools are checked on the nodes the zones will really use.
        let devices = passthrough::resolve(&self.passthrough, host)?;
        let explicit_cpus = self
            .machine
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
        let placement =
            passthrough::place_near_devices(&devices, &mut zones, explicit_cpus.as_ref(), host);
        check_hugepages(&zones, host)?;
        let mut warnings = placement.warnings;
        warnings.extend(unbound_zone_warnings(&zones, host));
        warnings.extend(thp_zone_warnings(&zones, host));
        let memlock_raise = if devices.is_empty() {
            None
        } else {
            passthrough::check_memlock(passthrough::memlock_needed(&zones), host.memlock())?
        };

        let kernel = self.boot.kernel.clone().ok_or(ConfigError::NoKernel)?;
        check_readable("kernel", &kernel)?;
        if let Some(initrd) = &self.boot.initrd {
            check_readable("initrd", initrd)?;
        }
        if self.boot.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong {
                len: self.boot.cmdline.len(),
                max: MAX_CMDLINE_LEN,
            });
        }
        if self.console.mode == ConsoleMode::File && self.console.path.is_none() {
            return Err(ConfigError::ConsoleNeedsPath);
        }
        // Both PCI device kinds are invisible to a guest told not to scan PCI.
        let pci_off = self.boot.cmdline.split_whitespace().any(|w| w == "pci=off");
        if let Some(ai) = &self.ai_infer {
            validate_ai_infer(ai, &zones)?;
            if pci_off {
                return Err(ConfigError::AiInferPciOff);
            }
        }
        if !devices.is_empty() && pci_off {
            return Err(ConfigError::PassthroughPciOff);
        }

        let online = host.online_cpus();
        let vcpu_affinity = match explicit_cpus {
            Some(set) => {
                if let Some(cpu) = set.iter().find(|c| !online.contains(*c)) {
                    return Err(ConfigError::NoSuchCpu {
                        field: "machine.cpus",
                        cpu,
                        online: online.to_string(),
                    });
                }
                Some(set)
            }
            None => placement.cpus.clone().or_else(|| {
                zones
                    .iter()
                    .find_map(|z| z.host_node)
                    .and_then(|n| host.node_cpus(n))
                    .filter(|s| !s.is_empty())
            }),
        };

        Ok(ValidatedConfig {
            vcpus,
            vcpu_affinity,
            kernel,
            initrd: self.boot.initrd.clone(),
            cmdline: self.boot.cmdline.clone(),
            zones,
            console: self.console.clone(),
            ai_infer: self.ai_infer.clone(),
            passthrough: devices,
            memlock_raise,
            warnings,
        })
    }
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |source| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    std::fs::File::open(path).map(drop).map_err(err)
}

/// Sums hugepage demand per (page size, node) and compares it with the free pool, so a
/// short pool is reported at start with the number needed.
fn check_hugepages(zones: &[MemoryZoneConfig], host: &dyn HostTopology) -> Result<(), ConfigError> {
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

fn format_list(v: &[u32]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::FakeSys;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_toml(text, Path::new("test.toml"))
    }

    /// A config with one zone and a command line that allows PCI.
    fn pt_base(sys: &FakeSys, zone: &str) -> String {
        format!(
            "[machine]\nvcpus = 2\n[boot]\nkernel = \"{}\"\ncmdline = \"console=ttyS0\"\n\
             [[memory.zones]]\n{zone}\n",
            sys.kernel()
        )
    }

    fn base(sys: &FakeSys, zone: &str) -> String {
        format!(
            "[machine]\nvcpus = 2\n[boot]\nkernel = \"{}\"\n[[memory.zones]]\n{zone}\n",
            sys.kernel()
        )
    }

    #[test]
    fn full_config_validates_and_defaults_pinning_to_the_zone_node() {
        let sys = FakeSys::new("ok", 16);
        let cfg = parse(&base(
            &sys,
            "id = \"m\"\nsize_mib = 32\nbacking = \"hugetlb-2m\"\nhost_node = 1\nprefault = true\nlock = true",
        ))
        .unwrap();
        let v = cfg.validate(&sys.host(), 64).unwrap();
        assert_eq!(v.vcpus, 2);
        assert_eq!(v.vcpu_affinity, Some(CpuSet::from_cpus([1])));
        assert_eq!(v.zones[0].backing, Backing::Hugetlb2M);
        assert_eq!(v.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn ai_infer_needs_shared_memory_pci_and_sane_queues() {
        let sys = FakeSys::new("ai", 0);
        let check = |zone: &str, extra: &str| {
            let text = base(&sys, zone)
                .replace("[boot]\n", "[boot]\ncmdline = \"console=ttyS0\"\n")
                + extra;
            parse(&text).unwrap().validate(&sys.host(), 64)
        };
        let ok = check(
            "id = \"m\"\nsize_mib = 32",
            "[ai_infer]\nsocket = \"/run/t.sock\"\n",
        )
        .unwrap();
        let ai = ok.ai_infer.unwrap();
        assert_eq!((ai.queues, ai.queue_size), (1, 256));
        let err = check(
            "id = \"m\"\nsize_mib = 32\nbacking = \"anonymous\"",
            "[ai_infer]\nsocket = \"/run/t.sock\"\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::AiInferNeedsSharedMemory { .. }),
            "{err}"
        );
        for (extra, field) in [
            ("queue_size = 100", "queue_size"),
            ("queue_size = 512", "queue_size"),
            ("queues = 0", "queues"),
            ("queues = 65", "queues"),
        ] {
            let err = check(
                "id = \"m\"\nsize_mib = 32",
                &format!("[ai_infer]\nsocket = \"/s\"\n{extra}\n"),
            )
            .unwrap_err();
            assert!(err.to_string().contains(field), "{extra}: {err}");
        }
        let err = check("id = \"m\"\nsize_mib = 32", "[ai_infer]\nsocket = \"\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::AiInferNoSocket), "{err}");
        // The default command line has pci=off.
        let mut cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32")).unwrap();
        cfg.apply(&Overrides {
            ai_infer_socket: Some(PathBuf::from("/run/t.sock")),
            ..Default::default()
        });
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::AiInferPciOff), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = parse("[machine]\nvcpu = 2\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("unknown field") && msg.contains("vcpu"),
            "{msg}"
        );
    }

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
        cfg.machine.vcpus = 8;
        let msg = cfg.validate(&sys.host(), 4).unwrap_err().to_string();
        assert!(msg.contains("more vCPUs (8) than KVM allows"), "{msg}");
    }

    #[test]
    fn unreadable_kernel_is_named() {
        let sys = FakeSys::new("kernel", 0);
        let cfg = parse(
            "[boot]\nkernel = \"/nonexistent/vmlinuz\"\n[[memory.zones]]\nid = \"m\"\nsize_mib = 32\n",
        )
        .unwrap();
        let msg = cfg.validate(&sys.host(), 64).unwrap_err().to_string();
        assert!(msg.contains("kernel /nonexistent/vmlinuz"), "{msg}");
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
    }

    #[test]
    fn file_console_needs_a_path() {
        let sys = FakeSys::new("console", 0);
        let cfg =
            parse(&(base(&sys, "id = \"m\"\nsize_mib = 32") + "[console]\nmode = \"file\"\n"))
                .unwrap();
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::ConsoleNeedsPath), "{err}");
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

    #[test]
    fn cpu_set_round_trips_through_display() {
        let s = CpuSet::parse("0-3, 8,10-11").unwrap();
        assert_eq!(s.to_string(), "0-3,8,10-11");
        assert!(CpuSet::parse("x").is_err());
        assert!(CpuSet::parse("5000").is_err());
    }
}
