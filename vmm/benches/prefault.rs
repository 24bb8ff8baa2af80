//! Prefault rate of a guest memory zone: 2 MiB hugepages vs 4 KiB pages, side by side.
//!
//! `cargo bench -p vmm --bench prefault [-- SIZE_MIB ROUNDS]` (default 2048 MiB, 3 rounds).
//! Needs root to reserve the hugepages; the previous pool size is restored afterwards.
//! Each round maps and prefaults one zone of each kind (MADV_POPULATE_WRITE, the same
//! parallel path aivmm uses at start) and unmaps it; the median of the rounds is reported.

use std::time::{Duration, Instant};

use vmm::config::{Backing, MemoryZoneConfig};
use vmm::memory::ZoneBacking;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_pool() -> u64 {
    std::fs::read_to_string(NR_HUGEPAGES)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn prefault_once(backing: Backing, size_mib: u64) -> Duration {
    let cfg = MemoryZoneConfig {
        id: format!("bench-{backing:?}"),
        size_mib,
        backing,
        host_node: None,
        prefault: true,
        lock: false,
        // The 4 KiB side of the comparison is 4 KiB pages, not THP.
        transparent_hugepages: false,
    };
    let zone = ZoneBacking::create(&cfg).expect("create zone");
    let start = Instant::now();
    let mapping = zone
        .map(0, usize::try_from(size_mib << 20).expect("zone size"), None)
        .expect("map and prefault zone");
    let elapsed = start.elapsed();
    drop(mapping);
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let size_mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);

    let old_pool = read_pool();
    let need = size_mib / 2;
    if let Err(e) = std::fs::write(NR_HUGEPAGES, (old_pool + need).to_string()) {
        eprintln!("cannot reserve {need} hugepages ({e}); run as root");
        std::process::exit(1);
    }
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < need {
        let _ = std::fs::write(NR_HUGEPAGES, old_pool.to_string());
        eprintln!("only {free} of {need} hugepages could be reserved");
        std::process::exit(1);
    }

    let mut small = Vec::new();
    let mut huge = Vec::new();
    for _ in 0..rounds {
        small.push(prefault_once(Backing::Memfd, size_mib));
        huge.push(prefault_once(Backing::Hugetlb2M, size_mib));
    }
    let _ = std::fs::write(NR_HUGEPAGES, old_pool.to_string());

    let gib = size_mib as f64 / 1024.0;
    let (s, h) = (median(small.clone()), median(huge.clone()));
    println!("prefault of a {size_mib} MiB zone, {rounds} rounds, median (min..max):");
    for (name, m, all) in [("4 KiB memfd", s, &small), ("2 MiB hugetlb", h, &huge)] {
        let min = all.iter().min().copied().unwrap_or_default();
        let max = all.iter().max().copied().unwrap_or_default();
        println!(
            "  {name:<14} {:>8.1} ms  {:>6.2} GiB/s  ({:.1}..{:.1} ms)",
            m.as_secs_f64() * 1e3,
            gib / m.as_secs_f64(),
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    println!(
        "  hugepages are {:.2}x faster to prefault",
        s.as_secs_f64() / h.as_secs_f64()
    );
}
