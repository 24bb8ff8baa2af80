//! The `ai-inferd` binary's start-up contract: one line and exit 2 on a bad config.

use std::process::Command;

fn run(config_text: Option<&str>, name: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("ai-inferd-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("d.toml");
    if let Some(text) = config_text {
        std::fs::write(&path, text).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ai-inferd"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_exit_2_with_one_line() {
    let cases = [
        (None, "missing", "cannot read config file"),
        (Some("[daemon]\nmodels = \"m\"\n"), "no-tenant", "no [[tenant]]"),
        (
            Some("[daemon]\nmodels = \"m\"\n[[tenant]]\nname = \"a\"\nsocket = \"/tmp/x\"\nweight = 0\n"),
            "weight",
            "weight = 0",
        ),
        (
            Some("[daemon]\nmodels = \"m\"\nturbo = true\n"),
            "unknown",
            "turbo",
        ),
    ];
    for (text, name, needle) in cases {
        let (code, stderr) = run(text, name);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
    }
}
