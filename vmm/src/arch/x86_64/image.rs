//! A boot image (kernel or initrd) read through a private read-only mapping of its file.
//!
//! The loaders copy each segment from the mapping into guest memory with one `memcpy`,
//! instead of `read(2)`, which copies through the page cache a page at a time. Both are
//! cheap on bare metal. In a nested guest the host kernel's copy loop runs emulated, and
//! loading a 50 MB vmlinux is most of the VMM's own start (docs/PERFORMANCE.md).
//!
//! A large copy runs on two threads, each copying one half: most of a copy into fresh guest
//! memory is the host kernel clearing the pages it allocates at the first write, and both
//! that and the copy itself split across CPUs.
//!
//! A page of the image that is all zero is not copied where its destination is still a hole
//! of the guest memory's file (a memfd zone never written there), since a hole reads as zero.
//! A vmlinux can hold many: its `.bss` and `.brk` are stored as zeros when a section follows
//! them (`.init.scratch` in the kernel the rig boots, whose 44 MB of segments hold 15 MB of
//! zero pages). Leaving them out spares the copy, and the host pages until the guest writes
//! them. Anything else, anonymous memory or a page written before, is copied whole.
//!
//! The mapping is read through volatile slices: the file is the operator's, but nothing
//! stops another process from writing to it while it is mapped, and the bytes must not be
//! assumed stable. Truncating it while it loads raises SIGBUS, as it would for any mapped
//! file; the image is mapped only while the VM is set up.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, ReadVolatile, VolatileMemory, VolatileMemoryError, VolatileSlice,
};

/// Copies at least this large run on two threads.
const SPLIT_COPY_MIN: usize = 8 << 20;
const PAGE_SIZE: usize = 4096;

/// An image file mapped read-only, with a cursor: `Read`, `Seek` and `ReadVolatile` as a
/// file would offer them. `guest` is the memory it is loaded into: a copy's second thread
/// takes its half of the destination from there, since a slice cannot cross threads.
pub struct MappedImage<'g> {
    region: MmapRegion<()>,
    pos: u64,
    guest: &'g GuestMemoryMmap,
}

impl<'g> MappedImage<'g> {
    /// Maps all of `file`, which must be a regular file and not empty, to be loaded into
    /// `guest`.
    pub fn map(file: File, guest: &'g GuestMemoryMmap) -> io::Result<Self> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let len = meta.len();
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file is empty",
            ));
        }
        let size = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the file is too large"))?;
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            size,
            libc::PROT_READ,
            // Populated at once: one call maps the cached pages, where faulting them in
            // one by one would cost an exit each in a nested guest.
            libc::MAP_PRIVATE | libc::MAP_POPULATE,
        )
        .map_err(|e| io::Error::other(format!("cannot map it: {e}")))?;
        Ok(Self {
            region,
            pos: 0,
            guest,
        })
    }

    /// The file's size in bytes (never zero: [`MappedImage::map`] refuses an empty file).
    pub fn size(&self) -> u64 {
        self.region.len() as u64
    }

    /// The cursor as an offset into the mapping: at most its length, since the cursor may
    /// lie past the end (seeking there is allowed, as for a file).
    fn offset(&self) -> usize {
        usize::try_from(self.pos.min(self.size())).unwrap_or(usize::MAX)
    }

    /// The mapped bytes from the cursor on, at most `max` of them.
    fn ahead(&self, max: usize) -> Result<VolatileSlice<'_>, VolatileMemoryError> {
        let start = self.offset();
        let count = (self.region.len() - start).min(max);
        self.region.get_slice(start, count)
    }

    /// The guest region `dst` lies in, and `dst`'s offset in it: `None` when `dst` is not
    /// guest memory (a caller's own buffer).
    fn guest_region<B: BitmapSlice>(
        &self,
        dst: &VolatileSlice<B>,
    ) -> Option<(&'g GuestRegionMmap, usize)> {
        let addr = dst.ptr_guard().as_ptr() as usize;
        self.guest.iter().find_map(|r| {
            let base = r.as_ptr() as usize;
            let off = addr.checked_sub(base)?;
            let end = off.checked_add(dst.len())?;
            (end <= usize::try_from(r.len()).ok()?).then_some((r, off))
        })
    }
}

impl Read for MappedImage<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .ahead(buf.len())
            .map_err(io::Error::other)?
            .copy_to(buf);
        self.pos += n as u64;
        Ok(n)
    }
}

