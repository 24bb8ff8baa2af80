//! End-to-end: a tenant booted from its own ext4 root on virtio-blk, reached over
//! virtio-net on a tap and over vsock (Firecracker's hybrid model), in two boots of the same
//! image: the first writes a file, the second reads it back, finds a read-only drive
//! refusing writes, and moves 16 MiB each way over TCP and over vsock with checksums, plus a
//! transfer through a rate-limited interface.
//!
//! The scenario is `tenant_io` in tests/rig/scenarios/tenant-io.sh (runs `tio_blk_write`
//! and `tio_run`); the guest side is tests/rig/guest/{blk,net,vsock}-check.sh and
//! tenant-io.sh, with rig-io (tests/rig/rig-io/) at both ends of each transfer.

use aivmm_tests::{rig, Rig, ScenarioRun};

/// `key=value` from a `RIG-IO ...` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The first output line containing `needle`; fails the test with `missing` otherwise.
fn line<'a>(rig: &Rig, run: &'a ScenarioRun, needle: &str, missing: &str) -> &'a str {
    run.line_containing(needle)
        .unwrap_or_else(|| rig.fail(run, missing))
}

/// The guest's RIG-IO line for a step (`PREFIX <step> RIG-IO ...`).
fn guest_line<'a>(rig: &Rig, run: &'a ScenarioRun, prefix: &str, step: &str) -> &'a str {
    let tag = format!("{prefix} {step} ");
    line(
        rig,
        run,
        &tag,
        &format!("the guest printed no `{tag}` line (its side of the transfer did not run)"),
    )
}

/// L1's RIG-IO line for a step, from the scenario's facts.
fn host_line<'a>(rig: &Rig, run: &'a ScenarioRun, step: &str) -> &'a str {
    run.fact(&format!("host_{step}"))
        .unwrap_or_else(|| rig.fail(run, &format!("no L1 side recorded for `{step}`")))
}

/// Both ends of a transfer say ok, moved the same bytes and agree on the checksum.
#[track_caller]
fn check_transfer(rig: &Rig, run: &ScenarioRun, guest: &str, host: &str, what: &str) {
    for (side, line) in [("guest", guest), ("L1", host)] {
        rig.check(
            run,
            field(line, "ok") == Some("1"),
            &format!("{what}: the {side} side failed: `{line}`"),
        );
    }
    rig.check(
        run,
        field(guest, "bytes").is_some() && field(guest, "bytes") == field(host, "bytes"),
        &format!("{what}: byte counts differ: guest `{guest}`, L1 `{host}`"),
    );
    rig.check(
        run,
        field(guest, "checksum").is_some() && field(guest, "checksum") == field(host, "checksum"),
        &format!("{what}: checksums differ: guest `{guest}`, L1 `{host}`"),
    );
}

#[test]
fn a_tenant_boots_from_its_disk_and_its_writes_survive_a_reboot() {
    let rig = rig();
    let write = rig.run("tio_blk_write");
    let token = write
        .fact("token")
        .unwrap_or_else(|| rig.fail(write, "no token"));
    rig.check(
        write,
        write.rc == Some(0),
        "the writing boot did not end cleanly",
    );
    let wrote = line(
        rig,
        write,
        "AIVMM-BLK-WROTE",
        "the guest booted from the disk wrote no marker",
    );
    rig.check(
        write,
        wrote.contains(&format!("content=aivmm-blk:{token}")),
        &format!("the marker is not the token `{token}`: `{wrote}`"),
    );
    let run = rig.run("tio_run");
    let read = line(
        rig,
        run,
        "AIVMM-BLK-READ",
        "the second boot read no marker back",
    );
    rig.check(
        run,
        read.contains(&format!("content=aivmm-blk:{token}")),
        &format!("the second boot read `{read}`, not the first boot's token `{token}`"),
    );
    rig.check(
        run,
        field(wrote, "sha").is_some() && field(wrote, "sha") == field(read, "sha"),
        "the marker's checksum changed between the boots",
    );
}

