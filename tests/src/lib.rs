//! Harness for Outboard's end-to-end tests and benchmarks: finds (building
//! through the cache when needed) the `outboard` binary and the guest
//! images, writes VM configs, runs the VMM with a deadline, and knows what
//! kind of KVM the host has.
//!
//! Environment overrides: `OUTBOARD_BIN` (the VMM binary),
//! `OUTBOARD_TEST_GUEST` (the test guest ELF), `OUTBOARD_LINUX_DIR` (a
//! directory with `vmlinux`, `bzImage` and `initramfs.cpio`).

pub mod bench;
pub mod vfio_driver;

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

/// A program cargo built next to the `outboard` binary (the device
/// processes: `outboard-blk`).
pub fn sibling_bin(name: &str) -> PathBuf {
    let p = outboard_bin().with_file_name(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (tests/run does)",
        p.display()
    );
    p
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
    /// Entries of the config's `devices` array, as JSON objects.
    pub devices: Vec<String>,
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
            devices: Vec::new(),
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
            r#"{{"machine": {{"vcpus": {}, "memory_mib": {}}}, "kernel": {{{kernel}}}, "console": {{"output": "stdout", "input": "none"}}, "devices": [{}]}}"#,
            self.vcpus,
            self.memory_mib,
            self.devices.join(", ")
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
    run_args_with_hook(args, deadline, stop_at, None, false)
}

/// Like [`run_config`], with the VMM logging at info level
/// (`OUTBOARD_LOG=info`): device set-up and interrupt routing on stderr.
pub fn run_config_verbose(json: &str, deadline: Duration, stop_at: Option<&str>) -> RunOutput {
    let dir = TempDir::new("vm");
    let cfg = dir.0.join("vm.json");
    std::fs::write(&cfg, json).unwrap_or_else(|e| panic!("write {}: {e}", cfg.display()));
    let args = [std::ffi::OsStr::new("--config"), cfg.as_os_str()];
    run_args_with_hook(&args, deadline, stop_at, None, true)
}

/// Something to do once, mid-run: when the serial output first contains
/// `marker`, `action` is called with the VMM's pid.
pub struct Hook<'a> {
    /// What to wait for on the serial console.
    pub marker: &'a str,
    /// What to do then.
    pub action: Box<dyn FnOnce(u32) + 'a>,
}

/// Like [`run_config`], with a [`Hook`].
pub fn run_config_with_hook(
    json: &str,
    deadline: Duration,
    stop_at: Option<&str>,
    hook: Hook<'_>,
) -> RunOutput {
    let dir = TempDir::new("vm");
    let cfg = dir.0.join("vm.json");
    std::fs::write(&cfg, json).unwrap_or_else(|e| panic!("write {}: {e}", cfg.display()));
    run_args_with_hook(
        &[std::ffi::OsStr::new("--config"), cfg.as_os_str()],
        deadline,
        stop_at,
        Some(hook),
        false,
    )
}

