//! Migration benchmark: live migration of the test guest (1 vCPU, `counter`
//! scenario) between two "hosts", two network namespaces joined by a veth
//! pair ([`HostPair`]), over TCP, for each guest size (256 MiB, 1 GiB and
//! 4 GiB by default) and two workloads:
//!
//! - `idle`: a 1 MiB counter region, no page rewritten
//!   (`tg.counter_region_mib=1 tg.counter_dirty_pages=0`);
//! - `dirty`: a 64 MiB region, 512 pages (2 MiB) rewritten per 100 ms
//!   period, i.e. about 20 MiB/s (`tg.counter_region_mib=64
//!   tg.counter_dirty_pages=512`).
//!
//! Columns (times in ms, sizes in MiB):
//!
//! - `total`, `down`, `sent`, `rounds`: what the source VMM reports
//!   (Outboard: the `outboard api migrate` JSON, downtime from pausing the
//!   vCPUs to the destination's confirmation; QEMU: `query-migrate`);
//! - `wall`: the migrate command timed from outside (Outboard: the
//!   `outboard api migrate` process; QEMU: from the QMP `migrate` command
//!   to `query-migrate` saying `completed`, polled every 10 ms);
//! - `d.evt`: pause on A to resume on B timed from outside, on what the
//!   VMMs announce: Outboard's stderr lines `migration: stop-and-copy`
//!   (printed just before pausing) on A and `guest received ...; running`
//!   on B, polled every 2 ms; QEMU's QMP `STOP` event on A and `RESUME`
//!   event on B (QEMU's own timestamps);
//! - `lost`: guest time lost across the switch, from the guest's serial
//!   lines (`counter seq=N ... ticks=T`, one per 100 timer ticks, polled
//!   every 2 ms on both hosts): host time between the source's last line
//!   and the destination's first, less the guest ticks between them
//!   converted to host time at the rate measured on the source before the
//!   migration. The guest's "1 ms" LAPIC tick does not keep real time
//!   everywhere (missed ticks are not caught up: under nested KVM, or when
//!   the vCPU waits for a CPU), so that rate is printed too; a rough
//!   cross-check of `d.evt` from the guest's side, inflated whenever the
//!   migration takes CPU time from the vCPU;
//! - `src RSS`: the source VMM's highest RSS during the migration; `dst
//!   RSS`: the destination's once the guest runs there.
//!
//! Every case also checks that the counter sequence goes on from A to B
//! without a gap or a repeat and that the guest reports no failure.
//! `--verbose` prints Outboard's per-round progress, QEMU's final
//! `query-migrate`, and the serial lines around the switch.
//!
//! Then the same with QEMU 7.2 (`qemu-system-x86_64 -M microvm,acpi=off`,
//! the same test guest through its PVH note, the same command line, the
//! same namespaces), driven through QMP: `downtime-limit` set to the same
//! target, every other migration parameter left at QEMU's default (notably
//! `max-bandwidth`, 128 MiB/s in QEMU 7.2; `--qemu-max-bandwidth-mib`
//! changes it). Its rounds column is `dirty-sync-count`, its bytes
//! `ram.transferred`. Should microvm fail to migrate, the error is printed
//! and `-M pc` is tried. Ratios qemu/outboard are printed per case.
//!
//! Cases run one after the other, both VMs of a case stopped before the
//! next starts: a 4 GiB case needs 8 GiB of host memory (both VMMs hold
//! the guest).
//!
//! Usage (as root: network namespaces):
//! `cargo build --release --workspace --bins && target/release/migration_bench [--sizes 256,1024,4096] [--skip-qemu]`

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use outboard_tests::{api, test_guest, HostPair, TempDir, VmSpec, Vmm};

/// Errors are one line.
type Result<T> = std::result::Result<T, String>;

/// Guest time per `counter` line.
const PERIOD_MS: u64 = 100;
/// Counter lines the guest prints on the source before the migration.
const WARM_LINES: usize = 6;
/// Counter lines awaited on the destination after the migration.
const AFTER_LINES: usize = 3;
/// How often the serial consoles are polled.
const POLL: Duration = Duration::from_millis(2);
/// Bound on waiting for a guest to start or go on.
const GUEST_WAIT: Duration = Duration::from_secs(60);
/// Bound on one migration.
const MIGRATION_TIMEOUT_S: u64 = 600;

