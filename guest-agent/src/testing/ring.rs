//! The device side of a split virtqueue, for tests: reads descriptors and the
//! available ring, writes the used ring, all through the driver's DMA pool by device
//! address and at the offsets the virtio spec gives (not the driver's code).

use crate::dma::DmaPool;

/// A chain as the device sees it: `(addr, len, writable)` per buffer.
pub type Chain = Vec<(u64, u32, bool)>;

/// A device's view of one split ring.
pub struct FakeRing {
    pool: DmaPool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

impl FakeRing {
    pub fn new(pool: DmaPool, size: u16, desc: u64, avail: u64, used: u64) -> Self {
        FakeRing {
            pool,
            size,
            desc,
            avail,
            used,
            last_avail: 0,
            used_idx: 0,
        }
    }

    fn ptr(&self, addr: u64, len: usize) -> *mut u8 {
        self.pool
            .host_slice_for_device(addr, len)
            .unwrap_or_else(|| panic!("device address {addr:#x}+{len} not in the pool"))
            .0
            .as_ptr()
    }

    /// Reads a ring field with one access of its width, as a device must (a field
    /// read byte by byte could be torn by the driver's concurrent update).
    fn read<const N: usize>(&self, addr: u64) -> [u8; N] {
        let p = self.ptr(addr, N);
        assert_eq!(p as usize % N, 0, "unaligned ring field");
        let mut out = [0u8; N];
        // SAFETY: host_slice_for_device checked addr..addr+N lies in the pool, and the
        // access is aligned (asserted).
        unsafe {
            match N {
                2 => out.copy_from_slice(&std::ptr::read_volatile(p.cast::<u16>()).to_ne_bytes()),
                4 => out.copy_from_slice(&std::ptr::read_volatile(p.cast::<u32>()).to_ne_bytes()),
                8 => out.copy_from_slice(&std::ptr::read_volatile(p.cast::<u64>()).to_ne_bytes()),
                _ => out[0] = std::ptr::read_volatile(p),
            }
        }
        out
    }

    /// Writes a ring field with one access of its width.
    fn write(&self, addr: u64, data: &[u8]) {
        let p = self.ptr(addr, data.len());
        assert_eq!(p as usize % data.len(), 0, "unaligned ring field");
        // SAFETY: as in `read`.
        unsafe {
            match *data {
                [a, b] => std::ptr::write_volatile(p.cast::<u16>(), u16::from_ne_bytes([a, b])),
                [a, b, c, d] => {
                    std::ptr::write_volatile(p.cast::<u32>(), u32::from_ne_bytes([a, b, c, d]))
                }
                _ => panic!("ring fields are 2 or 4 bytes"),
            }
        }
    }

    pub fn avail_flags(&self) -> u16 {
        u16::from_le_bytes(self.read(self.avail))
    }

    /// Takes the next available chain: head and `(addr, len, writable)` per buffer.
    pub fn take(&mut self) -> Option<(u16, Chain)> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let idx = u16::from_le_bytes(self.read(self.avail + 2));
        if idx == self.last_avail {
            return None;
        }
        let slot = u64::from(self.last_avail % self.size);
        let head = u16::from_le_bytes(self.read(self.avail + 4 + 2 * slot));
        self.last_avail = self.last_avail.wrapping_add(1);
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            assert!(
                i < self.size && chain.len() < usize::from(self.size),
                "bad chain"
            );
            let d = self.desc + 16 * u64::from(i);
            let addr = u64::from_le_bytes(self.read(d));
            let len = u32::from_le_bytes(self.read(d + 8));
            let flags = u16::from_le_bytes(self.read(d + 12));
            let next = u16::from_le_bytes(self.read(d + 14));
            chain.push((addr, len, flags & 2 != 0));
            if flags & 1 == 0 {
                break;
            }
            i = next;
        }
        Some((head, chain))
    }

    /// Publishes a used element.
    pub fn complete(&mut self, id: u32, len: u32) {
        let slot = u64::from(self.used_idx % self.size);
        let at = self.used + 4 + 8 * slot;
        self.write(at, &id.to_le_bytes());
        self.write(at + 4, &len.to_le_bytes());
        self.advance_used_idx(1);
    }

    /// Moves `used.idx` without writing elements (to fake a broken device).
    pub fn advance_used_idx(&mut self, by: u16) {
        self.used_idx = self.used_idx.wrapping_add(by);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(self.used + 2, &self.used_idx.to_le_bytes());
    }

    pub fn set_used_flags(&mut self, flags: u16) {
        self.write(self.used, &flags.to_le_bytes());
    }
}

fn resolve(pools: &[DmaPool], addr: u64, len: usize) -> *mut u8 {
    pools
        .iter()
        .find_map(|p| p.host_slice_for_device(addr, len))
        .unwrap_or_else(|| panic!("device access {addr:#x}+{len} outside guest memory"))
        .0
        .as_ptr()
}

/// Copies `len` bytes at device address `addr` out of the pools, as a device would.
pub fn device_read(pools: &[DmaPool], addr: u64, len: usize) -> Vec<u8> {
    let p = resolve(pools, addr, len);
    // SAFETY: host_slice_for_device checked the range lies in a pool.
    (0..len)
        .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
        .collect()
}

/// Writes `data` at device address `addr` of the pools, as a device would.
pub fn device_write(pools: &[DmaPool], addr: u64, data: &[u8]) {
    let p = resolve(pools, addr, data.len());
    for (i, b) in data.iter().enumerate() {
        // SAFETY: host_slice_for_device checked the range lies in a pool.
        unsafe { std::ptr::write_volatile(p.add(i), *b) };
    }
}