fn run_args_with_hook(
    args: &[&std::ffi::OsStr],
    deadline: Duration,
    stop_at: Option<&str>,
    mut hook: Option<Hook<'_>>,
    verbose: bool,
) -> RunOutput {
    let start = Instant::now();
    let mut cmd = Command::new(outboard_bin());
    if verbose {
        cmd.env("OUTBOARD_LOG", "info");
    }
    let mut child = cmd
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
    let mut seen = String::new();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        while let Ok(s) = rx.try_recv() {
            seen = s;
        }
        if hook.as_ref().is_some_and(|h| seen.contains(h.marker)) {
            if let Some(h) = hook.take() {
                (h.action)(child.id());
            }
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

/// The pids of `pid`'s child processes.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// Word `i` of sector `s` in the test guest's `blk` pattern (see
/// `resources/test-guest/README.md`).
pub fn blk_pattern_word(sector: u64, i: u64, seed: u64) -> u64 {
    (sector << 32) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed
}

/// The first sector of `image` (among the first `sectors`) that does not
/// hold the `blk` pattern for `seed`, or `None` when all do.
pub fn blk_pattern_mismatch(image: &Path, seed: u64, sectors: u64) -> Option<u64> {
    let data = std::fs::read(image).unwrap_or_else(|e| panic!("read {}: {e}", image.display()));
    (0..sectors).find(|&s| {
        let Some(sector) = usize::try_from(s * 512)
            .ok()
            .and_then(|o| data.get(o..o + 512))
        else {
            return true;
        };
        sector
            .chunks_exact(8)
            .enumerate()
            .any(|(i, w)| w != blk_pattern_word(s, i as u64, seed).to_le_bytes())
    })
}

/// Creates a zero-filled raw image of `bytes`.
pub fn raw_image(path: &Path, bytes: u64) {
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(bytes)
        .unwrap_or_else(|e| panic!("size {}: {e}", path.display()));
}

/// A config `devices` entry that has the VMM spawn `outboard-blk` on
/// `image`, with `args` after the image.
pub fn spawned_blk_device(id: &str, image: &Path, args: &[&str]) -> String {
    let mut all = vec![json_str("--image"), json_str(&image.display().to_string())];
    all.extend(args.iter().map(|a| json_str(a)));
    format!(
        r#"{{"id": "{id}", "kind": "vhost-user-blk", "transport": "mmio", "spawn": {{"args": [{}]}}}}"#,
        all.join(", ")
    )
}

/// A config `devices` entry that connects to a running vhost-user-blk
/// backend.
pub fn socket_blk_device(id: &str, socket: &Path) -> String {
    format!(
        r#"{{"id": "{id}", "kind": "vhost-user-blk", "socket": {}}}"#,
        json_str(&socket.display().to_string())
    )
}

/// A `qemu-storage-daemon` exporting an image as vhost-user-blk on a unix
/// socket; killed on drop.
pub struct StorageDaemon {
    child: std::process::Child,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl StorageDaemon {
    /// Starts it and waits for its socket.
    pub fn start(image: &Path, socket: &Path, queues: u16, writable: bool) -> Self {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},cache.direct=off",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={},num-queues={queues}",
                socket.display(),
                if writable { "on" } else { "off" }
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start qemu-storage-daemon ({e}): install Debian's qemu-system-common (.ci/run does)")
            });
        let mut d = StorageDaemon {
            child,
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("qemu-storage-daemon exited with {st} before listening");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-storage-daemon did not create {} in 10 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two network namespaces joined by a veth pair: two "hosts" for
/// migration tests (`10.<n>.0.1` in `a`, `10.<n>.0.2` in `b`). Removed on
/// drop.
pub struct HostPair {
    /// Namespace of host A.
    pub a: String,
    /// Namespace of host B.
    pub b: String,
    /// Host A's address.
    pub a_ip: String,
    /// Host B's address.
    pub b_ip: String,
}

impl HostPair {
    /// Creates the pair; fails with a clear message if `ip` or network
    /// namespaces are not available (the tests need root).
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = format!("outboard-a-{pid}-{n}");
        let b = format!("outboard-b-{pid}-{n}");
        // Interface names: at most 15 bytes.
        let (va, vb) = (
            format!("oa{}_{n}", pid % 100_000),
            format!("ob{}_{n}", pid % 100_000),
        );
        let octet = 20 + (pid.wrapping_mul(7).wrapping_add(n)) % 200;
        let pair = HostPair {
            a_ip: format!("10.{octet}.0.1"),
            b_ip: format!("10.{octet}.0.2"),
            a,
            b,
        };
        let ip = |args: &[&str]| {
            let st = Command::new("ip")
                .args(args)
                .status()
                .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2; .ci/run installs it): {e}"));
            assert!(
                st.success(),
                "`ip {}` failed ({st}): migration tests need root and network namespaces",
                args.join(" ")
            );
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &pair.a]);
        ip(&["link", "set", &vb, "netns", &pair.b]);
        ip(&[
            "-n",
            &pair.a,
            "addr",
            "add",
            &format!("{}/24", pair.a_ip),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            &format!("{}/24", pair.b_ip),
            "dev",
            &vb,
        ]);
        for (ns, dev) in [(&pair.a, &va), (&pair.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Cuts the link (the veth pair goes down on A's side).
    pub fn cut(&self) {
        let _ = Command::new("ip")
            .args(["-n", &self.a, "link", "set", "down", "dev"])
            .arg(self.a_dev())
            .status();
    }

    fn a_dev(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.a, "-o", "link", "show", "type", "veth"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split(':')
            .nth(1)
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .unwrap_or_default()
    }
}

impl Default for HostPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A VMM process started in the background (optionally in a network
/// namespace), its serial output and stderr collected; killed on drop.
pub struct Vmm {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    err: std::sync::Arc<std::sync::Mutex<String>>,
    _dir: TempDir,
}

impl Vmm {
    /// Starts `outboard --config <json> <extra>` in namespace `netns`.
    pub fn start(netns: Option<&str>, json: &str, extra: &[&str]) -> Self {
        Self::start_with_env(netns, json, extra, &[])
    }

    /// Like [`Vmm::start`], with extra environment variables.
    pub fn start_with_env(
        netns: Option<&str>,
        json: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = TempDir::new("vmm");
        let cfg = dir.0.join("vm.json");
        std::fs::write(&cfg, json).unwrap_or_else(|e| panic!("write {}: {e}", cfg.display()));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(outboard_bin());
                c
            }
            None => Command::new(outboard_bin()),
        };
        cmd.envs(env.iter().copied());
        cmd.arg("--config")
            .arg(&cfg)
            .args(extra)
            .env("OUTBOARD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start outboard: {e}"));
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for (pipe, sink) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                out.clone(),
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                err.clone(),
            ),
        ] {
            if let Some(mut p) = pipe {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = p.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Ok(mut s) = sink.lock() {
                            s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                });
            }
        }
        Vmm {
            child,
            out,
            err,
            _dir: dir,
        }
    }

    /// The serial output so far.
    pub fn serial(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The VMM's stderr so far.
    pub fn stderr(&self) -> String {
        self.err.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until the serial output or stderr contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.serial().contains(needle) || self.stderr().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for the process to end; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the readers drain.
                std::thread::sleep(Duration::from_millis(100));
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        for c in child_pids(self.child.id()) {
            // SAFETY: kill only sends a signal to our grandchild.
            unsafe { libc::kill(c as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The pid (of `ip netns exec`, which execs the VMM).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A dump for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- stderr ---\n{}",
            self.serial(),
            self.stderr()
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `outboard api --socket SOCKET <args>` (in `netns` if given);
/// returns (exit code, stdout + stderr).
pub fn api(netns: Option<&str>, socket: &Path, args: &[&str]) -> (i32, String) {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(outboard_bin());
            c
        }
        None => Command::new(outboard_bin()),
    };
    let out = cmd
        .arg("api")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run outboard api: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The `seq=` numbers of the test guest's `counter` lines, in order.
pub fn counter_seqs(serial: &str) -> Vec<u64> {
    serial
        .lines()
        .filter(|l| l.contains("outboard-tg: counter seq="))
        .filter_map(|l| {
            l.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}
