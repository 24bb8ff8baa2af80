//! A VFIO device and a VMM interrupt allocator made of plain memory, for unit tests of the
//! config space, BAR and interrupt emulation.

use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::backend::{DeviceMapping, IrqKind, RegionInfo, VfioBackend};
use super::bar_map::GuestMapper;
use super::interrupts::{InterruptAllocator, IntxLine};
use crate::pci::{MsiMessage, MsiVectors};

/// What the fake device holds and what was done to it.
#[derive(Debug, Default)]
pub struct FakeState {
    pub config: Vec<u8>,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub regions: Vec<(RegionInfo, Vec<u8>)>,
    pub irq_counts: [u32; 3],
    /// "enable Msi 4", "disable Intx", "resample", ...
    pub irq_log: Vec<String>,
    pub resets: u32,
}

#[derive(Clone, Default)]
pub struct FakeVfio(pub Arc<Mutex<FakeState>>);

impl FakeVfio {
    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    fn put(&self, off: usize, bytes: &[u8]) {
        self.state().config[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// A PCI Express function with every feature the emulation handles:
    /// - BAR0: 1 MiB 32-bit memory; BAR1: 32-byte I/O; BAR2/3: 16 KiB 64-bit prefetchable
    ///   memory holding the MSI-X table (offset 0) and PBA (offset 0x1000);
    /// - capabilities: PM at 0x40, MSI (64-bit, per-vector mask, 4 vectors) at 0x50,
    ///   vendor-specific at 0x70, MSI-X (8 vectors) at 0x80, PCIe v2 at 0xa0;
    /// - interrupt pin INTA.
    pub fn rich() -> Self {
        let f = FakeVfio::default();
        {
            let mut s = f.state();
            s.config = vec![0; 4096];
            s.irq_counts = [1, 4, 8];
            let mem = |size: u64| {
                (
                    RegionInfo {
                        size,
                        mmap: true,
                        sparse: None,
                    },
                    vec![0u8; usize::try_from(size).unwrap()],
                )
            };
            s.regions = vec![
                mem(1 << 20),
                (
                    RegionInfo {
                        size: 0x20,
                        mmap: false,
                        sparse: None,
                    },
                    vec![0u8; 0x20],
                ),
                mem(0x4000),
                mem(0),
                mem(0),
                mem(0),
            ];
        }
        f.put(0x00, &0x1234u16.to_le_bytes());
        f.put(0x02, &0x11e8u16.to_le_bytes());
        f.put(0x08, &[0x10, 0x00, 0xff, 0x00]);
        f.put(0x0e, &[0x80]); // multi-function on the host
        f.put(0x06, &0x0010u16.to_le_bytes()); // capability list
        f.put(0x10, &0x0000_0000u32.to_le_bytes());
        f.put(0x14, &0x0000_0001u32.to_le_bytes());
        f.put(0x18, &0x0000_000cu32.to_le_bytes());
        f.put(0x2c, &0x1af4_1100u32.to_le_bytes());
        f.put(0x30, &0xfffe_0001u32.to_le_bytes()); // an expansion ROM, to be hidden
        f.put(0x34, &[0x40]);
        f.put(0x3d, &[0x01]);
        f.put(0x40, &[0x01, 0x50, 0x03, 0x00]); // PM
        f.put(0x50, &[0x05, 0x70]);
        f.put(0x52, &(0x0180u16 | (2 << 1)).to_le_bytes()); // MSI: 64-bit, PVM, 4 vectors
        f.put(0x70, &[0x09, 0x80, 0x08]); // vendor specific
        f.put(0x80, &[0x11, 0xa0]);
        f.put(0x82, &7u16.to_le_bytes()); // 8 vectors
        f.put(0x84, &2u32.to_le_bytes()); // table: BAR2 offset 0
        f.put(0x88, &(0x1000u32 | 2).to_le_bytes()); // PBA: BAR2 offset 0x1000
        f.put(0xa0, &[0x10, 0x00, 0x02, 0x00]); // PCIe v2, endpoint
        f.put(0xa4, &0x0000_8fc0u32.to_le_bytes()); // device capabilities
        f
    }

    /// A conventional PCI function like QEMU's `edu`: one 1 MiB BAR, MSI (64-bit, 1
    /// vector), INTA, no MSI-X.
    pub fn edu() -> Self {
        let f = FakeVfio::default();
        {
            let mut s = f.state();
            s.config = vec![0; 256];
            s.irq_counts = [1, 1, 0];
            s.regions = vec![(
                RegionInfo {
                    size: 1 << 20,
                    mmap: true,
                    sparse: None,
                },
                vec![0u8; 1 << 20],
            )];
        }
        f.put(0x00, &0x11e8_1234u32.to_le_bytes());
        f.put(0x06, &0x0010u16.to_le_bytes());
        f.put(0x08, &0x00ff_0010u32.to_le_bytes());
        f.put(0x34, &[0x40]);
        f.put(0x3d, &[0x01]);
        f.put(0x40, &[0x05, 0x00, 0x80, 0x00]);
        f
    }
}

fn kind_index(kind: IrqKind) -> usize {
    match kind {
        IrqKind::Intx => 0,
        IrqKind::Msi => 1,
        IrqKind::Msix => 2,
    }
}

impl VfioBackend for FakeVfio {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let s = self.state();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = s.config.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        self.state().config_writes.push((offset, data.to_vec()));
    }

    fn region(&self, bar: u32) -> Option<RegionInfo> {
        self.state().regions.get(bar as usize).map(|r| r.0.clone())
    }

    fn region_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let s = self.state();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = s
            .regions
            .get(bar as usize)
            .and_then(|r| r.1.get(start..start + data.len()))
        {
            data.copy_from_slice(src);
        }
    }

