//! Tenant microVM configuration: plain serde types, loaded from TOML, overridden from the CLI
//! and validated once, before any resource is allocated.
//!
//! Each resource has its module, owning its serde types, their defaults and its checks:
//! `machine`, `memory`, `boot`, `console`, `drives`, `net`, `vsock`, `ai_infer`,
//! `passthrough` (their types are re-exported here). [`VmConfig::validate`] runs them in order and returns the
//! only type the VM builder accepts, [`ValidatedConfig`]. Host facts come from
//! [`crate::host`], the passthrough checks from [`crate::passthrough`] and NUMA placement from
//! [`crate::placement`]; none of them depends on this module.
//!
//! Every field is documented in `configs/README.md`; defaults live here, next to the types.

mod ai_infer;
mod boot;
mod console;
mod drives;
mod machine;
mod memory;
mod net;
mod passthrough;
mod vsock;

use std::path::{Path, PathBuf};

use devices::rate_limiter::RateLimiterError;
use serde::Deserialize;

pub use ai_infer::AiInferConfig;
pub use boot::{BootConfig, DEFAULT_CMDLINE, MAX_CMDLINE_LEN, ROOT_DEVICE};
pub use console::{ConsoleConfig, ConsoleMode};
pub use drives::{DriveConfig, MAX_SERIAL_LEN};
pub use machine::{MachineConfig, MAX_VCPUS};
pub use memory::{Backing, MemoryConfig, MemoryZoneConfig, MAX_MEMORY_MIB};
pub use net::{MacAddr, NetConfig, MIN_MTU};
pub use passthrough::{memlock_needed, PassthroughConfig};
pub use vsock::{VsockConfig, MAX_UDS_PATH_LEN, MIN_GUEST_CID};

use crate::host::{CpuSet, HostTopology, NetInterfaces};
use crate::passthrough::{PassthroughDevice, PassthroughError, PciHost};
use crate::placement::{self, ZoneNode};

/// Longest drive or net id: ids name threads, logs and API paths.
pub const MAX_ID_LEN: usize = 64;

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
    #[error("machine.halt_poll_ns must be at most 4294967295 (KVM's limit; got {0})")]
    HaltPoll(u64),
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
    #[error("{what} id '{id}' is invalid: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")]
    BadId { what: &'static str, id: String },
    #[error("{what} id '{id}' is used twice")]
    DuplicateId { what: &'static str, id: String },
    #[error("drive '{id}' image {path} is not readable: {source}")]
    DriveUnreadable {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "drive '{id}' image {path} is read-only ({reason}), but the drive is read-write: \
         set read_only = true or make the image writable"
    )]
    DriveReadOnly {
        id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("drive '{id}' image {path} cannot be opened for writing: {source}")]
    DriveUnwritable {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "drives '{first}' and '{second}' both have root = true: only one drive can be the root \
         device"
    )]
    TwoRootDrives { first: String, second: String },
    #[error("drive '{id}' serial '{serial}' must be at most 20 printable ASCII characters")]
    BadSerial { id: String, serial: String },
    #[error("{device} {field} is invalid: {source}")]
    RateLimiter {
        device: String,
        field: &'static str,
        source: RateLimiterError,
    },
    #[error(
        "net '{id}' tap '{tap}' is not an interface name: 1 to 15 characters, without '/', ':' \
         or spaces"
    )]
    BadTapName { id: String, tap: String },
    #[error(
        "net '{id}' tap '{tap}' does not exist (aivmm never creates one): create it first, \
         e.g. ip tuntap add {tap} mode tap && ip link set {tap} up"
    )]
    NoSuchTap { id: String, tap: String },
    #[error("net '{id}' interface '{tap}' is {kind}: virtio-net needs a tap (ip tuntap add NAME mode tap)")]
    NotATap {
        id: String,
        tap: String,
        kind: &'static str,
    },
    #[error("net devices '{first}' and '{second}' both use tap '{tap}'")]
    DuplicateTap {
        tap: String,
        first: String,
        second: String,
    },
    #[error(
        "net '{id}' MAC {mac} is a multicast address: the lowest bit of the first byte must be 0"
    )]
    MulticastMac { id: String, mac: MacAddr },
    #[error("net '{id}' MAC 00:00:00:00:00:00 is not a valid address")]
    ZeroMac { id: String },
    #[error("MAC {mac} is given to both net '{first}' and net '{second}'")]
    DuplicateMac {
        mac: MacAddr,
        first: String,
        second: String,
    },
    #[error("net '{id}' mtu {mtu} is below the minimum of 68")]
    MtuTooSmall { id: String, mtu: u16 },
    #[error("vsock guest_cid {cid} is reserved: use a value from 3 to 4294967294")]
    BadCid { cid: u32 },
    #[error("vsock uds_path is empty: give the path of the host-side unix socket")]
    UdsPathEmpty,
    #[error("vsock uds_path {path} is {len} bytes, a unix socket path holds at most 107")]
    UdsPathTooLong { path: PathBuf, len: usize },
    #[error("vsock uds_path {path}: its directory {dir} does not exist")]
    UdsDirMissing { path: PathBuf, dir: PathBuf },
    #[error(
        "vsock uds_path {path} already exists: remove the stale socket or choose another path"
    )]
    UdsPathExists { path: PathBuf },
    #[error("vsock uds_path {path} cannot be checked: {source}")]
    UdsPathUnusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{device} is a virtio-pci device, but the kernel command line has pci=off: remove it")]
    TenantIoPciOff { device: String },
}

