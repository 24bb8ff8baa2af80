//! Feeds `devices::virtio::block::parse_request` (devices/src/virtio/block/request.rs)
//! the descriptor chain a guest published on the block request queue, over 64 KiB of
//! guest memory it filled (see `aivmm_fuzz::Guest` for the input layout).
//!
//! Hostile because the guest writes every byte of it: descriptor addresses and lengths,
//! the chain links and indirect tables, the request header (type, sector) and the
//! DISCARD/WRITE_ZEROES segment. The parser must refuse what is wrong without panicking,
//! and what it accepts must lie inside guest memory and the disk.

#![no_main]

use aivmm_fuzz::Guest;
use devices::virtio::block::{parse_request, Buffer, DiskLimits, Operation, ID_LEN, SECTOR_SIZE};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestMemory, Permissions};

/// Disk sizes in sectors the knobs pick from: empty, one sector, the unit tests' 64 KiB
/// image, and the largest a u64 can count.
const CAPACITIES: [u64; 4] = [0, 1, 128, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let mut guest = Guest::from_fuzz(data);
    let disk = DiskLimits {
        capacity_sectors: CAPACITIES[usize::from(guest.knobs >> 1) % CAPACITIES.len()],
        read_only: guest.knobs & 1 != 0,
    };
    let Some(chain) = guest.queue.pop_descriptor_chain(&guest.mem) else {
        return;
    };
    let mem = &guest.mem;
    let req = match parse_request(mem, chain, &disk) {
        Ok(req) => req,
        Err(e) => {
            // The status, if any, is where the device writes the error code.
            if let Some(status) = e.status {
                assert!(mem.check_range(status, 1, Permissions::Write));
            }
            let _ = (e.error.status(), e.error.to_string());
            return;
        }
    };
    // What the device will write to or read from must be inside guest memory.
    assert!(mem.check_range(req.status, 1, Permissions::Write));
    let in_memory = |data: &[Buffer], access| {
        data.iter()
            .all(|b| b.len > 0 && mem.check_range(b.addr, b.len as usize, access))
    };
    let sum = |data: &[Buffer]| -> u64 { data.iter().map(|b| u64::from(b.len)).sum() };
    let end = |sector: u64, len: u64| {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| s.checked_add(len))
            .expect("accepted range does not overflow")
    };
    let capacity = disk.capacity_sectors.saturating_mul(SECTOR_SIZE);
    match &req.operation {
        Operation::Read { sector, data, len } | Operation::Write { sector, data, len } => {
            let write = matches!(req.operation, Operation::Write { .. });
            assert!(
                !(write && disk.read_only),
                "write accepted on a read-only disk"
            );
            let access = if write {
                Permissions::Read
            } else {
                Permissions::Write
            };
            assert!(in_memory(data, access));
            assert_eq!(sum(data), *len);
            assert_eq!(len % SECTOR_SIZE, 0);
            assert!(end(*sector, *len) <= capacity);
        }
        Operation::GetId { data } => {
            assert!(in_memory(data, Permissions::Write));
            assert_eq!(sum(data), ID_LEN as u64);
        }
        Operation::Discard {
            sector,
            num_sectors,
        }
        | Operation::WriteZeroes {
            sector,
            num_sectors,
            ..
        } => {
            assert!(!disk.read_only, "discard/write-zeroes on a read-only disk");
            assert!(end(*sector, u64::from(*num_sectors) * SECTOR_SIZE) <= capacity);
        }
        Operation::Flush | Operation::Unsupported(_) => {}
    }
    let _ = (req.data_len(), req.operation.name());
});
