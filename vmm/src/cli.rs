//! The `aivmm` command line: a config file plus the common overrides.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{DriveConfig, MacAddr, NetConfig, Overrides, VsockConfig};

/// Launch one tenant microVM.
#[derive(Debug, Parser)]
#[command(name = "aivmm", version, about)]
pub struct Cli {
    /// Tenant VM config (TOML); see configs/README.md. Without it, the overrides below
    /// describe the whole VM.
    #[arg(long, short = 'c', conflicts_with = "config_file")]
    pub config: Option<PathBuf>,
    /// Serve the control API (Firecracker's REST API, docs/api.md) on a unix socket
    /// created at PATH (mode 0600). The VM then starts on `PUT /actions InstanceStart`
    /// (or at once with --config-file).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<PathBuf>,
    /// A Firecracker JSON config (boot-source, machine-config, drives,
    /// network-interfaces, vsock, logger, metrics): the VM starts from it at once.
    #[arg(long, value_name = "FILE.json")]
    pub config_file: Option<PathBuf>,
    /// Boot from --config-file without an API socket.
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// The instance id `GET /` reports (Firecracker's --id).
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Guest kernel (bzImage, or ELF vmlinux with or without a PVH note).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs image.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the config's).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB (resizes a single configured zone, or replaces the zones by one
    /// memfd zone).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpus: Option<u64>,
    /// Give the guest an ai_infer device served by the ai-inferd socket at this path.
    #[arg(long)]
    pub ai_infer_socket: Option<PathBuf>,
    /// Add a virtio-blk drive backed by the raw image PATH: `ro` read-only, `root` the root
    /// device (/dev/vda, root= on the kernel command line), `id=ID` (default driveN, N
    /// counting --drive flags from 0). Repeatable; added after the config's `[[drives]]`.
    #[arg(long = "drive", value_name = "PATH[,ro][,root][,id=ID]", value_parser = parse_drive)]
    pub drives: Vec<DriveArg>,
    /// Add a virtio-net device on the existing tap interface TAP, with the guest MAC
    /// `mac=` and `id=ID` (default netN, N counting --net flags from 0). Repeatable; added
    /// after the config's `[[net]]`.
    #[arg(long = "net", value_name = "TAP[,mac=MAC][,id=ID]", value_parser = parse_net)]
    pub net: Vec<NetArg>,
    /// Give the guest a vsock device with context id CID, its host side a unix socket
    /// created at UDS_PATH (replaces the config's `[vsock]`).
    #[arg(long, value_name = "CID:UDS_PATH", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// Run without the per-thread seccomp filters (for debugging; docs/security.md).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Log level: error, warn, info, debug.
    #[arg(long, default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

/// One `--drive` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveArg {
    pub path: PathBuf,
    pub read_only: bool,
    pub root: bool,
    pub id: Option<String>,
}

/// One `--net` flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetArg {
    pub tap: String,
    pub mac: Option<MacAddr>,
    pub id: Option<String>,
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory,
            vcpus: self.vcpus,
            ai_infer_socket: self.ai_infer_socket.clone(),
            drives: self
                .drives
                .iter()
                .enumerate()
                .map(|(i, d)| DriveConfig {
                    id: d.id.clone().unwrap_or_else(|| format!("drive{i}")),
                    path: d.path.clone(),
                    read_only: d.read_only,
                    root: d.root,
                    serial: None,
                    rate_limiter: None,
                })
                .collect(),
            net: self
                .net
                .iter()
                .enumerate()
                .map(|(i, n)| NetConfig {
                    id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                    tap: n.tap.clone(),
                    mac: n.mac,
                    mtu: None,
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                })
                .collect(),
            vsock: self.vsock.clone(),
        }
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a log level (error, warn, info, debug, trace, off)"))
}

/// A non-empty `id=` value (the config's checks say what else an id must be).
fn option_id(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("id= needs a value".into());
    }
    Ok(value.to_string())
}

/// `PATH[,ro][,root][,id=ID]`; a path cannot contain a comma.
fn parse_drive(s: &str) -> Result<DriveArg, String> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("the image path is missing".into());
    }
    let mut arg = DriveArg {
        path: PathBuf::from(path),
        read_only: false,
        root: false,
        id: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => arg.read_only = true,
            None if opt == "root" => arg.root = true,
            Some(("id", v)) => arg.id = Some(option_id(v)?),
            _ => {
                return Err(format!(
                    "unknown option '{opt}' (expected ro, root or id=ID)"
                ))
            }
        }
    }
    Ok(arg)
}

