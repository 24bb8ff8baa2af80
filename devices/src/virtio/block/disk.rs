//! The raw image file behind a virtio-blk device and the I/O on it.
//!
//! Reads and writes go straight between the file and guest memory with
//! `preadv`/`pwritev` on the buffers [`super::request::parse_request`] checked; no
//! bounce buffer. Discard and write-zeroes use `fallocate` and fall back to writing
//! zeros when the file system refuses.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use super::request::{Buffer, DiskLimits, SECTOR_SIZE};
use super::BlockError;

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Chunk of zeros the write-zeroes fallback writes at a time.
const ZERO_CHUNK: usize = 64 * 1024;

/// An open disk image.
#[derive(Debug)]
pub(super) struct DiskImage {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity_sectors: u64,
}

impl DiskImage {
    /// Opens `path` read-write, or read-only when `read_only`. An image without write
    /// permission refuses read-write use even where the open would succeed (as root), so
    /// an image marked read-only is never written.
    pub(super) fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let read_only_file = || BlockError::ReadOnlyFile {
            path: path.to_path_buf(),
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if !read_only && meta.permissions().readonly() {
            return Err(read_only_file());
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EPERM | libc::EROFS) if !read_only => read_only_file(),
                _ => open_err(e),
            })?;
        // Seeking works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            read_only,
            capacity_sectors: size / SECTOR_SIZE,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub(super) fn limits(&self) -> DiskLimits {
        DiskLimits {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
        }
    }

    /// Reads the disk at `offset` into the guest buffers `data`.
    pub(super) fn read(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[Buffer],
    ) -> io::Result<()> {
        let slices = guest_slices(mem, data, Permissions::Write)?;
        self.transfer(offset, &slices, Direction::ToGuest)?;
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        Ok(())
    }

    /// Writes the guest buffers `data` to the disk at `offset`.
    pub(super) fn write(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[Buffer],
    ) -> io::Result<()> {
        let slices = guest_slices(mem, data, Permissions::Read)?;
        self.transfer(offset, &slices, Direction::FromGuest)
    }

    /// Makes completed writes durable.
    pub(super) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; where the file system cannot, zeroes them.
    pub(super) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(punch, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zeros(offset, len)
    }

    /// Zeroes `len` bytes at `offset`, deallocating them if `unmap` and possible.
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if unmap && self.fallocate(punch, offset, len).is_ok() {
            return Ok(());
        }
        if self.fallocate(zero, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zeros(offset, len)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let offset = to_off_t(offset)?;
        let len = to_off_t(len)?;
        // SAFETY: fallocate takes no pointers; the fd is open for the call's duration.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK];
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        while offset < end {
            let n = usize::try_from(end - offset).map_or(ZERO_CHUNK, |n| n.min(ZERO_CHUNK));
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Moves the bytes of `slices` to or from the file at `offset`, resuming after short
    /// transfers.
    fn transfer(
        &self,
        mut offset: u64,
        slices: &[GuestSlice<'_>],
        direction: Direction,
    ) -> io::Result<()> {
        let mut iovecs: Vec<libc::iovec> = slices
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let mut first = 0;
        while first < iovecs.len() {
            if iovecs[first].iov_len == 0 {
                first += 1;
                continue;
            }
            let batch = &iovecs[first..(first + IOV_MAX).min(iovecs.len())];
            // `batch.len() <= IOV_MAX`.
            let count = libc::c_int::try_from(batch.len()).unwrap_or(libc::c_int::MAX);
            let pos = to_off_t(offset)?;
            let ret = match direction {
                // SAFETY: each iovec covers a slice of guest memory that `slices` keeps
                // mapped for this call; the kernel writes only within those ranges.
                Direction::ToGuest => unsafe {
                    libc::preadv(self.file.as_raw_fd(), batch.as_ptr(), count, pos)
                },
                // SAFETY: as above; the kernel only reads the ranges.
                Direction::FromGuest => unsafe {
                    libc::pwritev(self.file.as_raw_fd(), batch.as_ptr(), count, pos)
                },
            };
            let mut done = match usize::try_from(ret) {
                Ok(0) => {
                    // The file shrank under us (reads) or cannot grow (writes).
                    return Err(io::Error::from(match direction {
                        Direction::ToGuest => io::ErrorKind::UnexpectedEof,
                        Direction::FromGuest => io::ErrorKind::WriteZero,
                    }));
                }
                Ok(n) => n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            offset += done as u64;
            while done > 0 && first < iovecs.len() {
                let iov = &mut iovecs[first];
                if done >= iov.iov_len {
                    done -= iov.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `done < iov_len`, so the new base stays inside the same slice.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                    iov.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }

    /// Writes `id` into the guest buffers `data` (which hold exactly `id.len()` bytes).
    pub(super) fn write_id(mem: &GuestMemoryMmap, data: &[Buffer], id: &[u8]) -> io::Result<()> {
        let mut done = 0;
        for b in data {
            let n = (b.len as usize).min(id.len() - done);
            vm_memory::Bytes::write_slice(mem, &id[done..done + n], b.addr)
                .map_err(|e| io::Error::other(e.to_string()))?;
            done += n;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    FromGuest,
}

type GuestSlice<'a> = VolatileSlice<'a, BS<'a, <GuestMemoryMmap as GuestMemory>::Bitmap>>;

/// The host mappings of `data`, split where guest memory regions end.
fn guest_slices<'a>(
    mem: &'a GuestMemoryMmap,
    data: &[Buffer],
    access: Permissions,
) -> io::Result<Vec<GuestSlice<'a>>> {
    let mut slices = Vec::with_capacity(data.len());
    for b in data {
        let iter = GuestMemory::get_slices(mem, b.addr, b.len as usize, access)
            .map_err(|e| io::Error::other(e.to_string()))?;
        for slice in iter {
            slices.push(slice.map_err(|e| io::Error::other(e.to_string()))?);
        }
    }
    Ok(slices)
}

fn to_off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}
