//! The threads aivmm starts: named, and with stacks smaller than Rust's 2 MiB default.

/// Stack of every thread the VMM and its devices start. Below 2 MiB on purpose: a 2 MiB stack
/// that the kernel places on a 2 MiB boundary is backed by a transparent huge page at its
/// first touch on hosts with THP `always` (seen on the rig's L1: one 2 MiB page, 2 MiB of
/// RSS, for a thread that uses a few KiB). 1 MiB leaves no aligned 2 MiB range to back, and is
/// far more than any of these threads uses (no recursion, no large frames).
pub const STACK_BYTES: usize = 1 << 20;

/// A thread builder with `name` and the VMM's stack size. A NUL byte (which would make
/// the spawn panic) is dropped from the name.
pub fn named(name: impl Into<String>) -> std::thread::Builder {
    let mut name = name.into();
    name.retain(|c| c != '\0');
    std::thread::Builder::new()
        .name(name)
        .stack_size(STACK_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_thread_runs_with_its_name_and_the_small_stack() {
        let t = named("worker-x")
            .spawn(|| {
                // A frame of a few hundred KiB fits; the name is the one given.
                let buf = std::hint::black_box([7u8; 256 * 1024]);
                (
                    std::thread::current().name().map(str::to_owned),
                    buf[buf.len() - 1],
                )
            })
            .unwrap();
        assert_eq!(t.join().unwrap(), (Some("worker-x".to_owned()), 7));
    }

    #[test]
    fn a_nul_in_the_name_is_dropped_rather_than_failing_the_spawn() {
        let t = named("blk-\0a")
            .spawn(|| std::thread::current().name().map(str::to_owned))
            .unwrap();
        assert_eq!(t.join().unwrap().as_deref(), Some("blk-a"));
    }
}
