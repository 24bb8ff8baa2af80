//! How much memory this process may lock: RLIMIT_MEMLOCK and CAP_IPC_LOCK.

/// Bit of the effective capability set that lifts RLIMIT_MEMLOCK.
const CAP_IPC_LOCK: u32 = 14;

/// What RLIMIT_MEMLOCK and the capabilities let this process lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockLimit {
    /// Soft limit in bytes (`u64::MAX` = unlimited).
    pub soft: u64,
    /// Hard limit in bytes (`u64::MAX` = unlimited).
    pub hard: u64,
    /// CAP_IPC_LOCK in the effective set: no limit applies.
    pub ipc_lock: bool,
}

impl MemlockLimit {
    /// This process's limits.
    pub fn current() -> Self {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the rlimit struct we own and nothing else.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } == 0;
        let bytes = |v: libc::rlim_t| {
            if v == libc::RLIM_INFINITY {
                u64::MAX
            } else {
                v
            }
        };
        let ipc_lock = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| effective_caps(&s))
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
        MemlockLimit {
            soft: if ok { bytes(rl.rlim_cur) } else { 0 },
            hard: if ok { bytes(rl.rlim_max) } else { 0 },
            ipc_lock,
        }
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_are_read_from_status() {
        let status = "Name:\taivmm\nCapPrm:\t0000000000000000\nCapEff:\t0000000000004000\n";
        assert_eq!(effective_caps(status), Some(1 << CAP_IPC_LOCK));
        assert_eq!(effective_caps("Name: x\n"), None);
    }
}
