//! The controller: applies parsed requests to the VM's config before it starts, starts it,
//! and drives it afterwards, with Firecracker's pre-boot/post-boot rules.
//!
//! Before `InstanceStart` every `PUT` changes a [`VmConfig`] (the TOML's type) and runs the
//! config's own check for that resource; `InstanceStart` runs the whole of
//! [`VmConfig::validate`] and hands the result to the VM's owner through [`VmBackend`].

use std::fs::OpenOptions;

use serde::Serialize;

use super::convert::{self, Refused};
use super::metrics::{self, Counters, MetricsSink};
use super::routes::Request;
use super::types::{
    ActionType, FirecrackerVersion, InstanceInfo, InstanceState, Logger, Metrics, VmStateRequest,
};
use super::Response;
use crate::config::{ConfigError, ValidatedConfig, VmConfig};
use crate::host::SysfsHost;
use crate::vm::RuntimeAction;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::DeviceUpdate;

/// `app_name` in `GET /`.
pub const APP_NAME: &str = "aivmm";
/// aivmm's version, reported as `vmm_version` and `firecracker_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whoever owns the VM: boots a validated config and applies runtime actions.
pub trait VmBackend: Send {
    /// Builds and starts the VM; returns once its vCPUs run, or why it could not start.
    fn start(&mut self, cfg: ValidatedConfig) -> Result<(), String>;
    /// Applies `action` to the running VM.
    fn runtime(&mut self, action: RuntimeAction) -> Result<(), String>;
}

/// The API's view of one VM.
pub struct Controller {
    id: String,
    config: VmConfig,
    /// API ids of `config.passthrough`, in order.
    passthrough_ids: Vec<String>,
    logger: Option<Logger>,
    metrics: Option<MetricsSink>,
    state: InstanceState,
    host: SysfsHost,
    kvm_max_vcpus: usize,
    backend: Box<dyn VmBackend>,
    counters: Counters,
}

/// A PATCH's limiters are checked before anything reaches the running device, so a bad
/// one changes nothing (not even the rest of the same request).
/// The device a runtime PATCH names.
struct PatchTarget<'a> {
    /// The API resource (`drives`, `network-interfaces`).
    resource: &'a str,
    /// The device kind, for messages.
    what: &'a str,
    /// The id in the path and the one in the body.
    id: &'a str,
    body_id: &'a str,
    /// Whether the config has a device with that id.
    exists: bool,
}

impl<'a> PatchTarget<'a> {
    fn new(resource: &'a str, what: &'a str, id: &'a str, body_id: &'a str, exists: bool) -> Self {
        Self {
            resource,
            what,
            id,
            body_id,
            exists,
        }
    }
}

fn check_limiters(limiters: &[Option<RateLimiterConfig>]) -> Result<(), Response> {
    for l in limiters.iter().flatten() {
        l.validate().map_err(fails)?;
    }
    Ok(())
}

fn fails(e: impl std::fmt::Display) -> Response {
    Response::bad_request(e.to_string())
}

fn checked(r: Result<(), ConfigError>) -> Result<(), Response> {
    r.map_err(fails)
}

impl Controller {
    /// A controller for a VM not started yet, whose config starts as `config`.
    pub fn new(
        id: String,
        config: VmConfig,
        host: SysfsHost,
        kvm_max_vcpus: usize,
        backend: Box<dyn VmBackend>,
    ) -> Self {
        Controller {
            id,
            config,
            passthrough_ids: Vec::new(),
            logger: None,
            metrics: None,
            state: InstanceState::NotStarted,
            host,
            kvm_max_vcpus,
            backend,
            counters: Counters::new(),
        }
    }

    /// Names the passthrough devices a config file gave (their API ids).
    pub fn set_passthrough_ids(&mut self, ids: Vec<String>) {
        self.passthrough_ids = ids;
    }

    pub fn state(&self) -> InstanceState {
        self.state
    }

    /// Records a gauge (e.g. `api_server.process_startup_time_us`).
    pub fn set_gauge(&mut self, name: &str, value: u64) {
        self.counters.insert(name.to_string(), value);
    }

    fn count(&mut self, name: String) {
        *self.counters.entry(name).or_insert(0) += 1;
    }

