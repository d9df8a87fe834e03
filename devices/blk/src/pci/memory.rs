//! The client's memory as the PCI function reaches it: the table of DMA
//! windows the client mapped (file descriptors, `mmap`ed here), the
//! `GuestMemoryMmap` built from them, and DMA dirty logging.
//!
//! Table rules (the same as the vfio-user server's): windows are 4 KiB
//! aligned (IOVA, size and file offset), non-empty, within the 64-bit
//! space, never overlap, at most [`MAX_DMA_MAPS`] of them; the descriptor
//! must be a regular file (memfd, shm, hugetlbfs) at least `offset + size`
//! long. An unmap must name a window exactly.
//!
//! Writable windows are mapped `MAP_SHARED`. Read-only windows are mapped
//! `MAP_PRIVATE` and writable: a device write there (a guest error: a read
//! request into ROM) lands in a private copy and never faults or reaches
//! the client's memory.
//!
//! Updates while queues run: the memory is a [`GuestMemoryAtomic`]; map
//! and unmap publish a new map, and workers take a snapshot per batch of
//! requests. After an unmap the caller waits for the batches in flight
//! ([`super::BlkPciFunction::dma_unmap`]), so the window is not touched
//! once the unmap returns.
//!
//! Dirty logging: every region carries a vm-memory [`AtomicBitmap`] at
//! 4 KiB granularity that every device write marks (`write_obj`, atomic
//! stores of the used ring, and `preadv` into guest buffers, which the
//! engine marks by hand). A report first *harvests* every region's bitmap
//! atomically (`get_and_reset`) into a per-window accumulator, then takes
//! the requested range out of the accumulators: no bit set concurrently
//! is lost, and bits outside the range wait for a later report.

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

/// Guest memory as the PCI function's workers see it: dirty-tracked.
pub type PciGuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Alignment of DMA windows and granularity of the dirty bitmaps.
pub const DMA_PAGE: u64 = 4096;

/// Most DMA windows at once.
pub const MAX_DMA_MAPS: usize = 1024;

/// Largest dirty bitmap one report returns (64 MiB: 2 TiB at 4 KiB).
pub const MAX_BITMAP_BYTES: u64 = 64 << 20;

/// Largest reporting page size.
const MAX_LOG_PAGE: u64 = 1 << 30;

/// A refused DMA map or unmap.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Empty, unaligned, or past the end of the address space.
    #[error("DMA window {iova:#x}+{size:#x} (file offset {offset:#x}) is empty, not 4 KiB aligned or out of range")]
    BadRange {
        /// The IOVA.
        iova: u64,
        /// The size.
        size: u64,
        /// The offset in the file.
        offset: u64,
    },
    /// Overlaps a mapped window.
    #[error("DMA window {iova:#x}+{size:#x} overlaps a mapped window")]
    Overlap {
        /// The IOVA.
        iova: u64,
        /// The size.
        size: u64,
    },
    /// Too many windows.
    #[error("too many DMA windows (at most {MAX_DMA_MAPS})")]
    TooMany,
    /// The descriptor cannot be examined.
    #[error("cannot examine the DMA window's file: {0}")]
    Stat(io::Error),
    /// The descriptor is not a regular file, or shorter than the window.
    #[error("the DMA window's file is not a regular file of at least {needed} bytes")]
    BadFile {
        /// `offset + size`.
        needed: u64,
    },
    /// mmap failed.
    #[error("cannot map the DMA window: {0}")]
    Mmap(#[from] MmapRegionError),
    /// An unmap that names no window exactly.
    #[error("no DMA window {iova:#x}+{size:#x}")]
    NotMapped {
        /// The IOVA.
        iova: u64,
        /// The size.
        size: u64,
    },
}

/// A refused dirty-logging request.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyLogError {
    /// Reporting while logging is off.
    #[error("DMA dirty logging is not started")]
    NotStarted,
    /// A page size that is not a power of two from 4 KiB to 1 GiB.
    #[error("dirty page size {0:#x} is not a power of two from 4 KiB to 1 GiB")]
    PageSize(u64),
    /// An empty, unaligned or overflowing range, or one whose bitmap would
    /// be too large.
    #[error("dirty report range {iova:#x}+{size:#x} is empty, not page aligned or too large")]
    Range {
        /// The IOVA.
        iova: u64,
        /// The size.
        size: u64,
    },
}

/// One DMA window.
struct Window {
    iova: u64,
    size: u64,
    writable: bool,
    region: Arc<GuestRegionMmap<AtomicBitmap>>,
    /// Dirty bits taken from the region's bitmap and not yet reported, one
    /// per [`DMA_PAGE`], LSB first.
    harvested: Vec<u64>,
}

impl Window {
    fn end(&self) -> u64 {
        self.iova + self.size
    }

    /// Moves the region's dirty bits into `harvested` (atomically per
    /// word: nothing marked meanwhile is lost).
    fn harvest(&mut self) {
        let taken = self.region.bitmap().get_and_reset();
        if !self.writable {
            // Writes there went to a private copy: nothing the client
            // sees changed.
            return;
        }
        for (h, t) in self.harvested.iter_mut().zip(taken) {
            *h |= t;
        }
    }
}

