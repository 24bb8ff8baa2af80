//! `[boot]`: the guest kernel, its initramfs and its command line, which a root drive
//! completes with `root=/dev/vda`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, DriveConfig};

/// Largest kernel command line we accept (the boot protocol's `cmdline_size` is checked later
/// against the kernel's own limit).
pub const MAX_CMDLINE_LEN: usize = 4096;

pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1";

/// The block device the root drive is: it is the first virtio-blk device attached.
pub const ROOT_DEVICE: &str = "/dev/vda";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// bzImage or ELF vmlinux (PVH entry used when the ELF has the note).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            kernel: None,
            initrd: None,
            cmdline: default_cmdline(),
        }
    }
}

/// Checks that the kernel is given and readable, and the initrd if any; returns the kernel.
pub(super) fn validate(boot: &BootConfig) -> Result<PathBuf, ConfigError> {
    let kernel = boot.kernel.clone().ok_or(ConfigError::NoKernel)?;
    check_readable("kernel", &kernel)?;
    if let Some(initrd) = &boot.initrd {
        check_readable("initrd", initrd)?;
    }
    Ok(kernel)
}

/// Whether the command line keeps the guest from scanning PCI, where every device but the
/// legacy ones sits.
pub(super) fn pci_off(cmdline: &str) -> bool {
    kernel_words(cmdline).any(|w| w == "pci=off")
}

/// The command line the guest boots with: `cmdline`, plus `root=/dev/vda rw` (or `ro`) when
/// there is a root drive and `cmdline` names no root itself (then a warning says the drive is
/// not made the root). Checked against [`MAX_CMDLINE_LEN`].
pub(super) fn cmdline(
    cmdline: &str,
    root: Option<&DriveConfig>,
    warnings: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let out = match root {
        Some(d) => {
            if let Some(given) = kernel_words(cmdline).find(|w| w.starts_with("root=")) {
                warnings.push(format!(
                    "drive '{}' is the root drive ({ROOT_DEVICE}), but the kernel command \
                     line already has {given}: it is left as given",
                    d.id
                ));
                cmdline.to_string()
            } else {
                with_root(cmdline, if d.read_only { "ro" } else { "rw" })
            }
        }
        None => cmdline.to_string(),
    };
    if out.len() > MAX_CMDLINE_LEN {
        return Err(ConfigError::CmdlineTooLong {
            len: out.len(),
            max: MAX_CMDLINE_LEN,
        });
    }
    Ok(out)
}

/// Byte offset where the arguments for init begin: the `--` word, after which the kernel
/// passes everything to init; the length when there is none.
fn init_args_start(cmdline: &str) -> usize {
    cmdline
        .split_whitespace()
        .find(|w| *w == "--")
        .map_or(cmdline.len(), |w| {
            w.as_ptr() as usize - cmdline.as_ptr() as usize
        })
}

/// The words the kernel itself reads (those before `--`).
fn kernel_words(cmdline: &str) -> impl Iterator<Item = &str> {
    cmdline[..init_args_start(cmdline)].split_whitespace()
}

/// `cmdline` with `root=/dev/vda <mode>` added to the kernel's part (before any `--`).
fn with_root(cmdline: &str, mode: &str) -> String {
    let at = init_args_start(cmdline);
    let (kernel, init) = cmdline.split_at(at);
    let kernel = kernel.trim_end();
    let sep = if kernel.is_empty() { "" } else { " " };
    let rest = if init.is_empty() {
        String::new()
    } else {
        format!(" {init}")
    };
    format!("{kernel}{sep}root={ROOT_DEVICE} {mode}{rest}")
}

