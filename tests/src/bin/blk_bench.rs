//! Block benchmark: 4 KiB random read and random write IOPS and latency
//! (mean, p50, p99) at queue depth 1 and 32, against Outboard's block
//! process `outboard-blk` and against `qemu-storage-daemon` (QEMU 7.2)
//! exporting the same image, in the same run, with the ratio
//! outboard/qsd printed per case.
//!
//! No guest is involved: this program is both the VMM and the guest
//! driver. It sets each backend up through the VMM's own vhost-user
//! frontend ([`VhostUserDevice`]) with one memfd as "guest RAM", lays a
//! split virtqueue out in it, and drives virtio-blk requests (header,
//! one 4 KiB buffer, status byte) the way a guest driver would: publish on
//! the avail ring, kick the kick eventfd unless the backend set
//! `VRING_USED_F_NO_NOTIFY`, sleep in `poll` on the call eventfd, reap the
//! used ring. Latency is from publishing a request to reaping it, so it
//! includes the harness's own kick and wake-up, as a guest's would.
//! EVENT_IDX is not negotiated: a completion always signals the call fd.
//! FLUSH is negotiated when offered (a write-back cache, as Linux guests
//! ask for) but no flushes are sent, like fio without `--fsync`.
//!
//! The image is a 256 MiB file of pseudo-random data under /var/tmp,
//! removed at the end. Both backends use buffered I/O by default (so reads
//! mostly hit the host page cache and the figures compare the backends'
//! own overhead); `--direct` runs both with O_DIRECT. Cases alternate
//! between backends, each after a short warm-up.
//!
//! Usage:
//! `cargo build --release --workspace --bins && target/release/blk_bench [--seconds N] [--direct]`
//!
//! `outboard-blk` is looked up next to this binary (or `OUTBOARD_BLK_BIN`),
//! `qemu-storage-daemon` in /usr/bin and `PATH` (or `QSD_BIN`).

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use outboard_tests::bench::{
    outboard_blk_bin, stamp, Figures, Image, Process, Result, Rng, Scratch, BLOCK, IMAGE_BYTES,
};
use outboard_transport::vhost_user::{DeviceShape, SharedMemoryRegion, VhostUserDevice};
use outboard_transport::{QueueConfig, VirtioDevice};

/// The fake guest's RAM.
const MEM_BYTES: usize = 64 << 20;
/// Queue depths measured.
const DEPTHS: [usize; 2] = [1, 32];
/// Warm-up before each measured case.
const WARMUP: Duration = Duration::from_millis(500);
/// How long to wait for one completion before declaring the backend stuck.
const COMPLETION_TIMEOUT_MS: i32 = 10_000;

// Guest-physical layout of the fake guest RAM (virtio 1.x split ring: the
// descriptor table 16-aligned, the avail ring 2-aligned, the used ring
// 4-aligned; every area here starts on a page).
//
//   0x1000  descriptor table, QUEUE_SIZE x 16 bytes
//   0x2000  avail ring: flags u16, idx u16, ring[QUEUE_SIZE] u16, used_event
//   0x3000  used ring: flags u16, idx u16, ring[QUEUE_SIZE] {id u32, len u32}
//   0x5000  request headers, 16 bytes per slot
//   0x6000  status bytes, 1 per slot
//   0x10000 data buffers, 4 KiB per slot (page-aligned, so O_DIRECT works)
//
// Slot `s` always uses descriptors 3s (header), 3s+1 (data), 3s+2 (status).
const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADERS: u64 = 0x5000;
const STATUS: u64 = 0x6000;
const DATA: u64 = 0x10000;
const MAX_SLOTS: usize = QUEUE_SIZE as usize / 3;
const _: () = assert!(DEPTHS[0] <= MAX_SLOTS && DEPTHS[1] <= MAX_SLOTS);

// Virtio constants (virtio 1.2, 2.7 and 5.2).
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_BLK_CONFIG_SIZE: u32 = 60;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_S_OK: u8 = 0;

