//! Feeds a sequence of guest config-space and MSI-X table accesses to
//! `devices::pci::PciConfiguration` (devices/src/pci/config_space.rs: `read_reg`,
//! `read_bytes`, `write_reg`, `decoded_bars`) and `devices::pci::Msix`
//! (devices/src/pci/msix.rs: `read_table`, `write_table`, `read_pba`, `set_control`,
//! `reset`), set up like a virtio-pci function: a 64-bit, a 32-bit and an I/O BAR, the
//! MSI-X capability and a vendor capability with guest-writable fields.
//!
//! Hostile because a guest picks every offset, size and value: unaligned and odd-sized
//! accesses, registers past the end of config space, BAR sizing with all-ones, writes to
//! read-only and write-1-to-clear bits, table offsets past the vectors. The model must
//! ignore what is malformed and keep read-only fields and BAR alignment intact.
//!
//! Input: byte 0 picks the vector count and whether config space is extended; then
//! 11-byte operations: kind and size (1 byte), offset (u16 LE), value (u64 LE).

#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use devices::pci::msix::MSIX_TABLE_ENTRY_SIZE;
use devices::pci::{
    BarKind, MsiMessage, MsiVectors, Msix, MsixLayout, PciConfiguration, PciHeader,
};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// Vector counts byte 0 picks from (MSI-X allows 1 to 2048).
const VECTORS: [usize; 6] = [1, 2, 3, 9, 64, 2048];
/// Access sizes an operation picks from: the valid ones, and some that are not.
const SIZES: [usize; 8] = [1, 2, 4, 8, 0, 3, 5, 16];
/// Registers whose value the guest cannot change: IDs, class, subsystem, capability
/// pointer.
const READ_ONLY_REGS: [usize; 4] = [0, 2, 11, 13];

/// The VMM's side of the vectors: records the route of each.
struct Vectors {
    routes: Mutex<Vec<Option<MsiMessage>>>,
}

impl MsiVectors for Vectors {
    fn len(&self) -> usize {
        self.routes.lock().unwrap().len()
    }

    fn notifier(&self, _vector: u16) -> Option<&EventFd> {
        None
    }

    fn update(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self.routes.lock().unwrap();
        let slot = routes
            .get_mut(usize::from(vector))
            .expect("Msix routes only vectors it has");
        *slot = message;
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, ops)) = data.split_first() else {
        return;
    };
    let header = PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        revision_id: 1,
        class_code: 0x01,
        subclass: 0x80,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x40,
        ..PciHeader::default()
    };
    let mut config = PciConfiguration::new(header, setup & 0x80 != 0);
    config.add_bar(0, 0x8000, BarKind::Mmio64, false).unwrap();
    config.add_bar(2, 0x1000, BarKind::Mmio32, true).unwrap();
    config.add_bar(3, 0x20, BarKind::Io, false).unwrap();

    let vectors = Arc::new(Vectors {
        routes: Mutex::new(vec![
            None;
            VECTORS[usize::from(setup & 0x7f) % VECTORS.len()]
        ]),
    });
    let layout = MsixLayout {
        table_bar: 0,
        table_offset: 0x2000,
        pba_bar: 0,
        pba_offset: 0x6000,
    };
    let mut msix = Msix::new(vectors.clone(), layout);
    let msix_reg = config.add_capability(&msix.capability()).unwrap() / 4;
    config.set_write_mask(msix_reg, Msix::CONTROL_WRITE_MASK);
    // A vendor capability whose body the guest may write, like virtio's PCI cfg window.
    let mut vendor_cap = [0u8; 20];
    vendor_cap[..4].copy_from_slice(&[0x09, 0, 20, 5]);
    let vendor_reg = config.add_capability(&vendor_cap).unwrap() / 4;
    config.set_write_mask(vendor_reg, 0xffff_ffff);
    config.set_write_mask(vendor_reg + 1, 0x0000_00ff);
    config.set_write_mask(vendor_reg + 2, 0xffff_ffff);
    config.set_write_mask(vendor_reg + 3, 0xffff_ffff);
    config.set_write_mask(vendor_reg + 4, 0xffff_ffff);

    let read_only: Vec<u32> = READ_ONLY_REGS.iter().map(|&r| config.read_reg(r)).collect();
    let cap_headers = [msix_reg, vendor_reg].map(|r| config.read_reg(r) & 0xffff);
    let mut buf = [0u8; 16];

    for op in ops.chunks_exact(11) {
        let size = SIZES[usize::from(op[0] >> 4) % SIZES.len()];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value: [u8; 8] = op[3..11].try_into().unwrap();
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&value);
        bytes[8..].copy_from_slice(&value);
        let bytes = &bytes[..size];
        // Config space: register index and byte within it (0-7, so some are invalid).
        let (reg, byte) = ((offset >> 3) as usize, offset & 7);
        match op[0] & 0x7 {
            0 => {
                let _ = config.read_reg(reg);
            }
            1 => config.read_bytes(reg, byte, &mut buf[..size]),
            2 => {
                config.write_reg(reg, byte, bytes);
                if reg == msix_reg {
                    msix.set_control((config.read_reg(reg) >> 16) as u16);
                }
            }
            3 => msix.read_table(offset, &mut buf[..size]),
            4 => msix.write_table(offset, bytes),
            5 => msix.read_pba(offset, &mut buf[..size]),
            6 => msix.reset(),
            _ => {
                // A whole table entry, as Linux writes it: address, data, then unmask.
                let entry = (offset % (u64::from(msix.num_vectors()) + 1)) * MSIX_TABLE_ENTRY_SIZE;
                msix.write_table(entry, &value);
                msix.write_table(entry + 8, &value[..4]);
                msix.write_table(entry + 12, &[0; 4]);
            }
        }

        let now: Vec<u32> = READ_ONLY_REGS.iter().map(|&r| config.read_reg(r)).collect();
        assert_eq!(now, read_only, "a read-only register changed");
        let headers = [msix_reg, vendor_reg].map(|r| config.read_reg(r) & 0xffff);
        assert_eq!(headers, cap_headers, "a capability header changed");
        for bar in config.decoded_bars().into_iter().flatten() {
            assert_eq!(bar.addr % bar.size, 0, "BAR {} misaligned", bar.index);
            assert!(bar.addr.checked_add(bar.size).is_some());
        }
        if !msix.enabled() {
            let routes = vectors.routes.lock().unwrap();
            assert!(routes.iter().all(Option::is_none), "routed while disabled");
        }
    }
});
