//! From the configuration to what runs — each tenant's [`Grant`], the scheduler's
//! settings and model policies — at start-up and at every reload (SIGHUP, or the
//! `reload` command of the metrics socket).
//!
//! A reload is all or nothing. [`plan`] checks the new configuration against the
//! running one and either returns everything to apply, or says why nothing is: the
//! file is invalid, a tenant was added or removed (each tenant owns a listening
//! socket and a connection; changing that set needs a restart), or a setting that
//! is fixed while running changed (a tenant's socket or queue count, the models,
//! the executors and their placement, the metrics socket).
//!
//! What changes live, without dropping connections: per tenant the weight,
//! priority ceiling, `max_in_flight`, `rate_rps`/`burst`, `accel_share` and
//! `allowed_models` (the scheduler keeps queues, fair-share counters and tokens;
//! the config space shows the new `max_in_flight` from the next connection on),
//! and daemon-wide `max_batch_delay_us`, `reserved_executors`,
//! `reserved_min_class` and the class wait bounds (`max_wait_ms`).
//! A tenant's `uid`/`gid` and the daemon's `handshake_timeout_ms` apply from the
//! next connection on (the socket's owner, set when it was created, stays).

use ai_infer_protocol::DeviceConfig;
use ai_infer_scheduler::{ExecutorId, SchedulerConfig};
use thiserror::Error;

use crate::config::{Config, ConfigError, DaemonSection, TenantConfig};
use crate::registry::{ModelRegistry, RegistryError};
use crate::tenant::socket::PeerRule;
use crate::tenant::Grant;

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, Error)]
pub enum ReloadError {
    /// The new file cannot be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// There is no file to read again.
    #[error("the running configuration was not loaded from a file")]
    NoSource,
    /// The set of tenants changed.
    #[error(
        "tenants cannot be added or removed by a reload (added: {added}; removed: {removed}); \
         restart the daemon"
    )]
    Tenants {
        /// Names of new tenants, or "none".
        added: String,
        /// Names of removed tenants, or "none".
        removed: String,
    },
    /// A setting that is fixed while running changed.
    #[error("{what} cannot change by a reload ({from} -> {to}); restart the daemon")]
    Fixed {
        /// Which setting.
        what: String,
        /// The running value.
        from: String,
        /// The new value.
        to: String,
    },
    /// A tenant allows a model that is not loaded.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What `t` is granted, with its allowed model names resolved in `registry`.
pub fn grant(t: &TenantConfig, registry: &ModelRegistry) -> Result<Grant, RegistryError> {
    Ok(Grant {
        policy: t.policy(),
        allowed_ids: registry.allowed_ids(&t.name, &t.allowed())?,
        device_config: DeviceConfig {
            num_request_queues: t.num_request_queues,
            max_in_flight: t.max_in_flight,
            ..DeviceConfig::default()
        },
        peer: PeerRule {
            uid: t.uid,
            gid: t.gid,
        },
    })
}

/// The reserved executors of `d`: the last `reserved_executors` of them.
pub fn reserved_executors(d: &DaemonSection) -> Vec<ExecutorId> {
    let first = d.executor_threads.saturating_sub(d.reserved_executors);
    (first..d.executor_threads).map(ExecutorId).collect()
}

/// `base` with the settings `d` controls.
pub fn scheduler_config(base: &SchedulerConfig, d: &DaemonSection) -> SchedulerConfig {
    SchedulerConfig {
        reserved_executors: reserved_executors(d),
        reserved_min_class: d.reserved_min_class.into(),
        classes: d.max_wait_ms.policy(),
        ..base.clone()
    }
}

/// Everything a reload applies.
#[derive(Debug)]
pub struct ReloadPlan {
    /// New grant per tenant, by index in the running configuration's tenant list
    /// (which is each tenant's id), only for tenants whose grant changed.
    pub grants: Vec<(usize, Grant)>,
    /// One entry per change, e.g. `vm-a: weight 1 -> 4`.
    pub changes: Vec<String>,
    /// The new configuration; tenants in the running configuration's order, so
    /// that index = tenant id stays true.
    pub config: Config,
}

