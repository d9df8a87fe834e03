//! virtio-blk as a PCI function this process implements itself
//! (virtio-pci modern), for a transport that hands the function's
//! configuration space, BAR 0, interrupts and DMA to another process
//! (vfio-user). Protocol-independent: the protocol server calls
//! [`BlkPciFunction`]; the engine is the same [`Disk`] the vhost-user path
//! uses.
//!
//! - `device`: the virtio device behind the transport (activation,
//!   queues parked or running).
//! - `queue`: serving one queue (pure logic); `worker`: its thread.
//! - `memory`: DMA windows, guest memory, dirty logging.
//! - `interrupts`: MSI-X vector eventfds and routing.
//! - `persist`: the migration blob.
//!
//! Registers, capabilities and save/restore of the PCI side are
//! [`VirtioPciTransport`]'s: BAR 0 is laid out as
//! [`outboard_transport::virtio_pci`] documents (common config 0x0000,
//! ISR 0x1000, device config 0x2000, notify 0x3000 + 4q, MSI-X table
//! 0x4000, PBA 0x5000). The VMM emulates MSI-X itself; the function
//! signals the eventfd of the vector a queue is routed to.
//!
//! Everything from the client (offsets, sizes, descriptors, blobs) is
//! untrusted and checked; nothing here panics on it.

