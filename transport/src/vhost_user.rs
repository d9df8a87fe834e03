//! The VMM's vhost-user frontend: a virtio device whose data path runs in
//! another process.
//!
//! The backend maps guest RAM from the memfd regions it is given, is
//! kicked through eventfds the VMM registers as KVM ioeventfds, and signals
//! completions through eventfds the VMM registers as KVM irqfds: no request
//! crosses a VMM thread. The VMM only talks to the backend to set the
//! device up ([`VhostUserDevice::connect`], [`VirtioDevice::activate`]) and
//! to stop it ([`VirtioDevice::reset`]).
//!
//! Protocol features asked for: MQ, REPLY_ACK and CONFIG (required), plus
//! RESET_DEVICE; LOG_SHMFD and DEVICE_STATE are recorded when the backend
//! offers them (live migration uses them) but not enabled yet.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActivateError, QueueConfig, VirtioDevice};

/// How long the VMM waits for one reply before it gives up on a backend.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most queues a vhost-user device may have here.
pub const MAX_QUEUES: usize = 64;

/// Virtio transport feature bits the guest may see: the device-specific
/// bits 0..=23, INDIRECT_DESC (28), EVENT_IDX (29) and VERSION_1 (32).
/// LOG_ALL and PROTOCOL_FEATURES are between the VMM and the backend.
const GUEST_VISIBLE_FEATURES: u64 = 0x00ff_ffff | 1 << 28 | 1 << 29 | 1 << 32;

/// Protocol features Outboard uses when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Errors connecting to a backend and setting it up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be prepared.
    #[error("vhost-user socket: {0}")]
    Socket(io::Error),
    /// A step of the handshake failed.
    #[error("vhost-user {step} failed: {source}")]
    Protocol {
        /// The message or step.
        step: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// The backend lacks a feature Outboard requires.
    #[error("the backend does not offer {0}, which Outboard requires")]
    MissingFeature(&'static str),
    /// The backend's answer makes no sense.
    #[error("the backend {0}")]
    Invalid(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Protocol { step, source }
}

/// One range of guest RAM, as the backend maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedMemoryRegion {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where the VMM has it mapped (vring addresses are given in this
    /// address space, as the protocol wants).
    pub host_addr: u64,
    /// The shareable file backing it (a memfd). It must stay open for as
    /// long as the device exists.
    pub fd: RawFd,
    /// Offset of the range in `fd`.
    pub fd_offset: u64,
}

/// What a device kind needs from the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceShape {
    /// Virtio device type (2 = block).
    pub device_type: u32,
    /// Bytes of device config space read through GET_CONFIG.
    pub config_size: u32,
    /// Largest queue size to offer the driver.
    pub queue_size: u16,
}

/// What the backend offered during the handshake, for the log and for
/// migration later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendOffer {
    /// Virtio feature bits the backend offered.
    pub features: u64,
    /// Protocol features the backend offered.
    pub protocol_features: u64,
    /// Protocol features in use.
    pub acked_protocol_features: u64,
    /// Queues the backend supports.
    pub queues: usize,
}

impl BackendOffer {
    /// Whether the backend can log its writes to guest memory (LOG_SHMFD).
    pub fn can_log_dirty(&self) -> bool {
        self.protocol_features & VhostUserProtocolFeatures::LOG_SHMFD.bits() != 0
    }

