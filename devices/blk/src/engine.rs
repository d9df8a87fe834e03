//! The block engine: a raw image and the execution of virtio-blk requests
//! against it. Transport-neutral: the vhost-user backend drives it today,
//! a vfio-user virtio-pci function can drive it the same way (hand it the
//! guest memory and a descriptor chain, put the [`Completion`] on the used
//! ring).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use crate::hostio::{self, Image, IoMode};
use crate::request::{self, Buffer, Request, RequestKind, SectorRange, ID_LEN, SECTOR_SIZE};

/// Largest discard / write-zeroes request, in sectors (4 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

/// Largest `O_DIRECT` alignment supported.
const MAX_DIRECT_ALIGN: usize = 64 * 1024;

/// How to open a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// The raw image (regular file or block device).
    pub image: PathBuf,
    /// Refuse writes; open the image read-only.
    pub readonly: bool,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// The GET_ID string (at most 20 bytes); `None`: the image's file name,
    /// cut to 20 bytes.
    pub serial: Option<String>,
}

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// open(2) failed.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Open with O_DIRECT failed with EINVAL, or the filesystem reports no
    /// O_DIRECT support.
    #[error("cannot open image {path} with --direct: O_DIRECT not supported on this filesystem")]
    DirectUnsupported {
        /// The image path.
        path: PathBuf,
    },
    /// The filesystem's O_DIRECT alignment is unusable for this image.
    #[error("image {path}: --direct needs {align}-byte alignment here, but {reason}")]
    DirectAlignment {
        /// The image path.
        path: PathBuf,
        /// The alignment the filesystem needs.
        align: usize,
        /// What does not fit.
        reason: String,
    },
    /// stat or seek failed.
    #[error("cannot get the size of image {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("image {path} is not a regular file or a block device")]
    NotAFile {
        /// The image path.
        path: PathBuf,
    },
    /// The size is not whole sectors.
    #[error("image {path} is {size} bytes, not a multiple of 512")]
    PartialSector {
        /// The image path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The serial is longer than 20 bytes.
    #[error("serial {serial:?} is {len} bytes, at most {ID_LEN} allowed")]
    SerialTooLong {
        /// The serial given.
        serial: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// How a request ended: the status byte written and the used-ring length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_OK, _IOERR or _UNSUPP.
    pub status: u8,
    /// Bytes written into the chain's buffers (data + status byte; 0 when
    /// the chain had no usable status byte).
    pub used_len: u32,
}

/// An open raw image served as a virtio-blk disk; shared by all queues.
pub struct Disk {
    image: Image,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    direct: bool,
    id: [u8; ID_LEN],
    warn_limit: RateLimit,
}

impl Disk {
    /// Opens the image as `options` say and checks it can be served.
    pub fn open(options: &DiskOptions) -> Result<Self, OpenError> {
        let path = options.image.clone();
        let id = device_id(options)?;
        let mut open = OpenOptions::new();
        open.read(true).write(!options.readonly);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let mut file = open.open(&path).map_err(|source| {
            if options.direct && source.raw_os_error() == Some(libc::EINVAL) {
                OpenError::DirectUnsupported { path: path.clone() }
            } else {
                OpenError::Open {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let size_err = |source| OpenError::Size {
            path: path.clone(),
            source,
        };
        let file_type = file.metadata().map_err(size_err)?.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(OpenError::NotAFile { path });
        }
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        if size % SECTOR_SIZE != 0 {
            return Err(OpenError::PartialSector { path, size });
        }
        let mode = if options.direct {
            direct_mode(&file, &path, size)?
        } else {
            IoMode::Buffered
        };
        Ok(Self::from_parts(file, mode, options, path, size, id))
    }

    fn from_parts(
        file: File,
        mode: IoMode,
        options: &DiskOptions,
        path: PathBuf,
        size: u64,
        id: [u8; ID_LEN],
    ) -> Self {
        Disk {
            image: Image::new(file, mode),
            path,
            sectors: size / SECTOR_SIZE,
            readonly: options.readonly,
            direct: options.direct,
            id,
            warn_limit: RateLimit::new(Duration::from_secs(1)),
        }
    }

    /// Opens a buffered file but runs the direct (bounce buffer) path with
    /// `align`: tests the O_DIRECT logic on any filesystem.
    #[cfg(test)]
    pub(crate) fn open_bounced(options: &DiskOptions, align: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!options.readonly)
            .open(&options.image)?;
        let size = file.metadata()?.len();
        let id = device_id(options).map_err(io::Error::other)?;
        let mode = IoMode::Direct { align };
        Ok(Self::from_parts(
            file,
            mode,
            options,
            options.image.clone(),
            size,
            id,
        ))
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the image is opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The 20-byte GET_ID answer (NUL-padded).
    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.id
    }

    /// Parses and executes one request chain, writes its status byte, and
    /// says what to put on the used ring. Never fails: a malformed chain
    /// or a host I/O error becomes VIRTIO_BLK_S_IOERR (logged at warn,
    /// rate-limited) and only fails that request.
    pub fn process_request<M, I>(&self, mem: &M, descriptors: I) -> Completion
    where
        M: GuestMemory + ?Sized,
        I: IntoIterator<Item = Descriptor>,
    {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let request = match request::parse(mem, descriptors) {
            Ok(r) => r,
            Err(malformed) => {
                self.warn(format_args!("malformed request: {malformed}"));
                let used_len = match malformed.status {
                    Some(addr) if mem.write_obj(ioerr, addr).is_ok() => 1,
                    _ => 0,
                };
                return Completion {
                    status: ioerr,
                    used_len,
                };
            }
        };
        let (status, data_len) = self.execute(mem, &request);
        complete(mem, &request, status, data_len)
    }

    /// Runs a parsed request: the status and the data bytes written into
    /// guest buffers.
    fn execute<M: GuestMemory + ?Sized>(&self, mem: &M, request: &Request) -> (u8, u32) {
        let ok = VIRTIO_BLK_S_OK as u8;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        match &request.kind {
            RequestKind::Read { sector, data } => {
                let len = request::total_len(data);
                let Some(offset) = self.range(*sector, len, "read") else {
                    return (ioerr, 0);
                };
                let result = guest_slices(mem, data, Permissions::Write)
                    .map_err(to_io)
                    .and_then(|slices| self.image.read_to_guest(offset, &slices));
                match result {
                    // len <= the chain's total, which fits u32.
                    Ok(()) => (ok, u32::try_from(len).unwrap_or(u32::MAX)),
                    Err(e) => {
                        self.io_warn("read", *sector, len, &e);
                        (ioerr, 0)
                    }
                }
            }
            RequestKind::Write { sector, data } => {
                let len = request::total_len(data);
                if self.readonly {
                    self.warn(format_args!("write to sector {sector} refused: read-only"));
                    return (ioerr, 0);
                }
                let Some(offset) = self.range(*sector, len, "write") else {
                    return (ioerr, 0);
                };
                let result = guest_slices(mem, data, Permissions::Read)
                    .map_err(to_io)
                    .and_then(|slices| self.image.write_from_guest(offset, &slices));
                match result {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        self.io_warn("write", *sector, len, &e);
                        (ioerr, 0)
                    }
                }
            }
            RequestKind::Flush => {
                if self.readonly {
                    return (ok, 0);
                }
                match self.image.flush() {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        self.warn(format_args!("flush failed: {e}"));
                        (ioerr, 0)
                    }
                }
            }
            RequestKind::GetId { data } => match write_stream(mem, data, &self.id) {
                Ok(()) => (ok, ID_LEN as u32),
                Err(_) => (ioerr, 0),
            },
            RequestKind::Discard(range) => {
                // Discard is a hint: unmap flag set is UNSUPP (spec 5.2.6.2).
                if let Some(status) = self.check_range_request(range, "discard", true) {
                    return (status, 0);
                }
                let (offset, len) = byte_range(range);
                if len == 0 {
                    return (ok, 0);
                }
                match self.image.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ) {
                    Ok(()) => (ok, 0),
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => (ok, 0),
                    Err(e) => {
                        self.io_warn("discard", range.sector, len, &e);
                        (ioerr, 0)
                    }
                }
            }
            RequestKind::WriteZeroes(range) => {
                if let Some(status) = self.check_range_request(range, "write-zeroes", false) {
                    return (status, 0);
                }
                match self.write_zeroes(range) {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        self.io_warn("write-zeroes", range.sector, byte_range(range).1, &e);
                        (ioerr, 0)
                    }
                }
            }
            RequestKind::Unsupported(t) => {
                log::debug!("unsupported request type {t}");
                (unsupp, 0)
            }
        }
    }

    /// Checks a discard / write-zeroes request; `Some(status)` to refuse it.
    fn check_range_request(&self, range: &SectorRange, what: &str, is_discard: bool) -> Option<u8> {
        if self.readonly {
            self.warn(format_args!("{what} refused: read-only"));
            return Some(VIRTIO_BLK_S_IOERR as u8);
        }
        if range.unknown_flags() || (is_discard && range.unmap()) {
            self.warn(format_args!("{what} with flags {:#x}", range.flags));
            return Some(VIRTIO_BLK_S_UNSUPP as u8);
        }
        if range.num_sectors > MAX_DISCARD_SECTORS {
            self.warn(format_args!(
                "{what} of {} sectors, more than {MAX_DISCARD_SECTORS}",
                range.num_sectors
            ));
            return Some(VIRTIO_BLK_S_IOERR as u8);
        }
        let len = u64::from(range.num_sectors) * SECTOR_SIZE;
        match self.range(range.sector, len, what) {
            Some(_) => None,
            None => Some(VIRTIO_BLK_S_IOERR as u8),
        }
    }

    fn write_zeroes(&self, range: &SectorRange) -> io::Result<()> {
        let (offset, len) = byte_range(range);
        if len == 0 {
            return Ok(());
        }
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        if range.unmap()
            && self
                .image
                .fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len)
                .is_ok()
        {
            return Ok(());
        }
        match self
            .image
            .fallocate(libc::FALLOC_FL_ZERO_RANGE | keep, offset, len)
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                self.image.write_zeroes(offset, len)
            }
            Err(e) => Err(e),
        }
    }

    /// Byte offset of `[sector, sector + len)` if it lies within the disk.
    fn range(&self, sector: u64, len: u64, what: &str) -> Option<u64> {
        let end_ok = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|off| off.checked_add(len).map(|end| (off, end)))
            .filter(|(_, end)| *end <= self.sectors * SECTOR_SIZE);
        match end_ok {
            Some((offset, _)) => Some(offset),
            None => {
                self.warn(format_args!(
                    "{what} of {len} bytes at sector {sector} is beyond the capacity ({} sectors)",
                    self.sectors
                ));
                None
            }
        }
    }

    fn io_warn(&self, what: &str, sector: u64, len: u64, e: &io::Error) {
        self.warn(format_args!(
            "{}: {what} of {len} bytes at sector {sector} failed: {e}",
            self.path.display()
        ));
    }

    fn warn(&self, args: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.warn_limit.allow() {
            if suppressed > 0 {
                log::warn!("{args} ({suppressed} similar messages suppressed)");
            } else {
                log::warn!("{args}");
            }
        }
    }
}

