//! A host-side virtio-blk driver over vfio-user: this process plays both
//! the VMM and the guest driver of an `outboard-blk --vfio-user` function,
//! with no guest and no KVM.
//!
//! ```text
//!  this process                                      outboard-blk --vfio-user
//!  GuestRam: a memfd, mmapped ------- DMA_MAP by fd --> mapped as guest memory
//!  VfioBlk (the VMM):  Client ------- REGION_READ/WRITE, SET_IRQS, ... ------>
//!                      MSI-X eventfds <----- signalled per vector ------------
//!                      queue 0 ioeventfd --- written to kick ---------------->
//!  BlkQueue (the guest driver): a split ring laid out in GuestRam
//! ```
//!
//! [`VfioBlk`] brings the virtio-pci function up through `REGION_WRITE`s
//! on BAR 0's common configuration, like a guest driver whose MMIO the VMM
//! forwards. [`BlkQueue`] is the guest side alone (the ring and the
//! driver's bookkeeping), so that it can outlive one device process: a
//! migration hands it, with the same [`GuestRam`], to the next one.
//!
//! Guest-physical layout (each area on its own page, so that a dirty log
//! tells them apart):
//!
//! ```text
//! 0x1000   descriptor table, QUEUE_SIZE x 16 bytes
//! 0x2000   avail ring: flags u16, idx u16, ring[QUEUE_SIZE] u16
//! 0x3000   used ring: flags u16, idx u16, ring[QUEUE_SIZE] {id u32, len u32}
//! 0x4000   request headers, 16 bytes per slot
//! 0x5000   status bytes, 1 per slot
//! 0x100000 data buffers, SLOT_DATA bytes per slot
//! ```
//!
//! One request queue (queue 0); slot `s` is the chain of descriptors `3s`
//! (header), `3s + 1` (data) and `3s + 2` (status). MSI-X vector 0 is the
//! configuration vector, vector 1 queue 0's. Negotiated: `VERSION_1`, and
//! `FLUSH` when offered; not `EVENT_IDX`, so every completion signals.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use outboard_vfio_user::wire::{
    PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX,
};
use outboard_vfio_user::{Client, ClientError, DmaRange, IrqAction, IrqSetData};

/// Entries of queue 0.
pub const QUEUE_SIZE: u16 = 256;
/// Requests in flight at most (three descriptors each).
pub const SLOTS: usize = 64;
/// Descriptor table.
pub const DESC_TABLE: u64 = 0x1000;
/// Avail (driver) ring.
pub const AVAIL_RING: u64 = 0x2000;
/// Used (device) ring.
pub const USED_RING: u64 = 0x3000;
/// Request headers.
pub const HEADERS: u64 = 0x4000;
/// Status bytes.
pub const STATUS: u64 = 0x5000;
/// Data buffers.
pub const DATA: u64 = 0x10_0000;
/// Bytes of data buffer per slot (the largest request).
pub const SLOT_DATA: u64 = 0x1_0000;
/// The smallest [`GuestRam`] the layout fits in.
pub const MIN_RAM: usize = (DATA + SLOTS as u64 * SLOT_DATA) as usize;
/// MSI-X vector of configuration changes.
pub const CONFIG_VECTOR: u16 = 0;
/// MSI-X vector of queue 0.
pub const QUEUE_VECTOR: u16 = 1;
/// How long [`VfioBlk::wait`] waits for a completion.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(3 * SLOTS <= QUEUE_SIZE as usize);

/// BAR 0 registers (virtio 1.2, 4.1.4.3; layout of
/// `outboard_transport::virtio_pci`).
pub mod reg {
    /// `device_feature_select` (u32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (u32).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (u32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (u32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` (u16).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` (u16).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `queue_select` (u16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (u16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (u16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (u16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_desc` (u64).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver` (u64).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device` (u64).
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// The device configuration (`virtio_blk_config`; capacity first).
    pub const DEVICE_CONFIG: u64 = 0x2000;
    /// Queue 0's notify address (queue `q` at `+ 4q`).
    pub const NOTIFY: u64 = 0x3000;
}

