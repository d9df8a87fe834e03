//! Shared test pieces: a small fake PCI device, guest memory, and a server
//! running in a thread.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use outboard_vfio_user::wire::{self, SparseMmapArea};
use outboard_vfio_user::{
    ClientMemory, Device, DeviceInfo, Dma, DmaRange, IoFdArea, IrqAction, IrqData, IrqInfo, IrqSet,
    RegionInfo, Server, ServerConfig, ServerError,
};

pub const BAR0_SIZE: u64 = 4096;
pub const CTRL_SIZE: u64 = 64;
pub const CONFIG_SIZE: u64 = 256;
/// Control register offsets in BAR1.
pub const CTRL_IOVA: u64 = 0;
pub const CTRL_LEN: u64 = 8;
/// Write 1: DMA-write BAR0[0..len] to iova; 2: DMA-read iova into BAR0.
pub const CTRL_CMD: u64 = 16;
/// Errno of the last command (0: success).
pub const CTRL_STATUS: u64 = 24;
pub const CTRL_DOORBELL: u64 = 32;
pub const MSIX_COUNT: u32 = 4;

pub fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: memfd_create returned a new descriptor nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    f
}

/// A non-blocking eventfd.
pub fn eventfd() -> File {
    // SAFETY: plain syscall with valid flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: eventfd returned a new descriptor nothing else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads an eventfd's counter (None if zero).
pub fn eventfd_read(f: &File) -> Option<u64> {
    let mut b = [0u8; 8];
    io::Read::read_exact(&mut &*f, &mut b).ok()?;
    Some(u64::from_ne_bytes(b))
}

/// What the test can observe of the device from outside.
#[derive(Debug, Default)]
pub struct Observed {
    pub paused: bool,
    pub resets: u32,
    pub irq_sets: Vec<(u32, u32, u32, IrqAction, usize)>,
    pub maps: Vec<DmaRange>,
    pub unmaps: Vec<DmaRange>,
    pub msix_fds: Vec<Option<OwnedFd>>,
}

pub struct FakeDevice {
    pub dma: Dma,
    pub bar0: File,
    pub ctrl: [u8; CTRL_SIZE as usize],
    pub config: Vec<u8>,
    pub doorbell: File,
    pub obs: Arc<Mutex<Observed>>,
}

const MAGIC: &[u8; 4] = b"FAKE";

impl FakeDevice {
    pub fn new(dma: Dma) -> Self {
        let mut config = vec![0u8; CONFIG_SIZE as usize];
        config[0..4].copy_from_slice(&[0xf4, 0x1a, 0x42, 0x10]);
        Self {
            dma,
            bar0: memfd(BAR0_SIZE),
            ctrl: [0; CTRL_SIZE as usize],
            config,
            doorbell: eventfd(),
            obs: Arc::new(Mutex::new(Observed {
                msix_fds: (0..MSIX_COUNT).map(|_| None).collect(),
                ..Default::default()
            })),
        }
    }

    fn reg(&self, off: u64) -> u64 {
        let o = off as usize;
        u64::from_le_bytes(self.ctrl[o..o + 8].try_into().unwrap())
    }

    fn run_command(&mut self, cmd: u32) -> io::Result<()> {
        if self.obs.lock().unwrap().paused {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let iova = self.reg(CTRL_IOVA);
        let len = self.reg(CTRL_LEN).min(BAR0_SIZE) as usize;
        let mut buf = vec![0u8; len];
        match cmd {
            1 => {
                self.bar0.read_exact_at(&mut buf, 0)?;
                self.dma.write(iova, &buf)
            }
            2 => {
                self.dma.read(iova, &mut buf)?;
                self.bar0.write_all_at(&buf, 0)
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    pub fn bar0_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; BAR0_SIZE as usize];
        self.bar0.read_exact_at(&mut b, 0).unwrap();
        b
    }
}

impl Device for FakeDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: wire::DEVICE_FLAGS_PCI | wire::DEVICE_FLAGS_RESET,
            num_regions: wire::PCI_NUM_REGIONS,
            num_irqs: wire::PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo {
        let rw = wire::REGION_INFO_FLAG_READ | wire::REGION_INFO_FLAG_WRITE;
        match index {
            0 => RegionInfo {
                flags: rw | wire::REGION_INFO_FLAG_MMAP,
                size: BAR0_SIZE,
                offset: 0,
                sparse_areas: vec![SparseMmapArea {
                    offset: 0x800,
                    size: 0x800,
                }],
            },
            1 => RegionInfo {
                flags: rw,
                size: CTRL_SIZE,
                ..Default::default()
            },
            wire::PCI_CONFIG_REGION_INDEX => RegionInfo {
                flags: rw,
                size: CONFIG_SIZE,
                ..Default::default()
            },
            2 => RegionInfo {
                flags: wire::REGION_INFO_FLAG_READ,
                size: 16,
                ..Default::default()
            },
            _ => RegionInfo::default(),
        }
    }

    fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        (index == 0).then(|| self.bar0.as_fd())
    }

    fn region_io_fds(&self, index: u32) -> io::Result<Vec<IoFdArea<'_>>> {
        if index != 1 {
            return Ok(Vec::new());
        }
        let fd = self.doorbell.as_fd();
        Ok(vec![
            IoFdArea {
                offset: CTRL_DOORBELL,
                size: 4,
                kind: wire::IO_FD_TYPE_IOEVENTFD,
                flags: 0,
                data: 0,
                fd,
            },
            IoFdArea {
                offset: CTRL_DOORBELL + 4,
                size: 4,
                kind: wire::IO_FD_TYPE_IOEVENTFD,
                flags: wire::KVM_IOEVENTFD_FLAG_DATAMATCH,
                data: 7,
                fd,
            },
        ])
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        match index {
            0 => self.bar0.read_exact_at(data, offset),
            1 => {
                data.copy_from_slice(&self.ctrl[o..o + data.len()]);
                Ok(())
            }
            2 => {
                data.fill(0x5a);
                Ok(())
            }
            7 => {
                data.copy_from_slice(&self.config[o..o + data.len()]);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        match index {
            0 => self.bar0.write_all_at(data, offset),
            1 => {
                self.ctrl[o..o + data.len()].copy_from_slice(data);
                if offset == CTRL_CMD && data.len() == 4 {
                    let cmd = u32::from_le_bytes(data.try_into().unwrap());
                    let status = match self.run_command(cmd) {
                        Ok(()) => 0,
                        Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
                    };
                    let s = CTRL_STATUS as usize;
                    self.ctrl[s..s + 4].copy_from_slice(&status.to_le_bytes());
                }
                Ok(())
            }
            7 => {
                self.config[o..o + data.len()].copy_from_slice(data);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        match index {
            wire::PCI_INTX_IRQ_INDEX => IrqInfo {
                flags: wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_MASKABLE | wire::IRQ_INFO_AUTOMASKED,
                count: 1,
            },
            wire::PCI_MSIX_IRQ_INDEX => IrqInfo {
                flags: wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_NORESIZE,
                count: MSIX_COUNT,
            },
            _ => IrqInfo {
                flags: wire::IRQ_INFO_EVENTFD,
                count: 0,
            },
        }
    }

    fn set_irqs(&mut self, irqs: IrqSet) -> io::Result<()> {
        let mut obs = self.obs.lock().unwrap();
        let nfds = match &irqs.data {
            IrqData::Eventfds(f) => f.len(),
            _ => 0,
        };
        obs.irq_sets
            .push((irqs.index, irqs.start, irqs.count, irqs.action, nfds));
        if irqs.index == wire::PCI_MSIX_IRQ_INDEX {
            match irqs.data {
                IrqData::Eventfds(fds) if !fds.is_empty() => {
                    for (i, fd) in fds.into_iter().enumerate() {
                        obs.msix_fds[irqs.start as usize + i] = Some(fd);
                    }
                }
                IrqData::Eventfds(_) => {
                    for i in irqs.start..irqs.start + irqs.count {
                        obs.msix_fds[i as usize] = None;
                    }
                }
                IrqData::None if irqs.count == 0 => obs.msix_fds.iter_mut().for_each(|f| *f = None),
                IrqData::None => {
                    for i in irqs.start..irqs.start + irqs.count {
                        signal(&obs.msix_fds[i as usize]);
                    }
                }
                IrqData::Bool(b) => {
                    for (i, on) in b.iter().enumerate() {
                        if *on {
                            signal(&obs.msix_fds[irqs.start as usize + i]);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        range: DmaRange,
        _fd: Option<(std::os::fd::OwnedFd, u64)>,
    ) -> io::Result<()> {
        self.obs.lock().unwrap().maps.push(range);
        Ok(())
    }

    fn dma_unmap(&mut self, range: DmaRange) {
        self.obs.lock().unwrap().unmaps.push(range);
    }

    fn reset(&mut self) -> io::Result<()> {
        let mut obs = self.obs.lock().unwrap();
        obs.resets += 1;
        obs.paused = false;
        self.ctrl = [0; CTRL_SIZE as usize];
        self.config[4..].fill(0);
        Ok(())
    }

    fn pause(&mut self) -> io::Result<()> {
        self.obs.lock().unwrap().paused = true;
        Ok(())
    }

    fn resume(&mut self) -> io::Result<()> {
        self.obs.lock().unwrap().paused = false;
        Ok(())
    }

    fn save_state(&mut self) -> io::Result<Vec<u8>> {
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&self.bar0_bytes());
        s.extend_from_slice(&self.ctrl);
        s.extend_from_slice(&self.config);
        Ok(s)
    }

    fn restore_state(&mut self, state: &[u8]) -> io::Result<()> {
        let want = 4 + (BAR0_SIZE + CTRL_SIZE + CONFIG_SIZE) as usize;
        if state.len() != want || &state[..4] != MAGIC {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (bar0, rest) = state[4..].split_at(BAR0_SIZE as usize);
        let (ctrl, config) = rest.split_at(CTRL_SIZE as usize);
        self.bar0.write_all_at(bar0, 0)?;
        self.ctrl.copy_from_slice(ctrl);
        self.config.copy_from_slice(config);
        Ok(())
    }
}

fn signal(fd: &Option<OwnedFd>) {
    if let Some(fd) = fd {
        let mut f = File::from(fd.try_clone().unwrap());
        let _ = io::Write::write(&mut f, &1u64.to_ne_bytes());
    }
}

/// A running server: its thread returns the device, the server and the
/// result of `serve`.
pub struct Running {
    pub obs: Arc<Mutex<Observed>>,
    pub dma: Dma,
    pub thread: JoinHandle<(FakeDevice, Server, Result<(), ServerError>)>,
}

pub fn spawn_server(config: ServerConfig) -> (UnixStream, Running) {
    let dma = Dma::new();
    let device = FakeDevice::new(dma.clone());
    spawn_with(device, Server::new(dma.clone(), config), dma)
}

pub fn spawn_with(mut device: FakeDevice, mut server: Server, dma: Dma) -> (UnixStream, Running) {
    let (a, b) = UnixStream::pair().unwrap();
    let obs = device.obs.clone();
    let thread = std::thread::spawn(move || {
        let r = server.serve(b, &mut device);
        (device, server, r)
    });
    (a, Running { obs, dma, thread })
}

/// Guest memory for message DMA: a byte vector at a base address.
pub struct VecMemory {
    pub base: u64,
    pub bytes: Mutex<Vec<u8>>,
}

impl VecMemory {
    pub fn new(base: u64, size: usize) -> Arc<Self> {
        Arc::new(Self {
            base,
            bytes: Mutex::new(vec![0; size]),
        })
    }

    fn range(&self, addr: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start =
            addr.checked_sub(self.base)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))? as usize;
        let end = start + len;
        if end > self.bytes.lock().unwrap().len() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        Ok(start..end)
    }
}

impl ClientMemory for VecMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        let r = self.range(addr, data.len())?;
        self.bytes.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
}

pub fn rw(iova: u64, size: u64) -> DmaRange {
    DmaRange {
        iova,
        size,
        readable: true,
        writable: true,
    }
}

// ---- a hand-rolled peer ----

pub mod raw {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use outboard_vfio_user::wire::Header;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    pub const COMMAND: u32 = 0;
    pub const REPLY: u32 = 1;
    pub const NO_REPLY: u32 = 1 << 4;
    pub const ERROR: u32 = 1 << 5;

    /// 16 header bytes, little-endian, by hand.
    pub fn header(id: u16, cmd: u16, size: u32, flags: u32, error: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&cmd.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&error.to_le_bytes());
        b
    }

    /// A whole message with a correct size field.
    pub fn msg(id: u16, cmd: u16, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut b = header(id, cmd, 16 + body.len() as u32, flags, 0);
        b.extend_from_slice(body);
        b
    }

    pub fn u32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub fn timeouts(s: &UnixStream) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }

    pub fn send(s: &UnixStream, bytes: &[u8]) {
        (&*s).write_all(bytes).unwrap();
    }

    pub fn send_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let n = s.send_with_fds(&[bytes], fds).unwrap();
        assert_eq!(n, bytes.len());
    }

    /// Reads one message: header and body (descriptors are discarded by
    /// the kernel, i.e. closed).
    pub fn recv(s: &UnixStream) -> Option<(Header, Vec<u8>)> {
        let mut h = [0u8; 16];
        (&*s).read_exact(&mut h).ok()?;
        let h = Header::decode(&h);
        let mut body = vec![0u8; h.msg_size as usize - 16];
        (&*s).read_exact(&mut body).ok()?;
        Some((h, body))
    }

    /// Whether the peer closed the connection (EOF).
    pub fn at_eof(s: &UnixStream) -> bool {
        let mut b = [0u8; 1];
        matches!((&*s).read(&mut b), Ok(0))
    }

    pub fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array for pipe2 to fill.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 returned two new descriptors nothing else owns.
        unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    }

    /// `n` pipes; returns their read ends and the raw write ends (closed
    /// on our side once sent: call `close_ours` after sending).
    pub fn pipes(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
        (0..n).map(|_| pipe()).unzip()
    }

    /// Whether every copy of the write end of the pipe read by `r` is
    /// closed (the peer did not keep it).
    pub fn write_end_closed(r: &OwnedFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        n == 1 && pfd.revents & libc::POLLHUP != 0
    }
}
