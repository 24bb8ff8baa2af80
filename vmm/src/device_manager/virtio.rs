//! Virtio devices on PCI: the transport, its interrupt vectors and notifications, and one
//! `add_*` per device type the config can name.

use std::io;
use std::sync::{Arc, Mutex};

use ai_infer_protocol as proto;
use devices::pci::{BarKind, PciHeader};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{Net, NetConfig as NetDeviceConfig};
use devices::virtio::pci::NotificationRegistrar;
use devices::virtio::vsock::{Vsock, VsockConfig as VsockDeviceConfig};
use devices::virtio::{
    VhostUserDevice, VhostUserDeviceConfig, VirtioDevice, VirtioPciDevice, VirtioPciError,
    VIRTIO_PCI_BAR_SIZE,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_bindings::virtio_ids;
use vmm_sys_util::eventfd::EventFd;

use super::pci::PciError;
use super::{DeviceManager, DeviceManagerError, VirtioEntry};
use crate::config::{AiInferConfig, DriveConfig, NetConfig, VsockConfig};

/// Red Hat's vendor id, under which virtio devices are registered.
const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern (virtio 1.0+) devices are 0x1040 + the device type.
const VIRTIO_PCI_MODERN_DEVICE_BASE: u16 = 0x1040;
/// Subsystem id of modern devices (≥ 0x40, virtio 1.2 §4.1.2.1).
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;

/// PCI class codes (base, subclass) the guest sees for each device.
const CLASS_STORAGE_OTHER: (u8, u8) = (0x01, 0x80);
const CLASS_NETWORK_ETHERNET: (u8, u8) = (0x02, 0x00);
const CLASS_COMMUNICATION_OTHER: (u8, u8) = (0x07, 0x80);

/// Registers and unregisters queue notifications as KVM ioeventfds.
struct KvmNotifications(Arc<VmFd>);

impl NotificationRegistrar for KvmNotifications {
    fn register(&self, addr: u64, evt: &EventFd) -> io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, evt: &EventFd) -> io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// The identification of a modern virtio device of `device_type`.
fn virtio_header(device_type: u32, (class_code, subclass): (u8, u8)) -> PciHeader {
    let offset = u16::try_from(device_type).unwrap_or(0);
    PciHeader {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id: VIRTIO_PCI_MODERN_DEVICE_BASE + offset,
        revision_id: 1,
        class_code,
        subclass,
        prog_if: 0,
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        multi_function: false,
    }
}

fn device_err(kind: &'static str, id: &str) -> impl Fn(String) -> DeviceManagerError {
    let id = id.to_string();
    move |message| DeviceManagerError::Device {
        kind,
        id: id.clone(),
        message,
    }
}

impl DeviceManager {
    /// Puts a virtio device on the bus: one MSI-X vector per queue plus one for config
    /// changes, BAR 0 allocated, and each queue's notification an ioeventfd wherever the
    /// guest keeps BAR 0 decoding.
    fn add_virtio(
        &mut self,
        id: &str,
        device: Box<dyn VirtioDevice>,
        header: PciHeader,
    ) -> Result<u8, DeviceManagerError> {
        let vectors = Arc::new(
            self.msi_router
                .allocate(device.num_queues() + 1)
                .map_err(PciError::from)?,
        );
        let mut transport = VirtioPciDevice::new(device, header, vectors, self.memory.clone())
            .map_err(PciError::from)?;
        let bar = self
            .pci
            .allocate_bar(VIRTIO_PCI_BAR_SIZE, BarKind::Mmio64)?;
        transport
            .set_bar_address(bar)
            .map_err(|e| PciError::Virtio(VirtioPciError::Config(e)))?;
        transport.attach_registrar(Box::new(KvmNotifications(self.vm.clone())));
        let transport = Arc::new(Mutex::new(transport));
        let slot = self.pci.add(transport.clone())?;
        self.virtio.push(VirtioEntry {
            id: id.to_string(),
            slot,
            transport,
        });
        Ok(slot)
    }

    /// The ai_infer device, whose queues `ai-inferd` serves over vhost-user.
    pub(super) fn add_ai_infer(&mut self, ai: &AiInferConfig) -> Result<(), DeviceManagerError> {
        let err = device_err("ai_infer", "ai_infer");
        let device = VhostUserDevice::new(
            VhostUserDeviceConfig {
                device_type: proto::VIRTIO_ID_AI_INFER,
                num_queues: usize::try_from(ai.queues).map_err(|e| err(e.to_string()))?,
                queue_max_size: u16::try_from(ai.queue_size).map_err(|e| err(e.to_string()))?,
                config_len: u32::try_from(proto::CONFIG_SPACE_LEN)
                    .map_err(|e| err(e.to_string()))?,
                allowed_features: proto::DEVICE_FEATURES,
                socket: ai.socket.clone(),
                backend_peer: devices::virtio::vhost_user::BackendPeer {
                    uid: ai.backend_uid,
                    gid: ai.backend_gid,
                },
            },
            self.memory.clone(),
        )
        .map_err(|e| err(e.to_string()))?;
        let [prog_if, subclass, class_code, _] = proto::PCI_CLASS_CODE_AI_INFER.to_le_bytes();
        let header = PciHeader {
            vendor_id: proto::PCI_VENDOR_ID_VIRTIO,
            device_id: proto::PCI_DEVICE_ID_AI_INFER,
            revision_id: proto::PCI_REVISION_ID_AI_INFER,
            class_code,
            subclass,
            prog_if,
            subsystem_vendor_id: proto::PCI_SUBSYSTEM_VENDOR_ID,
            subsystem_id: proto::PCI_SUBSYSTEM_ID_AI_INFER,
            multi_function: false,
        };
        let slot = self.add_virtio("ai_infer", Box::new(device), header)?;
        log::info!(
            "ai_infer device at PCI 00:{slot:02x}.0, backend socket {}",
            ai.socket.display()
        );
        Ok(())
    }

    /// A virtio-blk drive backed by a raw image.
    pub(super) fn add_block(&mut self, drive: &DriveConfig) -> Result<(), DeviceManagerError> {
        let device = Block::new(BlockConfig {
            id: drive.id.clone(),
            path: drive.path.clone(),
            read_only: drive.read_only,
            serial: drive.serial.clone(),
            rate_limiter: drive.rate_limiter,
        })
        .map_err(|e| device_err("drive", &drive.id)(e.to_string()))?;
        let header = virtio_header(virtio_ids::VIRTIO_ID_BLOCK, CLASS_STORAGE_OTHER);
        let slot = self.add_virtio(&drive.id, Box::new(device), header)?;
        log::info!(
            "drive '{}' at PCI 00:{slot:02x}.0: {}{}",
            drive.id,
            drive.path.display(),
            if drive.read_only { " (read-only)" } else { "" }
        );
        Ok(())
    }

    /// A virtio-net interface on an existing tap.
    pub(super) fn add_net(&mut self, net: &NetConfig) -> Result<(), DeviceManagerError> {
        let device = Net::new(NetDeviceConfig {
            id: net.id.clone(),
            tap: net.tap.clone(),
            mac: net.mac.map(|m| m.0),
            mtu: net.mtu,
            rx_rate_limiter: net.rx_rate_limiter,
            tx_rate_limiter: net.tx_rate_limiter,
        })
        .map_err(|e| device_err("network interface", &net.id)(e.to_string()))?;
        let header = virtio_header(virtio_ids::VIRTIO_ID_NET, CLASS_NETWORK_ETHERNET);
        let slot = self.add_virtio(&net.id, Box::new(device), header)?;
        log::info!(
            "network interface '{}' at PCI 00:{slot:02x}.0 on tap {}",
            net.id,
            net.tap
        );
        Ok(())
    }

    /// The vsock device, with Firecracker's hybrid unix-socket host side.
    pub(super) fn add_vsock(&mut self, vsock: &VsockConfig) -> Result<(), DeviceManagerError> {
        let device = Vsock::new(VsockDeviceConfig {
            guest_cid: u64::from(vsock.guest_cid),
            uds_path: vsock.uds_path.clone(),
        })
        .map_err(|e| device_err("vsock", "vsock")(e.to_string()))?;
        let header = virtio_header(virtio_ids::VIRTIO_ID_VSOCK, CLASS_COMMUNICATION_OTHER);
        let slot = self.add_virtio("vsock", Box::new(device), header)?;
        log::info!(
            "vsock at PCI 00:{slot:02x}.0: guest CID {}, host socket {}",
            vsock.guest_cid,
            vsock.uds_path.display()
        );
        Ok(())
    }
}
