//! The slow lane: the stock Linux kernel under KVM, through the same boot
//! path. On a PVM host it is emulated and stops at `Run /init` (userspace
//! cannot run there), so the tests read the kernel log up to that point; on
//! a VMX/SVM host, or with a kernel built as a PVM guest, they go on into
//! the initramfs and check its command ran.
//!
//! Boots are slow here, so each test checks as much as one boot shows: the
//! vmlinux boot also mounts its root file system from our block process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outboard_tests::{
    host_kvm, linux_guest, repo_root, run_config, run_config_verbose, spawned_blk_device,
    RunOutput, TempDir, VmSpec,
};

const RUN_INIT: &str = "Run /init as init process";
const RUN_SBIN_INIT: &str = "Run /sbin/init as init process";

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
        devices: Vec::new(),
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

/// ext4 superblock fields: (s_mtime, s_mnt_count).
fn superblock_mounts(image: &Path) -> (u32, u16) {
    let data = std::fs::read(image).expect("read root image");
    let sb = &data[1024..2048];
    assert_eq!(&sb[0x38..0x3a], &0xef53u16.to_le_bytes(), "not ext4");
    (
        u32::from_le_bytes([sb[0x2c], sb[0x2d], sb[0x2e], sb[0x2f]]),
        u16::from_le_bytes([sb[0x34], sb[0x35]]),
    )
}

/// A Linux boot whose root file system is an ext4 image served by our
/// block process.
struct RootBoot {
    out: RunOutput,
    _dir: TempDir,
    img: PathBuf,
    before: (u32, u16),
    cmdline: String,
    userspace: bool,
}

/// How the root disk is attached.
#[derive(Clone, Copy)]
enum RootDisk {
    /// vhost-user-blk on virtio-mmio.
    Mmio,
    /// vhost-user-blk on virtio-pci.
    Pci,
    /// outboard-blk as a virtio-pci function over vfio-user.
    VfioUser,
}

