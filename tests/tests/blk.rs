//! Block devices on virtio-mmio under KVM, driven by the test guest's own
//! virtio-blk driver: our block process (`outboard-blk`, spawned by the
//! VMM), `qemu-storage-daemon` as a third-party backend for our VMM, and
//! QEMU 7.2 as a third-party frontend for our block process. The host
//! checks the images afterwards.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outboard_tests::{
    blk_pattern_mismatch, blk_pattern_word, child_pids, host_kvm, raw_image, run_config,
    run_config_with_hook, sibling_bin, socket_blk_device, spawned_blk_device, test_guest, Hook,
    RunOutput, StorageDaemon, TempDir, VmSpec,
};

const SECTORS_1M: u64 = 2048;

fn deadline() -> Duration {
    host_kvm().deadline(Duration::from_secs(30), Duration::from_secs(180))
}

fn boot(cmdline: &str, devices: Vec<String>) -> RunOutput {
    let mut spec = VmSpec::test_guest(1, 64, cmdline);
    spec.devices = devices;
    run_config(&spec.to_json(), deadline(), None)
}

fn assert_blk_pass(out: &RunOutput, summary: &str) {
    let d = out.describe();
    assert_eq!(out.status, Some(0), "{d}");
    assert!(out.serial.contains(summary), "expected {summary:?}\n{d}");
    assert!(out.serial.contains("result PASS"), "{d}");
    assert!(!out.stderr.contains("error"), "{d}");
}

/// Fills `image` with the pattern for `seed` from the host.
fn write_pattern(image: &Path, seed: u64, sectors: u64) {
    let mut data = Vec::with_capacity((sectors * 512) as usize);
    for s in 0..sectors {
        for i in 0..64 {
            data.extend_from_slice(&blk_pattern_word(s, i, seed).to_le_bytes());
        }
    }
    std::fs::write(image, data).expect("write image");
}

#[test]
fn outboard_blk_two_queues_whole_disk_then_second_boot_reads_back() {
    let dir = TempDir::new("blk");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS_1M * 512);
    let out = boot(
        "tg.scenario=blk tg.blk_queues=2 tg.blk_seed=0x5eed",
        vec![spawned_blk_device("disk0", &img, &["--queues", "2"])],
    );
    assert_blk_pass(&out, "blk wrote=2048 read=2048 verified ok");
    assert!(out.serial.contains("queues=2"), "{}", out.describe());
    assert_eq!(blk_pattern_mismatch(&img, 0x5eed, SECTORS_1M), None);

    // A new VMM and a new device process read back what the first wrote.
    let out = boot(
        "tg.scenario=blk tg.blk_mode=read tg.blk_seed=0x5eed",
        vec![spawned_blk_device("disk0", &img, &[])],
    );
    assert_blk_pass(&out, "blk wrote=0 read=2048 verified ok");
}

#[test]
fn outboard_blk_read_only_refuses_writes() {
    let dir = TempDir::new("blk-ro");
    let img = dir.0.join("disk.img");
    write_pattern(&img, 0x77, SECTORS_1M);
    let before = std::fs::read(&img).expect("read image");
    let out = boot(
        "tg.scenario=blk tg.blk_expect_ro=1 tg.blk_seed=0x99",
        vec![spawned_blk_device("disk0", &img, &["--readonly"])],
    );
    assert_blk_pass(&out, "blk read-only: write refused");
    assert_eq!(std::fs::read(&img).expect("read image"), before);
    // Reads still work on a read-only disk.
    let out = boot(
        "tg.scenario=blk tg.blk_mode=read tg.blk_seed=0x77",
        vec![spawned_blk_device("disk0", &img, &["--readonly"])],
    );
    assert_blk_pass(&out, "blk wrote=0 read=2048 verified ok");
}

