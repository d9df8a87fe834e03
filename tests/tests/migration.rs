//! Live migration between two hosts (two network namespaces joined by a
//! veth pair, a VMM in each), snapshots, and the failures that must leave
//! the source guest running. The test guest's `counter` scenario prints a
//! sequence number that must never repeat or jump, and keeps a region of
//! memory changing that it verifies page by page.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use outboard_tests::{api, counter_seqs, host_kvm, json_str, test_guest, HostPair, TempDir, Vmm};

fn config(vcpus: u8, memory_mib: u64, cmdline: &str) -> String {
    format!(
        r#"{{"machine": {{"vcpus": {vcpus}, "memory_mib": {memory_mib}}}, "kernel": {{"path": {}, "cmdline": {}}}, "console": {{"output": "stdout", "input": "none"}}}}"#,
        json_str(&test_guest().display().to_string()),
        json_str(cmdline)
    )
}

fn counter_cmdline(vcpus: u8, stop: u32) -> String {
    format!("tg.scenario=counter tg.cpus={vcpus} tg.counter_ms=100 tg.counter_region_mib=8 tg.counter_stop={stop}")
}

fn wait() -> Duration {
    host_kvm().deadline(Duration::from_secs(30), Duration::from_secs(120))
}

/// Waits until `vmm` has printed `n` more counter lines than `from`.
fn wait_lines(vmm: &Vmm, n: usize) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < wait() {
        if counter_seqs(&vmm.serial()).len() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The sequence over the serial outputs of every VMM the guest ran on,
/// in order: consecutive, from 0.
fn assert_continuous(outputs: &[String]) {
    let all: String = outputs.concat();
    let seqs = counter_seqs(&all);
    assert!(!seqs.is_empty(), "no counter lines:\n{all}");
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(*s, i as u64, "sequence breaks at line {i}: {seqs:?}\n{all}");
    }
    assert!(!all.contains("counter FAIL"), "{all}");
}

fn migrate(netns: &str, socket: &Path, to: &str) -> (i32, String) {
    api(
        Some(netns),
        socket,
        &["migrate", to, "--downtime-ms", "300", "--timeout-s", "60"],
    )
}

/// Moves the guest from `from` (namespace, API socket) to a new VMM that
/// `hop` starts in namespace `to_ns` at `to_ip:port`; checks the source
/// exited after the confirmation. Returns the destination.
fn hop(
    cfg: &str,
    from: (&str, &Path),
    source: &mut Vmm,
    to_ns: &str,
    to_ip: &str,
    port: u16,
    to_sock: &Path,
) -> Vmm {
    let to = format!("tcp:{to_ip}:{port}");
    let dest = Vmm::start(
        Some(to_ns),
        cfg,
        &[
            "--incoming",
            &to,
            "--api-socket",
            to_sock.to_str().unwrap_or(""),
        ],
    );
    assert!(
        dest.wait_for("waiting for the incoming guest", wait()),
        "{}",
        dest.describe()
    );
    let (code, text) = migrate(from.0, from.1, &to);
    assert_eq!(
        code,
        0,
        "migrate to {to}: {text}\n{}\n{}",
        source.describe(),
        dest.describe()
    );
    assert_eq!(
        source.wait_exit(wait()),
        Some(0),
        "source after migrating\n{}",
        source.describe()
    );
    assert!(source
        .stderr()
        .contains("the guest runs on the destination now"));
    dest
}

fn a_to_b_and_back(vcpus: u8, memory_mib: u64) {
    let hosts = HostPair::new();
    let dir = TempDir::new("mig");
    let sock_a = dir.0.join("a.sock");
    let sock_b = dir.0.join("b.sock");
    let sock_a2 = dir.0.join("a2.sock");
    let cfg = config(vcpus, memory_mib, &counter_cmdline(vcpus, 60));
    let mut a = Vmm::start(
        Some(&hosts.a),
        &cfg,
        &["--api-socket", sock_a.to_str().unwrap_or("")],
    );
    assert!(
        wait_lines(&a, 5),
        "A did not start counting\n{}",
        a.describe()
    );
    let mut b = hop(
        &cfg,
        (&hosts.a, &sock_a),
        &mut a,
        &hosts.b,
        &hosts.b_ip,
        7001,
        &sock_b,
    );
    let a_lines = counter_seqs(&a.serial()).len();
    assert!(wait_lines(&b, 5), "B did not go on\n{}", b.describe());
    let mut a2 = hop(
        &cfg,
        (&hosts.b, &sock_b),
        &mut b,
        &hosts.a,
        &hosts.a_ip,
        7002,
        &sock_a2,
    );
    // The guest finishes on A: 60 lines in all, then PASS.
    assert_eq!(a2.wait_exit(wait() * 2), Some(0), "{}", a2.describe());
    assert!(a2.serial().contains("result PASS"), "{}", a2.describe());
    assert!(a_lines >= 5);
    assert_continuous(&[a.serial(), b.serial(), a2.serial()]);
    let seqs = counter_seqs(&[a.serial(), b.serial(), a2.serial()].concat());
    assert_eq!(seqs.len(), 60);
}

