//! The test guest under KVM: every vCPU checks in, timer interrupts arrive,
//! the guest sees the memory it was given, and its exit status and failures
//! reach the VMM's exit status.

use std::time::Duration;

use outboard_tests::{host_kvm, run_config, RunOutput, VmSpec};

fn boot(spec: &VmSpec) -> RunOutput {
    let deadline = host_kvm().deadline(Duration::from_secs(20), Duration::from_secs(120));
    run_config(&spec.to_json(), deadline, None)
}

fn assert_boot_passes(vcpus: u8, memory_mib: u64, entry: &'static str) {
    let mut spec = VmSpec::test_guest(
        vcpus,
        memory_mib,
        &format!("tg.scenario=boot tg.cpus={vcpus} tg.mem_mib={memory_mib} tg.ticks=5"),
    );
    spec.entry = entry;
    let out = boot(&spec);
    let d = out.describe();
    assert_eq!(out.status, Some(0), "{d}");
    let expected_entry = if entry == "pvh" {
        "entry=pvh"
    } else {
        "entry=linux64"
    };
    assert_eq!(out.serial_lines_with(expected_entry).len(), 1, "{d}");
    assert_eq!(
        out.serial_lines_with(&format!("cpus expected={vcpus} online={vcpus}"))
            .len(),
        1,
        "{d}"
    );
    assert!(out.serial.contains("timer ticks=5"), "{d}");
    assert!(
        out.serial.contains(&format!("ap-timers ok={}", vcpus - 1)),
        "{d}"
    );
    assert!(out.serial.contains("mem checked="), "{d}");
    assert!(out.serial.contains(" ok\r\n"), "{d}");
    assert!(out.serial.contains("result PASS"), "{d}");
    // Every vCPU checked in by its APIC id.
    for cpu in 1..vcpus {
        assert!(out.serial.contains(&format!("(apic {cpu}) online")), "{d}");
    }
}

#[test]
fn one_vcpu_128_mib() {
    assert_boot_passes(1, 128, "linux");
}

#[test]
fn four_vcpus_256_mib() {
    assert_boot_passes(4, 256, "linux");
}

#[test]
fn two_vcpus_memory_above_the_mmio_hole() {
    // 4 GiB: 3 GiB below the hole, 1 GiB above 4 GiB.
    assert_boot_passes(2, 4096, "linux");
}

#[test]
fn pvh_entry_one_vcpu_64_mib() {
    assert_boot_passes(1, 64, "pvh");
}

#[test]
fn pvh_entry_four_vcpus_1_gib() {
    assert_boot_passes(4, 1024, "pvh");
}

#[test]
fn guest_exit_status_propagates() {
    for status in [0u8, 3, 42] {
        let out = boot(&VmSpec::test_guest(
            1,
            32,
            &format!("tg.scenario=exit tg.status={status}"),
        ));
        let d = out.describe();
        assert_eq!(out.status, Some(i32::from(status)), "{d}");
        if status != 0 {
            assert!(
                out.stderr
                    .contains(&format!("guest powered off with status {status}")),
                "{d}"
            );
        }
    }
}

#[test]
fn reset_is_a_clean_shutdown() {
    let out = boot(&VmSpec::test_guest(2, 32, "tg.scenario=reset"));
    assert_eq!(out.status, Some(0), "{}", out.describe());
}

#[test]
fn triple_fault_fails_with_one_line() {
    let out = boot(&VmSpec::test_guest(1, 32, "tg.scenario=triple-fault"));
    let d = out.describe();
    assert_eq!(out.status, Some(1), "{d}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("guest stopped"))
        .collect();
    assert_eq!(lines.len(), 1, "{d}");
    assert!(lines[0].contains("triple fault"), "{d}");
    assert!(lines[0].contains("rip=0x"), "{d}");
}

#[test]
fn emulation_failure_reports_rip_and_instruction_bytes() {
    // On a PVM host `popcnt` is beyond KVM's emulator: an internal error.
    // With VMX/SVM it runs natively, and the guest powers off with 1.
    let out = boot(&VmSpec::test_guest(1, 32, "tg.scenario=bad-insn"));
    let d = out.describe();
    match host_kvm() {
        outboard_tests::HostKvm::Pvm => {
            assert_eq!(out.status, Some(1), "{d}");
            let line = out
                .stderr
                .lines()
                .find(|l| l.contains("guest stopped"))
                .unwrap_or_default();
            assert!(line.contains("internal error"), "{d}");
            assert!(line.contains("rip=0x"), "{d}");
            // popcnt rax, rcx = f3 48 0f b8 c1
            assert!(line.contains("instruction bytes: f3 48 0f b8 c1"), "{d}");
        }
        outboard_tests::HostKvm::Hardware => {
            // Natively popcnt just runs; the guest reports that as a failure.
            assert_eq!(out.status, Some(1), "{d}");
            assert!(out.serial.contains("bad-insn-executed"), "{d}");
        }
    }
}

#[test]
fn sigterm_stops_the_guest_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = outboard_tests::TempDir::new("sigterm");
    let cfg = dir.0.join("vm.json");
    std::fs::write(
        &cfg,
        VmSpec::test_guest(2, 32, "tg.scenario=hang").to_json(),
    )
    .unwrap();
    let mut child = Command::new(outboard_tests::outboard_bin())
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("outboard-tg:") {
        line.clear();
    }
    assert!(line.contains("outboard-tg:"), "the guest printed nothing");
    // SAFETY: kill only sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
}