/// Checks that `path` is a regular file this process can open for reading.
pub(super) fn check_readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |source| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    std::fs::File::open(path).map(drop).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{base, parse, pt_base, TempDir};
    use super::*;
    use crate::test_support::FakeSys;

    #[test]
    fn unreadable_kernel_is_named() {
        let sys = FakeSys::new("kernel", 0);
        let cfg = parse(
            "[boot]\nkernel = \"/nonexistent/vmlinuz\"\n[[memory.zones]]\nid = \"m\"\nsize_mib = 32\n",
        )
        .unwrap();
        let msg = cfg.validate(&sys.host(), 64).unwrap_err().to_string();
        assert!(msg.contains("kernel /nonexistent/vmlinuz"), "{msg}");
    }

    #[test]
    fn missing_kernel_and_unreadable_initrd_are_errors() {
        let sys = FakeSys::new("initrd", 0);
        let cfg = parse("[[memory.zones]]\nid = \"m\"\nsize_mib = 32\n").unwrap();
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::NoKernel), "{err}");
        let text = base(&sys, "id = \"m\"\nsize_mib = 32")
            .replace("[boot]\n", "[boot]\ninitrd = \"/nonexistent/initrd\"\n");
        let msg = parse(&text)
            .unwrap()
            .validate(&sys.host(), 64)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("initrd /nonexistent/initrd"), "{msg}");
    }

    #[test]
    fn too_long_command_line_is_rejected() {
        let sys = FakeSys::new("cmdline-long", 0);
        let mut cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32")).unwrap();
        cfg.boot.cmdline = "x".repeat(MAX_CMDLINE_LEN + 1);
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(
            matches!(err, ConfigError::CmdlineTooLong { len, .. } if len == MAX_CMDLINE_LEN + 1),
            "{err}"
        );
    }

    fn root_drive(read_only: bool) -> DriveConfig {
        DriveConfig {
            id: "rootfs".into(),
            path: PathBuf::from("/unused"),
            read_only,
            root: true,
            serial: None,
            rate_limiter: None,
        }
    }

    #[test]
    fn a_root_drive_adds_root_to_the_kernel_part_of_the_command_line() {
        let mut w = Vec::new();
        let rw = root_drive(false);
        let ro = root_drive(true);
        assert_eq!(
            cmdline("console=ttyS0 quiet", Some(&rw), &mut w).unwrap(),
            "console=ttyS0 quiet root=/dev/vda rw"
        );
        assert_eq!(
            cmdline("console=ttyS0 ", Some(&ro), &mut w).unwrap(),
            "console=ttyS0 root=/dev/vda ro"
        );
        assert_eq!(cmdline("", Some(&rw), &mut w).unwrap(), "root=/dev/vda rw");
        // Arguments after `--` go to init: root= must come before them.
        assert_eq!(
            cmdline("quiet -- single x=1", Some(&rw), &mut w).unwrap(),
            "quiet root=/dev/vda rw -- single x=1"
        );
        assert_eq!(
            cmdline("-- init-arg", Some(&ro), &mut w).unwrap(),
            "root=/dev/vda ro -- init-arg"
        );
        assert!(w.is_empty(), "{w:?}");
        // No root drive: untouched.
        assert_eq!(cmdline("quiet", None, &mut w).unwrap(), "quiet");
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn an_explicit_root_is_kept_with_a_warning() {
        let mut w = Vec::new();
        let line = "console=ttyS0 root=/dev/vdb1 ro";
        assert_eq!(
            cmdline(line, Some(&root_drive(false)), &mut w).unwrap(),
            line
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("'rootfs'") && w[0].contains("root=/dev/vdb1"),
            "{w:?}"
        );
        // A root= meant for init does not count.
        let mut w = Vec::new();
        assert_eq!(
            cmdline("quiet -- root=x", Some(&root_drive(false)), &mut w).unwrap(),
            "quiet root=/dev/vda rw -- root=x"
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn root_rule_applies_through_validate_and_counts_toward_the_limit() {
        let sys = FakeSys::new("cmdline-root", 0);
        let dir = TempDir::new("cmdline-root");
        let image = dir.file("root.ext4", b"image");
        let text = pt_base(&sys, "id = \"m\"\nsize_mib = 32")
            + &format!(
                "[[drives]]\nid = \"rootfs\"\npath = \"{}\"\nroot = true\n",
                image.display()
            );
        let v = parse(&text).unwrap().validate(&sys.host(), 64).unwrap();
        assert_eq!(v.cmdline, "console=ttyS0 root=/dev/vda rw");

        let mut cfg = parse(&text).unwrap();
        cfg.boot.cmdline = "x".repeat(MAX_CMDLINE_LEN - 5);
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::CmdlineTooLong { .. }), "{err}");
    }

    #[test]
    fn pci_off_counts_only_for_the_kernel() {
        assert!(pci_off(DEFAULT_CMDLINE));
        assert!(!pci_off("console=ttyS0 -- pci=off"));
        assert!(!pci_off("console=ttyS0 pci=noacpi"));
    }
}