/// The device offers VIRTIO_BLK_F_RO, so the guest kernel itself refuses the write (EPERM)
/// and no guest tool can clear the disk's read-only flag; a write that reaches the device
/// anyway gets VIRTIO_BLK_S_IOERR (devices/src/virtio/block/tests.rs). Here: the guest sees
/// the drive read-only, its write fails, its reads serve the image's bytes unchanged.
#[test]
fn a_read_only_drive_refuses_writes_and_serves_reads() {
    let rig = rig();
    let run = rig.run("tio_run");
    let refused = line(
        rig,
        run,
        "AIVMM-BLK-RO-REFUSED",
        "the read-only check did not run",
    );
    rig.check(
        run,
        field(refused, "rc").is_some_and(|rc| rc != "0") && field(refused, "sysfs_ro") == Some("1"),
        &format!("the guest did not see a read-only drive refusing writes: `{refused}`"),
    );
    let read = line(
        rig,
        run,
        "AIVMM-BLK-RO-READ",
        "the read-only drive was not read",
    );
    let expected = run.fact("data_sha").unwrap_or_default();
    rig.check(
        run,
        field(read, "ok") == Some("1") && field(read, "sha") == Some(expected),
        &format!("the read-only drive's first 64 KiB read `{read}`, the image has {expected}"),
    );
}

#[test]
fn tcp_over_the_tap_works_both_ways() {
    let rig = rig();
    let run = rig.run("tio_run");
    rig.check(
        run,
        run.fact("tap_error").is_none(),
        "L1 could not create the taps",
    );
    let into_guest = guest_line(rig, run, "AIVMM-NET", "guest-recv");
    check_transfer(
        rig,
        run,
        into_guest,
        host_line(rig, run, "net_send"),
        "L1 client to guest server",
    );
    let out_of_guest = guest_line(rig, run, "AIVMM-NET", "guest-send");
    check_transfer(
        rig,
        run,
        out_of_guest,
        host_line(rig, run, "net_recv"),
        "guest client to L1 server",
    );
}

#[test]
fn a_rate_limited_interface_stays_within_ten_percent_of_its_rate() {
    let rig = rig();
    let run = rig.run("tio_run");
    let rate = rig.fact_i64(run, "rate_mibps") as f64;
    let bucket = rig.fact_i64(run, "rate_bucket_bytes") as f64;
    // Two transfers, each starting with a full bucket, which goes out at once (Firecracker's
    // semantics); the limiter's rate governs the bytes beyond it. Within `secs` it admits
    // at most `bucket + rate * secs` bytes: no transfer may go faster. A sender that keeps
    // it busy gets that much, but a stall of the nested rig only slows a transfer down, so
    // the faster of the two must come within ten percent of the rate.
    let mut fastest = 0.0f64;
    for (tag, step) in [
        ("AIVMM-NET-RATE", "rate_recv"),
        ("AIVMM-NET-RATE2", "rate_recv2"),
    ] {
        let guest = guest_line(rig, run, tag, "guest-send");
        let host = host_line(rig, run, step);
        check_transfer(rig, run, guest, host, "rate-limited transfer");
        let number = |key: &str| -> f64 {
            field(host, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| rig.fail(run, &format!("no {key} in `{host}`")))
        };
        let (bytes, secs) = (number("bytes"), number("secs"));
        let steady = (bytes - bucket) / secs / 1_048_576.0;
        rig.check(
            run,
            bytes > 2.0 * bucket && secs > 0.0 && steady <= 1.1 * rate,
            &format!(
                "the interface limited to {rate} MiB/s (bucket {bucket} bytes) moved {bytes} \
                 bytes in {secs:.3} s: {steady:.3} MiB/s beyond the bucket, over the rate"
            ),
        );
        fastest = fastest.max(steady);
    }
    rig.check(
        run,
        fastest >= 0.9 * rate,
        &format!(
            "the interface limited to {rate} MiB/s moved at most {fastest:.3} MiB/s beyond the \
             bucket in two transfers: the limiter holds it under its rate"
        ),
    );
}

#[test]
fn vsock_works_both_ways_through_the_hybrid_socket() {
    let rig = rig();
    let run = rig.run("tio_run");
    check_transfer(
        rig,
        run,
        guest_line(rig, run, "AIVMM-VSOCK", "guest-recv"),
        host_line(rig, run, "vsock_send"),
        "L1 CONNECT through uds_path to the guest",
    );
    check_transfer(
        rig,
        run,
        guest_line(rig, run, "AIVMM-VSOCK", "guest-send"),
        host_line(rig, run, "vsock_recv"),
        "guest to L1's uds_path_6000",
    );
    rig.check(
        run,
        run.line_containing("AIVMM-TIO-DONE rc=0").is_some(),
        "the guest's tenant I/O checks did not all pass",
    );
    rig.check(
        run,
        run.rc == Some(0),
        "aivmm did not exit 0 after the guest powered off",
    );
}
