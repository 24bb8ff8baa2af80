//! Loading the guest kernel, initramfs and command line, and describing RAM to the guest:
//! the Linux boot protocol's zero page (bzImage, or ELF without a PVH note) or a PVH
//! start_info (ELF vmlinux with the Xen PVH note).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    load_cmdline, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::image::MappedImage;
use super::layout::*;
use super::regs::EntryMode;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("kernel command line is {len} bytes but the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x} above the kernel end {kernel_end:#x}")]
    InitrdTooLarge {
        path: String,
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        path: String,
        source: vm_memory::GuestMemoryError,
    },
    #[error("initrd at {addr:#x} ({size} bytes) does not fit the zero page's 32-bit fields")]
    InitrdAbove4GiB { addr: u64, size: u64 },
    #[error("guest RAM has {0} ranges, more than the boot protocol's memory map holds")]
    TooManyRanges(usize),
    #[error("cannot write boot parameters into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
    #[error("guest RAM must start at address 0 and cover the first {min} bytes")]
    LowMemory { min: u64 },
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: u64,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `initrd_addr_max` default for kernels whose header does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// The zero page's 32-bit command line pointer.
const CMDLINE_ADDR32: u32 = addr32(CMDLINE_ADDR);

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a repr(C) struct of integers with no padding-dependent
// invariants; any byte pattern is a valid value.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: repr(C) integers only; any byte pattern is valid.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: repr(C) integers only; any byte pattern is valid.
unsafe impl ByteValued for ModlistEntry {}

/// Loads everything the guest needs to boot and returns where the boot vCPU starts.
/// `ram` lists the guest RAM ranges (start, len), sorted.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<BootEntry, BootError> {
    let low_end = match ram.first() {
        Some(&(0, len)) if len >= MIN_RAM => len,
        _ => return Err(BootError::LowMemory { min: MIN_RAM }),
    };
    let mut kernel = open("kernel", kernel_path, mem)?;
    let kerr = |source| BootError::Kernel {
        path: kernel_path.display().to_string(),
        source,
    };
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|source| BootError::Open {
            what: "kernel",
            path: kernel_path.display().to_string(),
            source,
        })?;
    let loaded: KernelLoaderResult = if is_elf {
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    } else {
        BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(kerr)?
    };

    let hdr = loaded.setup_header;
    let cmdline_max = match hdr {
        Some(h) if h.cmdline_size > 0 => (h.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1),
        _ => CMDLINE_MAX_SIZE - 1,
    };
    if cmdline.len() > cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(kerr)?;

    let initrd_max = hdr
        .filter(|h| h.initrd_addr_max != 0)
        .map_or(DEFAULT_INITRD_ADDR_MAX, |h| u64::from(h.initrd_addr_max));
    let initrd = match initrd_path {
        Some(p) => Some(load_initrd(
            mem,
            p,
            loaded.kernel_end,
            low_end.min(initrd_max + 1),
        )?),
        None => None,
    };

    match (is_elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_start_info(mem, ram, initrd, acpi_rsdp)?;
            Ok(BootEntry {
                mode: EntryMode::Pvh,
                entry: entry.0,
            })
        }
        _ => {
            write_zero_page(mem, ram, hdr, cmdline.len(), initrd, acpi_rsdp)?;
            let entry = if is_elf {
                loaded.kernel_load.0
            } else {
                loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
            };
            Ok(BootEntry {
                mode: EntryMode::Linux64,
                entry,
            })
        }
    }
}

/// Opens and maps a boot image to be loaded into `mem` (see [`MappedImage`]).
fn open<'g>(
    what: &'static str,
    path: &Path,
    mem: &'g GuestMemoryMmap,
) -> Result<MappedImage<'g>, BootError> {
    File::open(path)
        .and_then(|f| MappedImage::map(f, mem))
        .map_err(|source| BootError::Open {
            what,
            path: path.display().to_string(),
            source,
        })
}

/// Copies the initrd to the highest page-aligned address that ends below `limit`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = open("initrd", path, mem)?;
    let size = f.size();
    let too_large = || BootError::InitrdTooLarge {
        path: path.display().to_string(),
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.next_multiple_of(0x1000) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|source| BootError::InitrdCopy {
            path: path.display().to_string(),
            source,
        })?;
    Ok((addr, size))
}

