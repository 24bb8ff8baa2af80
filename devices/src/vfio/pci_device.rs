//! [`VfioPciDevice`]: a host PCI function passed to the guest, as a [`PciDevice`] on the
//! VMM's PCI root.
//!
//! Config space is virtual ([`VirtualConfig`]). Memory BARs are mmapped from the device and
//! mapped into the guest through the VMM's [`GuestMapper`] wherever the BAR is decoded, so
//! guest accesses go straight to the device; what cannot be mapped (port I/O BARs, pages
//! the host will not mmap) traps and is forwarded to the VFIO region, except the MSI-X
//! table and PBA, which are emulated ([`Msix`]). Interrupts: the host's vfio-pci signals
//! one eventfd per vector, which the VMM turns into guest interrupts; this type switches
//! VFIO to the mechanism the guest enabled (INTx, MSI or MSI-X) and keeps each vector's
//! route current. The device is reset when dropped.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::pci::config_space::NUM_BARS;
use crate::pci::{BarKind, MsiMessage, MsiVectors, Msix, PciBarRange, PciConfigError, PciDevice};

use super::backend::{IrqKind, VfioBackend};
use super::bar_map::{host_page_size, mappable_areas, BarMmap, GuestMapper};
use super::config::{ConfigTarget, VirtualBar, VirtualConfig, VirtualConfigError};
use super::interrupts::{InterruptAllocator, IntxLine};
use super::msi::MsiState;

/// Offset of the Interrupt Pin byte in config space.
const INTERRUPT_PIN_OFFSET: u64 = 0x3d;

#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error(transparent)]
    Config(#[from] VirtualConfigError),
    #[error("cannot get {what} from the VMM: {source}")]
    Interrupts {
        what: &'static str,
        source: io::Error,
    },
    #[error("the VMM gave {got} {what}, the device needs {needed}")]
    TooFewVectors {
        what: &'static str,
        got: usize,
        needed: u16,
    },
    #[error("cannot enable INTx of the device: {0}")]
    EnableIntx(io::Error),
}

/// Which interrupt mechanism is live on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IrqMode {
    Off,
    Intx,
    Msi(u16),
    Msix,
}

/// Asks the VMM for `count` vectors and checks it gave as many, each with an eventfd.
fn allocate_vectors(
    irqs: &mut dyn InterruptAllocator,
    what: &'static str,
    count: u16,
) -> Result<Arc<dyn MsiVectors>, VfioPciError> {
    let vectors = irqs
        .msi_vectors(count)
        .map_err(|source| VfioPciError::Interrupts { what, source })?;
    if vectors.len() < usize::from(count) || (0..count).any(|v| vectors.notifier(v).is_none()) {
        return Err(VfioPciError::TooFewVectors {
            what,
            got: vectors.len(),
            needed: count,
        });
    }
    Ok(vectors)
}

/// The MSI vectors plus what was last routed on each, so a guest rewriting the same
/// values costs no routing update (each is a KVM routing table rewrite).
struct MsiRoutes {
    vectors: Arc<dyn MsiVectors>,
    /// Vectors usable: what the device and the VMM both provide.
    count: u16,
    routed: Vec<Option<Option<MsiMessage>>>,
}

impl MsiRoutes {
    /// Routes `vector` to `message`, or detaches it (`None`: masked or MSI disabled).
    fn set(&mut self, vector: u16, message: Option<MsiMessage>) {
        let Some(slot) = self.routed.get_mut(usize::from(vector)) else {
            return;
        };
        if *slot == Some(message) {
            return;
        }
        match self.vectors.update(vector, message) {
            Ok(()) => *slot = Some(message),
            Err(e) => log::error!("cannot route MSI vector {vector} to {message:x?}: {e}"),
        }
    }
}

/// Eventfds `0..count` of `vectors`.
fn notifiers(vectors: &dyn MsiVectors, count: u16) -> Vec<&EventFd> {
    (0..count).filter_map(|v| vectors.notifier(v)).collect()
}

/// A passed-through PCI function.
pub struct VfioPciDevice {
    backend: Box<dyn VfioBackend>,
    config: VirtualConfig,
    intx: Option<IntxLine>,
    msi: Option<MsiRoutes>,
    msix: Option<Msix>,
    /// MSI-X vectors VFIO can signal (it may offer fewer than the table has).
    msix_live: u16,
    mode: IrqMode,
    mmaps: Vec<BarMmap>,
    mapper: Option<Box<dyn GuestMapper>>,
    /// Where each BAR's mmaps are mapped into the guest now.
    mapped_at: [Option<u64>; NUM_BARS],
    shut_down: bool,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .field("mmaps", &self.mmaps)
            .finish_non_exhaustive()
    }
}

