//! The control API end to end: the real `aivmm` binary, configured and driven over its
//! unix socket (and from a JSON config file), booting a small hand-made 64-bit guest on
//! this machine's /dev/kvm (an ELF "kernel" of a few instructions: Linux can not boot on
//! the development machines' KVM).
//!
//! Skips (with a message) only when /dev/kvm does not exist.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LOAD_ADDR: u64 = 0x10_0000;

fn have_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("SKIP: no /dev/kvm");
        false
    }
}

/// A scratch directory, removed on drop.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("aivmm-api-it-{name}-"))
            .tempdir()
            .unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// 64-bit code: "ok\n" on the serial port, the boot-timer mark, then `tail`.
fn guest_code(tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"ok\n" {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0x66, 0xba, 0x40, 0x04, 0xb0, 0x7b, 0xee]); // init reached
    code.extend_from_slice(tail);
    code
}

/// Forever: a '.' on the serial port, then a delay loop.
const DOTS: [u8; 18] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'.', 0xee, // mov al, '.'; out dx, al
    0xb9, 0x00, 0x00, 0x02, 0x00, // mov ecx, 0x20000
    0xff, 0xc9, // dec ecx
    0x75, 0xfc, // jnz dec
    0xeb, 0xee, // jmp to the start of the loop
];

/// i8042 CPU reset, then hlt forever.
const RESET: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Polls the i8042 for keyboard bytes until Ctrl's release (0x9d, the last of Ctrl+Alt+Del
/// in scancode set 1), then resets through it; interrupts stay off.
const AWAIT_CTRL_ALT_DEL: [u8; 19] = [
    0xe4, 0x64, // in al, 0x64 (status)
    0xa8, 0x01, // test al, 1 (output buffer full)
    0x74, 0xfa, // jz back to the status read
    0xe4, 0x60, // in al, 0x60 (data)
    0x3c, 0x9d, // cmp al, 0x9d
    0x75, 0xf4, // jne back to the status read
    0xb0, 0xfe, 0xe6, 0x64, // i8042 CPU reset
    0xf4, 0xeb, 0xfd, // hlt forever
];

