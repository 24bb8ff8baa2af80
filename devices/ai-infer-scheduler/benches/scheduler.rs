//! Scheduler decision time per request at 4 tenants (see `ai_infer_scheduler::overhead`):
//! submit + poll + complete with a fake clock, no inference. Target: ≤ 2 µs.
//!
//! Run: `cargo bench -p ai-infer-scheduler --bench scheduler`.

use ai_infer_scheduler::overhead::{best_of, CASES, TENANTS};

fn main() {
    println!("scheduler decision time per request, {TENANTS} tenants (submit + poll + complete)");
    println!("{:<40} {:>12} {:>8}", "case", "ns/request", "≤ 2 µs");
    for case in &CASES {
        match best_of(case, 5, 200_000) {
            Some(best) => println!(
                "{:<40} {:>12.0} {:>8}",
                case.name,
                best,
                if best <= 2_000.0 { "yes" } else { "NO" }
            ),
            None => println!("{:<40} {:>12} {:>8}", case.name, "failed", "NO"),
        }
    }
}
