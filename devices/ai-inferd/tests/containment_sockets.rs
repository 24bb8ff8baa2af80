//! Containment, authenticated sockets: only the tenant's VMM gets the tenant's
//! socket. Sockets are private, a peer with other credentials is refused, a silent
//! connection cannot hold the slot, a second connection cannot queue behind the
//! first, and reload is not open to whoever reaches the TCP metrics port.

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_infer_test_frontend::{FrontendOptions, TestFrontend};
use ai_inferd::backend::Backend;
use ai_inferd::config::Config;
use ai_inferd::daemon::Daemon;
use ai_inferd::metrics::{fetch, MetricsEndpoint};
use common::{test_dir, AddOne, Harness, ADD_ONE};

fn backends() -> Vec<Arc<dyn Backend>> {
    vec![Arc::new(AddOne::new(ADD_ONE, "add-one", None))]
}

fn config(daemon_extra: &str, tenants: &str) -> String {
    format!("[daemon]\nmodels = \"unused.toml\"\nexecutor_threads = 1\n{daemon_extra}\n{tenants}")
}

fn tenant(name: &str, extra: &str) -> String {
    format!(
        "[[tenant]]\nname = \"{name}\"\nsocket = \"{{dir}}/{name}.sock\"\nallowed_models = [\"*\"]\n{extra}\n"
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

/// The value of one series of the daemon's metrics.
fn metric(h: &Harness, series: &str) -> u64 {
    let text = h.daemon().shared().render_metrics();
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
    line[series.len()..].trim().parse().unwrap()
}

fn refused(tenant: &str, reason: &str) -> String {
    format!("ai_inferd_tenant_connections_refused_total{{tenant=\"{tenant}\",reason=\"{reason}\"}}")
}

/// Whether the daemon closes `s` (EOF or reset) within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A served connection: it lists the models.
fn served(f: &mut TestFrontend) {
    let models = f.models().expect("the connection is served");
    assert!(models.models.iter().any(|m| m.id == ADD_ONE));
}

#[test]
fn sockets_are_0600_in_a_0700_directory_and_a_writable_directory_is_refused() {
    // The daemon creates a missing socket directory 0700.
    let h = Harness::custom(
        &config(
            "",
            "[[tenant]]\nname = \"a\"\nsocket = \"{dir}/run/a.sock\"\nallowed_models = [\"*\"]\n",
        ),
        backends(),
    );
    assert_eq!(mode(&h.dir().join("run")), 0o700);
    assert_eq!(mode(&h.dir().join("run/a.sock")), 0o600);
    drop(h);

    // An existing directory group or others may write: no start, a clear error.
    let tmp = test_dir();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let text = config("", &tenant("a", "")).replace("{dir}", &dir.display().to_string());
    let err = Daemon::start(&Config::parse(&text).unwrap(), backends())
        .err()
        .expect("a group-writable socket directory is refused");
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("0775"), "{msg}");
    assert!(!dir.join("a.sock").exists());
}

#[test]
fn a_peer_with_another_uid_is_refused_and_the_matching_one_served() {
    // The tests run as one uid (root here): tenant "other" admits only uid 4242,
    // tenant "own" admits this process's uid.
    let own = std::fs::metadata("/proc/self").unwrap().uid();
    let other = if own == 4242 { 4243 } else { 4242 };
    let h = Harness::custom(
        &config(
            "",
            &(tenant("other", &format!("uid = {other}")) + &tenant("own", &format!("uid = {own}"))),
        ),
        backends(),
    );
    let start = Instant::now();
    assert!(
        TestFrontend::connect(&h.socket("other"), FrontendOptions::default()).is_err(),
        "a peer whose uid the tenant does not admit is not served"
    );
    assert!(start.elapsed() < Duration::from_secs(3), "refused at once");
    assert_eq!(metric(&h, &refused("other", "peer")), 1);
    let mut f = h.connect("own");
    served(&mut f);
    assert_eq!(metric(&h, &refused("own", "peer")), 0);
    // The refused tenant's slot is free again: still refusing, never stuck.
    assert!(TestFrontend::connect(&h.socket("other"), FrontendOptions::default()).is_err());
    assert_eq!(metric(&h, &refused("other", "peer")), 2);
}

#[test]
fn a_silent_connection_is_dropped_after_the_handshake_timeout() {
    let h = Harness::custom(
        &config("handshake_timeout_ms = 300", &tenant("a", "")),
        backends(),
    );
    let mut silent = UnixStream::connect(h.socket("a")).unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)),
        "the silent connection is closed"
    );
    assert_eq!(metric(&h, &refused("a", "handshake_timeout")), 1);
    // The real VMM then connects and is served, past the timeout too.
    let mut f = h.connect("a");
    served(&mut f);
    std::thread::sleep(Duration::from_millis(600));
    served(&mut f);
    assert_eq!(metric(&h, &refused("a", "handshake_timeout")), 1);
}

#[test]
fn a_second_connection_is_closed_at_once_and_the_first_keeps_working() {
    let h = Harness::custom(&config("", &tenant("a", "")), backends());
    let mut first = h.connect("a");
    served(&mut first);
    let mut second = UnixStream::connect(h.socket("a")).unwrap();
    assert!(
        closed_within(&mut second, Duration::from_secs(3)),
        "the second connection is closed at once, not left in the backlog"
    );
    assert_eq!(metric(&h, &refused("a", "busy")), 1);
    served(&mut first);
    assert!(h.daemon().shared().tenants[0].is_connected());
}

#[test]
fn reload_over_tcp_is_refused() {
    let h = Harness::custom(
        &config("metrics_socket = \"tcp:127.0.0.1:0\"", &tenant("a", "")),
        backends(),
    );
    let at: MetricsEndpoint = h.daemon().metrics_endpoint().unwrap().clone();
    let wait = Duration::from_secs(5);
    let post = fetch(&at, "POST /-/reload HTTP/1.0\r\n\r\n", wait).unwrap();
    assert!(post.starts_with("HTTP/1.0 405"), "{post}");
    let raw = fetch(&at, "reload\n", wait).unwrap();
    assert!(raw.starts_with("error:"), "{raw}");
    let get = fetch(&at, "GET /metrics HTTP/1.0\r\n\r\n", wait).unwrap();
    assert!(get.starts_with("HTTP/1.0 200"), "{get}");
    assert_eq!(
        metric(&h, "ai_inferd_reloads_total{result=\"applied\"}")
            + metric(&h, "ai_inferd_reloads_total{result=\"refused\"}"),
        0,
        "no reload was attempted"
    );
}
