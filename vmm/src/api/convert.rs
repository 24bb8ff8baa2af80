//! Firecracker's resources in aivmm's own config types, and back.
//!
//! The API and `--config-file` build a [`VmConfig`], the type the TOML gives, and run the
//! config's own checks on it: one validation path and one set of messages for all three.
//! A Firecracker field aivmm cannot honour is refused here, by name.

use std::path::PathBuf;

use super::types::{
    BootSource, CacheType, Drive, FullVmConfiguration, HugePages, IoEngine, MachineConfiguration,
    MachineConfigurationUpdate, NetworkInterface, Passthrough, Vsock,
};
use crate::config::{
    Backing, DriveConfig, MemoryZoneConfig, NetConfig, PassthroughConfig, VmConfig, VsockConfig,
    DEFAULT_CMDLINE,
};

/// Guest memory when nothing sets it (Firecracker's default).
pub const DEFAULT_MEM_SIZE_MIB: u64 = 128;
/// The id of the zone `mem_size_mib` describes.
const MEM_ZONE_ID: &str = "mem0";

/// A request aivmm refuses: the message goes to the client as the `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

/// The config an API-driven VM starts from: Firecracker's defaults (1 vCPU, 128 MiB of
/// 4 KiB pages), aivmm's default command line, no kernel yet.
pub fn default_config() -> VmConfig {
    let mut cfg = VmConfig::default();
    cfg.memory.zones = vec![zone(DEFAULT_MEM_SIZE_MIB, HugePages::None)];
    cfg
}

fn zone(size_mib: u64, pages: HugePages) -> MemoryZoneConfig {
    MemoryZoneConfig {
        id: MEM_ZONE_ID.into(),
        size_mib,
        backing: match pages {
            HugePages::Huge2M => Backing::Hugetlb2M,
            HugePages::None | HugePages::Transparent => Backing::Memfd,
        },
        host_node: None,
        prefault: false,
        lock: false,
        transparent_hugepages: pages == HugePages::Transparent,
    }
}

/// `PUT /boot-source`: kernel, initrd and command line (aivmm's default when absent).
pub fn apply_boot_source(cfg: &mut VmConfig, b: &BootSource) {
    cfg.boot.kernel = Some(b.kernel_image_path.clone());
    cfg.boot.initrd = b.initrd_path.clone();
    cfg.boot.cmdline = b
        .boot_args
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
}

pub fn boot_source(cfg: &VmConfig) -> Option<BootSource> {
    cfg.boot.kernel.as_ref().map(|k| BootSource {
        kernel_image_path: k.clone(),
        boot_args: Some(cfg.boot.cmdline.clone()),
        initrd_path: cfg.boot.initrd.clone(),
    })
}

/// `GET /machine-config`: the vCPUs, the total of the zones and the first zone's pages.
pub fn machine_config(cfg: &VmConfig) -> MachineConfiguration {
    let first = cfg.memory.zones.first();
    let huge_pages = match first {
        Some(z) if z.backing == Backing::Hugetlb2M => HugePages::Huge2M,
        Some(z) if !z.backing.is_hugetlb() && z.transparent_hugepages => HugePages::Transparent,
        _ => HugePages::None,
    };
    MachineConfiguration {
        vcpu_count: cfg.machine.vcpus,
        mem_size_mib: cfg.memory.zones.iter().map(|z| z.size_mib).sum(),
        smt: false,
        track_dirty_pages: false,
        huge_pages,
        cpu_template: None,
    }
}

