//! Boot benchmark: how long from starting the VMM process to its first
//! `KVM_RUN` and to the test guest's first serial line (1 vCPU, 128 MiB,
//! median of N runs), and the VMM's resident memory not counting guest RAM.
//! QEMU 7.2 (`-M microvm`, the same test guest through its PVH note) is
//! measured in the same run, and the ratios printed.
//!
//! Usage: `cargo build --release --workspace --bins && target/release/boot_bench [RUNS]`

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outboard_tests::{outboard_bin, test_guest, TempDir, VmSpec};

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// One run: ns from spawn to the first serial line, and, when the VMM
/// reports it, to the first KVM_RUN; the RSS sample (KiB) taken while the
/// guest idles.
struct Sample {
    first_line_ns: u64,
    first_run_ns: Option<u64>,
    rss_kib: Option<u64>,
}

fn rss_without_guest_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    // Guest RAM is a memfd in both VMMs, so it shows as RssShmem.
    Some(field("RssAnon:")? + field("RssFile:")?)
}

fn measure(mut cmd: Command, want_rss: bool) -> Sample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = monotonic_ns();
    let mut child: Child = cmd.spawn().expect("spawn VMM");
    let stderr = child.stderr.take().expect("stderr");
    let err_thread = std::thread::spawn(move || {
        let mut first_run = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(v) = line.split("first-kvm-run monotonic_ns=").nth(1) {
                first_run = v.trim().parse::<u64>().ok();
            }
        }
        first_run
    });
    // A VMM that never prints must not hang the benchmark: kill it after
    // 30 s. The flag is set (under the lock) before the child is reaped, so
    // the watchdog can never signal a recycled pid.
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::Mutex::new(false));
    let done_w = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        if let Ok(d) = done_w.lock() {
            if !*d {
                // SAFETY: kill only sends a signal to our unreaped child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    });
    let finish = |child: &mut Child| {
        if let Ok(mut d) = done.lock() {
            *d = true;
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut first_line_ns = None;
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        if line.contains("outboard-tg:") {
            first_line_ns = Some(monotonic_ns() - t0);
            break;
        }
        line.clear();
    }
    let Some(first_line_ns) = first_line_ns else {
        finish(&mut child);
        eprintln!("boot_bench: the guest printed no line; is the test guest built and KVM usable?");
        std::process::exit(1);
    };
    let rss_kib = if want_rss {
        std::thread::sleep(Duration::from_millis(200));
        rss_without_guest_kib(child.id())
    } else {
        None
    };
    finish(&mut child);
    let first_run_ns = err_thread.join().ok().flatten().map(|t| t - t0);
    Sample {
        first_line_ns,
        first_run_ns,
        rss_kib,
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

fn outboard_cmd(config: &Path) -> Command {
    let mut c = Command::new(outboard_bin());
    c.arg("--config")
        .arg(config)
        .env("OUTBOARD_BOOT_TRACE", "1");
    c
}

fn qemu_cmd(guest: &Path, scenario: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,acpi=off,memory-backend=ram",
        "-object",
        "memory-backend-memfd,id=ram,size=128M",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "128M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
        "-kernel",
    ])
    .arg(guest)
    .args(["-append", scenario]);
    c
}

struct Row {
    name: &'static str,
    first_run: Option<u64>,
    first_line: u64,
    rss_kib: Option<u64>,
}

fn bench(name: &'static str, runs: usize, make: &dyn Fn(&str) -> Command) -> Row {
    let samples: Vec<Sample> = (0..runs)
        .map(|_| measure(make("tg.scenario=hello"), false))
        .collect();
    let rss = measure(make("tg.scenario=hang"), true).rss_kib;
    let first_runs: Vec<u64> = samples.iter().filter_map(|s| s.first_run_ns).collect();
    Row {
        name,
        first_run: (!first_runs.is_empty()).then(|| median(first_runs)),
        first_line: median(samples.iter().map(|s| s.first_line_ns).collect()),
        rss_kib: rss,
    }
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let guest = test_guest();
    let dir = TempDir::new("bench");
    let config_for = |entry: &'static str, cmdline: &str| {
        let mut spec = VmSpec::test_guest(1, 128, cmdline);
        spec.entry = entry;
        let path = dir
            .0
            .join(format!("{entry}-{}.json", cmdline.replace(['=', '.'], "_")));
        std::fs::write(&path, spec.to_json()).expect("write config");
        path
    };

    println!("boot benchmark: test guest, 1 vCPU, 128 MiB, median of {runs} runs");
    let mut rows = vec![
        bench("outboard (linux 64-bit entry)", runs, &|s| {
            outboard_cmd(&config_for("linux", s))
        }),
        bench("outboard (pvh entry)", runs, &|s| {
            outboard_cmd(&config_for("pvh", s))
        }),
    ];
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if qemu_ok {
        rows.push(bench("qemu 7.2 microvm (pvh)", runs, &|s| {
            qemu_cmd(&guest, s)
        }));
    } else {
        println!(
            "qemu-system-x86_64 not found: install Debian's qemu-system-x86 to measure the peer"
        );
    }

    println!(
        "{:<32} {:>16} {:>18} {:>22}",
        "vmm", "to first KVM_RUN", "to first serial line", "RSS less guest RAM"
    );
    for r in &rows {
        println!(
            "{:<32} {:>16} {:>18} {:>22}",
            r.name,
            r.first_run.map_or("n/a".into(), ms),
            ms(r.first_line),
            r.rss_kib
                .map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
    }
    if let (Some(ours), Some(qemu)) = (
        rows.first(),
        rows.iter().find(|r| r.name.starts_with("qemu")),
    ) {
        println!(
            "ratio qemu/outboard, first serial line: {:.1}x",
            qemu.first_line as f64 / ours.first_line.max(1) as f64
        );
        if let (Some(a), Some(b)) = (ours.rss_kib, qemu.rss_kib) {
            println!(
                "ratio qemu/outboard, RSS less guest RAM: {:.1}x",
                b as f64 / a.max(1) as f64
            );
        }
    }
}
