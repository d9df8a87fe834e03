//! Guest physical memory: the address map, and RAM backed by one memfd that
//! device processes can map.
//!
//! ```text
//! 0x0000_0000 ..           RAM (low): boot structures, kernel, initrd
//! 0x0009_fc00 .. 0x0010_0000  EBDA and BIOS area (reserved in the E820
//!                             map): MP table at 0xf_0000
//! 0xc000_0000 .. 0x1_0000_0000  32-bit MMIO hole: 32-bit PCI BARs
//!                                (0xc000_0000, 256 MiB), virtio-mmio
//!                                (0xd000_0000), IOAPIC (0xfec0_0000),
//!                                KVM's TSS (0xfffb_d000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000 ..         RAM (high): what does not fit below the hole
//! RAM end, 1 GiB aligned   64-bit PCI BARs (64 GiB)
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Start of the 32-bit MMIO hole; RAM below it, devices inside it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB), where high RAM starts.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The 32-bit PCI BAR window: the bottom of the MMIO hole.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// Size of the 32-bit PCI BAR window (virtio-mmio windows follow it).
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// Size of the 64-bit PCI BAR window above RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Where the 64-bit PCI BAR window starts for `ram_size` bytes of RAM: the
/// first 1 GiB boundary at or above both 4 GiB and the end of RAM.
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    let end = ram_ranges(ram_size)
        .last()
        .map_or(MMIO_HOLE_END, |r| r.start + r.size);
    end.max(MMIO_HOLE_END).next_multiple_of(1 << 30)
}

/// Start of the extended BIOS data area: RAM below it is usable, the rest
/// of the first MiB is reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the MP table is written (the BIOS area Linux searches).
pub const MPTABLE_START: u64 = 0xf_0000;
/// First address past the legacy low-memory area.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Guest memory as the VMM and its vCPU threads see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(std::io::Error),
    /// ftruncate on the memfd failed.
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    Truncate {
        /// The requested size.
        size: u64,
        /// Why.
        source: std::io::Error,
    },
    /// mmap of a region failed.
    #[error("cannot map guest memory region at {addr:#x} ({size} bytes): {source}")]
    Map {
        /// Guest physical address of the region.
        addr: u64,
        /// Its size.
        size: u64,
        /// Why.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions could not be assembled.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// One RAM range of the guest physical address map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of this range in the memfd.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            start: MMIO_HOLE_END,
            size: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Guest RAM and the memfd that backs it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemory,
    /// The RAM ranges, in address order.
    pub ranges: Vec<RamRange>,
    /// The memfd; device processes map it at the ranges' file offsets.
    pub memfd: File,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in a fresh memfd, mapped shared.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        // SAFETY: memfd_create takes a NUL-terminated name we own and flags;
        // it returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"outboard-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        // Device processes get this fd: none may resize it under the VMM
        // (a shrink would turn guest accesses into SIGBUS).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd we own, with plain flags.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }

        let ranges = ram_ranges(size);
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
            let len = usize::try_from(r.size)
                .map_err(|_| MemoryError::Layout(format!("region size {} too large", r.size)))?;
            let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, r.file_offset), len)
                .map_err(|source| MemoryError::Map {
                    addr: r.start,
                    size: r.size,
                    source,
                })?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.start)).ok_or_else(|| {
                MemoryError::Layout(format!("region at {:#x} overflows", r.start))
            })?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(GuestRam {
            memory,
            ranges,
            memfd,
        })
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r.start + r.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                start: 0,
                size: 128 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_HOLE_START);
        assert_eq!(r[1].start, MMIO_HOLE_END);
        assert_eq!(r[1].size, (4 << 30) - MMIO_HOLE_START);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
    }

    #[test]
    fn memfd_backs_guest_memory() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory.num_regions(), 1);
        assert_eq!(ram.low_end(), 32 << 20);
    }
}