#[test]
fn killing_the_device_process_mid_io_leaves_the_vmm_running() {
    let dir = TempDir::new("blk-kill");
    let img = dir.0.join("disk.img");
    raw_image(&img, 16 << 20);
    let mut spec = VmSpec::test_guest(
        1,
        64,
        "tg.scenario=blk tg.blk_mode=write tg.blk_timeout_ms=3000",
    );
    spec.devices = vec![spawned_blk_device("disk0", &img, &[])];
    let killed = std::cell::Cell::new(0u32);
    let hook = Hook {
        marker: "blk id=",
        action: Box::new(|vmm_pid| {
            // Let the writes get going, then kill the device process.
            std::thread::sleep(Duration::from_millis(500));
            for pid in child_pids(vmm_pid) {
                // SAFETY: kill only sends a signal to our grandchild.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                killed.set(pid);
            }
        }),
    };
    let out = run_config_with_hook(&spec.to_json(), deadline(), None, hook);
    let d = out.describe();
    assert_ne!(killed.get(), 0, "no device process found to kill\n{d}");
    assert!(
        out.stderr.contains(
            "device disk0: the backend closed its connection; its process was killed by signal 9"
        ),
        "{d}"
    );
    // The guest went on: its request timed out, it saw DEVICE_NEEDS_RESET
    // (0x40 with ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK) and powered
    // off with its own status through the VMM.
    assert!(out.serial.contains("blk timeout: request 1"), "{d}");
    assert!(out.serial.contains("blk device status=0x4f"), "{d}");
    assert!(out.serial.contains("result FAIL blk-timeout"), "{d}");
    assert_eq!(out.status, Some(1), "{d}");
    assert!(!out.timed_out, "{d}");
}

#[test]
fn storage_daemon_two_queues_then_second_boot_reads_back_beside_our_own() {
    let dir = TempDir::new("blk-qsd");
    let img = dir.0.join("qsd.img");
    raw_image(&img, SECTORS_1M * 512);
    let qsd = StorageDaemon::start(&img, &dir.0.join("qsd.sock"), 2, true);
    let out = boot(
        "tg.scenario=blk tg.blk_queues=2 tg.blk_seed=0xabc",
        vec![socket_blk_device("qsd0", &qsd.socket)],
    );
    assert_blk_pass(&out, "blk wrote=2048 read=2048 verified ok");
    assert!(out.serial.contains("queues=2"), "{}", out.describe());
    assert_eq!(blk_pattern_mismatch(&img, 0xabc, SECTORS_1M), None);

    // Second boot: our own disk as device 0, the daemon's as device 1;
    // the guest reads the daemon's back.
    let ours = dir.0.join("ours.img");
    raw_image(&ours, SECTORS_1M * 512);
    let out = boot(
        "tg.scenario=blk tg.blk_device=1 tg.blk_mode=read tg.blk_seed=0xabc",
        vec![
            spawned_blk_device("disk0", &ours, &[]),
            socket_blk_device("qsd0", &qsd.socket),
        ],
    );
    assert_blk_pass(&out, "blk wrote=0 read=2048 verified ok");
    assert!(
        out.serial.contains("blk device=1 base=0xd0001000 irq=6"),
        "{}",
        out.describe()
    );
}

#[test]
fn storage_daemon_read_only_refuses_writes() {
    let dir = TempDir::new("blk-qsd-ro");
    let img = dir.0.join("qsd.img");
    write_pattern(&img, 0x42, SECTORS_1M);
    let before = std::fs::read(&img).expect("read image");
    let qsd = StorageDaemon::start(&img, &dir.0.join("qsd.sock"), 1, false);
    let out = boot(
        "tg.scenario=blk tg.blk_expect_ro=1",
        vec![socket_blk_device("qsd0", &qsd.socket)],
    );
    assert_blk_pass(&out, "blk read-only: write refused");
    assert_eq!(std::fs::read(&img).expect("read image"), before);
}

/// `outboard-blk --socket` for QEMU to connect to; killed on drop.
struct BlkProcess(std::process::Child);

impl BlkProcess {
    fn start(image: &Path, socket: &Path, args: &[&str]) -> Self {
        let child = Command::new(sibling_bin("outboard-blk"))
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start outboard-blk");
        let start = std::time::Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "outboard-blk did not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        BlkProcess(child)
    }
}