    /// Whether the backend can save and load its state (DEVICE_STATE).
    pub fn can_transfer_state(&self) -> bool {
        self.protocol_features & VhostUserProtocolFeatures::DEVICE_STATE.bits() != 0
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    name: String,
    frontend: Frontend,
    shape: DeviceShape,
    offer: BackendOffer,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    regions: Vec<SharedMemoryRegion>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    started: Vec<usize>,
    broken: bool,
}

impl VhostUserDevice {
    /// Runs the handshake on a connected `stream`: owner, features,
    /// protocol features, queue count, device config. `name` prefixes log
    /// lines. `regions` is guest RAM as the backend will map it.
    pub fn connect(
        name: &str,
        stream: UnixStream,
        shape: DeviceShape,
        regions: Vec<SharedMemoryRegion>,
    ) -> Result<Self, VhostUserError> {
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(VhostUserError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, 1);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        if features & 1 << 32 == 0 {
            return Err(VhostUserError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::MissingFeature(
                "VHOST_USER_PROTOCOL_F_CONFIG",
            ));
        }
        let acked = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(acked)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message that can be acknowledged is, so a backend
            // refusing a step is noticed at that step.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = if acked.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            usize::try_from(n).unwrap_or(usize::MAX)
        } else {
            1
        };
        if queues == 0 {
            return Err(VhostUserError::Invalid("reports 0 queues".into()));
        }
        let queues = queues.min(MAX_QUEUES);
        let request = vec![0u8; shape.config_size as usize];
        let (_, config) = frontend
            .get_config(
                0,
                shape.config_size,
                VhostUserConfigFlags::empty(),
                &request,
            )
            .map_err(step("GET_CONFIG"))?;
        if config.len() != request.len() {
            return Err(VhostUserError::Invalid(format!(
                "returned {} bytes of config space, not {}",
                config.len(),
                request.len()
            )));
        }
        let queues = queues.min(device_queue_limit(shape.device_type, features, &config));
        let mut config = config;
        // The driver must see no more queues than the transport offers.
        set_device_queue_count(shape.device_type, &mut config, queues);
        let mut kicks = Vec::with_capacity(queues);
        let mut calls = Vec::with_capacity(queues);
        for _ in 0..queues {
            kicks.push(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(VhostUserError::EventFd)?,
            );
            calls.push(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(VhostUserError::EventFd)?,
            );
        }
        let offer = BackendOffer {
            features,
            protocol_features: offered.bits(),
            acked_protocol_features: acked.bits(),
            queues,
        };
        log::info!(
            "{name}: vhost-user backend: features {features:#x}, protocol features {:#x} (using {:#x}), {queues} queue(s), dirty logging {}, state transfer {}",
            offer.protocol_features,
            offer.acked_protocol_features,
            if offer.can_log_dirty() { "yes" } else { "no" },
            if offer.can_transfer_state() { "yes" } else { "no" },
        );
        Ok(VhostUserDevice {
            name: name.to_string(),
            frontend,
            shape,
            offer,
            queue_sizes: vec![shape.queue_size; queues],
            config,
            regions,
            kicks,
            calls,
            started: Vec::new(),
            broken: false,
        })
    }

    /// A protocol exchange failed during activation: the backend may be
    /// out of step (or gone) and half-started queues may be live, so it is
    /// given up on.
    fn lost(&mut self, what: String) -> ActivateError {
        self.give_up(&what);
        ActivateError(format!("{}: {what}", self.name))
    }

