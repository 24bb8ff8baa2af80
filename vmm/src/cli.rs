//! The `aivmm` command line: a config file plus the common overrides.

use std::path::PathBuf;

use clap::Parser;

use crate::config::Overrides;

/// Launch one tenant microVM.
#[derive(Debug, Parser)]
#[command(name = "aivmm", version, about)]
pub struct Cli {
    /// Tenant VM config (TOML); see configs/README.md. Without it, the overrides below
    /// describe the whole VM.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
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
    /// Log level: error, warn, info, debug.
    #[arg(long, default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
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
        }
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a log level (error, warn, info, debug, trace, off)"))
}
