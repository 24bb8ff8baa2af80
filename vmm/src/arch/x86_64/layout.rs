//! Fixed guest-physical addresses of everything the VMM writes before the first instruction.
//!
//! ```text
//! 0x0000_0500  GDT                  0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)          0x0000_a000  PDPT
//! 0x0000_6000  PVH start_info       0x0000_b000  PD (identity map of the first 1 GiB)
//! 0x0000_6040  PVH module list      0x0002_0000  kernel command line
//! 0x0000_6060  PVH memory map
//! 0x0000_7000  zero page            0x0009_fc00  MP table (EBDA)
//! 0x0000_8ff0  boot stack top       0x0010_0000  kernel (HIMEM_START)
//! 0xc000_0000 - 0xdfff_ffff  PCI 32-bit MMIO window (BARs)
//! 0xe000_0000 - 0xe00f_ffff  PCI ECAM (bus 0)
//! 0xfec0_0000 / 0xfee0_0000  IOAPIC / LAPIC
//! above RAM (≥ 4 GiB)        PCI 64-bit MMIO window (large BARs)
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6060;
/// PVH memory map entries that fit between the start_info and the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the Extended BIOS Data Area: usable RAM ends here in the first MiB.
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) and identity-map page live just below the BIOS area at the top of
/// the hole, where no device is mapped.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The smallest guest we can lay out: the boot structures, the kernel and some headroom.
pub const MIN_RAM: u64 = 16 << 20;

/// PCI 32-bit MMIO window: BARs of emulated devices and small passthrough BARs.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM (memory-mapped config space) for bus 0 only: 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Size of the 64-bit window above RAM, for large (GPU) BARs.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Where the 64-bit PCI window starts: the first 1 GiB boundary at or above both 4 GiB
/// and the end of guest RAM.
pub fn pci_mmio64_start(ram_end: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    ram_end.max(MMIO_HOLE_END).div_ceil(GIB) * GIB
}