/// The e820 map: RAM (the first range cut at the EBDA, resuming at 1 MiB) and the
/// reserved PCI ECAM window, sorted by address.
pub fn e820_entries(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut out = Vec::with_capacity(ram.len() + 2);
    for &(start, len) in ram {
        if start == 0 {
            out.push((0, EBDA_START, E820_RAM));
            out.push((EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED));
            if len > HIMEM_START {
                out.push((HIMEM_START, len - HIMEM_START, E820_RAM));
            }
        } else {
            out.push((start, len, E820_RAM));
        }
    }
    // Linux uses the MCFG's ECAM only if the firmware reserved it.
    out.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    out.sort_unstable();
    out
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        acpi_rsdp_addr: acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(h) = hdr {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR32;
    params.hdr.cmdline_size =
        u32::try_from(cmdline_len + 1).map_err(|_| BootError::CmdlineTooLong {
            len: cmdline_len,
            max: CMDLINE_MAX_SIZE - 1,
        })?;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        // load_initrd keeps it below the kernel's initrd_addr_max, a 32-bit value.
        let above = || BootError::InitrdAbove4GiB { addr, size };
        params.hdr.ramdisk_image = u32::try_from(addr).map_err(|_| above())?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| above())?;
    }
    let entries = e820_entries(ram);
    if entries.len() > params.e820_table.len() {
        return Err(BootError::TooManyRanges(entries.len()));
    }
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&entries) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries =
        u8::try_from(entries.len()).map_err(|_| BootError::TooManyRanges(entries.len()))?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(BootError::GuestMemory)
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let entries = e820_entries(ram);
    if entries.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyRanges(entries.len()));
    }
    for (i, &(addr, size, type_)) in entries.iter().enumerate() {
        let e = MemmapEntry(hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        });
        mem.write_obj(e, GuestAddress(PVH_MEMMAP_ADDR + i as u64 * 24))
            .map_err(BootError::GuestMemory)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(entries.len())
            .map_err(|_| BootError::TooManyRanges(entries.len()))?,
        rsdp_paddr: acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let m = ModlistEntry(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(BootError::GuestMemory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_ADDR))
        .map_err(BootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn guest(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).unwrap())]).unwrap()
    }

    #[test]
    fn e820_skips_the_legacy_hole_and_keeps_high_ram() {
        let e = e820_entries(&[(0, 3072 * MIB), (MMIO_HOLE_END, 1024 * MIB)]);
        assert_eq!(e[0], (0, EBDA_START, E820_RAM));
        assert_eq!(e[1].2, E820_RESERVED);
        assert_eq!(e[2], (HIMEM_START, 3072 * MIB - HIMEM_START, E820_RAM));
        assert_eq!(e[3], (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
        assert_eq!(e[4], (MMIO_HOLE_END, 1024 * MIB, E820_RAM));
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_e820() {
        let mem = guest(64 * MIB);
        write_zero_page(
            &mem,
            &[(0, 64 * MIB)],
            None,
            10,
            Some((0x300_0000, 0x1234)),
            Some(0xe0000),
        )
        .unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR32);
        assert_eq!({ p.hdr.cmdline_size }, 11);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 4, "RAM, EBDA, RAM, ECAM");
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let last = p.e820_table[2];
        assert_eq!(({ last.addr }, { last.size }), (HIMEM_START, 63 * MIB));
    }

    #[test]
    fn pvh_start_info_points_at_memmap_and_module() {
        let mem = guest(64 * MIB);
        write_start_info(&mem, &[(0, 64 * MIB)], Some((0x200_0000, 4096)), None).unwrap();
        let info: StartInfo = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.0.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.0.memmap_entries, 4);
        assert_eq!(info.0.nr_modules, 1);
        let m: ModlistEntry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((m.0.paddr, m.0.size), (0x200_0000, 4096));
        let e: MemmapEntry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 2 * 24))
            .unwrap();
        assert_eq!((e.0.addr, e.0.type_), (HIMEM_START, E820_RAM));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = guest(64 * MIB);
        let initrd = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(initrd.path(), vec![0xabu8; 5000]).unwrap();
        let (addr, size) = load_initrd(&mem, initrd.path(), 4 * MIB, 64 * MIB).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 * MIB && addr >= 64 * MIB - 8192);
        let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0xab);
        let err = load_initrd(&mem, initrd.path(), 64 * MIB - 4096, 64 * MIB).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
    }

    #[test]
    fn garbage_kernel_is_rejected_with_its_path() {
        let mem = guest(64 * MIB);
        let kernel = tempfile::Builder::new()
            .prefix("aivmm-badkernel")
            .tempfile()
            .unwrap();
        std::fs::write(kernel.path(), vec![0u8; 8192]).unwrap();
        let err = load_guest(
            &mem,
            &[(0, 64 * MIB)],
            kernel.path(),
            None,
            "console=ttyS0",
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("aivmm-badkernel"), "{err}");
    }

    #[test]
    fn tiny_guest_is_rejected() {
        let mem = guest(MIB);
        let err =
            load_guest(&mem, &[(0, MIB)], Path::new("/nonexistent"), None, "", None).unwrap_err();
        assert!(matches!(err, BootError::LowMemory { .. }));
    }
}