#[test]
fn one_vcpu_256_mib_migrates_to_b_and_back() {
    a_to_b_and_back(1, 256);
}

#[test]
fn four_vcpus_1_gib_migrates_to_b_and_back() {
    a_to_b_and_back(4, 1024);
}

/// A snapshot to a file, and a new VMM restoring it: the guest goes on
/// from the moment of the snapshot.
#[test]
fn snapshot_to_a_file_and_restore() {
    let dir = TempDir::new("snap");
    let sock = dir.0.join("a.sock");
    let file = dir.0.join("vm.snap");
    let cfg = config(1, 128, &counter_cmdline(1, 25));
    let a = Vmm::start(None, &cfg, &["--api-socket", sock.to_str().unwrap_or("")]);
    assert!(wait_lines(&a, 5), "{}", a.describe());
    let (code, text) = api(
        None,
        &sock,
        &["snapshot", &format!("file:{}", file.display())],
    );
    assert_eq!(code, 0, "snapshot: {text}\n{}", a.describe());
    let at_snapshot = counter_seqs(&a.serial()).len();
    // The source goes on after a snapshot.
    assert!(wait_lines(&a, at_snapshot + 2), "{}", a.describe());
    drop(a);
    let mut c = Vmm::start(
        None,
        &cfg,
        &["--incoming", &format!("file:{}", file.display())],
    );
    assert_eq!(c.wait_exit(wait() * 2), Some(0), "{}", c.describe());
    let seqs = counter_seqs(&c.serial());
    assert!(!seqs.is_empty(), "{}", c.describe());
    // C continues the sequence from the snapshot: its first line follows
    // one A printed before (or at) the snapshot.
    let first = seqs[0] as usize;
    assert!(
        first >= 1 && first <= at_snapshot + 1,
        "first {first}, snapshot at {at_snapshot}\n{}",
        c.describe()
    );
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{}", c.describe());
    }
    assert!(c.serial().contains("result PASS"), "{}", c.describe());
}

/// Starts a source with a large, changing memory so pre-copy takes a
/// while, and a destination waiting.
fn source_and_destination(hosts: &HostPair, dir: &Path, dest_memory: u64) -> (Vmm, Vmm, String) {
    let sock = dir.join("a.sock");
    let cmd =
        "tg.scenario=counter tg.counter_ms=100 tg.counter_region_mib=64 tg.counter_dirty_pages=512";
    let a = Vmm::start(
        Some(&hosts.a),
        &config(1, 1024, cmd),
        &["--api-socket", sock.to_str().unwrap_or("")],
    );
    assert!(wait_lines(&a, 3), "{}", a.describe());
    let to = format!("tcp:{}:7100", hosts.b_ip);
    // The destination stops reading after pre-copy's first round, so the
    // faults land in pre-copy whatever the machine's speed.
    let b = Vmm::start_with_env(
        Some(&hosts.b),
        &config(1, dest_memory, cmd),
        &["--incoming", &to],
        &[("OUTBOARD_TEST_FAULT", "stall-in-pre-copy")],
    );
    assert!(
        b.wait_for("waiting for the incoming guest", wait()),
        "{}",
        b.describe()
    );
    (a, b, to)
}

/// After a failed migration the source's guest keeps counting.
fn assert_source_goes_on(a: &Vmm) {
    let before = counter_seqs(&a.serial()).len();
    assert!(
        wait_lines(a, before + 3),
        "the source guest stopped\n{}",
        a.describe()
    );
    assert_continuous(&[a.serial()]);
}

fn migrate_in_background(
    hosts: &HostPair,
    dir: &Path,
    to: &str,
) -> std::thread::JoinHandle<(i32, String)> {
    let ns = hosts.a.clone();
    let sock = dir.join("a.sock");
    let to = to.to_string();
    std::thread::spawn(move || migrate(&ns, &sock, &to))
}