/// Writes the status byte and computes the used length.
fn complete<M: GuestMemory + ?Sized>(
    mem: &M,
    request: &Request,
    status: u8,
    data_len: u32,
) -> Completion {
    match mem.write_obj(status, request.status) {
        Ok(()) => Completion {
            status,
            used_len: data_len.saturating_add(1),
        },
        // Cannot happen for a checked address; report nothing written.
        Err(_) => Completion {
            status,
            used_len: 0,
        },
    }
}

fn byte_range(range: &SectorRange) -> (u64, u64) {
    // Only called after `range()` accepted the request: no overflow.
    (
        range.sector.saturating_mul(SECTOR_SIZE),
        u64::from(range.num_sectors) * SECTOR_SIZE,
    )
}

fn to_io(e: GuestMemoryError) -> io::Error {
    io::Error::other(format!("guest memory: {e}"))
}

/// The guest buffers as host slices (split at region boundaries).
fn guest_slices<'a, M: GuestMemory + ?Sized>(
    mem: &'a M,
    bufs: &[Buffer],
    access: Permissions,
) -> Result<Vec<VolatileSlice<'a, BS<'a, M::Bitmap>>>, GuestMemoryError> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        for slice in mem.get_slices(b.addr, b.len as usize, access)? {
            out.push(slice?);
        }
    }
    Ok(out)
}

