//! `[ai_infer]`: the paravirtual inference device, served by `ai-inferd` over vhost-user.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Backing, ConfigError, MemoryZoneConfig};

/// The paravirtual inference device, served by `ai-inferd` over vhost-user.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AiInferConfig {
    /// The daemon's unix socket for this tenant (the operator gives each tenant its own).
    pub socket: PathBuf,
    /// Request queues (1-64; default 1).
    #[serde(default = "default_queues")]
    pub queues: u64,
    /// Largest ring size offered to the driver (power of two, 2-256; default 256).
    #[serde(default = "default_queue_size")]
    pub queue_size: u64,
    /// The uid the daemon must run as: checked with `SO_PEERCRED` on the connected
    /// socket before anything is sent (so a process that took the socket's place is
    /// not handed guest memory). Default: not checked.
    #[serde(default)]
    pub backend_uid: Option<u32>,
    /// The gid the daemon must run as, checked likewise. Default: not checked.
    #[serde(default)]
    pub backend_gid: Option<u32>,
}

fn default_queues() -> u64 {
    1
}

fn default_queue_size() -> u64 {
    256
}

impl AiInferConfig {
    /// The device at `socket` with the default queues (`--ai-infer-socket`).
    pub(super) fn with_socket(socket: PathBuf) -> Self {
        AiInferConfig {
            socket,
            queues: default_queues(),
            queue_size: default_queue_size(),
            backend_uid: None,
            backend_gid: None,
        }
    }
}

/// Checks the queues, that the daemon can map every zone, and that the guest scans PCI.
pub(super) fn validate(
    ai: &AiInferConfig,
    zones: &[MemoryZoneConfig],
    pci_off: bool,
) -> Result<(), ConfigError> {
    if ai.socket.as_os_str().is_empty() {
        return Err(ConfigError::AiInferNoSocket);
    }
    if !(1..=64).contains(&ai.queues) {
        return Err(ConfigError::AiInferRange {
            field: "queues",
            value: ai.queues,
            allowed: "1 to 64",
        });
    }
    if !(2..=256).contains(&ai.queue_size) || !ai.queue_size.is_power_of_two() {
        return Err(ConfigError::AiInferRange {
            field: "queue_size",
            value: ai.queue_size,
            allowed: "a power of two from 2 to 256",
        });
    }
    if let Some(z) = zones.iter().find(|z| z.backing == Backing::Anonymous) {
        return Err(ConfigError::AiInferNeedsSharedMemory { id: z.id.clone() });
    }
    if pci_off {
        return Err(ConfigError::AiInferPciOff);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::testing::{base, parse};
    use super::super::Overrides;
    use super::*;
    use crate::test_support::FakeSys;

    #[test]
    fn ai_infer_needs_shared_memory_pci_and_sane_queues() {
        let sys = FakeSys::new("ai", 0);
        let check = |zone: &str, extra: &str| {
            let text = base(&sys, zone)
                .replace("[boot]\n", "[boot]\ncmdline = \"console=ttyS0\"\n")
                + extra;
            parse(&text).unwrap().validate(&sys.host(), 64)
        };
        let ok = check(
            "id = \"m\"\nsize_mib = 32",
            "[ai_infer]\nsocket = \"/run/t.sock\"\n",
        )
        .unwrap();
        let ai = ok.ai_infer.unwrap();
        assert_eq!((ai.queues, ai.queue_size), (1, 256));
        let err = check(
            "id = \"m\"\nsize_mib = 32\nbacking = \"anonymous\"",
            "[ai_infer]\nsocket = \"/run/t.sock\"\n",
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::AiInferNeedsSharedMemory { .. }),
            "{err}"
        );
        for (extra, field) in [
            ("queue_size = 100", "queue_size"),
            ("queue_size = 512", "queue_size"),
            ("queues = 0", "queues"),
            ("queues = 65", "queues"),
        ] {
            let err = check(
                "id = \"m\"\nsize_mib = 32",
                &format!("[ai_infer]\nsocket = \"/s\"\n{extra}\n"),
            )
            .unwrap_err();
            assert!(err.to_string().contains(field), "{extra}: {err}");
        }
        let err = check("id = \"m\"\nsize_mib = 32", "[ai_infer]\nsocket = \"\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::AiInferNoSocket), "{err}");
        // The default command line has pci=off.
        let mut cfg = parse(&base(&sys, "id = \"m\"\nsize_mib = 32")).unwrap();
        cfg.apply(&Overrides {
            ai_infer_socket: Some(PathBuf::from("/run/t.sock")),
            ..Default::default()
        });
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::AiInferPciOff), "{err}");
    }

    #[test]
    fn backend_credentials_are_optional() {
        let ai = parse("[ai_infer]\nsocket = \"/a\"\n")
            .unwrap()
            .ai_infer
            .unwrap();
        assert_eq!((ai.backend_uid, ai.backend_gid), (None, None));
        let ai = parse("[ai_infer]\nsocket = \"/a\"\nbackend_uid = 990\nbackend_gid = 991\n")
            .unwrap()
            .ai_infer
            .unwrap();
        assert_eq!((ai.backend_uid, ai.backend_gid), (Some(990), Some(991)));
        assert!(parse("[ai_infer]\nsocket = \"/a\"\nbackend_uid = -1\n").is_err());
    }

    #[test]
    fn socket_override_repoints_an_existing_device() {
        let mut cfg = parse("[ai_infer]\nsocket = \"/a\"\nqueues = 4\n").unwrap();
        cfg.apply(&Overrides {
            ai_infer_socket: Some(PathBuf::from("/b")),
            ..Default::default()
        });
        let ai = cfg.ai_infer.unwrap();
        assert_eq!((ai.socket, ai.queues), (PathBuf::from("/b"), 4));
    }
}