    /// Handles one request, counting it (and its failure) under Firecracker's names.
    pub fn handle(&mut self, req: Request) -> Response {
        let (group, resource) = req.metric();
        self.count(format!("{group}.{resource}_count"));
        let response = self.dispatch(req).unwrap_or_else(|e| e);
        if response.status >= 400 {
            self.count(format!("{group}.{resource}_fails"));
        }
        response
    }

    /// Counts a request that could not be parsed: under its resource's `_fails` when the
    /// path names one (as Firecracker does), else as an invalid request.
    pub fn count_unparsed(&mut self, method: &str, path: &str) {
        match super::routes::metric_of(method, path) {
            Some((group, resource)) => {
                self.count(format!("{group}.{resource}_count"));
                self.count(format!("{group}.{resource}_fails"));
            }
            None => self.count("vmm.invalid_api_requests".to_string()),
        }
    }

    fn pre_boot(&self, what: &str) -> Result<(), Response> {
        if self.state == InstanceState::NotStarted {
            Ok(())
        } else {
            Err(Response::bad_request(format!(
                "{what} is only allowed before the VM starts (InstanceStart)"
            )))
        }
    }

    fn post_boot(&self, what: &str) -> Result<(), Response> {
        if self.state == InstanceState::NotStarted {
            Err(Response::bad_request(format!(
                "{what} is only allowed after the VM starts (InstanceStart)"
            )))
        } else {
            Ok(())
        }
    }

    /// Applies `change` to a copy of the config and keeps it only if `check` passes.
    fn change(
        &mut self,
        change: impl FnOnce(&mut VmConfig) -> Result<(), Refused>,
        check: impl FnOnce(&VmConfig, &SysfsHost, usize) -> Result<(), ConfigError>,
    ) -> Result<Response, Response> {
        let mut candidate = self.config.clone();
        change(&mut candidate).map_err(fails)?;
        checked(check(&candidate, &self.host, self.kvm_max_vcpus))?;
        self.config = candidate;
        Ok(Response::no_content())
    }

    /// [`Self::change`] for a change that cannot be refused itself.
    fn set(
        &mut self,
        apply: impl FnOnce(&mut VmConfig),
        check: impl FnOnce(&VmConfig, &SysfsHost, usize) -> Result<(), ConfigError>,
    ) -> Result<Response, Response> {
        self.change(
            |c| {
                apply(c);
                Ok(())
            },
            check,
        )
    }

