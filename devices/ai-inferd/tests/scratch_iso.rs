use std::sync::Arc;
use std::time::Duration;
use ai_infer_protocol::PriorityClass;
use ai_inferd::backend::synthetic::SyntheticModel;
use ai_inferd::backend::Backend;
use ai_inferd::bench::{load, BenchDaemon, TenantDef};

#[test]
fn scratch() {
    for reserved in [1u32, 0] {
        let tenants = vec![TenantDef::new("rt", 1, "realtime"), TenantDef::new("f0", 1, "batch")];
        let m: Arc<dyn Backend> = Arc::new(SyntheticModel::new(20, "s", 8, Duration::from_millis(7), Duration::from_millis(3)));
        let d = BenchDaemon::start(2, reserved, &tenants, vec![m]).unwrap();
        let rt = load::Load { socket: d.socket("rt"), model: 20, class: PriorityClass::Realtime,
            pattern: load::Pattern::Periodic { interval: Duration::from_millis(25), offset: Duration::ZERO }, deadline_us: 0 };
        let runs = load::spawn(&[rt], Duration::from_secs(3)).unwrap().join().unwrap();
        let mut l: Vec<(u64,u64)> = runs[0].outcomes.iter().map(|o| (o.latency_ns/1000, o.device_ns/1000)).collect();
        l.sort();
        println!("reserved {reserved}: n={} {:?}", l.len(), &l[l.len()-10..]);
        println!("first: {:?}", &runs[0].outcomes[..5].iter().map(|o| (o.submitted, o.latency_ns/1000, o.device_ns/1000)).collect::<Vec<_>>());
    }
}
