//! Fast tests against the real /dev/kvm with small hand-made real-mode guests: the whole
//! VMM path (memory, vCPU thread, port bus, devices, event loop, stop) without Linux.
//!
//! The KVM on the development machines emulates guest ring-0 code slowly and cannot boot
//! Linux, but a few dozen real-mode instructions run fine. Tests skip (with a message)
//! only when /dev/kvm does not exist at all.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use tempfile::TempPath;
use vmm::config::{
    AiInferConfig, Backing, ConsoleConfig, ConsoleMode, MemoryZoneConfig, ValidatedConfig,
};
use vmm::host::SysfsHost;
use vmm::vcpu::StopReason;
use vmm::vm::{run_image, GuestImage};

/// The VMM installs process-wide signal handlers: run one VM at a time.
static ONE_VM: Mutex<()> = Mutex::new(());

const LOAD_ADDR: u64 = 0x1000;

fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIP: no usable /dev/kvm ({e})");
            None
        }
    }
}

fn config(console: &Path, vcpus: u8, backing: Backing) -> ValidatedConfig {
    ValidatedConfig {
        vcpus,
        vcpu_affinity: None,
        halt_poll_ns: None,
        kernel: PathBuf::from("/unused"),
        initrd: None,
        cmdline: String::new(),
        zones: vec![MemoryZoneConfig {
            id: "mem0".into(),
            size_mib: 32,
            backing,
            host_node: None,
            prefault: false,
            lock: false,
            transparent_hugepages: true,
        }],
        console: ConsoleConfig {
            mode: ConsoleMode::File,
            path: Some(console.to_path_buf()),
        },
        drives: Vec::new(),
        net: Vec::new(),
        vsock: None,
        ai_infer: None,
        passthrough: Vec::new(),
        memlock_raise: None,
        warnings: Vec::new(),
    }
}

/// A new empty file for the guest console, removed when the returned path drops. Not a
/// temporary directory: the path drops on the test's thread, which by then has the main
/// thread's seccomp filter, and that filter allows `unlink` but not what removing a
/// directory tree takes.
fn console_path(name: &str) -> TempPath {
    tempfile::Builder::new()
        .prefix(&format!("aivmm-test-{name}-"))
        .suffix(".log")
        .tempfile()
        .unwrap()
        .into_temp_path()
}

/// Real-mode code: `mov dx, port; mov al, byte; out dx, al` for each (port, byte).
fn outs(seq: &[(u16, u8)]) -> Vec<u8> {
    let mut code = Vec::new();
    for &(port, byte) in seq {
        code.push(0xba); // mov dx, imm16
        code.extend_from_slice(&port.to_le_bytes());
        code.extend_from_slice(&[0xb0, byte]); // mov al, imm8
        code.push(0xee); // out dx, al
    }
    code
}

const HLT_LOOP: [u8; 3] = [0xf4, 0xeb, 0xfd]; // hlt; jmp back to hlt

/// Runs the VM with the seccomp filters on, as the binary does: the vCPU and device
/// threads get theirs, and the test's thread the main thread's once the vCPUs run (each
/// test runs on a thread of its own, which ends with the test).
fn run(code: &[u8], cfg: &ValidatedConfig, kvm: &Kvm) -> StopReason {
    static FILTERS: std::sync::Once = std::sync::Once::new();
    FILTERS.call_once(|| vmm::seccomp::enable().expect("seccomp filters"));
    let host = SysfsHost::default();
    run_image(
        cfg,
        kvm,
        &host,
        Instant::now(),
        GuestImage::RealMode {
            code,
            addr: LOAD_ADDR,
        },
    )
    .expect("VM runs")
}

#[test]
fn serial_output_and_i8042_reset_end_the_vm_cleanly() {
    let Some(kvm) = kvm() else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = console_path("serial");
    let mut code = outs(&[(0x3f8, b'o'), (0x3f8, b'k'), (0x3f8, b'\n'), (0x64, 0xfe)]);
    code.extend_from_slice(&HLT_LOOP);
    let reason = run(&code, &config(&log, 1, Backing::Memfd), &kvm);
    assert_eq!(reason, StopReason::GuestReset);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ok\n");
}

#[test]
fn boot_timer_port_and_unknown_ports_do_not_disturb_the_guest() {
    let Some(kvm) = kvm() else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = console_path("timer");
    // Unclaimed port 0x1234, then the boot-timer magic, then output and reset.
    let mut code = outs(&[(0x1234, 0x55), (0x440, 0x7b), (0x3f8, b'!'), (0x64, 0xfe)]);
    code.extend_from_slice(&HLT_LOOP);
    let reason = run(&code, &config(&log, 2, Backing::Anonymous), &kvm);
    assert_eq!(reason, StopReason::GuestReset);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "!");
}