    fn dispatch(&mut self, req: Request) -> Result<Response, Response> {
        match req {
            Request::GetInstanceInfo => Ok(Response::json(&InstanceInfo {
                id: self.id.clone(),
                state: self.state,
                vmm_version: VERSION.into(),
                app_name: APP_NAME.into(),
            })),
            Request::GetVersion => Ok(Response::json(&FirecrackerVersion {
                firecracker_version: VERSION.into(),
            })),
            Request::GetMachineConfig => Ok(Response::json(&convert::machine_config(&self.config))),
            Request::GetVmConfig => {
                let mut full = convert::full_config(&self.config, &self.passthrough_ids);
                full.logger = self.logger.clone();
                full.metrics = self.metrics.as_ref().map(|m| m.config.clone());
                Ok(Response::json(&full))
            }
            Request::GetPrometheus => Ok(Response::text(metrics::prometheus(
                &metrics::with_process_counters(self.counters.clone()),
            ))),
            Request::PutBootSource(b) => {
                self.pre_boot("PUT /boot-source")?;
                self.set(
                    |c| convert::apply_boot_source(c, &b),
                    |c, _, _| c.check_boot(),
                )
            }
            Request::PutMachineConfig(m) => {
                self.pre_boot("PUT /machine-config")?;
                self.machine_config(&convert::update_of(&m))
            }
            Request::PatchMachineConfig(m) => {
                self.pre_boot("PATCH /machine-config")?;
                self.machine_config(&m)
            }
            Request::PutDrive(id, d) => {
                self.pre_boot("PUT /drives")?;
                convert::check_path_id("drive", &id, &d.drive_id).map_err(fails)?;
                let drive = convert::drive_config(&d).map_err(fails)?;
                self.set(
                    |c| convert::upsert(&mut c.drives, drive, |x| x.id == id),
                    |c, _, _| c.check_drives(),
                )
            }
            Request::PatchDrive(id, d) => {
                let exists = self.config.drives.iter().any(|x| x.id == id);
                let update = DeviceUpdate::Drive {
                    path: d.path_on_host.clone(),
                    rate_limiter: d.rate_limiter,
                };
                let target = PatchTarget::new("drives", "drive", &id, &d.drive_id, exists);
                self.patch_device(target, &[d.rate_limiter], update)?;
                if let Some(drive) = self.config.drives.iter_mut().find(|x| x.id == id) {
                    if let Some(p) = d.path_on_host {
                        drive.path = p;
                    }
                    if d.rate_limiter.is_some() {
                        drive.rate_limiter = d.rate_limiter;
                    }
                }
                Ok(Response::no_content())
            }
            Request::PutNet(id, n) => {
                self.pre_boot("PUT /network-interfaces")?;
                convert::check_path_id("network interface", &id, &n.iface_id).map_err(fails)?;
                let net = convert::net_config(&n).map_err(fails)?;
                self.set(
                    |c| convert::upsert(&mut c.net, net, |x| x.id == id),
                    |c, host, _| c.check_net(host),
                )
            }
            Request::PatchNet(id, n) => {
                let exists = self.config.net.iter().any(|x| x.id == id);
                let update = DeviceUpdate::Net {
                    rx_rate_limiter: n.rx_rate_limiter,
                    tx_rate_limiter: n.tx_rate_limiter,
                };
                let target = PatchTarget::new(
                    "network-interfaces",
                    "network interface",
                    &id,
                    &n.iface_id,
                    exists,
                );
                self.patch_device(target, &[n.rx_rate_limiter, n.tx_rate_limiter], update)?;
                if let Some(net) = self.config.net.iter_mut().find(|x| x.id == id) {
                    if n.rx_rate_limiter.is_some() {
                        net.rx_rate_limiter = n.rx_rate_limiter;
                    }
                    if n.tx_rate_limiter.is_some() {
                        net.tx_rate_limiter = n.tx_rate_limiter;
                    }
                }
                Ok(Response::no_content())
            }
            Request::PutVsock(v) => {
                self.pre_boot("PUT /vsock")?;
                let vsock = convert::vsock_config(&v);
                self.set(|c| c.vsock = Some(vsock), |c, _, _| c.check_vsock())
            }
            Request::PutLogger(l) => {
                self.pre_boot("PUT /logger")?;
                self.logger(l)
            }
            Request::PutMetrics(m) => {
                self.pre_boot("PUT /metrics")?;
                self.metrics_sink(&m)
            }
            Request::PutAction(a) => self.action(a),
            Request::PatchVm(s) => {
                self.post_boot("PATCH /vm")?;
                let (action, state) = match s {
                    VmStateRequest::Paused => (RuntimeAction::Pause, InstanceState::Paused),
                    VmStateRequest::Resumed => (RuntimeAction::Resume, InstanceState::Running),
                };
                self.backend.runtime(action).map_err(fails)?;
                self.state = state;
                Ok(Response::no_content())
            }
            Request::PutAiInfer(ai) => {
                self.pre_boot("PUT /ai-infer")?;
                self.set(|c| c.ai_infer = Some(ai), |c, _, _| c.check_ai_infer())
            }
            Request::PutPassthrough(id, p) => {
                self.pre_boot("PUT /passthrough")?;
                convert::check_path_id("passthrough", &id, &p.id).map_err(fails)?;
                let mut ids = self.passthrough_ids.clone();
                let entry = convert::passthrough_config(&p);
                let response = self.set(
                    |c| match ids.iter().position(|x| *x == id) {
                        Some(i) => c.passthrough[i] = entry,
                        None => {
                            ids.push(id.clone());
                            c.passthrough.push(entry);
                        }
                    },
                    |c, host, _| c.check_passthrough(host),
                )?;
                self.passthrough_ids = ids;
                Ok(response)
            }
            Request::PutMemoryZone(id, z) => {
                self.pre_boot("PUT /memory-zones")?;
                convert::check_path_id("memory zone", &id, &z.id).map_err(fails)?;
                let was_default = convert::full_config(&self.config, &[])
                    .memory_zones
                    .is_empty();
                self.set(
                    |c| {
                        // The first explicit zone replaces machine-config's implicit one.
                        if was_default {
                            c.memory.zones.clear();
                        }
                        convert::upsert(&mut c.memory.zones, z, |x| x.id == id);
                    },
                    |c, host, _| c.check_memory(host),
                )
            }
        }
    }