fn default_true() -> bool {
    true
}

/// Drive and net ids: 1-64 characters of `[A-Za-z0-9_-]`.
fn check_id(what: &'static str, id: &str) -> Result<(), ConfigError> {
    let ok = (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadId {
            what,
            id: id.to_string(),
        })
    }
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
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
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
    /// Drives added after the file's (`--drive`).
    pub drives: Vec<DriveConfig>,
    /// Net devices added after the file's (`--net`).
    pub net: Vec<NetConfig>,
    /// Replaces the file's `[vsock]` (`--vsock`).
    pub vsock: Option<VsockConfig>,
}

/// A configuration that passed validation; only this type reaches the VM builder.
#[derive(Clone, Debug)]
pub struct ValidatedConfig {
    pub vcpus: u8,
    pub vcpu_affinity: Option<CpuSet>,
    /// KVM's halt polling for this VM (`machine.halt_poll_ns`; `None`: the host's).
    pub halt_poll_ns: Option<u32>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The command line as given, plus `root=/dev/vda rw|ro` for a root drive.
    pub cmdline: String,
    /// The zones, with `host_node` filled in from the passthrough devices' node where the
    /// config left it open.
    pub zones: Vec<MemoryZoneConfig>,
    pub console: ConsoleConfig,
    /// The root drive first (so it is `/dev/vda`), then the others in config order; every
    /// `serial` is set.
    pub drives: Vec<DriveConfig>,
    /// Net devices in config order; each tap existed at validation.
    pub net: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub ai_infer: Option<AiInferConfig>,
    /// Host devices that passed the passthrough checks, in config order.
    pub passthrough: Vec<PassthroughDevice>,
    /// RLIMIT_MEMLOCK (bytes) to raise the soft limit to before VFIO pins guest RAM
    /// ([`crate::passthrough::raise_memlock`]); `None` when the current limit suffices.
    pub memlock_raise: Option<u64>,
    /// Things the operator should know that do not stop the VM (placement that crosses
    /// NUMA nodes, a root= left as given); the caller logs them.
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
                None => self.ai_infer = Some(AiInferConfig::with_socket(socket.clone())),
            }
        }
        if let Some(m) = o.memory_mib {
            if self.memory.zones.len() == 1 {
                self.memory.zones[0].size_mib = m;
            } else {
                self.memory.zones = vec![MemoryZoneConfig::memfd("mem0", m)];
            }
        }
        self.drives.extend(o.drives.iter().cloned());
        self.net.extend(o.net.iter().cloned());
        if let Some(v) = &o.vsock {
            self.vsock = Some(v.clone());
        }
    }

    /// Checks everything that can be checked before touching KVM or allocating memory.
    /// `kvm_max_vcpus` is KVM's limit on this host.
    pub fn validate<H: HostTopology + PciHost + NetInterfaces>(
        &self,
        host: &H,
        kvm_max_vcpus: usize,
    ) -> Result<ValidatedConfig, ConfigError> {
        let machine = machine::validate(&self.machine, kvm_max_vcpus, host)?;
        let mut zones = memory::validate(&self.memory, host)?;

        // Passthrough devices: host checks, then their node becomes the default placement,
        // before the hugepage pools are checked on the nodes the zones will really use.
        let devices = passthrough::validate(&self.passthrough, host)?;
        let placement = {
            let mut nodes: Vec<ZoneNode<'_>> = zones
                .iter_mut()
                .map(|z| ZoneNode {
                    id: &z.id,
                    host_node: &mut z.host_node,
                })
                .collect();
            placement::place_near_devices(&devices, &mut nodes, machine.cpus.as_ref(), host)
        };
        memory::check_hugepages(&zones, host)?;
        let mut warnings = placement.warnings;
        warnings.extend(memory::warnings(&zones, host));
        let memlock_raise = passthrough::memlock_raise(&devices, &zones, || host.memlock())?;

        let kernel = boot::validate(&self.boot)?;
        console::validate(&self.console)?;
        // Every PCI device kind is invisible to a guest told not to scan PCI.
        let pci_off = boot::pci_off(&self.boot.cmdline);
        if let Some(ai) = &self.ai_infer {
            ai_infer::validate(ai, &zones, pci_off)?;
        }
        if !devices.is_empty() && pci_off {
            return Err(ConfigError::PassthroughPciOff);
        }

        let drives = drives::validate(&self.drives)?;
        let net = net::validate(&self.net, host)?;
        if let Some(v) = &self.vsock {
            vsock::validate(v)?;
        }
        let io_device = drives
            .first()
            .map(|d| format!("drive '{}'", d.id))
            .or_else(|| net.first().map(|n| format!("net '{}'", n.id)))
            .or_else(|| self.vsock.as_ref().map(|_| "vsock".to_string()));
        if let (true, Some(device)) = (pci_off, io_device) {
            return Err(ConfigError::TenantIoPciOff { device });
        }
        let root = drives.first().filter(|d| d.root);
        let cmdline = boot::cmdline(&self.boot.cmdline, root, &mut warnings)?;

        let vcpus = machine.vcpus;
        let vcpu_affinity = machine::vcpu_affinity(machine.cpus, placement.cpus, &zones, host);
        Ok(ValidatedConfig {
            vcpus,
            vcpu_affinity,
            halt_poll_ns: machine.halt_poll_ns,
            kernel,
            initrd: self.boot.initrd.clone(),
            cmdline,
            zones,
            console: self.console.clone(),
            drives,
            net,
            vsock: self.vsock.clone(),
            ai_infer: self.ai_infer.clone(),
            passthrough: devices,
            memlock_raise,
            warnings,
        })
    }
}

