//! `[console]`: where the guest's serial console goes.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// "stdout" (default), "file" (needs `path`) or "off".
    #[serde(default)]
    pub mode: ConsoleMode,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    #[default]
    Stdout,
    File,
    Off,
}

/// A file console needs its file.
pub(super) fn validate(console: &ConsoleConfig) -> Result<(), ConfigError> {
    if console.mode == ConsoleMode::File && console.path.is_none() {
        return Err(ConfigError::ConsoleNeedsPath);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{base, parse};
    use super::*;
    use crate::test_support::FakeSys;

    #[test]
    fn file_console_needs_a_path() {
        let sys = FakeSys::new("console", 0);
        let cfg =
            parse(&(base(&sys, "id = \"m\"\nsize_mib = 32") + "[console]\nmode = \"file\"\n"))
                .unwrap();
        let err = cfg.validate(&sys.host(), 64).unwrap_err();
        assert!(matches!(err, ConfigError::ConsoleNeedsPath), "{err}");
    }

    #[test]
    fn console_defaults_to_stdout() {
        let cfg = parse("[console]\n").unwrap();
        assert_eq!(cfg.console, ConsoleConfig::default());
        assert_eq!(cfg.console.mode, ConsoleMode::Stdout);
        let err = parse("[console]\nmode = \"tty\"\n").unwrap_err();
        assert!(err.to_string().contains("tty"), "{err}");
    }
}