    fn region_write(&self, bar: u32, offset: u64, data: &[u8]) {
        let mut s = self.state();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(dst) = s
            .regions
            .get_mut(bar as usize)
            .and_then(|r| r.1.get_mut(start..start + data.len()))
        {
            dst.copy_from_slice(data);
        }
    }

    fn irq_count(&self, kind: IrqKind) -> u32 {
        self.state().irq_counts[kind_index(kind)]
    }

    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> io::Result<()> {
        self.state()
            .irq_log
            .push(format!("enable {kind:?} {}", fds.len()));
        Ok(())
    }

    fn disable_irq(&self, kind: IrqKind) -> io::Result<()> {
        self.state().irq_log.push(format!("disable {kind:?}"));
        Ok(())
    }

    fn set_intx_resample(&self, _fd: &EventFd) -> io::Result<()> {
        self.state().irq_log.push("resample".into());
        Ok(())
    }

    fn mmap_region(&self, _bar: u32, _offset: u64, len: u64) -> io::Result<DeviceMapping> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        // SAFETY: a fresh anonymous mapping, checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("null mapping"))?;
        // SAFETY: the mapping was just created and is owned by nobody else.
        Ok(unsafe { DeviceMapping::from_raw(addr, len) })
    }

    fn reset(&self) {
        self.state().resets += 1;
    }
}

/// Routes as the fake VMM recorded them: (allocation number, vector, message or detached).
pub type RouteLog = Arc<Mutex<Vec<(usize, u16, Option<MsiMessage>)>>>;

pub struct FakeVectors {
    group: usize,
    fds: Vec<EventFd>,
    log: RouteLog,
}

impl MsiVectors for FakeVectors {
    fn len(&self) -> usize {
        self.fds.len()
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(vector))
    }

    fn update(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
        self.log.lock().unwrap().push((self.group, vector, message));
        Ok(())
    }
}

/// An allocator handing out vectors that log their routes into `routes`.
pub struct FakeIrqs {
    pub routes: RouteLog,
    /// Vector counts asked for, in order (the allocation number of the log).
    pub asked: Vec<u16>,
    /// Whether to hand out an INTx line.
    pub intx: bool,
    /// The pins INTx lines were asked for.
    pub intx_pins: Vec<u8>,
}

impl Default for FakeIrqs {
    fn default() -> Self {
        FakeIrqs {
            routes: RouteLog::default(),
            asked: Vec::new(),
            intx: true,
            intx_pins: Vec::new(),
        }
    }
}

impl FakeIrqs {
    /// The routes logged so far.
    pub fn log(&self) -> Vec<(usize, u16, Option<MsiMessage>)> {
        self.routes.lock().unwrap().clone()
    }
}

impl InterruptAllocator for FakeIrqs {
    fn msi_vectors(&mut self, count: u16) -> io::Result<Arc<dyn MsiVectors>> {
        self.asked.push(count);
        let fds = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(FakeVectors {
            group: self.asked.len() - 1,
            fds,
            log: self.routes.clone(),
        }))
    }

    /// Pin n gets GSI 15 + n (INTA# is 16), like slot 0 of the VMM's routing.
    fn intx_line(&mut self, pin: u8) -> io::Result<Option<IntxLine>> {
        self.intx_pins.push(pin);
        if !self.intx {
            return Ok(None);
        }
        Ok(Some(IntxLine {
            trigger: EventFd::new(libc::EFD_NONBLOCK)?,
            resample: EventFd::new(libc::EFD_NONBLOCK)?,
            gsi: 15 + u32::from(pin),
        }))
    }
}

/// Guest mappings as the fake VMM holds them: handle -> (gpa, len).
pub type MapLog = Arc<Mutex<Vec<(u32, u64, u64)>>>;

/// A mapper that records what is mapped where, refusing anything below `refuse_below`
/// (standing in for guest RAM).
#[derive(Default)]
pub struct FakeMapper {
    pub mapped: MapLog,
    pub next: u32,
    pub refuse_below: u64,
}

impl GuestMapper for FakeMapper {
    unsafe fn map(&mut self, gpa: u64, _host_addr: *mut u8, len: u64) -> io::Result<u32> {
        if gpa < self.refuse_below {
            return Err(io::Error::other("overlaps guest RAM"));
        }
        self.next += 1;
        self.mapped.lock().unwrap().push((self.next, gpa, len));
        Ok(self.next)
    }

    fn unmap(&mut self, handle: u32) -> io::Result<()> {
        let mut m = self.mapped.lock().unwrap();
        let before = m.len();
        m.retain(|e| e.0 != handle);
        if m.len() == before {
            return Err(io::Error::other("no such mapping"));
        }
        Ok(())
    }
}