/// Checks of one resource, as [`VmConfig::validate`] runs them (same functions, same
/// messages): the control API runs the one a request changes, so a bad `PUT` fails at
/// once, and the whole of `validate` again at start.
impl VmConfig {
    /// `[machine]` against the MP table's and KVM's limits and the host's CPUs.
    pub fn check_machine(
        &self,
        host: &dyn HostTopology,
        kvm_max_vcpus: usize,
    ) -> Result<(), ConfigError> {
        machine::validate(&self.machine, kvm_max_vcpus, host).map(drop)
    }

    /// The memory zones on their own and against the host's nodes (not the hugepage
    /// pools, which are checked at start, after placement).
    pub fn check_memory(&self, host: &dyn HostTopology) -> Result<(), ConfigError> {
        memory::validate(&self.memory, host).map(drop)
    }

    /// The kernel, initrd and command line length.
    pub fn check_boot(&self) -> Result<(), ConfigError> {
        boot::validate(&self.boot).map(drop)
    }

    /// Every drive (ids, one root, serials, rate limiters, images).
    pub fn check_drives(&self) -> Result<(), ConfigError> {
        drives::validate(&self.drives).map(drop)
    }

    /// Every network interface against the host's taps.
    pub fn check_net(&self, host: &dyn NetInterfaces) -> Result<(), ConfigError> {
        net::validate(&self.net, host).map(drop)
    }

