//! Building and running one microVM: KVM VM and irqchip, guest RAM, boot, legacy devices,
//! vCPU threads and the control loop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ai_infer_protocol as proto;
use devices::pci::PciHeader;
use devices::virtio::{VhostUserDevice, VhostUserDeviceConfig, VirtioPciDevice};
use devices::{
    BootTimer, Bus, SerialConsole, SleepControl, BOOT_TIMER_PORT, I8042, I8042_PORT,
    I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{acpi, boot, cpuid, layout, mptable, regs};
use crate::config::{AiInferConfig, ValidatedConfig};
use crate::console;
use crate::event_loop::{install_stop_signals, ControlLoop};
use crate::host::HostTopology;
use crate::interrupts::MsiRouter;
use crate::memory::{GuestRam, MemoryError};
use crate::pci::{PciError, PciSegment};
use crate::vcpu::{install_kick_handler, Stop, StopReason, VcpuContext, VcpuHandle};
use crate::vfio::{Passthrough, PassthroughSetupError};

/// The serial port's ISA IRQ (COM1).
const SERIAL_IRQ: u32 = 4;
/// How long vCPU threads get to leave `KVM_RUN` at shutdown.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot set up {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::BusError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Passthrough(#[from] PassthroughSetupError),
    #[error("cannot create a device: {0}")]
    Device(String),
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

impl VmError {
    /// Errors that come from what the operator asked for (not enough memory on the host,
    /// a kernel that cannot be loaded), as opposed to runtime failures.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            VmError::Memory(_)
                | VmError::Boot(_)
                | VmError::Mptable(_)
                | VmError::Acpi(_)
                | VmError::Passthrough(_)
        )
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// What the boot vCPU runs.
#[derive(Clone, Copy, Debug)]
pub enum GuestImage<'a> {
    /// The config's kernel, initrd and command line.
    Linux,
    /// Raw 16-bit real-mode code copied to `addr` and entered there (device tests).
    RealMode { code: &'a [u8], addr: u64 },
}

/// Creates the VM, boots the configured kernel and runs until the VM stops.
pub fn run(
    cfg: &ValidatedConfig,
    kvm: &Kvm,
    host: &dyn HostTopology,
    start: Instant,
) -> Result<StopReason, VmError> {
    run_image(cfg, kvm, host, start, GuestImage::Linux)
}

/// Creates the VM, loads `image` and runs until the VM stops. Returns why it stopped.
pub fn run_image(
    cfg: &ValidatedConfig,
    kvm: &Kvm,
    host: &dyn HostTopology,
    start: Instant,
    image: GuestImage,
) -> Result<StopReason, VmError> {
    // SIGTERM/SIGINT from here on stop the VM cleanly: one that arrives during setup is
    // seen by the control loop as soon as it starts.
    let signal_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the signal event"))?;
    install_stop_signals(&signal_evt).map_err(io_err("signal handlers"))?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create the KVM VM"))?);
    vm.set_tss_address(layout::KVM_TSS_ADDR)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm_err("create the in-kernel PIT"))?;

    let ram = GuestRam::create(&cfg.zones, host)?;
    register_memory(&vm, &ram)?;
    log::info!(
        "guest RAM: {} MiB in {} zone(s), {} slot(s)",
        ram.size() >> 20,
        ram.zones.len(),
        ram.placements.len()
    );

    regs::write_boot_tables(&ram.memory)?;
    mptable::setup_mptable(&ram.memory, cfg.vcpus)?;
    let ram_end = ram
        .ranges()
        .last()
        .map(|&(start, len)| start + len)
        .unwrap_or(0);
    // The guest's CPUID (KVM's supported set) bounds its physical addresses, and so the
    // 64-bit PCI window the ACPI tables declare and the PCI segment allocates from.
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read KVM's supported CPUID"))?;
    let mmio64 = layout::pci_mmio64_window(ram_end, cpuid::guest_phys_bits(&base_cpuid));
    log::info!(
        "PCI 64-bit window {:#x}-{:#x} ({} GiB; guest physical address width {} bits)",
        mmio64.start,
        mmio64.end().saturating_sub(1),
        mmio64.size >> 30,
        mmio64.phys_bits
    );
    let rsdp = acpi::setup_acpi(&ram.memory, cfg.vcpus, &mmio64)?;
    let entry = match image {
        GuestImage::Linux => boot::load_guest(
            &ram.memory,
            &ram.ranges(),
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cfg.cmdline,
            Some(rsdp),
        )?,
        GuestImage::RealMode { code, addr } => {
            ram.memory
                .write_slice(code, GuestAddress(addr))
                .map_err(|e| VmError::Boot(boot::BootError::GuestMemory(e)))?;
            boot::BootEntry {
                mode: regs::EntryMode::Real16,
                entry: addr,
            }
        }
    };
    log::info!("kernel entry {:#x} ({:?})", entry.entry, entry.mode);

    // Legacy devices on the port I/O bus.
    let stop = Arc::new(Stop::new().map_err(io_err("the stop event"))?);
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the serial IRQ"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("register the serial irqfd"))?;
    let out = console::output(&cfg.console).map_err(io_err("the console output"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the reset event"))?;
    let i8042 = I8042::new(reset_evt.try_clone().map_err(io_err("the reset event"))?);
    let boot_timer = BootTimer::new(start).on_init_reached(|t| {
        eprintln!("aivmm: guest reached init in {} ms", t.as_millis());
    });
    let poweroff_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the power-off event"))?;
    let sleep_control = SleepControl::new(
        acpi::S5_SLP_TYP,
        poweroff_evt
            .try_clone()
            .map_err(io_err("the power-off event"))?,
    );
    let mut io_bus = Bus::new();
    io_bus.insert(
        Arc::new(Mutex::new(sleep_control)),
        u64::from(acpi::SLEEP_CONTROL_PORT),
        2,
    )?;
    io_bus.insert(serial.clone(), u64::from(SERIAL_PORT), SERIAL_PORT_LEN)?;
    io_bus.insert(
        Arc::new(Mutex::new(i8042)),
        u64::from(I8042_PORT),
        I8042_PORT_LEN,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(boot_timer)),
        u64::from(BOOT_TIMER_PORT),
        1,
    )?;
    let mut mmio_bus = Bus::new();

    // PCI: bus 0 and, if configured, the ai_infer device.
    let msi_router = Arc::new(MsiRouter::new(vm.clone()));
    let mut pci = PciSegment::new(mmio64);
    pci.attach(&mut io_bus, &mut mmio_bus)?;
    let _ai_infer = match &cfg.ai_infer {
        Some(ai) => Some(add_ai_infer(&vm, &msi_router, &mut pci, ai, &ram)?),
        None => None,
    };
    // Passthrough devices: dropped (reset, DMA-unmapped) before the RAM, on every path.
    let passthrough = if cfg.passthrough.is_empty() {
        None
    } else {
        Some(Passthrough::attach(
            &vm,
            &ram,
            &mut pci,
            &msi_router,
            &cfg.passthrough,
        )?)
    };

    // vCPUs: all configured before any runs.
    install_kick_handler().map_err(io_err("the vCPU kick signal"))?;
    let mut fds = Vec::with_capacity(cfg.vcpus.into());
    for id in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = base_cpuid.clone();
        cpuid::patch_cpuid(&mut cpuid, id, cfg.vcpus);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set vCPU CPUID"))?;
        regs::setup_vcpu(&fd, id, entry.mode, entry.entry)?;
        fds.push(fd);
    }

    let raw_stdin = console::RawStdin::enable(&cfg.console);
    let control = Arc::new(Mutex::new(ControlLoop::new(
        stop.clone(),
        reset_evt,
        poweroff_evt,
        signal_evt,
        serial,
        stdin_pollable(),
    )));
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(VmError::EventLoop)?;
    events.add_subscriber(control);

    let mut handles = Vec::with_capacity(fds.len());
    for (id, fd) in fds.into_iter().enumerate() {
        let ctx = VcpuContext {
            id: id as u8,
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            stop: stop.clone(),
            affinity: cfg.vcpu_affinity.clone(),
        };
        match VcpuHandle::spawn(fd, ctx) {
            Ok(h) => handles.push(h),
            Err(e) => {
                stop.request(StopReason::VcpuError(format!(
                    "cannot start vCPU {id}: {e}"
                )));
                break;
            }
        }
    }
    log::info!(
        "{} vCPU(s) running, {} ms after aivmm started",
        handles.len(),
        start.elapsed().as_millis()
    );

    while !stop.is_requested() {
        events.run().map_err(VmError::EventLoop)?;
    }
    for h in handles {
        h.stop(VCPU_STOP_TIMEOUT);
    }
    drop(raw_stdin);
    // Resets the devices and unmaps guest RAM from their IOMMU (Passthrough's Drop).
    drop(passthrough);
    // The VM goes before the RAM it maps.
    drop(events);
    drop(vm);
    drop(ram);
    Ok(stop
        .reason()
        .unwrap_or(StopReason::VcpuError("stopped without a reason".into())))
}

