//! The DMA pool: memory the device reads and writes by guest-physical address.
//!
//! A pool is a set of pages with known device addresses (from pagemap for hugetlbfs
//! pages, made up for heap-backed test pools). Buffers are carved out of it by an
//! [`ExtentAllocator`] so that each one is a single range of device addresses: one
//! descriptor per tensor, read and written in place by the device.
//!
//! A pool whose memory was received from the agent daemon has no device addresses
//! in this process; its buffers are named to the daemon by offset instead.

mod extent;
mod mapping;
pub mod pagemap;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

pub use extent::{segments_from_pages, ExtentAllocator, ExtentError, Segment, DMA_ALIGN};
use mapping::Mapping;
pub use mapping::{MappingError, HUGE_PAGE_SIZE};
use pagemap::{Pagemap, PagemapError};

/// Where hugetlbfs is normally mounted in the guest (used when memfd cannot make
/// huge pages).
pub const DEFAULT_HUGETLBFS: &str = "/dev/hugepages";

/// Errors of the DMA pool.
#[derive(Debug, Error)]
pub enum DmaError {
    /// Creating or mapping the memory failed.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// Translating a page to its physical address failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// A huge page whose physical address is not aligned to its size.
    #[error("Huge page at pool offset {offset:#x} has unaligned physical address {addr:#x}")]
    UnalignedPage {
        /// Offset of the page in the pool.
        offset: usize,
        /// Its physical address.
        addr: u64,
    },
    /// The allocator refused.
    #[error(transparent)]
    Alloc(#[from] ExtentError),
    /// An access or a range outside a buffer or the pool.
    #[error("Range {offset:#x}+{len:#x} is outside {what} of {size:#x} bytes")]
    OutOfBounds {
        /// What was accessed.
        what: &'static str,
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        len: usize,
        /// Size of the buffer or pool.
        size: usize,
    },
    /// The pool has no device addresses in this process (memory from the daemon).
    #[error("This pool has no device addresses in this process")]
    NoDeviceAddresses,
    /// Segment list received for a shared pool does not describe it.
    #[error("Invalid segment {start:#x}..{end:#x} for a pool of {len:#x} bytes")]
    BadSegment {
        /// Start.
        start: usize,
        /// End.
        end: usize,
        /// Pool length.
        len: usize,
    },
}

struct PoolInner {
    mapping: Mapping,
    page_size: usize,
    /// Device address of each page, if known in this process.
    page_addrs: Option<Vec<u64>>,
    allocator: Mutex<ExtentAllocator>,
}

impl PoolInner {
    fn check_range(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        let size = self.mapping.len();
        if offset.checked_add(len).map_or(true, |end| end > size) {
            return Err(DmaError::OutOfBounds {
                what: "the DMA pool",
                offset,
                len,
                size,
            });
        }
        Ok(())
    }
}

/// A pool of DMA memory. Cloning gives another handle to the same pool.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaPool")
            .field("len", &self.len())
            .field("page_size", &self.inner.page_size)
            .field("segments", &self.segments().len())
            .finish()
    }
}

impl DmaPool {
    fn from_parts(
        mapping: Mapping,
        page_size: usize,
        page_addrs: Option<Vec<u64>>,
        segments: Vec<Segment>,
    ) -> Self {
        DmaPool {
            inner: Arc::new(PoolInner {
                mapping,
                page_size,
                page_addrs,
                allocator: Mutex::new(ExtentAllocator::new(segments)),
            }),
        }
    }

    /// A pool of `len` bytes of 2 MiB huge pages (a multiple of 2 MiB), locked, with
    /// every page's guest-physical address read from pagemap (needs root).
    pub fn hugetlb(len: usize, hugetlbfs_dir: &str) -> Result<Self, DmaError> {
        let mapping = Mapping::hugetlb(len, hugetlbfs_dir)?;
        let pagemap = Pagemap::open()?;
        let base = mapping.ptr().as_ptr() as u64;
        let mut addrs = Vec::with_capacity(len / HUGE_PAGE_SIZE);
        for offset in (0..len).step_by(HUGE_PAGE_SIZE) {
            let addr = pagemap.physical(base + offset as u64)?;
            if addr % HUGE_PAGE_SIZE as u64 != 0 {
                return Err(DmaError::UnalignedPage { offset, addr });
            }
            addrs.push(addr);
        }
        let segments = segments_from_pages(&addrs, HUGE_PAGE_SIZE);
        log::debug!(
            "DMA pool: {} huge pages in {} physically contiguous segments",
            addrs.len(),
            segments.len()
        );
        Ok(Self::from_parts(
            mapping,
            HUGE_PAGE_SIZE,
            Some(addrs),
            segments,
        ))
    }