/// An ELF64 image of one PT_LOAD segment at 1 MiB, entered in 64-bit mode.
fn elf_kernel(path: &Path, code: &[u8]) {
    let (ehdr_len, phdr_len) = (64u16, 56u16);
    let offset = u64::from(ehdr_len + phdr_len);
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(ehdr_len).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [ehdr_len, phdr_len, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    for v in [offset, LOAD_ADDR, LOAD_ADDR, len, len, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    std::fs::write(path, f).unwrap();
}

/// One HTTP/1.1 request over the unix socket; returns the status and the body.
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn expect(sock: &Path, method: &str, path: &str, body: &str, status: u16) -> String {
    let (got, text) = http(sock, method, path, body);
    assert_eq!(got, status, "{method} {path} {body}: {text}");
    text
}

fn state(sock: &Path) -> String {
    let v = json(&expect(sock, "GET", "/", "", 200));
    v["state"].as_str().unwrap().to_string()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// Kills the child if a test fails half-way.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn aivmm(args: &[&str], console: &Path, log: &Path) -> Vmm {
    let child = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(console).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Vmm(child)
}

fn wait_exit(vmm: &mut Vmm, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = vmm.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "aivmm did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn configure_start_pause_resume_flush_and_stop_over_the_socket() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("lifecycle");
    let (sock, console, stderr) = (
        dir.path("api.sock"),
        dir.path("console"),
        dir.path("stderr"),
    );
    let (kernel, metrics, log) = (dir.path("kernel.elf"), dir.path("metrics"), dir.path("log"));
    elf_kernel(&kernel, &guest_code(&DOTS));
    let spawned = Instant::now();
    let mut vmm = aivmm(
        &["--api-sock", sock.to_str().unwrap(), "--id", "it-vm"],
        &console,
        &stderr,
    );
    wait_for("the API socket", Duration::from_secs(10), || {
        UnixStream::connect(&sock).is_ok()
    });
    let outside_us = spawned.elapsed().as_micros();

    let info = json(&expect(&sock, "GET", "/", "", 200));
    assert_eq!(info["state"], "Not started");
    assert_eq!(
        (info["id"].as_str(), info["app_name"].as_str()),
        (Some("it-vm"), Some("aivmm"))
    );
    let version = json(&expect(&sock, "GET", "/version", "", 200));
    assert_eq!(version["firecracker_version"], info["vmm_version"]);

    // Bad input: 400 with the reason, nothing changed.
    let fault = json(&expect(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32, "vcpus": 2}"#,
        400,
    ));
    assert!(fault["fault_message"]
        .as_str()
        .unwrap()
        .contains("unknown field `vcpus`"));
    expect(&sock, "PUT", "/boot-source", "{", 400);
    let m = json(&expect(
        &sock,
        "PATCH",
        "/vm",
        r#"{"state": "Paused"}"#,
        400,
    ));
    assert!(m["fault_message"]
        .as_str()
        .unwrap()
        .contains("after the VM starts"));

    let put = |path: &str, body: String| expect(&sock, "PUT", path, &body, 204);
    put(
        "/logger",
        format!(
            r#"{{"log_path": "{}", "level": "Info", "show_level": true}}"#,
            log.display()
        ),
    );
    put(
        "/metrics",
        format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    put(
        "/boot-source",
        format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            kernel.display()
        ),
    );
    put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#.to_string(),
    );
    let cfg = json(&expect(&sock, "GET", "/vm/config", "", 200));
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 32);
    assert_eq!(
        cfg["boot-source"]["kernel_image_path"],
        kernel.to_str().unwrap()
    );
    assert_eq!(cfg["metrics"]["metrics_path"], metrics.to_str().unwrap());

    put(
        "/actions",
        r#"{"action_type": "InstanceStart"}"#.to_string(),
    );
    assert_eq!(state(&sock), "Running");
    wait_for("the guest's output", Duration::from_secs(20), || {
        std::fs::read_to_string(&console).is_ok_and(|s| s.starts_with("ok\n."))
    });
    let m = json(&expect(
        &sock,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display()),
        400,
    ));
    assert!(m["fault_message"]
        .as_str()
        .unwrap()
        .contains("before the VM starts"));

    // Paused: the vCPU is out of the guest, the console stops growing.
    put_patch_vm(&sock, "Paused");
    assert_eq!(state(&sock), "Paused");
    let paused_at = file_len(&console);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(file_len(&console), paused_at, "the guest ran while paused");
    put_patch_vm(&sock, "Resumed");
    assert_eq!(state(&sock), "Running");
    wait_for("output after resuming", Duration::from_secs(20), || {
        file_len(&console) > paused_at
    });

    put("/actions", r#"{"action_type": "FlushMetrics"}"#.to_string());
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line = json(text.lines().last().unwrap());
    assert_eq!(line["put_api_requests"]["actions_count"], 2);
    assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 1);
    assert_eq!(line["patch_api_requests"]["vm_count"], 3);
    assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() > 4, "{line}");
    let wall = line["api_server"]["process_startup_time_us"]
        .as_u64()
        .unwrap();
    let cpu = line["api_server"]["process_startup_time_cpu_us"]
        .as_u64()
        .unwrap();
    assert!(wall > 0);
    println!(
        "API socket ready: {wall} us after main() (wall), {cpu} us CPU (whole process, \
         exec included), {outside_us} us from spawn to first connect (seen by the client)"
    );
    let prom = expect(&sock, "GET", "/metrics/prometheus", "", 200);
    assert!(prom.contains("aivmm_vcpu_exit_io_out "), "{prom}");

    // SIGTERM: an orderly stop, exit 0, the socket removed.
    // SAFETY: signals the child we spawned, whose pid we hold.
    unsafe { libc::kill(vmm.0.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut vmm, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert!(err.contains("VM stopped: signal 15"), "{err}");
    assert!(!sock.exists());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("[INFO]"), "{log_text}");
}