#[derive(Parser)]
#[command(about = "4 KiB random I/O against outboard-blk and qemu-storage-daemon over vhost-user")]
struct Args {
    /// Seconds measured per case (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Open the image with O_DIRECT in both backends.
    #[arg(long)]
    direct: bool,
    /// Which backends to run.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    backend: Which,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Both,
    Outboard,
    Qsd,
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

/// The fake guest's RAM: a memfd mapped shared, so the backend sees our
/// writes.
struct GuestMem {
    ptr: *mut u8,
    len: usize,
    file: File,
}

impl GuestMem {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"blk_bench".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64)
            .map_err(|e| format!("sizing the guest memfd: {e}"))?;
        // SAFETY: maps `len` bytes of a file that is `len` bytes long; the
        // result is checked, and the mapping is only used through `self`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of the guest memfd: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(GuestMem {
            ptr: ptr.cast(),
            len,
            file,
        })
    }

    fn region(&self) -> SharedMemoryRegion {
        SharedMemoryRegion {
            guest_addr: 0,
            size: self.len as u64,
            host_addr: self.ptr as u64,
            fd: self.file.as_raw_fd(),
            fd_offset: 0,
        }
    }

    /// Pointer to a `T` at guest address `gpa`. The layout is fixed, so an
    /// out-of-range or misaligned address is a bug here, not a runtime
    /// failure.
    fn at<T>(&self, gpa: u64) -> *mut T {
        let off = usize::try_from(gpa).unwrap_or(usize::MAX);
        assert!(
            off.checked_add(size_of::<T>())
                .is_some_and(|end| end <= self.len),
            "guest address {gpa:#x} outside the fake guest RAM"
        );
        assert!(
            off % align_of::<T>() == 0,
            "guest address {gpa:#x} misaligned"
        );
        // SAFETY: `off` is inside the mapping (checked above).
        unsafe { self.ptr.add(off).cast() }
    }

    /// Writes `v` at `gpa`. Volatile: the backend process reads it.
    fn write<T: Copy>(&self, gpa: u64, v: T) {
        // SAFETY: `at` checked bounds and alignment; the mapping lives as
        // long as `self`.
        unsafe { std::ptr::write_volatile(self.at::<T>(gpa), v) }
    }

    /// Reads a `T` at `gpa`. Volatile: the backend process writes it.
    fn read<T: Copy>(&self, gpa: u64) -> T {
        // SAFETY: as in `write`.
        unsafe { std::ptr::read_volatile(self.at::<T>(gpa)) }
    }

    /// A ring index or flags word, shared with the backend.
    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: `at` checked bounds and alignment (AtomicU16 has the size
        // and alignment of u16); the reference cannot outlive the mapping.
        unsafe { &*self.at::<AtomicU16>(gpa) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing uses it after.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One connected, activated backend and the driver state of its queue.
struct Backend {
    label: String,
    // Field order is drop order: close the connection, unmap, then reap
    // the process.
    dev: VhostUserDevice,
    mem: GuestMem,
    process: Process,
    next_avail: u16,
    last_used: u16,
}

impl Backend {
    fn start(label: String, mut process: Process, socket: &Path) -> Result<Self> {
        let stream = process.connect(socket)?;
        let mem = GuestMem::new(MEM_BYTES)?;
        let shape = DeviceShape {
            device_type: VIRTIO_ID_BLOCK,
            config_size: VIRTIO_BLK_CONFIG_SIZE,
            queue_size: QUEUE_SIZE,
        };
        let mut dev = VhostUserDevice::connect(&label, stream, shape, vec![mem.region()])
            .map_err(|e| format!("{label}: {e}; {}", process.log_tail()))?;
        let offered = dev.device_features();
        if offered & VIRTIO_BLK_F_RO != 0 {
            return Err(format!("{label}: the device is read-only"));
        }
        let mut capacity = [0u8; 8];
        dev.read_config(0, &mut capacity);
        let sectors = u64::from_le_bytes(capacity);
        if sectors != IMAGE_BYTES / 512 {
            return Err(format!(
                "{label}: capacity is {sectors} sectors, expected {}",
                IMAGE_BYTES / 512
            ));
        }
        let features = VIRTIO_F_VERSION_1
            | offered
                & (VIRTIO_BLK_F_SIZE_MAX
                    | VIRTIO_BLK_F_SEG_MAX
                    | VIRTIO_BLK_F_BLK_SIZE
                    | VIRTIO_BLK_F_FLUSH);
        // Fixed descriptor chains: slot s is 3s -> 3s+1 -> 3s+2.
        for slot in 0..MAX_SLOTS as u64 {
            let head = 3 * slot;
            let parts: [(u64, u32, u16); 3] = [
                (HEADERS + 16 * slot, 16, VIRTQ_DESC_F_NEXT),
                (DATA + BLOCK * slot, BLOCK as u32, VIRTQ_DESC_F_NEXT),
                (STATUS + slot, 1, VIRTQ_DESC_F_WRITE),
            ];
            for (i, (addr, len, flags)) in parts.into_iter().enumerate() {
                let d = DESC_TABLE + 16 * (head + i as u64);
                mem.write::<u64>(d, addr);
                mem.write::<u32>(d + 8, len);
                mem.write::<u16>(d + 12, flags);
                mem.write::<u16>(d + 14, (head + i as u64 + 1) as u16);
            }
            // Something other than zeros to write.
            for w in 0..BLOCK / 8 {
                mem.write::<u64>(DATA + BLOCK * slot + 8 * w, slot << 32 | w);
            }
        }
        let queue = QueueConfig {
            size: QUEUE_SIZE,
            ready: true,
            desc_table: DESC_TABLE,
            avail_ring: AVAIL_RING,
            used_ring: USED_RING,
        };
        dev.activate(features, &[queue])
            .map_err(|e| format!("{e}; {}", process.log_tail()))?;
        let offer = dev.offer();
        println!(
            "{label}: features offered {:#x}, negotiated {features:#x}, protocol features {:#x} (using {:#x})",
            offer.features, offer.protocol_features, offer.acked_protocol_features
        );
        Ok(Backend {
            label,
            dev,
            mem,
            process,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Puts request `slot` on the avail ring (without kicking).
    fn push(&mut self, slot: usize, op: Op, block: u64) {
        let s = slot as u64;
        let hdr = HEADERS + 16 * s;
        let (kind, data_flags) = match op {
            Op::Read => (VIRTIO_BLK_T_IN, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE),
            Op::Write => (VIRTIO_BLK_T_OUT, VIRTQ_DESC_F_NEXT),
        };
        self.mem.write::<u32>(hdr, kind);
        self.mem.write::<u32>(hdr + 4, 0);
        self.mem.write::<u64>(hdr + 8, block * (BLOCK / 512));
        self.mem.write::<u8>(STATUS + s, 0xff);
        // A read must overwrite this; a write leaves the image checkable.
        let first_word = match op {
            Op::Read => 0,
            Op::Write => stamp(block * BLOCK),
        };
        self.mem.write::<u64>(DATA + BLOCK * s, first_word);
        let head = 3 * s;
        self.mem
            .write::<u16>(DESC_TABLE + 16 * (head + 1) + 12, data_flags);
        let pos = u64::from(self.next_avail % QUEUE_SIZE);
        self.mem.write::<u16>(AVAIL_RING + 4 + 2 * pos, head as u16);
        self.next_avail = self.next_avail.wrapping_add(1);
        // The entry and the request it points to before the index.
        self.mem
            .atomic_u16(AVAIL_RING + 2)
            .store(self.next_avail, Ordering::Release);
    }

    /// Notifies the backend unless it said it is polling.
    fn kick(&self) -> Result<()> {
        // The avail index store before the flags load (as Linux's
        // virtqueue_kick_prepare does).
        fence(Ordering::SeqCst);
        let flags = self.mem.atomic_u16(USED_RING).load(Ordering::Relaxed);
        if flags & VRING_USED_F_NO_NOTIFY != 0 {
            return Ok(());
        }
        self.dev.kick_fds()[0]
            .write(1)
            .map_err(|e| format!("{}: kick: {e}", self.label))
    }

    /// Waits until the used ring has entries we have not reaped.
    fn wait_used(&mut self) -> Result<()> {
        let call = &self.dev.call_fds()[0];
        loop {
            let used = self.mem.atomic_u16(USED_RING + 2).load(Ordering::Acquire);
            if used != self.last_used {
                return Ok(());
            }
            let mut fds = [
                libc::pollfd {
                    fd: call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.dev.socket_fd(),
                    events: 0,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, COMPLETION_TIMEOUT_MS) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("{}: poll: {e}", self.label));
            }
            if n == 0 {
                return Err(format!(
                    "{}: no completion within {COMPLETION_TIMEOUT_MS} ms; {}",
                    self.label,
                    self.process.log_tail()
                ));
            }
            if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(format!(
                    "{}: the backend hung up; {}",
                    self.label,
                    self.process.log_tail()
                ));
            }
            match call.read() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("{}: reading the call fd: {e}", self.label)),
            }
        }
    }

    /// Takes the next used entry, if any: the head descriptor it returns.
    fn pop_used(&mut self) -> Option<u32> {
        let used = self.mem.atomic_u16(USED_RING + 2).load(Ordering::Acquire);
        if used == self.last_used {
            return None;
        }
        let pos = u64::from(self.last_used % QUEUE_SIZE);
        let id = self.mem.read::<u32>(USED_RING + 4 + 8 * pos);
        self.last_used = self.last_used.wrapping_add(1);
        Some(id)
    }

    /// Runs `op` at depth `qd` for `duration`; the latencies in ns and the
    /// time from the first submission to the last completion.
    fn run(
        &mut self,
        op: Op,
        qd: usize,
        duration: Duration,
        rng: &mut Rng,
    ) -> Result<(Vec<u64>, Duration)> {
        // Per slot: when it was published and which block it targets.
        let mut submitted = vec![None::<(Instant, u64)>; qd];
        let mut latencies = Vec::with_capacity(1 << 20);
        let t0 = Instant::now();
        let deadline = t0 + duration;
        for (slot, at) in submitted.iter_mut().enumerate() {
            let block = rng.block();
            *at = Some((Instant::now(), block));
            self.push(slot, op, block);
        }
        self.kick()?;
        let mut in_flight = qd;
        let mut last = t0;
        while in_flight > 0 {
            self.wait_used()?;
            let now = Instant::now();
            last = now;
            let mut resubmitted = false;
            while let Some(id) = self.pop_used() {
                let index = id as usize;
                let slot = index / 3;
                let start = match submitted.get_mut(slot) {
                    Some(at) if 3 * slot == index => at.take(),
                    _ => None,
                };
                let Some((start, block)) = start else {
                    return Err(format!(
                        "{}: used ring returned descriptor {id}, which is not an in-flight head",
                        self.label
                    ));
                };
                in_flight -= 1;
                let status = self.mem.read::<u8>(STATUS + slot as u64);
                if status != VIRTIO_BLK_S_OK {
                    return Err(format!(
                        "{}: {} request failed with status {status}",
                        self.label,
                        op.name()
                    ));
                }
                if op == Op::Read {
                    let got = self.mem.read::<u64>(DATA + BLOCK * slot as u64);
                    if got != stamp(block * BLOCK) {
                        return Err(format!(
                            "{}: read of block {block} returned wrong data ({got:#x})",
                            self.label
                        ));
                    }
                }
                latencies.push(u64::try_from((now - start).as_nanos()).unwrap_or(u64::MAX));
                if now < deadline {
                    let block = rng.block();
                    submitted[slot] = Some((Instant::now(), block));
                    self.push(slot, op, block);
                    in_flight += 1;
                    resubmitted = true;
                }
            }
            if resubmitted {
                self.kick()?;
            }
        }
        Ok((latencies, last - t0))
    }

    /// Stops the queue cleanly (the process is reaped on drop).
    fn stop(mut self) {
        self.dev.reset();
    }
}

fn qsd_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("QSD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin"))
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("qemu-storage-daemon"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "qemu-storage-daemon not found in /usr/bin or PATH: install it with `apt-get install qemu-system-common` (Debian), or set QSD_BIN".to_string()
        })
}