    /// A heap-backed pool whose page `i` pretends to live at device address
    /// `page_addrs[i]`: for tests and fake devices, never for a real device.
    pub fn fake(page_size: usize, page_addrs: &[u64]) -> Result<Self, DmaError> {
        Self::fake_in(page_size, page_addrs, Mapping::heap)
    }

    /// Like [`DmaPool::fake`], but in a memfd that can be shared with another process
    /// (to test the daemon with a fake device).
    pub fn fake_shareable(page_size: usize, page_addrs: &[u64]) -> Result<Self, DmaError> {
        Self::fake_in(page_size, page_addrs, Mapping::memfd)
    }

    fn fake_in(
        page_size: usize,
        page_addrs: &[u64],
        map: impl FnOnce(usize, usize) -> Result<Mapping, MappingError>,
    ) -> Result<Self, DmaError> {
        let len = page_size
            .checked_mul(page_addrs.len())
            .ok_or(MappingError::BadSize {
                len: usize::MAX,
                page_size,
            })?;
        let mapping = map(len, page_size)?;
        let segments = segments_from_pages(page_addrs, page_size);
        Ok(Self::from_parts(
            mapping,
            page_size,
            Some(page_addrs.to_vec()),
            segments,
        ))
    }

    /// Maps a pool file received from the agent daemon, with the segments the daemon
    /// found in it; its buffers have no device addresses here.
    pub fn shared(
        fd: OwnedFd,
        len: usize,
        page_size: usize,
        segments: Vec<Segment>,
    ) -> Result<Self, DmaError> {
        let mut prev_end = 0;
        for s in &segments {
            if s.start < prev_end || s.end <= s.start || s.end > len {
                return Err(DmaError::BadSegment {
                    start: s.start,
                    end: s.end,
                    len,
                });
            }
            prev_end = s.end;
        }
        let mapping = Mapping::shared(fd, len, page_size)?;
        Ok(Self::from_parts(mapping, page_size, None, segments))
    }

    /// Pool size in bytes.
    pub fn len(&self) -> usize {
        self.inner.mapping.len()
    }

    /// Whether the pool is empty (never, for a constructed pool).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Page size of the pool.
    pub fn page_size(&self) -> usize {
        self.inner.page_size
    }

    /// The physically contiguous segments of the pool.
    pub fn segments(&self) -> Vec<Segment> {
        self.lock().segments().to_vec()
    }

    /// The pool file, to share the pool with another process (hugetlbfs pools only).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.mapping.fd().map(|fd| fd.as_fd())
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> usize {
        self.lock().free_bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExtentAllocator> {
        // A panic while holding the lock cannot leave the allocator half-updated in a
        // way that matters more than losing the pool; keep serving.
        self.inner
            .allocator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a buffer of `size` bytes, 64-byte aligned, contiguous in device
    /// address space. It is freed when dropped.
    pub fn alloc(&self, size: usize) -> Result<DmaBuffer, DmaError> {
        let (offset, capacity) = self.lock().alloc(size)?;
        Ok(DmaBuffer {
            pool: self.clone(),
            offset,
            len: size,
            capacity,
        })
    }

    /// The device address ranges covering `offset..offset+len` of the pool, merged
    /// where pages are adjacent and each at most `u32::MAX` bytes (one descriptor).
    pub fn device_ranges(&self, offset: usize, len: usize) -> Result<Vec<(u64, u32)>, DmaError> {
        self.inner.check_range(offset, len)?;
        let addrs = self
            .inner
            .page_addrs
            .as_ref()
            .ok_or(DmaError::NoDeviceAddresses)?;
        let page = self.inner.page_size;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let page_index = at / page;
            let in_page = at % page;
            let chunk = (page - in_page).min(end - at);
            let base = addrs
                .get(page_index)
                .copied()
                .ok_or(DmaError::NoDeviceAddresses)?;
            let addr = base
                .checked_add(in_page as u64)
                .ok_or(DmaError::NoDeviceAddresses)?;
            match out.last_mut() {
                Some((a, l))
                    if a.checked_add(u64::from(*l)) == Some(addr)
                        && u64::from(*l) + chunk as u64 <= u64::from(u32::MAX) =>
                {
                    *l += chunk as u32;
                }
                // chunk <= page_size, which is far below 4 GiB.
                _ => out.push((addr, chunk as u32)),
            }
            at += chunk;
        }
        Ok(out)
    }

    /// The memory behind device range `addr..addr+len`, if it lies inside one page run
    /// of this pool: what a fake device uses to find the driver's buffers.
    pub fn host_slice_for_device(&self, addr: u64, len: usize) -> Option<(NonNull<u8>, usize)> {
        let addrs = self.inner.page_addrs.as_ref()?;
        let page = self.inner.page_size as u64;
        let index = addrs.iter().position(|p| *p <= addr && addr - p < page)?;
        let offset = index * self.inner.page_size + (addr - addrs[index]) as usize;
        // The whole range must map back to the same offsets (pages adjacent).
        let ranges = self.device_ranges(offset, len).ok()?;
        if ranges.len() != 1 || ranges[0].0 != addr {
            return None;
        }
        // SAFETY: offset + len <= pool length (checked by device_ranges).
        let ptr = unsafe { self.inner.mapping.ptr().as_ptr().add(offset) };
        Some((NonNull::new(ptr)?, offset))
    }

    fn free(&self, offset: usize) {
        if let Err(e) = self.lock().free(offset) {
            log::error!("DMA pool: {e}");
        }
    }

    /// Whether two handles name the same pool.
    pub fn same_pool(&self, other: &DmaPool) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Base address of the pool mapping in this process.
    fn base(&self) -> NonNull<u8> {
        self.inner.mapping.ptr()
    }
}

/// A buffer carved from a [`DmaPool`], returned to the pool when dropped.
///
/// The device may write it only while it is part of a chain in flight; the driver
/// API borrows it for that time, so `as_slice` / `as_mut_slice` never race the device.
pub struct DmaBuffer {
    pool: DmaPool,
    offset: usize,
    len: usize,
    capacity: usize,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("offset", &format_args!("{:#x}", self.offset))
            .field("len", &self.len)
            .finish()
    }
}

