//! Routing: an HTTP method, a path and a body become one [`Request`], or a 400 that says
//! what was wrong (the parse error of the body, the unknown path, the unsupported
//! method), in Firecracker's `{"fault_message": ...}` shape.

use serde::de::DeserializeOwned;

use super::types::{
    ActionType, AiInfer, BootSource, Drive, InstanceActionInfo, Logger, MachineConfiguration,
    MachineConfigurationUpdate, MemoryZone, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, Passthrough, VmStateRequest, VmUpdate, Vsock,
};
use super::Response;

/// One parsed API request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    GetInstanceInfo,
    GetVersion,
    GetMachineConfig,
    GetVmConfig,
    GetPrometheus,
    PutBootSource(BootSource),
    PutMachineConfig(MachineConfiguration),
    PatchMachineConfig(MachineConfigurationUpdate),
    PutDrive(String, Drive),
    PatchDrive(String, PartialDrive),
    PutNet(String, NetworkInterface),
    PatchNet(String, PartialNetworkInterface),
    PutVsock(Vsock),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutAction(ActionType),
    PatchVm(VmStateRequest),
    PutAiInfer(AiInfer),
    PutPassthrough(String, Passthrough),
    PutMemoryZone(String, MemoryZone),
}

impl Request {
    /// The metrics group and resource this request is counted under (Firecracker's
    /// `put_api_requests.drive_count` and so on).
    pub fn metric(&self) -> (&'static str, &'static str) {
        use Request::*;
        match self {
            GetInstanceInfo => ("get_api_requests", "instance_info"),
            GetVersion => ("get_api_requests", "vmm_version"),
            GetMachineConfig => ("get_api_requests", "machine_cfg"),
            GetVmConfig => ("get_api_requests", "vm_config"),
            GetPrometheus => ("get_api_requests", "prometheus"),
            PutBootSource(_) => ("put_api_requests", "boot_source"),
            PutMachineConfig(_) => ("put_api_requests", "machine_cfg"),
            PatchMachineConfig(_) => ("patch_api_requests", "machine_cfg"),
            PutDrive(..) => ("put_api_requests", "drive"),
            PatchDrive(..) => ("patch_api_requests", "drive"),
            PutNet(..) => ("put_api_requests", "network"),
            PatchNet(..) => ("patch_api_requests", "network"),
            PutVsock(_) => ("put_api_requests", "vsock"),
            PutLogger(_) => ("put_api_requests", "logger"),
            PutMetrics(_) => ("put_api_requests", "metrics"),
            PutAction(_) => ("put_api_requests", "actions"),
            PatchVm(_) => ("patch_api_requests", "vm"),
            PutAiInfer(_) => ("put_api_requests", "ai_infer"),
            PutPassthrough(..) => ("put_api_requests", "passthrough"),
            PutMemoryZone(..) => ("put_api_requests", "memory_zone"),
        }
    }
}

/// The metrics group and resource a request that could not be parsed is counted under,
/// from its method and path alone (`None`: no such endpoint).
pub fn metric_of(method: &str, path: &str) -> Option<(&'static str, &'static str)> {
    let first = path
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    let group = match method {
        "GET" => "get_api_requests",
        "PUT" => "put_api_requests",
        "PATCH" => "patch_api_requests",
        _ => return None,
    };
    let resource = match (method, first) {
        ("GET", "") => "instance_info",
        ("GET", "version") => "vmm_version",
        ("GET", "vm") => "vm_config",
        ("GET", "metrics") => "prometheus",
        (_, "machine-config") => "machine_cfg",
        (_, "boot-source") => "boot_source",
        (_, "drives") => "drive",
        (_, "network-interfaces") => "network",
        (_, "vsock") => "vsock",
        (_, "logger") => "logger",
        (_, "metrics") => "metrics",
        (_, "actions") => "actions",
        (_, "vm") => "vm",
        (_, "ai-infer") => "ai_infer",
        (_, "passthrough") => "passthrough",
        (_, "memory-zones") => "memory_zone",
        _ => return None,
    };
    Some((group, resource))
}

/// Parses the JSON body as `T`; every serde error (syntax, type, unknown or missing
/// field) is a 400 carrying serde's message.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::bad_request("the request needs a JSON body"));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Response::bad_request(format!("invalid request body: {e}")))
}

fn no_body(bytes: &[u8]) -> Result<(), Response> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(())
    } else {
        Err(Response::bad_request("GET requests take no body"))
    }
}

fn invalid(method: &str, path: &str) -> Response {
    Response::bad_request(format!(
        "invalid request method and/or path: {method} {path}"
    ))
}