    /// The vsock device.
    pub fn check_vsock(&self) -> Result<(), ConfigError> {
        self.vsock.as_ref().map_or(Ok(()), vsock::validate)
    }

    /// The ai_infer device against the zones (the command line is checked at start).
    pub fn check_ai_infer(&self) -> Result<(), ConfigError> {
        match &self.ai_infer {
            Some(ai) => ai_infer::validate(ai, &self.memory.zones, false),
            None => Ok(()),
        }
    }

    /// The passthrough devices on the host.
    pub fn check_passthrough(&self, host: &dyn PciHost) -> Result<(), ConfigError> {
        passthrough::validate(&self.passthrough, host).map(drop)
    }
}

/// Helpers for the tests of every config module.
#[cfg(test)]
mod testing {
    use std::path::{Path, PathBuf};

    use super::{ConfigError, VmConfig};
    use crate::test_support::FakeSys;

    pub fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_toml(text, Path::new("test.toml"))
    }

    /// A config with one zone and a command line that allows PCI.
    pub fn pt_base(sys: &FakeSys, zone: &str) -> String {
        format!(
            "[machine]\nvcpus = 2\n[boot]\nkernel = \"{}\"\ncmdline = \"console=ttyS0\"\n\
             [[memory.zones]]\n{zone}\n",
            sys.kernel()
        )
    }

    /// A config with one zone and the default command line (`pci=off`).
    pub fn base(sys: &FakeSys, zone: &str) -> String {
        format!(
            "[machine]\nvcpus = 2\n[boot]\nkernel = \"{}\"\n[[memory.zones]]\n{zone}\n",
            sys.kernel()
        )
    }

    /// A scratch directory, removed on drop.
    pub struct TempDir(tempfile::TempDir);

    impl TempDir {
        pub fn new(name: &str) -> Self {
            let prefix = format!("aivmm-config-{name}-");
            TempDir(tempfile::Builder::new().prefix(&prefix).tempdir().unwrap())
        }

        pub fn path(&self) -> &Path {
            self.0.path()
        }

        /// Creates `name` in the directory with `contents`.
        pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
            let p = self.0.path().join(name);
            std::fs::write(&p, contents).unwrap();
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{base, parse, pt_base, TempDir};
    use super::*;
    use crate::test_support::FakeSys;

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
        assert!(v.drives.is_empty() && v.net.is_empty() && v.vsock.is_none());
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
    fn tenant_io_devices_need_pci() {
        let sys = FakeSys::new("io-pci-off", 0);
        let dir = TempDir::new("io-pci-off");
        let img = dir.file("d.img", b"d");
        let drive = format!("[[drives]]\nid = \"data\"\npath = \"{}\"\n", img.display());
        let text = base(&sys, "id = \"m\"\nsize_mib = 32") + &drive;
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert_eq!(
            err.to_string(),
            "drive 'data' is a virtio-pci device, but the kernel command line has pci=off: \
             remove it"
        );
        let vsock = format!(
            "[vsock]\nguest_cid = 3\nuds_path = \"{}\"\n",
            dir.path().join("v.sock").display()
        );
        let text = base(&sys, "id = \"m\"\nsize_mib = 32") + &vsock;
        let err = parse(&text).unwrap().validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(&err, ConfigError::TenantIoPciOff { device } if device == "vsock"));
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32") + &drive + &vsock;
        assert!(parse(&text).unwrap().validate(&sys.host(), 64).is_ok());
    }

    #[test]
    fn overrides_add_drives_and_nets_and_replace_vsock() {
        let dir = TempDir::new("io-overrides");
        let mut cfg = parse(
            "[[drives]]\nid = \"a\"\npath = \"a.img\"\n[[net]]\nid = \"n0\"\ntap = \"tap0\"\n\
             [vsock]\nguest_cid = 3\nuds_path = \"/run/a.vsock\"\n",
        )
        .unwrap();
        let drive = DriveConfig {
            id: "b".into(),
            path: dir.path().join("b.img"),
            read_only: true,
            root: true,
            serial: None,
            rate_limiter: None,
        };
        let net = NetConfig {
            id: "n1".into(),
            tap: "tap1".into(),
            mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let vsock = VsockConfig {
            guest_cid: 9,
            uds_path: "/run/b.vsock".into(),
        };
        cfg.apply(&Overrides {
            drives: vec![drive.clone()],
            net: vec![net.clone()],
            vsock: Some(vsock.clone()),
            ..Default::default()
        });
        let ids: Vec<&str> = cfg.drives.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(cfg.drives[1], drive);
        assert_eq!(cfg.net.len(), 2);
        assert_eq!(cfg.net[1], net);
        assert_eq!(cfg.vsock, Some(vsock));
    }

    /// The serving example parses: a root drive, a tap, a vsock, the ai_infer device and
    /// the command line its image's init reads.
    #[test]
    fn tenant_serving_example_parses() {
        let cfg = parse(include_str!("../../../configs/tenant-serving.toml")).unwrap();
        assert!(cfg.drives.iter().any(|d| d.root));
        assert_eq!(cfg.net.len(), 1);
        assert!(cfg.vsock.is_some());
        assert!(cfg.ai_infer.is_some());
        let cmdline = cfg.boot.cmdline;
        for word in ["aivmm.ip=", "aivmm.serve=tcp:", "hugepages="] {
            assert!(cmdline.contains(word), "{word} missing from {cmdline}");
        }
        assert!(!cmdline.contains("pci=off"));
    }

    /// The example in configs/ parses, and validates once its files exist.
    #[test]
    fn tenant_io_example_is_a_valid_config() {
        let text = include_str!("../../../configs/tenant-io.toml");
        let cfg = parse(text).unwrap();
        assert_eq!(cfg.drives.len(), 2);
        assert!(cfg.drives.iter().any(|d| d.root));
        assert_eq!(cfg.net.len(), 1);
        assert_eq!(cfg.vsock.as_ref().map(|v| v.guest_cid), Some(3));

        // Point its paths at scratch files, give the fake host the tap: it validates.
        let sys = FakeSys::new("tenant-io-example", 0);
        let dir = TempDir::new("tenant-io-example");
        let mut cfg = cfg;
        cfg.boot.kernel = Some(sys.kernel().into());
        cfg.boot.initrd = None;
        for d in &mut cfg.drives {
            d.path = dir.file(&format!("{}.img", d.id), b"image");
        }
        cfg.vsock.as_mut().unwrap().uds_path = dir.path().join("t1.vsock");
        for n in &cfg.net {
            let tap = sys.root().join("class/net").join(&n.tap);
            std::fs::create_dir_all(&tap).unwrap();
            std::fs::write(tap.join("tun_flags"), "0x1002\n").unwrap();
        }
        let v = cfg.validate(&sys.host(), 64).unwrap();
        assert!(v.drives[0].root);
        assert!(v.cmdline.contains("root=/dev/vda"), "{}", v.cmdline);
    }
}
