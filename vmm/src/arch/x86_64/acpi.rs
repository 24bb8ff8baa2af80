//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with a sleep control register so a
//! guest `poweroff` reaches the VMM) + DSDT (`_S5_`, COM1, the PCI host bridge), MADT (all
//! vCPUs, the IOAPIC) and MCFG (ECAM of PCI bus 0).
//!
//! Every table is encoded field by field into a byte vector and checksummed; see the ACPI 6.x
//! specification, chapter 5.2, for the layouts.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    pci_mmio64_start, IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE,
    PCI_MMIO32_START, PCI_MMIO64_SIZE,
};

/// Where the tables go: the BIOS read-only area, which Linux scans for the RSDP and which
/// the e820 map reports as reserved.
pub const RSDP_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = 0xe_0040;
const FADT_ADDR: u64 = 0xe_0080;
const DSDT_ADDR: u64 = 0xe_0200;
const MADT_ADDR: u64 = 0xe_0800;
const MCFG_ADDR: u64 = 0xe_0f00;
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

/// DSDT: `\_S5_` (the sleep type for power-off) and `\_SB_.COM1`, the serial port with
/// its I/O range and IRQ 4. A hardware-reduced platform has no legacy PIC, so Linux maps
/// ISA IRQs only for devices the namespace describes; without COM1 here the console's
/// interrupt never reaches the guest and only polled kernel printk shows.
fn dsdt(ram_end: u64) -> Vec<u8> {
    let s5 = aml::name(
        b"_S5_",
        &aml::package(&[aml::byte(S5_SLP_TYP), aml::byte(S5_SLP_TYP)]),
    );
    let com1 = aml::device(
        b"COM1",
        &[
            aml::name(b"_HID", &aml::eisa_id(*b"PNP0501")),
            aml::name(b"_UID", &[aml::ZERO]),
            aml::name(
                b"_CRS",
                &aml::buffer(
                    &[
                        aml::io_port(0x3f8, 8),
                        aml::irq_no_flags(4),
                        aml::END_TAG.to_vec(),
                    ]
                    .concat(),
                ),
            ),
        ]
        .concat(),
    );
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&s5)
        .bytes(&aml::scope(b"_SB_", &[com1, pci0(ram_end)].concat()));
    t.finish()
}