#[derive(Parser)]
#[command(about = "Live migration benchmark: Outboard and QEMU 7.2 across a veth pair")]
struct Args {
    /// Guest sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    sizes: Vec<u64>,
    /// Measure Outboard only.
    #[arg(long)]
    skip_qemu: bool,
    /// Downtime target of both VMMs, ms.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// QEMU's `max-bandwidth` in MiB/s (default: QEMU's own, 128 MiB/s).
    #[arg(long)]
    qemu_max_bandwidth_mib: Option<u64>,
    /// Print Outboard's per-round progress lines.
    #[arg(long)]
    verbose: bool,
}

/// A guest workload.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    region_mib: u64,
    dirty_pages: u64,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "idle",
        region_mib: 1,
        dirty_pages: 0,
    },
    Workload {
        name: "dirty",
        region_mib: 64,
        dirty_pages: 512,
    },
];

impl Workload {
    fn cmdline(&self) -> String {
        format!(
            "tg.scenario=counter tg.cpus=1 tg.counter_ms={PERIOD_MS} tg.counter_region_mib={} tg.counter_dirty_pages={} tg.counter_stop=0",
            self.region_mib, self.dirty_pages
        )
    }
}

/// What one migration measured.
struct Outcome {
    /// The source's figure.
    total_ms: u64,
    /// The source's figure.
    downtime_ms: u64,
    bytes: u64,
    rounds: u64,
    /// From outside: the migrate command.
    wall_ms: u64,
    /// From outside: the source's pause to the destination's resume, as
    /// the VMMs announce them (Outboard's stderr lines, QEMU's QMP STOP
    /// and RESUME events).
    event_downtime_ms: Option<f64>,
    /// From outside: guest time lost across the switch (the serial lines).
    lost_ms: f64,
    /// Guest ticks per host ms on the source before the migration.
    tick_rate: Option<f64>,
    /// The source VMM's highest RSS during the migration.
    src_rss_mib: Option<u64>,
    /// The destination VMM's RSS once the guest runs there.
    dest_rss_mib: Option<u64>,
    /// Progress lines (Outboard) or the final query-migrate (QEMU).
    detail: Vec<String>,
}

/// One `counter seq=` line and when it was seen.
struct Line {
    seq: u64,
    ticks: u64,
    at: Instant,
}

/// The counter lines of one serial console, as they arrive.
#[derive(Default)]
struct LineLog {
    parsed: usize,
    lines: Vec<Line>,
    failure: Option<String>,
}

impl LineLog {
    /// Takes in the complete lines of `text` not seen yet.
    fn update(&mut self, text: &str) {
        let Some(end) = text.rfind('\n') else {
            return;
        };
        if end < self.parsed {
            return;
        }
        let now = Instant::now();
        for l in text[self.parsed..end].lines() {
            if l.contains("FAIL") && self.failure.is_none() {
                self.failure = Some(l.trim().to_string());
            }
            if let Some(rest) = l.split("outboard-tg: counter seq=").nth(1) {
                let seq = rest.split_whitespace().next().and_then(|s| s.parse().ok());
                let ticks = rest
                    .split("ticks=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok());
                if let (Some(seq), Some(ticks)) = (seq, ticks) {
                    self.lines.push(Line {
                        seq,
                        ticks,
                        at: now,
                    });
                }
            }
        }
        self.parsed = end + 1;
    }
}

/// Checks the sequence across the two hosts; the time the guest did not
/// run between its last line on the source and its first on the
/// destination, in ms: host time less guest time, the guest's ticks
/// converted at `rate` (guest ticks per host ms, measured before).
fn continuity(a: &LineLog, b: &LineLog, rate: Option<f64>) -> Result<f64> {
    if let Some(f) = a.failure.as_ref().or(b.failure.as_ref()) {
        return Err(format!("the guest reported a failure: {f}"));
    }
    let (Some(last_a), Some(first_b)) = (a.lines.last(), b.lines.first()) else {
        return Err(format!(
            "missing counter lines: {} on the source, {} on the destination",
            a.lines.len(),
            b.lines.len()
        ));
    };
    let seqs: Vec<u64> = a.lines.iter().chain(&b.lines).map(|l| l.seq).collect();
    if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
        return Err(format!(
            "counter sequence breaks: {} then {} (source ended at {}, destination began at {})",
            w[0], w[1], last_a.seq, first_b.seq
        ));
    }
    let host_ms = first_b.at.duration_since(last_a.at).as_secs_f64() * 1e3;
    let guest_ms = first_b.ticks.saturating_sub(last_a.ticks) as f64 / rate.unwrap_or(1.0);
    Ok((host_ms - guest_ms).max(0.0))
}