/// Plain integer types the rings are made of.
pub trait RingScalar: Copy {
    /// Width in bytes.
    const SIZE: usize;
}
impl RingScalar for u16 {
    const SIZE: usize = 2;
}
impl RingScalar for u32 {
    const SIZE: usize = 4;
}
impl RingScalar for u64 {
    const SIZE: usize = 8;
}

impl DmaBuffer {
    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes (never: zero-size allocations fail).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the buffer in its pool (how the daemon names it).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The pool the buffer belongs to.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    /// Device address of the first byte, if the pool knows addresses here. The whole
    /// buffer is contiguous from there.
    pub fn device_addr(&self) -> Option<u64> {
        let ranges = self.pool.device_ranges(self.offset, self.capacity).ok()?;
        (ranges.len() == 1).then(|| ranges[0].0)
    }

    fn ptr(&self) -> *mut u8 {
        // The allocation is inside the pool mapping (allocator invariant).
        self.pool.base().as_ptr().wrapping_add(self.offset)
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: offset..offset+len is inside the live mapping, owned by this buffer
        // (no other buffer overlaps it); the device writes it only while the driver API
        // holds a mutable borrow of this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    /// The buffer's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }

    fn element_ptr<T: RingScalar>(&self, offset: usize) -> Result<*mut T, DmaError> {
        if offset
            .checked_add(T::SIZE)
            .map_or(true, |end| end > self.capacity)
            || offset % T::SIZE != 0
        {
            return Err(DmaError::OutOfBounds {
                what: "a ring buffer",
                offset,
                len: T::SIZE,
                size: self.capacity,
            });
        }
        Ok(self.ptr().wrapping_add(offset).cast())
    }

    /// Volatile read of a ring field the device may write at any time.
    pub fn read_volatile<T: RingScalar>(&self, offset: usize) -> Result<T, DmaError> {
        let p = self.element_ptr::<T>(offset)?;
        // SAFETY: in bounds and aligned (checked); volatile since the device writes it.
        Ok(unsafe { std::ptr::read_volatile(p) })
    }

    /// Volatile write of a ring field the device may read at any time.
    pub fn write_volatile<T: RingScalar>(&self, offset: usize, value: T) -> Result<(), DmaError> {
        let p = self.element_ptr::<T>(offset)?;
        // SAFETY: in bounds and aligned (checked); volatile since the device reads it.
        unsafe { std::ptr::write_volatile(p, value) };
        Ok(())
    }

    /// Acquire load of a 16-bit ring index: reads after it see what the device wrote
    /// before publishing the index.
    pub fn load_acquire_u16(&self, offset: usize) -> Result<u16, DmaError> {
        let p = self.element_ptr::<u16>(offset)?;
        // SAFETY: aligned, in bounds and live for as long as `self`; all accesses of
        // this field from this process are atomic or volatile.
        Ok(unsafe { AtomicU16::from_ptr(p) }.load(Ordering::Acquire))
    }

    /// Release store of a 16-bit ring index: what was written before is visible to the
    /// device before the new index.
    pub fn store_release_u16(&self, offset: usize, value: u16) -> Result<(), DmaError> {
        let p = self.element_ptr::<u16>(offset)?;
        // SAFETY: as in `load_acquire_u16`.
        unsafe { AtomicU16::from_ptr(p) }.store(value, Ordering::Release);
        Ok(())
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        self.check(offset, data.len())?;
        // SAFETY: destination in bounds (checked); source is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().add(offset), data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaError> {
        self.check(offset, out.len())?;
        // SAFETY: source in bounds (checked); destination is a distinct Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.capacity)
        {
            return Err(DmaError::OutOfBounds {
                what: "a DMA buffer",
                offset,
                len,
                size: self.capacity,
            });
        }
        Ok(())
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        self.pool.free(self.offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    #[test]
    fn fake_pool_translates_both_ways() {
        // Pages 0,1 adjacent; page 2 elsewhere.
        let pool = DmaPool::fake(PAGE, &[0x10_0000, 0x10_1000, 0x50_0000]).unwrap();
        assert_eq!(pool.segments().len(), 2);
        let a = pool.alloc(PAGE + 100).unwrap();
        assert_eq!(a.offset(), 0);
        assert_eq!(a.device_addr(), Some(0x10_0000));
        let b = pool.alloc(PAGE).unwrap();
        // Does not fit in the rest of segment 0 (4096 - 192 bytes): starts page 2.
        assert_eq!(b.offset(), 2 * PAGE);
        assert_eq!(b.device_addr(), Some(0x50_0000));
        assert_eq!(
            pool.device_ranges(PAGE, 2 * PAGE).unwrap(),
            vec![(0x10_1000, PAGE as u32), (0x50_0000, PAGE as u32)]
        );
        assert!(pool.device_ranges(2 * PAGE, PAGE + 1).is_err());
        let (ptr, off) = pool.host_slice_for_device(0x10_0040, 64).unwrap();
        assert_eq!(off, 64);
        assert_eq!(ptr.as_ptr() as usize - pool.base().as_ptr() as usize, 64);
        assert!(
            pool.host_slice_for_device(0x10_1f00, 0x200).is_none(),
            "crosses into page 2's hole"
        );
        assert!(pool.host_slice_for_device(0x20_0000, 1).is_none());
        drop(a);
        drop(b);
        assert_eq!(pool.free_bytes(), 3 * PAGE);
    }

    #[test]
    fn buffer_accessors_are_bounds_checked() {
        let pool = DmaPool::fake(PAGE, &[0x1000]).unwrap();
        let mut buf = pool.alloc(100).unwrap();
        assert_eq!(buf.len(), 100);
        buf.as_mut_slice().copy_from_slice(&[7u8; 100]);
        assert_eq!(buf.as_slice()[99], 7);
        buf.write_volatile::<u32>(4, 0xabcd).unwrap();
        assert_eq!(buf.read_volatile::<u32>(4).unwrap(), 0xabcd);
        buf.store_release_u16(126, 9).unwrap();
        assert_eq!(buf.load_acquire_u16(126).unwrap(), 9);
        assert!(buf.read_volatile::<u32>(2).is_err(), "misaligned");
        assert!(buf.read_volatile::<u64>(128).is_err(), "past capacity");
        assert!(buf.write_at(120, &[0; 9]).is_err());
        let mut out = [0u8; 4];
        buf.read_at(4, &mut out).unwrap();
        assert_eq!(out, 0xabcdu32.to_le_bytes());
        assert!(buf.read_at(usize::MAX, &mut out).is_err());
    }

    #[test]
    fn shared_pool_rejects_bad_segments() {
        let fd = std::fs::File::open("/dev/null").unwrap();
        let err = DmaPool::shared(
            fd.into(),
            4 * PAGE,
            PAGE,
            vec![Segment {
                start: 0,
                end: 5 * PAGE,
            }],
        );
        assert!(matches!(err, Err(DmaError::BadSegment { .. })));
    }

    /// Needs root and two free 2 MiB huge pages (`echo 2 > /proc/sys/vm/nr_hugepages`).
    #[test]
    #[ignore = "needs root and free 2 MiB huge pages"]
    fn hugetlb_pool_has_physical_addresses() {
        let pool = DmaPool::hugetlb(2 * HUGE_PAGE_SIZE, DEFAULT_HUGETLBFS).unwrap();
        let buf = pool.alloc(HUGE_PAGE_SIZE).unwrap();
        let addr = buf.device_addr().unwrap();
        assert_eq!(addr % HUGE_PAGE_SIZE as u64, 0);
        assert!(pool.fd().is_some());
        let pm = Pagemap::open().unwrap();
        assert_eq!(
            pm.physical(buf.as_slice().as_ptr() as u64 + 4096).unwrap(),
            addr + 4096
        );
    }
}
