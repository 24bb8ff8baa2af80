//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with a sleep control register so a
//! guest `poweroff` reaches the VMM) + DSDT (just `_S5_`) and MADT (all vCPUs, the IOAPIC).
//!
//! Every table is encoded field by field into a byte vector and checksummed; see the ACPI 6.x
//! specification, chapter 5.2, for the layouts.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

/// Where the tables go: the BIOS read-only area, which Linux scans for the RSDP and which
/// the e820 map reports as reserved.
pub const RSDP_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = 0xe_0040;
const FADT_ADDR: u64 = 0xe_0080;
const DSDT_ADDR: u64 = 0xe_0200;
const MADT_ADDR: u64 = 0xe_0300;
/// The tables must end below the 1 MiB boundary.
const ACPI_AREA_END: u64 = 0x10_0000;

/// The hardware-reduced sleep control register (I/O port) and the value pair it expects.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// SLP_TYP we publish for S5 in `_S5_`; the guest writes `(S5_SLP_TYP << 2) | SLP_EN`.
pub const S5_SLP_TYP: u8 = 5;
pub const SLP_EN: u8 = 1 << 5;
/// The ACPI SCI: unused in hardware-reduced mode but kept off the timer's IRQ 0.
const SCI_IRQ: u16 = 9;

const OEM_ID: &[u8; 6] = b"AIVMM ";
const OEM_TABLE_ID: &[u8; 8] = b"AIVMMVM ";
const CREATOR_ID: &[u8; 4] = b"AIVM";

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for {vcpus} vCPUs do not fit below 1 MiB")]
    TooLarge { vcpus: u8 },
    #[error("cannot write ACPI table at {addr:#x}: {source}")]
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table under construction: header first, length and checksum
/// filled in by `finish`.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(signature);
        v.extend_from_slice(&[0; 4]); // length
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(OEM_TABLE_ID);
        v.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        v.extend_from_slice(CREATOR_ID);
        v.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Sdt(v)
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Generic Address Structure for a byte-wide I/O port (0 = not present).
    fn gas_io8(&mut self, port: u16) -> &mut Self {
        if port == 0 {
            return self.bytes(&[0; 12]);
        }
        self.bytes(&[1, 8, 0, 1]).u64(u64::from(port))
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0); // checksum of the first 20 bytes
    v.extend_from_slice(OEM_ID);
    v.push(2); // revision: ACPI 2.0+ (XSDT)
    v.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(&xsdt.to_le_bytes());
    v.push(0); // extended checksum
    v.extend_from_slice(&[0; 3]);
    v[8] = checksum(&v[..20]);
    v[32] = checksum(&v);
    v
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for &a in tables {
        t.u64(a);
    }
    t.finish()
}

/// FADT revision 6 (276 bytes), hardware-reduced.
fn fadt(dsdt: u64) -> Vec<u8> {
    const FLAG_PWR_BUTTON: u32 = 1 << 4;
    const FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
    const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut t = Sdt::new(b"FACP", 6);
    t.u32(0) // FIRMWARE_CTRL
        .u32(dsdt as u32)
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ)
        .u32(0) // SMI_CMD: no SMM
        .bytes(&[0; 4]) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .bytes(&[0; 32]) // PM1a/b EVT, PM1a/b CNT, PM2 CNT, PM TMR, GPE0, GPE1 blocks
        .bytes(&[0; 8]) // their lengths, GPE1_BASE, CST_CNT
        .bytes(&[0; 8]) // P_LVL2/3_LAT, FLUSH_SIZE/STRIDE
        .bytes(&[0; 5]) // DUTY_OFFSET/WIDTH, DAY/MON_ALRM, CENTURY
        .u16(BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        .u8(0)
        .u32(FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_HW_REDUCED_ACPI)
        .gas_io8(0) // RESET_REG: none (reboot goes through the i8042)
        .u8(0) // RESET_VALUE
        .u16(0) // ARM_BOOT_ARCH
        .u8(0) // FADT minor version
        .u64(0) // X_FIRMWARE_CTRL
        .u64(dsdt);
    for _ in 0..8 {
        t.gas_io8(0); // X_PM1a_EVT .. X_GPE1 blocks: absent in hardware-reduced mode
    }
    t.gas_io8(SLEEP_CONTROL_PORT)
        .gas_io8(SLEEP_STATUS_PORT)
        .bytes(b"AIVMMKVM"); // hypervisor vendor identity
    t.finish()
}