    /// Gives up on the backend after a failed or timed-out exchange: the
    /// connection may be out of step, so it is shut down (the VMM's
    /// monitor sees the hang-up and sets DEVICE_NEEDS_RESET) and never
    /// used again.
    fn give_up(&mut self, why: &str) {
        if !self.broken {
            log::error!("{}: {why}; disconnecting the backend", self.name);
            self.broken = true;
            // SAFETY: shutdown only changes the state of our own socket.
            unsafe { libc::shutdown(self.frontend.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// What the backend offered.
    pub fn offer(&self) -> BackendOffer {
        self.offer
    }

    /// Queue `i`'s kick eventfd: the VMM makes it the ioeventfd of the
    /// transport's notify register for that queue.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Queue `i`'s call eventfd: the VMM makes it an irqfd of the device's
    /// interrupt.
    pub fn call_fds(&self) -> &[EventFd] {
        &self.calls
    }

    /// The connection's descriptor, to watch for the backend hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    fn host_addr(&self, gpa: u64, len: u64) -> Result<u64, ActivateError> {
        self.regions
            .iter()
            .find(|r| gpa >= r.guest_addr && gpa - r.guest_addr < r.size)
            .filter(|r| len <= r.size - (gpa - r.guest_addr))
            .map(|r| r.host_addr + (gpa - r.guest_addr))
            .ok_or_else(|| {
                ActivateError(format!(
                    "{}: ring at {gpa:#x} (+{len:#x}) is not in guest RAM",
                    self.name
                ))
            })
    }

    fn start_queue(&mut self, index: usize, q: &QueueConfig) -> Result<(), ActivateError> {
        let max = self.queue_sizes.get(index).copied().unwrap_or(0);
        // What a backend would refuse by dropping the connection: check it
        // here and fail only this activation (virtio spec 2.7: ring
        // alignment 16, 2 and 4).
        if q.size == 0 || q.size > max || !q.size.is_power_of_two() {
            return Err(ActivateError(format!(
                "{}: queue {index} has size {} (at most {max}, a power of two)",
                self.name, q.size
            )));
        }
        if q.desc_table % 16 != 0 || q.avail_ring % 2 != 0 || q.used_ring % 4 != 0 {
            return Err(ActivateError(format!(
                "{}: queue {index} rings are misaligned",
                self.name
            )));
        }
        let size = u64::from(q.size);
        // Split ring sizes (virtio spec 2.7): 16 bytes per descriptor,
        // flags + idx + ring (+ event) for the rings.
        let desc = self.host_addr(q.desc_table, 16 * size)?;
        let avail = self.host_addr(q.avail_ring, 6 + 2 * size)?;
        let used = self.host_addr(q.used_ring, 6 + 8 * size)?;
        let vring = VringConfigData {
            queue_max_size: self.queue_sizes.get(index).copied().unwrap_or(0),
            queue_size: q.size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        let (Some(kick), Some(call)) = (self.kicks.get(index), self.calls.get(index)) else {
            return Err(ActivateError(format!("{}: no queue {index}", self.name)));
        };
        let f = &self.frontend;
        let steps: [(&str, &dyn Fn() -> vhost::Result<()>); 6] = [
            ("SET_VRING_NUM", &|| f.set_vring_num(index, q.size)),
            ("SET_VRING_ADDR", &|| f.set_vring_addr(index, &vring)),
            ("SET_VRING_BASE", &|| f.set_vring_base(index, 0)),
            ("SET_VRING_CALL", &|| f.set_vring_call(index, call)),
            ("SET_VRING_KICK", &|| f.set_vring_kick(index, kick)),
            ("SET_VRING_ENABLE", &|| {
                // set_vring_enable takes &mut; the frontend locks inside.
                let mut f = f.clone();
                f.set_vring_enable(index, true)
            }),
        ];
        let failed = steps.iter().find_map(|(what, step)| {
            step()
                .err()
                .map(|e| format!("queue {index}: {what} failed: {e}"))
        });
        match failed {
            Some(what) => Err(self.lost(what)),
            None => Ok(()),
        }
    }
}

/// The queues a device's own config allows (virtio-blk: `num_queues` when
/// it offers VIRTIO_BLK_F_MQ, else 1).
/// Virtio feature bits the guest must not see for a device type: features
/// whose config fields lie beyond the config space fetched (virtio-blk:
/// SECURE_ERASE 16 and ZONED 17, past byte 60).
fn hidden_device_features(device_type: u32) -> u64 {
    match device_type {
        2 => 1 << 16 | 1 << 17,
        _ => 0,
    }
}

/// Writes the transport's queue count into the device config where the
/// device type has one (virtio-blk `num_queues`, offset 34).
fn set_device_queue_count(device_type: u32, config: &mut [u8], queues: usize) {
    if device_type == 2 {
        if let Some(b) = config.get_mut(34..36) {
            b.copy_from_slice(&(queues.min(usize::from(u16::MAX)) as u16).to_le_bytes());
        }
    }
}

fn device_queue_limit(device_type: u32, features: u64, config: &[u8]) -> usize {
    const VIRTIO_ID_BLOCK: u32 = 2;
    const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
    const BLK_NUM_QUEUES_OFFSET: usize = 34;
    match device_type {
        VIRTIO_ID_BLOCK if features & VIRTIO_BLK_F_MQ != 0 => config
            .get(BLK_NUM_QUEUES_OFFSET..BLK_NUM_QUEUES_OFFSET + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .filter(|&n| n > 0)
            .unwrap_or(1),
        VIRTIO_ID_BLOCK => 1,
        _ => usize::MAX,
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.shape.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.offer.features
            & GUEST_VISIBLE_FEATURES
            & !hidden_device_features(self.shape.device_type)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = u32::try_from(offset) else {
            return;
        };
        let fits = usize::try_from(offset)
            .ok()
            .and_then(|s| s.checked_add(data.len()))
            .is_some_and(|end| end <= self.config.len());
        if !fits || self.broken {
            return;
        }
        if let Err(e) = self
            .frontend
            .set_config(start, VhostUserConfigFlags::empty(), data)
        {
            self.give_up(&format!("SET_CONFIG at {offset:#x} failed: {e}"));
            return;
        }
        // Read back what the device made of it (read-only fields stay).
        let size = self.config.len() as u32;
        let request = vec![0u8; self.config.len()];
        match self
            .frontend
            .get_config(0, size, VhostUserConfigFlags::empty(), &request)
        {
            Ok((_, config)) if config.len() == self.config.len() => {
                let queues = self.queue_sizes.len();
                self.config = config;
                set_device_queue_count(self.shape.device_type, &mut self.config, queues);
            }
            Ok(_) => self.give_up("GET_CONFIG returned a config of another size"),
            Err(e) => self.give_up(&format!("GET_CONFIG failed: {e}")),
        }
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), ActivateError> {
        if self.broken {
            return Err(ActivateError(format!("{}: the backend is gone", self.name)));
        }
        self.start(features, queues)
    }

    fn reset(&mut self) {
        if self.started.is_empty() || self.broken {
            self.started.clear();
            return;
        }
        for index in std::mem::take(&mut self.started) {
            if let Err(e) = self.frontend.set_vring_enable(index, false) {
                self.give_up(&format!("queue {index}: SET_VRING_ENABLE 0 failed: {e}"));
                return;
            }
            // GET_VRING_BASE stops the ring in the backend. If it does not
            // answer, the backend may still write into rings the driver is
            // about to free: it is cut off, never trusted again.
            if let Err(e) = self.frontend.get_vring_base(index) {
                self.give_up(&format!("queue {index}: GET_VRING_BASE failed: {e}"));
                return;
            }
        }
        let acked =
            VhostUserProtocolFeatures::from_bits_truncate(self.offer.acked_protocol_features);
        if acked.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            if let Err(e) = self.frontend.reset_device() {
                self.give_up(&format!("RESET_DEVICE failed: {e}"));
                return;
            }
        }
        log::info!("{}: reset by the driver", self.name);
    }
}

impl VhostUserDevice {
    fn start(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), ActivateError> {
        let backend_features = features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(backend_features)
            .map_err(|e| self.lost(format!("SET_FEATURES failed: {e}")))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: r.host_addr,
                mmap_offset: r.fd_offset,
                mmap_handle: r.fd,
            })
            .collect();
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.lost(format!("SET_MEM_TABLE failed: {e}")))?;
        self.started.clear();
        for (index, q) in queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            // Recorded first: a queue that fails half-way is still stopped
            // on reset.
            self.started.push(index);
            self.start_queue(index, q)?;
        }
        log::info!(
            "{}: started, features {features:#x}, queues {:?}",
            self.name,
            self.started
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_queue_limit_follows_num_queues_only_with_mq() {
        let mut config = vec![0u8; 60];
        config[34..36].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(device_queue_limit(2, 1 << 12, &config), 4);
        assert_eq!(device_queue_limit(2, 0, &config), 1);
        config[34..36].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(device_queue_limit(2, 1 << 12, &config), 1);
        assert_eq!(device_queue_limit(2, 1 << 12, &[]), 1);
    }

    #[test]
    fn transport_only_features_are_hidden_from_the_guest() {
        let all = u64::MAX;
        let visible = all & GUEST_VISIBLE_FEATURES;
        assert_eq!(
            visible & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert_eq!(visible & 1 << 26, 0, "LOG_ALL");
        assert_ne!(visible & 1 << 32, 0, "VERSION_1");
    }
}
