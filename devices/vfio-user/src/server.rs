//! The server half: one connected client at a time, requests validated and
//! dispatched to a [`Device`].
//!
//! ```text
//! client                         Server                         Device
//!   | -- VERSION ------------------> |  negotiate (major 0, minor <= 1)
//!   | <-------------------- VERSION  |
//!   | -- REGION_WRITE -------------> |  validate --> region_write()
//!   |                                |                  | dma.read()
//!   | <------------------- DMA_READ  |  <---------------+ (no fd mapped)
//!   | -- DMA_READ reply -----------> |  ---------------->
//!   | <---------------- REGION_WRITE |
//! ```
//!
//! A request that fails validation gets an error reply (`EINVAL`, or the
//! errno the spec names) and the server carries on. A message whose framing
//! is broken (size field below 16 or above the limit, connection closed
//! mid-message, a first message that is not a valid `VERSION`) ends the
//! connection: [`Server::serve`] returns an error. On disconnect every DMA
//! window is removed and every IRQ type disabled; the device keeps its
//! state, and the migration state machine survives for the next
//! connection.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::device::{Device, IrqAction, IrqData, IrqSet};
use crate::dma::{Dma, Errno};
use crate::endpoint::{Endpoint, Incoming};
use crate::migration::{transition_path, MigrationState};
use crate::socket::{Limits, Message, TransportError};
use crate::wire::{self, Command, Header};

/// Limits and options of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest data transfer the server accepts in one message (its
    /// `max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// Most descriptors the server accepts in one message.
    pub max_msg_fds: u32,
    /// Most DMA windows at once.
    pub max_dma_maps: u32,
    /// Largest migration blob accepted by `MIG_DATA_WRITE`.
    pub max_state_size: usize,
    /// Whether the `PRE_COPY` state is offered (the device has no pre-copy
    /// data; the state lets the client run DMA logging while the device
    /// runs).
    pub pre_copy: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_data_xfer_size: wire::DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 16,
            max_dma_maps: wire::DEFAULT_MAX_DMA_MAPS,
            max_state_size: 64 << 20,
            pre_copy: true,
        }
    }
}

/// Room for fixed parts, capability chains and logging ranges on top of the
/// data transfer size.
pub(crate) const MSG_HEADROOM: usize = 64 << 10;

/// Why [`Server::serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Receiving or sending failed, or the framing was broken.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The client's first message was not an acceptable `VERSION`.
    #[error("version negotiation failed: {0}")]
    Handshake(String),
}

/// A vfio-user server for one device, serving one connection at a time.
#[derive(Debug)]
pub struct Server {
    dma: Dma,
    config: ServerConfig,
    state: MigrationState,
    /// Saving session: the blob and how much was read.
    outgoing: Option<(Vec<u8>, usize)>,
    /// Resuming session: what was written so far.
    incoming: Option<Vec<u8>>,
}

struct Reply {
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Reply {
    fn empty() -> Self {
        Self::body(Vec::new())
    }
    fn body(body: Vec<u8>) -> Self {
        Self {
            body,
            fds: Vec::new(),
        }
    }
}

type Handled = Result<Reply, Errno>;

fn io_errno(e: io::Error) -> Errno {
    Errno(e.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::EIO))
}

fn einval<T>() -> Result<T, Errno> {
    Err(Errno(libc::EINVAL))
}

fn no_fds(m: &Message) -> Result<(), Errno> {
    if m.fds.is_empty() {
        Ok(())
    } else {
        einval()
    }
}

impl Server {
    /// A server whose device reaches client memory through `dma`.
    pub fn new(dma: Dma, config: ServerConfig) -> Self {
        Self {
            dma,
            config,
            state: MigrationState::Running,
            outgoing: None,
            incoming: None,
        }
    }

    /// The current migration state.
    pub fn migration_state(&self) -> MigrationState {
        self.state
    }