impl ReadVolatile for MappedImage<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let src = self.ahead(buf.len())?;
        let n = src.len();
        let dst = buf.subslice(0, n)?;
        // A copy of less than a page (a header into a buffer) has nothing to leave out.
        let target = if n >= PAGE_SIZE {
            self.guest_region(&dst)
        } else {
            None
        };
        let holes = target.map_or_else(Vec::new, |(guest, at)| region_holes(guest, at, n));
        match target {
            Some((guest, at)) if n >= SPLIT_COPY_MIN => {
                copy_on_two_threads(&self.region, self.offset(), &dst, guest, at, &holes)?
            }
            _ => copy_sparse(&src, &dst, &holes, 0)?,
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The holes of guest region `guest`'s file in the `len` bytes from offset `at` of the
/// region, as offsets from `at`: none for anonymous memory.
fn region_holes(guest: &GuestRegionMmap, at: usize, len: usize) -> Vec<Range<usize>> {
    match guest.file_offset() {
        Some(fo) => file_holes(fo.file(), fo.start() + at as u64, len as u64),
        None => Vec::new(),
    }
}

/// The ranges of `file` from `start` to `start + len` that are holes (never written, so
/// they read as zero), as offsets from `start`, in order. A file system that cannot tell
/// (no SEEK_DATA) reports none, which only costs the copy it would have spared.
fn file_holes(file: &File, start: u64, len: u64) -> Vec<Range<usize>> {
    let end = start.saturating_add(len);
    let seek = |pos: u64, whence: libc::c_int| -> io::Result<u64> {
        let pos = libc::off_t::try_from(pos).map_err(io::Error::other)?;
        // SAFETY: lseek on an fd `file` keeps open; it reads no memory of ours. It moves the
        // file position, which nothing uses: guest memory is mapped, never read through it.
        let at = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        u64::try_from(at).map_err(|_| io::Error::last_os_error())
    };
    let rel = |pos: u64| usize::try_from(pos - start).unwrap_or(usize::MAX);
    let mut holes = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(data) => data.min(end),
            // No data from `pos` on.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(_) => break,
        };
        if data > pos {
            holes.push(rel(pos)..rel(data));
        }
        if data >= end {
            break;
        }
        match seek(data, libc::SEEK_HOLE) {
            Ok(hole) if hole > data => pos = hole,
            _ => break,
        }
    }
    holes
}

/// Copies `src` to `dst`, which lies `base` bytes into a copy whose destination has the
/// holes `holes` (offsets from the copy's start, in order), leaving out every whole page of
/// `dst` that lies in a hole and whose source bytes are all zero.
fn copy_sparse<B: BitmapSlice>(
    src: &VolatileSlice<'_>,
    dst: &VolatileSlice<'_, B>,
    holes: &[Range<usize>],
    base: usize,
) -> Result<(), VolatileMemoryError> {
    let n = dst.len();
    let addr = dst.ptr_guard().as_ptr() as usize;
    let mut copy_from = 0;
    let mut page = addr.next_multiple_of(PAGE_SIZE) - addr;
    let mut holes = holes.iter().peekable();
    while holes.peek().is_some() && page + PAGE_SIZE <= n {
        let at = base + page;
        while holes.next_if(|h| h.end <= at).is_some() {}
        let in_hole = holes
            .peek()
            .is_some_and(|h| h.start <= at && at + PAGE_SIZE <= h.end);
        if in_hole && is_zero(&src.get_slice(page, PAGE_SIZE)?) {
            if page > copy_from {
                src.get_slice(copy_from, page - copy_from)?
                    .copy_to_volatile_slice(dst.subslice(copy_from, page - copy_from)?);
            }
            copy_from = page + PAGE_SIZE;
        }
        page += PAGE_SIZE;
    }
    if n > copy_from {
        src.get_slice(copy_from, n - copy_from)?
            .copy_to_volatile_slice(dst.subslice(copy_from, n - copy_from)?);
    }
    Ok(())
}

/// Whether every byte of `page` is zero. Reads it in 512-byte steps, so a page that is not
/// is usually told by its first.
fn is_zero(page: &VolatileSlice<'_>) -> bool {
    let mut words = [0u64; 64];
    let mut off = 0;
    while off < page.len() {
        let Ok(step) = page.get_slice(off, (page.len() - off).min(512)) else {
            return false;
        };
        let n = step.copy_to(&mut words);
        if n * 8 != step.len() || words[..n].iter().any(|&w| w != 0) {
            return false;
        }
        off += step.len();
    }
    true
}