impl VfioPciDevice {
    /// Builds the guest's view of the device behind `backend`, gets its interrupt
    /// resources from `irqs`, mmaps what can be mapped, and enables INTx if the device and
    /// the VMM have it (the mode a guest starts in).
    pub fn new(
        backend: Box<dyn VfioBackend>,
        irqs: &mut dyn InterruptAllocator,
    ) -> Result<Self, VfioPciError> {
        let mut pin = [0u8];
        backend.config_read(INTERRUPT_PIN_OFFSET, &mut pin);
        let intx = if backend.irq_count(IrqKind::Intx) > 0 && (1..=4).contains(&pin[0]) {
            irqs.intx_line(pin[0])
                .map_err(|source| VfioPciError::Interrupts {
                    what: "an INTx line",
                    source,
                })?
        } else {
            None
        };
        let config = VirtualConfig::new(&*backend, intx.as_ref().map(|l| l.gsi))?;

        let msi_count = config.msi().map_or(0, |c| {
            c.layout
                .max_vectors
                .min(clamp_u16(backend.irq_count(IrqKind::Msi)))
        });
        let msi = if msi_count > 0 {
            let vectors = allocate_vectors(irqs, "MSI vectors", msi_count)?;
            Some(MsiRoutes {
                vectors,
                count: msi_count,
                // The VMM hands out vectors detached.
                routed: vec![Some(None); usize::from(msi_count)],
            })
        } else {
            None
        };
        let msix_live = config.msix().map_or(0, |c| {
            c.table_size
                .min(clamp_u16(backend.irq_count(IrqKind::Msix)))
        });
        let msix = match config.msix() {
            Some(cap) if msix_live > 0 => {
                // One vector per table entry, so the guest's table matches the device's.
                let vectors = allocate_vectors(irqs, "MSI-X vectors", cap.table_size)?;
                Some(Msix::new(vectors, cap.layout))
            }
            _ => None,
        };

        let mmaps = map_bars(&*backend, &config);

        let mut dev = VfioPciDevice {
            backend,
            config,
            intx,
            msi,
            msix,
            msix_live,
            mode: IrqMode::Off,
            mmaps,
            mapper: None,
            mapped_at: [None; NUM_BARS],
            shut_down: false,
        };
        if dev.intx.is_some() {
            dev.enable_intx().map_err(VfioPciError::EnableIntx)?;
            dev.mode = IrqMode::Intx;
        }
        Ok(dev)
    }

