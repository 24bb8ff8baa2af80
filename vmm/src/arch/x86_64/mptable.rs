// Copyright the aivmm authors.
// SPDX-License-Identifier: Apache-2.0

//! Intel MultiProcessor Specification 1.4 tables.
//!
//! A Linux guest booted without ACPI finds its processors, its IOAPIC and the
//! routing of the ISA interrupts in an MP table. Linux scans the last KiB of
//! base memory (639 KiB..640 KiB) for the MP floating pointer structure, so the
//! whole table lives in the first KiB of the EBDA, `[MPTABLE_START, 0xa0000)`:
//!
//! ```text
//! MPTABLE_START       MP floating pointer structure (16 bytes, "_MP_")
//! MPTABLE_START + 16  MP configuration table header (44 bytes, "PCMP")
//!                     one processor entry per vCPU  (20 bytes each)
//!                     one bus entry: bus 0 is ISA   (8 bytes)
//!                     one I/O APIC entry            (8 bytes)
//!                     15 I/O interrupt entries      (8 bytes each)
//!                     2 local interrupt entries     (8 bytes each)
//! ```
//!
//! Every structure is encoded field by field, little endian, into a byte array;
//! the whole table is assembled in host memory, checksummed, bounds-checked
//! against guest memory and then written with a single copy.
//!
//! ISA interrupt routing matches KVM's default GSI routing, where GSI n is
//! I/O APIC pin n: ISA IRQ 0 (the PIT) and IRQs 1 and 3..=15 are wired to the pin
//! with the same number, and ISA IRQ 2 (the 8259 cascade, never an interrupt
//! source) gets no entry. With this identity wiring the VMM needs no
//! `KVM_SET_GSI_ROUTING` for legacy devices.

use super::layout::{self, EBDA_START};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions};

/// The MP floating pointer structure sits at the start of the EBDA, where Linux scans.
pub const MPTABLE_START: u64 = EBDA_START;
const IOAPIC_ADDR: u32 = layout::addr32(layout::IOAPIC_ADDR);
const APIC_ADDR: u32 = layout::addr32(layout::LAPIC_ADDR);
/// The configuration table follows the floating pointer.
const CONFIG_TABLE_ADDR: u32 = layout::addr32(MPTABLE_START + FLOATING_POINTER_LEN as u64);
/// First byte past the EBDA; the MP table must end at or before it.
const EBDA_END: u64 = 0xa0000;

/// Version of the MP specification the tables follow (1.4).
const MP_SPEC_REV: u8 = 4;

// Sizes of the structures, in bytes (MP specification 1.4, chapter 4).
const FLOATING_POINTER_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const BUS_ENTRY_LEN: usize = 8;
const IOAPIC_ENTRY_LEN: usize = 8;
const IO_INTERRUPT_ENTRY_LEN: usize = 8;
const LOCAL_INTERRUPT_ENTRY_LEN: usize = 8;

// Entry types of the base configuration table.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

// Interrupt types of I/O and local interrupt assignment entries.
const INTERRUPT_TYPE_INT: u8 = 0;
const INTERRUPT_TYPE_NMI: u8 = 1;
const INTERRUPT_TYPE_EXTINT: u8 = 3;

/// Polarity and trigger mode both "conform to the specifications of the bus".
const INTERRUPT_FLAGS_CONFORMING: u16 = 0;

/// Processor entry flag: the processor is usable.
const CPU_FLAG_ENABLED: u8 = 1 << 0;
/// Processor entry flag: the processor is the bootstrap processor.
const CPU_FLAG_BSP: u8 = 1 << 1;
/// I/O APIC entry flag: the I/O APIC is usable.
const IOAPIC_FLAG_ENABLED: u8 = 1 << 0;

/// Version reported by KVM's in-kernel local APIC.
const LOCAL_APIC_VERSION: u8 = 0x14;
/// Version reported by KVM's in-kernel I/O APIC.
const IOAPIC_VERSION: u8 = 0x11;