/// Boots `kernel` with no initramfs and `root=/dev/vda rw`, the disk
/// attached as `disk`, up to `Run /sbin/init` (or, where userspace runs, to
/// init's clean reboot).
fn boot_from_root_disk(kernel: PathBuf, vcpus: u8, disk: RootDisk) -> RootBoot {
    let linux = linux_guest();
    let host = host_kvm();
    let userspace = linux.userspace_runs(host);
    let dir = TempDir::new("linux-root");
    let extra = dir.0.join("extra");
    std::fs::create_dir_all(&extra).expect("mkdir");
    std::fs::write(extra.join("host-file"), "written-by-the-host\n").expect("write");
    let img = dir.0.join("root.img");
    let status = Command::new("bash")
        .arg(repo_root().join("resources/linux/make-rootfs.sh"))
        .arg(&img)
        .arg("32")
        .arg(&extra)
        .status()
        .expect("run make-rootfs.sh");
    assert!(status.success(), "make-rootfs.sh failed: {status}");
    let before = superblock_mounts(&img);
    assert_eq!(before.1, 0, "fresh file system already mounted");

    let cmdline = format!(
        "{} root=/dev/vda rw outboard.cmd=cat%20/host-file%20&&%20echo%20written-by-the-guest%20>/guest-file",
        linux.cmdline
    );
    let mmio = spawned_blk_device("rootdisk", &img, &[]);
    let device = match disk {
        RootDisk::Mmio => mmio,
        RootDisk::Pci => mmio.replace(r#""transport": "mmio""#, r#""transport": "pci""#),
        RootDisk::VfioUser => mmio
            .replace(r#""transport": "mmio""#, r#""transport": "pci""#)
            .replace(r#""kind": "vhost-user-blk""#, r#""kind": "vfio-user""#),
    };
    let spec = VmSpec {
        vcpus,
        memory_mib: 256,
        kernel,
        initrd: None,
        cmdline: cmdline.clone(),
        entry: "linux",
        devices: vec![device],
    };
    let deadline = host.deadline(Duration::from_secs(60), Duration::from_secs(900));
    let stop_at = (!userspace).then_some(RUN_SBIN_INIT);
    let out = run_config_verbose(&spec.to_json(), deadline, stop_at);
    RootBoot {
        out,
        _dir: dir,
        img,
        before,
        cmdline,
        userspace,
    }
}

/// The disk probed, ext4 mounted read-write as root, the superblock's
/// mount count and time changed on the host; where userspace runs, init
/// read the host's file and wrote its own.
fn assert_root_mounted(b: &RootBoot) {
    let out = &b.out;
    let d = out.describe();
    assert!(
        !out.timed_out,
        "Linux did not reach {RUN_SBIN_INIT:?} in time\n{d}"
    );
    // 32 MiB = 65536 sectors.
    assert!(
        out.serial
            .contains("virtio_blk virtio0: [vda] 65536 512-byte logical blocks"),
        "{d}"
    );
    assert!(
        out.serial.contains("EXT4-fs (vda): mounted filesystem"),
        "{d}"
    );
    assert!(
        out.serial
            .contains("VFS: Mounted root (ext4 filesystem) on device 254:0"),
        "not mounted read-write\n{d}"
    );
    assert!(out.serial.contains(RUN_SBIN_INIT), "{d}");
    let after = superblock_mounts(&b.img);
    assert_eq!(after.1, b.before.1 + 1, "mount count\n{d}");
    assert_ne!(after.0, b.before.0, "last mount time\n{d}");
    if b.userspace {
        assert!(out.serial.contains("written-by-the-host"), "{d}");
        assert!(out.serial.contains("outboard-linux: exit status=0"), "{d}");
        assert_eq!(out.status, Some(0), "{d}");
        let guest_file = Command::new("debugfs")
            .args(["-R", "cat /guest-file"])
            .arg(&b.img)
            .output()
            .expect("run debugfs (e2fsprogs)");
        assert_eq!(
            String::from_utf8_lossy(&guest_file.stdout),
            "written-by-the-guest\n"
        );
    } else {
        eprintln!(
            "linux root-disk test: this host cannot run Linux userspace (PVM), so the guest's file read/write part is not checked here"
        );
    }
}

/// vmlinux (ELF), 2 vCPUs, 256 MiB, no initramfs: the root file system is
/// on our block process over virtio-mmio, found by Linux's own virtio-mmio
/// and virtio-blk drivers. The kernel log also shows the MP table's CPUs,
/// the memory given, and the command line as given (with the device the
/// VMM added).
#[test]
fn vmlinux_two_vcpus_mounts_ext4_root_from_our_block_process() {
    let b = boot_from_root_disk(linux_guest().vmlinux, 2, RootDisk::Mmio);
    assert_root_mounted(&b);
    let out = &b.out;
    let d = out.describe();
    assert!(
        out.serial.contains(&format!(
            "Kernel command line: {} virtio_mmio.device=4K@0xd0000000:5",
            b.cmdline
        )),
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

/// Linux found the disk as virtio-pci function 00:01.0 and enabled it;
/// returns the VMM's last interrupt-routing line for it.
fn assert_virtio_pci_disk(out: &RunOutput) -> String {
    let d = out.describe();
    assert!(
        out.serial
            .contains("pci 0000:00:01.0: [1af4:1042] type 00 class 0x018000"),
        "{d}"
    );
    assert!(
        out.serial
            .contains("virtio-pci 0000:00:01.0: enabling device"),
        "{d}"
    );
    out.stderr
        .lines()
        .rev()
        .find(|l| l.contains("rootdisk: interrupts"))
        .unwrap_or_else(|| panic!("no interrupt routing logged\n{d}"))
        .to_string()
}

/// vmlinux, 1 vCPU: the same root disk on PCI. Linux finds the host bridge
/// and the virtio-pci function through configuration mechanism #1, its
/// virtio-pci driver binds with MSI-X (the VMM logs the vectors the driver
/// programmed, and there is no INTx to fall back to), and it mounts the
/// disk read-write as root.
#[test]
fn linux_mounts_ext4_root_from_a_virtio_pci_disk_with_msix() {
    let b = boot_from_root_disk(linux_guest().vmlinux, 1, RootDisk::Pci);
    assert_root_mounted(&b);
    let out = &b.out;
    let d = out.describe();
    assert!(
        out.serial.contains("PCI: Using configuration type 1"),
        "{d}"
    );
    assert!(
        out.serial
            .contains("pci 0000:00:00.0: [8086:0d57] type 00 class 0x060000"),
        "{d}"
    );
    // The driver programmed MSI-X: a config vector and one for the queue.
    let line = assert_virtio_pci_disk(out);
    assert!(line.contains("config: MSI-X 0"), "{line}");
    assert!(line.contains("queue 0: MSI-X 1"), "{line}");
}

/// vmlinux, 1 vCPU: the root disk is our block process presenting a
/// virtio-blk PCI function over vfio-user, the VMM owning its BAR and
/// MSI-X. Linux sees an ordinary virtio-pci disk.
#[test]
fn linux_mounts_ext4_root_from_a_vfio_user_disk() {
    let b = boot_from_root_disk(linux_guest().vmlinux, 1, RootDisk::VfioUser);
    assert_root_mounted(&b);
    let out = &b.out;
    let d = out.describe();
    assert!(
        out.stderr
            .contains("rootdisk: vfio-user device on PCI 00:01.0"),
        "{d}"
    );
    let line = assert_virtio_pci_disk(out);
    assert!(line.contains("vector 0: MSI-X 0"), "{line}");
    assert!(line.contains("vector 1: MSI-X 1"), "{line}");
}

/// bzImage, 1 vCPU, 128 MiB: the bzImage path of the boot protocol.
#[test]
fn bzimage_boots_to_init() {
    let (out, _) = boot_linux(true, 1, 128);
    assert_reaches_init(&out);
    let d = out.describe();
    assert!(out.serial.contains("smp: Brought up 1 node, 1 CPU"), "{d}");
}

/// Kernel log timestamps (`[    1.234567]`) of `serial`, in order.
fn log_times(serial: &str) -> Vec<f64> {
    serial
        .lines()
        .filter_map(|l| {
            let t = l.trim_start().strip_prefix('[')?.split(']').next()?;
            t.trim().parse().ok()
        })
        .collect()
}

/// Linux migrates from host A to host B while it boots (mid-way through
/// its initcalls) and finishes booting on B: B's kernel log carries on
/// where A's stopped, timestamps never going back, up to `Run /init`.
#[test]
fn linux_migrates_while_booting_and_finishes_on_b() {
    use outboard_tests::{api, HostPair, Vmm};
    let linux = linux_guest();
    let host = host_kvm();
    let hosts = HostPair::new();
    let dir = TempDir::new("linux-mig");
    let sock = dir.0.join("a.sock");
    let spec = VmSpec {
        vcpus: 1,
        memory_mib: 256,
        kernel: linux.vmlinux.clone(),
        initrd: Some(linux.initramfs.clone()),
        cmdline: linux.cmdline.clone(),
        entry: "linux",
        devices: Vec::new(),
    };
    let json = spec.to_json();
    let deadline = host.deadline(Duration::from_secs(60), Duration::from_secs(600));
    let mut a = Vmm::start(
        Some(&hosts.a),
        &json,
        &["--api-socket", sock.to_str().unwrap_or("")],
    );
    // Mid-way through the initcalls (fs_initcall, networking).
    let marker = "TCP established hash table entries";
    assert!(
        a.wait_for(marker, deadline),
        "A never got to {marker:?}\n{}",
        a.describe()
    );
    let to = format!("tcp:{}:7400", hosts.b_ip);
    let mut b = Vmm::start(Some(&hosts.b), &json, &["--incoming", &to]);
    assert!(
        b.wait_for("waiting for the incoming guest", deadline),
        "{}",
        b.describe()
    );
    let (code, text) = api(
        Some(&hosts.a),
        &sock,
        &["migrate", &to, "--timeout-s", "300"],
    );
    assert_eq!(
        code,
        0,
        "migrate: {text}\n{}\n{}",
        a.describe(),
        b.describe()
    );
    assert_eq!(
        a.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        a.describe()
    );
    let userspace = linux.userspace_runs(host);
    let end = if userspace {
        "outboard-linux: exit status=0"
    } else {
        RUN_INIT
    };
    assert!(
        b.wait_for(end, deadline),
        "B did not finish booting\n{}",
        b.describe()
    );
    let (sa, sb) = (a.serial(), b.serial());
    assert!(!sb.contains("Linux version"), "B booted afresh\n{sb}");
    assert!(
        !sa.contains(RUN_INIT),
        "A finished booting before the move\n{sa}"
    );
    let ta = log_times(&sa);
    let tb = log_times(&sb);
    assert!(!ta.is_empty() && !tb.is_empty(), "{sa}\n---\n{sb}");
    let all: Vec<f64> = ta.iter().chain(&tb).copied().collect();
    assert!(
        all.windows(2).all(|w| w[1] >= w[0]),
        "kernel log time goes back across the move\nA: {:?}\nB: {:?}",
        &ta[ta.len().saturating_sub(3)..],
        &tb[..tb.len().min(3)]
    );
    b.kill();
}
