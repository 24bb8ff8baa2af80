//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with a sleep control register so a
//! guest `poweroff` reaches the VMM) + DSDT (`_S5_`, COM1, the PCI host bridge with its
//! windows and INTx routing), MADT (all vCPUs, the IOAPIC) and MCFG (ECAM of PCI bus 0).
//!
//! Every table is encoded field by field into a byte vector and checksummed; see the ACPI 6.x
//! specification, chapter 5.2, for the layouts.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    addr32, pci_intx_gsi, Mmio64Window, IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_IO_WINDOW_LAST, PCI_IO_WINDOW_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};

/// Where the tables go: the BIOS read-only area, which Linux scans for the RSDP and which
/// the e820 map reports as reserved.
pub const RSDP_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = 0xe_0040;
const FADT_ADDR: u64 = 0xe_0080;
/// The DSDT gets 7.5 KiB (about 2.5 KiB today, most of it the `_PRT`), the MADT 4 KiB
/// (2.1 KiB for 255 vCPUs).
const DSDT_ADDR: u64 = 0xe_0200;
const MADT_ADDR: u64 = 0xe_2000;
const MCFG_ADDR: u64 = 0xe_3000;
/// The tables must end below the 1 MiB boundary.
const ACPI_AREA_END: u64 = 0x10_0000;

/// The hardware-reduced sleep control register (I/O port) and the value pair it expects.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// SLP_TYP we publish for S5 in `_S5_`; the guest writes `(S5_SLP_TYP << 2) | SLP_EN`.
pub const S5_SLP_TYP: u8 = 5;
pub const SLP_EN: u8 = 1 << 5;
/// The ACPI SCI: unused in hardware-reduced mode but kept off the timer's IRQ 0.
const SCI_IRQ: u8 = 9;
/// Device slots on PCI bus 0 (all of the root's), each with INTA#-INTD# in the `_PRT`.
const PCI_SLOTS: u8 = devices::pci::root::NUM_DEVICES;
const PCI_INTX_PINS: u8 = 4;

/// The 32-bit address fields of the tables.
const LAPIC_ADDR32: u32 = addr32(LAPIC_ADDR);
const IOAPIC_ADDR32: u32 = addr32(IOAPIC_ADDR);
const PCI_MMIO32_FIRST: u32 = addr32(PCI_MMIO32_START);
const PCI_MMIO32_LAST: u32 = addr32(PCI_MMIO32_START + PCI_MMIO32_SIZE - 1);
/// Last bus of the ECAM window (1 MiB per bus); the build fails if it is not a bus number.
const ECAM_LAST_BUS: u8 = {
    let last = (PCI_ECAM_SIZE >> 20) - 1;
    assert!(last <= u8::MAX as u64, "ECAM window of more than 256 buses");
    last.to_le_bytes()[0]
};

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
        // A table is a few KiB at most: the DSDT is fixed, the MADT has at most 255 vCPUs.
        #[allow(clippy::cast_possible_truncation)]
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
        // The 32-bit pointer; 0 (X_DSDT alone) were the table above 4 GiB.
        .u32(u32::try_from(dsdt).unwrap_or(0))
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(u16::from(SCI_IRQ))
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