/// CPU signature as CPUID leaf 1 EAX encodes it: family 6, model 15, stepping 1.
const CPU_SIGNATURE: u32 = (6 << 8) | (15 << 4) | 1;
/// CPUID leaf 1 EDX feature flags: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Id of the only bus, the ISA bus.
const ISA_BUS_ID: u8 = 0;
/// Bus type string of the ISA bus, space padded to 6 bytes.
const ISA_BUS_TYPE: [u8; 6] = *b"ISA   ";

/// Destination local APIC id meaning "every local APIC".
const ALL_LOCAL_APICS: u8 = 0xff;

/// OEM id of the configuration table header.
const OEM_ID: &str = "AIVMM";
/// Product id of the configuration table header.
const PRODUCT_ID: &str = "AIVMM-MICROVM";

/// ISA IRQ → I/O APIC pin: identity, as in KVM's default routing; ISA IRQ 2 is
/// the 8259 cascade and has no entry.
const ISA_IRQ_ROUTES: [(u8, u8); 15] = [
    (0, 0),
    (1, 1),
    (3, 3),
    (4, 4),
    (5, 5),
    (6, 6),
    (7, 7),
    (8, 8),
    (9, 9),
    (10, 10),
    (11, 11),
    (12, 12),
    (13, 13),
    (14, 14),
    (15, 15),
];

/// Local APIC input pins of the local interrupt entries.
const LINT0: u8 = 0;
const LINT1: u8 = 1;
const LOCAL_INTERRUPT_COUNT: usize = 2;

/// Bytes of the table that do not depend on the number of vCPUs.
const FIXED_LEN: usize = FLOATING_POINTER_LEN
    + CONFIG_HEADER_LEN
    + BUS_ENTRY_LEN
    + IOAPIC_ENTRY_LEN
    + ISA_IRQ_ROUTES.len() * IO_INTERRUPT_ENTRY_LEN
    + LOCAL_INTERRUPT_COUNT * LOCAL_INTERRUPT_ENTRY_LEN;

/// Largest APIC id an xAPIC processor or I/O APIC can have (0xff is broadcast).
const MAX_APIC_ID: u64 = 0xfe;

/// Largest number of vCPUs the MP table can describe: the I/O APIC takes APIC
/// id `num_cpus`, which must stay below the broadcast id, and the whole table
/// must fit in the first KiB of the EBDA. The second bound is the tighter one.
pub const MAX_CPUS: u8 = {
    let by_space = (EBDA_END - MPTABLE_START - FIXED_LEN as u64) / PROCESSOR_ENTRY_LEN as u64;
    let max = if by_space < MAX_APIC_ID {
        by_space
    } else {
        MAX_APIC_ID
    };
    // At most MAX_APIC_ID (0xfe): the low byte is the whole value.
    max.to_le_bytes()[0]
};

// The largest table must end inside the EBDA.
const _: () = assert!(MPTABLE_START + mptable_size(MAX_CPUS) <= EBDA_END);

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The VM has no vCPU.
    #[error("MP table needs at least one vCPU, got 0")]
    NoCpus,
    /// The table cannot describe that many vCPUs.
    #[error("Too many vCPUs for the MP table: {requested} (maximum {max})")]
    TooManyCpus { requested: u8, max: u8 },
    /// Part of the table's range is not guest RAM.
    #[error("MP table at {addr:#x} ({len} bytes) does not fit in guest memory")]
    NotInGuestMemory { addr: u64, len: u64 },
    /// Writing the table into guest memory failed.
    #[error("Failed to write the MP table at {addr:#x}: {source}")]
    Write {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

/// Number of bytes the MP table (floating pointer included) takes for
/// `num_cpus` vCPUs.
pub const fn mptable_size(num_cpus: u8) -> u64 {
    (FIXED_LEN + num_cpus as usize * PROCESSOR_ENTRY_LEN) as u64
}

/// Writes the MP floating pointer structure at `MPTABLE_START` and the MP
/// configuration table right after it.
///
/// vCPU `i` has local APIC id `i` and vCPU 0 is the bootstrap processor; the
/// I/O APIC gets id `num_cpus`. Nothing is written when an error is returned.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS || MPTABLE_START + mptable_size(num_cpus) > EBDA_END {
        return Err(MptableError::TooManyCpus {
            requested: num_cpus,
            max: MAX_CPUS,
        });
    }

    let table = build_mptable(num_cpus);
    let start = GuestAddress(MPTABLE_START);
    if !mem.check_range(start, table.len(), Permissions::Write) {
        return Err(MptableError::NotInGuestMemory {
            addr: MPTABLE_START,
            len: table.len() as u64,
        });
    }
    mem.write_slice(&table, start)
        .map_err(|source| MptableError::Write {
            addr: MPTABLE_START,
            source,
        })
}

