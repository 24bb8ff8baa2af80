//! Which parts of a BAR the guest reaches directly (host mmap of the device region, put in
//! a KVM memory slot) and which stay trapped (the MSI-X table and PBA, and whatever the
//! kernel does not let us mmap).

use std::io;

use super::backend::{DeviceMapping, RegionInfo};

/// Where the VMM maps BAR pieces into the guest physical address space (KVM memory
/// slots), so guest accesses to them never exit.
pub trait GuestMapper: Send {
    /// Maps `[host_addr, host_addr + len)` at guest-physical `gpa`; returns a handle for
    /// [`Self::unmap`]. Fails when the range is unusable (it overlaps RAM or another slot).
    ///
    /// # Safety
    /// The caller keeps the host range mapped until it calls [`Self::unmap`] with the
    /// returned handle.
    unsafe fn map(&mut self, gpa: u64, host_addr: *mut u8, len: u64) -> io::Result<u32>;

    /// Removes the mapping `handle`.
    fn unmap(&mut self, handle: u32) -> io::Result<()>;
}

/// A mmapped part of a BAR: while the BAR is decoded it is mapped into the guest at the
/// BAR's address + `offset` through the VMM's [`GuestMapper`].
#[derive(Debug)]
pub struct BarMmap {
    pub bar: usize,
    pub offset: u64,
    mapping: DeviceMapping,
    /// The mapper's handle while mapped into the guest.
    pub(crate) guest: Option<u32>,
}

impl BarMmap {
    pub fn new(bar: usize, offset: u64, mapping: DeviceMapping) -> Self {
        BarMmap {
            bar,
            offset,
            mapping,
            guest: None,
        }
    }

    /// Whether this piece is mapped into the guest now.
    pub fn in_guest(&self) -> bool {
        self.guest.is_some()
    }

    pub fn host_addr(&self) -> *mut u8 {
        self.mapping.host_addr()
    }

    pub fn len(&self) -> u64 {
        self.mapping.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }
}

/// The host page size (what mmap offsets and KVM slots are aligned to).
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// The `(offset, len)` pieces of a region that can be mmapped: the whole region or its
/// sparse areas, minus the `trapped` ranges widened to whole pages, each piece shrunk to
/// whole pages. Empty when the region cannot be mmapped.
pub fn mappable_areas(region: &RegionInfo, trapped: &[(u64, u64)], page: u64) -> Vec<(u64, u64)> {
    if !region.mmap || region.size == 0 || !page.is_power_of_two() {
        return Vec::new();
    }
    let areas: Vec<(u64, u64)> = match &region.sparse {
        Some(sparse) => sparse.clone(),
        None => vec![(0, region.size)],
    };
    let holes: Vec<(u64, u64)> = trapped
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(off, len)| {
            let start = off - off % page;
            let end = off.saturating_add(len).saturating_add(page - 1) / page * page;
            (start, end)
        })
        .collect();
    let mut out = Vec::new();
    for (off, len) in areas {
        // Areas outside the region (a bad sparse capability) are dropped.
        let Some(end) = off.checked_add(len).filter(|&e| e <= region.size) else {
            continue;
        };
        let mut pieces = vec![(off.next_multiple_of(page), end - end % page)];
        for &(h_start, h_end) in &holes {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if h_end <= s || h_start >= e {
                        vec![(s, e)]
                    } else {
                        vec![(s, h_start.max(s)), (h_end.min(e), e)]
                    }
                })
                .collect();
        }
        out.extend(
            pieces
                .into_iter()
                .filter(|(s, e)| e > s)
                .map(|(s, e)| (s, e - s)),
        );
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn region(size: u64, sparse: Option<Vec<(u64, u64)>>) -> RegionInfo {
        RegionInfo {
            size,
            mmap: true,
            sparse,
        }
    }

    #[test]
    fn a_plain_region_maps_whole() {
        assert_eq!(
            mappable_areas(&region(1 << 20, None), &[], PAGE),
            vec![(0, 1 << 20)]
        );
        let mut r = region(1 << 20, None);
        r.mmap = false;
        assert!(mappable_areas(&r, &[], PAGE).is_empty());
    }

    #[test]
    fn msix_table_and_pba_pages_stay_trapped() {
        // Table at 0x2000 (0x30 bytes), PBA at 0x3008 (8 bytes) in a 64 KiB BAR.
        let areas = mappable_areas(&region(0x10000, None), &[(0x2000, 0x30), (0x3008, 8)], PAGE);
        assert_eq!(areas, vec![(0, 0x2000), (0x4000, 0xc000)]);
        // A table that fills the only page leaves nothing to map.
        assert!(mappable_areas(&region(0x1000, None), &[(0, 0x100)], PAGE).is_empty());
    }

    #[test]
    fn sparse_areas_are_honoured_and_checked() {
        let areas = mappable_areas(
            &region(
                0x10000,
                Some(vec![(0x8000, 0x8000), (0, 0x1800), (0xf000, 0x2000)]),
            ),
            &[(0x9000, 0x10)],
            PAGE,
        );
        // (0, 0x1800) shrinks to its whole page; the area past the region end is dropped.
        assert_eq!(areas, vec![(0, 0x1000), (0x8000, 0x1000), (0xa000, 0x6000)]);
    }
}
