//! The client half (the VMM side): one method per request, each reply
//! validated (message id and command echoed, body size and counts,
//! descriptors), and the server's `DMA_READ` / `DMA_WRITE` commands served
//! against [`ClientMemory`] — also while a reply is awaited, since the
//! server may need guest memory to finish the request.
//!
//! Requests are synchronous: one in flight at a time. When no request is in
//! flight the caller watches the socket ([`AsFd`]) and calls
//! [`Client::process_server_request`] when it is readable.
//!
//! A reply that cannot belong to the request in flight (wrong id or command,
//! an unframeable message) leaves the connection unusable
//! ([`ClientError::Broken`] from then on); a reply that is merely invalid
//! fails its request only.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::device::{DeviceInfo, IrqAction, IrqInfo, RegionInfo};
use crate::dma::DmaRange;
use crate::migration::MigrationState;
use crate::server::MSG_HEADROOM;
use crate::socket::{recv_message, send_message, Limits, Message, TransportError};
use crate::wire::{self, Command, Header, SubRegionIoFd};

/// Guest memory the server may reach with `DMA_READ` / `DMA_WRITE`, for the
/// windows mapped without a descriptor. Addresses are DMA addresses; the
/// client has already checked that the range lies in windows it mapped with
/// the needed permission.
pub trait ClientMemory: Send + Sync {
    /// Reads `buf.len()` bytes at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> io::Result<()>;
}

/// Limits of a [`Client`].
#[derive(Clone)]
pub struct ClientConfig {
    /// Largest data transfer the client accepts in one message.
    pub max_data_xfer_size: u32,
    /// Most descriptors the client accepts in one message.
    pub max_msg_fds: u32,
    /// Guest memory for the server's `DMA_READ` / `DMA_WRITE`.
    pub memory: Option<Arc<dyn ClientMemory>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_data_xfer_size: wire::DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 16,
            memory: None,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("max_data_xfer_size", &self.max_data_xfer_size)
            .field("max_msg_fds", &self.max_msg_fds)
            .field("memory", &self.memory.is_some())
            .finish()
    }
}

/// A failed client request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Sending or receiving failed; the connection is unusable.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The server answered with an error.
    #[error("server refused the request (errno {0})")]
    Refused(i32),
    /// The reply does not fit the request; the request failed.
    #[error("invalid reply: {0}")]
    InvalidReply(String),
    /// A reply with another message id or command arrived; the connection
    /// is unusable.
    #[error("reply id {got_id} command {got_command} does not match request id {id}")]
    WrongReply {
        /// Id of the request in flight.
        id: u16,
        /// Id received.
        got_id: u16,
        /// Command received.
        got_command: u16,
    },
    /// Version negotiation failed.
    #[error("version negotiation failed: {0}")]
    Handshake(String),
    /// The request cannot be sent as asked.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// An earlier error left the connection unusable.
    #[error("connection unusable after an earlier protocol error")]
    Broken,
}

type Result<T> = std::result::Result<T, ClientError>;

fn invalid(what: impl std::fmt::Display) -> ClientError {
    ClientError::InvalidReply(what.to_string())
}

/// The sub-regions of `DEVICE_GET_REGION_IO_FDS` and their descriptors
/// (each `fd_index` is a valid index into `fds`).
#[derive(Debug)]
pub struct RegionIoFds {
    /// The sub-regions.
    pub sub_regions: Vec<SubRegionIoFd>,
    /// The descriptors.
    pub fds: Vec<OwnedFd>,
}

/// The data of a `DEVICE_SET_IRQS` request, as the client sends it.
#[derive(Debug, Clone, Copy)]
pub enum IrqSetData<'a> {
    /// Act on the whole range.
    None,
    /// Act where `true`; one per sub-index.
    Bool(&'a [bool]),
    /// One eventfd per sub-index; empty to de-assign.
    Eventfds(&'a [BorrowedFd<'a>]),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    size: u64,
    flags: u32,
}