/// Writes `src` at the start of the stream `bufs` (which holds at least
/// `src.len()` bytes).
fn write_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    bufs: &[Buffer],
    mut src: &[u8],
) -> Result<(), GuestMemoryError> {
    for b in bufs {
        if src.is_empty() {
            break;
        }
        let n = src.len().min(b.len as usize);
        let (head, tail) = src.split_at(n);
        mem.write_slice(head, b.addr)?;
        src = tail;
    }
    Ok(())
}

/// The NUL-padded device ID: the serial, or the image's file name.
fn device_id(options: &DiskOptions) -> Result<[u8; ID_LEN], OpenError> {
    let mut id = [0u8; ID_LEN];
    let text = match &options.serial {
        Some(serial) => {
            if serial.len() > ID_LEN {
                return Err(OpenError::SerialTooLong {
                    serial: serial.clone(),
                    len: serial.len(),
                });
            }
            serial.clone()
        }
        None => {
            let name = options
                .image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut end = name.len().min(ID_LEN);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name.get(..end).unwrap_or_default().to_owned()
        }
    };
    for (d, s) in id.iter_mut().zip(text.bytes()) {
        *d = s;
    }
    Ok(id)
}

fn direct_mode(file: &File, path: &Path, size: u64) -> Result<IoMode, OpenError> {
    let align = hostio::direct_io_alignment(file)
        .map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| OpenError::DirectUnsupported {
            path: path.to_owned(),
        })?;
    let misfit = |reason: String| OpenError::DirectAlignment {
        path: path.to_owned(),
        align,
        reason,
    };
    if !align.is_power_of_two() || align > MAX_DIRECT_ALIGN {
        return Err(misfit(format!(
            "only powers of two up to {MAX_DIRECT_ALIGN} are supported"
        )));
    }
    if size % align as u64 != 0 {
        return Err(misfit(format!("the image is {size} bytes")));
    }
    Ok(IoMode::Direct { align })
}

/// Lets one message through per interval and counts the rest.
struct RateLimit {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last one)` when a message may be logged.
    fn allow(&self) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}