impl Drop for BlkProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU 7.2 (`-M microvm`, `vhost-user-blk` on its virtio-mmio bus; 7.2 has no
/// `vhost-user-blk-device` alias) boots the test guest
/// against our block process; returns the serial output.
fn qemu_boot(socket: &Path, queues: u16, cmdline: &str) -> String {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
        .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-m", "64M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .arg("-device")
        .arg(format!("vhost-user-blk,chardev=c0,num-queues={queues}"))
        .arg("-kernel")
        .arg(test_guest())
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .expect("run qemu-system-x86_64 (Debian's qemu-system-x86; .ci/run installs it)");
    let serial = String::from_utf8_lossy(&out.stdout).into_owned();
    // isa-debug-exit turns guest status N into (N << 1) | 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU exit {:?}\n--- serial ---\n{serial}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serial
}

#[test]
fn qemu_as_frontend_drives_our_block_process() {
    let dir = TempDir::new("blk-qemu");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS_1M * 512);
    let sock = dir.0.join("blk.sock");

    let blk = BlkProcess::start(&img, &sock, &["--queues", "2"]);
    let serial = qemu_boot(
        &sock,
        2,
        "tg.scenario=blk tg.blk_queues=2 tg.blk_seed=0xfeed",
    );
    drop(blk);
    assert!(serial.contains("queues=2"), "{serial}");
    assert!(
        serial.contains("blk wrote=2048 read=2048 verified ok"),
        "{serial}"
    );
    assert!(serial.contains("result PASS"), "{serial}");
    assert_eq!(blk_pattern_mismatch(&img, 0xfeed, SECTORS_1M), None);

    let _ = std::fs::remove_file(&sock);
    let blk = BlkProcess::start(&img, &sock, &[]);
    let serial = qemu_boot(
        &sock,
        1,
        "tg.scenario=blk tg.blk_mode=read tg.blk_seed=0xfeed",
    );
    drop(blk);
    assert!(
        serial.contains("blk wrote=0 read=2048 verified ok"),
        "{serial}"
    );

    let before = std::fs::read(&img).expect("read image");
    let _ = std::fs::remove_file(&sock);
    let blk = BlkProcess::start(&img, &sock, &["--readonly"]);
    let serial = qemu_boot(&sock, 1, "tg.scenario=blk tg.blk_expect_ro=1");
    drop(blk);
    assert!(serial.contains("blk read-only: write refused"), "{serial}");
    assert!(serial.contains("result PASS"), "{serial}");
    assert_eq!(std::fs::read(&img).expect("read image"), before);
}

#[test]
fn unreachable_or_failing_backends_give_one_clear_error() {
    let out = boot(
        "tg.scenario=blk",
        vec![socket_blk_device("d0", Path::new("/nonexistent/blk.sock"))],
    );
    let d = out.describe();
    assert_eq!(out.status, Some(1), "{d}");
    assert!(
        out.stderr.contains(
            "outboard: device d0: cannot connect to /nonexistent/blk.sock: No such file or directory"
        ),
        "{d}"
    );
    assert!(out.serial.is_empty(), "{d}");

    // The device process refuses its arguments: its own line, then the
    // VMM's, which says how the process ended.
    let out = boot(
        "tg.scenario=blk",
        vec![spawned_blk_device(
            "d0",
            Path::new("/nonexistent/disk.img"),
            &[],
        )],
    );
    let d = out.describe();
    assert_eq!(out.status, Some(1), "{d}");
    assert!(out.stderr.contains("/nonexistent/disk.img"), "{d}");
    let vmm_line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("outboard: device d0: vhost-user"))
        .unwrap_or_else(|| panic!("no VMM error line\n{d}"));
    assert!(
        vmm_line.ends_with("(its process exited with status 1)"),
        "{d}"
    );
    assert!(out.serial.is_empty(), "{d}");
}
