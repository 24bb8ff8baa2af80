//! Virtual to guest-physical translation through `/proc/self/pagemap`.
//!
//! Each virtual 4 KiB page has a 64-bit entry: bit 63 = present, bits 0–54 = page
//! frame number. Without CAP_SYS_ADMIN the kernel reports the frame number as 0, so a
//! present page with frame 0 is treated as "not allowed", not as physical address 0.

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

/// Size of the pages pagemap indexes (the base page size on x86_64).
pub const PAGEMAP_PAGE_SIZE: u64 = 4096;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// Errors of pagemap translation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PagemapError {
    /// The page is not resident, so it has no physical address (yet).
    #[error("Virtual address {0:#x} is not backed by a present page")]
    NotPresent(u64),
    /// The kernel hid the frame number: the process lacks CAP_SYS_ADMIN.
    #[error("Pagemap hides the frame of {0:#x}: run as root (CAP_SYS_ADMIN)")]
    Hidden(u64),
    /// A frame number whose address does not fit in 64 bits.
    #[error("Pagemap gives frame {pfn:#x} for {vaddr:#x}, beyond 64-bit addresses")]
    FrameOutOfRange {
        /// The frame number.
        pfn: u64,
        /// Address being translated.
        vaddr: u64,
    },
    /// Reading pagemap failed.
    #[error("Cannot read /proc/self/pagemap at {vaddr:#x}: {message}")]
    Read {
        /// Address being translated.
        vaddr: u64,
        /// The OS error.
        message: String,
    },
}

/// Physical address of `vaddr` from its pagemap `entry`.
pub fn entry_to_physical(entry: u64, vaddr: u64) -> Result<u64, PagemapError> {
    if entry & PRESENT == 0 {
        return Err(PagemapError::NotPresent(vaddr));
    }
    let pfn = entry & PFN_MASK;
    if pfn == 0 {
        return Err(PagemapError::Hidden(vaddr));
    }
    // pfn < 2^55, so pfn * 4096 < 2^67: only frames no machine has overflow.
    pfn.checked_mul(PAGEMAP_PAGE_SIZE)
        .and_then(|base| base.checked_add(vaddr % PAGEMAP_PAGE_SIZE))
        .ok_or(PagemapError::FrameOutOfRange { pfn, vaddr })
}

/// The calling process's pagemap.
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Self, PagemapError> {
        File::open("/proc/self/pagemap")
            .map(|file| Pagemap { file })
            .map_err(|e| PagemapError::Read {
                vaddr: 0,
                message: e.to_string(),
            })
    }

    /// Physical address of the byte at `vaddr` in this process.
    pub fn physical(&self, vaddr: u64) -> Result<u64, PagemapError> {
        let mut entry = [0u8; 8];
        let at = (vaddr / PAGEMAP_PAGE_SIZE) * 8;
        self.file
            .read_exact_at(&mut entry, at)
            .map_err(|e| PagemapError::Read {
                vaddr,
                message: e.to_string(),
            })?;
        entry_to_physical(u64::from_le_bytes(entry), vaddr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_present_entries() {
        let entry = PRESENT | (1 << 62) | 0x12345; // soft-dirty etc. bits ignored
        assert_eq!(entry_to_physical(entry, 0x7f00_0000_0abc), Ok(0x1234_5abc));
        let big = PRESENT | (1 << 40);
        assert_eq!(entry_to_physical(big, 0x10), Ok((1 << 52) + 0x10));
        assert_eq!(
            entry_to_physical(PRESENT | PFN_MASK, 0),
            Err(PagemapError::FrameOutOfRange {
                pfn: PFN_MASK,
                vaddr: 0
            })
        );
    }

    #[test]
    fn rejects_absent_and_hidden_frames() {
        assert_eq!(
            entry_to_physical(0x12345, 0x1000),
            Err(PagemapError::NotPresent(0x1000))
        );
        assert_eq!(
            entry_to_physical(PRESENT, 0x2000),
            Err(PagemapError::Hidden(0x2000))
        );
        // Bits 55..62 are flags, not part of the frame number.
        assert_eq!(
            entry_to_physical(PRESENT | (0xff << 55), 0x3000),
            Err(PagemapError::Hidden(0x3000))
        );
    }

    #[test]
    fn translates_a_resident_page_of_this_process() {
        let v = vec![1u8; 8192];
        let pm = Pagemap::open().unwrap();
        match pm.physical(v.as_ptr() as u64) {
            // Root (as on the CI machines): a real frame with the same page offset.
            Ok(pa) => assert_eq!(
                pa % PAGEMAP_PAGE_SIZE,
                v.as_ptr() as u64 % PAGEMAP_PAGE_SIZE
            ),
            // Unprivileged: the kernel hides frames, which must be reported as such.
            Err(e) => assert_eq!(e, PagemapError::Hidden(v.as_ptr() as u64)),
        }
    }
}