    /// A runtime `PATCH /<resource>/<id>`: post-boot only, the path's id must match the
    /// body's and name a configured device, and the limits must be valid before the VM is
    /// asked to apply `update`.
    fn patch_device(
        &mut self,
        target: PatchTarget<'_>,
        limiters: &[Option<RateLimiterConfig>],
        update: DeviceUpdate,
    ) -> Result<(), Response> {
        let PatchTarget {
            resource,
            what,
            id,
            body_id,
            exists,
        } = target;
        self.post_boot(&format!("PATCH /{resource}"))?;
        convert::check_path_id(what, id, body_id).map_err(fails)?;
        self.known(what, exists, id)?;
        check_limiters(limiters)?;
        self.backend
            .runtime(RuntimeAction::Update {
                id: id.to_string(),
                update,
            })
            .map_err(|e| fails(format!("PATCH /{resource}/{id}: {e}")))
    }

    fn known(&self, what: &str, exists: bool, id: &str) -> Result<(), Response> {
        if exists {
            Ok(())
        } else {
            Err(Response::bad_request(format!("no {what} with id '{id}'")))
        }
    }

    fn machine_config(
        &mut self,
        update: &super::types::MachineConfigurationUpdate,
    ) -> Result<Response, Response> {
        self.change(
            |c| convert::apply_machine_config(c, update),
            |c, host, max| {
                c.check_machine(host, max)?;
                c.check_memory(host)
            },
        )
    }

    fn logger(&mut self, l: Logger) -> Result<Response, Response> {
        if l.module.is_some() {
            return Err(Response::bad_request(
                "logger: module is not supported by aivmm",
            ));
        }
        if let Some(path) = &l.log_path {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Response::bad_request(format!("cannot open log_path {}: {e}", path.display()))
                })?;
            crate::logger::redirect(file, l.level.filter(), l.show_level, l.show_log_origin);
        } else {
            crate::logger::init(l.level.filter());
        }
        self.logger = Some(l);
        Ok(Response::no_content())
    }

    fn metrics_sink(&mut self, m: &Metrics) -> Result<Response, Response> {
        if self.metrics.is_some() {
            return Err(Response::bad_request(
                "the metrics system is already initialized",
            ));
        }
        self.metrics = Some(MetricsSink::open(m).map_err(Response::bad_request)?);
        Ok(Response::no_content())
    }

    /// Writes a metrics line if metrics are configured (`FlushMetrics`, the timer).
    pub fn flush_metrics(&mut self) -> Result<(), String> {
        let counters = metrics::with_process_counters(self.counters.clone());
        match &mut self.metrics {
            Some(sink) => sink.flush(&self.id, &counters),
            None => Err("metrics are not configured (PUT /metrics first)".into()),
        }
    }

    pub fn metrics_configured(&self) -> bool {
        self.metrics.is_some()
    }

    fn action(&mut self, a: ActionType) -> Result<Response, Response> {
        match a {
            ActionType::InstanceStart => {
                self.pre_boot("InstanceStart")?;
                let validated = self
                    .config
                    .validate(&self.host, self.kvm_max_vcpus)
                    .map_err(fails)?;
                for w in &validated.warnings {
                    log::warn!("{w}");
                }
                if let Some(bytes) = validated.memlock_raise {
                    crate::passthrough::raise_memlock(bytes).map_err(fails)?;
                }
                self.backend
                    .start(validated)
                    .map_err(|e| Response::bad_request(format!("the VM could not start: {e}")))?;
                self.state = InstanceState::Running;
                Ok(Response::no_content())
            }
            ActionType::FlushMetrics => {
                self.flush_metrics().map_err(Response::bad_request)?;
                Ok(Response::no_content())
            }
            ActionType::SendCtrlAltDel => {
                self.post_boot("SendCtrlAltDel")?;
                self.backend
                    .runtime(RuntimeAction::CtrlAltDel)
                    .map_err(|e| Response::bad_request(format!("SendCtrlAltDel failed: {e}")))?;
                Ok(Response::no_content())
            }
        }
    }
}