/// Assembles the floating pointer and the configuration table for
/// `num_cpus` vCPUs (1..=`MAX_CPUS`), as they are laid out from `MPTABLE_START`.
fn build_mptable(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::with_capacity(FIXED_LEN + usize::from(num_cpus) * PROCESSOR_ENTRY_LEN);
    let mut entry_count: u16 = 0;

    for cpu in 0..num_cpus {
        let entry = ProcessorEntry {
            apic_id: cpu,
            bsp: cpu == 0,
        };
        entries.extend_from_slice(&entry.encode());
        entry_count += 1;
    }

    entries.extend_from_slice(&BusEntry { bus_id: ISA_BUS_ID }.encode());
    entry_count += 1;

    let ioapic = IoApicEntry {
        id: ioapic_id,
        addr: IOAPIC_ADDR,
    };
    entries.extend_from_slice(&ioapic.encode());
    entry_count += 1;

    for (irq, pin) in ISA_IRQ_ROUTES {
        let entry = IoInterruptEntry {
            interrupt_type: INTERRUPT_TYPE_INT,
            source_bus: ISA_BUS_ID,
            source_irq: irq,
            ioapic_id,
            ioapic_pin: pin,
        };
        entries.extend_from_slice(&entry.encode());
        entry_count += 1;
    }

    for (interrupt_type, lint) in [(INTERRUPT_TYPE_EXTINT, LINT0), (INTERRUPT_TYPE_NMI, LINT1)] {
        let entry = LocalInterruptEntry {
            interrupt_type,
            source_bus: ISA_BUS_ID,
            source_irq: 0,
            apic_id: ALL_LOCAL_APICS,
            lint,
        };
        entries.extend_from_slice(&entry.encode());
        entry_count += 1;
    }

    // Fits: the table is at most 1 KiB (checked against MAX_CPUS by the caller).
    #[allow(clippy::cast_possible_truncation)]
    let base_table_len = (CONFIG_HEADER_LEN + entries.len()) as u16;
    let header = ConfigTableHeader {
        base_table_len,
        entry_count,
        local_apic_addr: APIC_ADDR,
    };
    let floating_pointer = FloatingPointer {
        config_table_addr: CONFIG_TABLE_ADDR,
    };

    let mut table = Vec::with_capacity(FLOATING_POINTER_LEN + base_table_len as usize);
    table.extend_from_slice(&floating_pointer.encode());
    table.extend_from_slice(&header.encode());
    table.extend_from_slice(&entries);

    // The base table checksum covers the header and every entry.
    let base_table = &mut table[FLOATING_POINTER_LEN..];
    base_table[ConfigTableHeader::CHECKSUM_OFFSET] = checksum(base_table);
    table
}

/// The byte that makes `bytes` (which must hold 0 at the checksum's own
/// offset) sum to 0 modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// `s` as a fixed-size field: truncated to `N` bytes or padded with spaces.
fn space_padded<const N: usize>(s: &str) -> [u8; N] {
    let mut field = [b' '; N];
    let len = s.len().min(N);
    field[..len].copy_from_slice(&s.as_bytes()[..len]);
    field
}

/// MP floating pointer structure (MP spec 4.1).
struct FloatingPointer {
    /// Physical address of the configuration table.
    config_table_addr: u32,
}