/// Status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u8 = 1;
    /// DRIVER.
    pub const DRIVER: u8 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u8 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u8 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u8 = 0x40;
}

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_BLK_F_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_S_OK`.
pub const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Status byte before the device writes it.
const STATUS_UNSET: u8 = 0xff;

/// A failed driver operation.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A vfio-user request failed.
    #[error("vfio-user: {0}")]
    Client(#[from] ClientError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The device did something a virtio device must not.
    #[error("the device misbehaved: {0}")]
    Device(String),
    /// The request cannot be queued as asked.
    #[error("invalid request: {0}")]
    Request(&'static str),
    /// Every slot is in flight.
    #[error("no free request slot ({SLOTS} in flight)")]
    Full,
    /// No completion came.
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    /// No queue yet: bring the device up or adopt a queue first.
    #[error("the device has no queue set up by this driver")]
    NoQueue,
}

type Result<T> = std::result::Result<T, DriverError>;

fn os(what: &'static str) -> impl FnOnce(io::Error) -> DriverError {
    move |source| DriverError::Os { what, source }
}

fn device(why: impl Into<String>) -> DriverError {
    DriverError::Device(why.into())
}

/// The guest's RAM: a memfd mapped shared here, and DMA-mapped by the
/// same descriptor in the device process, so both see every write.
/// Addresses are guest-physical (offsets in the memfd).
pub struct GuestRam {
    ptr: *mut u8,
    len: usize,
    file: File,
}

impl GuestRam {
    /// `len` bytes of zeroed RAM (a multiple of 4 KiB, at least
    /// [`MIN_RAM`]).
    pub fn new(len: usize) -> io::Result<Self> {
        if len < MIN_RAM || len % 4096 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest RAM of {len} bytes: at least {MIN_RAM}, 4 KiB multiple"),
            ));
        }
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vfio_driver".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64)?;
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
            return Err(io::Error::last_os_error());
        }
        Ok(GuestRam {
            ptr: ptr.cast(),
            len,
            file,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// The memfd (to DMA-map, or to share with a vhost-user backend).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Where the RAM is mapped in this process.
    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Pointer to `len` bytes at `gpa`, aligned for `align`. The layout is
    /// this module's, so a range outside the RAM is a bug here: it panics.
    fn at(&self, gpa: u64, len: usize, align: usize) -> *mut u8 {
        let off = usize::try_from(gpa).unwrap_or(usize::MAX);
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "guest address {gpa:#x}+{len:#x} outside the guest RAM"
        );
        assert!(off % align == 0, "guest address {gpa:#x} misaligned");
        // SAFETY: `off + len` is inside the mapping (checked above).
        unsafe { self.ptr.add(off) }
    }

    /// Writes `v` at `gpa` (volatile: the device process reads it).
    pub fn write<T: Copy>(&self, gpa: u64, v: T) {
        let p = self.at(gpa, size_of::<T>(), align_of::<T>()).cast::<T>();
        // SAFETY: `at` checked bounds and alignment; the mapping lives as
        // long as `self`.
        unsafe { std::ptr::write_volatile(p, v) }
    }

    /// Reads a `T` at `gpa` (volatile: the device process writes it).
    pub fn read<T: Copy>(&self, gpa: u64) -> T {
        let p = self.at(gpa, size_of::<T>(), align_of::<T>()).cast::<T>();
        // SAFETY: as in `write`.
        unsafe { std::ptr::read_volatile(p) }
    }

    /// Copies `data` to `gpa`. Only for buffers the device does not own.
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) {
        let p = self.at(gpa, data.len(), 1);
        // SAFETY: `at` checked that `data.len()` bytes fit; a slice cannot
        // overlap the shared mapping's bytes the device may write (none
        // while the buffer is not in flight).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    /// Copies `buf.len()` bytes from `gpa`. Only for buffers the device
    /// does not own.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) {
        let p = self.at(gpa, buf.len(), 1);
        // SAFETY: as in `write_bytes`.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
    }

    /// Zeroes `len` bytes at `gpa`.
    pub fn zero(&self, gpa: u64, len: usize) {
        let p = self.at(gpa, len, 1);
        // SAFETY: `at` checked that `len` bytes fit.
        unsafe { std::ptr::write_bytes(p, 0, len) }
    }

    /// A ring index or flags word shared with the device.
    pub fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        let p = self.at(gpa, 2, 2).cast::<AtomicU16>();
        // SAFETY: `at` checked bounds and alignment (AtomicU16 has the
        // size and alignment of u16); the reference cannot outlive the
        // mapping.
        unsafe { &*p }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing uses it after.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A request's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `VIRTIO_BLK_T_IN`: device to guest.
    Read,
    /// `VIRTIO_BLK_T_OUT`: guest to device.
    Write,
}

/// A request in flight: its slot. The slot is free again once the
/// request is reaped, so a later [`BlkQueue::publish`] may return the same
/// tag for another request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag(u16);

impl Tag {
    /// The slot (0..[`SLOTS`]).
    pub fn slot(self) -> usize {
        usize::from(self.0)
    }

    /// The head descriptor the device puts on the used ring.
    pub fn head(self) -> u32 {
        3 * u32::from(self.0)
    }

    /// Guest address of the data buffer.
    pub fn data_addr(self) -> u64 {
        DATA + u64::from(self.0) * SLOT_DATA
    }

    /// Guest address of the status byte.
    pub fn status_addr(self) -> u64 {
        STATUS + u64::from(self.0)
    }
}

/// A completed request.
#[derive(Clone, Debug)]
pub struct Done {
    /// Which request.
    pub tag: Tag,
    /// Its direction.
    pub kind: Kind,
    /// Its first sector.
    pub sector: u64,
    /// The status byte the device wrote (`VIRTIO_BLK_S_*`).
    pub status: u8,
    /// The used ring's `len`.
    pub used_len: u32,
    /// Position on the used ring (free-running index).
    pub used_index: u16,
    /// A read's data (the whole buffer); empty for a write.
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    kind: Kind,
    sector: u64,
    len: u32,
}

/// The guest driver's side of queue 0: the split ring in [`GuestRam`] and
/// the driver's own bookkeeping (what it published, what it reaped).
pub struct BlkQueue {
    ram: Rc<GuestRam>,
    next_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    pending: Vec<Option<Pending>>,
}

impl BlkQueue {
    /// A fresh queue: rings zeroed, descriptor chains linked.
    pub fn new(ram: Rc<GuestRam>) -> Self {
        ram.zero(DESC_TABLE, HEADERS as usize - DESC_TABLE as usize);
        for slot in 0..SLOTS as u64 {
            for i in 0..2u64 {
                let d = DESC_TABLE + 16 * (3 * slot + i);
                ram.write::<u16>(d + 14, (3 * slot + i + 1) as u16);
            }
        }
        BlkQueue {
            ram,
            next_avail: 0,
            last_used: 0,
            free: (0..SLOTS as u16).rev().collect(),
            pending: vec![None; SLOTS],
        }
    }

    /// The avail index the driver published.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        self.ram.atomic_u16(USED_RING + 2).load(Ordering::Acquire)
    }

    /// Whether `tag` is published and not reaped.
    pub fn is_pending(&self, tag: Tag) -> bool {
        self.pending.get(tag.slot()).is_some_and(Option::is_some)
    }

    /// Requests published and not reaped.
    pub fn in_flight(&self) -> usize {
        SLOTS - self.free.len()
    }

    /// Publishes a request on the avail ring (no kick). The data buffer
    /// gets `buf` first: a write sends it, a read of `buf.len()` bytes
    /// overwrites it. `buf.len()` is a non-zero multiple of 512 up to
    /// [`SLOT_DATA`].
    pub fn publish(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Tag> {
        if buf.is_empty() || buf.len() % 512 != 0 || buf.len() as u64 > SLOT_DATA {
            return Err(DriverError::Request(
                "length: a multiple of 512 up to 64 KiB",
            ));
        }
        let slot = self.free.pop().ok_or(DriverError::Full)?;
        let tag = Tag(slot);
        let s = u64::from(slot);
        let (ty, data_flags) = match kind {
            Kind::Read => (VIRTIO_BLK_T_IN, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE),
            Kind::Write => (VIRTIO_BLK_T_OUT, VIRTQ_DESC_F_NEXT),
        };
        let hdr = HEADERS + 16 * s;
        self.ram.write::<u32>(hdr, ty);
        self.ram.write::<u32>(hdr + 4, 0);
        self.ram.write::<u64>(hdr + 8, sector);
        self.ram.write::<u8>(tag.status_addr(), STATUS_UNSET);
        self.ram.write_bytes(tag.data_addr(), buf);
        let len = buf.len() as u32;
        let parts = [
            (hdr, 16, VIRTQ_DESC_F_NEXT),
            (tag.data_addr(), len, data_flags),
            (tag.status_addr(), 1, VIRTQ_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in parts.into_iter().enumerate() {
            let d = DESC_TABLE + 16 * (3 * s + i as u64);
            self.ram.write::<u64>(d, addr);
            self.ram.write::<u32>(d + 8, len);
            self.ram.write::<u16>(d + 12, flags);
        }
        let pos = u64::from(self.next_avail % QUEUE_SIZE);
        self.ram
            .write::<u16>(AVAIL_RING + 4 + 2 * pos, tag.head() as u16);
        self.next_avail = self.next_avail.wrapping_add(1);
        // The entry and the request it names before the index.
        self.ram
            .atomic_u16(AVAIL_RING + 2)
            .store(self.next_avail, Ordering::Release);
        self.pending[usize::from(slot)] = Some(Pending { kind, sector, len });
        Ok(tag)
    }

    /// Whether the device wants a kick (it has not set
    /// `VRING_USED_F_NO_NOTIFY`).
    pub fn needs_kick(&self) -> bool {
        // The avail index store before the flags load (as Linux's
        // virtqueue_kick_prepare does).
        fence(Ordering::SeqCst);
        let flags = self.ram.atomic_u16(USED_RING).load(Ordering::Relaxed);
        flags & VRING_USED_F_NO_NOTIFY == 0
    }

    /// Takes the next used entry, if any. An entry that names no request
    /// in flight, or a used index running past the avail index, is a
    /// device error.
    pub fn reap(&mut self) -> Result<Option<Done>> {
        let used = self.used_idx();
        if used == self.last_used {
            return Ok(None);
        }
        let ahead = used.wrapping_sub(self.last_used);
        if usize::from(ahead) > self.in_flight() {
            return Err(device(format!(
                "used index {used} is {ahead} past {} with {} requests in flight",
                self.last_used,
                self.in_flight()
            )));
        }
        let pos = u64::from(self.last_used % QUEUE_SIZE);
        let id = self.ram.read::<u32>(USED_RING + 4 + 8 * pos);
        let used_len = self.ram.read::<u32>(USED_RING + 8 + 8 * pos);
        let slot = (id % 3 == 0)
            .then_some(id / 3)
            .and_then(|s| u16::try_from(s).ok())
            .filter(|&s| usize::from(s) < SLOTS);
        let Some((slot, p)) = slot.and_then(|s| Some((s, self.pending[usize::from(s)].take()?)))
        else {
            return Err(device(format!(
                "used ring entry {} names descriptor {id}, not a request in flight",
                self.last_used
            )));
        };
        let tag = Tag(slot);
        let used_index = self.last_used;
        self.last_used = self.last_used.wrapping_add(1);
        self.free.push(slot);
        let data = match p.kind {
            Kind::Read => {
                let mut d = vec![0u8; p.len as usize];
                self.ram.read_bytes(tag.data_addr(), &mut d);
                d
            }
            Kind::Write => Vec::new(),
        };
        Ok(Some(Done {
            tag,
            kind: p.kind,
            sector: p.sector,
            status: self.ram.read::<u8>(tag.status_addr()),
            used_len,
            used_index,
            data,
        }))
    }

    /// Waits up to `timeout` for completions, sleeping on `irq` (the
    /// queue's interrupt eventfd); returns what was reaped (empty: none
    /// came in time).
    pub fn wait_any(&mut self, irq: BorrowedFd<'_>, timeout: Duration) -> Result<Vec<Done>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = Vec::new();
            while let Some(d) = self.reap()? {
                out.push(d);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !out.is_empty() || left.is_zero() {
                return Ok(out);
            }
            if poll_in(irq, left)? {
                eventfd_drain(irq)?;
            }
        }
    }
}

/// A new non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd (a kick).
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to a valid descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n != 8 {
        return Err(os("signalling an eventfd")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Resets an eventfd's counter (non-blocking; nothing pending is fine).
fn eventfd_drain(fd: BorrowedFd<'_>) -> Result<()> {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer from a valid
    // descriptor.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(os("reading an interrupt eventfd")(e));
        }
    }
    Ok(())
}

/// Whether `fd` (an eventfd) became readable within `timeout`.
pub fn poll_in(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd we own.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(os("poll")(e));
    }
    Ok(n > 0)
}

/// The VMM side of an `outboard-blk --vfio-user` function, with the guest
/// driver's queue once there is one.
pub struct VfioBlk {
    client: Client,
    ram: Rc<GuestRam>,
    /// One eventfd per MSI-X vector.
    irqs: Vec<OwnedFd>,
    /// Queue 0's ioeventfd.
    kick: OwnedFd,
    queue: Option<BlkQueue>,
    /// Completions reaped while waiting for another request.
    done: VecDeque<Done>,
}

impl VfioBlk {
    /// Does what a VMM does on connecting: negotiates the version, checks
    /// the function is PCI with BAR 0 and configuration space, DMA-maps
    /// all of `ram` by its memfd at address 0, gives an eventfd to every
    /// MSI-X vector and takes queue 0's ioeventfd. The device is left as
    /// it is (no register access).
    pub fn connect(stream: UnixStream, ram: Rc<GuestRam>) -> Result<Self> {
        let mut client = Client::connect(stream)?;
        let info = client.device_info()?;
        if info.flags & outboard_vfio_user::wire::DEVICE_FLAGS_PCI == 0
            || info.num_regions <= PCI_CONFIG_REGION_INDEX
        {
            return Err(device(format!("not a PCI function: {info:?}")));
        }
        let (bar0, _) = client.region_info(PCI_BAR0_REGION_INDEX)?;
        if bar0.size < 0x6000 {
            return Err(device(format!("BAR 0 of {:#x} bytes", bar0.size)));
        }
        let range = DmaRange {
            iova: 0,
            size: ram.size(),
            readable: true,
            writable: true,
        };
        client.dma_map(range, Some((ram.fd(), 0)))?;
        let msix = client.irq_info(PCI_MSIX_IRQ_INDEX)?;
        if msix.count <= u32::from(QUEUE_VECTOR) {
            return Err(device(format!("{} MSI-X vectors", msix.count)));
        }
        let irqs = (0..msix.count)
            .map(|_| eventfd())
            .collect::<io::Result<Vec<_>>>()
            .map_err(os("creating interrupt eventfds"))?;
        let fds: Vec<BorrowedFd<'_>> = irqs.iter().map(|f| f.as_fd()).collect();
        client.set_irqs(
            PCI_MSIX_IRQ_INDEX,
            0,
            msix.count,
            IrqAction::Trigger,
            IrqSetData::Eventfds(&fds),
        )?;
        let io = client.region_io_fds(PCI_BAR0_REGION_INDEX)?;
        let index = io
            .sub_regions
            .iter()
            .find(|s| s.offset == reg::NOTIFY)
            .map(|s| s.fd_index as usize)
            .ok_or_else(|| device("no ioeventfd for queue 0's notify address"))?;
        let kick = io
            .fds
            .into_iter()
            .nth(index)
            .ok_or_else(|| device("ioeventfd index out of range"))?;
        Ok(VfioBlk {
            client,
            ram,
            irqs,
            kick,
            queue: None,
            done: VecDeque::new(),
        })
    }

    /// The vfio-user client, for requests this driver does not make
    /// (migration, DMA logging, reset).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The queue, once set up or adopted.
    pub fn queue(&self) -> Option<&BlkQueue> {
        self.queue.as_ref()
    }

    /// The interrupt eventfd of MSI-X vector `v`.
    pub fn irq(&self, v: u16) -> Option<BorrowedFd<'_>> {
        self.irqs.get(usize::from(v)).map(|f| f.as_fd())
    }

    /// Reads a BAR 0 register of `len` bytes (1, 2, 4 or 8).
    pub fn read_bar0(&mut self, offset: u64, len: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        let buf = b
            .get_mut(..len)
            .ok_or(DriverError::Request("register of more than 8 bytes"))?;
        self.client
            .region_read(PCI_BAR0_REGION_INDEX, offset, buf)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a BAR 0 register of `len` bytes (1, 2, 4 or 8).
    pub fn write_bar0(&mut self, offset: u64, value: u64, len: usize) -> Result<()> {
        let b = value.to_le_bytes();
        let data = b
            .get(..len)
            .ok_or(DriverError::Request("register of more than 8 bytes"))?;
        self.client
            .region_write(PCI_BAR0_REGION_INDEX, offset, data)?;
        Ok(())
    }

    /// The device status byte.
    pub fn status(&mut self) -> Result<u8> {
        Ok(self.read_bar0(reg::DEVICE_STATUS, 1)? as u8)
    }

    fn set_status(&mut self, s: u8) -> Result<()> {
        self.write_bar0(reg::DEVICE_STATUS, u64::from(s), 1)
    }

    /// What the device offers.
    pub fn device_features(&mut self) -> Result<u64> {
        self.write_bar0(reg::DEVICE_FEATURE_SELECT, 0, 4)?;
        let low = self.read_bar0(reg::DEVICE_FEATURE, 4)?;
        self.write_bar0(reg::DEVICE_FEATURE_SELECT, 1, 4)?;
        let high = self.read_bar0(reg::DEVICE_FEATURE, 4)?;
        Ok(low | high << 32)
    }

    /// The guest driver's initialisation (virtio 1.2, 3.1.1): reset,
    /// ACKNOWLEDGE | DRIVER, features, FEATURES_OK, vectors, queue 0 in
    /// the layout above, DRIVER_OK. Returns the capacity in sectors.
    pub fn bring_up(&mut self) -> Result<u64> {
        let mut id = [0u8; 4];
        self.client
            .region_read(PCI_CONFIG_REGION_INDEX, 0, &mut id)?;
        if id != [0xf4, 0x1a, 0x42, 0x10] {
            return Err(device(format!(
                "PCI id {id:02x?}, not virtio-blk 1af4:1042"
            )));
        }
        self.set_status(0)?;
        self.set_status(status::ACKNOWLEDGE)?;
        self.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        let offered = self.device_features()?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(device(format!("features {offered:#x} lack VERSION_1")));
        }
        let features = VIRTIO_F_VERSION_1 | offered & VIRTIO_BLK_F_FLUSH;
        for (sel, word) in [(0, features & 0xffff_ffff), (1, features >> 32)] {
            self.write_bar0(reg::DRIVER_FEATURE_SELECT, sel, 4)?;
            self.write_bar0(reg::DRIVER_FEATURE, word, 4)?;
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s)?;
        if self.status()? & status::FEATURES_OK == 0 {
            return Err(device("FEATURES_OK not accepted"));
        }
        if self.read_bar0(reg::NUM_QUEUES, 2)? == 0 {
            return Err(device("no queues"));
        }
        self.write_bar0(reg::CONFIG_MSIX_VECTOR, CONFIG_VECTOR.into(), 2)?;
        if self.read_bar0(reg::CONFIG_MSIX_VECTOR, 2)? != u64::from(CONFIG_VECTOR) {
            return Err(device("config vector refused"));
        }
        self.write_bar0(reg::QUEUE_SELECT, 0, 2)?;
        let max = self.read_bar0(reg::QUEUE_SIZE, 2)?;
        if max < u64::from(QUEUE_SIZE) {
            return Err(device(format!(
                "queue 0 holds {max} entries, {QUEUE_SIZE} needed"
            )));
        }
        let queue = BlkQueue::new(self.ram.clone());
        self.write_bar0(reg::QUEUE_SIZE, QUEUE_SIZE.into(), 2)?;
        self.write_bar0(reg::QUEUE_MSIX_VECTOR, QUEUE_VECTOR.into(), 2)?;
        if self.read_bar0(reg::QUEUE_MSIX_VECTOR, 2)? != u64::from(QUEUE_VECTOR) {
            return Err(device("queue vector refused"));
        }
        self.write_bar0(reg::QUEUE_DESC, DESC_TABLE, 8)?;
        self.write_bar0(reg::QUEUE_DRIVER, AVAIL_RING, 8)?;
        self.write_bar0(reg::QUEUE_DEVICE, USED_RING, 8)?;
        self.write_bar0(reg::QUEUE_ENABLE, 1, 2)?;
        self.set_status(s | status::DRIVER_OK)?;
        let got = self.status()?;
        if got & status::NEEDS_RESET != 0 || got & status::DRIVER_OK == 0 {
            return Err(device(format!("status {got:#x} after DRIVER_OK")));
        }
        self.queue = Some(queue);
        self.done.clear();
        self.read_bar0(reg::DEVICE_CONFIG, 8)
    }

    /// Takes over a queue a driver set up on another device process (a
    /// migration: the device state came through the migration blob, the
    /// ring is in the same guest RAM).
    pub fn adopt(&mut self, queue: BlkQueue) {
        self.queue = Some(queue);
        self.done.clear();
    }

    /// Disconnects (the device process sees the client go) and returns
    /// the guest side, to [`adopt`](Self::adopt) elsewhere. Completions
    /// reaped but not returned yet are dropped.
    pub fn into_queue(self) -> Option<BlkQueue> {
        self.queue
    }

    fn queue_mut(&mut self) -> Result<&mut BlkQueue> {
        self.queue.as_mut().ok_or(DriverError::NoQueue)
    }

    /// Publishes a request without kicking (see [`BlkQueue::publish`]).
    pub fn publish(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Tag> {
        self.queue_mut()?.publish(kind, sector, buf)
    }

    /// Kicks queue 0 through its ioeventfd, as the VMM's KVM would on the
    /// guest's notify write, unless the device asked for no kicks.
    pub fn kick(&self) -> Result<()> {
        match &self.queue {
            Some(q) if !q.needs_kick() => Ok(()),
            _ => eventfd_signal(self.kick.as_fd()),
        }
    }

    /// Kicks queue 0 with a `REGION_WRITE` of its notify address (a VMM
    /// without ioeventfds).
    pub fn kick_by_region_write(&mut self) -> Result<()> {
        self.write_bar0(reg::NOTIFY, 0, 2)
    }

    /// Publishes a request and kicks.
    pub fn submit(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Tag> {
        let tag = self.publish(kind, sector, buf)?;
        self.kick()?;
        Ok(tag)
    }

    /// Waits up to `timeout` for completions (empty: none came).
    pub fn wait_any_for(&mut self, timeout: Duration) -> Result<Vec<Done>> {
        if !self.done.is_empty() {
            return Ok(self.done.drain(..).collect());
        }
        self.reap_wait(timeout)
    }

    /// Waits on the queue's interrupt for new completions.
    fn reap_wait(&mut self, timeout: Duration) -> Result<Vec<Done>> {
        let irq = self
            .irqs
            .get(usize::from(QUEUE_VECTOR))
            .ok_or(DriverError::NoQueue)?;
        let q = self.queue.as_mut().ok_or(DriverError::NoQueue)?;
        q.wait_any(irq.as_fd(), timeout)
    }

    /// Waits for the next completions ([`WAIT_TIMEOUT`] at most).
    pub fn wait_any(&mut self) -> Result<Vec<Done>> {
        let out = self.wait_any_for(WAIT_TIMEOUT)?;
        if out.is_empty() {
            return Err(DriverError::Timeout(WAIT_TIMEOUT));
        }
        Ok(out)
    }

    /// Waits for request `tag` ([`WAIT_TIMEOUT`] at most); other
    /// completions meanwhile are kept for later waits.
    pub fn wait(&mut self, tag: Tag) -> Result<Done> {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            if let Some(i) = self.done.iter().position(|d| d.tag == tag) {
                return self.done.remove(i).ok_or(DriverError::NoQueue);
            }
            if !self.queue_mut()?.is_pending(tag) {
                return Err(DriverError::Request("waiting for a request not in flight"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout(WAIT_TIMEOUT));
            }
            let more = self.reap_wait(left)?;
            self.done.extend(more);
        }
    }

    /// Submits one request and waits for it.
    pub fn io(&mut self, kind: Kind, sector: u64, buf: &[u8]) -> Result<Done> {
        let tag = self.submit(kind, sector, buf)?;
        self.wait(tag)
    }
}
