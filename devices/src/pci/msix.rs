//! MSI-X: the capability, the vector table and the pending-bit array (PCI Local Bus 3.0 §6.8.2).
//!
//! [`Msix`] keeps the guest-visible state and tells the VMM, through [`MsiVectors`], which
//! message each vector delivers and whether it is deliverable at all (MSI-X enabled,
//! function not masked, vector not masked). The VMM turns that into KVM GSI routes and
//! irqfds, so a device (or a vhost-user backend) raises a vector by writing its eventfd
//! and the interrupt never passes through the VMM. While a vector is undeliverable its
//! eventfd is detached from KVM and keeps its count: the interrupt is delivered when the
//! guest unmasks it, which is the pending-bit semantics the guest expects.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Capability ID of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Bytes of one table entry: address low, address high, data, vector control.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Length of the capability structure in config space.
pub const MSIX_CAP_LEN: usize = 12;

/// Message control: MSI-X enable.
const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: what the device writes where to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (LAPIC range on x86).
    pub addr: u64,
    /// Message data (vector and delivery mode on x86).
    pub data: u32,
}

/// The VMM's side of a function's interrupt vectors.
pub trait MsiVectors: Send + Sync {
    /// Number of vectors.
    fn len(&self) -> usize;

    /// Whether there are no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The eventfd that raises `vector`; `None` if out of range.
    fn notifier(&self, vector: u16) -> Option<&EventFd>;