/// A vfio-user client connected to one device.
pub struct Client {
    stream: UnixStream,
    limits: Limits,
    config: ClientConfig,
    server: wire::Capabilities,
    minor: u16,
    next_id: u16,
    windows: BTreeMap<u64, Window>,
    broken: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Client {
    /// Connects with default limits and no guest memory for message DMA.
    pub fn connect(stream: UnixStream) -> Result<Self> {
        Self::connect_with(stream, ClientConfig::default())
    }

    /// Negotiates the version over `stream`.
    pub fn connect_with(stream: UnixStream, config: ClientConfig) -> Result<Self> {
        let limits = Limits {
            max_msg_size: (config.max_data_xfer_size as usize).saturating_add(MSG_HEADROOM),
            max_fds: config.max_msg_fds as usize,
        };
        let mut c = Self {
            stream,
            limits,
            config,
            server: wire::Capabilities::default(),
            minor: 0,
            next_id: 0,
            windows: BTreeMap::new(),
            broken: false,
        };
        let proposal = wire::Version {
            major: wire::VERSION_MAJOR,
            minor: wire::VERSION_MINOR,
            capabilities: wire::Capabilities {
                max_msg_fds: c.config.max_msg_fds,
                max_data_xfer_size: c.config.max_data_xfer_size,
                pgsizes: wire::DEFAULT_PGSIZES,
                max_dma_maps: wire::DEFAULT_MAX_DMA_MAPS,
                migration: Some(wire::MigrationCaps {
                    pgsize: wire::DEFAULT_PGSIZES,
                    max_bitmap_size: u64::from(c.config.max_data_xfer_size),
                }),
            },
            twin_socket: false,
        };
        let reply = c
            .call(Command::Version, &proposal.encode(), &[])
            .map_err(|e| match e {
                ClientError::Refused(errno) => {
                    ClientError::Handshake(format!("refused, errno {errno}"))
                }
                other => other,
            })?;
        let fail = |c: &mut Self, why: String| {
            c.broken = true;
            Err(ClientError::Handshake(why))
        };
        if !reply.fds.is_empty() {
            return fail(&mut c, "descriptors with VERSION reply".into());
        }
        let v = match wire::Version::decode(&reply.body) {
            Ok(v) => v,
            Err(e) => return fail(&mut c, e.to_string()),
        };
        if v.major != wire::VERSION_MAJOR || v.minor > wire::VERSION_MINOR {
            return fail(&mut c, format!("server version {}.{}", v.major, v.minor));
        }
        if v.twin_socket {
            return fail(&mut c, "twin-socket mode was not proposed".into());
        }
        if v.capabilities.max_data_xfer_size == 0 {
            return fail(&mut c, "server max_data_xfer_size 0".into());
        }
        c.server = v.capabilities;
        c.minor = v.minor;
        Ok(c)
    }

    /// The server's capabilities.
    pub fn server_capabilities(&self) -> &wire::Capabilities {
        &self.server
    }

    /// The negotiated minor version.
    pub fn minor_version(&self) -> u16 {
        self.minor
    }

    fn xfer_limit(&self) -> usize {
        self.server
            .max_data_xfer_size
            .min(self.config.max_data_xfer_size)
            .max(1) as usize
    }

    // ---- the exchange ----

    fn call(&mut self, command: Command, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Message> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        if fds.len() > self.server.max_msg_fds as usize {
            return Err(ClientError::InvalidArgument(
                "more descriptors than the server accepts",
            ));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let h = Header::command(id, command, body.len())
            .ok_or(ClientError::InvalidArgument("message too large"))?;
        if let Err(e) = send_message(&self.stream, &h, body, fds) {
            self.broken = true;
            return Err(e.into());
        }
        loop {
            let m = match recv_message(&self.stream, self.limits) {
                Ok(m) => m,
                Err(TransportError::TooManyFds { header, .. }) if header.is_command() => {
                    self.reply_error(&header, libc::EINVAL)?;
                    continue;
                }
                Err(TransportError::TooManyFds { header, .. })
                    if header.msg_id == id && header.command == command as u16 =>
                {
                    return Err(invalid("too many descriptors"));
                }
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            };
            if m.header.is_command() {
                self.serve(m)?;
                continue;
            }
            if !m.header.is_reply() || m.header.msg_id != id || m.header.command != command as u16 {
                self.broken = true;
                return Err(ClientError::WrongReply {
                    id,
                    got_id: m.header.msg_id,
                    got_command: m.header.command,
                });
            }
            if m.header.is_error() {
                let errno = i32::try_from(m.header.error).unwrap_or(libc::EIO);
                return Err(ClientError::Refused(if errno == 0 {
                    libc::EIO
                } else {
                    errno
                }));
            }
            return Ok(m);
        }
    }

    /// A request whose reply carries no body and no descriptor.
    fn call_empty(&mut self, command: Command, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let r = self.call(command, body, fds)?;
        expect_no_fds(&r)?;
        if !r.body.is_empty() {
            return Err(invalid("unexpected reply body"));
        }
        Ok(())
    }

    fn reply_error(&mut self, h: &Header, errno: i32) -> Result<()> {
        if h.no_reply() {
            return Ok(());
        }
        if let Err(e) = send_message(&self.stream, &Header::error_reply(h, errno), &[], &[]) {
            self.broken = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Waits for one message from the server and serves it (a `DMA_READ` or
    /// `DMA_WRITE`). Call when the socket is readable and no request is in
    /// flight.
    pub fn process_server_request(&mut self) -> Result<()> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        match recv_message(&self.stream, self.limits) {
            Ok(m) if m.header.is_command() => self.serve(m),
            Ok(m) => {
                log::warn!(
                    "vfio-user: ignoring unsolicited message id {} command {}",
                    m.header.msg_id,
                    m.header.command
                );
                Ok(())
            }
            Err(TransportError::TooManyFds { header, .. }) => {
                if header.is_command() {
                    self.reply_error(&header, libc::EINVAL)?;
                }
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }

    fn serve(&mut self, m: Message) -> Result<()> {
        let result = if m.fds.is_empty() {
            match m.header.known_command() {
                Some(Command::DmaRead) => self.serve_dma_read(&m.body),
                Some(Command::DmaWrite) => self.serve_dma_write(&m.body),
                _ => Err(libc::EINVAL),
            }
        } else {
            Err(libc::EINVAL)
        };
        match result {
            Ok(body) if !m.header.no_reply() => {
                let h = Header::reply(&m.header, body.len())
                    .ok_or(ClientError::InvalidArgument("reply too large"))?;
                if let Err(e) = send_message(&self.stream, &h, &body, &[]) {
                    self.broken = true;
                    return Err(e.into());
                }
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(errno) => self.reply_error(&m.header, errno),
        }
    }

    /// Checks that `[addr, addr + len)` lies in mapped windows with `flag`.
    fn check_window(&self, addr: u64, len: u64, flag: u32) -> std::result::Result<(), i32> {
        let end = addr.checked_add(len).ok_or(libc::EFAULT)?;
        let mut at = addr;
        while at < end {
            let (start, w) = self.windows.range(..=at).next_back().ok_or(libc::EFAULT)?;
            let w_end = start.saturating_add(w.size);
            if at >= w_end {
                return Err(libc::EFAULT);
            }
            if w.flags & flag == 0 {
                return Err(libc::EACCES);
            }
            at = w_end;
        }
        Ok(())
    }

    fn serve_dma_read(&mut self, body: &[u8]) -> std::result::Result<Vec<u8>, i32> {
        let a = wire::DmaAccess::decode(body).map_err(|_| libc::EINVAL)?;
        if a.count > u64::from(self.config.max_data_xfer_size) {
            return Err(libc::EINVAL);
        }
        self.check_window(a.address, a.count, wire::DMA_FLAG_READ)?;
        let memory = self.config.memory.as_ref().ok_or(libc::EFAULT)?;
        let mut data = vec![0u8; a.count as usize];
        memory
            .read(a.address, &mut data)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        Ok(a.encode(&data))
    }

    fn serve_dma_write(&mut self, body: &[u8]) -> std::result::Result<Vec<u8>, i32> {
        let (a, data) = wire::DmaAccess::decode_with_data(body).map_err(|_| libc::EINVAL)?;
        if a.count > u64::from(self.config.max_data_xfer_size) {
            return Err(libc::EINVAL);
        }
        self.check_window(a.address, a.count, wire::DMA_FLAG_WRITE)?;
        let memory = self.config.memory.as_ref().ok_or(libc::EFAULT)?;
        memory
            .write(a.address, data)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        Ok(a.encode(&[]))
    }

    // ---- requests ----

    /// `DEVICE_GET_INFO`.
    pub fn device_info(&mut self) -> Result<DeviceInfo> {
        let req = wire::DeviceInfo {
            argsz: wire::DeviceInfo::SIZE as u32,
            ..Default::default()
        };
        let r = self.call(Command::DeviceGetInfo, &req.encode(), &[])?;
        expect_no_fds(&r)?;
        let i = wire::DeviceInfo::decode(&r.body).map_err(invalid)?;
        Ok(DeviceInfo {
            flags: i.flags,
            num_regions: i.num_regions,
            num_irqs: i.num_irqs,
        })
    }

    /// `DEVICE_GET_REGION_INFO`, asking again with a larger `argsz` if the
    /// capabilities did not fit. Returns the descriptor to map when the
    /// region has `REGION_INFO_FLAG_MMAP`.
    pub fn region_info(&mut self, index: u32) -> Result<(RegionInfo, Option<OwnedFd>)> {
        let mut argsz = 256u32;
        for _ in 0..2 {
            let req = wire::RegionInfo {
                argsz,
                index,
                ..Default::default()
            };
            let mut r = self.call(Command::DeviceGetRegionInfo, &req.encode(), &[])?;
            let reply = wire::RegionInfoReply::decode(&r.body).map_err(invalid)?;
            let info = reply.info;
            if info.index != index {
                return Err(invalid("region index differs"));
            }
            let mmap = info.flags & wire::REGION_INFO_FLAG_MMAP != 0;
            if r.fds.len() != usize::from(mmap) {
                return Err(invalid("descriptor count does not match the MMAP flag"));
            }
            if info.argsz > argsz {
                if info.argsz as usize > self.limits.max_msg_size {
                    return Err(invalid("region info too large"));
                }
                argsz = info.argsz;
                continue;
            }
            for a in &reply.sparse_areas {
                if a.offset.checked_add(a.size).is_none_or(|e| e > info.size) {
                    return Err(invalid("sparse area outside the region"));
                }
            }
            return Ok((
                RegionInfo {
                    flags: info.flags,
                    size: info.size,
                    offset: info.offset,
                    sparse_areas: reply.sparse_areas,
                },
                r.fds.pop(),
            ));
        }
        Err(invalid("region info size keeps growing"))
    }

    /// `DEVICE_GET_REGION_IO_FDS`.
    pub fn region_io_fds(&mut self, index: u32) -> Result<RegionIoFds> {
        let mut argsz = (wire::RegionIoFds::SIZE + 8 * wire::SubRegionIoFd::SIZE) as u32;
        for _ in 0..2 {
            let req = wire::RegionIoFds {
                argsz,
                flags: 0,
                index,
                count: 0,
            };
            let r = self.call(Command::DeviceGetRegionIoFds, &req.encode(), &[])?;
            let reply = wire::RegionIoFdsReply::decode(&r.body).map_err(invalid)?;
            if reply.head.index != index || reply.head.flags != 0 {
                return Err(invalid("region io fds header"));
            }
            if reply.head.argsz > argsz {
                if !r.fds.is_empty() {
                    return Err(invalid("descriptors with a truncated reply"));
                }
                if reply.head.argsz as usize > self.limits.max_msg_size {
                    return Err(invalid("region io fds too large"));
                }
                argsz = reply.head.argsz;
                continue;
            }
            if reply.sub_regions.len() != reply.head.count as usize
                || (reply.head.count > 0 && r.fds.is_empty())
            {
                return Err(invalid("sub-region or descriptor count"));
            }
            if reply
                .sub_regions
                .iter()
                .any(|s| s.fd_index as usize >= r.fds.len())
            {
                return Err(invalid("fd_index out of range"));
            }
            return Ok(RegionIoFds {
                sub_regions: reply.sub_regions,
                fds: r.fds,
            });
        }
        Err(invalid("region io fds size keeps growing"))
    }

    /// `DEVICE_GET_IRQ_INFO`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo> {
        let req = wire::IrqInfo {
            argsz: wire::IrqInfo::SIZE as u32,
            index,
            ..Default::default()
        };
        let r = self.call(Command::DeviceGetIrqInfo, &req.encode(), &[])?;
        expect_no_fds(&r)?;
        let i = wire::IrqInfo::decode(&r.body).map_err(invalid)?;
        if i.index != index {
            return Err(invalid("irq index differs"));
        }
        Ok(IrqInfo {
            flags: i.flags,
            count: i.count,
        })
    }

    /// `DEVICE_SET_IRQS`.
    pub fn set_irqs(
        &mut self,
        index: u32,
        start: u32,
        count: u32,
        action: IrqAction,
        data: IrqSetData<'_>,
    ) -> Result<()> {
        let action = match action {
            IrqAction::Mask => wire::IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => wire::IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => wire::IRQ_SET_ACTION_TRIGGER,
        };
        let (flags, bools, fds): (u32, Vec<u8>, &[BorrowedFd<'_>]) = match data {
            IrqSetData::None => (wire::IRQ_SET_DATA_NONE, Vec::new(), &[]),
            IrqSetData::Bool(b) => {
                if b.len() != count as usize {
                    return Err(ClientError::InvalidArgument("one bool per sub-index"));
                }
                (
                    wire::IRQ_SET_DATA_BOOL,
                    b.iter().map(|&b| u8::from(b)).collect(),
                    &[],
                )
            }
            IrqSetData::Eventfds(f) => {
                if !f.is_empty() && f.len() != count as usize {
                    return Err(ClientError::InvalidArgument("one eventfd per sub-index"));
                }
                (wire::IRQ_SET_DATA_EVENTFD, Vec::new(), f)
            }
        };
        let req = wire::IrqSet {
            argsz: 0,
            flags: flags | action,
            index,
            start,
            count,
            data: bools,
        };
        self.call_empty(Command::DeviceSetIrqs, &req.encode(), fds)
    }

    /// `REGION_READ`, split into transfers both sides accept.
    pub fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let limit = self.xfer_limit();
        let mut at = offset;
        for chunk in buf.chunks_mut(limit) {
            let req = wire::RegionAccess {
                offset: at,
                region: index,
                count: chunk.len() as u32,
            };
            let r = self.call(Command::RegionRead, &req.encode(&[]), &[])?;
            expect_no_fds(&r)?;
            let (got, data) = wire::RegionAccess::decode_with_data(&r.body).map_err(invalid)?;
            if got != req {
                return Err(invalid("region read reply does not match"));
            }
            chunk.copy_from_slice(data);
            at = at
                .checked_add(chunk.len() as u64)
                .ok_or(ClientError::InvalidArgument("offset overflow"))?;
        }
        Ok(())
    }

    /// `REGION_WRITE`, split into transfers both sides accept.
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let limit = self.xfer_limit();
        let mut at = offset;
        for chunk in data.chunks(limit) {
            let req = wire::RegionAccess {
                offset: at,
                region: index,
                count: chunk.len() as u32,
            };
            let r = self.call(Command::RegionWrite, &req.encode(chunk), &[])?;
            expect_no_fds(&r)?;
            let got = wire::RegionAccess::decode(&r.body).map_err(invalid)?;
            if got != req {
                return Err(invalid("region write reply does not match"));
            }
            at = at
                .checked_add(chunk.len() as u64)
                .ok_or(ClientError::InvalidArgument("offset overflow"))?;
        }
        Ok(())
    }

    /// `DMA_MAP`: with `fd` (descriptor, file offset) the server maps the
    /// window; without, it uses `DMA_READ` / `DMA_WRITE`, served from
    /// [`ClientConfig::memory`].
    pub fn dma_map(&mut self, range: DmaRange, fd: Option<(BorrowedFd<'_>, u64)>) -> Result<()> {
        let end = range
            .iova
            .checked_add(range.size)
            .ok_or(ClientError::InvalidArgument("window overflows"))?;
        if range.size == 0 {
            return Err(ClientError::InvalidArgument("empty window"));
        }
        if self
            .windows
            .range(..end)
            .next_back()
            .is_some_and(|(s, w)| s.saturating_add(w.size) > range.iova)
        {
            return Err(ClientError::InvalidArgument("window overlaps a mapped one"));
        }
        let mut flags = 0;
        if range.readable {
            flags |= wire::DMA_FLAG_READ;
        }
        if range.writable {
            flags |= wire::DMA_FLAG_WRITE;
        }
        let req = wire::DmaMap {
            argsz: wire::DmaMap::SIZE as u32,
            flags,
            offset: fd.map_or(0, |(_, o)| o),
            address: range.iova,
            size: range.size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().map(|(f, _)| f).collect();
        self.call_empty(Command::DmaMap, &req.encode(), &fds)?;
        self.windows.insert(
            range.iova,
            Window {
                size: range.size,
                flags,
            },
        );
        Ok(())
    }

    /// `DMA_UNMAP` of a window mapped before.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.unmap(0, iova, size)?;
        self.windows.remove(&iova);
        Ok(())
    }

    /// `DMA_UNMAP` of every window (`VFIO_DMA_UNMAP_FLAG_ALL`).
    pub fn dma_unmap_all(&mut self) -> Result<()> {
        self.unmap(wire::DMA_UNMAP_FLAG_ALL, 0, 0)?;
        self.windows.clear();
        Ok(())
    }

    fn unmap(&mut self, flags: u32, iova: u64, size: u64) -> Result<()> {
        let req = wire::DmaUnmap {
            argsz: wire::DmaUnmap::SIZE as u32,
            flags,
            address: iova,
            size,
        };
        let r = self.call(Command::DmaUnmap, &req.encode(), &[])?;
        expect_no_fds(&r)?;
        let got = wire::DmaUnmap::decode(&r.body).map_err(invalid)?;
        if got.address != iova || got.size != size {
            return Err(invalid("unmap reply does not match"));
        }
        Ok(())
    }

    /// `DEVICE_RESET`.
    pub fn reset(&mut self) -> Result<()> {
        self.call_empty(Command::DeviceReset, &[], &[])
    }

    /// A raw `DEVICE_FEATURE` request: `flags` (feature index and
    /// GET/SET/PROBE) and `data`; `reply_max` is the largest reply data
    /// accepted. Returns the reply's data.
    pub fn device_feature(&mut self, flags: u32, data: &[u8], reply_max: usize) -> Result<Vec<u8>> {
        let argsz = wire::DeviceFeature::SIZE
            .checked_add(reply_max.max(data.len()))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(ClientError::InvalidArgument("reply size"))?;
        let req = wire::DeviceFeature { argsz, flags };
        let r = self.call(Command::DeviceFeature, &req.encode(data), &[])?;
        expect_no_fds(&r)?;
        let (got, reply) = wire::DeviceFeature::decode(&r.body).map_err(invalid)?;
        if got.flags != flags {
            return Err(invalid("feature reply flags differ"));
        }
        if flags & wire::DEVICE_FEATURE_GET != 0 && got.argsz as usize != r.body.len() {
            return Err(invalid("feature reply argsz"));
        }
        if reply.len() > reply_max {
            return Err(invalid("feature reply too long"));
        }
        Ok(reply.to_vec())
    }

    fn feature_flags(feature: u16, op: u32) -> u32 {
        u32::from(feature) | op
    }

    /// Whether the server supports `feature` with the `DEVICE_FEATURE_GET`
    /// / `_SET` bits in `ops` (`DEVICE_FEATURE_PROBE`).
    pub fn probe_feature(&mut self, feature: u16, ops: u32) -> Result<bool> {
        let flags = Self::feature_flags(feature, wire::DEVICE_FEATURE_PROBE | ops);
        match self.device_feature(flags, &[], 0) {
            Ok(_) => Ok(true),
            Err(ClientError::Refused(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `FEATURE_MIGRATION` GET: the `MIGRATION_*` flags.
    pub fn migration_flags(&mut self) -> Result<u64> {
        let flags = Self::feature_flags(wire::FEATURE_MIGRATION, wire::DEVICE_FEATURE_GET);
        let d = self.device_feature(flags, &[], wire::MigrationFeature::SIZE)?;
        Ok(wire::MigrationFeature::decode(&d).map_err(invalid)?.flags)
    }

    /// `FEATURE_MIG_DEVICE_STATE` GET.
    pub fn migration_state(&mut self) -> Result<MigrationState> {
        let flags = Self::feature_flags(wire::FEATURE_MIG_DEVICE_STATE, wire::DEVICE_FEATURE_GET);
        let d = self.device_feature(flags, &[], wire::MigStateFeature::SIZE)?;
        let s = wire::MigStateFeature::decode(&d).map_err(invalid)?;
        MigrationState::try_from(s.device_state).map_err(|v| invalid(format!("state {v}")))
    }

    /// `FEATURE_MIG_DEVICE_STATE` SET: moves the device to `state`.
    pub fn set_migration_state(&mut self, state: MigrationState) -> Result<()> {
        let flags = Self::feature_flags(wire::FEATURE_MIG_DEVICE_STATE, wire::DEVICE_FEATURE_SET);
        let s = wire::MigStateFeature {
            device_state: state as u32,
            data_fd: u32::MAX,
        };
        let d = self.device_feature(flags, &s.encode(), wire::MigStateFeature::SIZE)?;
        let got = wire::MigStateFeature::decode(&d).map_err(invalid)?;
        if got.device_state != state as u32 {
            return Err(invalid("state in reply differs"));
        }
        Ok(())
    }

    /// One `MIG_DATA_READ` of at most `max` bytes (fewer: end of data).
    pub fn mig_data_read(&mut self, max: u32) -> Result<Vec<u8>> {
        if max as usize > self.xfer_limit() {
            return Err(ClientError::InvalidArgument(
                "larger than max_data_xfer_size",
            ));
        }
        let req = wire::MigData {
            argsz: (wire::MigData::SIZE as u32).saturating_add(max),
            size: max,
        };
        let r = self.call(Command::MigDataRead, &req.encode(&[]), &[])?;
        expect_no_fds(&r)?;
        let (got, data) = wire::MigData::decode_with_data(&r.body).map_err(invalid)?;
        if got.size > max || got.argsz as usize != r.body.len() {
            return Err(invalid("migration data reply"));
        }
        Ok(data.to_vec())
    }

    /// Reads the whole migration stream of the current saving state (until
    /// a short read), refusing more than `limit` bytes.
    pub fn read_migration_data(&mut self, limit: usize) -> Result<Vec<u8>> {
        let chunk = self.xfer_limit() as u32;
        let mut out = Vec::new();
        loop {
            let d = self.mig_data_read(chunk)?;
            let n = d.len();
            if out.len().saturating_add(n) > limit {
                return Err(invalid("migration data exceeds the limit"));
            }
            out.extend_from_slice(&d);
            if n < chunk as usize {
                return Ok(out);
            }
        }
    }

    /// `MIG_DATA_WRITE` of `data`, split into transfers both sides accept.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(self.xfer_limit()) {
            let req = wire::MigData {
                argsz: wire::MigData::SIZE as u32,
                size: chunk.len() as u32,
            };
            self.call_empty(Command::MigDataWrite, &req.encode(chunk), &[])?;
        }
        Ok(())
    }

    /// `FEATURE_DMA_LOGGING_START`; returns the page size the server chose.
    pub fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[wire::DmaLoggingRange],
    ) -> Result<u64> {
        let c = wire::DmaLoggingControl {
            page_size,
            ranges: ranges.to_vec(),
        };
        let body = c.encode();
        let flags = Self::feature_flags(wire::FEATURE_DMA_LOGGING_START, wire::DEVICE_FEATURE_SET);
        let d = self.device_feature(flags, &body, body.len())?;
        let got = wire::DmaLoggingControl::decode(&d).map_err(invalid)?;
        if got.ranges != c.ranges || !got.page_size.is_power_of_two() {
            return Err(invalid("logging start reply"));
        }
        Ok(got.page_size)
    }

    /// `FEATURE_DMA_LOGGING_STOP`.
    pub fn dma_logging_stop(&mut self) -> Result<()> {
        let flags = Self::feature_flags(wire::FEATURE_DMA_LOGGING_STOP, wire::DEVICE_FEATURE_SET);
        self.device_feature(flags, &[], 0).map(|_| ())
    }

    /// `FEATURE_DMA_LOGGING_REPORT` of `[iova, iova + length)`: the dirty
    /// bitmap, one bit per `page_size`, read (and cleared) in as many
    /// requests as the server's bitmap limit needs.
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>> {
        if !page_size.is_power_of_two() || length == 0 || iova.checked_add(length).is_none() {
            return Err(ClientError::InvalidArgument("report range"));
        }
        let max_bitmap = self
            .server
            .migration
            .map_or(self.server.max_data_xfer_size as u64, |m| m.max_bitmap_size)
            .min(self.config.max_data_xfer_size as u64);
        let words_per_request = (max_bitmap / 8).max(1);
        let chunk_len = words_per_request
            .saturating_mul(64)
            .saturating_mul(page_size);
        let flags = Self::feature_flags(wire::FEATURE_DMA_LOGGING_REPORT, wire::DEVICE_FEATURE_GET);
        let mut bitmap = Vec::new();
        let mut at = iova;
        let end = iova + length;
        while at < end {
            let len = (end - at).min(chunk_len);
            let req = wire::DmaLoggingReport {
                iova: at,
                length: len,
                page_size,
            };
            let words = req
                .bitmap_size()
                .ok_or(ClientError::InvalidArgument("report range"))?;
            let d = self.device_feature(
                flags,
                &req.encode(&[]),
                wire::DmaLoggingReport::SIZE + words,
            )?;
            let (got, bits) = wire::DmaLoggingReport::decode_with_bitmap(&d).map_err(invalid)?;
            if got != req || bits.len() * 8 != words {
                return Err(invalid("logging report reply"));
            }
            bitmap.extend_from_slice(&bits);
            at += len;
        }
        Ok(bitmap)
    }
}

fn expect_no_fds(m: &Message) -> Result<()> {
    if m.fds.is_empty() {
        Ok(())
    } else {
        Err(invalid("unexpected descriptors"))
    }
}
