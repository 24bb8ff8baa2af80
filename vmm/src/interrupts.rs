//! MSI and MSI-X delivery through KVM: GSI routes and irqfds.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, so [`MsiRouter`] keeps it: the
//! default irqchip routes (PIC and IOAPIC pins, as KVM sets them up itself) plus one MSI
//! route per allocated vector. A device's vectors are an [`MsiVectorGroup`]: each vector
//! has a GSI and an eventfd; while the guest has the vector unmasked the eventfd is
//! attached to the GSI as an irqfd, so whoever writes the eventfd (a device thread, a
//! vhost-user backend, VFIO) interrupts the guest without passing through the VMM.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::pci::{MsiMessage, MsiVectors};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// GSIs 0-23 are the IOAPIC's pins; MSI routes start after them.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's routing table limit (KVM_MAX_IRQ_ROUTES is 4096 on x86).
const MAX_GSI: u32 = 4096;

/// Errors from allocating vectors.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The GSI space is exhausted.
    #[error("no free GSI for {0} more interrupt vectors")]
    NoGsi(usize),
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(io::Error),
}

/// The VM's GSI routing table.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<RoutingTable>,
}

struct RoutingTable {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl RoutingTable {
    /// Sets (`Some`) or removes (`None`) the MSI route of `gsi`; returns the old one.
    fn put(&mut self, gsi: u32, message: Option<MsiMessage>) -> Option<MsiMessage> {
        match message {
            Some(m) => self.msi.insert(gsi, m),
            None => self.msi.remove(&gsi),
        }
    }
}

impl MsiRouter {
    /// A router with only the default irqchip routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(RoutingTable {
                next_gsi: FIRST_MSI_GSI,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// Allocates `count` vectors, each with its own GSI and eventfd, all detached.
    pub fn allocate(self: &Arc<Self>, count: usize) -> Result<MsiVectorGroup, InterruptError> {
        let gsis = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let first = t.next_gsi;
            let end = u32::try_from(count)
                .ok()
                .and_then(|c| first.checked_add(c))
                .filter(|&end| end <= MAX_GSI)
                .ok_or(InterruptError::NoGsi(count))?;
            t.next_gsi = end;
            first..end
        };
        let vectors = gsis
            .map(|gsi| {
                Ok(Vector {
                    gsi,
                    evt: EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?,
                })
            })
            .collect::<Result<Vec<_>, InterruptError>>()?;
        Ok(MsiVectorGroup {
            router: self.clone(),
            attached: Mutex::new(vec![false; count]),
            vectors,
        })
    }

    /// Sets (or removes) the MSI route of `gsi` and, if that changed the table, pushes
    /// the whole table to KVM. A guest unmasking a vector (or toggling the MSI-X function
    /// mask) re-routes it with the message it already has: that costs no
    /// `KVM_SET_GSI_ROUTING` (an SRCU synchronisation in the kernel). If KVM refuses the
    /// table, the old route is kept so that the next update tries again.
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let previous = t.put(gsi, message);
        if previous == message {
            return Ok(());
        }
        let pushed = KvmIrqRouting::from_entries(&routing_entries(&t.msi))
            .map_err(|e| io::Error::other(format!("GSI routing table: {e:?}")))
            .and_then(|routing| self.vm.set_gsi_routing(&routing).map_err(io::Error::from));
        if pushed.is_err() {
            t.put(gsi, previous);
        }
        pushed
    }
}

/// The low dword of `v`: the lower of a split 64-bit register pair.
fn low_u32(v: u64) -> u32 {
    let [b0, b1, b2, b3, ..] = v.to_le_bytes();
    u32::from_le_bytes([b0, b1, b2, b3])
}

/// KVM's default irqchip routes plus the MSI routes.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::with_capacity(40 + msi.len());
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..FIRST_MSI_GSI {
        if gsi < 8 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = low_u32(m.addr);
        e.u.msi.address_hi = (m.addr >> 32) as u32;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    entries
}

struct Vector {
    gsi: u32,
    evt: EventFd,
}

/// One device's vectors (see the module documentation).
pub struct MsiVectorGroup {
    router: Arc<MsiRouter>,
    vectors: Vec<Vector>,
    attached: Mutex<Vec<bool>>,
}

impl MsiVectors for MsiVectorGroup {
    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.evt)
    }

    fn update(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
        let index = usize::from(vector);
        let Some(v) = self.vectors.get(index) else {
            return Ok(());
        };
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        match message {
            Some(m) => {
                self.router.set_route(v.gsi, Some(m))?;
                if !attached[index] {
                    // KVM injects at once if the eventfd was written while detached.
                    self.router.vm.register_irqfd(&v.evt, v.gsi)?;
                    attached[index] = true;
                }
            }
            None => {
                if attached[index] {
                    self.router.vm.unregister_irqfd(&v.evt, v.gsi)?;
                    attached[index] = false;
                }
            }
        }
        Ok(())
    }
}

impl Drop for MsiVectorGroup {
    fn drop(&mut self) {
        let attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        for (v, &on) in self.vectors.iter().zip(attached.iter()) {
            if on {
                let _ = self.router.vm.unregister_irqfd(&v.evt, v.gsi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_the_irqchip_defaults_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                addr: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let e = routing_entries(&msi);
        // 16 PIC + 24 IOAPIC + 1 MSI.
        assert_eq!(e.len(), 41);
        let last = e.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI route, so `msi` is the union member routing_entries wrote.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
        let pic_slave: Vec<_> = e
            .iter()
            .filter(|x| x.gsi == 9 && x.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            .collect();
        assert_eq!(
            pic_slave.len(),
            2,
            "GSI 9 goes to the slave PIC and the IOAPIC"
        );
    }

    #[test]
    fn only_a_changed_route_reaches_kvm_and_a_refused_one_is_not_kept() {
        let vm = match kvm_ioctls::Kvm::new().and_then(|k| k.create_vm()) {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                eprintln!("SKIP: no usable /dev/kvm ({e})");
                return;
            }
        };
        // Without an in-kernel irqchip KVM refuses every routing table: each push fails,
        // so a call that returns Ok made none.
        let router = MsiRouter::new(vm);
        let m = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        assert!(router.set_route(30, None).is_ok(), "no route to remove");
        assert!(router.set_route(30, Some(m)).is_err());
        let table = |r: &MsiRouter| r.table.lock().unwrap().msi.clone();
        assert!(
            table(&router).is_empty(),
            "the refused route is rolled back"
        );
        assert!(
            router.set_route(30, Some(m)).is_err(),
            "so the same route is pushed again"
        );
        // A route already in the table is not pushed again.
        router.table.lock().unwrap().put(30, Some(m));
        assert!(router.set_route(30, Some(m)).is_ok());
        assert!(router.set_route(31, None).is_ok());
        assert!(router.set_route(30, None).is_err(), "a removal is pushed");
        assert_eq!(table(&router).get(&30), Some(&m));
    }
}
