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
//! The mapping is read through volatile slices: the file is the operator's, but nothing
//! stops another process from writing to it while it is mapped, and the bytes must not be
//! assumed stable. Truncating it while it loads raises SIGBUS, as it would for any mapped
//! file; the image is mapped only while the VM is set up.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

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
        // Only a large copy looks for its guest region.
        let split = if n >= SPLIT_COPY_MIN {
            self.guest_region(&dst)
        } else {
            None
        };
        match split {
            Some((guest, at)) => copy_on_two_threads(&self.region, self.offset(), &dst, guest, at)?,
            None => src.copy_to_volatile_slice(dst),
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Copies the bytes of `image` from `src_start` to `dst` (at offset `at` of the guest
/// region `guest`), as many as `dst` holds: this thread the front half, a helper the back
/// half. A slice cannot cross threads, so the helper takes its own from `image` and
/// `guest`.
fn copy_on_two_threads<B: BitmapSlice>(
    image: &MmapRegion<()>,
    src_start: usize,
    dst: &VolatileSlice<'_, B>,
    guest: &GuestRegionMmap,
    at: usize,
) -> Result<(), VolatileMemoryError> {
    let n = dst.len();
    // The halves meet on a page boundary of the destination, so no page is faulted in by
    // both threads.
    let dst_start = dst.ptr_guard().as_ptr() as usize;
    let half = (dst_start + n / 2).next_multiple_of(PAGE_SIZE) - dst_start;
    let back_at = at + half;
    let copy_back = move || -> Result<(), VolatileMemoryError> {
        let from = image.get_slice(src_start + half, n - half)?;
        let to = guest
            .get_slice(MemoryRegionAddress(back_at as u64), n - half)
            .map_err(|_| VolatileMemoryError::OutOfBounds { addr: back_at })?;
        from.copy_to_volatile_slice(to);
        Ok(())
    };
    std::thread::scope(|s| {
        let helper = devices::thread::named("image-load").spawn_scoped(s, copy_back);
        image
            .get_slice(src_start, half)?
            .copy_to_volatile_slice(dst.subslice(0, half)?);
        match helper {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            // No second thread: this one copies the back half too.
            Err(_) => {
                image
                    .get_slice(src_start + half, n - half)?
                    .copy_to_volatile_slice(dst.subslice(half, n - half)?);
                Ok(())
            }
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
    fn file(name: &str, bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!("aivmm-image-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn image<'g>(name: &str, bytes: &[u8], guest: &'g GuestMemoryMmap) -> MappedImage<'g> {
        MappedImage::map(file(name, bytes), guest).unwrap()
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
        let mut img = image("digits", b"0123456789", &guest);
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
        let mut img = image("pattern", &bytes, &mem);
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
        let mut img = image("large", &bytes, &mem);
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
        let mut img = image("two-regions", &bytes, &mem);
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
        let mut img = image("outside", &bytes, &guest);
        let mut buf = vec![0u8; len];
        let n = img
            .read_volatile(&mut VolatileSlice::from(&mut buf[..]))
            .unwrap();
        assert_eq!(n, len);
        assert!(buf == bytes, "the copy differs from the image");
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
        let e = MappedImage::map(file("empty", b""), &no_guest())
            .err()
            .unwrap();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