    /// The guest IRQ (GSI) of the device's INTx line, if it has one.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx.as_ref().map(|l| l.gsi)
    }

    /// The emulated BARs `(index, bar)`, for the VMM to allocate guest addresses
    /// (64-bit and large BARs in the high MMIO window).
    pub fn bar_layout(&self) -> Vec<(usize, VirtualBar)> {
        (0..NUM_BARS)
            .filter_map(|i| self.config.bar(i).map(|b| (i, b)))
            .collect()
    }

    /// Places BAR `index` at `addr` before the guest runs, as firmware would.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciConfigError> {
        self.config.set_bar_address(index, addr)?;
        self.sync_guest_mappings();
        Ok(())
    }

    /// The mmapped parts of memory BARs.
    pub fn mmaps(&self) -> &[BarMmap] {
        &self.mmaps
    }

    /// Gives the device the VMM's mapper: from now on every decoded BAR's mmapped parts
    /// are mapped into the guest, and moved or removed when the guest moves the BAR or
    /// turns decoding off (the host kernel revokes BAR mappings while decoding is off).
    pub fn attach_mapper(&mut self, mapper: Box<dyn GuestMapper>) {
        if self.shut_down {
            return;
        }
        self.mapper = Some(mapper);
        self.mapped_at = [None; NUM_BARS];
        self.sync_guest_mappings();
    }

    /// Brings the guest mappings in line with where the BARs decode now.
    fn sync_guest_mappings(&mut self) {
        let Some(mapper) = self.mapper.as_mut() else {
            return;
        };
        let decoded = self.config.decoded_addresses();
        for (bar, &at) in decoded.iter().enumerate() {
            if at == self.mapped_at[bar] {
                continue;
            }
            for m in self.mmaps.iter_mut().filter(|m| m.bar == bar) {
                if let Some(handle) = m.guest.take() {
                    if let Err(e) = mapper.unmap(handle) {
                        log::error!(
                            "cannot unmap BAR {bar} offset {:#x} from the guest: {e}",
                            m.offset
                        );
                    }
                }
                let Some(gpa) = at.and_then(|a| a.checked_add(m.offset)) else {
                    continue;
                };
                // SAFETY: the mmap is owned by `self.mmaps` and stays mapped until this
                // device unmaps it from the guest (here, or in `Drop` before the mmaps go).
                match unsafe { mapper.map(gpa, m.host_addr(), m.len()) } {
                    Ok(handle) => m.guest = Some(handle),
                    Err(e) => log::warn!(
                        "cannot map BAR {bar} offset {:#x} at guest {gpa:#x}, accesses trap: {e}",
                        m.offset
                    ),
                }
            }
            self.mapped_at[bar] = at;
        }
    }

    /// Takes the device out of the guest: BAR mappings removed and unmapped, interrupts
    /// off, device reset. Done when the VM stops (and on drop); afterwards BAR accesses
    /// only trap. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        // Guest mappings go before the mmaps they point into.
        if let Some(mapper) = self.mapper.as_mut() {
            for m in &mut self.mmaps {
                if let Some(handle) = m.guest.take() {
                    if let Err(e) = mapper.unmap(handle) {
                        log::error!("cannot unmap BAR {} from the guest: {e}", m.bar);
                    }
                }
            }
        }
        self.mapper = None;
        // The mmaps hold the device file open: they go before the device is closed, or
        // the host refuses to release its VFIO group.
        self.mmaps.clear();
        self.set_mode(IrqMode::Off);
        self.backend.reset();
    }

    fn enable_intx(&self) -> io::Result<()> {
        let Some(line) = &self.intx else {
            return Ok(());
        };
        self.backend.enable_irq(IrqKind::Intx, &[&line.trigger])?;
        self.backend.set_intx_resample(&line.resample)
    }

    /// Switches the live interrupt mechanism: the current one is torn down first (VFIO
    /// accepts one at a time). On failure the device is left with interrupts off.
    fn set_mode(&mut self, new: IrqMode) {
        if self.mode == new {
            return;
        }
        let off = match self.mode {
            IrqMode::Off => Ok(()),
            IrqMode::Intx => self.backend.disable_irq(IrqKind::Intx),
            IrqMode::Msi(_) => self.backend.disable_irq(IrqKind::Msi),
            IrqMode::Msix => self.backend.disable_irq(IrqKind::Msix),
        };
        if let Err(e) = off {
            log::warn!("cannot disable {:?} interrupts: {e}", self.mode);
        }
        self.mode = IrqMode::Off;
        let on = match new {
            IrqMode::Off => Ok(()),
            IrqMode::Intx => self.enable_intx(),
            IrqMode::Msi(n) => match &self.msi {
                Some(r) => self
                    .backend
                    .enable_irq(IrqKind::Msi, &notifiers(&*r.vectors, n)),
                None => Err(io::Error::other("the device has no MSI vectors")),
            },
            IrqMode::Msix => match &self.msix {
                Some(m) => self
                    .backend
                    .enable_irq(IrqKind::Msix, &notifiers(&**m.vectors(), self.msix_live)),
                None => Err(io::Error::other("the device has no MSI-X vectors")),
            },
        };
        match on {
            Ok(()) => self.mode = new,
            Err(e) => log::error!("cannot enable {new:?} interrupts: {e}"),
        }
    }

    /// INTx when the device has it, else nothing: the mode after MSI/MSI-X is disabled.
    fn fallback_mode(&self) -> IrqMode {
        if self.intx.is_some() {
            IrqMode::Intx
        } else {
            IrqMode::Off
        }
    }

    /// Acts on the guest's MSI capability after a write to it.
    fn update_msi(&mut self) {
        let (Some(cap), Some(routes)) = (self.config.msi(), self.msi.as_mut()) else {
            return;
        };
        let state = MsiState::read(&cap, self.config.shadow());
        if !state.enabled {
            for v in 0..routes.count {
                routes.set(v, None);
            }
            if matches!(self.mode, IrqMode::Msi(_)) {
                self.set_mode(self.fallback_mode());
            }
            return;
        }
        if self.mode == IrqMode::Msix {
            log::warn!("guest enabled MSI while MSI-X is on; ignored");
            return;
        }
        let count = state.count.min(routes.count);
        for v in 0..routes.count {
            let live = v < count && !state.masked(v);
            routes.set(v, live.then(|| state.message(v)));
        }
        self.set_mode(IrqMode::Msi(count));
    }

    /// Acts on the guest's MSI-X Message Control after a write to it.
    fn update_msix(&mut self) {
        let (Some(cap), Some(msix)) = (self.config.msix(), self.msix.as_mut()) else {
            return;
        };
        let control = (self.config.shadow().read_reg(cap.offset / 4) >> 16) as u16;
        msix.set_control(control);
        if msix.enabled() {
            self.set_mode(IrqMode::Msix);
        } else if self.mode == IrqMode::Msix {
            self.set_mode(self.fallback_mode());
        }
    }

    /// Where the MSI-X table and the PBA are: (table, PBA).
    /// Routes a guest access of `len` bytes at `offset` of BAR `bar` (offset and length
    /// are the guest's: checked against the BAR here).
    fn route(&self, bar: usize, offset: u64, len: usize) -> BarTarget {
        let Some(vbar) = self.config.bar(bar) else {
            return BarTarget::Nothing;
        };
        let len = len as u64;
        if offset.checked_add(len).is_none_or(|end| end > vbar.size) {
            return BarTarget::Nothing;
        }
        if let Some((table, pba)) = self.msix_ranges() {
            // An access straddling the start of the table or PBA goes nowhere.
            if table.hit(bar, offset, len) {
                return offset
                    .checked_sub(table.offset)
                    .map_or(BarTarget::Nothing, BarTarget::MsixTable);
            }
            if pba.hit(bar, offset, len) {
                return offset
                    .checked_sub(pba.offset)
                    .map_or(BarTarget::Nothing, BarTarget::MsixPba);
            }
        }
        // VFIO numbers the BAR regions like the BARs.
        u32::try_from(bar).map_or(BarTarget::Nothing, BarTarget::Region)
    }

    fn msix_ranges(&self) -> Option<(BarRange, BarRange)> {
        let cap = self.config.msix()?;
        let (t_off, t_len) = cap.layout.table_range(cap.table_size);
        let (p_off, p_len) = cap.layout.pba_range(cap.table_size);
        Some((
            BarRange {
                bar: usize::from(cap.layout.table_bar),
                offset: t_off,
                len: t_len,
            },
            BarRange {
                bar: usize::from(cap.layout.pba_bar),
                offset: p_off,
                len: p_len,
            },
        ))
    }
}

