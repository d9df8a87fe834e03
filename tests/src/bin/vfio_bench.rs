//! vfio-user benchmark, in two parts, each compared with a baseline in the
//! same run:
//!
//! 1. Message round trip: `REGION_READ` and `REGION_WRITE` of 4 bytes (the
//!    common configuration's `device_feature_select`) against
//!    `outboard-blk --vfio-user`, against a bare unix-socket round trip (a
//!    thread echoing 16 + 4 bytes over a `UnixStream` pair): ops/s and
//!    mean / p50 / p99 latency, ratio printed.
//! 2. Block I/O: 4 KiB random read and random write at queue depth 1 and
//!    32 against the same `outboard-blk` binary on the same image, once as
//!    a virtio-pci function over vfio-user and once as a vhost-user-blk
//!    backend: IOPS and latency, ratio vfio-user / vhost-user printed.
//!
//! No guest is involved: this program is the VMM and the guest driver.
//! Both transports run the same guest driver code
//! ([`outboard_tests::vfio_driver::BlkQueue`], one memfd as guest RAM, a
//! split ring of 3-descriptor chains, no EVENT_IDX, FLUSH negotiated but
//! no flushes sent), so the figures differ by the transport only: over
//! vfio-user the function is brought up through `REGION_WRITE`s, queue 0
//! is kicked through the ioeventfd `GET_REGION_IO_FDS` gave and completes
//! on the MSI-X vector's eventfd; over vhost-user through the VMM's
//! vhost-user frontend, its kick and call eventfds. The data path is the
//! same in both: no message per request. Latency runs from publishing a
//! request to reaping it, the driver's kick and wake-up included. Cases
//! alternate between transports, each after a 0.5 s warm-up; the image
//! (256 MiB of pseudo-random data under /var/tmp) is read through the
//! host page cache unless `--direct`.
//!
//! Usage:
//! `cargo build --release --workspace --bins && target/release/vfio_bench [--seconds N] [--direct]`
//!
//! `outboard-blk` is looked up next to this binary (or `OUTBOARD_BLK_BIN`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use outboard_tests::bench::{
    outboard_blk_bin, stamp, Figures, Image, Process, Result, Rng, Scratch, BLOCK, IMAGE_BYTES,
};
use outboard_tests::vfio_driver::{
    BlkQueue, Done, GuestRam, Kind, Tag, VfioBlk, AVAIL_RING, DESC_TABLE, MIN_RAM, QUEUE_SIZE,
    SLOTS, USED_RING, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_F_VERSION_1, WAIT_TIMEOUT,
};
use outboard_transport::vhost_user::{DeviceShape, SharedMemoryRegion, VhostUserDevice};
use outboard_transport::{QueueConfig, VirtioDevice};
use outboard_vfio_user::wire::PCI_BAR0_REGION_INDEX;

/// Queue depths measured.
const DEPTHS: [usize; 2] = [1, 32];
const _: () = assert!(DEPTHS[1] <= SLOTS);
/// Warm-up before each measured case.
const WARMUP: Duration = Duration::from_millis(500);
/// Bytes the bare socket round trip echoes: a vfio-user header and a
/// 4-byte register.
const ECHO_BYTES: usize = 16 + 4;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_CONFIG_SIZE: u32 = 60;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;

#[derive(Parser)]
#[command(about = "vfio-user round trips and 4 KiB random I/O, vfio-user vs vhost-user")]
struct Args {
    /// Seconds measured per case (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Open the image with O_DIRECT.
    #[arg(long)]
    direct: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "randread",
            Op::Write => "randwrite",
        }
    }
}