    /// Serves one connected client until it disconnects (`Ok`) or breaks
    /// the protocol's framing (`Err`).
    pub fn serve<D: Device + ?Sized>(
        &mut self,
        stream: UnixStream,
        device: &mut D,
    ) -> Result<(), ServerError> {
        let limits = Limits {
            max_msg_size: (self.config.max_data_xfer_size as usize).saturating_add(MSG_HEADROOM),
            max_fds: self.config.max_msg_fds as usize,
        };
        let ep = Arc::new(Endpoint::new(stream, limits));
        let result = self.handshake(&ep).and_then(|client| {
            self.dma.attach(ep.clone(), client.max_data_xfer_size);
            self.request_loop(&ep, device, &client)
        });
        self.disconnect(device);
        ep.shutdown();
        result
    }

    fn handshake(&mut self, ep: &Endpoint) -> Result<wire::Capabilities, ServerError> {
        let m = match ep.next_incoming()? {
            Incoming::Message(m) => m,
            Incoming::TooManyFds(h) => {
                let _ = ep.send(&Header::error_reply(&h, libc::EINVAL), &[], &[]);
                return Err(ServerError::Handshake("descriptors with VERSION".into()));
            }
        };
        let refuse = |why: String| {
            if m.header.is_command() {
                let _ = ep.send(&Header::error_reply(&m.header, libc::EINVAL), &[], &[]);
            }
            Err(ServerError::Handshake(why))
        };
        if !m.header.is_command() || m.header.known_command() != Some(Command::Version) {
            return refuse(format!("first message is command {}", m.header.command));
        }
        if !m.fds.is_empty() {
            return refuse("descriptors with VERSION".into());
        }
        let v = match wire::Version::decode(&m.body) {
            Ok(v) => v,
            Err(e) => return refuse(e.to_string()),
        };
        if v.major != wire::VERSION_MAJOR {
            // The spec: close the connection if the version is unsupported.
            return Err(ServerError::Handshake(format!(
                "unsupported major version {}",
                v.major
            )));
        }
        let client = v.capabilities;
        if client.max_data_xfer_size == 0 {
            return refuse("max_data_xfer_size 0".into());
        }
        let reply = wire::Version {
            major: wire::VERSION_MAJOR,
            minor: v.minor.min(wire::VERSION_MINOR),
            capabilities: wire::Capabilities {
                max_msg_fds: self.config.max_msg_fds,
                max_data_xfer_size: self.config.max_data_xfer_size,
                pgsizes: crate::dma::DMA_PAGE_SIZE,
                max_dma_maps: self.config.max_dma_maps,
                migration: client.migration.map(|_| wire::MigrationCaps {
                    pgsize: crate::dma::DMA_PAGE_SIZE,
                    max_bitmap_size: u64::from(self.config.max_data_xfer_size),
                }),
            },
            twin_socket: false,
        };
        let body = reply.encode();
        let h = Header::reply(&m.header, body.len()).ok_or(TransportError::Oversized)?;
        ep.send(&h, &body, &[])?;
        Ok(client)
    }