/// The DMA windows and the memory built from them.
pub(crate) struct DmaTable {
    windows: Vec<Window>,
    mem: GuestMemoryAtomic<PciGuestMemory>,
    /// The page size logging was started with, while it is on.
    logging: Option<u64>,
}

impl DmaTable {
    /// An empty table.
    pub(crate) fn new() -> Self {
        DmaTable {
            windows: Vec::new(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::default()),
            logging: None,
        }
    }

    /// The memory handle the workers share.
    pub(crate) fn memory(&self) -> GuestMemoryAtomic<PciGuestMemory> {
        self.mem.clone()
    }

    /// Maps `size` bytes of `file` from `offset` at `iova`.
    pub(crate) fn map(
        &mut self,
        iova: u64,
        size: u64,
        file: File,
        offset: u64,
        writable: bool,
    ) -> Result<(), DmaError> {
        let aligned = |v: u64| v % DMA_PAGE == 0;
        let bad = || DmaError::BadRange { iova, size, offset };
        if size == 0 || !aligned(iova) || !aligned(size) || !aligned(offset) {
            return Err(bad());
        }
        let end = iova.checked_add(size).ok_or_else(bad)?;
        let needed = offset.checked_add(size).ok_or_else(bad)?;
        let len = usize::try_from(size).map_err(|_| bad())?;
        if i64::try_from(needed).is_err() {
            return Err(bad());
        }
        if self.windows.iter().any(|w| iova < w.end() && w.iova < end) {
            return Err(DmaError::Overlap { iova, size });
        }
        if self.windows.len() >= MAX_DMA_MAPS {
            return Err(DmaError::TooMany);
        }
        let meta = file.metadata().map_err(DmaError::Stat)?;
        if !meta.file_type().is_file() || meta.len() < needed {
            return Err(DmaError::BadFile { needed });
        }
        let flags = libc::MAP_NORESERVE
            | if writable {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        let bitmap = AtomicBitmap::new(len, page_nonzero());
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(iova)).ok_or_else(bad)?;
        let words = size.div_ceil(DMA_PAGE).div_ceil(64) as usize;
        let at = self.windows.partition_point(|w| w.iova < iova);
        self.windows.insert(
            at,
            Window {
                iova,
                size,
                writable,
                region: Arc::new(region),
                harvested: vec![0; words],
            },
        );
        self.publish();
        Ok(())
    }

    /// Removes the window `iova`, `size` (exactly). The caller must wait
    /// for accesses in flight before telling the client it is done.
    pub(crate) fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        let at = self
            .windows
            .iter()
            .position(|w| w.iova == iova && w.size == size)
            .ok_or(DmaError::NotMapped { iova, size })?;
        self.windows.remove(at);
        self.publish();
        Ok(())
    }

    /// Makes the current windows the memory the workers see.
    fn publish(&self) {
        let regions = self.windows.iter().map(|w| w.region.clone()).collect();
        // Sorted and disjoint by construction; an empty table is the only
        // case the constructor refuses.
        let map = GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default();
        match self.mem.lock() {
            Ok(guard) => guard.replace(map),
            Err(poisoned) => poisoned.into_inner().replace(map),
        }
    }

    /// Starts dirty logging: clears every bitmap.
    pub(crate) fn log_start(&mut self, page_size: u64) -> Result<(), DirtyLogError> {
        check_page_size(page_size)?;
        for w in &mut self.windows {
            w.region.bitmap().reset();
            w.harvested.fill(0);
        }
        self.logging = Some(page_size);
        Ok(())
    }

    /// Stops dirty logging.
    pub(crate) fn log_stop(&mut self) {
        self.logging = None;
    }

    /// The pages of `[iova, iova + size)` written since the last report
    /// (or the start), one bit per `page_size`, LSB first; clears them.
    pub(crate) fn log_report(
        &mut self,
        iova: u64,
        size: u64,
        page_size: u64,
    ) -> Result<Vec<u8>, DirtyLogError> {
        if self.logging.is_none() {
            return Err(DirtyLogError::NotStarted);
        }
        check_page_size(page_size)?;
        let bad = DirtyLogError::Range { iova, size };
        if size == 0 || iova % page_size != 0 {
            return Err(bad);
        }
        let end = iova.checked_add(size).ok_or(bad.clone())?;
        let bytes = size.div_ceil(page_size).div_ceil(8);
        if bytes > MAX_BITMAP_BYTES {
            return Err(bad);
        }
        let mut out = vec![0u8; bytes as usize];
        for w in &mut self.windows {
            let lo = iova.max(w.iova);
            let hi = end.min(w.end());
            if lo >= hi {
                continue;
            }
            w.harvest();
            let first = (lo - w.iova) / DMA_PAGE;
            let last = (hi - w.iova).div_ceil(DMA_PAGE);
            let mut page = first;
            while page < last {
                let (word, bit) = ((page / 64) as usize, page % 64);
                let Some(slot) = w.harvested.get_mut(word) else {
                    break;
                };
                // Bits of this word inside [page, last).
                let span = (64 - bit).min(last - page);
                let mask = if span == 64 {
                    u64::MAX
                } else {
                    ((1u64 << span) - 1) << bit
                };
                let mut dirty = *slot & mask;
                *slot &= !mask;
                while dirty != 0 {
                    let b = u64::from(dirty.trailing_zeros());
                    dirty &= dirty - 1;
                    let addr = w.iova + (word as u64 * 64 + b) * DMA_PAGE;
                    let index = ((addr.max(iova) - iova) / page_size) as usize;
                    if let Some(byte) = out.get_mut(index / 8) {
                        *byte |= 1 << (index % 8);
                    }
                }
                page += span;
            }
        }
        Ok(out)
    }
}