/// A transport under the shared guest driver: how to reach its queue,
/// kick it and wait for its interrupt.
trait Transport {
    fn label(&self) -> &'static str;
    fn publish(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Tag>;
    fn kick(&mut self) -> Result<()>;
    fn wait_any(&mut self) -> Result<Vec<Done>>;
}

/// `outboard-blk --vfio-user`, brought up by [`VfioBlk`].
struct Vfio {
    // Field order is drop order: disconnect, then reap the process.
    dev: VfioBlk,
    process: Process,
}

impl Transport for Vfio {
    fn label(&self) -> &'static str {
        "vfio-user"
    }
    fn publish(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Tag> {
        self.dev
            .publish(kind, sector, buf)
            .map_err(|e| e.to_string())
    }
    fn kick(&mut self) -> Result<()> {
        self.dev.kick().map_err(|e| e.to_string())
    }
    fn wait_any(&mut self) -> Result<Vec<Done>> {
        self.dev
            .wait_any()
            .map_err(|e| format!("vfio-user: {e}; {}", self.process.log_tail()))
    }
}

/// `outboard-blk` as a vhost-user-blk backend, set up through the VMM's
/// vhost-user frontend.
struct Vhost {
    queue: BlkQueue,
    dev: VhostUserDevice,
    process: Process,
}

impl Transport for Vhost {
    fn label(&self) -> &'static str {
        "vhost-user"
    }
    fn publish(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Tag> {
        self.queue
            .publish(kind, sector, buf)
            .map_err(|e| e.to_string())
    }
    fn kick(&mut self) -> Result<()> {
        if !self.queue.needs_kick() {
            return Ok(());
        }
        self.dev.kick_fds()[0]
            .write(1)
            .map_err(|e| format!("vhost-user: kick: {e}"))
    }
    fn wait_any(&mut self) -> Result<Vec<Done>> {
        let call = self.dev.call_fds()[0].as_raw_fd();
        // SAFETY: the call eventfd lives in `self.dev`, which outlives
        // this borrow.
        let call = unsafe { BorrowedFd::borrow_raw(call) };
        let done = self
            .queue
            .wait_any(call, WAIT_TIMEOUT)
            .map_err(|e| format!("vhost-user: {e}"))?;
        if done.is_empty() {
            return Err(format!(
                "vhost-user: no completion within {WAIT_TIMEOUT:?}; {}",
                self.process.log_tail()
            ));
        }
        Ok(done)
    }
}

fn spawn_blk(
    bin: &Path,
    image: &Path,
    scratch: &Path,
    name: &str,
    args: &[&str],
    direct: bool,
) -> Result<(Process, UnixStream)> {
    let socket = scratch.join(format!("{name}.sock"));
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .arg("--image")
        .arg(image)
        .args(["--queues", "1", "--queue-size"])
        .arg(QUEUE_SIZE.to_string())
        .arg("--socket")
        .arg(&socket);
    if direct {
        cmd.arg("--direct");
    }
    let mut process = Process::spawn(name, cmd, scratch.join(format!("{name}.log")))?;
    let stream = process.connect(&socket)?;
    Ok((process, stream))
}

fn start_vfio(bin: &Path, image: &Path, scratch: &Path, direct: bool) -> Result<Vfio> {
    let (process, stream) = spawn_blk(bin, image, scratch, "vfio-user", &["--vfio-user"], direct)?;
    let ram = Rc::new(GuestRam::new(MIN_RAM).map_err(|e| format!("guest RAM: {e}"))?);
    let setup = |stream| -> std::result::Result<(VfioBlk, u64), String> {
        let mut dev = VfioBlk::connect(stream, ram).map_err(|e| e.to_string())?;
        let sectors = dev.bring_up().map_err(|e| e.to_string())?;
        Ok((dev, sectors))
    };
    let (dev, sectors) =
        setup(stream).map_err(|e| format!("vfio-user: {e}; {}", process.log_tail()))?;
    if sectors != IMAGE_BYTES / 512 {
        return Err(format!("vfio-user: capacity {sectors} sectors"));
    }
    Ok(Vfio { dev, process })
}

fn start_vhost(bin: &Path, image: &Path, scratch: &Path, direct: bool) -> Result<Vhost> {
    let (process, stream) = spawn_blk(bin, image, scratch, "vhost-user", &[], direct)?;
    let ram = Rc::new(GuestRam::new(MIN_RAM).map_err(|e| format!("guest RAM: {e}"))?);
    let region = SharedMemoryRegion {
        guest_addr: 0,
        size: ram.size(),
        host_addr: ram.host_addr(),
        fd: ram.fd().as_raw_fd(),
        fd_offset: 0,
    };
    let shape = DeviceShape {
        device_type: VIRTIO_ID_BLOCK,
        config_size: VIRTIO_BLK_CONFIG_SIZE,
        queue_size: QUEUE_SIZE,
    };
    let mut dev = VhostUserDevice::connect("vhost-user", stream, shape, vec![region])
        .map_err(|e| format!("vhost-user: {e}; {}", process.log_tail()))?;
    let offered = dev.device_features();
    if offered & VIRTIO_BLK_F_RO != 0 {
        return Err("vhost-user: the device is read-only".into());
    }
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    if u64::from_le_bytes(capacity) != IMAGE_BYTES / 512 {
        return Err(format!(
            "vhost-user: capacity {} sectors",
            u64::from_le_bytes(capacity)
        ));
    }
    // The same features as the vfio-user driver negotiates.
    let features = VIRTIO_F_VERSION_1 | offered & VIRTIO_BLK_F_FLUSH;
    let queue = BlkQueue::new(ram);
    let config = QueueConfig {
        size: QUEUE_SIZE,
        ready: true,
        desc_table: DESC_TABLE,
        avail_ring: AVAIL_RING,
        used_ring: USED_RING,
    };
    dev.activate(features, &[config])
        .map_err(|e| format!("vhost-user: {e}; {}", process.log_tail()))?;
    Ok(Vhost {
        queue,
        dev,
        process,
    })
}

/// Runs `op` at depth `qd` for `duration`: the latencies in ns and the
/// time from the first submission to the last completion.
fn run_io(
    t: &mut dyn Transport,
    op: Op,
    qd: usize,
    duration: Duration,
    rng: &mut Rng,
) -> Result<(Vec<u64>, Duration)> {
    let kind = match op {
        Op::Read => Kind::Read,
        Op::Write => Kind::Write,
    };
    let mut buf = vec![0u8; BLOCK as usize];
    // Per slot: when it was published and which block it targets.
    let mut submitted = vec![None::<(Instant, u64)>; SLOTS];
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut publish = |t: &mut dyn Transport, submitted: &mut [Option<(Instant, u64)>]| {
        let block = rng.block();
        // A write keeps the image checkable; a read must overwrite this.
        let first = match op {
            Op::Read => 0,
            Op::Write => stamp(block * BLOCK),
        };
        buf[..8].copy_from_slice(&first.to_le_bytes());
        let at = Instant::now();
        let tag = t.publish(kind, block * (BLOCK / 512), &buf)?;
        submitted[tag.slot()] = Some((at, block));
        Ok::<(), String>(())
    };
    let t0 = Instant::now();
    let deadline = t0 + duration;
    for _ in 0..qd {
        publish(t, &mut submitted)?;
    }
    t.kick()?;
    let mut in_flight = qd;
    let mut last = t0;
    while in_flight > 0 {
        let done = t.wait_any()?;
        let now = Instant::now();
        last = now;
        // Every completion first: the driver frees a slot as it reaps it,
        // so a request published now may take the slot of one in `done`.
        let n = done.len();
        for d in done {
            let Some((start, block)) = submitted.get_mut(d.tag.slot()).and_then(Option::take)
            else {
                return Err(format!(
                    "{}: completion of a request not in flight",
                    t.label()
                ));
            };
            if d.status != VIRTIO_BLK_S_OK {
                return Err(format!(
                    "{}: {} failed with status {}",
                    t.label(),
                    op.name(),
                    d.status
                ));
            }
            if op == Op::Read && d.data.get(..8) != Some(&stamp(block * BLOCK).to_le_bytes()[..]) {
                return Err(format!("{}: block {block} read back wrong", t.label()));
            }
            latencies.push(u64::try_from((now - start).as_nanos()).unwrap_or(u64::MAX));
        }
        in_flight -= n;
        if now < deadline {
            for _ in 0..n {
                publish(t, &mut submitted)?;
            }
            in_flight += n;
            t.kick()?;
        }
    }
    Ok((latencies, last - t0))
}

/// Runs `op` until `duration` passes: its latencies in ns and the time
/// taken.
fn run_rt(duration: Duration, mut op: impl FnMut() -> Result<()>) -> Result<(Vec<u64>, Duration)> {
    let mut lat = Vec::with_capacity(1 << 20);
    let t0 = Instant::now();
    let deadline = t0 + duration;
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        op()?;
        lat.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok((lat, t0.elapsed()))
}

/// A thread echoing [`ECHO_BYTES`]-byte messages until its peer closes.
fn echo_pair() -> Result<(UnixStream, std::thread::JoinHandle<()>)> {
    let (mut ours, mut theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let thread = std::thread::spawn(move || {
        let mut m = [0u8; ECHO_BYTES];
        while theirs.read_exact(&mut m).is_ok() && theirs.write_all(&m).is_ok() {}
    });
    // Leave a first exchange out of the figures (the thread's start).
    let mut m = [0u8; ECHO_BYTES];
    ours.write_all(&m)
        .and_then(|()| ours.read_exact(&mut m))
        .map_err(|e| format!("echo: {e}"))?;
    Ok((ours, thread))
}

fn print_row(case: &str, label: &str, f: &Figures) {
    println!(
        "{case:<17} {label:<13} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
        f.iops, f.mean_us, f.p50_us, f.p99_us
    );
    let _ = std::io::stdout().flush();
}

fn round_trips(vfio: &mut Vfio, duration: Duration) -> Result<()> {
    let (mut echo, thread) = echo_pair()?;
    let mut m = [0u8; ECHO_BYTES];
    let mut cases: Vec<(&str, Figures)> = Vec::new();
    let bare = run_rt(WARMUP, || echo_once(&mut echo, &mut m))
        .and_then(|_| run_rt(duration, || echo_once(&mut echo, &mut m)))?;
    cases.push(("unix-echo", Figures::from_run(bare.0, bare.1)));
    drop(echo);
    let _ = thread.join();
    let client = vfio.dev.client();
    let mut reg = [0u8; 4];
    let mut read = || {
        client
            .region_read(PCI_BAR0_REGION_INDEX, 0, &mut reg)
            .map_err(|e| format!("REGION_READ: {e}"))
    };
    run_rt(WARMUP, &mut read)?;
    let r = run_rt(duration, &mut read)?;
    cases.push(("region_read", Figures::from_run(r.0, r.1)));
    let client = vfio.dev.client();
    let mut write = || {
        client
            .region_write(PCI_BAR0_REGION_INDEX, 0, &[0; 4])
            .map_err(|e| format!("REGION_WRITE: {e}"))
    };
    run_rt(WARMUP, &mut write)?;
    let w = run_rt(duration, &mut write)?;
    cases.push(("region_write", Figures::from_run(w.0, w.1)));
    for (label, f) in &cases {
        print_row("round trip 4 B", label, f);
    }
    if let [(_, bare), rest @ ..] = cases.as_slice() {
        for (label, f) in rest {
            println!(
                "  ratio {label}/unix-echo: ops/s x{:.2}, mean x{:.2}, p99 x{:.2}",
                f.iops / bare.iops,
                f.mean_us / bare.mean_us,
                f.p99_us / bare.p99_us
            );
        }
    }
    Ok(())
}

fn echo_once(s: &mut UnixStream, m: &mut [u8; ECHO_BYTES]) -> Result<()> {
    s.write_all(m)
        .and_then(|()| s.read_exact(m))
        .map_err(|e| format!("echo: {e}"))
}

fn run(args: &Args) -> Result<()> {
    let duration = Duration::try_from_secs_f64(args.seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--seconds must be a positive number, not {}", args.seconds))?;
    let bin = outboard_blk_bin()?;
    let scratch = Scratch::create("vfio_bench")?;
    let image = Image::create("vfio-bench")?;
    let mode = if args.direct {
        "O_DIRECT"
    } else {
        "buffered I/O"
    };
    println!(
        "vfio_bench: {}, image {}, {} MiB, {mode}, {} s per case (+{} s warm-up), 1 queue of {QUEUE_SIZE}, no EVENT_IDX",
        bin.display(),
        image.0.display(),
        IMAGE_BYTES >> 20,
        duration.as_secs_f64(),
        WARMUP.as_secs_f64()
    );
    let mut vfio = start_vfio(&bin, &image.0, &scratch.0, args.direct)?;
    let mut vhost = start_vhost(&bin, &image.0, &scratch.0, args.direct)?;

    println!(
        "{:<17} {:<13} {:>10} {:>9} {:>9} {:>9}",
        "case", "transport", "ops/s", "mean_us", "p50_us", "p99_us"
    );
    round_trips(&mut vfio, duration)?;

    let mut rng = Rng(0x5eed_1234_abcd_0002);
    for op in [Op::Read, Op::Write] {
        for qd in DEPTHS {
            let case = format!("{:<9} qd{qd}", op.name());
            let mut figures = Vec::new();
            for t in [&mut vfio as &mut dyn Transport, &mut vhost] {
                run_io(t, op, qd, WARMUP, &mut rng)?;
                let (lat, elapsed) = run_io(t, op, qd, duration, &mut rng)?;
                let f = Figures::from_run(lat, elapsed);
                print_row(&case, t.label(), &f);
                figures.push(f);
            }
            if let [v, h] = figures.as_slice() {
                println!(
                    "  ratio vfio-user/vhost-user: {case} IOPS x{:.2}, mean x{:.2}, p99 x{:.2}",
                    v.iops / h.iops,
                    v.mean_us / h.mean_us,
                    v.p99_us / h.p99_us
                );
            }
        }
    }
    vhost.dev.reset();
    drop(vhost);
    drop(vfio);
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("vfio_bench: {e}");
        std::process::exit(1);
    }
}