impl ReloadPlan {
    /// One line: the changes, or that there were none.
    pub fn summary(&self) -> String {
        if self.changes.is_empty() {
            "no changes".into()
        } else {
            self.changes.join("; ")
        }
    }
}

fn fixed(
    what: impl Into<String>,
    from: impl std::fmt::Debug,
    to: impl std::fmt::Debug,
) -> ReloadError {
    ReloadError::Fixed {
        what: what.into(),
        from: format!("{from:?}"),
        to: format!("{to:?}"),
    }
}

fn names_or_none(names: Vec<&str>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Checks `new` against the running `current` and lists what to apply.
pub fn plan(
    current: &Config,
    mut new: Config,
    registry: &ModelRegistry,
) -> Result<ReloadPlan, ReloadError> {
    let (a, b) = (&current.daemon, &new.daemon);
    if a.models != b.models {
        return Err(fixed("daemon.models", &a.models, &b.models));
    }
    if a.metrics_socket != b.metrics_socket {
        return Err(fixed(
            "daemon.metrics_socket",
            a.metrics_socket.as_ref().map(ToString::to_string),
            b.metrics_socket.as_ref().map(ToString::to_string),
        ));
    }
    if a.executor_threads != b.executor_threads {
        return Err(fixed(
            "daemon.executor_threads",
            a.executor_threads,
            b.executor_threads,
        ));
    }
    if a.executor_cpus != b.executor_cpus {
        return Err(fixed(
            "daemon.executor_cpus",
            &a.executor_cpus,
            &b.executor_cpus,
        ));
    }
    if a.numa_node != b.numa_node || a.executor_numa_nodes != b.executor_numa_nodes {
        return Err(fixed(
            "daemon.numa_node / executor_numa_nodes",
            (a.numa_node, &a.executor_numa_nodes),
            (b.numa_node, &b.executor_numa_nodes),
        ));
    }

    let added: Vec<&str> = new
        .tenants
        .iter()
        .filter(|t| !current.tenants.iter().any(|c| c.name == t.name))
        .map(|t| t.name.as_str())
        .collect();
    let removed: Vec<&str> = current
        .tenants
        .iter()
        .filter(|c| !new.tenants.iter().any(|t| t.name == c.name))
        .map(|c| c.name.as_str())
        .collect();
    if !added.is_empty() || !removed.is_empty() {
        return Err(ReloadError::Tenants {
            added: names_or_none(added),
            removed: names_or_none(removed),
        });
    }

    let mut changes = Vec::new();
    for (what, from, to) in [
        (
            "max_batch_delay_us",
            a.max_batch_delay_us.to_string(),
            b.max_batch_delay_us.to_string(),
        ),
        (
            "reserved_executors",
            a.reserved_executors.to_string(),
            b.reserved_executors.to_string(),
        ),
        (
            "reserved_min_class",
            format!("{:?}", a.reserved_min_class),
            format!("{:?}", b.reserved_min_class),
        ),
        (
            "max_wait_ms",
            a.max_wait_ms.to_string(),
            b.max_wait_ms.to_string(),
        ),
        (
            "handshake_timeout_ms",
            a.handshake_timeout_ms.to_string(),
            b.handshake_timeout_ms.to_string(),
        ),
    ] {
        if from != to {
            changes.push(format!("daemon: {what} {from} -> {to}"));
        }
    }

    // Same order as the running list: a tenant's index is its id.
    let mut ordered = Vec::with_capacity(current.tenants.len());
    let mut grants = Vec::new();
    for (index, old) in current.tenants.iter().enumerate() {
        let Some(pos) = new.tenants.iter().position(|t| t.name == old.name) else {
            continue;
        };
        let t = new.tenants.swap_remove(pos);
        if t.socket != old.socket {
            return Err(fixed(
                format!("tenant {:?} socket", t.name),
                &old.socket,
                &t.socket,
            ));
        }
        if t.num_request_queues != old.num_request_queues {
            return Err(fixed(
                format!("tenant {:?} num_request_queues", t.name),
                old.num_request_queues,
                t.num_request_queues,
            ));
        }
        let new_grant = grant(&t, registry)?;
        let mut changed = Vec::new();
        let mut note = |what: &str, from: String, to: String| {
            if from != to {
                changed.push(format!("{what} {from} -> {to}"));
            }
        };
        note("weight", old.weight.to_string(), t.weight.to_string());
        note(
            "priority_ceiling",
            format!("{:?}", old.priority_ceiling),
            format!("{:?}", t.priority_ceiling),
        );
        note(
            "max_in_flight",
            old.max_in_flight.to_string(),
            t.max_in_flight.to_string(),
        );
        note(
            "rate_rps",
            format!("{:?}", old.rate_rps),
            format!("{:?}", t.rate_rps),
        );
        note("burst", old.burst.to_string(), t.burst.to_string());
        note(
            "accel_share",
            format!("{:?}", old.accel_share),
            format!("{:?}", t.accel_share),
        );
        note(
            "allowed_models",
            format!("{:?}", old.allowed_models),
            format!("{:?}", t.allowed_models),
        );
        note("uid", format!("{:?}", old.uid), format!("{:?}", t.uid));
        note("gid", format!("{:?}", old.gid), format!("{:?}", t.gid));
        if !changed.is_empty() {
            changes.push(format!("{}: {}", t.name, changed.join(", ")));
            grants.push((index, new_grant));
        }
        ordered.push(t);
    }
    new.tenants = ordered;
    Ok(ReloadPlan {
        grants,
        changes,
        config: new,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, RequestOutcome, RequestTensors};
    use ai_infer_protocol::{DType, DimRange, ModelInfo, TensorSpec};
    use std::sync::Arc;

    struct Named(ModelInfo);

    impl Backend for Named {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn max_batch(&self) -> usize {
            1
        }
        fn run(&self, _: &mut [RequestTensors<'_>]) -> Vec<RequestOutcome> {
            Vec::new()
        }
    }

    fn registry() -> ModelRegistry {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            dims: vec![DimRange::new(1, 4)],
        };
        let model = |id, name: &str| -> Arc<dyn Backend> {
            Arc::new(Named(ModelInfo {
                id,
                name: name.into(),
                max_batch: 1,
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            }))
        };
        ModelRegistry::new(vec![model(1, "m1"), model(2, "m2")]).unwrap()
    }

    const BASE: &str = r#"
        [daemon]
        models = "m.toml"
        executor_threads = 2
        [[tenant]]
        name = "a"
        socket = "/tmp/a.sock"
        allowed_models = ["m1"]
        [[tenant]]
        name = "b"
        socket = "/tmp/b.sock"
        weight = 2
    "#;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn live_settings_change_and_are_listed() {
        let current = config(BASE);
        let text = BASE
            .replace(
                "weight = 2",
                "weight = 5\nmax_in_flight = 3\nrate_rps = 10.0",
            )
            .replace("[\"m1\"]", "[\"m1\", \"m2\"]")
            .replace(
                "executor_threads = 2",
                "executor_threads = 2\nreserved_executors = 1",
            );
        let p = plan(&current, config(&text), &registry()).unwrap();
        assert_eq!(p.grants.len(), 2);
        let (a, b) = (&p.grants[0], &p.grants[1]);
        assert_eq!((a.0, a.1.allowed_ids.clone()), (0, vec![1, 2]));
        assert_eq!(b.0, 1);
        assert_eq!(b.1.policy.weight, 5);
        assert_eq!(b.1.policy.max_in_flight, 3);
        assert_eq!(b.1.policy.rate_rps, Some(10.0));
        assert_eq!(b.1.device_config.max_in_flight, 3);
        let summary = p.summary();
        assert!(
            summary.contains("daemon: reserved_executors 0 -> 1"),
            "{summary}"
        );
        assert!(
            summary.contains("b: weight 2 -> 5, max_in_flight 64 -> 3"),
            "{summary}"
        );
        assert!(summary.contains("a: allowed_models"), "{summary}");
        assert_eq!(reserved_executors(&p.config.daemon), vec![ExecutorId(1)]);
        // Unchanged: nothing to apply.
        let same = plan(&current, config(BASE), &registry()).unwrap();
        assert!(same.grants.is_empty());
        assert_eq!(same.summary(), "no changes");
    }

    #[test]
    fn class_wait_bounds_change_live_and_reach_the_scheduler() {
        let current = config(BASE);
        let text = BASE.replace(
            "[[tenant]]\n        name = \"a\"",
            "[daemon.max_wait_ms]\n        normal = 1500\n        [[tenant]]\n        name = \"a\"",
        );
        let p = plan(&current, config(&text), &registry()).unwrap();
        assert!(p.grants.is_empty());
        assert_eq!(
            p.summary(),
            "daemon: max_wait_ms batch 2000, normal 500, interactive 100, realtime 0 -> \
             batch 2000, normal 1500, interactive 100, realtime 0"
        );
        let applied = scheduler_config(&SchedulerConfig::default(), &p.config.daemon);
        assert_eq!(applied.classes.max_wait_ns[1], Some(1_500_000_000));
        assert_eq!(
            applied.classes.max_wait_ns[0],
            SchedulerConfig::default().classes.max_wait_ns[0]
        );
    }

    #[test]
    fn tenants_keep_their_ids_when_the_file_reorders_them() {
        let current = config(BASE);
        let a_start = BASE.find("[[tenant]]").unwrap();
        let b_start = BASE.rfind("[[tenant]]").unwrap();
        let swapped = format!(
            "{}{}\n{}",
            &BASE[..a_start],
            BASE[b_start..].replace("weight = 2", "weight = 9"),
            &BASE[a_start..b_start]
        );
        let p = plan(&current, config(&swapped), &registry()).unwrap();
        assert_eq!(p.grants.len(), 1);
        assert_eq!(p.grants[0].0, 1, "b is still tenant 1");
        assert_eq!(p.config.tenants[1].name, "b");
    }

    #[test]
    fn fixed_settings_and_tenant_set_changes_are_refused() {
        let current = config(BASE);
        let reg = registry();
        for (from, to, needle) in [
            ("/tmp/b.sock", "/tmp/c.sock", "tenant \"b\" socket"),
            (
                "executor_threads = 2",
                "executor_threads = 3",
                "executor_threads",
            ),
            (
                "models = \"m.toml\"",
                "models = \"n.toml\"",
                "daemon.models",
            ),
            (
                "weight = 2",
                "weight = 2\nnum_request_queues = 2",
                "num_request_queues",
            ),
            (
                "executor_threads = 2",
                "executor_threads = 2\nnuma_node = 0",
                "numa_node",
            ),
            (
                "executor_threads = 2",
                "executor_threads = 2\nmetrics_socket = \"/tmp/m\"",
                "metrics_socket",
            ),
        ] {
            let err = plan(&current, config(&BASE.replace(from, to)), &reg).unwrap_err();
            assert!(matches!(err, ReloadError::Fixed { .. }), "{to}: {err}");
            assert!(err.to_string().contains(needle), "{err}");
            assert_eq!(err.to_string().lines().count(), 1);
        }
        let renamed = BASE.replace("name = \"b\"", "name = \"c\"");
        let err = plan(&current, config(&renamed), &reg).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tenants cannot be added or removed by a reload (added: c; removed: b); \
             restart the daemon"
        );
        let unknown = BASE.replace("[\"m1\"]", "[\"m9\"]");
        assert!(matches!(
            plan(&current, config(&unknown), &reg),
            Err(ReloadError::Registry(_))
        ));
    }
}