/// The last non-empty line of `s`, for error messages.
fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(nothing)")
        .trim()
}

/// The number after `"key":` in JSON text (first occurrence).
fn json_u64(text: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\"");
    let at = text.find(&pat)? + pat.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The string after `"key":` in JSON text (first occurrence, no escapes).
fn json_str_field(text: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let at = text.find(&pat)? + pat.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

/// VmRSS of `pid` in MiB.
fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

fn mem_available_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// What [`follow`] saw.
struct Followed {
    /// When the migration started.
    start: Instant,
    /// The source's counter lines.
    a: LineLog,
    /// The destination's.
    b: LineLog,
    /// When each marker first showed up.
    marks: Vec<Option<Instant>>,
    /// RSS of the source when the migration started, MiB.
    src_rss_before_mib: Option<u64>,
    /// Highest RSS of the source seen, MiB.
    src_rss_peak_mib: Option<u64>,
}

impl Followed {
    /// ms from the migration's start to `t` (negative before).
    fn rel(&self, t: Instant) -> f64 {
        if t >= self.start {
            t.duration_since(self.start).as_secs_f64() * 1e3
        } else {
            -(self.start.duration_since(t).as_secs_f64() * 1e3)
        }
    }

    /// The counter lines around the switch, with their host times.
    fn describe_switch(&self) -> String {
        let n = self.a.lines.len();
        let a = self.a.lines[n.saturating_sub(3)..]
            .iter()
            .map(|l| format!("A seq={} ticks={} t={:.0}", l.seq, l.ticks, self.rel(l.at)));
        let b = self
            .b
            .lines
            .iter()
            .take(2)
            .map(|l| format!("B seq={} ticks={} t={:.0}", l.seq, l.ticks, self.rel(l.at)));
        let rss = format!(
            "source RSS {} MiB before",
            self.src_rss_before_mib
                .map_or("-".into(), |m| m.to_string())
        );
        a.chain(b).chain([rss]).collect::<Vec<_>>().join(", ")
    }

    /// Guest timer ticks per host ms on the source before the migration
    /// (the guest's "1 ms" LAPIC tick need not keep real time: missed
    /// ticks are not caught up, e.g. under nested KVM or CPU contention).
    fn tick_rate(&self) -> Option<f64> {
        // The lines followed without a break while the source warmed up;
        // the first may have been printed before polling began.
        let before: Vec<&Line> = self
            .a
            .lines
            .iter()
            .take(WARM_LINES)
            .skip(1)
            .filter(|l| l.at < self.start)
            .collect();
        let (first, last) = (before.first()?, before.last()?);
        let host = last.at.duration_since(first.at).as_secs_f64() * 1e3;
        let guest = last.ticks.saturating_sub(first.ticks) as f64;
        if host < 100.0 || guest < 1.0 {
            return None;
        }
        Some(guest / host)
    }
}

/// Follows both serial consoles (and `markers`: text sources and what to
/// look for in them) while `drive` runs on another thread, then until the
/// destination printed [`AFTER_LINES`] lines (or the migration failed).
fn follow<T: Send>(
    warm: LineLog,
    source: &dyn Fn() -> String,
    dest: &dyn Fn() -> String,
    markers: &[(&dyn Fn() -> String, &str)],
    src_pid: u32,
    drive: impl FnOnce() -> T + Send,
) -> (T, Followed) {
    let mut f = Followed {
        start: Instant::now(),
        a: warm,
        b: LineLog::default(),
        marks: vec![None; markers.len()],
        src_rss_before_mib: rss_mib(src_pid),
        src_rss_peak_mib: None,
    };
    std::thread::scope(|s| {
        f.start = Instant::now();
        let h = s.spawn(drive);
        let mut finished_at: Option<Instant> = None;
        let mut polls = 0u64;
        loop {
            f.a.update(&source());
            f.b.update(&dest());
            for (m, (text, needle)) in f.marks.iter_mut().zip(markers) {
                if m.is_none() && text().contains(needle) {
                    *m = Some(Instant::now());
                }
            }
            if polls % 25 == 0 {
                if let Some(r) = rss_mib(src_pid) {
                    f.src_rss_peak_mib = Some(f.src_rss_peak_mib.unwrap_or(0).max(r));
                }
            }
            polls += 1;
            if finished_at.is_none() && h.is_finished() {
                finished_at = Some(Instant::now());
            }
            if let Some(t) = finished_at {
                // A guest that runs on B prints within 100 ms of guest
                // time; after a failed migration nothing comes.
                if f.b.lines.len() >= AFTER_LINES
                    || t.elapsed() > GUEST_WAIT
                    || (f.b.lines.is_empty() && t.elapsed() > Duration::from_secs(5))
                {
                    break;
                }
            }
            std::thread::sleep(POLL);
        }
        let r = match h.join() {
            Ok(r) => r,
            Err(_) => std::process::exit(1),
        };
        (r, f)
    })
}

/// Follows `text()` until it holds `n` counter lines; the log, or `None`
/// after [`GUEST_WAIT`].
fn wait_lines(text: &dyn Fn() -> String, n: usize) -> Option<LineLog> {
    let start = Instant::now();
    let mut log = LineLog::default();
    while start.elapsed() < GUEST_WAIT {
        log.update(&text());
        if log.lines.len() >= n {
            return Some(log);
        }
        std::thread::sleep(POLL);
    }
    None
}

// ---------------------------------------------------------------- Outboard

fn run_outboard(
    hosts: &HostPair,
    size_mib: u64,
    w: Workload,
    port: u16,
    args: &Args,
) -> Result<Outcome> {
    let dir = TempDir::new("migbench");
    let sock_a = dir.0.join("a.sock");
    let sock_a_str = sock_a.display().to_string();
    let cfg = VmSpec::test_guest(1, size_mib, &w.cmdline()).to_json();
    let mut a = Vmm::start(Some(&hosts.a), &cfg, &["--api-socket", &sock_a_str]);
    let Some(mut warm) = wait_lines(&|| a.serial(), WARM_LINES) else {
        return Err(format!(
            "the source guest did not print {WARM_LINES} counter lines in {GUEST_WAIT:?}; source: {}",
            last_line(&a.stderr())
        ));
    };
    let to = format!("tcp:{}:{port}", hosts.b_ip);
    let mut b = Vmm::start(Some(&hosts.b), &cfg, &["--incoming", &to]);
    let t = Instant::now();
    while !b.stderr().contains("waiting for the incoming guest") {
        if t.elapsed() > GUEST_WAIT || !b.running() {
            return Err(format!(
                "the destination did not start listening; destination: {}",
                last_line(&b.stderr())
            ));
        }
        warm.update(&a.serial());
        std::thread::sleep(POLL);
    }
    let downtime = args.downtime_ms.to_string();
    let timeout = MIGRATION_TIMEOUT_S.to_string();
    let a_err = || a.stderr();
    let b_err = || b.stderr();
    let ((code, text, wall), f) = follow(
        warm,
        &|| a.serial(),
        &|| b.serial(),
        &[(&a_err, "stop-and-copy"), (&b_err, "guest received")],
        a.pid(),
        || {
            let t0 = Instant::now();
            let (code, text) = api(
                Some(&hosts.a),
                &sock_a,
                &[
                    "migrate",
                    &to,
                    "--downtime-ms",
                    &downtime,
                    "--timeout-s",
                    &timeout,
                ],
            );
            (code, text, t0.elapsed())
        },
    );
    if code != 0 {
        return Err(format!(
            "outboard api migrate exited {code}: {}; source: {}; destination: {}",
            last_line(&text),
            last_line(&a.stderr()),
            last_line(&b.stderr())
        ));
    }
    let field = |k: &str| {
        json_u64(&text, k).ok_or_else(|| format!("the migrate report has no {k}: {text}"))
    };
    let (total_ms, downtime_ms, bytes, rounds) = (
        field("total_ms")?,
        field("downtime_ms")?,
        field("bytes_sent")?,
        field("rounds")?,
    );
    match a.wait_exit(Duration::from_secs(30)) {
        Some(0) => {}
        other => {
            return Err(format!(
                "the source VMM did not exit 0 after migrating ({other:?}): {}",
                last_line(&a.stderr())
            ))
        }
    }
    let lost_ms = continuity(&f.a, &f.b, f.tick_rate())
        .map_err(|e| format!("{e}; destination: {}", last_line(&b.stderr())))?;
    let dest_rss_mib = rss_mib(b.pid());
    b.kill();
    let event_downtime_ms = match (f.marks[0], f.marks[1]) {
        (Some(p), Some(r)) => Some(r.saturating_duration_since(p).as_secs_f64() * 1e3),
        _ => None,
    };
    let mut detail: Vec<String> = a
        .stderr()
        .lines()
        .filter(|l| l.contains("migration: round") || l.contains("stop-and-copy"))
        .map(str::to_string)
        .chain(
            b.stderr()
                .lines()
                .filter(|l| l.contains("guest received"))
                .map(str::to_string),
        )
        .collect();
    detail.push(format!(
        "stop-and-copy seen t={}, destination running t={}; {}",
        f.marks[0].map_or("-".into(), |t| format!("{:.0}", f.rel(t))),
        f.marks[1].map_or("-".into(), |t| format!("{:.0}", f.rel(t))),
        f.describe_switch()
    ));
    Ok(Outcome {
        total_ms,
        downtime_ms,
        bytes,
        rounds,
        wall_ms: wall.as_millis() as u64,
        event_downtime_ms,
        lost_ms,
        tick_rate: f.tick_rate(),
        src_rss_mib: f.src_rss_peak_mib,
        dest_rss_mib,
        detail,
    })
}

// -------------------------------------------------------------------- QEMU

/// A QEMU process in a namespace, killed on drop.
struct Qemu {
    child: Child,
    serial: PathBuf,
    qmp: PathBuf,
    log: PathBuf,
}

impl Qemu {
    #[allow(clippy::too_many_arguments)]
    fn start(
        netns: &str,
        machine: &str,
        size_mib: u64,
        guest: &Path,
        cmdline: &str,
        dir: &Path,
        tag: &str,
        incoming: Option<&str>,
    ) -> Result<Self> {
        let serial = dir.join(format!("{tag}.serial"));
        let qmp = dir.join(format!("{tag}.qmp"));
        let log = dir.join(format!("{tag}.log"));
        let log_file = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| format!("cannot dup {}: {e}", log.display()))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "qemu-system-x86_64", "-M", machine])
            .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
            .arg("-m")
            .arg(format!("{size_mib}M"))
            .args(["-nodefaults", "-no-user-config", "-nographic", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(guest)
            .args(["-append", cmdline, "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
        Ok(Qemu {
            child,
            serial,
            qmp,
            log,
        })
    }

    fn serial(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_line(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        last_line(&log).to_string()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Connects to its QMP socket and leaves the negotiation mode.
    fn qmp(&mut self) -> Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            if !self.alive() {
                return Err(format!("qemu exited: {}", self.log_line()));
            }
            match UnixStream::connect(&self.qmp) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    return Err(format!("cannot connect to QMP {}: {e}", self.qmp.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen: name and QEMU's timestamp (wall clock, seconds).
    events: Vec<(String, f64)>,
}

impl Qmp {
    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Sends a command; its `return` line, events skipped.
    fn execute(&mut self, command: &str) -> Result<String> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let line = self.read_line()?;
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                let desc = json_str_field(&line, "desc").unwrap_or(line.clone());
                return Err(format!("QMP {command}: {desc}"));
            }
            if let Some(name) = json_str_field(&line, "event") {
                let ts = json_u64(&line, "seconds").unwrap_or(0) as f64
                    + json_u64(&line, "microseconds").unwrap_or(0) as f64 / 1e6;
                self.events.push((name, ts));
            }
        }
    }
}

fn run_qemu(
    hosts: &HostPair,
    machine: &str,
    size_mib: u64,
    w: Workload,
    port: u16,
    args: &Args,
) -> Result<Outcome> {
    let dir = TempDir::new("migbench-qemu");
    let guest = test_guest();
    let cmdline = w.cmdline();
    let mut a = Qemu::start(
        &hosts.a, machine, size_mib, &guest, &cmdline, &dir.0, "a", None,
    )?;
    let mut qa = a.qmp()?;
    let Some(mut warm) = wait_lines(&|| a.serial(), WARM_LINES) else {
        return Err(format!(
            "the source guest did not print {WARM_LINES} counter lines; serial: {}; qemu: {}",
            last_line(&a.serial()),
            a.log_line()
        ));
    };
    let uri = format!("tcp:{}:{port}", hosts.b_ip);
    let mut b = Qemu::start(
        &hosts.b,
        machine,
        size_mib,
        &guest,
        &cmdline,
        &dir.0,
        "b",
        Some(&uri),
    )?;
    let mut qb = b.qmp()?;
    let st = qb.execute(r#"{"execute":"query-status"}"#)?;
    if json_str_field(&st, "status").as_deref() != Some("inmigrate") {
        return Err(format!(
            "the destination is not waiting for a migration: {st}"
        ));
    }
    let mut params = format!("\"downtime-limit\":{}", args.downtime_ms);
    if let Some(bw) = args.qemu_max_bandwidth_mib {
        params.push_str(&format!(",\"max-bandwidth\":{}", bw << 20));
    }
    qa.execute(&format!(
        r#"{{"execute":"migrate-set-parameters","arguments":{{{params}}}}}"#
    ))?;
    warm.update(&a.serial());
    let src_pid = a.child.id();
    let (result, f) = follow(
        warm,
        &|| a.serial(),
        &|| b.serial(),
        &[],
        src_pid,
        || -> Result<(String, Duration)> {
            let t0 = Instant::now();
            qa.execute(&format!(
                r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#
            ))?;
            loop {
                let r = qa.execute(r#"{"execute":"query-migrate"}"#)?;
                match json_str_field(&r, "status").as_deref() {
                    Some("completed") => return Ok((r, t0.elapsed())),
                    Some("failed") | Some("cancelled") => {
                        let why = json_str_field(&r, "error-desc").unwrap_or(r.clone());
                        return Err(format!("qemu migration failed: {why}"));
                    }
                    _ => {}
                }
                if t0.elapsed() > Duration::from_secs(MIGRATION_TIMEOUT_S) {
                    return Err(format!(
                        "qemu migration not done in {MIGRATION_TIMEOUT_S} s: {r}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        },
    );
    let (report, wall) = result.map_err(|e| format!("{e}; destination qemu: {}", b.log_line()))?;
    let field =
        |k: &str| json_u64(&report, k).ok_or_else(|| format!("query-migrate has no {k}: {report}"));
    let lost_ms = continuity(&f.a, &f.b, f.tick_rate())
        .map_err(|e| format!("{e}; destination qemu: {}", b.log_line()))?;
    let dest_rss_mib = rss_mib(b.child.id());
    // Collects the destination's RESUME event.
    let _ = qb.execute(r#"{"execute":"query-status"}"#);
    let stop = qa.events.iter().find(|e| e.0 == "STOP").map(|e| e.1);
    let resume = qb.events.iter().find(|e| e.0 == "RESUME").map(|e| e.1);
    let event_downtime_ms = match (stop, resume) {
        (Some(s), Some(r)) => Some((r - s) * 1e3),
        _ => None,
    };
    let _ = qb.execute(r#"{"execute":"quit"}"#);
    Ok(Outcome {
        total_ms: field("total-time")?,
        downtime_ms: field("downtime")?,
        bytes: field("transferred")?,
        rounds: field("dirty-sync-count")?,
        wall_ms: wall.as_millis() as u64,
        event_downtime_ms,
        lost_ms,
        tick_rate: f.tick_rate(),
        src_rss_mib: f.src_rss_peak_mib,
        dest_rss_mib,
        detail: vec![report, f.describe_switch()],
    })
}

// -------------------------------------------------------------------- main

struct Row {
    size_mib: u64,
    workload: &'static str,
    vmm: String,
    result: Result<Outcome>,
}

fn precheck(args: &Args) -> Result<Option<String>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("run as root: the benchmark creates network namespaces".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm is missing".into());
    }
    let bin = match std::env::var("OUTBOARD_BIN") {
        Ok(p) => Some(PathBuf::from(p)),
        Err(_) => {
            let exe = std::env::current_exe().unwrap_or_default();
            let found = [exe.parent(), exe.parent().and_then(Path::parent)]
                .into_iter()
                .flatten()
                .map(|d| d.join("outboard"))
                .find(|p| p.is_file());
            found
        }
    };
    if !bin.is_some_and(|b| b.is_file()) {
        return Err("the outboard binary is not next to this program: run `cargo build --release --workspace --bins` (or set OUTBOARD_BIN)".into());
    }
    if !Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Err("`ip` (iproute2) is not available".into());
    }
    if args.sizes.is_empty() || args.sizes.iter().any(|&s| s < 128) {
        return Err("--sizes: sizes in MiB, each at least 128".into());
    }
    if args.skip_qemu {
        return Ok(None);
    }
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("qemu-system-x86_64 not found ({e}): install Debian's qemu-system-x86, or pass --skip-qemu")
        })?;
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("qemu")
            .to_string(),
    ))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn run(args: &Args) -> Result<bool> {
    let qemu_version = precheck(args)?;
    let guest = test_guest();
    let hosts = HostPair::new();
    println!(
        "migration benchmark: test guest {}, 1 vCPU, tcp over veth {} -> {}, downtime target {} ms",
        guest.display(),
        hosts.a_ip,
        hosts.b_ip,
        args.downtime_ms
    );
    for w in WORKLOADS {
        println!("  {:<5} {}", w.name, w.cmdline());
    }
    if let Some(v) = &qemu_version {
        println!(
            "  peer: {v}; QMP downtime-limit {} ms, max-bandwidth {}",
            args.downtime_ms,
            args.qemu_max_bandwidth_mib
                .map_or("QEMU default (128 MiB/s)".into(), |b| format!("{b} MiB/s"))
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut machine = "microvm,acpi=off".to_string();
    let mut port: u16 = 7400;
    for &size in &args.sizes {
        let need = size * 2 + 512;
        if mem_available_mib().is_some_and(|m| m < need) {
            let why = format!(
                "needs about {need} MiB of free memory (two VMs), MemAvailable is {} MiB",
                mem_available_mib().unwrap_or(0)
            );
            for w in WORKLOADS {
                rows.push(Row {
                    size_mib: size,
                    workload: w.name,
                    vmm: "outboard".into(),
                    result: Err(why.clone()),
                });
            }
            continue;
        }
        for w in WORKLOADS {
            port += 1;
            eprintln!("migration_bench: {size} MiB {}: outboard", w.name);
            let result = run_outboard(&hosts, size, w, port, args);
            if let Ok(o) = &result {
                if args.verbose {
                    for l in &o.detail {
                        println!("    {l}");
                    }
                }
            }
            rows.push(Row {
                size_mib: size,
                workload: w.name,
                vmm: "outboard".into(),
                result,
            });
            if qemu_version.is_none() {
                continue;
            }
            port += 1;
            eprintln!("migration_bench: {size} MiB {}: qemu -M {machine}", w.name);
            let mut result = run_qemu(&hosts, &machine, size, w, port, args);
            if let Err(e) = &result {
                if machine.starts_with("microvm") {
                    println!("QEMU -M {machine} cannot migrate this guest: {e}");
                    println!("falling back to -M pc");
                    machine = "pc".into();
                    port += 1;
                    result = run_qemu(&hosts, &machine, size, w, port, args);
                }
            }
            if let Ok(o) = &result {
                if args.verbose {
                    for l in &o.detail {
                        println!("    {l}");
                    }
                }
            }
            rows.push(Row {
                size_mib: size,
                workload: w.name,
                vmm: format!("q-{}", machine.split(',').next().unwrap_or("")),
                result,
            });
        }
    }

    println!();
    println!(
        "{:>5} {:<5} {:<9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>7} {:>6} {:>7} {:>7}",
        "MiB",
        "load",
        "vmm",
        "total",
        "wall",
        "down",
        "d.evt",
        "lost",
        "sent",
        "rounds",
        "src RSS",
        "dst RSS"
    );
    let mut ok = true;
    let mib = |m: Option<u64>| m.map_or("-".into(), |m| m.to_string());
    for r in &rows {
        match &r.result {
            Ok(o) => println!(
                "{:>5} {:<5} {:<9} {:>6} {:>6} {:>5} {:>5} {:>5.0} {:>7.1} {:>6} {:>7} {:>7}",
                r.size_mib,
                r.workload,
                r.vmm,
                o.total_ms,
                o.wall_ms,
                o.downtime_ms,
                fmt_opt(o.event_downtime_ms),
                o.lost_ms,
                o.bytes as f64 / (1u64 << 20) as f64,
                o.rounds,
                mib(o.src_rss_mib),
                mib(o.dest_rss_mib),
            ),
            Err(e) => {
                ok = false;
                println!(
                    "{:>5} {:<5} {:<9} FAILED: {e}",
                    r.size_mib, r.workload, r.vmm
                );
            }
        }
    }
    println!(
        "q-microvm: QEMU -M microvm. times in ms: total, down = the source VMM's report; wall = the migrate command from outside; \
         d.evt = pause->resume from the VMMs' announcements, timed here; lost = guest time lost \
         across the switch (serial lines: host time less guest ticks at the rate measured before). \
         sent in MiB; RSS in MiB."
    );
    let rates: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.result.as_ref().ok()?.tick_rate)
        .collect();
    if !rates.is_empty() {
        println!(
            "guest timer ticks per host ms before migrating: {:.2}..{:.2} (1.00 = real time)",
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max)
        );
    }
    if qemu_version.is_some() {
        println!();
        println!("ratios qemu/outboard (q/o: both figures where one is under 1 ms):");
        for ours in rows.iter().filter(|r| r.vmm == "outboard") {
            let Some(peer) = rows.iter().find(|r| {
                r.vmm.starts_with("q-")
                    && r.size_mib == ours.size_mib
                    && r.workload == ours.workload
            }) else {
                continue;
            };
            let (Ok(o), Ok(q)) = (&ours.result, &peer.result) else {
                continue;
            };
            // Below the 1 ms resolution of the reports a ratio means
            // nothing: both figures instead.
            let ratio = |q: f64, o: f64| {
                if o >= 1.0 && q >= 1.0 {
                    format!("{:.2}x", q / o)
                } else {
                    format!("{q:.0}/{o:.0}")
                }
            };
            println!(
                "{:>5} {:<5}  total {}  down {}  d.evt {}  lost {}  sent {}",
                ours.size_mib,
                ours.workload,
                ratio(q.total_ms as f64, o.total_ms as f64),
                ratio(q.downtime_ms as f64, o.downtime_ms as f64),
                ratio(
                    q.event_downtime_ms.unwrap_or(0.0),
                    o.event_downtime_ms.unwrap_or(0.0)
                ),
                ratio(q.lost_ms, o.lost_ms),
                ratio(q.bytes as f64, o.bytes as f64),
            );
        }
    }
    Ok(ok)
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("migration_bench: some cases failed (see the table)");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("migration_bench: {e}");
            std::process::exit(1);
        }
    }
}
