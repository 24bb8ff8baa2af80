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
//! above RAM (≥ 4 GiB)        PCI 64-bit MMIO window (large BARs), up to the guest's
//!                            physical address width (see [`pci_mmio64_window`])
//! ```
//!
//! Port I/O: ports 0x0d00-0xffff belong to PCI (the PCI0 `_CRS`); I/O BARs are placed in
//! 0xc000-0xffff. PCI INTx: slot `s`, pin `p` is IOAPIC GSI 16 + (s + p) mod 8
//! ([`pci_intx_gsi`]), as the DSDT's `_PRT` says.

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6060;
/// PVH memory map entries that fit between the start_info and the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = addr32(ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
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

/// `addr` as the 32-bit value a firmware table or boot structure stores for it. For
/// addresses (and distances between them) below 4 GiB: used in a `const`, anything
/// above fails the build.
pub const fn addr32(addr: u64) -> u32 {
    assert!(addr <= u32::MAX as u64, "address above 4 GiB");
    // Checked just above.
    #[allow(clippy::cast_possible_truncation)]
    let low = addr as u32;
    low
}

/// The smallest guest we can lay out: the boot structures, the kernel and some headroom.
pub const MIN_RAM: u64 = 16 << 20;

/// PCI 32-bit MMIO window: BARs of emulated devices and small passthrough BARs.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM (memory-mapped config space) for bus 0 only: 32 devices × 8 functions × 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;

/// Ports the PCI host bridge forwards to PCI (the second `WordIO` of PCI0's `_CRS`; the
/// legacy ports below stay with the platform). A guest may move I/O BARs anywhere here.
pub const PCI_IO_WINDOW_START: u16 = 0x0d00;
pub const PCI_IO_WINDOW_LAST: u16 = 0xffff;
/// Where aivmm places I/O BARs, like PC firmware does: the top 16 KiB of port space.
pub const PCI_IO_BAR_START: u16 = 0xc000;
pub const PCI_IO_BAR_SIZE: u64 = 0x4000;

/// IOAPIC pins for PCI INTx: GSIs 16-23, above the ISA IRQs. Linux treats GSI entries of a
/// `_PRT` as level-triggered, active-low, which is what PCI INTx is; no MADT override needed.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The IOAPIC GSI of INTx pin `pin` (0 = INTA# .. 3 = INTD#, the `_PRT` numbering) of the
/// function(s) in bus-0 slot `slot`: the usual rotation, so the functions of neighbouring
/// slots spread over the eight pins.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_INTX_GSI_COUNT
}

/// Where the 64-bit PCI window starts: the first 1 GiB boundary at or above both 4 GiB
/// and the end of guest RAM.
pub fn pci_mmio64_start(ram_end: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    ram_end.max(MMIO_HOLE_END).div_ceil(GIB) * GIB
}

/// Physical address width assumed when CPUID has no leaf 0x80000008 (Intel SDM).
pub const DEFAULT_PHYS_BITS: u8 = 36;
/// Highest address bit the 64-bit window may use: Linux guests with 4-level paging address
/// at most 46 bits of physical memory (`MAX_PHYSMEM_BITS`), and 64 TiB is plenty.
const MMIO64_MAX_BITS: u8 = 46;
/// Safety margin below the reported width: the window stays in the lower half of the
/// guest's physical address space. CPUID's width can include bits the platform steals
/// (AMD SME/SEV C-bit reduction, Intel MKTME/TDX key and shared bits), which sit at the
/// top; the lower half is addressable wherever one such bit is taken.
const MMIO64_MARGIN_BITS: u8 = 1;

/// The 64-bit PCI MMIO window: from [`pci_mmio64_start`] to the end of the guest's usable
/// physical address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio64Window {
    /// First address (1 GiB aligned, at or above 4 GiB and the end of RAM).
    pub start: u64,
    /// Size in bytes; 0 when RAM already reaches the end of the usable address space.
    pub size: u64,
    /// The guest's physical address width the window was sized for.
    pub phys_bits: u8,
}

impl Mmio64Window {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Places the 64-bit window for a guest whose RAM ends at `ram_end` and whose CPUID
/// reports `phys_bits` physical address bits (0x80000008 EAX[7:0]): it ends at
/// 2^(min(phys_bits, 46) - 1), the margin above.
pub fn pci_mmio64_window(ram_end: u64, phys_bits: u8) -> Mmio64Window {
    let start = pci_mmio64_start(ram_end);
    let bits = phys_bits.clamp(32, MMIO64_MAX_BITS) - MMIO64_MARGIN_BITS;
    Mmio64Window {
        start,
        size: (1u64 << bits).saturating_sub(start),
        phys_bits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn intx_gsis_rotate_over_the_eight_pci_pins() {
        assert_eq!(pci_intx_gsi(0, 0), 16);
        assert_eq!(pci_intx_gsi(1, 0), 17);
        assert_eq!(pci_intx_gsi(1, 3), 20);
        assert_eq!(pci_intx_gsi(7, 1), 16);
        assert_eq!(pci_intx_gsi(31, 3), 18);
        for slot in 0..32 {
            let gsis: Vec<u32> = (0..4).map(|pin| pci_intx_gsi(slot, pin)).collect();
            assert!(gsis.iter().all(|g| (16..24).contains(g)));
            let mut unique = gsis.clone();
            unique.dedup();
            assert_eq!(unique.len(), 4, "slot {slot}: one GSI per pin");
        }
    }

    #[test]
    fn mmio64_window_follows_the_physical_address_width() {
        // 40 bits (QEMU's TCG default, the nested rig): up to 512 GiB.
        let w = pci_mmio64_window(2 * GIB, 40);
        assert_eq!((w.start, w.end()), (4 * GIB, 512 * GIB));
        // 39 bits: a 128 GiB BAR still fits at 128 GiB, naturally aligned.
        let w = pci_mmio64_window(16 * GIB + 1, 39);
        assert_eq!((w.start, w.end()), (17 * GIB, 256 * GIB));
        assert!(w.start <= 128 * GIB && 256 * GIB <= w.end());
        // Wide CPUs are capped at the guest kernel's 46 bits.
        assert_eq!(pci_mmio64_window(GIB, 52).end(), 1 << 45);
        // 36 bits and RAM beyond the usable half: no window at all.
        let w = pci_mmio64_window(40 * GIB, 36);
        assert_eq!((w.start, w.size), (40 * GIB, 0));
        // Nonsense widths are clamped, never shifted out of range.
        assert_eq!(pci_mmio64_window(0, 0).end(), 4 * GIB);
        assert_eq!(pci_mmio64_window(0, 0).size, 0);
        assert_eq!(pci_mmio64_window(0, 255).end(), 1 << 45);
    }
}