/// `TAP[,mac=MAC][,id=ID]`.
fn parse_net(s: &str) -> Result<NetArg, String> {
    let mut parts = s.split(',');
    let tap = parts.next().unwrap_or_default();
    if tap.is_empty() {
        return Err("the tap interface name is missing".into());
    }
    let mut arg = NetArg {
        tap: tap.to_string(),
        mac: None,
        id: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) => arg.mac = Some(v.parse()?),
            Some(("id", v)) => arg.id = Some(option_id(v)?),
            _ => {
                return Err(format!(
                    "unknown option '{opt}' (expected mac=MAC or id=ID)"
                ))
            }
        }
    }
    Ok(arg)
}

/// `CID:UDS_PATH`; the CID's range is checked with the rest of the config.
fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (cid, path) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not CID:UDS_PATH"))?;
    let guest_cid = cid
        .parse()
        .map_err(|_| format!("'{cid}' is not a context id (a number from 3 to 4294967294)"))?;
    if path.is_empty() {
        return Err("the unix socket path is missing".into());
    }
    Ok(VsockConfig {
        guest_cid,
        uds_path: PathBuf::from(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("aivmm").chain(args.iter().copied()))
    }

    #[test]
    fn drive_flags_parse_with_options_and_default_ids() {
        let c = cli(&[
            "--drive",
            "root.ext4,root,ro",
            "--drive",
            "data.img,id=data",
            "--drive",
            "scratch.img",
        ])
        .unwrap();
        let o = c.overrides();
        let got: Vec<(&str, &str, bool, bool)> = o
            .drives
            .iter()
            .map(|d| (d.id.as_str(), d.path.to_str().unwrap(), d.read_only, d.root))
            .collect();
        assert_eq!(
            got,
            [
                ("drive0", "root.ext4", true, true),
                ("data", "data.img", false, false),
                ("drive2", "scratch.img", false, false),
            ]
        );
        assert!(o
            .drives
            .iter()
            .all(|d| d.serial.is_none() && d.rate_limiter.is_none()));
    }

    #[test]
    fn net_and_vsock_flags_parse() {
        let c = cli(&[
            "--net",
            "tap0,mac=06:00:ac:10:00:02",
            "--net",
            "tap1,id=backend",
            "--vsock",
            "3:/run/aivmm/t1.vsock",
        ])
        .unwrap();
        let o = c.overrides();
        assert_eq!(o.net.len(), 2);
        assert_eq!(
            (o.net[0].id.as_str(), o.net[0].tap.as_str()),
            ("net0", "tap0")
        );
        assert_eq!(o.net[0].mac.unwrap().to_string(), "06:00:ac:10:00:02");
        assert_eq!((o.net[1].id.as_str(), o.net[1].mac), ("backend", None));
        assert_eq!(
            o.vsock,
            Some(VsockConfig {
                guest_cid: 3,
                uds_path: PathBuf::from("/run/aivmm/t1.vsock"),
            })
        );
        let none = cli(&[]).unwrap().overrides();
        assert!(none.drives.is_empty() && none.net.is_empty() && none.vsock.is_none());
    }

    #[test]
    fn bad_flags_are_usage_errors_naming_the_flag() {
        for (args, flag, why) in [
            (&["--drive", ",ro"][..], "--drive", "path is missing"),
            (
                &["--drive", "a.img,rw"][..],
                "--drive",
                "unknown option 'rw'",
            ),
            (
                &["--drive", "a.img,id="][..],
                "--drive",
                "id= needs a value",
            ),
            (&["--net", "tap0,mac=zz"][..], "--net", "'zz'"),
            (
                &["--net", "tap0,mtu=1500"][..],
                "--net",
                "unknown option 'mtu=1500'",
            ),
            (&["--net", ""][..], "--net", "tap interface name is missing"),
            (&["--vsock", "3"][..], "--vsock", "not CID:UDS_PATH"),
            (
                &["--vsock", "x:/run/v.sock"][..],
                "--vsock",
                "'x' is not a context id",
            ),
            (&["--vsock", "3:"][..], "--vsock", "socket path is missing"),
        ] {
            let err = cli(args).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            // main exits with 2 for every error clap prints to stderr.
            assert!(err.use_stderr(), "{args:?}");
            let msg = err.to_string();
            assert!(msg.contains(flag) && msg.contains(why), "{args:?}: {msg}");
        }
    }
}
