//! NUMA placement syscalls: bind a mapping to a node, pin the calling thread to CPUs.

use std::io;

use crate::host::CpuSet;

/// `MPOL_BIND` from <linux/mempolicy.h>: allocate only from the given nodes.
const MPOL_BIND: libc::c_int = 2;
/// Node mask words we pass to mbind: covers 1024 nodes.
const NODEMASK_WORDS: usize = 16;

/// Binds `[addr, addr+len)` to `node` before any page is touched, so every later fault
/// (prefault or guest access) allocates on that node or fails.
pub fn bind_to_node(addr: *mut u8, len: usize, node: u32) -> io::Result<()> {
    let word = node as usize / 64;
    if word >= NODEMASK_WORDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NUMA node {node} is above the supported maximum"),
        ));
    }
    let mut mask = [0 as libc::c_ulong; NODEMASK_WORDS];
    mask[word] |= 1 << (node % 64);
    // SAFETY: mbind only changes the memory policy of the given range of our own mapping;
    // `mask` is a valid array of NODEMASK_WORDS words and maxnode says how many bits it has.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as usize,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            (NODEMASK_WORDS * 64) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &CpuSet) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmask for which all-zeroes is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus.iter() {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} does not fit in a cpu_set_t"),
            ));
        }
        // SAFETY: `cpu` was checked to be below CPU_SETSIZE, so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t and we pass its exact size; pid 0 is this thread.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
