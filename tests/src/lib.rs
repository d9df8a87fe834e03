//! Harness for Outboard's end-to-end tests and benchmarks: finds (building
//! through the cache when needed) the `outboard` binary and the guest
//! images, writes VM configs, runs the VMM with a deadline, and knows what
//! kind of KVM the host has.
//!
//! Environment overrides: `OUTBOARD_BIN` (the VMM binary),
//! `OUTBOARD_TEST_GUEST` (the test guest ELF), `OUTBOARD_LINUX_DIR` (a
//! directory with `vmlinux`, `bzImage` and `initramfs.cpio`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `outboard` binary: `OUTBOARD_BIN`, else the one cargo built next to
/// this test executable (`tests/run` builds it first).
pub fn outboard_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OUTBOARD_BIN") {
        return PathBuf::from(p);
    }
    // Tests live in target/<profile>/deps/, benchmarks in target/<profile>/.
    let exe = std::env::current_exe().unwrap_or_default();
    let dirs = [exe.parent(), exe.parent().and_then(Path::parent)];
    let candidate = dirs
        .iter()
        .flatten()
        .map(|d| d.join("outboard"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "outboard binary not found next to {}: run `cargo build` first (tests/run does), or set OUTBOARD_BIN",
                exe.display()
            )
        });
    candidate
}

fn run_build_script(script: &str) -> PathBuf {
    let path = repo_root().join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} failed with {}",
        path.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").trim();
    assert!(!last.is_empty(), "{} printed no path", path.display());
    PathBuf::from(last)
}

/// The test guest ELF, built and cached by `resources/test-guest/build.sh`.
pub fn test_guest() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var("OUTBOARD_TEST_GUEST") {
        Ok(p) => PathBuf::from(p),
        Err(_) => run_build_script("resources/test-guest/build.sh"),
    })
    .clone()
}

/// The Linux guest's files.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// ELF kernel.
    pub vmlinux: PathBuf,
    /// bzImage kernel.
    pub bzimage: PathBuf,
    /// busybox initramfs, uncompressed: gunzip alone costs ~110 s where
    /// every instruction is emulated (`initramfs.cpio.gz` is beside it).
    pub initramfs: PathBuf,
    /// The command line for this host (`resources/linux/cmdline.txt` on PVM).
    pub cmdline: String,
    /// Whether the kernel is built as a PVM guest (`CONFIG_PVM_GUEST=y` in
    /// the `config` beside it): then its userspace runs on a PVM host too.
    pub pvm_guest: bool,
}

impl LinuxGuest {
    /// Whether Linux userspace can run on this host with this kernel.
    pub fn userspace_runs(&self, host: HostKvm) -> bool {
        host == HostKvm::Hardware || self.pvm_guest
    }
}

/// The Linux guest, built and cached by `resources/linux/build.sh`.
pub fn linux_guest() -> LinuxGuest {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| match std::env::var("OUTBOARD_LINUX_DIR") {
            Ok(p) => PathBuf::from(p),
            Err(_) => run_build_script("resources/linux/build.sh"),
        })
        .clone();
    // cmdline.txt is for a PVM host (clearcpuid=, nopv, ...); a VMX/SVM
    // host boots the kernel as it is.
    let cmdline = match host_kvm() {
        HostKvm::Pvm => std::fs::read_to_string(repo_root().join("resources/linux/cmdline.txt"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        HostKvm::Hardware => "console=ttyS0 reboot=k panic=-1".to_string(),
    };
    let pvm_guest = std::fs::read_to_string(dir.join("config"))
        .is_ok_and(|c| c.lines().any(|l| l.trim() == "CONFIG_PVM_GUEST=y"));
    LinuxGuest {
        pvm_guest,
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio"),
        cmdline,
    }
}

/// The kind of KVM this host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKvm {
    /// PVM: non-PVM guests are emulated; Linux userspace cannot run.
    Pvm,
    /// VMX/SVM: guests run natively.
    Hardware,
}

