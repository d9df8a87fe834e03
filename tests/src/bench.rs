//! Plumbing the block benchmarks (`blk_bench`, `vfio_bench`) share: the
//! image of stamped pseudo-random data, backend processes with their logs,
//! the block picker and the latency figures.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors are reported as one line and end the benchmark.
pub type Result<T> = std::result::Result<T, String>;

/// Size of the benchmark image.
pub const IMAGE_BYTES: u64 = 256 << 20;
/// Request size.
pub const BLOCK: u64 = 4096;
/// How long a backend may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// xorshift64*: cheap, deterministic, good enough to pick blocks.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A random [`BLOCK`] of the image.
    pub fn block(&mut self) -> u64 {
        self.next_u64() % (IMAGE_BYTES / BLOCK)
    }
}

/// The image's content: the 8 bytes at byte `offset` are `stamp(offset)`
/// (splitmix64's finalizer). Reads check the first word of each block;
/// writes store the stamp there, so the image stays checkable.
pub fn stamp(offset: u64) -> u64 {
    let mut z = offset.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A backend process, killed (by pid) when dropped if still running.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `cmd` as `name`, its stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let log_file =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(
                log_file
                    .try_clone()
                    .map_err(|e| format!("cannot dup {}: {e}", log.display()))?,
            )
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Process {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        if tail.is_empty() {
            format!("(its log {} is empty)", self.log.display())
        } else {
            format!("its log ({}):\n  {tail}", self.log.display())
        }
    }

    /// Kills the process (by pid) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Connects to `socket` once the process listens there.
    pub fn connect(&mut self, socket: &Path) -> Result<UnixStream> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before accepting a connection; {}",
                    self.name,
                    self.log_tail()
                ));
            }
            match UnixStream::connect(socket) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{} did not listen on {} within {LISTEN_TIMEOUT:?} ({e}); {}",
                        self.name,
                        socket.display(),
                        self.log_tail()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // outboard-blk exits by itself once the connection closes; give it
        // a moment, then stop whatever is still running.
        for _ in 0..25 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The image file (`/var/tmp/outboard-<tag>-<pid>.img`, [`IMAGE_BYTES`]
/// of [`stamp`]s), removed when dropped.
pub struct Image(pub PathBuf);

impl Image {
    /// Writes the image.
    pub fn create(tag: &str) -> Result<Self> {
        let path = PathBuf::from(format!(
            "/var/tmp/outboard-{tag}-{}.img",
            std::process::id()
        ));
        let image = Image(path);
        let mut f = File::create(&image.0)
            .map_err(|e| format!("cannot create {}: {e}", image.0.display()))?;
        let mut chunk = vec![0u8; 1 << 20];
        for c in 0..IMAGE_BYTES / chunk.len() as u64 {
            let base = c * chunk.len() as u64;
            for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&stamp(base + 8 * i as u64).to_le_bytes());
            }
            f.write_all(&chunk)
                .map_err(|e| format!("cannot write {}: {e}", image.0.display()))?;
        }
        f.sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", image.0.display()))?;
        Ok(image)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A scratch directory for sockets and logs (`<tmp>/<name>-<pid>`),
/// removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates the directory.
    pub fn create(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One measured case.
pub struct Figures {
    /// Operations per second.
    pub iops: f64,
    /// Mean latency.
    pub mean_us: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
}

impl Figures {
    /// The figures of `lat` (latencies in ns) completed in `elapsed`.
    pub fn from_run(mut lat: Vec<u64>, elapsed: Duration) -> Self {
        lat.sort_unstable();
        let n = lat.len();
        let pct = |p: usize| lat.get((n * p / 100).min(n.saturating_sub(1))).copied();
        let us = |ns: Option<u64>| ns.map_or(0.0, |v| v as f64 / 1e3);
        Figures {
            iops: n as f64 / elapsed.as_secs_f64().max(1e-9),
            mean_us: if n == 0 {
                0.0
            } else {
                lat.iter().sum::<u64>() as f64 / n as f64 / 1e3
            },
            p50_us: us(pct(50)),
            p99_us: us(pct(99)),
        }
    }
}

/// `outboard-blk`: `OUTBOARD_BLK_BIN`, else next to this executable (or
/// its parent directory, where cargo puts binaries for test executables).
pub fn outboard_blk_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("OUTBOARD_BLK_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dirs = [exe.parent(), exe.parent().and_then(Path::parent)];
    dirs.iter()
        .flatten()
        .map(|d| d.join("outboard-blk"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "outboard-blk not found next to {}: build it with `cargo build --release -p outboard-blk` (or set OUTBOARD_BLK_BIN)",
                exe.display()
            )
        })
}