/// A JSON response body.
pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        serde_json::json!({ "fault_message": format!("cannot encode the response: {e}") })
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::api::routes::parse;
    use crate::config::{ConsoleConfig, ConsoleMode};
    use crate::test_support::FakeSys;

    /// Records what the controller asked of the VM.
    #[derive(Default)]
    struct FakeVm {
        started: Arc<Mutex<Option<ValidatedConfig>>>,
        actions: Arc<Mutex<Vec<RuntimeAction>>>,
        fail_start: bool,
    }

    impl VmBackend for FakeVm {
        fn start(&mut self, cfg: ValidatedConfig) -> Result<(), String> {
            if self.fail_start {
                return Err("no KVM here".into());
            }
            *self.started.lock().unwrap() = Some(cfg);
            Ok(())
        }
        fn runtime(&mut self, action: RuntimeAction) -> Result<(), String> {
            self.actions.lock().unwrap().push(action);
            Ok(())
        }
    }

    struct Rig {
        sys: FakeSys,
        ctl: Controller,
        started: Arc<Mutex<Option<ValidatedConfig>>>,
        actions: Arc<Mutex<Vec<RuntimeAction>>>,
        dir: std::path::PathBuf,
    }

    fn rig(name: &str) -> Rig {
        let sys = FakeSys::new(&format!("api-{name}"), 16);
        let fake = FakeVm::default();
        let (started, actions) = (fake.started.clone(), fake.actions.clone());
        let mut cfg = convert::default_config();
        cfg.console = ConsoleConfig {
            mode: ConsoleMode::Off,
            path: None,
        };
        let ctl = Controller::new("vm-1".into(), cfg, sys.host(), 64, Box::new(fake));
        let dir = sys.root().join("files");
        std::fs::create_dir_all(&dir).unwrap();
        Rig {
            sys,
            ctl,
            started,
            actions,
            dir,
        }
    }

    impl Rig {
        fn call(&mut self, method: &str, path: &str, body: &str) -> Response {
            match parse(method, path, body.as_bytes()) {
                Ok(r) => self.ctl.handle(r),
                Err(r) => r,
            }
        }
        fn ok(&mut self, method: &str, path: &str, body: &str) -> Response {
            let r = self.call(method, path, body);
            assert!(r.status < 300, "{method} {path} {body}: {r:?}");
            r
        }
        fn fault(&mut self, method: &str, path: &str, body: &str) -> String {
            let r = self.call(method, path, body);
            assert_eq!(r.status, 400, "{method} {path} {body}: {r:?}");
            let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
            v["fault_message"].as_str().unwrap().to_string()
        }
        fn get(&mut self, path: &str) -> serde_json::Value {
            let r = self.ok("GET", path, "");
            assert_eq!(r.status, 200);
            serde_json::from_str(r.body.as_deref().unwrap()).unwrap()
        }
        fn boot_source(&mut self, args: &str) {
            let body = format!(
                r#"{{"kernel_image_path": "{}", "boot_args": "{args}"}}"#,
                self.sys.kernel()
            );
            assert_eq!(self.ok("PUT", "/boot-source", &body).status, 204);
        }
        fn file(&self, name: &str) -> String {
            let p = self.dir.join(name);
            std::fs::write(&p, b"img").unwrap();
            p.display().to_string()
        }
    }

    #[test]
    fn instance_info_and_version() {
        let mut r = rig("info");
        let v = r.get("/");
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["app_name"], "aivmm");
        assert_eq!(v["id"], "vm-1");
        assert_eq!(v["vmm_version"], VERSION);
        assert_eq!(r.get("/version")["firecracker_version"], VERSION);
    }

    #[test]
    fn boot_source_is_checked_and_pre_boot_only() {
        let mut r = rig("boot");
        let m = r.fault(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/no/such/kernel"}"#,
        );
        assert!(m.contains("/no/such/kernel"), "{m}");
        r.boot_source("console=ttyS0");
        r.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert!(r.started.lock().unwrap().is_some());
        assert_eq!(r.get("/")["state"], "Running");
        let body = format!(r#"{{"kernel_image_path": "{}"}}"#, r.sys.kernel());
        let m = r.fault("PUT", "/boot-source", &body);
        assert!(m.contains("only allowed before the VM starts"), "{m}");
        let m = r.fault("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert!(m.contains("InstanceStart is only allowed before"), "{m}");
    }

    #[test]
    fn machine_config_put_patch_get_and_refusals() {
        let mut r = rig("machine");
        let v = r.get("/machine-config");
        assert_eq!(
            (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
            (Some(1), Some(128))
        );
        assert_eq!(v["huge_pages"], "None");
        r.ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64, "huge_pages": "2M"}"#,
        );
        r.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 32}"#);
        let v = r.get("/machine-config");
        assert_eq!(
            (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
            (Some(2), Some(32))
        );
        assert_eq!(v["huge_pages"], "2M");
        let m = r.fault(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#,
        );
        assert!(m.contains("track_dirty_pages"), "{m}");
        let m = r.fault("PATCH", "/machine-config", r#"{"smt": true}"#);
        assert!(m.contains("smt"), "{m}");
        let m = r.fault("PATCH", "/machine-config", r#"{"cpu_template": "T2"}"#);
        assert!(m.contains("cpu_template"), "{m}");
        let m = r.fault("PATCH", "/machine-config", r#"{"vcpu_count": 0}"#);
        assert!(m.contains("machine.vcpus"), "{m}");
        let m = r.fault("PATCH", "/machine-config", r#"{"mem_size_mib": 3}"#);
        assert!(m.contains("not a multiple"), "{m}");
        // A refused change leaves the config as it was.
        assert_eq!(r.get("/machine-config")["mem_size_mib"], 32);
    }

    #[test]
    fn drives_are_checked_at_put_and_listed_in_vm_config() {
        let mut r = rig("drives");
        let root = r.file("root.ext4");
        let body = format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{root}", "is_root_device": true, "is_read_only": true}}"#
        );
        r.ok("PUT", "/drives/rootfs", &body);
        let m = r.fault("PUT", "/drives/other", &body);
        assert!(m.contains("'other'") && m.contains("'rootfs'"), "{m}");
        let m = r.fault(
            "PUT",
            "/drives/data",
            r#"{"drive_id": "data", "path_on_host": "/no/such.img", "is_root_device": false}"#,
        );
        assert!(m.contains("/no/such.img"), "{m}");
        let data = r.file("data.img");
        let m = r.fault(
            "PUT",
            "/drives/data",
            &format!(r#"{{"drive_id": "data", "path_on_host": "{data}", "is_root_device": true}}"#),
        );
        assert!(m.contains("both have root = true"), "{m}");
        for (field, value) in [
            ("partuuid", r#""0eaa91a0-01""#),
            ("io_engine", r#""Async""#),
            ("socket", r#""/run/vhost.sock""#),
        ] {
            let m = r.fault(
                "PUT",
                "/drives/data",
                &format!(
                    r#"{{"drive_id": "data", "path_on_host": "{data}", "is_root_device": false, "{field}": {value}}}"#
                ),
            );
            assert!(m.contains(field), "{field}: {m}");
        }
        let m = r.fault(
            "PUT",
            "/drives/data",
            &format!(
                r#"{{"drive_id": "data", "path_on_host": "{data}", "is_root_device": false, "rate_limiter": {{"ops": {{"size": 5, "refill_time": 0}}}}}}"#
            ),
        );
        assert!(m.contains("rate_limiter"), "{m}");
        let v = r.get("/vm/config");
        assert_eq!(v["drives"][0]["drive_id"], "rootfs");
        assert_eq!(v["drives"][0]["is_read_only"], true);
        assert_eq!(v["drives"].as_array().unwrap().len(), 1);
        let m = r.fault(
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/x"}"#,
        );
        assert!(m.contains("only allowed after the VM starts"), "{m}");
    }

    #[test]
    fn devices_need_pci_at_start() {
        let mut r = rig("pci-off");
        r.boot_source("console=ttyS0 pci=off");
        let root = r.file("root.ext4");
        r.ok(
            "PUT",
            "/drives/rootfs",
            &format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{root}", "is_root_device": true}}"#
            ),
        );
        let m = r.fault("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert!(m.contains("pci=off"), "{m}");
        assert_eq!(r.get("/")["state"], "Not started");
    }

    #[test]
    fn network_interfaces_and_vsock() {
        let mut r = rig("net");
        let m = r.fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap-missing"}"#,
        );
        assert!(
            m.contains("tap-missing") && m.contains("does not exist"),
            "{m}"
        );
        let m = r.fault(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz:00"}"#,
        );
        assert!(m.contains("guest_mac"), "{m}");
        let tap = r.sys.root().join("class/net/tap0");
        std::fs::create_dir_all(&tap).unwrap();
        std::fs::write(tap.join("tun_flags"), "0x1002\n").unwrap();
        r.ok(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
        );
        let m = r.fault(
            "PUT",
            "/vsock",
            r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#,
        );
        assert!(m.contains("guest_cid 2"), "{m}");
        let uds = r.dir.join("v.sock").display().to_string();
        r.ok(
            "PUT",
            "/vsock",
            &format!(r#"{{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "{uds}"}}"#),
        );
        let v = r.get("/vm/config");
        assert_eq!(v["network-interfaces"][0]["guest_mac"], "06:00:ac:10:00:02");
        assert_eq!(v["vsock"]["guest_cid"], 3);
    }

    #[test]
    fn patches_after_start_reach_the_running_devices_and_the_config() {
        let mut r = rig("patch");
        let root = r.file("root.ext4");
        let other = r.file("other.ext4");
        r.boot_source("console=ttyS0");
        r.ok(
            "PUT",
            "/drives/rootfs",
            &format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{root}", "is_root_device": true}}"#
            ),
        );
        let tap = r.sys.root().join("class/net/tap0");
        std::fs::create_dir_all(&tap).unwrap();
        std::fs::write(tap.join("tun_flags"), "0x1002\n").unwrap();
        r.ok(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        );
        r.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        let limit = r#"{"bandwidth": {"size": 1048576, "refill_time": 1000}}"#;
        r.ok(
            "PATCH",
            "/drives/rootfs",
            &format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{other}", "rate_limiter": {limit}}}"#
            ),
        );
        r.ok(
            "PATCH",
            "/network-interfaces/eth0",
            &format!(r#"{{"iface_id": "eth0", "tx_rate_limiter": {limit}}}"#),
        );
        let m = r.fault("PATCH", "/drives/nope", r#"{"drive_id": "nope"}"#);
        assert!(m.contains("nope"), "{m}");
        // A bad limiter next to a good path: refused before the device sees either.
        r.fault(
            "PATCH",
            "/drives/rootfs",
            &format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "{root}", "rate_limiter": {{"bandwidth": {{"size": 0, "refill_time": 1000}}}}}}"#
            ),
        );
        let actions = r.actions.lock().unwrap().clone();
        assert_eq!(actions.len(), 2, "{actions:?}");
        match &actions[0] {
            RuntimeAction::Update {
                id,
                update: DeviceUpdate::Drive { path, rate_limiter },
            } => {
                assert_eq!(id, "rootfs");
                assert_eq!(path.as_deref(), Some(std::path::Path::new(&other)));
                assert_eq!(
                    rate_limiter.and_then(|l| l.bandwidth).map(|b| b.size),
                    Some(1 << 20)
                );
            }
            a => panic!("{a:?}"),
        }
        assert!(matches!(
            &actions[1],
            RuntimeAction::Update { id, update: DeviceUpdate::Net { rx_rate_limiter: None, tx_rate_limiter: Some(_) } } if id == "eth0"
        ));
        let v = r.get("/vm/config");
        assert_eq!(v["drives"][0]["path_on_host"], other.as_str());
        assert_eq!(
            v["network-interfaces"][0]["tx_rate_limiter"]["bandwidth"]["size"],
            1 << 20
        );
    }

    #[test]
    fn pause_resume_and_actions_after_start() {
        let mut r = rig("pause");
        let m = r.fault("PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert!(m.contains("only allowed after"), "{m}");
        let m = r.fault("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
        assert!(m.contains("only allowed after"), "{m}");
        r.boot_source("console=ttyS0");
        r.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        r.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_eq!(r.get("/")["state"], "Paused");
        r.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
        assert_eq!(r.get("/")["state"], "Running");
        r.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
        assert_eq!(
            *r.actions.lock().unwrap(),
            [
                RuntimeAction::Pause,
                RuntimeAction::Resume,
                RuntimeAction::CtrlAltDel
            ]
        );
        let m = r.fault("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
        assert!(m.contains("PUT /metrics"), "{m}");
    }

    #[test]
    fn a_start_that_fails_leaves_the_vm_not_started() {
        let sys = FakeSys::new("api-failstart", 16);
        let fake = FakeVm {
            fail_start: true,
            ..Default::default()
        };
        let mut cfg = convert::default_config();
        cfg.boot.kernel = Some(sys.kernel().into());
        let mut ctl = Controller::new("x".into(), cfg, sys.host(), 64, Box::new(fake));
        let r = ctl.handle(Request::PutAction(ActionType::InstanceStart));
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("no KVM here"));
        assert_eq!(ctl.state(), InstanceState::NotStarted);
    }

    #[test]
    fn metrics_lines_count_requests_and_flush_on_demand() {
        let mut r = rig("metrics");
        let path = r.dir.join("metrics.json");
        let body = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
        r.ok("PUT", "/metrics", &body);
        let m = r.fault("PUT", "/metrics", &body);
        assert!(m.contains("already initialized"), "{m}");
        r.get("/");
        r.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(line["get_api_requests"]["instance_info_count"], 1);
        assert_eq!(line["put_api_requests"]["metrics_count"], 2);
        assert_eq!(line["put_api_requests"]["metrics_fails"], 1);
        assert!(line["vcpu"]["exit_io_out"].is_u64());
        let prom = r.call("GET", "/metrics/prometheus", "");
        assert!(prom
            .body
            .unwrap()
            .contains("aivmm_get_api_requests_instance_info_count 1"));
    }

    #[test]
    fn logger_writes_to_its_file() {
        let mut r = rig("logger");
        let m = r.fault(
            "PUT",
            "/logger",
            r#"{"log_path": "/no/such/dir/log", "level": "Info"}"#,
        );
        assert!(m.contains("/no/such/dir/log"), "{m}");
        let m = r.fault("PUT", "/logger", r#"{"module": "x"}"#);
        assert!(m.contains("module"), "{m}");
    }

    #[test]
    fn extensions_set_zones_ai_infer_and_passthrough() {
        let mut r = rig("ext");
        r.ok(
            "PUT",
            "/memory-zones/fast",
            r#"{"id": "fast", "size_mib": 64, "backing": "hugetlb-2m", "host_node": 1, "prefault": true}"#,
        );
        r.ok(
            "PUT",
            "/memory-zones/bulk",
            r#"{"id": "bulk", "size_mib": 32}"#,
        );
        let v = r.get("/vm/config");
        let zones: Vec<&str> = v["memory-zones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|z| z["id"].as_str().unwrap())
            .collect();
        assert_eq!(zones, ["fast", "bulk"]);
        assert_eq!(v["machine-config"]["mem_size_mib"], 96);
        let m = r.fault("PATCH", "/machine-config", r#"{"mem_size_mib": 128}"#);
        assert!(m.contains("2 memory zones"), "{m}");
        let m = r.fault(
            "PUT",
            "/memory-zones/x",
            r#"{"id": "x", "size_mib": 8, "host_node": 9}"#,
        );
        assert!(m.contains("node 9"), "{m}");
        let m = r.fault(
            "PUT",
            "/ai-infer",
            r#"{"socket": "/run/a.sock", "queues": 0}"#,
        );
        assert!(m.contains("ai_infer.queues"), "{m}");
        r.ok("PUT", "/ai-infer", r#"{"socket": "/run/a.sock"}"#);
        assert_eq!(r.get("/vm/config")["ai-infer"]["queues"], 1);
        let m = r.fault(
            "PUT",
            "/passthrough/gpu0",
            r#"{"id": "gpu0", "device": "0000:81:00.0"}"#,
        );
        assert!(m.contains("0000:81:00.0"), "{m}");
        r.sys
            .pci_device("0000:81:00.0", Some("vfio-pci"), Some(7), 1, false);
        r.ok(
            "PUT",
            "/passthrough/gpu0",
            r#"{"id": "gpu0", "device": "0000:81:00.0"}"#,
        );
        assert_eq!(r.get("/vm/config")["passthrough"][0]["id"], "gpu0");
    }
}
