//! PCI under KVM: the test guest scans bus 0 through ports 0xCF8/0xCFC,
//! drives virtio-pci (modern) block devices with MSI-X, alone and mixed
//! with virtio-mmio ones, against our block process and
//! `qemu-storage-daemon`, moves a BAR, and throws garbage at config space
//! and BARs while the VMM stays up.

use std::path::Path;
use std::time::Duration;

use outboard_tests::{
    blk_pattern_mismatch, host_kvm, raw_image, run_config, run_config_verbose, socket_blk_device,
    spawned_blk_device, RunOutput, StorageDaemon, TempDir, VmSpec,
};

const SECTORS_1M: u64 = 2048;

fn deadline() -> Duration {
    host_kvm().deadline(Duration::from_secs(30), Duration::from_secs(180))
}

/// `entry` (a device JSON object) moved to PCI: only `"transport"` changes.
fn on_pci(entry: String) -> String {
    if entry.contains(r#""transport": "mmio""#) {
        entry.replace(r#""transport": "mmio""#, r#""transport": "pci""#)
    } else {
        entry.replacen('{', r#"{"transport": "pci", "#, 1)
    }
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

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    raw_image(&p, SECTORS_1M * 512);
    p
}

#[test]
fn virtio_pci_two_queues_whole_disk_then_second_boot_reads_back() {
    let dir = TempDir::new("pci");
    let img = image(&dir.0, "disk.img");
    let out = boot(
        "tg.scenario=blk tg.blk_queues=2 tg.blk_seed=0x9c1",
        vec![on_pci(spawned_blk_device(
            "disk0",
            &img,
            &["--queues", "2"],
        ))],
    );
    assert_pass(
        &out,
        &[
            "blk device=0 pci=00:01.0 bar=0x100000000 msix=3",
            "queues=2",
            "blk wrote=2048 read=2048 verified ok",
        ],
    );
    // The driver's MSI-X programming reached KVM: a config vector and one
    // per queue, each on its own GSI.
    assert!(
        out.stderr.contains(
            "disk0: interrupts config: MSI-X 0 (GSI 24, vector 0x60), queue 0: MSI-X 1 (GSI 25, vector 0x61), queue 1: MSI-X 2 (GSI 26, vector 0x62)"
        ),
        "{}",
        out.describe()
    );
    assert_eq!(blk_pattern_mismatch(&img, 0x9c1, SECTORS_1M), None);
    let out = boot(
        "tg.scenario=blk tg.blk_mode=read tg.blk_seed=0x9c1",
        vec![on_pci(spawned_blk_device("disk0", &img, &[]))],
    );
    assert_pass(&out, &["blk wrote=0 read=2048 verified ok"]);
}

/// Two virtio-mmio and three PCI devices on one VM (one of them
/// qemu-storage-daemon's): the guest drives a PCI one and an mmio one,
/// each in its own boot; the others sit there.
#[test]
fn several_devices_on_pci_and_mmio_at_once() {
    let dir = TempDir::new("pci-mixed");
    let imgs: Vec<_> = (0..5)
        .map(|i| image(&dir.0, &format!("d{i}.img")))
        .collect();
    let qsd = StorageDaemon::start(&imgs[4], &dir.0.join("qsd.sock"), 2, true);
    let devices = || {
        vec![
            spawned_blk_device("m0", &imgs[0], &[]),
            on_pci(spawned_blk_device("p0", &imgs[1], &[])),
            spawned_blk_device("m1", &imgs[2], &[]),
            on_pci(spawned_blk_device("p1", &imgs[3], &["--readonly"])),
            on_pci(socket_blk_device("p2", &qsd.socket)),
        ]
    };
    // Device list in the guest: mmio windows first (m0, m1), then PCI in
    // slot order (p0 00:01.0, p1 00:02.0, p2 00:03.0).
    let out = boot(
        "tg.scenario=blk tg.blk_device=4 tg.blk_queues=2 tg.blk_seed=0x51",
        devices(),
    );
    assert_pass(
        &out,
        &[
            "blk device=4 pci=00:03.0",
            "queues=2",
            "blk wrote=2048 read=2048 verified ok",
        ],
    );
    assert_eq!(blk_pattern_mismatch(&imgs[4], 0x51, SECTORS_1M), None);

    let out = boot(
        "tg.scenario=blk tg.blk_device=1 tg.blk_seed=0x52",
        devices(),
    );
    assert_pass(
        &out,
        &[
            "blk device=1 base=0xd0001000 irq=6",
            "blk wrote=2048 read=2048 verified ok",
        ],
    );
    assert_eq!(blk_pattern_mismatch(&imgs[2], 0x52, SECTORS_1M), None);

    let before = std::fs::read(&imgs[3]).expect("read image");
    let out = boot(
        "tg.scenario=blk tg.blk_device=3 tg.blk_expect_ro=1",
        devices(),
    );
    assert_pass(
        &out,
        &["blk device=3 pci=00:02.0", "blk read-only: write refused"],
    );
    assert_eq!(std::fs::read(&imgs[3]).expect("read image"), before);
}

#[test]
fn storage_daemon_over_pci() {
    let dir = TempDir::new("pci-qsd");
    let img = image(&dir.0, "qsd.img");
    let qsd = StorageDaemon::start(&img, &dir.0.join("qsd.sock"), 2, true);
    let out = boot(
        "tg.scenario=blk tg.blk_queues=2 tg.blk_seed=0x77",
        vec![on_pci(socket_blk_device("qsd0", &qsd.socket))],
    );
    assert_pass(
        &out,
        &[
            "blk device=0 pci=00:01.0",
            "queues=2",
            "blk wrote=2048 read=2048 verified ok",
        ],
    );
    assert_eq!(blk_pattern_mismatch(&img, 0x77, SECTORS_1M), None);
}

/// The guest moves BAR 0 (memory decode off, new address, decode on): the
/// VMM follows with its MMIO dispatch and the notify ioeventfds.
#[test]
fn the_guest_moves_a_bar() {
    let dir = TempDir::new("pci-move");
    let img = image(&dir.0, "disk.img");
    let out = boot(
        "tg.scenario=blk tg.blk_move_bar=1 tg.blk_seed=0x3",
        vec![on_pci(spawned_blk_device("disk0", &img, &[]))],
    );
    assert_pass(
        &out,
        &[
            "blk bar moved 0x100000000 -> 0x110000000",
            "bar=0x110000000",
            "blk wrote=2048 read=2048 verified ok",
        ],
    );
    assert_eq!(blk_pattern_mismatch(&img, 0x3, SECTORS_1M), None);
}

/// Random config accesses (any bus, device, function, offset, size) and
/// random BAR and virtio-mmio window accesses (any size, any alignment),
/// with the host bridge unguarded: the VMM stays up, the guest finishes
/// and the bus still answers.
#[test]
fn garbage_in_config_space_and_bars_leaves_the_vmm_up() {
    let dir = TempDir::new("pci-fuzz");
    let a = image(&dir.0, "a.img");
    let b = image(&dir.0, "b.img");
    for seed in [1u32, 0xdead] {
        let mut spec = VmSpec::test_guest(
            1,
            64,
            &format!("tg.scenario=pci-fuzz tg.fuzz_seed={seed} tg.fuzz_iters=20000 tg.fuzz_all=1"),
        );
        spec.devices = vec![
            on_pci(spawned_blk_device("p0", &a, &["--queues", "2"])),
            spawned_blk_device("m0", &b, &[]),
        ];
        let out = run_config(&spec.to_json(), deadline(), None);
        let d = out.describe();
        assert_eq!(out.status, Some(0), "{d}");
        assert!(
            out.serial
                .contains("pci-fuzz iters=20000 functions=2 after=2 host-bridge=8086:0d57"),
            "{d}"
        );
        assert!(out.serial.contains("result PASS"), "{d}");
        assert!(!out.stderr.contains("panicked"), "{d}");
    }
}