/// Routes one request. `path` may carry a query string, which is ignored.
pub fn parse(method: &str, path: &str, bytes: &[u8]) -> Result<Request, Response> {
    let path_only = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path_only
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let id = |s: &str| -> Result<String, Response> {
        if s.is_empty() {
            Err(invalid(method, path_only))
        } else {
            Ok(s.to_string())
        }
    };
    let req = match (method, segments.as_slice()) {
        ("GET", []) => {
            no_body(bytes)?;
            Request::GetInstanceInfo
        }
        ("GET", ["version"]) => {
            no_body(bytes)?;
            Request::GetVersion
        }
        ("GET", ["machine-config"]) => {
            no_body(bytes)?;
            Request::GetMachineConfig
        }
        ("GET", ["vm", "config"]) => {
            no_body(bytes)?;
            Request::GetVmConfig
        }
        ("GET", ["metrics", "prometheus"]) => {
            no_body(bytes)?;
            Request::GetPrometheus
        }
        ("PUT", ["boot-source"]) => Request::PutBootSource(body(bytes)?),
        ("PUT", ["machine-config"]) => Request::PutMachineConfig(body(bytes)?),
        ("PATCH", ["machine-config"]) => Request::PatchMachineConfig(body(bytes)?),
        ("PUT", ["drives", d]) => Request::PutDrive(id(d)?, body(bytes)?),
        ("PATCH", ["drives", d]) => Request::PatchDrive(id(d)?, body(bytes)?),
        ("PUT", ["network-interfaces", n]) => Request::PutNet(id(n)?, body(bytes)?),
        ("PATCH", ["network-interfaces", n]) => Request::PatchNet(id(n)?, body(bytes)?),
        ("PUT", ["vsock"]) => Request::PutVsock(body(bytes)?),
        ("PUT", ["logger"]) => Request::PutLogger(body(bytes)?),
        ("PUT", ["metrics"]) => Request::PutMetrics(body(bytes)?),
        ("PUT", ["actions"]) => Request::PutAction(body::<InstanceActionInfo>(bytes)?.action_type),
        ("PATCH", ["vm"]) => Request::PatchVm(body::<VmUpdate>(bytes)?.state),
        ("PUT", ["ai-infer"]) => Request::PutAiInfer(body(bytes)?),
        ("PUT", ["passthrough", p]) => Request::PutPassthrough(id(p)?, body(bytes)?),
        ("PUT", ["memory-zones", z]) => Request::PutMemoryZone(id(z)?, body(bytes)?),
        (_, [first, ..]) if NOT_SUPPORTED.contains(first) => {
            return Err(Response::bad_request(format!(
                "/{first} is a Firecracker endpoint aivmm does not support"
            )))
        }
        _ => return Err(invalid(method, path_only)),
    };
    Ok(req)
}

