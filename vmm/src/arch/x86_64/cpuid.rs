//! Guest CPUID: KVM's supported set, with the topology and identity leaves filled in for
//! each vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::layout::DEFAULT_PHYS_BITS;

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX
const TSC_DEADLINE_BIT: u32 = 1 << 24; // leaf 1 ECX

/// Offers the guest the local APIC's TSC-deadline timer mode, which KVM emulates whenever
/// it has `KVM_CAP_TSC_DEADLINE_TIMER` but leaves out of `KVM_GET_SUPPORTED_CPUID`. Without
/// it a Linux guest programs the APIC timer in one-shot mode, and first calibrates that
/// timer against the PIT, waiting a tenth of a second of its boot.
pub fn offer_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == 0x1 {
            e.ecx |= TSC_DEADLINE_BIT;
        }
    }
}

/// Rewrites `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu` of `vcpus`.
pub fn patch_cpuid(cpuid: &mut CpuId, cpu: u8, vcpus: u8) {
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, cpu, vcpus);
    }
}

/// The physical address width the guest is told about: CPUID 0x80000008 EAX[7:0] (KVM
/// reports the host's, or less), or the architectural default when the leaf is absent.
pub fn guest_phys_bits(cpuid: &CpuId) -> u8 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008 && e.index == 0)
        .map(|e| e.eax.to_le_bytes()[0])
        .filter(|&bits| bits != 0)
        .unwrap_or(DEFAULT_PHYS_BITS)
}

fn patch_entry(e: &mut kvm_cpuid_entry2, cpu: u8, vcpus: u8) {
    match e.function {
        0x1 => {
            // Initial APIC id, logical processor count, "running under a hypervisor".
            e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpu) << 24) | (u32::from(vcpus) << 16);
            e.ecx |= HYPERVISOR_BIT;
            if vcpus > 1 {
                e.edx |= HTT_BIT;
            } else {
                e.edx &= !HTT_BIT;
            }
        }
        0x4 => {
            // Cores per package - 1 in EAX[31:26]; one core per vCPU, no SMT.
            e.eax = (e.eax & 0x03ff_ffff) | (u32::from(vcpus.saturating_sub(1)) << 26);
        }
        0xa => {
            // No virtual PMU: the guest must not program counters we do not virtualise.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: x2APIC id in EDX; level 0 = SMT (1 thread),
            // level 1 = core (all vCPUs); higher levels invalid.
            e.edx = u32::from(cpu);
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = 32 - u32::from(vcpus.max(1) - 1).leading_zeros();
                    e.ebx = u32::from(vcpus);
                    e.ecx = (2 << 8) | 1;
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0xffff);
        assert_ne!(e.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(e.edx & HTT_BIT, 0);
    }

    #[test]
    fn tsc_deadline_is_offered_in_leaf_1_only() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(7, 0)]).unwrap();
        for e in cpuid.as_mut_slice() {
            e.ecx = 0;
        }
        offer_tsc_deadline(&mut cpuid);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, TSC_DEADLINE_BIT);
        assert_eq!(e[1].ecx, 0);
    }

    #[test]
    fn topology_leaf_reports_all_vcpus_as_cores() {
        let mut l0 = entry(0xb, 0);
        let mut l1 = entry(0xb, 1);
        patch_entry(&mut l0, 1, 2);
        patch_entry(&mut l1, 1, 2);
        assert_eq!((l0.ebx, l0.edx), (1, 1));
        assert_eq!((l1.eax, l1.ebx, l1.edx), (1, 2, 1));
        let mut l1_big = entry(0xb, 1);
        patch_entry(&mut l1_big, 0, 5);
        assert_eq!(l1_big.eax, 3); // 5 ids need 3 bits
    }

    #[test]
    fn physical_address_width_comes_from_leaf_0x80000008() {
        let mut leaf = entry(0x8000_0008, 0);
        leaf.eax = 0x0000_3028; // 48 linear, 40 physical bits
        let cpuid = CpuId::from_entries(&[entry(1, 0), leaf]).unwrap();
        assert_eq!(guest_phys_bits(&cpuid), 40);
        let without = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        assert_eq!(guest_phys_bits(&without), 36);
        leaf.eax = 0x3000;
        let zero = CpuId::from_entries(&[leaf]).unwrap();
        assert_eq!(guest_phys_bits(&zero), 36);
    }

    #[test]
    fn pmu_leaf_is_cleared() {
        let mut e = entry(0xa, 0);
        e.eax = 0x0803_0402;
        patch_entry(&mut e, 0, 1);
        assert_eq!((e.eax, e.ebx), (0, 0));
    }
}