fn put_patch_vm(sock: &Path, state: &str) {
    expect(
        sock,
        "PATCH",
        "/vm",
        &format!(r#"{{"state": "{state}"}}"#),
        204,
    );
}

#[test]
fn a_json_config_file_boots_without_a_socket() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("config-file");
    let (kernel, cfg, console, stderr) = (
        dir.path("kernel.elf"),
        dir.path("vm.json"),
        dir.path("console"),
        dir.path("stderr"),
    );
    elf_kernel(&kernel, &guest_code(&RESET));
    let text = format!(
        r#"{{
  "boot-source": {{ "kernel_image_path": "{}", "boot_args": "console=ttyS0" }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": 32 }},
  "drives": [],
  "network-interfaces": []
}}"#,
        kernel.display()
    );
    std::fs::write(&cfg, &text).unwrap();
    let mut vmm = aivmm(
        &["--config-file", cfg.to_str().unwrap(), "--no-api"],
        &console,
        &stderr,
    );
    let status = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("the guest reset the machine"), "{err}");
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "ok\n");

    // A field aivmm does not know is refused by name, exit 2.
    std::fs::write(
        &cfg,
        text.replace("\"drives\"", "\"balloon\": {}, \"drives\""),
    )
    .unwrap();
    let mut vmm = aivmm(
        &["--config-file", cfg.to_str().unwrap(), "--no-api"],
        &console,
        &stderr,
    );
    let status = wait_exit(&mut vmm, Duration::from_secs(10));
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("unknown field `balloon`"), "{err}");

    // A VM that cannot start (more memory than the host has) ends aivmm with exit 2, and
    // the API socket it had opened is gone.
    std::fs::write(
        &cfg,
        text.replace("\"mem_size_mib\": 32", "\"mem_size_mib\": 1073741824"),
    )
    .unwrap();
    let sock = dir.path("api.sock");
    let mut vmm = aivmm(
        &[
            "--config-file",
            cfg.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        &console,
        &stderr,
    );
    let status = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("aivmm: error:"), "{err}");
    assert!(!sock.exists(), "the API socket was left behind: {err}");
}

#[test]
fn send_ctrl_alt_del_reaches_the_guest_through_the_i8042() {
    if !have_kvm() {
        return;
    }
    let dir = Scratch::new("cad");
    let (sock, kernel, console, stderr) = (
        dir.path("api.sock"),
        dir.path("kernel.elf"),
        dir.path("console"),
        dir.path("stderr"),
    );
    elf_kernel(&kernel, &guest_code(&AWAIT_CTRL_ALT_DEL));
    let mut vmm = aivmm(&["--api-sock", sock.to_str().unwrap()], &console, &stderr);
    wait_for("the API socket", Duration::from_secs(10), || {
        UnixStream::connect(&sock).is_ok()
    });
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    let m = json(&expect(&sock, "PUT", "/actions", cad, 400));
    assert!(m["fault_message"]
        .as_str()
        .unwrap()
        .contains("after the VM starts"));
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    expect(&sock, "PUT", "/boot-source", &boot, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 32}"#;
    expect(&sock, "PUT", "/machine-config", machine, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    expect(&sock, "PUT", "/actions", start, 204);
    wait_for("the guest's first output", Duration::from_secs(10), || {
        file_len(&console) >= 3
    });
    // The guest polls the keyboard and stays until the keys come.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        vmm.0.try_wait().unwrap(),
        None,
        "the guest stopped on its own"
    );
    expect(&sock, "PUT", "/actions", cad, 204);
    let status = wait_exit(&mut vmm, Duration::from_secs(10));
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("the guest reset the machine"), "{err}");
}