fn check_page_size(page_size: u64) -> Result<(), DirtyLogError> {
    if !page_size.is_power_of_two() || !(DMA_PAGE..=MAX_LOG_PAGE).contains(&page_size) {
        return Err(DirtyLogError::PageSize(page_size));
    }
    Ok(())
}

fn page_nonzero() -> NonZeroUsize {
    NonZeroUsize::new(DMA_PAGE as usize).unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddressSpace};

    fn file(len: u64) -> File {
        let path = std::env::temp_dir().join(format!(
            "outboard-blk-dma-{}-{len}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(&vec![0u8; len as usize]).unwrap();
        f
    }

    #[test]
    fn map_rules() {
        let mut t = DmaTable::new();
        let f = file(0x10000);
        let clone = || f.try_clone().unwrap();
        assert!(matches!(
            t.map(0x1001, 0x1000, clone(), 0, true),
            Err(DmaError::BadRange { .. })
        ));
        assert!(t.map(0, 0, clone(), 0, true).is_err());
        assert!(t.map(0x1000, 0x1000, clone(), 0x800, true).is_err());
        assert!(t.map(u64::MAX - 0xfff, 0x1000, clone(), 0, true).is_err());
        assert!(matches!(
            t.map(0, 0x20000, clone(), 0, true),
            Err(DmaError::BadFile { .. })
        ));
        assert!(t.map(0, 0x1000, clone(), u64::MAX - 0xfff, true).is_err());
        t.map(0x10000, 0x8000, clone(), 0, true).unwrap();
        assert!(matches!(
            t.map(0x17000, 0x2000, clone(), 0, true),
            Err(DmaError::Overlap { .. })
        ));
        t.map(0x18000, 0x8000, clone(), 0x8000, false).unwrap();
        let dev = File::open("/dev/null").unwrap();
        assert!(t.map(0x40000, 0x1000, dev, 0, true).is_err());
        // Both windows show the same file page 0x8000: shared vs private.
        let mem = t.memory().memory();
        mem.write_obj(0x55u8, GuestAddress(0x18000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x18000)).unwrap(), 0x55);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap(), 0);
        drop(mem);
        assert!(matches!(
            t.unmap(0x10000, 0x1000),
            Err(DmaError::NotMapped { .. })
        ));
        t.unmap(0x10000, 0x8000).unwrap();
        assert!(t
            .memory()
            .memory()
            .read_obj::<u8>(GuestAddress(0x10000))
            .is_err());
        t.unmap(0x18000, 0x8000).unwrap();
    }

    #[test]
    fn dirty_report_takes_the_range_only() {
        let mut t = DmaTable::new();
        let f = file(0x40000);
        t.map(0x100000, 0x40000, f, 0, true).unwrap();
        assert_eq!(
            t.log_report(0, 0x1000, 0x1000),
            Err(DirtyLogError::NotStarted)
        );
        assert_eq!(t.log_start(0x800), Err(DirtyLogError::PageSize(0x800)));
        t.log_start(0x1000).unwrap();
        let mem = t.memory().memory();
        for addr in [0x100000u64, 0x103010, 0x13f000] {
            mem.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
        drop(mem);
        // Only the first 16 KiB: page 0 and page 3.
        assert_eq!(
            t.log_report(0x100000, 0x4000, 0x1000).unwrap(),
            vec![0b1001]
        );
        assert_eq!(t.log_report(0x100000, 0x4000, 0x1000).unwrap(), vec![0]);
        // The rest stayed; 64 KiB pages over a range reaching past memory.
        let r = t.log_report(0x100000, 0x80000, 0x10000).unwrap();
        assert_eq!(r, vec![0b1000]);
        assert_eq!(t.log_report(0, 0x200000, 0x1000).unwrap(), vec![0; 64]);
        assert!(t.log_report(0x100800, 0x1000, 0x1000).is_err());
        assert!(t.log_report(0, u64::MAX, 0x1000).is_err());
        t.log_stop();
        assert!(t.log_report(0, 0x1000, 0x1000).is_err());
    }
}
