//! The in-process virtio-blk device behind the virtio-pci transport: what
//! [`VirtioPciTransport`](outboard_transport::virtio_pci::VirtioPciTransport)
//! calls on DRIVER_OK and on reset, and the run / stop state the
//! migration state machine drives.
//!
//! Each queue is idle (not set up), parked (set up, indices held here,
//! no thread: the function is stopped) or running (a worker thread owns
//! it). Activation builds the queues on the DMA-mapped memory and starts
//! their workers if the function runs; stop parks them, run restarts them.

use std::io;
use std::sync::Arc;

use outboard_transport::{ActivateError, QueueConfig, VirtioDevice};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddressSpace;

use super::persist::{SaveError, SavedQueue};
use super::worker::{QueueWorker, Shared};
use crate::config::DeviceShape;

/// Virtio device type of a block device.
const VIRTIO_ID_BLOCK: u32 = 2;

enum Slot {
    Idle,
    Parked(Queue),
    Running(QueueWorker),
    /// Its worker panicked: the queue's state is gone until a reset.
    Lost,
}

/// virtio-blk served by this process's own threads.
pub(crate) struct BlkPciDevice {
    shape: DeviceShape,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    /// The function runs (not stopped for migration).
    running: bool,
}

/// Builds a queue from its configuration through virtio-queue's checks.
pub(crate) fn build_queue(
    cfg: &QueueConfig,
    max_size: u16,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
) -> Result<Queue, virtio_queue::Error> {
    Queue::try_from(QueueState {
        max_size,
        next_avail,
        next_used,
        event_idx_enabled: event_idx,
        // A driver that never wrote the size uses the maximum it read.
        size: if cfg.size == 0 { max_size } else { cfg.size },
        ready: cfg.ready,
        desc_table: cfg.desc_table,
        avail_ring: cfg.avail_ring,
        used_ring: cfg.used_ring,
    })
}

/// Whether `features` include VIRTIO_RING_F_EVENT_IDX.
pub(crate) fn has_event_idx(features: u64) -> bool {
    features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
}

impl BlkPciDevice {
    /// A device of `shape` (queues idle, running).
    pub(crate) fn new(shape: DeviceShape, shared: Arc<Shared>) -> Self {
        let n = usize::from(shape.queues);
        BlkPciDevice {
            shape,
            queue_sizes: vec![shape.queue_size; n],
            shared,
            slots: (0..n).map(|_| Slot::Idle).collect(),
            running: true,
        }
    }

    /// The device's shape.
    pub(crate) fn shape(&self) -> &DeviceShape {
        &self.shape
    }

    /// Whether the function runs.
    pub(crate) fn running(&self) -> bool {
        self.running
    }

    /// Parks every queue: returns once no worker runs (nothing in flight,
    /// no more guest memory writes or interrupts).
    pub(crate) fn stop(&mut self) {
        for slot in &mut self.slots {
            if let Slot::Running(worker) = std::mem::replace(slot, Slot::Idle) {
                *slot = worker.stop().map_or(Slot::Lost, Slot::Parked);
            }
        }
        self.running = false;
    }

    /// Runs the parked queues again.
    pub(crate) fn run(&mut self) -> io::Result<()> {
        self.running = true;
        self.start_workers()
    }

    fn start_workers(&mut self) -> io::Result<()> {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Parked(q) = std::mem::replace(slot, Slot::Idle) {
                // Keep the queue's state should the spawn fail.
                let state = q.state();
                match QueueWorker::spawn(self.shared.clone(), index, q) {
                    Ok(w) => *slot = Slot::Running(w),
                    Err(e) => {
                        if let Ok(q) = Queue::try_from(state) {
                            *slot = Slot::Parked(q);
                        }
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops and forgets every queue.
    fn drop_queues(&mut self) {
        for slot in &mut self.slots {
            if let Slot::Running(worker) = std::mem::replace(slot, Slot::Idle) {
                worker.stop();
            }
        }
    }

    /// The parked queues' ring positions (`None`: idle); only while
    /// stopped.
    pub(crate) fn saved_queues(&self) -> Result<Vec<Option<SavedQueue>>, SaveError> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| match s {
                Slot::Idle => Ok(None),
                Slot::Parked(q) => Ok(Some(SavedQueue {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })),
                Slot::Running(_) => Err(SaveError::Running),
                Slot::Lost => Err(SaveError::QueueLost(index)),
            })
            .collect()
    }

    /// Replaces every queue with restored, checked ones, parked (the
    /// function is stopped while state is loaded).
    pub(crate) fn install(&mut self, queues: Vec<Option<Queue>>) {
        self.drop_queues();
        self.slots = queues
            .into_iter()
            .map(|q| q.map_or(Slot::Idle, Slot::Parked))
            .collect();
    }
}

impl VirtioDevice for BlkPciDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.shape.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.shape.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| space.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable (no CONFIG_WCE).
        log::debug!("ignored config write of {} bytes at {offset}", data.len());
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), ActivateError> {
        self.drop_queues();
        let event_idx = has_event_idx(features);
        let mem = self.shared.mem.memory();
        let mut slots = Vec::with_capacity(self.queue_sizes.len());
        for (index, (cfg, max)) in queues.iter().zip(&self.queue_sizes).enumerate() {
            if !cfg.ready {
                slots.push(Slot::Idle);
                continue;
            }
            let q = build_queue(cfg, *max, event_idx, 0, 0)
                .map_err(|e| ActivateError(format!("queue {index}: {e}")))?;
            if !q.is_valid(&*mem) {
                return Err(ActivateError(format!(
                    "queue {index}: rings outside DMA-mapped memory"
                )));
            }
            slots.push(Slot::Parked(q));
        }
        self.slots = slots;
        if self.running {
            if let Err(e) = self.start_workers() {
                self.drop_queues();
                return Err(ActivateError(format!("cannot start a queue worker: {e}")));
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.drop_queues();
    }
}

impl Drop for BlkPciDevice {
    fn drop(&mut self) {
        self.drop_queues();
    }
}
