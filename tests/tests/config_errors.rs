//! Every bad config gives one line on stderr naming the field and the
//! problem, and exit status 2, before any guest state is created.

use std::time::Duration;

use outboard_tests::{json_str, run_args, run_config, test_guest, TempDir};

fn kernel() -> String {
    json_str(&test_guest().display().to_string())
}

fn assert_config_error(json: &str, expect: &[&str]) {
    let out = run_config(json, Duration::from_secs(10), None);
    let d = out.describe();
    assert_eq!(out.status, Some(2), "{json}\n{d}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{json}\n{d}");
    for e in expect {
        assert!(lines[0].contains(e), "expected {e:?} in {:?}", lines[0]);
    }
    assert!(out.serial.is_empty(), "{d}");
}

#[test]
fn malformed_json() {
    assert_config_error(r#"{"machine": {"vcpus": 1,"#, &["EOF while parsing"]);
}

#[test]
fn unknown_field() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 1, "memory_mib": 64, "memory_gib": 1}}, "kernel": {{"path": {}}}}}"#,
            kernel()
        ),
        &["unknown field `memory_gib`"],
    );
}

#[test]
fn missing_kernel_file() {
    assert_config_error(
        r#"{"machine": {"vcpus": 1, "memory_mib": 64}, "kernel": {"path": "/nonexistent/vmlinux"}}"#,
        &["kernel.path", "/nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn missing_initrd_file() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 1, "memory_mib": 64}}, "kernel": {{"path": {}, "initrd": "/nonexistent/initrd"}}}}"#,
            kernel()
        ),
        &["kernel.initrd", "/nonexistent/initrd"],
    );
}

#[test]
fn zero_vcpus() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 0, "memory_mib": 64}}, "kernel": {{"path": {}}}}}"#,
            kernel()
        ),
        &["machine.vcpus", "0 is out of range"],
    );
}

#[test]
fn memory_too_small() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 1, "memory_mib": 8}}, "kernel": {{"path": {}}}}}"#,
            kernel()
        ),
        &["machine.memory_mib", "too small"],
    );
}

#[test]
fn memory_larger_than_the_host() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 1, "memory_mib": 1048576}}, "kernel": {{"path": {}}}}}"#,
            kernel()
        ),
        &["machine.memory_mib", "more than this host can give"],
    );
}

#[test]
fn memory_beyond_the_largest_guest() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 1, "memory_mib": 17592186044416}}, "kernel": {{"path": {}}}}}"#,
            kernel()
        ),
        &["machine.memory_mib", "more than the largest guest"],
    );
}

#[test]
fn wrong_type_names_the_field() {
    assert_config_error(
        &format!(
            r#"{{"machine": {{"vcpus": 300, "memory_mib": 64}}, "kernel": {{"path": {}}}}}"#,
            kernel()
        ),
        &["field `machine.vcpus`", "300"],
    );
}

#[test]
fn missing_section() {
    assert_config_error(
        &format!(r#"{{"kernel": {{"path": {}}}}}"#, kernel()),
        &["missing field `machine`"],
    );
}

#[test]
fn missing_config_file() {
    let dir = TempDir::new("cfg");
    let path = dir.0.join("absent.json");
    let out = run_args(
        &[std::ffi::OsStr::new("--config"), path.as_os_str()],
        Duration::from_secs(10),
        None,
    );
    assert_eq!(out.status, Some(2), "{}", out.describe());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.describe());
    assert!(out.stderr.contains("cannot read config file"));
}

#[test]
fn kernel_that_is_not_a_kernel() {
    // Passes validation (it is a file) but fails to load: exit 1, one line.
    let dir = TempDir::new("cfg");
    let bogus = dir.0.join("bogus");
    std::fs::write(&bogus, b"not a kernel at all").unwrap();
    let out = run_config(
        &format!(
            r#"{{"machine": {{"vcpus": 1, "memory_mib": 64}}, "kernel": {{"path": {}}}}}"#,
            json_str(&bogus.display().to_string())
        ),
        Duration::from_secs(10),
        None,
    );
    let d = out.describe();
    assert_eq!(out.status, Some(1), "{d}");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains("note:"))
        .collect();
    assert_eq!(errors.len(), 1, "{d}");
    assert!(errors[0].contains("cannot load kernel"), "{d}");
}

fn with_devices(devices: &str) -> String {
    format!(
        r#"{{"machine": {{"vcpus": 1, "memory_mib": 64}}, "kernel": {{"path": {}}}, "devices": [{devices}]}}"#,
        kernel()
    )
}

#[test]
fn device_with_both_spawn_and_socket() {
    assert_config_error(
        &with_devices(
            r#"{"id": "d0", "kind": "vhost-user-blk", "spawn": {"args": []}, "socket": "/x.sock"}"#,
        ),
        &["devices[].spawn", "\"d0\"", "both `spawn` and `socket`"],
    );
}

#[test]
fn device_without_a_backend() {
    assert_config_error(
        &with_devices(r#"{"kind": "vhost-user-blk"}"#),
        &["\"vhost-user-blk0\"", "needs `spawn`", "or `socket`"],
    );
}

#[test]
fn device_of_unknown_kind() {
    assert_config_error(
        &with_devices(r#"{"kind": "floppy", "socket": "/x.sock"}"#),
        &["unknown variant `floppy`", "vhost-user-blk"],
    );
}

#[test]
fn device_ids_must_be_unique_and_plain() {
    assert_config_error(
        &with_devices(
            r#"{"id": "d0", "kind": "vhost-user-blk", "socket": "/a"}, {"id": "d0", "kind": "vhost-user-blk", "socket": "/b"}"#,
        ),
        &["devices[].id", "\"d0\" is used twice"],
    );
    assert_config_error(
        &with_devices(r#"{"id": "d 0", "kind": "vhost-user-blk", "socket": "/a"}"#),
        &["devices[].id", "\"d 0\""],
    );
}

#[test]
fn device_queue_size_must_be_a_power_of_two() {
    assert_config_error(
        &with_devices(r#"{"kind": "vhost-user-blk", "socket": "/a", "queue_size": 100}"#),
        &["devices[].queue_size", "100 is not a power of two"],
    );
}
