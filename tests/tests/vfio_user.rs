//! vfio-user under KVM: our block process presents its disk as a
//! virtio-blk PCI function over vfio-user (it implements virtio-pci
//! itself), and the VMM's vfio-user client puts that function on its PCI
//! bus. The test guest's own virtio-pci driver uses it; the host checks the
//! image.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outboard_tests::{
    blk_pattern_mismatch, host_kvm, json_str, raw_image, run_config_verbose, sibling_bin,
    RunOutput, TempDir, VmSpec,
};

const SECTORS_1M: u64 = 2048;

fn deadline() -> Duration {
    host_kvm().deadline(Duration::from_secs(30), Duration::from_secs(180))
}

/// A config `devices` entry for a vfio-user device the VMM spawns.
fn spawned_vfio_user(id: &str, image: &Path, args: &[&str]) -> String {
    let mut all = vec![json_str("--image"), json_str(&image.display().to_string())];
    all.extend(args.iter().map(|a| json_str(a)));
    format!(
        r#"{{"id": "{id}", "kind": "vfio-user", "transport": "pci", "spawn": {{"args": [{}]}}}}"#,
        all.join(", ")
    )
}

fn boot(cmdline: &str, devices: Vec<String>) -> RunOutput {
    let mut spec = VmSpec::test_guest(1, 64, cmdline);
    spec.devices = devices;
    run_config_verbose(&spec.to_json(), deadline(), None)
}

fn assert_pass(out: &RunOutput, expect: &[&str]) {
    let d = out.describe();
    assert_eq!(out.status, Some(0), "{d}");
    for e in expect {
        assert!(out.serial.contains(e), "expected {e:?}\n{d}");
    }
    assert!(out.serial.contains("result PASS"), "{d}");
    assert!(!out.stderr.contains("error"), "{d}");
}

#[test]
fn test_guest_uses_a_disk_over_vfio_user_then_reads_it_back() {
    let dir = TempDir::new("vfio");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS_1M * 512);
    let out = boot(
        "tg.scenario=blk tg.blk_queues=2 tg.blk_seed=0xf10",
        vec![spawned_vfio_user("vdisk", &img, &["--queues", "2"])],
    );
    assert_pass(
        &out,
        &[
            "blk device=0 pci=00:01.0",
            "queues=2",
            "blk wrote=2048 read=2048 verified ok",
        ],
    );
    // The VMM emulates MSI-X: the device's vector eventfds are irqfds.
    assert!(
        out.stderr.contains("vdisk: interrupts"),
        "{}",
        out.describe()
    );
    assert_eq!(blk_pattern_mismatch(&img, 0xf10, SECTORS_1M), None);
    let out = boot(
        "tg.scenario=blk tg.blk_mode=read tg.blk_seed=0xf10",
        vec![spawned_vfio_user("vdisk", &img, &[])],
    );
    assert_pass(&out, &["blk wrote=0 read=2048 verified ok"]);
}

/// A vfio-user server someone else started: `outboard-blk --vfio-user
/// --socket PATH`, and the VMM connecting to it; the guest moves the BAR.
#[test]
fn connect_to_a_running_vfio_user_server_and_move_its_bar() {
    let dir = TempDir::new("vfio-socket");
    let img = dir.0.join("disk.img");
    raw_image(&img, SECTORS_1M * 512);
    let sock = dir.0.join("vfio.sock");
    let mut server = Command::new(sibling_bin("outboard-blk"))
        .args(["--vfio-user", "--image"])
        .arg(&img)
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("start outboard-blk");
    let start = std::time::Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let device = format!(
        r#"{{"id": "vdisk", "kind": "vfio-user", "transport": "pci", "socket": {}}}"#,
        json_str(&sock.display().to_string())
    );
    let out = boot(
        "tg.scenario=blk tg.blk_move_bar=1 tg.blk_seed=0x5",
        vec![device],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_pass(
        &out,
        &["blk bar moved", "blk wrote=2048 read=2048 verified ok"],
    );
    assert_eq!(blk_pattern_mismatch(&img, 0x5, SECTORS_1M), None);
}
