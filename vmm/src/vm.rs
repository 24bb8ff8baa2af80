//! Building and running one microVM: KVM VM and irqchip, guest RAM, boot, legacy devices,
//! vCPU threads and the control loop.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::DeviceUpdate;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_HALT_POLL,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{acpi, boot, cpuid, layout, mptable, regs};
use crate::config::ValidatedConfig;
use crate::console;
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::event_loop::{install_stop_signals, ControlLoop};
use crate::host::HostTopology;
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{
    install_kick_handler, pause_all, Pause, Stop, StopReason, VcpuContext, VcpuHandle,
};
/// How long vCPU threads get to leave `KVM_RUN` at shutdown.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long vCPU threads get to leave `KVM_RUN` when the VM is paused.
const VCPU_PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the control plane can ask of a running VM.
#[derive(Clone, Debug, PartialEq)]
pub enum RuntimeAction {
    /// Every vCPU leaves the guest and parks.
    Pause,
    /// The parked vCPUs run again.
    Resume,
    /// A change to the virtio device the config calls `id` (a PATCH of a drive or an
    /// interface).
    Update { id: String, update: DeviceUpdate },
    /// Ctrl+Alt+Del pressed on the i8042's keyboard.
    CtrlAltDel,
}

/// A runtime action and where its outcome goes.
pub struct RuntimeRequest {
    pub action: RuntimeAction,
    pub reply: Sender<Result<(), String>>,
}

/// How a control plane drives a VM that [`run_controlled`] runs: requests arrive on
/// `requests`, and `wake` (watched by the event loop) is written after each.
pub struct RunControl<'a> {
    pub requests: &'a Receiver<RuntimeRequest>,
    pub wake: EventFd,
    /// Called once, when the vCPUs run (the VM has started).
    pub on_started: Box<dyn FnOnce() + 'a>,
}

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
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

impl VmError {
    /// Errors that come from what the operator asked for (not enough memory on the host,
    /// a kernel that cannot be loaded), as opposed to runtime failures.
    pub fn is_config_error(&self) -> bool {
        match self {
            VmError::Memory(_) | VmError::Boot(_) | VmError::Mptable(_) | VmError::Acpi(_) => true,
            VmError::Devices(e) => e.is_config_error(),
            _ => false,
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// Sets how long KVM polls after one of this VM's vCPUs halts (`machine.halt_poll_ns`).
/// A kernel without the per-VM setting keeps its module-wide `kvm.halt_poll_ns`, and the
/// log warns that the configured value is not applied.
pub fn set_halt_polling(vm: &VmFd, ns: u32) -> Result<(), VmError> {
    if vm.check_extension_raw(KVM_CAP_HALT_POLL.into()) <= 0 {
        log::warn!(
            "this kernel has no per-VM halt polling (KVM_CAP_HALT_POLL): \
             /sys/module/kvm/parameters/halt_poll_ns applies instead of {ns} ns"
        );
        return Ok(());
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_HALT_POLL,
        ..Default::default()
    };
    cap.args[0] = u64::from(ns);
    vm.enable_cap(&cap).map_err(kvm_err("set halt polling"))
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
    run_controlled(cfg, kvm, host, start, image, None)
}

/// [`run_image`], with a control plane that is told when the VM has started and can
/// pause and resume it while it runs.
pub fn run_controlled(
    cfg: &ValidatedConfig,
    kvm: &Kvm,
    host: &dyn HostTopology,
    start: Instant,
    image: GuestImage,
    control: Option<RunControl>,
) -> Result<StopReason, VmError> {
    // SIGTERM/SIGINT from here on stop the VM cleanly: one that arrives during setup is
    // seen by the control loop as soon as it starts.
    let signal_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the signal event"))?;
    install_stop_signals(&signal_evt).map_err(io_err("signal handlers"))?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create the KVM VM"))?);
    if let Some(ns) = cfg.halt_poll_ns {
        set_halt_polling(&vm, ns)?;
    }
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
    // ai-inferd maps this memory and refuses any that could shrink under it.
    if cfg.ai_infer.is_some() {
        ram.require_sealed()?;
    }
    register_memory(&vm, &ram)?;
    log::info!(
        "guest RAM: {} MiB in {} zone(s), {} slot(s), {} ms after aivmm started",
        ram.size() >> 20,
        ram.zones.len(),
        ram.placements.len(),
        start.elapsed().as_millis()
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
    let mut base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read KVM's supported CPUID"))?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        cpuid::offer_tsc_deadline(&mut base_cpuid);
    }
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
    log::info!(
        "kernel entry {:#x} ({:?}), loaded {} ms after aivmm started",
        entry.entry,
        entry.mode,
        start.elapsed().as_millis()
    );

    let stop = Arc::new(Stop::new().map_err(io_err("the stop event"))?);
    // Devices: dropped (passthrough reset and DMA-unmapped, virtio workers stopped)
    // before the RAM, on every path.
    let mut devices = DeviceManager::new(vm.clone(), &ram, mmio64)?;
    let legacy = devices.attach_configured(cfg, &ram, start)?;

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
        fds.push((id, fd));
    }

    let raw_stdin = console::RawStdin::enable(&cfg.console);
    let mut control_loop = ControlLoop::new(
        stop.clone(),
        legacy.reset,
        legacy.poweroff,
        signal_evt,
        legacy.serial,
        stdin_pollable(),
    );
    let (requests, on_started) = match control {
        Some(c) => {
            let wake = c.wake.try_clone().map_err(io_err("the control event"))?;
            control_loop = control_loop.with_control_events(wake);
            (Some(c.requests), Some(c.on_started))
        }
        None => (None, None),
    };
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(VmError::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(control_loop)));
    let pause = Arc::new(Pause::default());

    let mut handles = Vec::with_capacity(fds.len());
    for (id, fd) in fds {
        let ctx = VcpuContext {
            id,
            io_bus: devices.io_bus().clone(),
            mmio_bus: devices.mmio_bus().clone(),
            stop: stop.clone(),
            affinity: cfg.vcpu_affinity.clone(),
            pause: pause.clone(),
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
    // Every thread this one starts is running: from here on it serves the event loop,
    // runtime requests and teardown under its own filter.
    if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Main) {
        stop.request(StopReason::VcpuError(e.to_string()));
    }

    if let Some(f) = on_started {
        f();
    }

    while !stop.is_requested() {
        events.run().map_err(VmError::EventLoop)?;
        if let Some(rx) = &requests {
            while let Ok(req) = rx.try_recv() {
                let outcome = match req.action {
                    RuntimeAction::Pause => pause_all(&handles, &pause, VCPU_PAUSE_TIMEOUT),
                    RuntimeAction::Resume => {
                        pause.release();
                        Ok(())
                    }
                    RuntimeAction::Update { id, update } => devices.update_virtio(&id, &update),
                    RuntimeAction::CtrlAltDel => devices.send_ctrl_alt_del(),
                };
                let _ = req.reply.send(outcome);
            }
        }
    }
    pause.release();
    for h in handles {
        h.stop(VCPU_STOP_TIMEOUT);
    }
    drop(raw_stdin);
    // Resets the devices, stops their threads and unmaps guest RAM from the IOMMU.
    devices.shutdown();
    drop(devices);
    // The VM goes before the RAM it maps.
    drop(events);
    drop(vm);
    drop(ram);
    Ok(stop
        .reason()
        .unwrap_or(StopReason::VcpuError("stopped without a reason".into())))
}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in (0u32..).zip(ram.memory.iter()) {
        let mem = kvm_userspace_memory_region {
            slot,
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