/// Copies the bytes of `image` from `src_start` to `dst` (at offset `at` of the guest
/// region `guest`, whose holes there are `holes`), as many as `dst` holds: this thread the
/// front half, a helper the back half. A slice cannot cross threads, so the helper takes
/// its own from `image` and `guest`.
fn copy_on_two_threads<B: BitmapSlice>(
    image: &MmapRegion<()>,
    src_start: usize,
    dst: &VolatileSlice<'_, B>,
    guest: &GuestRegionMmap,
    at: usize,
    holes: &[Range<usize>],
) -> Result<(), VolatileMemoryError> {
    let n = dst.len();
    // The halves meet on a page boundary of the destination, so no page is faulted in by
    // both threads.
    let dst_start = dst.ptr_guard().as_ptr() as usize;
    let half = (dst_start + n / 2).next_multiple_of(PAGE_SIZE) - dst_start;
    let back_at = at + half;
    // Only references and numbers: the closure is Copy, so the thread gets one and this
    // thread keeps one for when no thread can be made.
    let copy_back = || -> Result<(), VolatileMemoryError> {
        let from = image.get_slice(src_start + half, n - half)?;
        let to = guest
            .get_slice(MemoryRegionAddress(back_at as u64), n - half)
            .map_err(|_| VolatileMemoryError::OutOfBounds { addr: back_at })?;
        copy_sparse(&from, &to, holes, half)
    };
    std::thread::scope(|s| {
        let helper = devices::thread::named("image-load").spawn_scoped(s, copy_back);
        copy_sparse(
            &image.get_slice(src_start, half)?,
            &dst.subslice(0, half)?,
            holes,
            0,
        )?;
        match helper {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            // No second thread: this one copies the back half too.
            Err(_) => copy_back(),
        }
    })
}