impl FloatingPointer {
    fn encode(&self) -> [u8; FLOATING_POINTER_LEN] {
        let mut b = [0u8; FLOATING_POINTER_LEN];
        b[0..4].copy_from_slice(b"_MP_");
        b[4..8].copy_from_slice(&self.config_table_addr.to_le_bytes());
        // Length of this structure in 16-byte paragraphs.
        b[8] = 1;
        b[9] = MP_SPEC_REV;
        // b[10]: checksum, filled in below.
        // b[11]: feature byte 1 = 0, a configuration table is present.
        // b[12]: feature byte 2 = 0, IMCR absent: virtual wire mode.
        // b[13..16]: feature bytes 3..=5, reserved.
        b[10] = checksum(&b);
        b
    }
}

/// MP configuration table header (MP spec 4.2).
struct ConfigTableHeader {
    /// Length of the header plus all base table entries.
    base_table_len: u16,
    entry_count: u16,
    local_apic_addr: u32,
}

impl ConfigTableHeader {
    const CHECKSUM_OFFSET: usize = 7;

    /// Encodes the header with a zero checksum; the checksum covers the entries
    /// too, so it is filled in once the whole base table is assembled.
    fn encode(&self) -> [u8; CONFIG_HEADER_LEN] {
        let mut b = [0u8; CONFIG_HEADER_LEN];
        b[0..4].copy_from_slice(b"PCMP");
        b[4..6].copy_from_slice(&self.base_table_len.to_le_bytes());
        b[6] = MP_SPEC_REV;
        // b[7]: checksum.
        b[8..16].copy_from_slice(&space_padded::<8>(OEM_ID));
        b[16..28].copy_from_slice(&space_padded::<12>(PRODUCT_ID));
        // b[28..32]: OEM table pointer, b[32..34]: OEM table size: no OEM table.
        b[34..36].copy_from_slice(&self.entry_count.to_le_bytes());
        b[36..40].copy_from_slice(&self.local_apic_addr.to_le_bytes());
        // b[40..42]: extended table length, b[42]: extended table checksum,
        // b[43]: reserved. There is no extended table.
        b
    }
}

/// Processor entry (MP spec 4.3.1).
struct ProcessorEntry {
    apic_id: u8,
    bsp: bool,
}