/// Detects the host's KVM, and fails with a clear message when there is none.
pub fn host_kvm() -> HostKvm {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests boot real guests under KVM"
    );
    if Path::new("/sys/module/kvm_pvm").exists() {
        HostKvm::Pvm
    } else {
        HostKvm::Hardware
    }
}

impl HostKvm {
    /// Scales a deadline for the host: emulation on PVM is far slower.
    pub fn deadline(self, hardware: Duration, pvm: Duration) -> Duration {
        match self {
            HostKvm::Pvm => pvm,
            HostKvm::Hardware => hardware,
        }
    }
}

/// A VM to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// vCPU count.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Kernel path.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// "linux" or "pvh".
    pub entry: &'static str,
}

impl VmSpec {
    /// The test guest with `cmdline`.
    pub fn test_guest(vcpus: u8, memory_mib: u64, cmdline: &str) -> Self {
        VmSpec {
            vcpus,
            memory_mib,
            kernel: test_guest(),
            initrd: None,
            cmdline: cmdline.to_string(),
            entry: "linux",
        }
    }

    /// The config JSON for this spec, console on stdout.
    pub fn to_json(&self) -> String {
        let mut kernel = format!(
            r#""path": {}, "cmdline": {}, "entry": "{}""#,
            json_str(&self.kernel.display().to_string()),
            json_str(&self.cmdline),
            self.entry
        );
        if let Some(i) = &self.initrd {
            kernel.push_str(&format!(
                r#", "initrd": {}"#,
                json_str(&i.display().to_string())
            ));
        }
        format!(
            r#"{{"machine": {{"vcpus": {}, "memory_mib": {}}}, "kernel": {{{kernel}}}, "console": {{"output": "stdout", "input": "none"}}}}"#,
            self.vcpus, self.memory_mib
        )
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "outboard-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a VMM run produced.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit code; `None` if killed.
    pub status: Option<i32>,
    /// The serial console (stdout).
    pub serial: String,
    /// The VMM's own messages.
    pub stderr: String,
    /// Whether the deadline passed and the VMM was killed.
    pub timed_out: bool,
    /// Wall time.
    pub elapsed: Duration,
}

impl RunOutput {
    /// Serial lines containing `needle`.
    pub fn serial_lines_with(&self, needle: &str) -> Vec<&str> {
        self.serial.lines().filter(|l| l.contains(needle)).collect()
    }

    /// A dump for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status={:?} timed_out={} elapsed={:?}\n--- serial ---\n{}\n--- stderr ---\n{}",
            self.status, self.timed_out, self.elapsed, self.serial, self.stderr
        )
    }
}

/// Runs `outboard --config FILE` with `json`, killing it after `deadline`
/// or, if `stop_at` is given, as soon as the serial output contains it.
pub fn run_config(json: &str, deadline: Duration, stop_at: Option<&str>) -> RunOutput {
    let dir = TempDir::new("vm");
    let cfg = dir.0.join("vm.json");
    std::fs::write(&cfg, json).unwrap_or_else(|e| panic!("write {}: {e}", cfg.display()));
    run_args(
        &[std::ffi::OsStr::new("--config"), cfg.as_os_str()],
        deadline,
        stop_at,
    )
}

/// Runs the VMM with `args`; see [`run_config`].
pub fn run_args(args: &[&std::ffi::OsStr], deadline: Duration, stop_at: Option<&str>) -> RunOutput {
    let start = Instant::now();
    let mut child = Command::new(outboard_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start outboard: {e}"));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out_thread = std::thread::spawn(move || {
        let mut all = Vec::new();
        if let Some(mut s) = stdout {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        let mut seen = String::new();
        while let Ok(s) = rx.try_recv() {
            seen = s;
        }
        let hit = stop_at.is_some_and(|m| seen.contains(m));
        if hit || start.elapsed() > deadline {
            timed_out = !hit;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    RunOutput {
        status,
        serial: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
        timed_out,
        elapsed,
    }
}
