//! The seam between the protocol and a device: [`Device`], implemented by a
//! device process (e.g. the block device's virtio-pci function) and driven
//! by [`Server`](crate::Server).
//!
//! The server validates every request before calling the device: region and
//! IRQ indexes are below the counts of [`Device::device_info`], accesses lie
//! inside the region and respect its read/write flags, IRQ sub-index ranges
//! fit the IRQ's count and its flags, migration arcs are legal. A device
//! therefore only sees well-formed calls, and reports its own failures as
//! `io::Error`s, whose errno goes back to the client (`EIO` if it has none).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::dma::DmaRange;
use crate::wire::SparseMmapArea;

/// What `DEVICE_GET_INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `wire::DEVICE_FLAGS_*` (`RESET`: the device honours [`Device::reset`]
    /// requests from the client; `PCI`).
    pub flags: u32,
    /// Number of regions (for PCI at least `wire::PCI_NUM_REGIONS`).
    pub num_regions: u32,
    /// Number of IRQ types (for PCI usually `wire::PCI_NUM_IRQS`).
    pub num_irqs: u32,
}

/// One region, as `DEVICE_GET_REGION_INFO` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// `wire::REGION_INFO_FLAG_READ/WRITE/MMAP` (`CAPS` is added by the
    /// server when there are sparse areas). With `MMAP`,
    /// [`Device::region_fd`] must return the descriptor to map.
    pub flags: u32,
    /// Size in bytes (0: the region is not implemented).
    pub size: u64,
    /// Offset in the descriptor at which the region starts, for `mmap`.
    pub offset: u64,
    /// The parts that may be mapped, if not all of it (offsets relative to
    /// the region).
    pub sparse_areas: Vec<SparseMmapArea>,
}

/// One IRQ type, as `DEVICE_GET_IRQ_INFO` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// `wire::IRQ_INFO_*`.
    pub flags: u32,
    /// Number of interrupts of this type.
    pub count: u32,
}

/// The action of a `DEVICE_SET_IRQS` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqAction {
    /// `VFIO_IRQ_SET_ACTION_MASK`.
    Mask,
    /// `VFIO_IRQ_SET_ACTION_UNMASK`.
    Unmask,
    /// `VFIO_IRQ_SET_ACTION_TRIGGER`.
    Trigger,
}

/// The data of a `DEVICE_SET_IRQS` request, as the device receives it.
#[derive(Debug)]
pub enum IrqData {
    /// `VFIO_IRQ_SET_DATA_NONE`: act on the whole range.
    None,
    /// `VFIO_IRQ_SET_DATA_BOOL`: act where `true` (one per sub-index).
    Bool(Vec<bool>),
    /// `VFIO_IRQ_SET_DATA_EVENTFD`: one eventfd per sub-index to signal on
    /// the action; empty to de-assign the range.
    Eventfds(Vec<OwnedFd>),
}

/// A validated `DEVICE_SET_IRQS` request: `start + count` does not exceed
/// the IRQ type's count. `count == 0` with [`IrqData::None`] and
/// [`IrqAction::Trigger`] disables every interrupt of the type (the server
/// also sends this for every type when the client disconnects).
#[derive(Debug)]
pub struct IrqSet {
    /// IRQ type index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// The action.
    pub action: IrqAction,
    /// The data.
    pub data: IrqData,
}

/// One sub-region of `DEVICE_GET_REGION_IO_FDS`: a span of a region whose
/// writes the client should deliver to `fd` (an ioeventfd or ioregionfd).
#[derive(Debug, Clone, Copy)]
pub struct IoFdArea<'a> {
    /// Start of the span in the region.
    pub offset: u64,
    /// Length of the span (0: any access size).
    pub size: u64,
    /// `wire::IO_FD_TYPE_*`.
    pub kind: u32,
    /// `wire::KVM_IOEVENTFD_FLAG_*` (or ioregionfd flags).
    pub flags: u32,
    /// Datamatch value (ioeventfd) or user data (ioregionfd).
    pub data: u64,
    /// The descriptor (several areas may share one).
    pub fd: BorrowedFd<'a>,
}

