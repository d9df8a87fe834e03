//! The slow lane: the stock Linux kernel under KVM, through the same boot
//! path. On a PVM host it is emulated and stops at `Run /init` (userspace
//! cannot run there), so the tests read the kernel log up to that point; on
//! a VMX/SVM host, or with a kernel built as a PVM guest, they go on into
//! the initramfs and check its command ran.

use std::time::Duration;

use outboard_tests::{host_kvm, linux_guest, run_config, RunOutput, VmSpec};

const RUN_INIT: &str = "Run /init as init process";

fn boot_linux(kernel_is_bzimage: bool, vcpus: u8, memory_mib: u64) -> (RunOutput, String) {
    let linux = linux_guest();
    let host = host_kvm();
    let userspace = linux.userspace_runs(host);
    let cmdline = format!("{} outboard.cmd=echo%20linux-guest-ok", linux.cmdline);
    let spec = VmSpec {
        vcpus,
        memory_mib,
        kernel: if kernel_is_bzimage {
            linux.bzimage.clone()
        } else {
            linux.vmlinux.clone()
        },
        initrd: Some(linux.initramfs.clone()),
        cmdline: cmdline.clone(),
        entry: "linux",
    };
    let deadline = host.deadline(Duration::from_secs(60), Duration::from_secs(900));
    // Without userspace the run ends at `Run /init`: on PVM, init's first
    // system call cannot be delivered to a non-PVM kernel.
    let stop_at = (!userspace).then_some(RUN_INIT);
    (run_config(&spec.to_json(), deadline, stop_at), cmdline)
}

fn assert_reaches_init(out: &RunOutput) {
    let d = out.describe();
    assert!(
        !out.timed_out,
        "Linux did not reach {RUN_INIT:?} in time\n{d}"
    );
    assert!(out.serial.contains(RUN_INIT), "{d}");
    if linux_guest().userspace_runs(host_kvm()) {
        assert!(out.serial.contains("outboard-linux: init started"), "{d}");
        assert!(out.serial.contains("linux-guest-ok"), "{d}");
        assert!(out.serial.contains("outboard-linux: exit status=0"), "{d}");
        assert_eq!(out.status, Some(0), "{d}");
    }
}

/// vmlinux (ELF), 2 vCPUs, 256 MiB: the kernel log shows the MP table's
/// CPUs, the memory given, and the command line as given.
#[test]
fn vmlinux_boots_with_two_vcpus_and_reports_what_it_was_given() {
    let (out, cmdline) = boot_linux(false, 2, 256);
    assert_reaches_init(&out);
    let d = out.describe();
    assert!(
        out.serial
            .contains(&format!("Kernel command line: {cmdline}")),
        "command line not echoed as given\n{d}"
    );
    assert!(
        out.serial
            .contains("Intel MultiProcessor Specification v1.4"),
        "{d}"
    );
    assert!(out.serial.contains("smp: Brought up 1 node, 2 CPUs"), "{d}");
    // "Memory: 221052K/261752K available (...)": the second figure is the
    // RAM the kernel found, 256 MiB less the reserved low area.
    let line = out
        .serial
        .lines()
        .find(|l| l.contains("Memory: ") && l.contains("K available"))
        .unwrap_or_else(|| panic!("no Memory: line\n{d}"));
    let total_k: u64 = line
        .split("Memory: ")
        .nth(1)
        .and_then(|s| s.split('/').nth(1))
        .and_then(|s| s.split('K').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    assert!(
        (250_000..=262_144).contains(&total_k),
        "kernel sees {total_k}K of 262144K: {line}"
    );
}

/// bzImage, 1 vCPU, 128 MiB: the bzImage path of the boot protocol.
#[test]
fn bzimage_boots_to_init() {
    let (out, _) = boot_linux(true, 1, 128);
    assert_reaches_init(&out);
    let d = out.describe();
    assert!(out.serial.contains("smp: Brought up 1 node, 1 CPU"), "{d}");
}
