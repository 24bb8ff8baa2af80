//! Links a C program against `libguest_agent.so` through `include/ai_agent.h` and runs
//! it: the declarations in the header must match the exported symbols, and the
//! library must refuse bad arguments from C without crashing.

use std::path::PathBuf;
use std::process::Command;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <string.h>
#include "ai_agent.h"

#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "failed: %s\n", #cond); return 1; } } while (0)

int main(void) {
    ai_agent *agent = NULL;
    ai_buffer *buf = NULL;
    ai_open_options opts;
    memset(&opts, 0, sizeof opts);
    opts.mode = AI_MODE_DAEMON;
    opts.socket = "/nonexistent/ai-agent.sock";
    opts.connect_timeout_s = 1;
    CHECK(ai_open(&opts, &agent) == AI_E_DAEMON);
    CHECK(agent == NULL);
    CHECK(strlen(ai_last_error()) > 0);
    opts.mode = 7;
    CHECK(ai_open(&opts, &agent) == AI_E_INVALID);
    CHECK(ai_alloc(NULL, 64, 0, &buf) == AI_E_INVALID);
    CHECK(ai_free(NULL, NULL) == AI_E_INVALID);
    CHECK(ai_buffer_data(NULL, NULL) == NULL);
    CHECK(ai_buffer_len(NULL, NULL) == 0);
    ai_infer_result r;
    CHECK(ai_infer(NULL, 1, NULL, 0, NULL, 0, NULL, &r) == AI_E_INVALID);
    ai_trace_counters t;
    CHECK(ai_trace(NULL, &t) == AI_E_INVALID);
    size_t n = 0;
    CHECK(ai_models(NULL, NULL, 0, &n) == AI_E_INVALID);
    uint32_t outcome = 0;
    CHECK(ai_cancel(NULL, 1, &outcome) == AI_E_INVALID);
    CHECK(strcmp(ai_status_name(AI_STATUS_BAD_TENSOR), "BAD_TENSOR") == 0);
    CHECK(strcmp(ai_status_name(99), "UNKNOWN") == 0);
    ai_close(NULL);
    puts("c-abi-ok");
    return 0;
}
"#;

#[test]
fn c_program_links_and_gets_errors_not_crashes() {
    let exe = std::env::current_exe().unwrap();
    // Tests run from target/<profile>/deps, where cargo leaves the fresh cdylib (the
    // copy in target/<profile> is only refreshed by `cargo build`).
    let profile_dir = exe.parent().unwrap().to_path_buf();
    let lib = profile_dir.join("libguest_agent.so");
    assert!(lib.exists(), "{} not built", lib.display());
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c_abi");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("main.c");
    let bin = dir.join("main");
    std::fs::write(&src, PROGRAM).unwrap();
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg(format!("-I{}", include.display()))
        .arg(format!("-L{}", profile_dir.display()))
        .arg(format!("-Wl,-rpath,{}", profile_dir.display()))
        .arg("-lguest_agent")
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    // cargo's LD_LIBRARY_PATH may list a stale copy of the library first.
    let run = Command::new(&bin)
        .env("LD_LIBRARY_PATH", &profile_dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "c-abi-ok");
}