/// DSDT: `\_S5_` (the sleep type for power-off), `\_SB_.COM1`, the serial port with its
/// I/O range and IRQ 4, and `\_SB_.PS2K`, the i8042's keyboard with its two ports and IRQ 1.
/// A hardware-reduced platform has no legacy PIC, so Linux maps ISA IRQs only for devices
/// the namespace describes: without COM1 the console's interrupt never reaches the guest
/// (only polled kernel printk shows), and without PS2K the i8042 driver cannot request its
/// IRQ and the control API's Ctrl+Alt+Del has no keyboard to arrive on.
fn dsdt(mmio64: &Mmio64Window) -> Vec<u8> {
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
    let ps2k = aml::device(
        b"PS2K",
        &[
            aml::name(b"_HID", &aml::eisa_id(*b"PNP0303")),
            aml::name(
                b"_CRS",
                &aml::buffer(
                    &[
                        aml::io_port(0x60, 1),
                        aml::io_port(0x64, 1),
                        aml::irq_no_flags(1),
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
        .bytes(&aml::scope(b"_SB_", &[com1, ps2k, pci0(mmio64)].concat()));
    t.finish()
}

/// `\_SB_.PCI0`: the PCI host bridge (bus 0), with the resources it decodes (the
/// config ports, all other I/O ports, the 32-bit MMIO window below the IOAPIC and the
/// 64-bit window above RAM, when there is room for one) and its INTx routing (`_PRT`).
/// Linux finds PCI root buses only through this on an ACPI system.
fn pci0(mmio64: &Mmio64Window) -> Vec<u8> {
    let mut crs = vec![
        aml::word_bus_number(0, 0),
        aml::io_port(0xcf8, 8),
        aml::word_io(0x0000, 0x0cf7),
        aml::word_io(PCI_IO_WINDOW_START, PCI_IO_WINDOW_LAST),
        aml::dword_memory(PCI_MMIO32_FIRST, PCI_MMIO32_LAST),
    ];
    if mmio64.size > 0 {
        crs.push(aml::qword_memory(mmio64.start, mmio64.end() - 1));
    }
    crs.push(aml::END_TAG.to_vec());
    aml::device(
        b"PCI0",
        &[
            aml::name(b"_HID", &aml::eisa_id(*b"PNP0A03")),
            aml::name(b"_UID", &[aml::ZERO]),
            aml::name(b"_SEG", &[aml::ZERO]),
            aml::name(b"_BBN", &[aml::ZERO]),
            aml::name(b"_ADR", &[aml::ZERO]),
            aml::name(b"_CRS", &aml::buffer(&crs.concat())),
            aml::name(b"_PRT", &prt()),
        ]
        .concat(),
    )
}

/// `_PRT`: for every slot and pin of bus 0, `Package { slot << 16 | 0xFFFF, pin, Zero,
/// GSI }`, a GSI entry (no interrupt link device): Linux then programs the IOAPIC pin
/// level-triggered, active-low, as PCI INTx is. The GSIs come from
/// [`pci_intx_gsi`], which the VMM also uses to wire passthrough INTx.
fn prt() -> Vec<u8> {
    let entries: Vec<Vec<u8>> = (0..PCI_SLOTS)
        .flat_map(|slot| {
            (0..PCI_INTX_PINS).map(move |pin| {
                aml::package(&[
                    aml::integer((u64::from(slot) << 16) | 0xffff),
                    aml::integer(pin.into()),
                    vec![aml::ZERO],
                    aml::integer(pci_intx_gsi(slot, pin).into()),
                ])
            })
        })
        .collect();
    aml::package(&entries)
}

/// MCFG: one ECAM allocation, segment 0, buses 0-0.
fn mcfg() -> Vec<u8> {
    let mut t = Sdt::new(b"MCFG", 1);
    t.u64(0) // reserved
        .u64(PCI_ECAM_START)
        .u16(0) // segment
        .u8(0) // start bus
        .u8(ECAM_LAST_BUS) // end bus
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
            return vec![(body_len + 1).to_le_bytes()[0]];
        }
        let (n, total) = if body_len + 2 < 1 << 12 {
            (1u8, body_len + 2)
        } else if body_len + 3 < 1 << 20 {
            (2, body_len + 3)
        } else {
            (3, body_len + 4)
        };
        // The lead byte: follow-byte count and bits 0-3; then bits 4-11, 12-19, 20-27.
        let mut v = vec![(n << 6) | (total.to_le_bytes()[0] & 0xf)];
        v.extend_from_slice(&(total >> 4).to_le_bytes()[..usize::from(n)]);
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

    /// The shortest encoding of an integer constant: `Zero`, `One`, or a Byte-, Word-,
    /// DWord- or QWordConst.
    pub fn integer(v: u64) -> Vec<u8> {
        match v {
            0 => vec![0x00],
            1 => vec![0x01],
            2..=0xff => byte(v.to_le_bytes()[0]),
            0x100..=0xffff => [&[0x0b][..], &v.to_le_bytes()[..2]].concat(),
            0x1_0000..=0xffff_ffff => [&[0x0c][..], &v.to_le_bytes()[..4]].concat(),
            _ => [&[0x0e][..], &v.to_le_bytes()].concat(),
        }
    }

    /// `Package` of up to 255 elements (NumElements is one byte; callers stay below it).
    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        debug_assert!(elements.len() <= 255);
        // Callers pass at most 255 elements (asserted above).
        #[allow(clippy::cast_possible_truncation)]
        let count = elements.len() as u8;
        let body = [&[count][..], &elements.concat()].concat();
        with_pkg(&[0x12], &body)
    }

    pub fn buffer(data: &[u8]) -> Vec<u8> {
        let body = [&integer(data.len() as u64)[..], data].concat();
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
        let [len_lo, len_hi, ..] = (3 + 5 * width).to_le_bytes();
        let mut v = vec![tag, len_lo, len_hi, kind, PRODUCER_FIXED, type_flags];
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
    t.u32(LAPIC_ADDR32).u32(PCAT_COMPAT);
    for cpu in 0..vcpus {
        // Processor Local APIC: ACPI processor uid, APIC id, enabled.
        t.u8(0).u8(8).u8(cpu).u8(cpu).u32(1);
    }
    // I/O APIC: id after the last vCPU, GSI base 0.
    t.u8(1).u8(12).u8(vcpus).u8(0).u32(IOAPIC_ADDR32).u32(0);
    // Interrupt source override for the SCI: ISA IRQ 9 → GSI 9, active high, level.
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ)
        .u32(u32::from(SCI_IRQ))
        .u16(0x000d);
    // Local APIC NMI on LINT1 of every processor.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

/// Writes all tables; returns the RSDP address for the zero page.
///
/// `mmio64` is the PCI segment's 64-bit window, declared in the host bridge's `_CRS`.
pub fn setup_acpi(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    mmio64: &Mmio64Window,
) -> Result<u64, AcpiError> {
    let madt = madt(vcpus);
    let dsdt = dsdt(mmio64);
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
    use super::super::layout::pci_mmio64_window;
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    /// 1 GiB of RAM, 40 physical address bits: the window is 4 GiB - 512 GiB.
    fn window() -> Mmio64Window {
        pci_mmio64_window(1 << 30, 40)
    }

    /// A minimal AML reader for the tests: decodes what the DSDT builder emits, so the
    /// tests check structure (lengths, nesting, element counts), not byte patterns.
    struct Aml<'a> {
        b: &'a [u8],
        at: usize,
    }

    impl<'a> Aml<'a> {
        fn new(b: &'a [u8]) -> Self {
            Aml { b, at: 0 }
        }

        fn byte(&mut self) -> u8 {
            let v = self.b[self.at];
            self.at += 1;
            v
        }

        fn le(&mut self, n: usize) -> u64 {
            let v = self.b[self.at..self.at + n]
                .iter()
                .rev()
                .fold(0u64, |a, &x| (a << 8) | u64::from(x));
            self.at += n;
            v
        }

        /// A PkgLength; returns the offset where the package ends.
        fn pkg_end(&mut self) -> usize {
            let start = self.at;
            let lead = self.byte();
            let follow = usize::from(lead >> 6);
            let len = if follow == 0 {
                usize::from(lead & 0x3f)
            } else {
                (0..follow).fold(usize::from(lead & 0x0f), |a, i| {
                    a | (usize::from(self.byte()) << (4 + 8 * i))
                })
            };
            start + len
        }

        /// An integer constant (`Zero`, `One`, Byte/Word/DWord/QWordConst).
        fn integer(&mut self) -> u64 {
            match self.byte() {
                0x00 => 0,
                0x01 => 1,
                0x0a => self.le(1),
                0x0b => self.le(2),
                0x0c => self.le(4),
                0x0e => self.le(8),
                op => panic!("not an integer: opcode {op:#x} at {}", self.at - 1),
            }
        }

        /// A `Package`: its elements, each decoded by `element`; checks that the
        /// PkgLength covers exactly the NumElements elements.
        fn package<T>(&mut self, mut element: impl FnMut(&mut Self) -> T) -> Vec<T> {
            assert_eq!(self.byte(), 0x12, "PackageOp");
            let end = self.pkg_end();
            let n = self.byte();
            let out: Vec<T> = (0..n).map(|_| element(self)).collect();
            assert_eq!(self.at, end, "PkgLength of the package");
            out
        }

        /// Moves to just after the NameString of the next `Name(<seg>, ...)`.
        fn find_name(&mut self, seg: &[u8; 4]) {
            let name = [&[0x08][..], seg].concat();
            self.at += self.b[self.at..]
                .windows(5)
                .position(|w| w == name.as_slice())
                .unwrap_or_else(|| panic!("no Name({})", String::from_utf8_lossy(seg)))
                + 5;
        }
    }

    #[test]
    fn prt_routes_every_slot_and_pin_to_its_gsi() {
        let d = dsdt(&window());
        let mut aml = Aml::new(&d);
        aml.at = d.windows(4).position(|w| w == b"PCI0").unwrap();
        aml.find_name(b"_PRT");
        let entries = aml.package(|a| {
            let fields = a.package(|a| a.integer());
            assert_eq!(fields.len(), 4, "_PRT entries have 4 fields");
            (fields[0], fields[1], fields[2], fields[3])
        });
        assert_eq!(entries.len(), 32 * 4);
        for slot in 0..32u8 {
            for pin in 0..4u8 {
                let address = (u64::from(slot) << 16) | 0xffff;
                let matching: Vec<_> = entries
                    .iter()
                    .filter(|e| e.0 == address && e.1 == u64::from(pin))
                    .collect();
                assert_eq!(matching.len(), 1, "slot {slot} pin {pin}");
                let (_, _, source, gsi) = *matching[0];
                assert_eq!(source, 0, "a GSI entry has no link device");
                assert_eq!(gsi, u64::from(pci_intx_gsi(slot, pin)));
                assert!((16..24).contains(&gsi), "GSI {gsi} is not a PCI pin");
            }
        }
    }

    #[test]
    fn dsdt_nesting_lengths_are_consistent() {
        let d = dsdt(&window());
        let mut aml = Aml::new(&d);
        aml.at = 36;
        aml.find_name(b"_S5_");
        let s5 = aml.package(|a| a.integer());
        assert_eq!(s5, vec![5, 5]);
        // Scope (\_SB_) runs to the end of the table; PCI0, its last device, too.
        assert_eq!(aml.byte(), 0x10, "ScopeOp");
        assert_eq!(aml.pkg_end(), d.len());
        let pci0 = d.windows(4).position(|w| w == b"PCI0").unwrap();
        let device_op = (pci0 - 6..pci0)
            .rev()
            .find(|&i| d[i] == 0x5b && d[i + 1] == 0x82)
            .expect("DeviceOp before PCI0");
        let mut dev = Aml::new(&d);
        dev.at = device_op + 2;
        assert_eq!(dev.pkg_end(), d.len());
        assert_eq!(dev.at, pci0, "PkgLength then the name");
    }

    /// The resource descriptors of PCI0's `_CRS`: (tag, bytes).
    fn crs_descriptors(d: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut aml = Aml::new(d);
        aml.at = d.windows(4).position(|w| w == b"PCI0").unwrap();
        aml.find_name(b"_CRS");
        assert_eq!(aml.byte(), 0x11, "BufferOp");
        let end = aml.pkg_end();
        let size = usize::try_from(aml.integer()).unwrap();
        assert_eq!(aml.at + size, end, "buffer size and PkgLength agree");
        let mut out = Vec::new();
        while aml.at < end {
            let start = aml.at;
            let tag = aml.byte();
            let len = if tag & 0x80 != 0 {
                3 + usize::try_from(aml.le(2)).unwrap()
            } else {
                1 + usize::from(tag & 7)
            };
            out.push((tag, d[start..start + len].to_vec()));
            aml.at = start + len;
            if tag == 0x79 {
                break;
            }
        }
        assert_eq!(aml.at, end, "the end tag closes the buffer");
        out
    }

    #[test]
    fn crs_declares_the_io_and_64_bit_windows() {
        let w = window();
        let descs = crs_descriptors(&dsdt(&w));
        let io = aml::word_io(PCI_IO_WINDOW_START, PCI_IO_WINDOW_LAST);
        assert!(descs.iter().any(|(_, b)| *b == io), "WordIO 0x0d00-0xffff");
        let qwords: Vec<_> = descs.iter().filter(|(t, _)| *t == 0x8a).collect();
        assert_eq!(qwords.len(), 1);
        let q = &qwords[0].1;
        assert_eq!(&q[14..22], &(4u64 << 30).to_le_bytes(), "min");
        assert_eq!(&q[22..30], &((512u64 << 30) - 1).to_le_bytes(), "max");
        // No room above RAM: no QWordMemory at all, the rest intact.
        let none = pci_mmio64_window(40 << 30, 36);
        let d = dsdt(&none);
        assert!(sums_to_zero(&d));
        let descs = crs_descriptors(&d);
        assert!(descs.iter().all(|(t, _)| *t != 0x8a));
        assert_eq!(
            descs.len(),
            6,
            "bus, config ports, 2 WordIO, DWordMemory, end"
        );
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
        assert!(sums_to_zero(&dsdt(&window())));
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
        let d = dsdt(&window());
        assert!(sums_to_zero(&d));
        assert!(d.windows(4).any(|w| w == b"PCI0"));
        let body = &d[36..];
        assert!(body.windows(4).any(|w| w == b"COM1"));
        assert!(body.windows(4).any(|w| w == b"_S5_"));
        // The keyboard: PNP0303 with IRQ 1.
        assert!(body.windows(4).any(|w| w == b"PS2K"));
        let pnp0303 = aml::eisa_id(*b"PNP0303");
        assert!(body.windows(pnp0303.len()).any(|w| w == pnp0303));
        assert!(body.windows(3).any(|w| w == aml::irq_no_flags(1)));
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        let m = madt(3);
        assert!(sums_to_zero(&m));
        assert_eq!(m.len(), 44 + 3 * 8 + 12 + 10 + 6);
        for cpu in 0..3u8 {
            let at = 44 + usize::from(cpu) * 8;
            let e = &m[at..at + 8];
            assert_eq!((e[0], e[1], e[3], e[4]), (0, 8, cpu, 1));
        }
        let io = &m[44 + 24..44 + 36];
        assert_eq!((io[0], io[2]), (1, 3));
        assert_eq!(&io[4..8], &IOAPIC_ADDR32.to_le_bytes());
    }

    #[test]
    fn tables_land_in_guest_memory_for_many_vcpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(setup_acpi(&mem, 40, &window()).unwrap(), RSDP_ADDR);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&small, 1, &window()),
            Err(AcpiError::Write { .. })
        ));
    }
}