/// "qsd-7.2" from `qemu-storage-daemon --version`.
fn qsd_label(bin: &Path) -> String {
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v = text.split("version ").nth(1)?.split_whitespace().next()?;
            let mut parts = v.split('.');
            Some(format!("{}.{}", parts.next()?, parts.next()?))
        });
    match version {
        Some(v) => format!("qsd-{v}"),
        None => "qsd".to_string(),
    }
}

/// QEMU option values escape commas by doubling them.
fn qemu_escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn start_outboard(bin: &Path, image: &Path, scratch: &Path, direct: bool) -> Result<Backend> {
    let socket = scratch.join("outboard-blk.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--image")
        .arg(image)
        .args(["--queues", "1", "--queue-size"])
        .arg(QUEUE_SIZE.to_string())
        .arg("--socket")
        .arg(&socket);
    if direct {
        cmd.arg("--direct");
    }
    let process = Process::spawn("outboard-blk", cmd, scratch.join("outboard-blk.log"))?;
    Backend::start("outboard-blk".to_string(), process, &socket)
}

fn start_qsd(bin: &Path, image: &Path, scratch: &Path, direct: bool) -> Result<Backend> {
    let socket = scratch.join("qsd.sock");
    let label = qsd_label(bin);
    let mut cmd = Command::new(bin);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},cache.direct={}",
            qemu_escape(image),
            if direct { "on" } else { "off" }
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            qemu_escape(&socket)
        ));
    let process = Process::spawn(&label, cmd, scratch.join("qsd.log"))?;
    Backend::start(label, process, &socket)
}