/// `PUT` and `PATCH /machine-config`: `update`'s fields over `cfg`'s. The memory is one
/// zone; a VM given several zones (`PUT /memory-zones`) keeps them unless the size and
/// pages asked for are what they already are.
pub fn apply_machine_config(
    cfg: &mut VmConfig,
    update: &MachineConfigurationUpdate,
) -> Result<(), Refused> {
    if update.smt == Some(true) {
        return refuse("machine-config: smt = true is not supported by aivmm (its vCPUs are one thread per core)");
    }
    if update.track_dirty_pages == Some(true) {
        return refuse(
            "machine-config: track_dirty_pages = true is not supported by aivmm (no snapshots)",
        );
    }
    if update.cpu_template.is_some() {
        return refuse("machine-config: cpu_template is not supported by aivmm");
    }
    let current = machine_config(cfg);
    if let Some(v) = update.vcpu_count {
        cfg.machine.vcpus = v;
    }
    let size = update.mem_size_mib.unwrap_or(current.mem_size_mib);
    let pages = update.huge_pages.unwrap_or(current.huge_pages);
    if (size, pages) == (current.mem_size_mib, current.huge_pages) {
        return Ok(());
    }
    if cfg.memory.zones.len() > 1 {
        return refuse(format!(
            "machine-config: the VM has {} memory zones (PUT /memory-zones); mem_size_mib and \
             huge_pages cannot resize them: change the zones instead",
            cfg.memory.zones.len()
        ));
    }
    let mut z = zone(size, pages);
    if let Some(old) = cfg.memory.zones.first() {
        z.id = old.id.clone();
        z.host_node = old.host_node;
        z.prefault = old.prefault;
        z.lock = old.lock;
    }
    cfg.memory.zones = vec![z];
    Ok(())
}

/// The id in the path must be the one in the body, as Firecracker requires.
pub fn check_path_id(what: &str, path_id: &str, body_id: &str) -> Result<(), Refused> {
    if path_id == body_id {
        Ok(())
    } else {
        refuse(format!(
            "the {what} id in the path ('{path_id}') differs from the one in the body ('{body_id}')"
        ))
    }
}

/// A Firecracker drive as an aivmm drive (virtio-blk on a raw image).
pub fn drive_config(d: &Drive) -> Result<DriveConfig, Refused> {
    let id = &d.drive_id;
    if d.partuuid.is_some() {
        return refuse(format!(
            "drive '{id}': partuuid is not supported by aivmm (the root drive is /dev/vda; \
             give root= in boot_args to name a partition)"
        ));
    }
    if d.socket.is_some() {
        return refuse(format!(
            "drive '{id}': socket (vhost-user-block) is not supported by aivmm"
        ));
    }
    if d.io_engine == IoEngine::Async {
        return refuse(format!(
            "drive '{id}': io_engine \"Async\" is not supported by aivmm; use \"Sync\""
        ));
    }
    let Some(path) = d.path_on_host.clone() else {
        return refuse(format!("drive '{id}': path_on_host is required"));
    };
    Ok(DriveConfig {
        id: id.clone(),
        path,
        read_only: d.is_read_only.unwrap_or(false),
        root: d.is_root_device,
        serial: None,
        rate_limiter: d.rate_limiter,
    })
}

pub fn drive(d: &DriveConfig) -> Drive {
    Drive {
        drive_id: d.id.clone(),
        path_on_host: Some(d.path.clone()),
        is_root_device: d.root,
        is_read_only: Some(d.read_only),
        partuuid: None,
        // aivmm offers FLUSH and completes it with fdatasync: Firecracker's Writeback.
        cache_type: CacheType::Writeback,
        rate_limiter: d.rate_limiter,
        io_engine: IoEngine::Sync,
        socket: None,
    }
}

pub fn net_config(n: &NetworkInterface) -> Result<NetConfig, Refused> {
    let mac = n
        .guest_mac
        .as_deref()
        .map(|m| {
            m.parse().map_err(|e| {
                Refused(format!(
                    "network interface '{}': guest_mac is invalid: {e}",
                    n.iface_id
                ))
            })
        })
        .transpose()?;
    Ok(NetConfig {
        id: n.iface_id.clone(),
        tap: n.host_dev_name.clone(),
        mac,
        mtu: n.mtu,
        rx_rate_limiter: n.rx_rate_limiter,
        tx_rate_limiter: n.tx_rate_limiter,
    })
}

pub fn network_interface(n: &NetConfig) -> NetworkInterface {
    NetworkInterface {
        iface_id: n.id.clone(),
        host_dev_name: n.tap.clone(),
        guest_mac: n.mac.map(|m| m.to_string()),
        mtu: n.mtu,
        rx_rate_limiter: n.rx_rate_limiter,
        tx_rate_limiter: n.tx_rate_limiter,
    }
}