    fn request_loop<D: Device + ?Sized>(
        &mut self,
        ep: &Endpoint,
        device: &mut D,
        client: &wire::Capabilities,
    ) -> Result<(), ServerError> {
        loop {
            let m = match ep.next_incoming() {
                Ok(Incoming::Message(m)) => m,
                Ok(Incoming::TooManyFds(h)) => {
                    log::warn!("vfio-user: command {} with too many fds", h.command);
                    if h.is_command() && !h.no_reply() {
                        ep.send(&Header::error_reply(&h, libc::EINVAL), &[], &[])?;
                    }
                    continue;
                }
                Err(TransportError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if !m.header.is_command() {
                log::warn!(
                    "vfio-user: ignoring message type {} (command {})",
                    m.header.message_type(),
                    m.header.command
                );
                continue;
            }
            let header = m.header;
            let result = self.handle(device, m);
            if header.no_reply() {
                continue;
            }
            match result {
                Ok(reply) => {
                    if reply.fds.len() > client.max_msg_fds as usize {
                        ep.send(&Header::error_reply(&header, libc::E2BIG), &[], &[])?;
                        continue;
                    }
                    let h = Header::reply(&header, reply.body.len())
                        .ok_or(TransportError::Oversized)?;
                    let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|f| f.as_fd()).collect();
                    ep.send(&h, &reply.body, &fds)?;
                }
                Err(Errno(e)) => {
                    log::debug!("vfio-user: command {} failed: errno {e}", header.command);
                    ep.send(&Header::error_reply(&header, e), &[], &[])?;
                }
            }
        }
    }

    fn disconnect<D: Device + ?Sized>(&mut self, device: &mut D) {
        self.dma.detach();
        self.dma.log_stop();
        for range in self.dma.unmap_all() {
            device.dma_unmap(range);
        }
        let num_irqs = device.device_info().num_irqs;
        for index in 0..num_irqs {
            let _ = device.set_irqs(IrqSet {
                index,
                start: 0,
                count: 0,
                action: IrqAction::Trigger,
                data: IrqData::None,
            });
        }
        self.outgoing = None;
        self.incoming = None;
    }

    fn handle<D: Device + ?Sized>(&mut self, device: &mut D, m: Message) -> Handled {
        let Some(command) = m.header.known_command() else {
            return Err(Errno(libc::ENOTSUP));
        };
        match command {
            Command::DmaMap => self.dma_map(device, m),
            Command::DmaUnmap => {
                no_fds(&m)?;
                self.dma_unmap(device, &m.body)
            }
            Command::DeviceGetInfo => {
                no_fds(&m)?;
                wire::DeviceInfo::decode(&m.body).map_err(|_| Errno(libc::EINVAL))?;
                let i = device.device_info();
                Ok(Reply::body(
                    wire::DeviceInfo {
                        argsz: wire::DeviceInfo::SIZE as u32,
                        flags: i.flags,
                        num_regions: i.num_regions,
                        num_irqs: i.num_irqs,
                    }
                    .encode(),
                ))
            }
            Command::DeviceGetRegionInfo => {
                no_fds(&m)?;
                self.region_info(device, &m.body)
            }
            Command::DeviceGetRegionIoFds => {
                no_fds(&m)?;
                self.region_io_fds(device, &m.body)
            }
            Command::DeviceGetIrqInfo => {
                no_fds(&m)?;
                let req = wire::IrqInfo::decode(&m.body).map_err(|_| Errno(libc::EINVAL))?;
                if req.index >= device.device_info().num_irqs {
                    return einval();
                }
                let i = device.irq_info(req.index);
                Ok(Reply::body(
                    wire::IrqInfo {
                        argsz: wire::IrqInfo::SIZE as u32,
                        flags: i.flags,
                        index: req.index,
                        count: i.count,
                    }
                    .encode(),
                ))
            }
            Command::DeviceSetIrqs => self.set_irqs(device, m),
            Command::RegionRead => {
                no_fds(&m)?;
                let a = wire::RegionAccess::decode(&m.body).map_err(|_| Errno(libc::EINVAL))?;
                self.check_region_access(device, &a, false)?;
                let mut data = vec![0u8; a.count as usize];
                if a.count != 0 {
                    device
                        .region_read(a.region, a.offset, &mut data)
                        .map_err(io_errno)?;
                }
                Ok(Reply::body(a.encode(&data)))
            }
            Command::RegionWrite => {
                no_fds(&m)?;
                let (a, data) = wire::RegionAccess::decode_with_data(&m.body)
                    .map_err(|_| Errno(libc::EINVAL))?;
                self.check_region_access(device, &a, true)?;
                if a.count != 0 {
                    device
                        .region_write(a.region, a.offset, data)
                        .map_err(io_errno)?;
                }
                Ok(Reply::body(a.encode(&[])))
            }
            Command::DeviceReset => {
                no_fds(&m)?;
                if !m.body.is_empty() {
                    return einval();
                }
                if device.device_info().flags & wire::DEVICE_FLAGS_RESET == 0 {
                    return Err(Errno(libc::ENOTSUP));
                }
                self.reset(device)?;
                Ok(Reply::empty())
            }
            Command::DeviceFeature => {
                no_fds(&m)?;
                self.device_feature(device, &m.body)
            }
            Command::MigDataRead => {
                no_fds(&m)?;
                self.mig_data_read(&m.body)
            }
            Command::MigDataWrite => {
                no_fds(&m)?;
                self.mig_data_write(&m.body)
            }
            // Server-to-client commands, and a second VERSION.
            Command::Version | Command::DmaRead | Command::DmaWrite => einval(),
            // Not offered (`write_multiple` is never granted).
            Command::RegionWriteMulti => Err(Errno(libc::ENOTSUP)),
        }
    }

    fn dma_map<D: Device + ?Sized>(&mut self, device: &mut D, mut m: Message) -> Handled {
        if m.fds.len() > 1 {
            return einval();
        }
        let req = wire::DmaMap::decode(&m.body).map_err(|_| Errno(libc::EINVAL))?;
        let fd = m.fds.pop().map(|fd| (fd, req.offset));
        if fd.is_none() && req.offset != 0 {
            return einval();
        }
        let device_fd = match &fd {
            Some((f, off)) => Some((f.try_clone().map_err(|_| Errno(libc::EMFILE))?, *off)),
            None => None,
        };
        let range = self.dma.map(
            req.address,
            req.size,
            req.flags,
            fd,
            self.config.max_dma_maps as usize,
        )?;
        if let Err(e) = device.dma_map(range, device_fd) {
            let _ = self.dma.unmap(range.iova, range.size);
            return Err(io_errno(e));
        }
        Ok(Reply::empty())
    }

    fn dma_unmap<D: Device + ?Sized>(&mut self, device: &mut D, body: &[u8]) -> Handled {
        let req = wire::DmaUnmap::decode(body).map_err(|_| Errno(libc::EINVAL))?;
        match req.flags {
            0 => {
                let range = self.dma.unmap(req.address, req.size)?;
                device.dma_unmap(range);
            }
            wire::DMA_UNMAP_FLAG_ALL if req.address == 0 && req.size == 0 => {
                for range in self.dma.unmap_all() {
                    device.dma_unmap(range);
                }
            }
            _ => return einval(),
        }
        Ok(Reply::body(body.to_vec()))
    }

    fn region_info<D: Device + ?Sized>(&mut self, device: &mut D, body: &[u8]) -> Handled {
        let req = wire::RegionInfo::decode(body).map_err(|_| Errno(libc::EINVAL))?;
        if req.index >= device.device_info().num_regions {
            return einval();
        }
        let info = device.region_info(req.index);
        let mut fds = Vec::new();
        if info.flags & wire::REGION_INFO_FLAG_MMAP != 0 {
            let fd = device.region_fd(req.index).ok_or_else(|| {
                log::error!("vfio-user: region {} is mmap-able but has no fd", req.index);
                Errno(libc::EIO)
            })?;
            fds.push(fd.try_clone_to_owned().map_err(io_errno)?);
        }
        let reply = wire::RegionInfoReply {
            info: wire::RegionInfo {
                argsz: 0,
                flags: info.flags
                    & (wire::REGION_INFO_FLAG_READ
                        | wire::REGION_INFO_FLAG_WRITE
                        | wire::REGION_INFO_FLAG_MMAP),
                index: req.index,
                cap_offset: 0,
                size: info.size,
                offset: info.offset,
            },
            sparse_areas: info.sparse_areas,
        };
        Ok(Reply {
            body: reply.encode(req.argsz),
            fds,
        })
    }

    fn region_io_fds<D: Device + ?Sized>(&mut self, device: &mut D, body: &[u8]) -> Handled {
        let req = wire::RegionIoFds::decode(body).map_err(|_| Errno(libc::EINVAL))?;
        if req.index >= device.device_info().num_regions {
            return einval();
        }
        let areas = device.region_io_fds(req.index).map_err(io_errno)?;
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        let mut sub_regions = Vec::with_capacity(areas.len());
        for a in &areas {
            let idx = match fds.iter().position(|f| f.as_raw_fd() == a.fd.as_raw_fd()) {
                Some(i) => i,
                None => {
                    fds.push(a.fd);
                    fds.len() - 1
                }
            };
            sub_regions.push(wire::SubRegionIoFd {
                offset: a.offset,
                size: a.size,
                fd_index: wire::len_u32(idx),
                kind: a.kind,
                flags: a.flags,
                data: a.data,
            });
        }
        let reply = wire::RegionIoFdsReply {
            head: wire::RegionIoFds {
                argsz: 0,
                flags: 0,
                index: req.index,
                count: 0,
            },
            sub_regions,
        };
        let (body, complete) = reply.encode(req.argsz);
        let fds = if complete {
            fds.iter()
                .map(|f| f.try_clone_to_owned())
                .collect::<io::Result<Vec<_>>>()
                .map_err(io_errno)?
        } else {
            Vec::new()
        };
        Ok(Reply { body, fds })
    }

    fn set_irqs<D: Device + ?Sized>(&mut self, device: &mut D, m: Message) -> Handled {
        let req = wire::IrqSet::decode(&m.body).map_err(|_| Errno(libc::EINVAL))?;
        if req.index >= device.device_info().num_irqs {
            return einval();
        }
        let info = device.irq_info(req.index);
        let end = req
            .start
            .checked_add(req.count)
            .ok_or(Errno(libc::EINVAL))?;
        if end > info.count {
            return einval();
        }
        let action = match req.flags & wire::IRQ_SET_ACTION_TYPE_MASK {
            wire::IRQ_SET_ACTION_MASK => IrqAction::Mask,
            wire::IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            _ => IrqAction::Trigger,
        };
        if action != IrqAction::Trigger && info.flags & wire::IRQ_INFO_MASKABLE == 0 {
            return einval();
        }
        let data = match req.flags & wire::IRQ_SET_DATA_TYPE_MASK {
            wire::IRQ_SET_DATA_NONE => {
                no_fds(&m)?;
                IrqData::None
            }
            wire::IRQ_SET_DATA_BOOL => {
                no_fds(&m)?;
                IrqData::Bool(req.data.iter().map(|&b| b != 0).collect())
            }
            _ => {
                if info.flags & wire::IRQ_INFO_EVENTFD == 0 {
                    return einval();
                }
                if !m.fds.is_empty() && m.fds.len() != req.count as usize {
                    return einval();
                }
                IrqData::Eventfds(m.fds)
            }
        };
        device
            .set_irqs(IrqSet {
                index: req.index,
                start: req.start,
                count: req.count,
                action,
                data,
            })
            .map_err(io_errno)?;
        Ok(Reply::empty())
    }

    fn check_region_access<D: Device + ?Sized>(
        &self,
        device: &D,
        a: &wire::RegionAccess,
        write: bool,
    ) -> Result<(), Errno> {
        if a.region >= device.device_info().num_regions || a.count > self.config.max_data_xfer_size
        {
            return einval();
        }
        let info = device.region_info(a.region);
        let need = if write {
            wire::REGION_INFO_FLAG_WRITE
        } else {
            wire::REGION_INFO_FLAG_READ
        };
        if info.flags & need == 0 {
            return einval();
        }
        let end = a
            .offset
            .checked_add(u64::from(a.count))
            .ok_or(Errno(libc::EINVAL))?;
        if end > info.size {
            return einval();
        }
        Ok(())
    }

    fn reset<D: Device + ?Sized>(&mut self, device: &mut D) -> Result<(), Errno> {
        self.outgoing = None;
        self.incoming = None;
        let r = device.reset();
        // A failed reset leaves the device in ERROR.
        self.state = if r.is_ok() {
            MigrationState::Running
        } else {
            MigrationState::Error
        };
        r.map_err(io_errno)
    }

    fn migration_flags(&self) -> u64 {
        let mut f = wire::MIGRATION_STOP_COPY;
        if self.config.pre_copy {
            f |= wire::MIGRATION_PRE_COPY;
        }
        f
    }

    fn device_feature<D: Device + ?Sized>(&mut self, device: &mut D, body: &[u8]) -> Handled {
        let (req, data) = wire::DeviceFeature::decode(body).map_err(|_| Errno(libc::EINVAL))?;
        let get = req.flags & wire::DEVICE_FEATURE_GET != 0;
        let set = req.flags & wire::DEVICE_FEATURE_SET != 0;
        let probe = req.flags & wire::DEVICE_FEATURE_PROBE != 0;
        let (can_get, can_set) = match req.feature() {
            wire::FEATURE_MIGRATION => (true, false),
            wire::FEATURE_MIG_DEVICE_STATE => (true, true),
            wire::FEATURE_DMA_LOGGING_START | wire::FEATURE_DMA_LOGGING_STOP => (false, true),
            wire::FEATURE_DMA_LOGGING_REPORT => (true, false),
            _ => return Err(Errno(libc::ENOTSUP)),
        };
        if (get && !can_get) || (set && !can_set) {
            return Err(Errno(libc::ENOTSUP));
        }
        if probe {
            return Ok(Reply::body(body.to_vec()));
        }
        let argsz = req.argsz as usize;
        let hdr = wire::DeviceFeature::SIZE;
        match req.feature() {
            wire::FEATURE_MIGRATION => {
                let size = hdr + wire::MigrationFeature::SIZE;
                if !data.is_empty() || argsz < size {
                    return einval();
                }
                let d = wire::MigrationFeature {
                    flags: self.migration_flags(),
                };
                Ok(Reply::body(reply_feature(req, size, &d.encode())))
            }
            wire::FEATURE_MIG_DEVICE_STATE if get => {
                let size = hdr + wire::MigStateFeature::SIZE;
                if !data.is_empty() || argsz < size {
                    return einval();
                }
                let d = wire::MigStateFeature {
                    device_state: self.state as u32,
                    data_fd: u32::MAX,
                };
                Ok(Reply::body(reply_feature(req, size, &d.encode())))
            }
            wire::FEATURE_MIG_DEVICE_STATE => {
                let s = wire::MigStateFeature::decode(data).map_err(|_| Errno(libc::EINVAL))?;
                if argsz < body.len() {
                    return einval();
                }
                let target =
                    MigrationState::try_from(s.device_state).map_err(|_| Errno(libc::EINVAL))?;
                self.set_state(device, target)?;
                Ok(Reply::body(body.to_vec()))
            }
            wire::FEATURE_DMA_LOGGING_START => {
                let c = wire::DmaLoggingControl::decode(data).map_err(|_| Errno(libc::EINVAL))?;
                if argsz < body.len() {
                    return einval();
                }
                let page_size = self.dma.log_start(c.page_size, &c.ranges)?;
                if let Err(e) = device.dma_logging(Some(page_size)) {
                    self.dma.log_stop();
                    return Err(io_errno(e));
                }
                let d = wire::DmaLoggingControl {
                    page_size,
                    ranges: c.ranges,
                };
                Ok(Reply::body(req.encode(&d.encode())))
            }
            wire::FEATURE_DMA_LOGGING_STOP => {
                if !data.is_empty() {
                    return einval();
                }
                self.dma.log_stop();
                if let Err(e) = device.dma_logging(None) {
                    log::warn!("vfio-user: device could not stop DMA logging: {e}");
                }
                Ok(Reply::body(body.to_vec()))
            }
            _ => {
                // DMA_LOGGING_REPORT
                let r = wire::DmaLoggingReport::decode(data).map_err(|_| Errno(libc::EINVAL))?;
                if !self.dma.logging() {
                    return einval();
                }
                let bitmap_size = r.bitmap_size().ok_or(Errno(libc::EINVAL))?;
                if bitmap_size > self.config.max_data_xfer_size as usize {
                    return Err(Errno(libc::E2BIG));
                }
                let size = hdr + wire::DmaLoggingReport::SIZE + bitmap_size;
                if argsz < size {
                    return einval();
                }
                device.dma_logging_sync(&self.dma).map_err(io_errno)?;
                let bitmap = self.dma.log_report(r.iova, r.length, r.page_size)?;
                Ok(Reply::body(reply_feature(req, size, &r.encode(&bitmap))))
            }
        }
    }

    /// Moves the migration state machine to `target` through the arcs of
    /// [`transition_path`], calling the device on each; a failed arc leaves
    /// the state machine in `ERROR`.
    fn set_state<D: Device + ?Sized>(
        &mut self,
        device: &mut D,
        target: MigrationState,
    ) -> Result<(), Errno> {
        let path =
            transition_path(self.state, target, self.config.pre_copy).ok_or(Errno(libc::EINVAL))?;
        for next in path {
            if let Err(e) = self.arc(device, self.state, next) {
                log::warn!(
                    "vfio-user: migration arc {:?} -> {next:?} failed: {e}",
                    self.state
                );
                self.state = MigrationState::Error;
                self.outgoing = None;
                self.incoming = None;
                return Err(io_errno(e));
            }
            self.state = next;
        }
        Ok(())
    }

    fn arc<D: Device + ?Sized>(
        &mut self,
        device: &mut D,
        from: MigrationState,
        to: MigrationState,
    ) -> io::Result<()> {
        use MigrationState::*;
        match (from, to) {
            (Running, Stop) => device.pause(),
            (Stop, Running) => device.resume(),
            (Stop, StopCopy) => {
                self.outgoing = Some((device.save_state()?, 0));
                Ok(())
            }
            (PreCopy, StopCopy) => {
                device.pause()?;
                self.outgoing = Some((device.save_state()?, 0));
                Ok(())
            }
            (StopCopy, Stop) | (PreCopy, Running) => {
                self.outgoing = None;
                Ok(())
            }
            (Running, PreCopy) => {
                // No pre-copy data: reads return nothing until STOP_COPY.
                self.outgoing = Some((Vec::new(), 0));
                Ok(())
            }
            (Stop, Resuming) => {
                self.incoming = Some(Vec::new());
                Ok(())
            }
            (Resuming, Stop) => {
                let blob = self.incoming.take().unwrap_or_default();
                device.restore_state(&blob)
            }
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn mig_data_read(&mut self, body: &[u8]) -> Handled {
        let req = wire::MigData::decode_read(body).map_err(|_| Errno(libc::EINVAL))?;
        if !self.state.is_saving() || req.size > self.config.max_data_xfer_size {
            return einval();
        }
        let (blob, pos) = self.outgoing.as_mut().ok_or(Errno(libc::EINVAL))?;
        let rest = blob.get(*pos..).unwrap_or_default();
        let n = rest.len().min(req.size as usize);
        let data = &rest[..n];
        *pos += n;
        let reply = wire::MigData {
            argsz: wire::len_u32(wire::MigData::SIZE + n),
            size: wire::len_u32(n),
        };
        Ok(Reply::body(reply.encode(data)))
    }

    fn mig_data_write(&mut self, body: &[u8]) -> Handled {
        let (req, data) = wire::MigData::decode_with_data(body).map_err(|_| Errno(libc::EINVAL))?;
        if self.state != MigrationState::Resuming || req.size > self.config.max_data_xfer_size {
            return einval();
        }
        let incoming = self.incoming.as_mut().ok_or(Errno(libc::EINVAL))?;
        if incoming.len().saturating_add(data.len()) > self.config.max_state_size {
            return Err(Errno(libc::EFBIG));
        }
        incoming.extend_from_slice(data);
        Ok(Reply::empty())
    }
}

/// A GET reply: the request's flags, `argsz` = the reply size, then `data`.
fn reply_feature(req: wire::DeviceFeature, size: usize, data: &[u8]) -> Vec<u8> {
    wire::DeviceFeature {
        argsz: wire::len_u32(size),
        flags: req.flags,
    }
    .encode(data)
}