fn run(args: &Args) -> Result<()> {
    let duration = Duration::try_from_secs_f64(args.seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--seconds must be a positive number, not {}", args.seconds))?;
    // Find both binaries before spending time on the image.
    let want_outboard = args.backend != Which::Qsd;
    let want_qsd = args.backend != Which::Outboard;
    let outboard = want_outboard.then(outboard_blk_bin).transpose()?;
    let qsd = want_qsd.then(qsd_bin).transpose()?;

    let scratch = Scratch::create("blk_bench")?;
    let image = Image::create("blk-bench")?;
    let mode = if args.direct {
        "O_DIRECT"
    } else {
        "buffered I/O"
    };
    println!(
        "blk_bench: image {}, {} MiB, {mode}, {} s per case (+{} s warm-up), 1 queue of {QUEUE_SIZE}, no EVENT_IDX",
        image.0.display(),
        IMAGE_BYTES >> 20,
        duration.as_secs_f64(),
        WARMUP.as_secs_f64()
    );
    let mut backends = Vec::new();
    if let Some(bin) = &outboard {
        backends.push(start_outboard(bin, &image.0, &scratch.0, args.direct)?);
    }
    if let Some(bin) = &qsd {
        backends.push(start_qsd(bin, &image.0, &scratch.0, args.direct)?);
    }

    println!(
        "{:<17} {:<14} {:>9} {:>9} {:>9} {:>9}",
        "case", "backend", "IOPS", "mean_us", "p50_us", "p99_us"
    );
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for op in [Op::Read, Op::Write] {
        for qd in DEPTHS {
            let case = format!("{:<9} qd{qd}", op.name());
            let mut figures = Vec::new();
            for b in &mut backends {
                b.run(op, qd, WARMUP, &mut rng)?;
                let (lat, elapsed) = b.run(op, qd, duration, &mut rng)?;
                let f = Figures::from_run(lat, elapsed);
                println!(
                    "{case:<17} {:<14} {:>9.0} {:>9.1} {:>9.1} {:>9.1}",
                    b.label, f.iops, f.mean_us, f.p50_us, f.p99_us
                );
                let _ = std::io::stdout().flush();
                figures.push(f);
            }
            if let [ob, q] = figures.as_slice() {
                println!(
                    "  ratio outboard/qsd: {case} IOPS x{:.2}, mean x{:.2}, p99 x{:.2}",
                    ob.iops / q.iops,
                    ob.mean_us / q.mean_us,
                    ob.p99_us / q.p99_us
                );
            }
        }
    }
    for b in backends {
        b.stop();
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("blk_bench: {e}");
        std::process::exit(1);
    }
}