mod device;
mod interrupts;
mod memory;
mod persist;
mod queue;
mod worker;

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use outboard_transport::virtio_pci::{
    PciEffects, VirtioPciError, VirtioPciTransport, BAR_SIZE, NOTIFY_MULTIPLIER, NOTIFY_OFFSET,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::DeviceShape;
use crate::engine::Disk;
use crate::vhost::{OptionsError, QueueOptions};
use device::BlkPciDevice;
use interrupts::Interrupts;
use memory::DmaTable;
use worker::Shared;

pub use interrupts::IrqRangeError;
pub use memory::{
    DirtyLogError, DmaError, PciGuestMemory, DMA_PAGE, MAX_BITMAP_BYTES, MAX_DMA_MAPS,
};
pub use persist::{LoadError, SaveError, STATE_UUID, STATE_VERSION};

/// Bytes a driver writes to a queue's notify address (the queue index as
/// 16 bits; no VIRTIO_F_NOTIFICATION_DATA).
pub const NOTIFY_WRITE_LEN: u64 = 2;

/// Why the function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PciFunctionError {
    /// Invalid queue options.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// An eventfd could not be created.
    #[error("cannot create a queue notify eventfd: {0}")]
    EventFd(io::Error),
    /// The PCI function could not be built.
    #[error(transparent)]
    Transport(#[from] VirtioPciError),
}

/// virtio-blk as a PCI function the process implements itself.
pub struct BlkPciFunction {
    transport: VirtioPciTransport<BlkPciDevice>,
    shared: Arc<Shared>,
    dma: DmaTable,
}

impl BlkPciFunction {
    /// A function serving `disk` with the given queue options (the same
    /// as the vhost-user backend's). It starts running, with no DMA
    /// windows and no interrupt eventfds.
    pub fn new(disk: Arc<Disk>, options: QueueOptions) -> Result<Self, PciFunctionError> {
        options.validate()?;
        let shape = DeviceShape {
            capacity: disk.capacity_sectors(),
            queues: options.queues,
            queue_size: options.queue_size,
            readonly: disk.readonly(),
            event_idx: options.event_idx,
        };
        let n = usize::from(options.queues);
        let kicks = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()
            .map_err(PciFunctionError::EventFd)?;
        let dma = DmaTable::new();
        // virtio-pci gives one vector per queue plus the config vector.
        let shared = Arc::new(Shared {
            disk,
            mem: dma.memory(),
            irq: Interrupts::new(options.queues + 1, n),
            kicks,
            busy: (0..n).map(|_| Mutex::new(())).collect(),
        });
        let transport = VirtioPciTransport::new(BlkPciDevice::new(shape, shared.clone()), 0)?;
        debug_assert_eq!(transport.vectors(), shared.irq.vectors());
        Ok(BlkPciFunction {
            transport,
            shared,
            dma,
        })
    }

    /// Reads the 256-byte configuration space (vendor 1af4:1042, the
    /// virtio and MSI-X capabilities); bytes past it read 0.
    pub fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.transport.read_config(offset, data);
    }

    /// Writes configuration space (only guest-writable bits change).
    pub fn write_config(&mut self, offset: usize, data: &[u8]) {
        let effects = self.transport.write_config(offset, data);
        self.apply(effects);
    }

    /// Size of BAR 0 (a 64-bit memory BAR).
    pub fn bar0_size(&self) -> u64 {
        BAR_SIZE
    }

    /// Reads BAR 0 at `offset`; unimplemented or odd accesses read 0.
    pub fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        self.transport.read_bar(0, offset, data);
    }

    /// Writes BAR 0 at `offset`. A notify write that reaches here (not
    /// caught by the ioeventfd) kicks the queue all the same.
    pub fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        let effects = self.transport.write_bar(0, offset, data);
        self.apply(effects);
    }

    /// The queue notify eventfds the client should register as
    /// ioeventfds: `(offset in BAR 0, write length, eventfd)`, one per
    /// queue.
    pub fn notify_fds(&self) -> Vec<(u64, u64, &EventFd)> {
        self.shared
            .kicks
            .iter()
            .enumerate()
            .map(|(q, fd)| {
                let offset = NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER);
                (offset, NOTIFY_WRITE_LEN, fd)
            })
            .collect()
    }

    /// Sets the eventfds of MSI-X vectors `start..start + fds.len()`
    /// (vfio `SET_IRQS` on the MSI-X index); `None` unsets one.
    pub fn set_msix_eventfds(
        &mut self,
        start: u16,
        fds: Vec<Option<EventFd>>,
    ) -> Result<(), IrqRangeError> {
        self.shared.irq.set_fds(start, fds)
    }

    /// Number of MSI-X vectors (queues + 1).
    pub fn msix_vectors(&self) -> u16 {
        self.transport.vectors()
    }

    /// Maps `size` bytes of `fd` from `fd_offset` at `iova` (the guest
    /// physical address). Allowed while queues run: see `memory`.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: File,
        fd_offset: u64,
        writable: bool,
    ) -> Result<(), DmaError> {
        self.dma.map(iova, size, fd, fd_offset, writable)
    }

    /// Unmaps the window `iova`, `size` (exactly as mapped). Allowed while
    /// queues run: returns once no worker uses the old memory map (the
    /// requests in flight on it are finished first).
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        self.dma.unmap(iova, size)?;
        self.shared.quiesce_memory();
        Ok(())
    }

    /// Device reset (as a driver writing status 0): queues stopped and
    /// forgotten, vectors unassigned; the function runs afterwards. DMA
    /// windows, interrupt eventfds and dirty logging stay.
    pub fn reset(&mut self) {
        let effects = self.transport.write_bar(0, STATUS_OFFSET, &[0]);
        self.apply(effects);
        // No queue is set up: running only sets the flag.
        if let Err(e) = self.transport.device_mut().run() {
            log::error!("cannot restart after reset: {e}");
        }
    }

    /// `RUNNING -> STOP`: returns once every chain taken off a ring is
    /// finished (on the used ring, signalled); afterwards no guest memory
    /// write and no interrupt until [`run`](Self::run). Register accesses
    /// still work.
    pub fn stop(&mut self) {
        self.transport.device_mut().stop();
    }

    /// `STOP -> RUNNING`: the queues run again (first serving whatever
    /// the driver made available meanwhile).
    pub fn run(&mut self) -> io::Result<()> {
        self.transport.device_mut().run()
    }

    /// Whether the function runs (not stopped).
    pub fn running(&self) -> bool {
        self.transport.device().running()
    }

    /// The function's state as an opaque blob (`persist` describes it);
    /// only while stopped.
    pub fn save_state(&self) -> Result<Vec<u8>, SaveError> {
        let device = self.transport.device();
        if device.running() {
            return Err(SaveError::Running);
        }
        let queues = device.saved_queues()?;
        persist::encode(device.shape(), self.transport.save(), queues)
    }

    /// Replaces the function's state with a blob from
    /// [`save_state`](Self::save_state) of a function of the same shape;
    /// only while stopped ([`run`](Self::run) continues). The blob is
    /// checked completely first: on error nothing changes.
    pub fn load_state(&mut self, blob: &[u8]) -> Result<(), LoadError> {
        if self.transport.device().running() {
            return Err(LoadError::Running);
        }
        let restored = persist::decode(blob, self.transport.device().shape())?;
        self.transport.restore(restored.transport)?;
        self.transport.device_mut().install(restored.queues);
        self.sync_vectors();
        Ok(())
    }

    /// Starts DMA dirty logging (clears the log); `page_size` is a power
    /// of two from 4 KiB to 1 GiB.
    pub fn dirty_logging_start(&mut self, page_size: u64) -> Result<(), DirtyLogError> {
        self.dma.log_start(page_size)
    }

    /// The pages of `[iova, iova + size)` the device wrote since the last
    /// report (or the start), one bit per `page_size` page, LSB first;
    /// clears them.
    pub fn dirty_logging_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
    ) -> Result<Vec<u8>, DirtyLogError> {
        self.dma.log_report(iova, size, page_size)
    }

    /// Stops DMA dirty logging.
    pub fn dirty_logging_stop(&mut self) {
        self.dma.log_stop();
    }

    fn apply(&mut self, effects: PciEffects) {
        if let Some(q) = effects.notify {
            if let Some(kick) = self.shared.kicks.get(usize::from(q)) {
                if let Err(e) = kick.write(1) {
                    log::warn!("queue {q}: cannot kick: {e}");
                }
            }
        }
        if effects.config_interrupt {
            self.shared.irq.signal_config();
        }
        self.sync_vectors();
    }

    /// Mirrors the transport's vector assignments for the workers.
    fn sync_vectors(&self) {
        for q in 0..self.shared.kicks.len() {
            self.shared
                .irq
                .set_queue_vector(q, self.transport.queue_vector(q));
        }
        self.shared
            .irq
            .set_config_vector(self.transport.config_vector());
    }
}

/// The device status register in the common configuration.
const STATUS_OFFSET: u64 = 0x14;