    /// Routes `vector` to `message`, or detaches it (`None`: masked or disabled).
    fn update(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TableEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl TableEntry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Where the table and the PBA live: BAR index and offset (8-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// BAR holding the vector table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
}

impl MsixLayout {
    /// `(offset, len)` of the table of `size` vectors in its BAR.
    pub fn table_range(&self, size: u16) -> (u64, u64) {
        (
            u64::from(self.table_offset),
            u64::from(size) * MSIX_TABLE_ENTRY_SIZE,
        )
    }

    /// `(offset, len)` of the PBA of `size` vectors in its BAR: one bit per vector, in
    /// whole qwords.
    pub fn pba_range(&self, size: u16) -> (u64, u64) {
        (u64::from(self.pba_offset), u64::from(size).div_ceil(64) * 8)
    }

    /// The capability bytes for a table of `size` (≥ 1) vectors: ID, next (0), control
    /// (table size), table and PBA locations.
    pub fn capability(&self, size: u16) -> [u8; MSIX_CAP_LEN] {
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = PCI_CAP_ID_MSIX;
        cap[2..4].copy_from_slice(&(size.saturating_sub(1) & 0x7ff).to_le_bytes());
        let table = self.table_offset | u32::from(self.table_bar & 7);
        cap[4..8].copy_from_slice(&table.to_le_bytes());
        let pba = self.pba_offset | u32::from(self.pba_bar & 7);
        cap[8..12].copy_from_slice(&pba.to_le_bytes());
        cap
    }
}

/// The MSI-X state of one function.
pub struct Msix {
    table: Vec<TableEntry>,
    /// `table.len()`, which is at most [`MAX_MSIX_VECTORS`].
    num_vectors: u16,
    layout: MsixLayout,
    enabled: bool,
    function_masked: bool,
    vectors: Arc<dyn MsiVectors>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl Msix {
    /// MSI-X with one table entry per vector of `vectors` (at most
    /// [`MAX_MSIX_VECTORS`]), every vector masked, MSI-X disabled — the reset state.
    pub fn new(vectors: Arc<dyn MsiVectors>, layout: MsixLayout) -> Self {
        // More vectors than a u16 holds are more than the maximum as well.
        let count = u16::try_from(vectors.len())
            .unwrap_or(MAX_MSIX_VECTORS)
            .clamp(1, MAX_MSIX_VECTORS);
        Self {
            table: vec![
                TableEntry {
                    control: VECTOR_MASKED,
                    ..TableEntry::default()
                };
                usize::from(count)
            ],
            num_vectors: count,
            layout,
            enabled: false,
            function_masked: false,
            vectors,
        }
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.num_vectors
    }

    /// Bytes the table takes in its BAR.
    pub fn table_len(&self) -> u64 {
        self.layout.table_range(self.num_vectors()).1
    }

    /// Bytes the PBA takes in its BAR (one bit per vector, in 64-bit words).
    pub fn pba_len(&self) -> u64 {
        self.layout.pba_range(self.num_vectors()).1
    }

    /// The capability bytes to add to config space (ID, next, control, table, PBA).
    pub fn capability(&self) -> [u8; MSIX_CAP_LEN] {
        self.layout.capability(self.num_vectors())
    }

    /// Write mask for the capability's first dword: only enable and function mask are
    /// writable (the table size is read-only).
    pub const CONTROL_WRITE_MASK: u32 = ((CTRL_ENABLE | CTRL_FUNCTION_MASK) as u32) << 16;

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The vector's eventfd (for a backend to write).
    pub fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.notifier(vector)
    }

    /// The vectors' owner (for handing eventfds to backends).
    pub fn vectors(&self) -> &Arc<dyn MsiVectors> {
        &self.vectors
    }

    /// Applies a new message control value (written by the guest to config space).
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CTRL_ENABLE != 0;
        let function_masked = control & CTRL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for vector in 0..self.num_vectors() {
            self.route(vector);
        }
    }

    /// Raises `vector` from inside the VMM (e.g. a config change). Drops it if out of range.
    pub fn trigger(&self, vector: u16) {
        if let Some(evt) = self.vectors.notifier(vector) {
            if let Err(e) = evt.write(1) {
                log::warn!("cannot raise MSI-X vector {vector}: {e}");
            }
        }
    }

    /// Guest read of the table at `offset`. Only aligned 4- and 8-byte accesses inside
    /// the table are defined; anything else reads all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.table[usize::from(entry)];
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        match data.len() {
            4 => data.copy_from_slice(&words[field].to_le_bytes()),
            8 => {
                data[..4].copy_from_slice(&words[field].to_le_bytes());
                data[4..].copy_from_slice(&words[field + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// Guest write of the table at `offset`; malformed accesses are dropped.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            log::debug!(
                "ignoring MSI-X table write of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        };
        let mut words = [0u32; 2];
        for (word, chunk) in words.iter_mut().zip(data.chunks(4)) {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            *word = u32::from_le_bytes(b);
        }
        let index = usize::from(entry);
        let before = self.table[index];
        for (i, word) in words.iter().take(data.len() / 4).enumerate() {
            let e = &mut self.table[index];
            match field + i {
                0 => e.addr_lo = *word,
                1 => e.addr_hi = *word,
                2 => e.data = *word,
                // Only the mask bit of vector control is defined; the rest is reserved.
                _ => e.control = *word & VECTOR_MASKED,
            }
        }
        let after = self.table[index];
        // The spec lets software change a masked entry's message freely; a change to an
        // unmasked entry takes effect now as well (Linux does that when it migrates IRQs).
        if after != before {
            self.route(entry);
        }
    }

    /// Guest read of the PBA. Pending state lives in the detached eventfds, which the
    /// guest cannot observe here: the PBA reads as zero, as QEMU's and Cloud
    /// Hypervisor's do for irqfd-backed vectors when nothing is pending in userspace.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let end = u64::try_from(data.len())
            .ok()
            .and_then(|len| offset.checked_add(len));
        if end.is_some_and(|end| end <= self.pba_len()) {
            data.fill(0);
        } else {
            data.fill(0xff);
        }
    }

    /// Resets to the power-on state: disabled, every vector masked and detached.
    pub fn reset(&mut self) {
        for entry in &mut self.table {
            *entry = TableEntry {
                control: VECTOR_MASKED,
                ..TableEntry::default()
            };
        }
        self.enabled = false;
        self.function_masked = false;
        for vector in 0..self.num_vectors() {
            self.route(vector);
        }
    }

    /// Entry index and first 32-bit field of an access, if well-formed.
    fn locate(&self, offset: u64, len: usize) -> Option<(u16, usize)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        if offset.checked_add(len as u64)? > self.table_len() {
            return None;
        }
        // Inside a table of at most `MAX_MSIX_VECTORS` entries, so the index fits.
        let entry = u16::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        let field = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        Some((entry, field))
    }

    fn route(&self, vector: u16) {
        let Some(entry) = self.table.get(usize::from(vector)) else {
            return;
        };
        let deliverable = self.enabled && !self.function_masked && !entry.masked();
        let message = deliverable.then(|| entry.message());
        if let Err(e) = self.vectors.update(vector, message) {
            log::warn!("cannot route MSI-X vector {vector}: {e}");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every update, like the VMM's router would apply them.
    pub(crate) struct RecordingVectors {
        pub(crate) fds: Vec<EventFd>,
        pub(crate) routes: Mutex<Vec<Option<MsiMessage>>>,
    }

    impl RecordingVectors {
        pub(crate) fn new(n: usize) -> Arc<Self> {
            Arc::new(Self {
                fds: (0..n)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                routes: Mutex::new(vec![None; n]),
            })
        }
        pub(crate) fn route(&self, v: usize) -> Option<MsiMessage> {
            self.routes.lock().unwrap()[v]
        }
    }

    impl MsiVectors for RecordingVectors {
        fn len(&self) -> usize {
            self.fds.len()
        }
        fn notifier(&self, vector: u16) -> Option<&EventFd> {
            self.fds.get(usize::from(vector))
        }
        fn update(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
            self.routes.lock().unwrap()[usize::from(vector)] = message;
            Ok(())
        }
    }

    const LAYOUT: MsixLayout = MsixLayout {
        table_bar: 0,
        table_offset: 0x4000,
        pba_bar: 0,
        pba_offset: 0x5000,
    };

    fn write32(m: &mut Msix, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }

    #[test]
    fn capability_encodes_size_and_locations() {
        let m = Msix::new(RecordingVectors::new(3), LAYOUT);
        let cap = m.capability();
        assert_eq!(cap[0], PCI_CAP_ID_MSIX);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2);
        assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(cap[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(m.table_len(), 48);
        assert_eq!(m.pba_len(), 8);
    }

    #[test]
    fn vector_is_routed_only_when_enabled_unmasked_and_function_unmasked() {
        let vecs = RecordingVectors::new(2);
        let mut m = Msix::new(vecs.clone(), LAYOUT);
        write32(&mut m, 16, 0xfee0_0000);
        write32(&mut m, 20, 0);
        write32(&mut m, 24, 0x4041);
        assert_eq!(vecs.route(1), None, "disabled and masked");
        write32(&mut m, 28, 0);
        assert_eq!(vecs.route(1), None, "still disabled");
        m.set_control(CTRL_ENABLE);
        let msg = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x4041,
        };
        assert_eq!(vecs.route(1), Some(msg));
        assert_eq!(vecs.route(0), None, "vector 0 stays masked");
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert_eq!(vecs.route(1), None, "function mask");
        m.set_control(CTRL_ENABLE);
        assert_eq!(vecs.route(1), Some(msg));
        write32(&mut m, 28, 1);
        assert_eq!(vecs.route(1), None, "vector mask");
        m.reset();
        assert!(!m.enabled());
        let mut d = [0u8; 4];
        m.read_table(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "reset masks every vector");
    }

    #[test]
    fn table_reads_back_and_rejects_bad_accesses() {
        let mut m = Msix::new(RecordingVectors::new(2), LAYOUT);
        m.write_table(0, &0x1_fee0_1000u64.to_le_bytes());
        let mut q = [0u8; 8];
        m.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        // Reserved control bits do not stick.
        write32(&mut m, 12, 0xffff_fff0);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        // Unaligned, odd-sized and out-of-table accesses.
        for (off, len) in [(2u64, 4usize), (4, 8), (0, 2), (32, 4), (u64::MAX - 3, 4)] {
            let mut buf = vec![0u8; len];
            m.read_table(off, &mut buf);
            assert!(buf.iter().all(|&b| b == 0xff), "read at {off:#x}/{len}");
            m.write_table(off, &vec![0u8; len]);
        }
        m.read_table(0, &mut q);
        assert_eq!(
            u64::from_le_bytes(q),
            0x1_fee0_1000,
            "bad writes change nothing"
        );
        let mut p = [1u8; 8];
        m.read_pba(0, &mut p);
        assert_eq!(p, [0; 8]);
        m.read_pba(8, &mut p);
        assert_eq!(p, [0xff; 8]);
        p = [1u8; 8];
        m.read_pba(u64::MAX - 3, &mut p);
        assert_eq!(p, [0xff; 8], "an offset that overflows reads as unbacked");
    }

    #[test]
    fn trigger_writes_the_vector_eventfd() {
        let vecs = RecordingVectors::new(2);
        let m = Msix::new(vecs.clone(), LAYOUT);
        m.trigger(1);
        m.trigger(7);
        assert_eq!(vecs.fds[1].read().unwrap(), 1);
        assert!(vecs.fds[0].read().is_err(), "nothing on vector 0");
    }
}