#[test]
fn link_cut_during_pre_copy_leaves_the_source_running() {
    let hosts = HostPair::new();
    let dir = TempDir::new("mig-cut");
    let (a, b, to) = source_and_destination(&hosts, &dir.0, 1024);
    let m = migrate_in_background(&hosts, &dir.0, &to);
    assert!(
        b.wait_for("stalling in pre-copy", wait()),
        "{}",
        b.describe()
    );
    hosts.cut();
    let (code, text) = m.join().unwrap_or((-1, "panicked".into()));
    assert_ne!(code, 0, "{text}");
    assert!(
        a.stderr().contains("failed, the guest runs on here"),
        "{}",
        a.describe()
    );
    assert_source_goes_on(&a);
}

#[test]
fn destination_killed_during_pre_copy_leaves_the_source_running() {
    let hosts = HostPair::new();
    let dir = TempDir::new("mig-kill");
    let (a, mut b, to) = source_and_destination(&hosts, &dir.0, 1024);
    let m = migrate_in_background(&hosts, &dir.0, &to);
    assert!(
        b.wait_for("stalling in pre-copy", wait()),
        "{}",
        b.describe()
    );
    b.kill();
    let (code, text) = m.join().unwrap_or((-1, "panicked".into()));
    assert_ne!(code, 0, "{text}");
    assert_source_goes_on(&a);
}

/// The destination receives everything and then stalls instead of
/// confirming (test fault `hang-before-confirm`), and is killed: the source
/// gets no confirmation in the stop-and-copy phase and resumes its guest.
#[test]
fn destination_dying_in_stop_and_copy_leaves_the_source_running() {
    let hosts = HostPair::new();
    let dir = TempDir::new("mig-stop");
    let sock = dir.0.join("a.sock");
    let cmd = "tg.scenario=counter tg.counter_ms=100 tg.counter_region_mib=8";
    let a = Vmm::start(
        Some(&hosts.a),
        &config(1, 256, cmd),
        &["--api-socket", sock.to_str().unwrap_or("")],
    );
    assert!(wait_lines(&a, 3), "{}", a.describe());
    let to = format!("tcp:{}:7200", hosts.b_ip);
    let mut b = Vmm::start_with_env(
        Some(&hosts.b),
        &config(1, 256, cmd),
        &["--incoming", &to],
        &[("OUTBOARD_TEST_FAULT", "hang-before-confirm")],
    );
    assert!(
        b.wait_for("waiting for the incoming guest", wait()),
        "{}",
        b.describe()
    );
    let m = migrate_in_background(&hosts, &dir.0, &to);
    assert!(
        b.wait_for("hanging before the confirmation", wait()),
        "{}",
        b.describe()
    );
    assert!(a.stderr().contains("stop-and-copy"), "{}", a.describe());
    b.kill();
    let (code, text) = m.join().unwrap_or((-1, "panicked".into()));
    assert_ne!(code, 0, "{text}");
    assert!(
        a.stderr().contains("failed, the guest runs on here"),
        "{}",
        a.describe()
    );
    assert_source_goes_on(&a);
}

fn destination_refuses(bytes: &[u8], expect: &str) {
    let dir = TempDir::new("mig-bad");
    let sock = dir.0.join("in.sock");
    let to = format!("unix:{}", sock.display());
    let mut b = Vmm::start(
        None,
        &config(1, 64, "tg.scenario=hang"),
        &["--incoming", &to],
    );
    assert!(
        b.wait_for("waiting for the incoming guest", wait()),
        "{}",
        b.describe()
    );
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let _ = s.write_all(bytes);
    drop(s);
    let code = b.wait_exit(wait());
    assert_eq!(code, Some(1), "{}", b.describe());
    assert!(
        b.stderr().contains(expect),
        "expected {expect:?}\n{}",
        b.describe()
    );
}

#[test]
fn garbage_stream_is_refused() {
    destination_refuses(b"this is not a migration stream at all", "migration");
}

#[test]
fn truncated_stream_is_refused() {
    // A valid header and the start of a section, then nothing.
    let mut bytes = b"OBMIGRAT".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&[1, 0, 0]);
    destination_refuses(&bytes, "migration");
}

#[test]
fn destination_with_another_shape_refuses_and_the_source_goes_on() {
    let hosts = HostPair::new();
    let dir = TempDir::new("mig-shape");
    let (a, mut b, to) = source_and_destination(&hosts, &dir.0, 512);
    let (code, text) = migrate(&hosts.a, &dir.0.join("a.sock"), &to);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("memory"), "{text}");
    assert_eq!(b.wait_exit(wait()), Some(1), "{}", b.describe());
    assert!(
        b.stderr()
            .contains("memory: source 1024 MiB, destination 512 MiB"),
        "{}",
        b.describe()
    );
    assert_source_goes_on(&a);
}