/// Firecracker endpoints aivmm does not implement: named in the refusal.
const NOT_SUPPORTED: &[&str] = &[
    "balloon",
    "cpu-config",
    "entropy",
    "hotplug",
    "mmds",
    "pmem",
    "serial",
    "snapshot",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{HugePages, IoEngine};

    fn fault(r: Response) -> String {
        assert_eq!(r.status, 400);
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn gets_route_and_take_no_body() {
        assert_eq!(parse("GET", "/", b""), Ok(Request::GetInstanceInfo));
        assert_eq!(parse("GET", "/version", b""), Ok(Request::GetVersion));
        assert_eq!(parse("GET", "/vm/config", b""), Ok(Request::GetVmConfig));
        assert_eq!(
            parse("GET", "/machine-config?x=1", b""),
            Ok(Request::GetMachineConfig)
        );
        assert!(fault(parse("GET", "/", b"{}").unwrap_err()).contains("no body"));
    }

    #[test]
    fn unknown_paths_and_methods_name_themselves() {
        let m = fault(parse("DELETE", "/drives/a", b"").unwrap_err());
        assert_eq!(m, "invalid request method and/or path: DELETE /drives/a");
        let m = fault(parse("GET", "/nope", b"").unwrap_err());
        assert!(m.contains("GET /nope"), "{m}");
        let m = fault(parse("PUT", "/balloon", b"{}").unwrap_err());
        assert!(
            m.contains("/balloon") && m.contains("does not support"),
            "{m}"
        );
        let m = fault(parse("PUT", "/snapshot/create", b"{}").unwrap_err());
        assert!(m.contains("/snapshot"), "{m}");
    }

    #[test]
    fn boot_source_bodies() {
        let r = parse(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        )
        .unwrap();
        let Request::PutBootSource(b) = r else {
            panic!("{r:?}")
        };
        assert_eq!(b.kernel_image_path.to_str(), Some("/k"));
        assert_eq!(b.boot_args.as_deref(), Some("console=ttyS0"));
        let m = fault(parse("PUT", "/boot-source", br#"{"boot_args": "x"}"#).unwrap_err());
        assert!(m.contains("missing field `kernel_image_path`"), "{m}");
        let m = fault(
            parse(
                "PUT",
                "/boot-source",
                br#"{"kernel_image_path": "/k", "kernel": 1}"#,
            )
            .unwrap_err(),
        );
        assert!(m.contains("unknown field `kernel`"), "{m}");
        let m = fault(parse("PUT", "/boot-source", b"{not json").unwrap_err());
        assert!(m.starts_with("invalid request body"), "{m}");
        let m = fault(parse("PUT", "/boot-source", b"").unwrap_err());
        assert!(m.contains("needs a JSON body"), "{m}");
    }

    #[test]
    fn machine_config_bodies() {
        let r = parse(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
        )
        .unwrap();
        let Request::PutMachineConfig(m) = r else {
            panic!("{r:?}")
        };
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 256));
        assert_eq!(m.huge_pages, HugePages::Huge2M);
        let m = fault(
            parse(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": "two", "mem_size_mib": 256}"#,
            )
            .unwrap_err(),
        );
        assert!(m.contains("invalid type"), "{m}");
        let m = fault(
            parse(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": -1, "mem_size_mib": 256}"#,
            )
            .unwrap_err(),
        );
        assert!(m.contains("invalid value"), "{m}");
        let m = fault(
            parse(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": 8, "huge_pages": "1G"}"#,
            )
            .unwrap_err(),
        );
        assert!(m.contains("unknown variant `1G`"), "{m}");
        let r = parse("PATCH", "/machine-config", br#"{"vcpu_count": 4}"#).unwrap();
        assert_eq!(
            r,
            Request::PatchMachineConfig(MachineConfigurationUpdate {
                vcpu_count: Some(4),
                ..Default::default()
            })
        );
    }

    #[test]
    fn drive_and_net_bodies() {
        let r = parse(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                 "is_read_only": false, "io_engine": "Sync",
                 "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
        )
        .unwrap();
        let Request::PutDrive(id, d) = r else {
            panic!("{r:?}")
        };
        assert_eq!(id, "rootfs");
        assert!(d.is_root_device);
        assert_eq!(d.io_engine, IoEngine::Sync);
        assert_eq!(d.rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
        let m = fault(
            parse(
                "PUT",
                "/drives/x",
                br#"{"drive_id": "x", "path_on_host": "/r", "is_root_device": false,
                     "rate_limiter": {"bandwidth": {"size": 1}}}"#,
            )
            .unwrap_err(),
        );
        assert!(m.contains("missing field `refill_time`"), "{m}");
        let m = fault(parse("PUT", "/drives/x", br#"{"drive_id": "x"}"#).unwrap_err());
        assert!(m.contains("is_root_device"), "{m}");
        let r = parse(
            "PUT",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::PutNet(ref i, _) if i == "eth0"));
        let r = parse(
            "PATCH",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 10}}}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::PatchNet(..)));
    }

    #[test]
    fn actions_vm_state_and_extensions() {
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Ok(Request::PutAction(ActionType::InstanceStart))
        );
        let m = fault(parse("PUT", "/actions", br#"{"action_type": "Reboot"}"#).unwrap_err());
        assert!(m.contains("unknown variant `Reboot`"), "{m}");
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(Request::PatchVm(VmStateRequest::Paused))
        );
        let m = fault(parse("PATCH", "/vm", br#"{"state": "Stopped"}"#).unwrap_err());
        assert!(m.contains("Stopped"), "{m}");
        let r = parse(
            "PUT",
            "/ai-infer",
            br#"{"socket": "/run/ai.sock", "queues": 2}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::PutAiInfer(ref a) if a.queues == 2));
        let r = parse(
            "PUT",
            "/memory-zones/m0",
            br#"{"id": "m0", "size_mib": 64, "backing": "hugetlb-2m", "host_node": 0}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::PutMemoryZone(ref i, ref z) if i == "m0" && z.size_mib == 64));
        let r = parse(
            "PUT",
            "/passthrough/gpu0",
            br#"{"id": "gpu0", "device": "0000:81:00.0"}"#,
        )
        .unwrap();
        assert!(matches!(r, Request::PutPassthrough(ref i, ref p) if i == "gpu0" && p.mmap));
    }
}