/// DSDT with one object: `Name (_S5_, Package () { 5, 5 })`.
fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&[
        0x08, b'_', b'S', b'5', b'_', // NameOp "_S5_"
        0x12, 0x06, 0x02, // PackageOp, PkgLength 6, 2 elements
        0x0a, S5_SLP_TYP, 0x0a, S5_SLP_TYP, // BytePrefix 5, BytePrefix 5
    ]);
    t.finish()
}

fn madt(vcpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC_ADDR as u32).u32(PCAT_COMPAT);
    for cpu in 0..vcpus {
        // Processor Local APIC: ACPI processor uid, APIC id, enabled.
        t.u8(0).u8(8).u8(cpu).u8(cpu).u32(1);
    }
    // I/O APIC: id after the last vCPU, GSI base 0.
    t.u8(1)
        .u8(12)
        .u8(vcpus)
        .u8(0)
        .u32(IOAPIC_ADDR as u32)
        .u32(0);
    // Interrupt source override for the SCI: ISA IRQ 9 → GSI 9, active high, level.
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ as u8)
        .u32(u32::from(SCI_IRQ))
        .u16(0x000d);
    // Local APIC NMI on LINT1 of every processor.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

/// Writes all tables; returns the RSDP address for the zero page.
pub fn setup_acpi(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, AcpiError> {
    let madt = madt(vcpus);
    if MADT_ADDR + madt.len() as u64 > ACPI_AREA_END {
        return Err(AcpiError::TooLarge { vcpus });
    }
    let tables = [
        (RSDP_ADDR, rsdp(XSDT_ADDR)),
        (XSDT_ADDR, xsdt(&[FADT_ADDR, MADT_ADDR])),
        (FADT_ADDR, fadt(DSDT_ADDR)),
        (DSDT_ADDR, dsdt()),
        (MADT_ADDR, madt),
    ];
    for (addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write { addr, source })?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_have_their_spec_lengths_and_checksums() {
        let f = fadt(DSDT_ADDR);
        assert_eq!(f.len(), 276);
        assert!(sums_to_zero(&f));
        assert_eq!(&f[140..148], &DSDT_ADDR.to_le_bytes()); // X_DSDT
        assert_eq!(f[244], 1); // sleep control: system I/O
        assert_eq!(&f[248..250], &SLEEP_CONTROL_PORT.to_le_bytes());
        let r = rsdp(XSDT_ADDR);
        assert_eq!(r.len(), 36);
        assert!(sums_to_zero(&r[..20]) && sums_to_zero(&r));
        assert!(sums_to_zero(&dsdt()));
        assert!(sums_to_zero(&xsdt(&[1, 2])));
        assert_eq!(xsdt(&[1, 2]).len(), 36 + 16);
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let m = madt(3);
        assert!(sums_to_zero(&m));
        assert_eq!(m.len(), 44 + 3 * 8 + 12 + 10 + 6);
        for cpu in 0..3usize {
            let e = &m[44 + cpu * 8..52 + cpu * 8];
            assert_eq!((e[0], e[1], e[3], e[4]), (0, 8, cpu as u8, 1));
        }
        let io = &m[44 + 24..44 + 36];
        assert_eq!((io[0], io[2]), (1, 3));
        assert_eq!(&io[4..8], &(IOAPIC_ADDR as u32).to_le_bytes());
    }

    #[test]
    fn tables_land_in_guest_memory_for_many_vcpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup_acpi(&mem, 40).unwrap(), RSDP_ADDR);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&small, 1),
            Err(AcpiError::Write { .. })
        ));
    }
}