impl Seek for MappedImage<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let (base, delta) = match to {
            SeekFrom::Start(p) => (0, i128::from(p)),
            SeekFrom::Current(d) => (self.pos, i128::from(d)),
            SeekFrom::End(d) => (self.size(), i128::from(d)),
        };
        let target = i128::from(base) + delta;
        self.pos = u64::try_from(target)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// A file holding `bytes`, already unlinked.
    fn file(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    fn image<'g>(bytes: &[u8], guest: &'g GuestMemoryMmap) -> MappedImage<'g> {
        MappedImage::map(file(bytes), guest).unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 253).to_le_bytes()[0]).collect()
    }

    fn no_guest() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap()
    }

    #[test]
    fn reads_and_seeks_as_a_file_would() {
        let guest = no_guest();
        let mut img = image(b"0123456789", &guest);
        let mut four = [0u8; 4];
        img.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"0123");
        assert_eq!(img.seek(SeekFrom::Current(2)).unwrap(), 6);
        img.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"6789");
        assert_eq!(img.read(&mut four).unwrap(), 0, "end of image");
        assert_eq!(img.seek(SeekFrom::End(-3)).unwrap(), 7);
        assert_eq!(img.seek(SeekFrom::Start(100)).unwrap(), 100);
        assert_eq!(img.read(&mut four).unwrap(), 0, "past the end");
        assert!(img.seek(SeekFrom::Current(-101)).is_err());
        assert!(img.read_exact(&mut four).is_err());
    }

    #[test]
    fn copies_into_guest_memory_and_stops_at_the_end() {
        let bytes = pattern(9000);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut img = image(&bytes, &mem);
        img.seek(SeekFrom::Start(100)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x1000), &mut img, 8900)
            .unwrap();
        let mut back = vec![0u8; 8900];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, bytes[100..]);
        // Asking for more than is left is an error, not a short copy into the guest.
        img.seek(SeekFrom::Start(8990)).unwrap();
        assert!(mem
            .read_exact_volatile_from(GuestAddress(0), &mut img, 20)
            .is_err());
    }

    #[test]
    fn a_large_copy_lands_whole() {
        // Large enough for two threads, odd-sized so that the halves are uneven.
        let len = super::SPLIT_COPY_MIN + 12_345;
        let bytes = pattern(len);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut img = image(&bytes, &mem);
        mem.read_exact_volatile_from(GuestAddress(0x1234), &mut img, len)
            .unwrap();
        let mut back = vec![0u8; len];
        mem.read_slice(&mut back, GuestAddress(0x1234)).unwrap();
        assert!(back == bytes, "the copy differs from the image");
    }

    #[test]
    fn a_large_copy_across_two_guest_regions_lands_whole() {
        // 12 MiB land in the first region and 8 MiB + 0x1234 in the second: both parts
        // are split between the threads, each within its own region.
        let mib = 1 << 20;
        let len = 20 * mib + 0x1234;
        let bytes = pattern(len);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 16 * mib),
            (GuestAddress(16 * mib as u64), 16 * mib),
        ])
        .unwrap();
        let mut img = image(&bytes, &mem);
        let at = GuestAddress(4 * mib as u64);
        mem.read_exact_volatile_from(at, &mut img, len).unwrap();
        let mut back = vec![0u8; len];
        mem.read_slice(&mut back, at).unwrap();
        assert!(back == bytes, "the copy differs from the image");
    }

    #[test]
    fn a_large_copy_into_a_buffer_outside_the_guest_lands_whole() {
        // Not guest memory: no second thread can take a slice of it, one thread copies.
        let len = super::SPLIT_COPY_MIN + 1;
        let bytes = pattern(len);
        let guest = no_guest();
        let mut img = image(&bytes, &guest);
        let mut buf = vec![0u8; len];
        let n = img
            .read_volatile(&mut VolatileSlice::from(&mut buf[..]))
            .unwrap();
        assert_eq!(n, len);
        assert!(buf == bytes, "the copy differs from the image");
    }

    /// Guest memory of `mib` MiB at address 0 from a memfd zone, mapped as aivmm maps one
    /// (without THP advice, so that a test sees 4 KiB pages where the host allows), and the
    /// zone's file.
    fn memfd_guest(mib: u64) -> (GuestMemoryMmap, std::sync::Arc<File>) {
        let config = crate::config::MemoryZoneConfig {
            id: "image-test".into(),
            size_mib: mib,
            backing: crate::config::Backing::Memfd,
            host_node: None,
            prefault: false,
            lock: false,
            transparent_hugepages: false,
        };
        let zone = crate::memory::zone::ZoneBacking::create(&config).unwrap();
        let region = zone
            .map(0, usize::try_from(mib << 20).unwrap(), None)
            .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        (mem, zone.file.clone().unwrap())
    }

    /// Bytes of `file` that hold pages (the rest are holes).
    fn allocated(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    /// `data` bytes of pattern, `zeros` of zero, then `data` of pattern again and a short
    /// run of zeros that ends the image inside a page.
    fn with_zeros(data: usize, zeros: usize) -> Vec<u8> {
        let mut bytes = pattern(data);
        bytes.resize(data + zeros, 0);
        bytes.extend(pattern(data));
        bytes.resize(bytes.len() + 3000, 0);
        bytes
    }

    #[test]
    fn zero_pages_of_the_image_leave_a_memfd_zones_holes_unwritten() {
        let mib = 1 << 20;
        // One thread (under SPLIT_COPY_MIN), then two, whose halves both meet zeros.
        for (data, zeros) in [(mib, 4 * mib), (mib, 8 * mib)] {
            let bytes = with_zeros(data, zeros);
            let (mem, file) = memfd_guest(16);
            let mut img = image(&bytes, &mem);
            mem.read_exact_volatile_from(GuestAddress(0), &mut img, bytes.len())
                .unwrap();
            // Before reading it back, which allocates every page it reads in a memfd: 2 MiB
            // of data on 4 KiB pages, or on at most two 2 MiB ones each side where the host
            // backs memfds with huge pages, and never the whole image.
            let used = allocated(&file);
            assert!(
                used >= 2 * mib as u64 && used <= 4 * mib as u64 + 0x2000,
                "{used} bytes allocated for a {} byte image with {zeros} zero bytes",
                bytes.len()
            );
            let mut back = vec![0xeeu8; bytes.len()];
            mem.read_slice(&mut back, GuestAddress(0)).unwrap();
            assert!(back == bytes, "the copy differs from the image");
        }
    }

    #[test]
    fn a_zero_page_lands_where_guest_memory_was_written_before() {
        let (mem, _file) = memfd_guest(2);
        mem.write_slice(&[0xaa; 0x3000], GuestAddress(0x10000))
            .unwrap();
        let zeros = vec![0u8; 0x20000];
        let mut img = image(&zeros, &mem);
        mem.read_exact_volatile_from(GuestAddress(0), &mut img, zeros.len())
            .unwrap();
        let mut back = vec![0xeeu8; zeros.len()];
        mem.read_slice(&mut back, GuestAddress(0)).unwrap();
        assert!(back == zeros, "bytes written before the copy survived it");
    }

    #[test]
    fn a_directory_is_refused() {
        let e = MappedImage::map(File::open(std::env::temp_dir()).unwrap(), &no_guest())
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn an_empty_file_is_refused() {
        let e = MappedImage::map(file(b""), &no_guest()).err().unwrap();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