/// Adds the ai_infer virtio-pci device, whose queues `ai-inferd` serves over vhost-user.
fn add_ai_infer(
    vm: &VmFd,
    router: &Arc<MsiRouter>,
    pci: &mut PciSegment,
    ai: &AiInferConfig,
    ram: &GuestRam,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmError> {
    let device = VhostUserDevice::new(
        VhostUserDeviceConfig {
            device_type: proto::VIRTIO_ID_AI_INFER,
            num_queues: ai.queues as usize,
            queue_max_size: ai.queue_size as u16,
            config_len: proto::CONFIG_SPACE_LEN as u32,
            allowed_features: proto::DEVICE_FEATURES,
            socket: ai.socket.clone(),
        },
        ram.memory.clone(),
    )
    .map_err(|e| VmError::Device(e.to_string()))?;
    let header = PciHeader {
        vendor_id: proto::PCI_VENDOR_ID_VIRTIO,
        device_id: proto::PCI_DEVICE_ID_AI_INFER,
        revision_id: proto::PCI_REVISION_ID_AI_INFER,
        class_code: (proto::PCI_CLASS_CODE_AI_INFER >> 16) as u8,
        subclass: (proto::PCI_CLASS_CODE_AI_INFER >> 8) as u8,
        prog_if: proto::PCI_CLASS_CODE_AI_INFER as u8,
        subsystem_vendor_id: proto::PCI_SUBSYSTEM_VENDOR_ID,
        subsystem_id: proto::PCI_SUBSYSTEM_ID_AI_INFER,
        multi_function: false,
    };
    let (slot, transport) = pci.add_virtio(vm, router, Box::new(device), header)?;
    log::info!(
        "ai_infer device at PCI 00:{slot:02x}.0, backend socket {}",
        ai.socket.display()
    );
    Ok(transport)
}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let mem = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which outlives the VM fd's use
        // of it (both are dropped together at the end of `run`, the VM first).
        unsafe { vm.set_user_memory_region(mem) }
            .map_err(kvm_err("register guest memory with KVM"))?;
    }
    Ok(())
}

/// stdin can be watched with epoll only when it is a terminal, pipe or socket.
fn stdin_pollable() -> bool {
    // SAFETY: fstat on fd 0 writes into a zero-initialised stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointer is valid for the call.
    if unsafe { libc::fstat(libc::STDIN_FILENO, &mut st) } != 0 {
        return false;
    }
    let kind = st.st_mode & libc::S_IFMT;
    kind == libc::S_IFIFO
        || kind == libc::S_IFSOCK
        // SAFETY: isatty only inspects the fd.
        || (kind == libc::S_IFCHR && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1)
}