pub fn vsock_config(v: &Vsock) -> VsockConfig {
    VsockConfig {
        guest_cid: v.guest_cid,
        uds_path: v.uds_path.clone(),
    }
}

pub fn vsock(v: &VsockConfig) -> Vsock {
    Vsock {
        guest_cid: v.guest_cid,
        uds_path: v.uds_path.clone(),
        vsock_id: None,
    }
}

/// Puts `item` in place of the one with the same id, or at the end.
pub fn upsert<T>(items: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) {
    match items.iter_mut().find(|i| same(i)) {
        Some(slot) => *slot = item,
        None => items.push(item),
    }
}

/// A whole Firecracker configuration (`--config-file`) as an aivmm config. The logger and
/// metrics sections are not part of a VM's config; the caller takes them from `full`.
pub fn vm_config(full: &FullVmConfiguration) -> Result<(VmConfig, Vec<String>), Refused> {
    let mut cfg = default_config();
    if !full.memory_zones.is_empty() {
        cfg.memory.zones = full.memory_zones.clone();
    }
    if let Some(b) = &full.boot_source {
        apply_boot_source(&mut cfg, b);
    }
    if let Some(m) = &full.machine_config {
        apply_machine_config(&mut cfg, &update_of(m))?;
    }
    for d in &full.drives {
        let drive = drive_config(d)?;
        if cfg.drives.iter().any(|x| x.id == drive.id) {
            return refuse(format!("drive id '{}' is used twice", drive.id));
        }
        cfg.drives.push(drive);
    }
    for n in &full.network_interfaces {
        cfg.net.push(net_config(n)?);
    }
    cfg.vsock = full.vsock.as_ref().map(vsock_config);
    cfg.ai_infer = full.ai_infer.clone();
    let mut passthrough_ids = Vec::new();
    for p in &full.passthrough {
        if passthrough_ids.contains(&p.id) {
            return refuse(format!("passthrough id '{}' is used twice", p.id));
        }
        passthrough_ids.push(p.id.clone());
        cfg.passthrough.push(passthrough_config(p));
    }
    Ok((cfg, passthrough_ids))
}

/// A full machine configuration as an update that sets every field.
pub fn update_of(m: &MachineConfiguration) -> MachineConfigurationUpdate {
    MachineConfigurationUpdate {
        vcpu_count: Some(m.vcpu_count),
        mem_size_mib: Some(m.mem_size_mib),
        smt: Some(m.smt),
        track_dirty_pages: Some(m.track_dirty_pages),
        huge_pages: Some(m.huge_pages),
        cpu_template: m.cpu_template.clone(),
    }
}

pub fn passthrough_config(p: &Passthrough) -> PassthroughConfig {
    PassthroughConfig {
        device: p.device.clone(),
        mmap: p.mmap,
    }
}

/// `GET /vm/config`: the VM's config in Firecracker's shape (logger and metrics are
/// filled in by the caller). Extension keys appear only when they are used.
pub fn full_config(cfg: &VmConfig, passthrough_ids: &[String]) -> FullVmConfiguration {
    let one_plain_zone = cfg.memory.zones.len() == 1 && {
        let z = &cfg.memory.zones[0];
        z.id == MEM_ZONE_ID && z.host_node.is_none() && !z.prefault && !z.lock
    };
    FullVmConfiguration {
        boot_source: boot_source(cfg),
        machine_config: Some(machine_config(cfg)),
        drives: cfg.drives.iter().map(drive).collect(),
        network_interfaces: cfg.net.iter().map(network_interface).collect(),
        vsock: cfg.vsock.as_ref().map(vsock),
        logger: None,
        metrics: None,
        ai_infer: cfg.ai_infer.clone(),
        passthrough: cfg
            .passthrough
            .iter()
            .zip(passthrough_ids)
            .map(|(p, id)| Passthrough {
                id: id.clone(),
                device: p.device.clone(),
                mmap: p.mmap,
            })
            .collect(),
        memory_zones: if one_plain_zone {
            Vec::new()
        } else {
            cfg.memory.zones.clone()
        },
    }
}

/// Reads a Firecracker JSON config file.
pub fn load_config_file(path: &PathBuf) -> Result<FullVmConfiguration, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))
}