/// `\_SB_.PCI0`: the PCI host bridge (bus 0), with the resources it decodes: the
/// config ports, all other I/O ports, the 32-bit MMIO window below the IOAPIC and the
/// 64-bit window above RAM. Linux finds PCI root buses only through this on an ACPI
/// system. Devices use MSI-X, so there is no `_PRT` for INTx.
fn pci0(ram_end: u64) -> Vec<u8> {
    let mmio64 = pci_mmio64_start(ram_end);
    let crs = [
        aml::word_bus_number(0, 0),
        aml::io_port(0xcf8, 8),
        aml::word_io(0x0000, 0x0cf7),
        aml::word_io(0x0d00, 0xffff),
        aml::dword_memory(
            PCI_MMIO32_START as u32,
            (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        ),
        aml::qword_memory(mmio64, mmio64 + PCI_MMIO64_SIZE - 1),
        aml::END_TAG.to_vec(),
    ]
    .concat();
    aml::device(
        b"PCI0",
        &[
            aml::name(b"_HID", &aml::eisa_id(*b"PNP0A03")),
            aml::name(b"_UID", &[aml::ZERO]),
            aml::name(b"_SEG", &[aml::ZERO]),
            aml::name(b"_BBN", &[aml::ZERO]),
            aml::name(b"_ADR", &[aml::ZERO]),
            aml::name(b"_CRS", &aml::buffer(&crs)),
        ]
        .concat(),
    )
}

/// MCFG: one ECAM allocation, segment 0, buses 0-0.
fn mcfg() -> Vec<u8> {
    let mut t = Sdt::new(b"MCFG", 1);
    t.u64(0) // reserved
        .u64(PCI_ECAM_START)
        .u16(0) // segment
        .u8(0) // start bus
        .u8(((PCI_ECAM_SIZE >> 20) - 1) as u8) // end bus
        .u32(0);
    t.finish()
}

/// The few AML encodings the DSDT needs (ACPI 6.x, chapter 20).
mod aml {
    pub const ZERO: u8 = 0x00;
    pub const END_TAG: [u8; 2] = [0x79, 0x00];

    /// PkgLength of `body_len` bytes of content (the encoding counts its own bytes).
    pub fn pkg_length(body_len: usize) -> Vec<u8> {
        if body_len + 1 < 0x40 {
            return vec![(body_len + 1) as u8];
        }
        let (n, total) = if body_len + 2 < 1 << 12 {
            (1, body_len + 2)
        } else if body_len + 3 < 1 << 20 {
            (2, body_len + 3)
        } else {
            (3, body_len + 4)
        };
        let mut v = vec![((n as u8) << 6) | (total & 0xf) as u8];
        for i in 0..n {
            v.push((total >> (4 + 8 * i)) as u8);
        }
        v
    }

    fn with_pkg(op: &[u8], body: &[u8]) -> Vec<u8> {
        [op, &pkg_length(body.len()), body].concat()
    }

    pub fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
        [&[0x08][..], seg, value].concat()
    }

    pub fn byte(v: u8) -> Vec<u8> {
        vec![0x0a, v]
    }

    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let body = [&[elements.len() as u8][..], &elements.concat()].concat();
        with_pkg(&[0x12], &body)
    }

    pub fn buffer(data: &[u8]) -> Vec<u8> {
        let body = [&byte(data.len() as u8)[..], data].concat();
        with_pkg(&[0x11], &body)
    }

    pub fn device(seg: &[u8; 4], body: &[u8]) -> Vec<u8> {
        with_pkg(&[0x5b, 0x82], &[&seg[..], body].concat())
    }

    pub fn scope(seg: &[u8; 4], body: &[u8]) -> Vec<u8> {
        with_pkg(&[0x10], &[&[b'\\'][..], &seg[..], body].concat())
    }

    /// `EisaId("PNP0501")`: three letters in 5 bits each, then four hex digits, as a
    /// big-endian DWordConst.
    pub fn eisa_id(id: [u8; 7]) -> Vec<u8> {
        let l = |c: u8| u32::from(c - b'@') & 0x1f;
        let h = |c: u8| (c as char).to_digit(16).unwrap_or(0);
        let v = (l(id[0]) << 26)
            | (l(id[1]) << 21)
            | (l(id[2]) << 16)
            | (h(id[3]) << 12)
            | (h(id[4]) << 8)
            | (h(id[5]) << 4)
            | h(id[6]);
        [&[0x0c][..], &v.to_be_bytes()].concat()
    }

    /// Small I/O port descriptor: 16-bit decode, fixed `base`, `len` ports.
    pub fn io_port(base: u16, len: u8) -> Vec<u8> {
        let b = base.to_le_bytes();
        vec![0x47, 0x01, b[0], b[1], b[0], b[1], 0x01, len]
    }

    /// Producer, positive decode, fixed minimum and maximum: the general flags of every
    /// address space descriptor below.
    const PRODUCER_FIXED: u8 = 0x0c;

    /// Large address space descriptor: `tag`, resource `kind`, type-specific flags, then
    /// granularity, min, max, translation and length, each `width` bytes.
    fn address_space(
        tag: u8,
        kind: u8,
        type_flags: u8,
        width: usize,
        min: u64,
        max: u64,
    ) -> Vec<u8> {
        let len = 3 + 5 * width;
        let mut v = vec![
            tag,
            len as u8,
            (len >> 8) as u8,
            kind,
            PRODUCER_FIXED,
            type_flags,
        ];
        for field in [0, min, max, 0, max - min + 1] {
            v.extend_from_slice(&field.to_le_bytes()[..width]);
        }
        v
    }

    /// `WordBusNumber` for buses `min..=max`.
    pub fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
        address_space(0x88, 2, 0, 2, min.into(), max.into())
    }

    /// `WordIO` for ports `min..=max` (entire range).
    pub fn word_io(min: u16, max: u16) -> Vec<u8> {
        address_space(0x88, 1, 0x03, 2, min.into(), max.into())
    }

    /// `DWordMemory`, read-write, non-cacheable, `min..=max`.
    pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
        address_space(0x87, 0, 0x01, 4, min.into(), max.into())
    }

    /// `QWordMemory`, read-write, non-cacheable, `min..=max`.
    pub fn qword_memory(min: u64, max: u64) -> Vec<u8> {
        address_space(0x8a, 0, 0x01, 8, min, max)
    }

    /// Small IRQ descriptor without flags: edge-triggered, active high.
    pub fn irq_no_flags(irq: u8) -> Vec<u8> {
        let mask = (1u16 << irq).to_le_bytes();
        vec![0x22, mask[0], mask[1]]
    }
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
///
/// `ram_end` (the end of guest RAM) places the 64-bit PCI window.
pub fn setup_acpi(mem: &GuestMemoryMmap, vcpus: u8, ram_end: u64) -> Result<u64, AcpiError> {
    let madt = madt(vcpus);
    let dsdt = dsdt(ram_end);
    if MADT_ADDR + madt.len() as u64 > MCFG_ADDR || DSDT_ADDR + dsdt.len() as u64 > MADT_ADDR {
        return Err(AcpiError::TooLarge { vcpus });
    }
    let mcfg = mcfg();
    debug_assert!(MCFG_ADDR + (mcfg.len() as u64) <= ACPI_AREA_END);
    let tables = [
        (RSDP_ADDR, rsdp(XSDT_ADDR)),
        (XSDT_ADDR, xsdt(&[FADT_ADDR, MADT_ADDR, MCFG_ADDR])),
        (FADT_ADDR, fadt(DSDT_ADDR)),
        (DSDT_ADDR, dsdt),
        (MADT_ADDR, madt),
        (MCFG_ADDR, mcfg),
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
        assert!(sums_to_zero(&dsdt(1 << 30)));
        let m = mcfg();
        assert_eq!(m.len(), 60);
        assert!(sums_to_zero(&m));
        assert_eq!(&m[44..52], &PCI_ECAM_START.to_le_bytes());
        assert!(sums_to_zero(&xsdt(&[1, 2])));
        assert_eq!(xsdt(&[1, 2]).len(), 36 + 16);
    }

    #[test]
    fn aml_encodings_match_the_spec() {
        assert_eq!(
            aml::eisa_id(*b"PNP0501"),
            vec![0x0c, 0x41, 0xd0, 0x05, 0x01]
        );
        assert_eq!(aml::pkg_length(5), vec![6]);
        // 100 bytes of content: two-byte encoding of 102.
        assert_eq!(aml::pkg_length(100), vec![0x40 | (102 & 0xf), 102 >> 4]);
        assert_eq!(
            aml::package(&[aml::byte(5), aml::byte(5)]),
            vec![0x12, 0x06, 0x02, 0x0a, 0x05, 0x0a, 0x05]
        );
        assert_eq!(aml::irq_no_flags(4), vec![0x22, 0x10, 0x00]);
        // WordIO 0x0d00-0xffff: producer, fixed, entire range, length 0xf300.
        assert_eq!(
            aml::word_io(0x0d00, 0xffff),
            vec![
                0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0x00, 0x0d, 0xff, 0xff, 0, 0, 0x00, 0xf3
            ]
        );
        let q = aml::qword_memory(1 << 32, (2 << 32) - 1);
        assert_eq!((q[0], q[1], q.len()), (0x8a, 43, 46));
        assert_eq!(&q[38..46], &(1u64 << 32).to_le_bytes(), "length");
        let d = dsdt(1 << 30);
        assert!(sums_to_zero(&d));
        assert!(d.windows(4).any(|w| w == b"PCI0"));
        let body = &d[36..];
        assert!(body.windows(4).any(|w| w == b"COM1"));
        assert!(body.windows(4).any(|w| w == b"_S5_"));
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
        assert_eq!(setup_acpi(&mem, 40, 1 << 30).unwrap(), RSDP_ADDR);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&small, 1, 1 << 30),
            Err(AcpiError::Write { .. })
        ));
    }
}