#[test]
fn kvm_takes_the_per_vm_halt_polling_setting() {
    let Some(kvm) = kvm() else { return };
    let vm = kvm.create_vm().unwrap();
    if vm.check_extension_raw(kvm_bindings::KVM_CAP_HALT_POLL.into()) <= 0 {
        eprintln!("SKIP: this kernel has no KVM_CAP_HALT_POLL");
        return;
    }
    // Off, KVM's own default, and KVM's largest value.
    for ns in [0, 200_000, u32::MAX] {
        vmm::vm::set_halt_polling(&vm, ns).unwrap_or_else(|e| panic!("{ns} ns: {e}"));
    }
}

#[test]
fn sigterm_stops_a_halted_guest_with_exit_code_zero() {
    let Some(kvm) = kvm() else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = console_path("sigterm");
    // cli; hlt forever: only the host can end this VM.
    let code = [0xfa, 0xf4, 0xeb, 0xfd];
    let cfg = config(&log, 1, Backing::Memfd);
    let killer = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: sends SIGTERM to our own process; the VMM's handler is installed by then.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let started = Instant::now();
    let reason = run(&code, &cfg, &kvm);
    killer.join().unwrap();
    assert_eq!(reason, StopReason::Signal(libc::SIGTERM));
    assert_eq!(reason.exit_code(), 0);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn acpi_sleep_control_s5_powers_the_vm_off() {
    let Some(kvm) = kvm() else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = console_path("poweroff");
    // (SLP_TYP 5 << 2) | SLP_EN to the sleep control register, as Linux's acpi_power_off.
    let mut code = outs(&[(0x3c0, (5 << 2) | 0x20)]);
    code.extend_from_slice(&HLT_LOOP);
    let reason = run(&code, &config(&log, 1, Backing::Memfd), &kvm);
    assert_eq!(reason, StopReason::GuestShutdown("ACPI power off"));
    assert_eq!(reason.exit_code(), 0);
}

/// Real-mode code that reads PCI config dword `reg` of 00:`slot`.0 through 0xCF8/0xCFC
/// and writes its four bytes (little-endian) to the serial port.
fn pci_read_to_serial(slot: u8, reg: u8) -> Vec<u8> {
    let address = 0x8000_0000u32 | u32::from(slot) << 11 | u32::from(reg) << 2;
    let mut code = vec![0x66, 0xb8]; // mov eax, imm32
    code.extend_from_slice(&address.to_le_bytes());
    code.extend_from_slice(&[0xba, 0xf8, 0x0c, 0x66, 0xef]); // mov dx, 0xcf8; out dx, eax
    code.extend_from_slice(&[0xba, 0xfc, 0x0c, 0x66, 0xed]); // mov dx, 0xcfc; in eax, dx
    code.extend_from_slice(&[0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
    for _ in 0..3 {
        code.extend_from_slice(&[0x66, 0xc1, 0xe8, 0x08, 0xee]); // shr eax, 8; out dx, al
    }
    code
}

#[test]
fn pci_bus_shows_the_ai_infer_device_before_its_backend_connects() {
    let Some(kvm) = kvm() else { return };
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let log = console_path("pci");
    let mut cfg = config(&log, 1, Backing::Memfd);
    // Nothing listens on this socket: the device must still appear, and the VM must
    // still stop promptly (the connector thread retries in the background).
    cfg.ai_infer = Some(AiInferConfig {
        // In a directory that does not exist, so no process can be listening there.
        socket: PathBuf::from("/nonexistent/aivmm-no-daemon.sock"),
        queues: 1,
        queue_size: 256,
        backend_uid: None,
        backend_gid: None,
    });
    let mut code = Vec::new();
    code.extend(pci_read_to_serial(0, 0)); // host bridge id
    code.extend(pci_read_to_serial(1, 0)); // ai_infer id
    code.extend(pci_read_to_serial(1, 2)); // class / revision
    code.extend(pci_read_to_serial(1, 4)); // BAR 0 low
    code.extend(pci_read_to_serial(2, 0)); // empty slot
    code.extend(outs(&[(0x64, 0xfe)]));
    code.extend_from_slice(&HLT_LOOP);
    let started = Instant::now();
    let reason = run(&code, &cfg, &kvm);
    assert_eq!(reason, StopReason::GuestReset);
    assert!(started.elapsed() < Duration::from_secs(10));
    let out = std::fs::read(&log).unwrap();
    let dwords: Vec<u32> = out
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        dwords,
        vec![
            0x0008_1b36, // Red Hat host bridge
            0x107c_1af4, // virtio ai_infer
            0x1200_0001, // class 12/00/00, revision 1
            0xc000_0004, // BAR 0 in the 32-bit window, 64-bit memory BAR
            0xffff_ffff, // nothing at 00:02.0
        ]
    );
}
