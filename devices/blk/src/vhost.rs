//! The vhost-user face of the block device: a [`VhostUserBackend`] that
//! hands every descriptor chain to the [`Disk`] engine.
//!
//! One worker thread per queue (`queues_per_thread` gives each thread one
//! queue), so queues run concurrently against the shared image.
//! Notifications follow the usual rust-vmm loop: disable guest kicks,
//! drain the avail ring, re-enable and drain again if the guest added
//! chains in between; the guest is signalled when `needs_notification`
//! (EVENT_IDX) says so.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::DeviceShape;
use crate::engine::Disk;

/// Most queues (one bit each in the per-thread queue masks).
pub const MAX_QUEUES: u16 = 64;

/// Largest queue size (virtio split-ring limit).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Guest memory as vhost-user-backend shares it with the backend.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Queue options of the vhost-user device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// Number of request queues, 1..=64.
    pub queues: u16,
    /// Maximum queue size: a power of two, 1..=32768.
    pub queue_size: u16,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

/// Invalid [`QueueOptions`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    /// Queue count out of range.
    #[error("--queues {0}: must be 1 to {MAX_QUEUES}")]
    Queues(u16),
    /// Queue size not a power of two or too large.
    #[error("--queue-size {0}: must be a power of two, at most {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
}

impl QueueOptions {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(OptionsError::Queues(self.queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(OptionsError::QueueSize(self.queue_size));
        }
        Ok(())
    }
}

/// The vhost-user-blk backend.
pub struct BlkBackend {
    disk: Arc<Disk>,
    shape: DeviceShape,
    event_idx: AtomicBool,
    mem: Mutex<GuestMemory>,
    /// Held by a queue's worker while it processes that queue, so that
    /// `stop_vring` (GET_VRING_BASE) returns only once the request in
    /// flight is on the used ring: the ring base handed back then covers
    /// every request taken.
    busy: Vec<Mutex<()>>,
}

impl BlkBackend {
    /// A backend serving `disk` with the given (validated) queue options.
    pub fn new(disk: Arc<Disk>, queues: QueueOptions) -> Result<Self, OptionsError> {
        queues.validate()?;
        let shape = DeviceShape {
            capacity: disk.capacity_sectors(),
            queues: queues.queues,
            queue_size: queues.queue_size,
            readonly: disk.readonly(),
            event_idx: queues.event_idx,
        };
        Ok(BlkBackend {
            disk,
            shape,
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            busy: (0..queues.queues).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The guest memory handle to give `VhostUserDaemon::new` (shared with
    /// this backend).
    pub fn guest_memory(&self) -> GuestMemory {
        self.mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The device's shape (features, config space).
    pub fn shape(&self) -> &DeviceShape {
        &self.shape
    }

    /// Serves one queue until its avail ring is empty with notifications
    /// re-enabled.
    fn process_vring(&self, vring: &VringRwLock, queue: usize) {
        // A guest whose avail index runs ahead of what can be popped (a
        // corrupt ring) would make the re-enable check loop forever; give
        // up after a few empty rounds, the next kick retries.
        const MAX_EMPTY_ROUNDS: u32 = 2;
        let _busy = self
            .busy
            .get(queue)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner));
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = vring.disable_notification() {
                log::warn!("queue {queue}: cannot disable notifications: {e}");
            }
            if self.drain(vring, queue) == 0 {
                empty_rounds += 1;
            }
            match vring.enable_notification() {
                Ok(true) if empty_rounds < MAX_EMPTY_ROUNDS => continue,
                Ok(_) => break,
                Err(e) => {
                    log::warn!("queue {queue}: cannot enable notifications: {e}");
                    break;
                }
            }
        }
    }

    /// Processes every available chain; returns how many.
    fn drain(&self, vring: &VringRwLock, queue: usize) -> usize {
        let mem = self.guest_memory().memory();
        let mut done = 0;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let completion = self.disk.process_request(&*mem, chain);
            if let Err(e) = vring.add_used(head, completion.used_len) {
                log::warn!("queue {queue}: cannot add descriptor {head} to the used ring: {e}");
                break;
            }
            done += 1;
        }
        if done > 0 {
            match vring.needs_notification() {
                Ok(true) => {
                    if let Err(e) = vring.signal_used_queue() {
                        log::warn!("queue {queue}: cannot signal the guest: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => log::warn!("queue {queue}: cannot read the used event: {e}"),
            }
        }
        done
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shape.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shape.queue_size)
    }

    fn features(&self) -> u64 {
        self.shape.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        log::debug!("features acked: {features:#x}");
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shape.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no CONFIG_WCE); the
        // write is ignored, as a device ignores writes to read-only
        // fields. Not an error: any handler error ends the whole vhost-user
        // connection in the vhost crate.
        log::debug!(
            "ignored SET_CONFIG of {} bytes at offset {offset}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready: its worker stops after
        // the request in hand. Wait for that one.
        if let Some(busy) = usize::try_from(queue_index)
            .ok()
            .and_then(|q| self.busy.get(q))
        {
            drop(busy.lock().unwrap_or_else(PoisonError::into_inner));
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shape.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("worker {thread_index}: cannot create its exit eventfd: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Each thread owns one queue: thread i serves queue i, which is
        // event 0 of its own vring list.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_vring(vring, thread_id),
            None => log::warn!("worker {thread_id}: event {device_event} for no queue"),
        }
        // Errors are logged, never returned: an error would end the
        // worker thread and stop the queue for good.
        Ok(())
    }
}
