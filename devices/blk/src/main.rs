//! The `outboard-blk` command: serves a raw image as a vhost-user-blk
//! device (or, with `--vfio-user`, as a virtio-blk PCI function over
//! vfio-user) to one frontend, and exits 0 when that frontend disconnects (or
//! on SIGTERM). Errors print one `outboard-blk: error: ...` line and exit 1.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, ValueEnum};

use outboard_blk::daemon::{self, Listen, Stopper};
use outboard_blk::request::ID_LEN;
use outboard_blk::vfio_user::{self, BlkVfioDevice};
use outboard_blk::vhost::{MAX_QUEUES, MAX_QUEUE_SIZE};
use outboard_blk::{BlkBackend, BlkPciFunction, Disk, DiskOptions, QueueOptions};

/// Serve a raw disk image as a vhost-user-blk device.
#[derive(Parser, Debug)]
#[command(name = "outboard-blk", version, about)]
struct Cli {
    /// The raw image (regular file or block device).
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// Refuse writes (the guest sees VIRTIO_BLK_F_RO).
    #[arg(long)]
    readonly: bool,
    /// Open the image with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Number of request queues (1-64), one worker thread each.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_queues)]
    queues: u16,
    /// Maximum queue size (a power of two up to 32768).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Device ID returned by GET_ID (at most 20 bytes; default: the image
    /// file name).
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    serial: Option<String>,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    #[arg(long, value_name = "on|off", default_value = "on")]
    event_idx: OnOff,
    /// Present the disk as a virtio-blk PCI function over vfio-user
    /// instead of vhost-user-blk.
    #[arg(long)]
    vfio_user: bool,
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct ListenArgs {
    /// Listen on this unix socket path (a stale socket is replaced).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Use this inherited, bound and listening unix socket.
    #[arg(long, value_name = "FD")]
    listen_fd: Option<RawFd>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn parse_queues(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(format!("must be a number from 1 to {MAX_QUEUES}")),
    }
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && n <= MAX_QUEUE_SIZE => Ok(n),
        _ => Err(format!("must be a power of two up to {MAX_QUEUE_SIZE}")),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() <= ID_LEN {
        Ok(s.to_owned())
    } else {
        Err(format!("{} bytes, at most {ID_LEN} allowed", s.len()))
    }
}

fn main() -> ExitCode {
    outboard_blk::logger::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first paragraph, on one line (usage and tips dropped).
            let text = e.to_string();
            let para: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let para = para.join(" ");
            let line = para.strip_prefix("error: ").unwrap_or(&para);
            eprintln!("outboard-blk: error: {line} (see --help)");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboard-blk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let listen = match (cli.listen.socket, cli.listen.listen_fd) {
        (Some(path), _) => Listen::Socket(path),
        (None, Some(fd)) => Listen::Fd(fd),
        (None, None) => return Err("one of --socket or --listen-fd is required".into()),
    };
    // Signals are blocked before any other thread exists, so that only the
    // signal thread receives them.
    let stopper = Stopper::new(&listen);
    stopper.handle_signals()?;
    // Take the inherited fd before opening anything that could reuse its number.
    let mut listener = daemon::listener(&listen)?;
    let disk = Disk::open(&DiskOptions {
        image: cli.image,
        readonly: cli.readonly,
        direct: cli.direct,
        serial: cli.serial,
    })?;
    let queues = QueueOptions {
        queues: cli.queues,
        queue_size: cli.queue_size,
        event_idx: cli.event_idx == OnOff::On,
    };
    log::info!(
        "image {}: {} sectors, readonly={}, direct={}, queues={}",
        disk.path().display(),
        disk.capacity_sectors(),
        disk.readonly(),
        disk.direct(),
        queues.queues
    );
    if cli.vfio_user {
        let function = BlkPciFunction::new(Arc::new(disk), queues)?;
        let mut device = BlkVfioDevice::new(function);
        let stream = loop {
            match listener.accept() {
                Ok(Some(s)) => break s,
                Ok(None) => continue,
                Err(e) => return Err(format!("vfio-user: accept: {e}").into()),
            }
        };
        stopper.set_stream(stream.try_clone().ok());
        let result = vfio_user::serve(&mut device, stream);
        stopper.set_stream(None);
        result.map_err(|e| format!("vfio-user: {e}"))?;
        log::info!("connection closed, exiting");
        return Ok(());
    }
    let backend = Arc::new(BlkBackend::new(Arc::new(disk), queues)?);
    daemon::serve(backend, &mut listener, &stopper)?;
    log::info!("connection closed, exiting");
    Ok(())
}
