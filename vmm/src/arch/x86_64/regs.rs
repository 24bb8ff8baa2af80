//! Initial register state of each vCPU: 64-bit long mode with identity-mapped page tables
//! (Linux boot protocol) or 32-bit protected mode (PVH), plus FPU, MSRs and LAPIC LINTs.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot page tables or GDT into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
    #[error("cannot {what} of vCPU {cpu}: {source}")]
    Ioctl {
        what: &'static str,
        cpu: u8,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {total} MSRs on vCPU {cpu}")]
    Msrs { set: usize, total: usize, cpu: u8 },
}

/// Which entry protocol the boot CPU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit entry of the Linux boot protocol: RSI points at the zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX points at the start_info.
    Pvh,
    /// 16-bit real mode with CS = 0 at `entry`: raw images (device tests, firmware-less
    /// probes).
    Real16,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries: null, 64-bit code, data, 32-bit code (PVH), TSS.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn gdt_table() -> [u64; 5] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code (PVH entry)
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    // The 20-bit limit: bits 0-15 and 48-51 of the descriptor.
    #[allow(clippy::cast_possible_truncation)]
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and (for long mode) identity page tables for the first GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let gdt = gdt_table();
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(RegsError::GuestMemory)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i (present, writable, huge).
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
        .map_err(RegsError::GuestMemory)?;
    mem.write_obj(PD_ADDR | 0x03, GuestAddress(PDPT_ADDR))
        .map_err(RegsError::GuestMemory)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    Ok(())
}

/// Segment and control registers for the entry mode. The tables must already be written.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    if mode == EntryMode::Real16 {
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        return sregs;
    }
    let gdt = gdt_table();
    let code = match mode {
        EntryMode::Linux64 => segment(gdt[1], 1),
        EntryMode::Pvh | EntryMode::Real16 => segment(gdt[3], 3),
    };
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[4], 4);
    sregs.gdt.base = GDT_ADDR;
    // Five 8-byte descriptors: the limit is 39.
    #[allow(clippy::cast_possible_truncation)]
    let gdt_limit = (gdt.len() * 8 - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh | EntryMode::Real16 => {
            sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_ADDR,
        EntryMode::Real16 => {}
    }
    regs
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// APIC local vector table registers and their delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets up MSRs, FPU and LAPIC LINTs on vCPU `cpu`; the boot CPU (0) also gets the segment
/// and general registers for `mode` at `entry`. Application processors keep their reset
/// state and wait for INIT/SIPI in the in-kernel LAPIC.
pub fn setup_vcpu(vcpu: &VcpuFd, cpu: u8, mode: EntryMode, entry: u64) -> Result<(), RegsError> {
    let ioctl = |what| move |source| RegsError::Ioctl { what, cpu, source };
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        total: entries.len(),
        cpu,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("set MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            total: entries.len(),
            cpu,
        });
    }
    vcpu.set_fpu(&boot_fpu())
        .map_err(ioctl("set the FPU state"))?;

    // LINT0 = ExtINT (the PIC), LINT1 = NMI, as the MP table says.
    let mut lapic = vcpu.get_lapic().map_err(ioctl("read the LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("write the LAPIC"))?;

    if cpu == 0 {
        let sregs = vcpu.get_sregs().map_err(ioctl("read segment registers"))?;
        vcpu.set_sregs(&boot_sregs(sregs, mode))
            .map_err(ioctl("set segment registers"))?;
        vcpu.set_regs(&boot_regs(mode, entry))
            .map_err(ioctl("set registers"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_code_segment_is_64_bit() {
        let cs = segment(gdt_table()[1], 1);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn pvh_code_segment_is_32_bit_flat() {
        let cs = segment(gdt_table()[3], 3);
        assert_eq!(cs.l, 0);
        assert_eq!(cs.db, 1);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn long_mode_sregs_enable_paging() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Linux64);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        let p = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!(p.cr0 & X86_CR0_PG, 0);
        assert_eq!(p.efer, 0);
    }

    #[test]
    fn identity_map_covers_first_gib() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        write_boot_tables(&mem).unwrap();
        let pde511: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(pde511, (511 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
    }

    #[test]
    fn regs_point_at_boot_structures() {
        let r = boot_regs(EntryMode::Linux64, 0x100200);
        assert_eq!(
            (r.rip, r.rsi, r.rsp),
            (0x100200, ZERO_PAGE_ADDR, BOOT_STACK_TOP)
        );
        let p = boot_regs(EntryMode::Pvh, 0x1000000);
        assert_eq!(p.rbx, PVH_INFO_ADDR);
    }
}
