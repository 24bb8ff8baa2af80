//! The overhead and containment phases of `ai-inferd bench`, run with tiny sizes so
//! they cannot rot. No timing is asserted: only that every request was measured and
//! answered as it should be, and that each neighbour really attacked.

use std::time::Duration;

use crate::bench::containment::{self, Attack};
use crate::bench::{self, paravirt, BenchOptions, Phase};

fn tiny(only: Phase) -> BenchOptions {
    BenchOptions {
        phase: Duration::from_millis(450),
        warmup: Duration::from_millis(200),
        rounds: 2,
        requests_per_round: 5,
        only: vec![only],
        ..BenchOptions::default()
    }
}

#[test]
fn the_overhead_phase_measures_every_request_both_ways() {
    let o = tiny(Phase::Overhead);
    let m = paravirt::measure(&o).unwrap();
    println!("{}", m.model);
    assert_eq!(m.path_ns.len(), 10);
    assert_eq!(m.direct_ns.len(), 10);
    assert_eq!(m.round_p50_added_ns.len(), 2);
    // One timer probe per round at this size.
    assert_eq!(m.timer_late_ns.len(), 2);
    assert!(m.path_ns.iter().chain(&m.direct_ns).all(|ns| *ns > 0));

    let report = bench::run(&o).unwrap();
    let figures: Vec<&str> = report.rows.iter().map(|r| r.figure.as_str()).collect();
    assert_eq!(figures.len(), 3, "{figures:?}");
    assert!(figures[0].contains("(p50)") && figures[1].contains("(p99)"));
    assert!(report.rows[..2].iter().all(|r| r.met.is_some()));
    assert!(report.render().contains("one request at a time"));
}

#[test]
fn the_containment_phase_measures_the_tenant_beside_each_real_attack() {
    let c = containment::measure(&tiny(Phase::Containment)).unwrap();
    let attacks: Vec<Attack> = c.runs.iter().map(|r| r.attack).collect();
    assert_eq!(attacks, Attack::ALL);
    for r in &c.runs {
        assert!(!r.alone_ns.is_empty(), "{:?}: nothing alone", r.attack);
        assert!(
            !r.attacked_ns.is_empty(),
            "{:?}: nothing attacked",
            r.attack
        );
        assert_eq!(
            r.failed, 0,
            "{:?}: the well-behaved tenant failed",
            r.attack
        );
        assert!(
            r.neighbour_done > 0,
            "{:?}: the neighbour did nothing",
            r.attack
        );
        let row = r.row();
        assert!(row.met.is_some() && row.measured.contains('×'), "{row:?}");
    }
    let panic = &c.runs[2];
    assert_eq!(
        panic.neighbour_other, 0,
        "a panicking request was not an error"
    );
    assert!(panic.panics >= panic.neighbour_done, "{panic:?}");
}