/// Where a trapped BAR access goes.
enum BarTarget {
    /// The emulated MSI-X table, at this offset into it.
    MsixTable(u64),
    /// The emulated MSI-X PBA, at this offset into it.
    MsixPba(u64),
    /// The device's region with this VFIO index (through VFIO).
    Region(u32),
    /// Nowhere: outside the BAR, or straddling the start of the table or PBA (reads
    /// all-ones, writes dropped).
    Nothing,
}

/// A byte range inside one BAR.
#[derive(Clone, Copy, Debug)]
struct BarRange {
    bar: usize,
    offset: u64,
    len: u64,
}

impl BarRange {
    /// Whether an access of `len` bytes at `offset` of BAR `bar` touches the range.
    fn hit(&self, bar: usize, offset: u64, len: u64) -> bool {
        self.bar == bar
            && self.len > 0
            && offset < self.offset.saturating_add(self.len)
            && self.offset < offset.saturating_add(len)
    }
}

/// Saturates a VFIO interrupt count to the u16 vector numbers PCI uses.
fn clamp_u16(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Mmaps the mappable parts of every memory BAR; a part the host refuses stays trapped.
fn map_bars(backend: &dyn VfioBackend, config: &VirtualConfig) -> Vec<BarMmap> {
    let page = host_page_size();
    let mut out = Vec::new();
    // VFIO numbers the BAR regions like the BARs.
    for (bar, region_index) in (0..NUM_BARS).zip(0u32..) {
        let Some(vbar) = config.bar(bar) else {
            continue;
        };
        if vbar.kind == BarKind::Io {
            continue;
        }
        let Some(region) = backend.region(region_index) else {
            continue;
        };
        let mut trapped = Vec::new();
        if let Some(cap) = config.msix() {
            if usize::from(cap.layout.table_bar) == bar {
                trapped.push(cap.layout.table_range(cap.table_size));
            }
            if usize::from(cap.layout.pba_bar) == bar {
                trapped.push(cap.layout.pba_range(cap.table_size));
            }
        }
        for (offset, len) in mappable_areas(&region, &trapped, page) {
            match backend.mmap_region(region_index, offset, len) {
                Ok(mapping) => out.push(BarMmap::new(bar, offset, mapping)),
                Err(e) => log::warn!(
                    "cannot mmap BAR {bar} offset {offset:#x} ({len:#x} bytes), it stays trapped: {e}"
                ),
            }
        }
    }
    out
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, reg_idx: usize) -> u32 {
        self.config.read(reg_idx, &*self.backend)
    }

    fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        match self.config.write(reg_idx, offset, data, &*self.backend) {
            ConfigTarget::Command | ConfigTarget::Bar => self.sync_guest_mappings(),
            ConfigTarget::Msi => self.update_msi(),
            ConfigTarget::Msix => self.update_msix(),
            ConfigTarget::Other => {}
        }
    }

    fn bars(&self) -> [Option<PciBarRange>; NUM_BARS] {
        self.config.shadow().decoded_bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match self.route(bar, offset, data.len()) {
            BarTarget::MsixTable(rel) => {
                if let Some(msix) = &self.msix {
                    msix.read_table(rel, data);
                }
            }
            BarTarget::MsixPba(rel) => {
                if let Some(msix) = &self.msix {
                    msix.read_pba(rel, data);
                }
            }
            BarTarget::Region(region) => self.backend.region_read(region, offset, data),
            BarTarget::Nothing => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.route(bar, offset, data.len()) {
            BarTarget::MsixTable(rel) => {
                if let Some(msix) = self.msix.as_mut() {
                    msix.write_table(rel, data);
                }
            }
            // The PBA is read-only.
            BarTarget::MsixPba(_) | BarTarget::Nothing => {}
            BarTarget::Region(region) => self.backend.region_write(region, offset, data),
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::fake::{FakeIrqs, FakeMapper, FakeVfio, MapLog};

    fn device(fake: &FakeVfio, irqs: &mut FakeIrqs) -> VfioPciDevice {
        VfioPciDevice::new(Box::new(fake.clone()), irqs).unwrap()
    }

    fn read32(dev: &mut VfioPciDevice, off: usize) -> u32 {
        dev.config_read(off / 4)
    }

    fn write(dev: &mut VfioPciDevice, off: usize, bytes: &[u8]) {
        dev.config_write(off / 4, (off % 4) as u64, bytes);
    }

    fn write32(dev: &mut VfioPciDevice, off: usize, v: u32) {
        write(dev, off, &v.to_le_bytes());
    }

    /// The capability list as the guest walks it: (id, offset).
    fn guest_caps(dev: &mut VfioPciDevice) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut ptr = (read32(dev, 0x34) & 0xfc) as usize;
        while ptr != 0 && out.len() < 48 {
            let header = read32(dev, ptr);
            out.push((header.to_le_bytes()[0], ptr));
            ptr = ((header >> 8) & 0xfc) as usize;
        }
        out
    }

    fn cap_offset(dev: &mut VfioPciDevice, id: u8) -> usize {
        guest_caps(dev)
            .into_iter()
            .find(|c| c.0 == id)
            .map(|c| c.1)
            .unwrap()
    }

    fn msg(addr: u64, data: u32) -> Option<MsiMessage> {
        Some(MsiMessage { addr, data })
    }

    /// (gpa, len) of every guest mapping, sorted.
    fn guest_maps(log: &MapLog) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = log.lock().unwrap().iter().map(|e| (e.1, e.2)).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn identity_comes_from_the_device_and_is_read_only() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        assert_eq!(read32(&mut dev, 0x00), 0x11e8_1234);
        assert_eq!(read32(&mut dev, 0x08), 0x00ff_0010);
        assert_eq!(read32(&mut dev, 0x2c), 0x1af4_1100);
        assert_eq!((read32(&mut dev, 0x0c) >> 16) & 0xff, 0, "single function");
        write32(&mut dev, 0x00, 0);
        assert_eq!(read32(&mut dev, 0x00), 0x11e8_1234);
        // The expansion ROM is hidden.
        write32(&mut dev, 0x30, 0xffff_ffff);
        assert_eq!(read32(&mut dev, 0x30), 0);
        // INTA, routed to the GSI the VMM gives INTA of this slot (16 in the fake).
        assert_eq!(read32(&mut dev, 0x3c) & 0xffff, 0x0110);
    }

    #[test]
    fn bars_are_sized_by_their_regions() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        let probe = |dev: &mut VfioPciDevice, off| {
            write32(dev, off, 0xffff_ffff);
            read32(dev, off)
        };
        assert_eq!(probe(&mut dev, 0x10), 0xfff0_0000);
        assert_eq!(probe(&mut dev, 0x14), 0xffff_ffe1);
        assert_eq!(probe(&mut dev, 0x18), 0xffff_c00c);
        assert_eq!(probe(&mut dev, 0x1c), 0xffff_ffff);
        assert_eq!(probe(&mut dev, 0x20), 0);
        let bars = dev.bar_layout();
        assert_eq!(bars.len(), 3);
        assert_eq!(
            bars[2],
            (
                2,
                VirtualBar {
                    kind: BarKind::Mmio64,
                    size: 0x4000,
                }
            )
        );
        // BAR writes never reach the device.
        assert!(fake
            .state()
            .config_writes
            .iter()
            .all(|(off, _)| !(0x10..0x28).contains(off)));
    }

    #[test]
    fn bar_mappings_follow_decoding_and_moves() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        let mapper = FakeMapper::default();
        let log = mapper.mapped.clone();
        dev.set_bar_address(0, 0xc000_0000).unwrap();
        dev.set_bar_address(2, 0x80_0000_0000).unwrap();
        dev.attach_mapper(Box::new(mapper));
        assert!(guest_maps(&log).is_empty(), "decoding is off");
        assert!(dev.bars().iter().all(Option::is_none));
        write(&mut dev, 0x04, &0x0006u16.to_le_bytes());
        // BAR0 whole; BAR2 only past the MSI-X table and PBA pages.
        assert_eq!(
            guest_maps(&log),
            vec![(0xc000_0000, 1 << 20), (0x80_0000_2000, 0x2000)]
        );
        assert_eq!(
            dev.bars().iter().flatten().count(),
            2,
            "the router sees both memory BARs"
        );
        assert!(dev.mmaps().iter().all(BarMmap::in_guest));
        // The guest moves BAR0.
        write32(&mut dev, 0x10, 0xd000_0000);
        assert_eq!(
            guest_maps(&log),
            vec![(0xd000_0000, 1 << 20), (0x80_0000_2000, 0x2000)]
        );
        // Memory decoding off: nothing stays mapped; the command reached the device.
        write(&mut dev, 0x04, &0x0004u16.to_le_bytes());
        assert!(guest_maps(&log).is_empty());
        assert_eq!(
            fake.state().config_writes.last(),
            Some(&(4, 0x0004u16.to_le_bytes().to_vec()))
        );
        // Back on, then dropping the device unmaps before the mmaps go.
        write(&mut dev, 0x04, &0x0002u16.to_le_bytes());
        assert_eq!(guest_maps(&log).len(), 2);
        drop(dev);
        assert!(guest_maps(&log).is_empty());
    }

    #[test]
    fn a_refused_mapping_leaves_the_bar_trapped() {
        let fake = FakeVfio::edu();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        dev.attach_mapper(Box::new(FakeMapper {
            refuse_below: 1 << 32,
            ..FakeMapper::default()
        }));
        dev.set_bar_address(0, 0xc000_0000).unwrap();
        write(&mut dev, 0x04, &0x0002u16.to_le_bytes());
        assert!(!dev.mmaps()[0].in_guest());
        // Still reachable through trapped accesses.
        dev.bar_write(0, 0x8, &7u32.to_le_bytes());
        let mut d = [0u8; 4];
        dev.bar_read(0, 0x8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
    }

    #[test]
    fn only_msi_msix_and_pcie_capabilities_are_shown() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        let ids: Vec<u8> = guest_caps(&mut dev).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0x05, 0x11, 0x10]);
        assert_ne!(read32(&mut dev, 0x04) & (1 << 20), 0, "capability list bit");
        // Extended config space exists (PCIe) but has no capabilities.
        assert_eq!(read32(&mut dev, 0x100), 0);
        assert_eq!(read32(&mut dev, 0xffc), 0);
        assert_eq!(read32(&mut dev, 0x1000), 0xffff_ffff);
        // A conventional device has 256 bytes.
        let edu = FakeVfio::edu();
        let mut dev = device(&edu, &mut FakeIrqs::default());
        assert_eq!(guest_caps(&mut dev), vec![(0x05, 0x40)]);
        assert_eq!(read32(&mut dev, 0x100), 0xffff_ffff);
    }

    #[test]
    fn pcie_capability_is_live_and_mostly_read_only() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        let cap = cap_offset(&mut dev, 0x10);
        assert_eq!(read32(&mut dev, cap + 4), 0x0000_8fc0);
        // Device Status changes on the device show up.
        fake.state().config[0xaa] = 0x04;
        assert_eq!(read32(&mut dev, cap + 8) >> 16, 0x0004);
        // Device Control writes are forwarded at the physical offset; others are dropped.
        let before = fake.state().config_writes.len();
        write(&mut dev, cap + 8, &0x2810u16.to_le_bytes());
        write32(&mut dev, cap + 4, 0);
        write(&mut dev, cap + 0x10, &[0xff, 0xff]);
        let writes = fake.state().config_writes[before..].to_vec();
        assert_eq!(writes, vec![(0xa8, 0x2810u16.to_le_bytes().to_vec())]);
    }

    #[test]
    fn status_comes_from_the_device_and_error_bits_clear_there() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        // Interrupt status and an error bit on the device, capability-list bit from us.
        fake.state().config[6..8].copy_from_slice(&0x2008u16.to_le_bytes());
        assert_eq!(read32(&mut dev, 0x04) >> 16, 0x2018);
        write(&mut dev, 0x06, &0x2008u16.to_le_bytes());
        assert_eq!(
            fake.state().config_writes.last(),
            Some(&(6, 0x2000u16.to_le_bytes().to_vec()))
        );
    }

    #[test]
    fn msi_programming_routes_vectors_and_switches_from_intx() {
        let fake = FakeVfio::rich();
        let mut irqs = FakeIrqs::default();
        let mut dev = device(&fake, &mut irqs);
        assert_eq!(
            irqs.asked,
            vec![4, 8],
            "MSI, then one MSI-X vector per entry"
        );
        assert_eq!(fake.state().irq_log, vec!["enable Intx 1", "resample"]);
        let cap = cap_offset(&mut dev, 0x05);
        // Message Control: 64-bit, per-vector mask, 4 vectors capable, nothing enabled.
        assert_eq!(read32(&mut dev, cap) >> 16, 0x0184);
        write32(&mut dev, cap + 4, 0xfee0_1000);
        write32(&mut dev, cap + 8, 0);
        write(&mut dev, cap + 0xc, &0x4020u16.to_le_bytes());
        write32(&mut dev, cap + 0x10, 0b0010);
        assert!(irqs.log().is_empty(), "not enabled yet");
        // Enable with 4 vectors requested (MME = 2); vector 1 is masked.
        write(&mut dev, cap + 2, &(0x0001u16 | (2 << 4)).to_le_bytes());
        let expect: Vec<_> = [0u16, 2, 3]
            .iter()
            .map(|&v| (0, v, msg(0xfee0_1000, 0x4020 | u32::from(v))))
            .collect();
        assert_eq!(irqs.log(), expect, "vector 1 stays detached");
        assert_eq!(fake.state().irq_log[2..], ["disable Intx", "enable Msi 4"]);
        // Unmasking vector 1 routes only it.
        write32(&mut dev, cap + 0x10, 0);
        let log = irqs.log();
        assert_eq!(log.len(), 4);
        assert_eq!(log[3], (0, 1, msg(0xfee0_1000, 0x4021)));
        // Disabling MSI detaches every vector and goes back to INTx.
        write(&mut dev, cap + 2, &0u16.to_le_bytes());
        assert!(irqs.log()[4..].iter().all(|r| r.2.is_none()));
        assert_eq!(irqs.log().len(), 8);
        assert_eq!(
            fake.state().irq_log[4..],
            ["disable Msi", "enable Intx 1", "resample"]
        );
    }

    #[test]
    fn msix_table_is_emulated_and_trapped() {
        let fake = FakeVfio::rich();
        let mut irqs = FakeIrqs::default();
        let mut dev = device(&fake, &mut irqs);
        let maps: Vec<(usize, u64, u64)> = dev
            .mmaps()
            .iter()
            .map(|m| (m.bar, m.offset, m.len()))
            .collect();
        assert_eq!(maps, vec![(0, 0, 1 << 20), (2, 0x2000, 0x2000)]);

        let cap = cap_offset(&mut dev, 0x11);
        assert_eq!(read32(&mut dev, cap) >> 16, 0x0007);
        assert_eq!(read32(&mut dev, cap + 4), 2);
        assert_eq!(read32(&mut dev, cap + 8), 0x1002);
        // Program vector 5 while MSI-X is off: it stays detached.
        dev.bar_write(2, 0x50, &0xfee0_0000u32.to_le_bytes());
        dev.bar_write(2, 0x58, &0x31u32.to_le_bytes());
        dev.bar_write(2, 0x5c, &0u32.to_le_bytes());
        assert!(irqs.log().iter().all(|r| r.2.is_none()));
        let mut d = [0u8; 4];
        dev.bar_read(2, 0x58, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x31);
        // Enable: vector 5 is routed, the others stay detached.
        let before = irqs.log().len();
        write(&mut dev, cap + 2, &0x8000u16.to_le_bytes());
        let routed: Vec<_> = irqs.log()[before..]
            .iter()
            .filter(|r| r.2.is_some())
            .copied()
            .collect();
        assert_eq!(routed, vec![(1, 5, msg(0xfee0_0000, 0x31))]);
        assert_eq!(fake.state().irq_log[2..], ["disable Intx", "enable Msix 8"]);
        // Function mask detaches it; a table write while enabled routes at once.
        write(&mut dev, cap + 2, &0xc000u16.to_le_bytes());
        assert_eq!(irqs.log().last().unwrap().2, None);
        write(&mut dev, cap + 2, &0x8000u16.to_le_bytes());
        dev.bar_write(2, 0x70, &0xfee0_2000u32.to_le_bytes());
        dev.bar_write(2, 0x7c, &0u32.to_le_bytes());
        assert_eq!(*irqs.log().last().unwrap(), (1, 7, msg(0xfee0_2000, 0)));
        // The PBA reads as emulated zeros and ignores writes.
        let mut pba = [0xffu8; 8];
        dev.bar_read(2, 0x1000, &mut pba);
        assert_eq!(pba, [0; 8]);
        dev.bar_write(2, 0x1000, &[0xff; 8]);
        // Outside the table the BAR is the device's.
        dev.bar_write(2, 0x3000, &0xabcdu16.to_le_bytes());
        assert_eq!(fake.state().regions[2].1[0x3000..0x3002], [0xcd, 0xab]);
        assert!(fake.state().regions[2].1[..0x1010].iter().all(|&b| b == 0));
        // Disabling MSI-X falls back to INTx.
        write(&mut dev, cap + 2, &0u16.to_le_bytes());
        assert_eq!(
            fake.state().irq_log[4..],
            ["disable Msix", "enable Intx 1", "resample"]
        );
    }

    #[test]
    fn hostile_accesses_are_contained() {
        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        let mut d = [0u8; 8];
        dev.bar_read(0, (1 << 20) - 4, &mut d);
        assert_eq!(d, [0xff; 8], "crosses the BAR end");
        dev.bar_read(0, u64::MAX - 2, &mut d);
        dev.bar_read(3, 0, &mut d);
        dev.bar_read(9, 0, &mut d);
        assert_eq!(d, [0xff; 8]);
        dev.bar_write(0, u64::MAX, &[1]);
        dev.bar_write(2, 0x4, &[1, 2, 3, 4]); // inside the table, not an entry field start
        dev.bar_write(2, 0x7e, &[1, 2, 3, 4]); // straddling the table end
        dev.bar_write(2, 0xfffe, &[1, 2, 3, 4]); // past the BAR
        for reg in [0usize, 1, 4, 15, 16, 63, 64, 1023, 1024, usize::MAX] {
            dev.config_write(reg, 1, &[0xff; 2]);
            dev.config_write(reg, 0, &[0xff; 3]);
            dev.config_write(reg, 3, &[0xff; 4]);
            let _ = dev.config_read(reg);
        }
        assert_eq!(dev.config_read(usize::MAX), 0xffff_ffff);
        assert!(fake.state().regions[2].1[..0x1010].iter().all(|&b| b == 0));
    }

    #[test]
    fn edu_like_device_uses_msi_without_msix() {
        let edu = FakeVfio::edu();
        let mut irqs = FakeIrqs::default();
        let mut dev = device(&edu, &mut irqs);
        assert_eq!(irqs.asked, vec![1]);
        assert_eq!(dev.mmaps().len(), 1);
        write32(&mut dev, 0x44, 0xfee0_0000);
        write(&mut dev, 0x4c, &0x0041u16.to_le_bytes());
        // The guest asks for 4 vectors; the device offers 1.
        write(&mut dev, 0x42, &(0x0001u16 | (2 << 4)).to_le_bytes());
        assert_eq!(irqs.log(), vec![(0, 0, msg(0xfee0_0000, 0x41))]);
        assert_eq!(edu.state().irq_log[2..], ["disable Intx", "enable Msi 1"]);
        // Trapped BAR accesses reach the region.
        dev.bar_write(0, 0x04, &0x1234_5678u32.to_le_bytes());
        let mut d = [0u8; 4];
        dev.bar_read(0, 0x04, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
    }

    #[test]
    fn shutdown_and_drop_turn_interrupts_off_and_reset_once() {
        let fake = FakeVfio::edu();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        let mapper = FakeMapper::default();
        let log = mapper.mapped.clone();
        dev.attach_mapper(Box::new(mapper));
        dev.set_bar_address(0, 0xc000_0000).unwrap();
        write(&mut dev, 0x04, &0x0002u16.to_le_bytes());
        assert_eq!(guest_maps(&log).len(), 1);
        dev.shutdown();
        assert!(guest_maps(&log).is_empty());
        assert!(
            dev.mmaps().is_empty(),
            "mmaps released before the device closes"
        );
        assert_eq!(fake.state().resets, 1);
        assert_eq!(
            fake.state().irq_log.last().map(String::as_str),
            Some("disable Intx")
        );
        drop(dev);
        assert_eq!(fake.state().resets, 1, "shutdown is done once");
        let fake = FakeVfio::edu();
        drop(device(&fake, &mut FakeIrqs::default()));
        assert_eq!(fake.state().resets, 1);
    }

    #[test]
    fn without_intx_from_the_vmm_no_pin_is_reported() {
        let fake = FakeVfio::edu();
        let mut irqs = FakeIrqs {
            intx: false,
            ..FakeIrqs::default()
        };
        let mut dev = device(&fake, &mut irqs);
        assert_eq!(read32(&mut dev, 0x3c), 0);
        assert!(fake.state().irq_log.is_empty());
        // MSI still works, and disabling it leaves interrupts off.
        write32(&mut dev, 0x44, 0xfee0_0000);
        write(&mut dev, 0x42, &1u16.to_le_bytes());
        write(&mut dev, 0x42, &0u16.to_le_bytes());
        assert_eq!(fake.state().irq_log, ["enable Msi 1", "disable Msi"]);
        // A device VFIO offers no INTx for: no pin either.
        let fake = FakeVfio::edu();
        fake.state().irq_counts[0] = 0;
        let mut dev = device(&fake, &mut FakeIrqs::default());
        assert_eq!(read32(&mut dev, 0x3c), 0);
    }

    #[test]
    fn intx_is_asked_for_the_devices_own_pin() {
        let fake = FakeVfio::rich();
        fake.state().config[0x3d] = 3; // INTC#
        let mut irqs = FakeIrqs::default();
        let mut dev = device(&fake, &mut irqs);
        assert_eq!(irqs.intx_pins, vec![3]);
        // Pin INTC#, line = the GSI the VMM gave (15 + 3 in the fake).
        assert_eq!(read32(&mut dev, 0x3c) & 0xffff, 0x0312);
        // The guest may scribble on the line; the pin stays.
        write(&mut dev, 0x3c, &[0xff, 0x01]);
        assert_eq!(read32(&mut dev, 0x3c) & 0xffff, 0x03ff);
        // A pin outside 1-4 is no INTx: nothing asked, no pin shown.
        let fake = FakeVfio::rich();
        fake.state().config[0x3d] = 7;
        let mut irqs = FakeIrqs::default();
        let mut dev = device(&fake, &mut irqs);
        assert!(irqs.intx_pins.is_empty());
        assert_eq!(read32(&mut dev, 0x3c), 0);
    }

    #[test]
    fn io_bar_is_trapped_and_forwarded_through_the_port_router() {
        use crate::bus::BusDevice;
        use crate::pci::{PciBarRouter, PciRoot, PciSpace};
        use std::sync::Mutex;

        let fake = FakeVfio::rich();
        let mut dev = device(&fake, &mut FakeIrqs::default());
        assert!(
            dev.mmaps().iter().all(|m| m.bar != 1),
            "I/O BARs are never mmapped"
        );
        dev.set_bar_address(1, 0xc040).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut root = PciRoot::new();
        root.add_device(dev.clone()).unwrap();
        let mut ports = PciBarRouter::new(Arc::new(Mutex::new(root)), 0x0d00, PciSpace::Io);
        let port = |p: u64| p - 0x0d00;

        // I/O decoding off: the port reads all-ones and writes go nowhere.
        ports.write(port(0xc044), &[0xaa]);
        let mut b = [0u8; 1];
        ports.read(port(0xc044), &mut b);
        assert_eq!(b, [0xff]);
        assert!(fake.state().regions[1].1.iter().all(|&x| x == 0));

        // On: byte, word and dword accesses land at the offset in VFIO region 1.
        write(&mut dev.lock().unwrap(), 0x04, &0x0001u16.to_le_bytes());
        ports.write(port(0xc044), &[0xaa]);
        ports.write(port(0xc046), &0xbbccu16.to_le_bytes());
        ports.write(port(0xc05c), &0x1122_3344u32.to_le_bytes());
        {
            let st = fake.state();
            assert_eq!(st.regions[1].1[4..8], [0xaa, 0, 0xcc, 0xbb]);
            assert_eq!(st.regions[1].1[0x1c..0x20], [0x44, 0x33, 0x22, 0x11]);
        }
        let mut d = [0u8; 4];
        ports.read(port(0xc05c), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1122_3344);
        // Straddling the end of the 32-port BAR: refused, the region is untouched.
        ports.write(port(0xc05e), &[9, 9, 9, 9]);
        assert_eq!(fake.state().regions[1].1[0x1e..0x20], [0x22, 0x11]);
        // The guest moves the BAR: the old ports stop decoding, the new ones work.
        write32(&mut dev.lock().unwrap(), 0x14, 0xd001);
        ports.read(port(0xc05c), &mut d);
        assert_eq!(d, [0xff; 4]);
        ports.read(port(0xd01c), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1122_3344);
    }
}