/// A device served over vfio-user.
///
/// Guest memory is reached through the [`Dma`](crate::Dma) handle given to
/// the [`Server`](crate::Server) (create it first, clone it into the
/// device). Migration is mandatory: a device that cannot save and restore
/// its state does not implement this trait.
pub trait Device {
    /// Device flags and region and IRQ counts.
    fn device_info(&self) -> DeviceInfo;

    /// Region `index` (< `num_regions`).
    fn region_info(&self, index: u32) -> RegionInfo;

    /// The descriptor to map region `index`, if its info has
    /// `REGION_INFO_FLAG_MMAP`.
    fn region_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        let _ = index;
        None
    }

    /// Sub-regions of region `index` served through ioeventfds or
    /// ioregionfds (none by default).
    fn region_io_fds(&self, index: u32) -> io::Result<Vec<IoFdArea<'_>>> {
        let _ = index;
        Ok(Vec::new())
    }

    /// Reads `data.len()` bytes of region `index` at `offset` (in bounds,
    /// region readable).
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;

    /// Writes `data` to region `index` at `offset` (in bounds, region
    /// writable).
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;

    /// IRQ type `index` (< `num_irqs`).
    fn irq_info(&self, index: u32) -> IrqInfo;

    /// Applies a validated `DEVICE_SET_IRQS` request.
    fn set_irqs(&mut self, irqs: IrqSet) -> io::Result<()>;

    /// A DMA window was added (it is already reachable through the
    /// [`Dma`](crate::Dma) handle). `fd` is a duplicate of the window's
    /// descriptor and its offset, when the client gave one, for devices
    /// that map guest memory themselves.
    fn dma_map(&mut self, range: DmaRange, fd: Option<(OwnedFd, u64)>) -> io::Result<()> {
        let _ = (range, fd);
        Ok(())
    }

    /// DMA logging started (`Some(page_size)`) or stopped (`None`). Devices
    /// that write guest memory only through [`Dma`](crate::Dma) need
    /// nothing here; devices with mappings of their own start or stop
    /// tracking their writes.
    fn dma_logging(&mut self, page_size: Option<u64>) -> io::Result<()> {
        let _ = page_size;
        Ok(())
    }

    /// Before each DMA logging report: a device with mappings of its own
    /// adds what it wrote since the last call with
    /// [`Dma::mark_dirty`](crate::Dma::mark_dirty).
    fn dma_logging_sync(&mut self, dma: &crate::Dma) -> io::Result<()> {
        let _ = dma;
        Ok(())
    }

    /// A DMA window was removed (it is no longer reachable).
    fn dma_unmap(&mut self, range: DmaRange) {
        let _ = range;
    }

    /// Resets the device (`DEVICE_RESET`, or leaving the migration `ERROR`
    /// state). Afterwards the device is running.
    fn reset(&mut self) -> io::Result<()>;

    /// `RUNNING -> STOP`: stop all activity (no DMA, no interrupts, no
    /// internal state change) before returning. Region accesses must still
    /// be answered.
    fn pause(&mut self) -> io::Result<()>;

    /// `STOP -> RUNNING`: resume.
    fn resume(&mut self) -> io::Result<()>;

    /// Entering `STOP_COPY` (the device is stopped): the device's complete
    /// state as an opaque blob, streamed to the client by
    /// `MIG_DATA_READ`.
    fn save_state(&mut self) -> io::Result<Vec<u8>>;

    /// `RESUMING -> STOP`: load a blob written by `MIG_DATA_WRITE`. The blob
    /// comes from the client and is untrusted: validate it completely and
    /// leave the device unchanged on error.
    fn restore_state(&mut self, state: &[u8]) -> io::Result<()>;
}
