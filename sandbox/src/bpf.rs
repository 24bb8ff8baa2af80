//! A classic-BPF evaluator for the filters' own tests: what a compiled filter answers for
//! one syscall on x86_64, computed the way the kernel would, without installing it.

use seccompiler::sock_filter;

/// `SECCOMP_RET_ALLOW`.
pub const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
/// `SECCOMP_RET_TRAP`: the action of every filter here for a syscall it does not list.
pub const TRAP: u32 = libc::SECCOMP_RET_TRAP;

/// The action (`SECCOMP_RET_ACTION_FULL` bits) `program` takes for syscall `nr` with
/// `args` on x86_64.
///
/// # Panics
/// On an instruction seccompiler does not emit, or a jump out of the program: both mean
/// the program is not one of the filters under test.
pub fn verdict(program: &[sock_filter], nr: i64, args: [u64; 6]) -> u32 {
    // struct seccomp_data: nr, arch, instruction pointer, args.
    let mut data = [0u8; 64];
    let nr = u32::try_from(nr).expect("syscall numbers are small and positive");
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    // AUDIT_ARCH_X86_64
    data[4..8].copy_from_slice(&0xc000_003e_u32.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let ins = &program[pc];
        pc += 1;
        match ins.code {
            // BPF_LD | BPF_W | BPF_ABS
            0x20 => {
                let k = ins.k as usize;
                acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("4 bytes"));
            }
            // BPF_ALU | BPF_AND | BPF_K
            0x54 => acc &= ins.k,
            // BPF_JMP | BPF_JA
            0x05 => pc += ins.k as usize,
            // BPF_JMP | BPF_JEQ / BPF_JGT / BPF_JGE | BPF_K
            0x15 | 0x25 | 0x35 => {
                let taken = match ins.code {
                    0x15 => acc == ins.k,
                    0x25 => acc > ins.k,
                    _ => acc >= ins.k,
                };
                pc += usize::from(if taken { ins.jt } else { ins.jf });
            }
            // BPF_RET | BPF_K
            0x06 => return ins.k & libc::SECCOMP_RET_ACTION_FULL,
            other => panic!("BPF instruction {other:#x} not understood here"),
        }
    }
}

/// The arguments of `ioctl(3, req)`.
pub fn ioctl(req: u64) -> [u64; 6] {
    [3, req, 0, 0, 0, 0]
}

/// The arguments of `socket(domain, SOCK_STREAM, 0)`.
pub fn socket(domain: libc::c_int) -> [u64; 6] {
    [
        u64::try_from(domain).expect("domains are positive"),
        1,
        0,
        0,
        0,
        0,
    ]
}

/// The flags the standard library's thread spawn passes to clone(2).
pub fn thread_clone_flags() -> u64 {
    u64::try_from(
        libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM,
    )
    .expect("positive flags")
}