impl ProcessorEntry {
    fn encode(&self) -> [u8; PROCESSOR_ENTRY_LEN] {
        let mut b = [0u8; PROCESSOR_ENTRY_LEN];
        b[0] = ENTRY_PROCESSOR;
        b[1] = self.apic_id;
        b[2] = LOCAL_APIC_VERSION;
        b[3] = CPU_FLAG_ENABLED | if self.bsp { CPU_FLAG_BSP } else { 0 };
        b[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        b[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        // b[12..20]: reserved.
        b
    }
}

/// Bus entry (MP spec 4.3.2).
struct BusEntry {
    bus_id: u8,
}

impl BusEntry {
    fn encode(&self) -> [u8; BUS_ENTRY_LEN] {
        let mut b = [0u8; BUS_ENTRY_LEN];
        b[0] = ENTRY_BUS;
        b[1] = self.bus_id;
        b[2..8].copy_from_slice(&ISA_BUS_TYPE);
        b
    }
}

/// I/O APIC entry (MP spec 4.3.3).
struct IoApicEntry {
    id: u8,
    addr: u32,
}

impl IoApicEntry {
    fn encode(&self) -> [u8; IOAPIC_ENTRY_LEN] {
        let mut b = [0u8; IOAPIC_ENTRY_LEN];
        b[0] = ENTRY_IOAPIC;
        b[1] = self.id;
        b[2] = IOAPIC_VERSION;
        b[3] = IOAPIC_FLAG_ENABLED;
        b[4..8].copy_from_slice(&self.addr.to_le_bytes());
        b
    }
}

/// I/O interrupt assignment entry (MP spec 4.3.4).
struct IoInterruptEntry {
    interrupt_type: u8,
    source_bus: u8,
    source_irq: u8,
    ioapic_id: u8,
    ioapic_pin: u8,
}

impl IoInterruptEntry {
    fn encode(&self) -> [u8; IO_INTERRUPT_ENTRY_LEN] {
        let mut b = [0u8; IO_INTERRUPT_ENTRY_LEN];
        b[0] = ENTRY_IO_INTERRUPT;
        b[1] = self.interrupt_type;
        b[2..4].copy_from_slice(&INTERRUPT_FLAGS_CONFORMING.to_le_bytes());
        b[4] = self.source_bus;
        b[5] = self.source_irq;
        b[6] = self.ioapic_id;
        b[7] = self.ioapic_pin;
        b
    }
}

/// Local interrupt assignment entry (MP spec 4.3.5).
struct LocalInterruptEntry {
    interrupt_type: u8,
    source_bus: u8,
    source_irq: u8,
    apic_id: u8,
    lint: u8,
}

impl LocalInterruptEntry {
    fn encode(&self) -> [u8; LOCAL_INTERRUPT_ENTRY_LEN] {
        let mut b = [0u8; LOCAL_INTERRUPT_ENTRY_LEN];
        b[0] = ENTRY_LOCAL_INTERRUPT;
        b[1] = self.interrupt_type;
        b[2..4].copy_from_slice(&INTERRUPT_FLAGS_CONFORMING.to_le_bytes());
        b[4] = self.source_bus;
        b[5] = self.source_irq;
        b[6] = self.apic_id;
        b[7] = self.lint;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn guest_memory(base: u64, size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(base), size)]).expect("guest memory")
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest memory");
        buf
    }

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn le16(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    /// The table as a guest would see it, parsed with the sizes of the MP
    /// specification (written out again here, not taken from the encoder).
    struct ParsedTable {
        header: Vec<u8>,
        processors: Vec<[u8; 20]>,
        buses: Vec<[u8; 8]>,
        ioapics: Vec<[u8; 8]>,
        io_interrupts: Vec<[u8; 8]>,
        local_interrupts: Vec<[u8; 8]>,
    }

    /// Finds the table through the floating pointer at `MPTABLE_START`, checks
    /// both checksums and splits the base table into its entries.
    fn parse(mem: &GuestMemoryMmap) -> ParsedTable {
        let mpf = read(mem, MPTABLE_START, 16);
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(byte_sum(&mpf), 0, "floating pointer checksum");
        assert_eq!(mpf[8], 1, "floating pointer length in paragraphs");
        assert_eq!(mpf[9], 4, "spec revision");
        assert_eq!(&mpf[11..16], &[0u8; 5], "feature bytes");
        // Linux only accepts a 16-byte aligned floating pointer.
        assert_eq!(MPTABLE_START % 16, 0);

        let config_addr = u64::from(le32(&mpf, 4));
        assert_eq!(config_addr, MPTABLE_START + 16);
        let header = read(mem, config_addr, 44);
        assert_eq!(&header[0..4], b"PCMP");
        assert_eq!(header[6], 4, "spec revision");
        let base_len = usize::from(le16(&header, 4));
        assert!(
            config_addr + base_len as u64 <= 0xa0000,
            "table ends in EBDA"
        );

        let base = read(mem, config_addr, base_len);
        assert_eq!(byte_sum(&base), 0, "base table checksum");

        let mut parsed = ParsedTable {
            header: header.clone(),
            processors: Vec::new(),
            buses: Vec::new(),
            ioapics: Vec::new(),
            io_interrupts: Vec::new(),
            local_interrupts: Vec::new(),
        };
        let mut off = 44;
        let mut count = 0;
        while off < base_len {
            let len = match base[off] {
                0 => 20,
                1..=4 => 8,
                t => panic!("unknown entry type {t} at offset {off}"),
            };
            assert!(off + len <= base_len, "entry overruns the base table");
            let entry = &base[off..off + len];
            match entry[0] {
                0 => parsed.processors.push(entry.try_into().unwrap()),
                1 => parsed.buses.push(entry.try_into().unwrap()),
                2 => parsed.ioapics.push(entry.try_into().unwrap()),
                3 => parsed.io_interrupts.push(entry.try_into().unwrap()),
                _ => parsed.local_interrupts.push(entry.try_into().unwrap()),
            }
            off += len;
            count += 1;
        }
        assert_eq!(off, base_len, "entries fill the base table exactly");
        assert_eq!(usize::from(le16(&header, 34)), count, "header entry count");
        parsed
    }

    fn check_table(num_cpus: u8) {
        let mem = guest_memory(0, MIB);
        setup_mptable(&mem, num_cpus).expect("setup_mptable");
        let t = parse(&mem);
        let n = usize::from(num_cpus);

        // Header.
        assert_eq!(&t.header[8..16], b"AIVMM   ");
        assert_eq!(&t.header[16..28], b"AIVMM-MICROV");
        assert_eq!(le32(&t.header, 36), 0xfee0_0000);
        assert_eq!(le16(&t.header, 40), 0, "no extended table");
        // 1 per CPU + 1 bus + 1 IOAPIC + 15 ISA IRQs (IRQ 2 has none) + 2 LINT.
        assert_eq!(usize::from(le16(&t.header, 34)), n + 1 + 1 + 15 + 2);
        let base_len = u64::from(le16(&t.header, 4));
        assert_eq!(16 + base_len, mptable_size(num_cpus));
        assert_eq!(mptable_size(num_cpus), 212 + 20 * n as u64);

        // Processors: APIC id i, enabled, only CPU 0 is the BSP.
        assert_eq!(t.processors.len(), n);
        for (i, p) in t.processors.iter().enumerate() {
            assert_eq!(usize::from(p[1]), i, "APIC id");
            assert_eq!(p[2], 0x14, "local APIC version");
            assert_eq!(p[3] & 1, 1, "CPU {i} enabled");
            assert_eq!(p[3] & 2 != 0, i == 0, "BSP flag of CPU {i}");
            assert_eq!((le32(p, 4) >> 8) & 0xf, 6, "CPU family");
            assert_eq!(le32(p, 8), 0x201, "FPU | APIC");
            assert_eq!(&p[12..20], &[0u8; 8]);
        }

        // One ISA bus.
        assert_eq!(t.buses.len(), 1);
        assert_eq!(t.buses[0][1], 0);
        assert_eq!(&t.buses[0][2..8], b"ISA   ");

        // One enabled I/O APIC whose id follows the CPUs'.
        assert_eq!(t.ioapics.len(), 1);
        let ioapic = t.ioapics[0];
        assert_eq!(ioapic[1], num_cpus, "I/O APIC id");
        assert_eq!(ioapic[2], 0x11, "I/O APIC version");
        assert_eq!(ioapic[3] & 1, 1, "I/O APIC enabled");
        assert_eq!(le32(&ioapic, 4), 0xfec0_0000);

        // ISA IRQs: conforming INT on ISA bus 0 to this I/O APIC.
        let mut pin_of_irq = [None; 16];
        let mut irq_of_pin = [None; 16];
        for e in &t.io_interrupts {
            assert_eq!(e[1], 0, "INT type");
            assert_eq!(le16(e, 2), 0, "conforming polarity and trigger");
            assert_eq!(e[4], 0, "source bus");
            assert_eq!(e[6], num_cpus, "destination I/O APIC id");
            let (irq, pin) = (usize::from(e[5]), usize::from(e[7]));
            assert!(pin_of_irq[irq].replace(pin).is_none(), "IRQ {irq} twice");
            assert!(irq_of_pin[pin].replace(irq).is_none(), "pin {pin} twice");
        }
        assert_eq!(irq_of_pin[2], None, "pin 2 unused");
        assert_eq!(pin_of_irq[2], None, "cascade IRQ 2 not routed");
        for irq in (0..16).filter(|&irq| irq != 2) {
            assert_eq!(pin_of_irq[irq], Some(irq), "IRQ {irq}");
        }

        // ExtINT on LINT0 and NMI on LINT1 of every local APIC.
        assert_eq!(t.local_interrupts.len(), 2);
        let lint: Vec<(u8, u8, u8)> = t
            .local_interrupts
            .iter()
            .map(|e| {
                assert_eq!(le16(e, 2), 0);
                (e[1], e[6], e[7])
            })
            .collect();
        assert_eq!(lint, vec![(3, 0xff, 0), (1, 0xff, 1)]);
    }

    #[test]
    fn one_cpu() {
        check_table(1);
    }

    #[test]
    fn two_cpus() {
        check_table(2);
    }

    #[test]
    fn max_cpus() {
        // (1 KiB - 212 fixed bytes) / 20 bytes per processor entry.
        assert_eq!(MAX_CPUS, 40);
        check_table(MAX_CPUS);
    }

    #[test]
    fn max_cpus_fill_but_do_not_overrun_the_ebda() {
        assert!(MPTABLE_START + mptable_size(MAX_CPUS) <= 0xa0000);
        assert!(MPTABLE_START + mptable_size(MAX_CPUS + 1) > 0xa0000);
    }

    #[test]
    fn table_does_not_touch_memory_past_its_end() {
        let mem = guest_memory(0, MIB);
        let end = MPTABLE_START + mptable_size(3);
        mem.write_slice(&[0xaa; 64], GuestAddress(end)).unwrap();
        setup_mptable(&mem, 3).unwrap();
        assert_eq!(read(&mem, end, 64), vec![0xaa; 64]);
    }

    #[test]
    fn zero_cpus_is_an_error() {
        let mem = guest_memory(0, MIB);
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
        assert_eq!(read(&mem, MPTABLE_START, 16), vec![0; 16]);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem = guest_memory(0, MIB);
        for n in [MAX_CPUS + 1, 254, 255] {
            match setup_mptable(&mem, n) {
                Err(MptableError::TooManyCpus { requested, max }) => {
                    assert_eq!(requested, n);
                    assert_eq!(max, MAX_CPUS);
                }
                other => panic!("{n} CPUs: {other:?}"),
            }
        }
        assert_eq!(read(&mem, MPTABLE_START, 16), vec![0; 16]);
    }

    #[test]
    fn guest_memory_below_the_ebda_is_an_error() {
        let mem = guest_memory(0, 512 << 10);
        match setup_mptable(&mem, 1) {
            Err(MptableError::NotInGuestMemory { addr, len }) => {
                assert_eq!(addr, MPTABLE_START);
                assert_eq!(len, mptable_size(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn guest_memory_ending_inside_the_table_is_an_error_and_writes_nothing() {
        // RAM ends 64 bytes into the table.
        let mem = guest_memory(0, usize::try_from(MPTABLE_START).unwrap() + 64);
        assert!(matches!(
            setup_mptable(&mem, 2),
            Err(MptableError::NotInGuestMemory { .. })
        ));
        assert_eq!(read(&mem, MPTABLE_START, 64), vec![0; 64]);
    }

    #[test]
    fn guest_memory_above_the_ebda_is_an_error() {
        let mem = guest_memory(1 << 20, MIB);
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::NotInGuestMemory { .. })
        ));
    }

    #[test]
    fn checksum_makes_bytes_sum_to_zero() {
        let mut bytes = [0x12, 0xff, 0x80, 0x00, 0x7f];
        bytes[3] = checksum(&bytes);
        assert_eq!(byte_sum(&bytes), 0);
    }

    #[test]
    fn space_padded_pads_and_truncates() {
        assert_eq!(&space_padded::<8>("AIVMM"), b"AIVMM   ");
        assert_eq!(&space_padded::<4>("AIVMM"), b"AIVM");
    }

    #[test]
    fn error_messages_name_the_value() {
        let e = MptableError::TooManyCpus {
            requested: 200,
            max: MAX_CPUS,
        };
        assert_eq!(
            e.to_string(),
            format!("Too many vCPUs for the MP table: 200 (maximum {MAX_CPUS})")
        );
        let e = MptableError::NotInGuestMemory {
            addr: MPTABLE_START,
            len: 232,
        };
        assert_eq!(
            e.to_string(),
            "MP table at 0x9fc00 (232 bytes) does not fit in guest memory"
        );
    }
}
