//! Device messages: `DEVICE_GET_INFO`, `DEVICE_GET_REGION_INFO` (with the
//! sparse mmap capability), `DEVICE_GET_REGION_IO_FDS`,
//! `DEVICE_GET_IRQ_INFO`, `DEVICE_SET_IRQS`, `REGION_READ` and
//! `REGION_WRITE`. The structures are those of `<linux/vfio.h>`
//! (`vfio_device_info` without `cap_offset`, `vfio_region_info`,
//! `vfio_info_cap_header`, `vfio_region_info_cap_sparse_mmap`,
//! `vfio_irq_info`, `vfio_irq_set`) and libvfio-user
//! (`vfio_user_region_io_fds_*`, `vfio_user_region_access`).

use super::{len_u32, Reader, WireError, Writer};

/// `VFIO_DEVICE_FLAGS_RESET`: the device supports `DEVICE_RESET`.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`: the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `VFIO_PCI_BAR0_REGION_INDEX`; BARs 1-5 follow.
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
/// `VFIO_PCI_ROM_REGION_INDEX`.
pub const PCI_ROM_REGION_INDEX: u32 = 6;
/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
/// `VFIO_PCI_VGA_REGION_INDEX`.
pub const PCI_VGA_REGION_INDEX: u32 = 8;
/// `VFIO_PCI_NUM_REGIONS`.
pub const PCI_NUM_REGIONS: u32 = 9;
/// `VFIO_PCI_INTX_IRQ_INDEX`.
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
/// `VFIO_PCI_MSI_IRQ_INDEX`.
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
/// `VFIO_PCI_MSIX_IRQ_INDEX`.
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;
/// `VFIO_PCI_ERR_IRQ_INDEX`.
pub const PCI_ERR_IRQ_INDEX: u32 = 3;
/// `VFIO_PCI_REQ_IRQ_INDEX`.
pub const PCI_REQ_IRQ_INDEX: u32 = 4;
/// `VFIO_PCI_NUM_IRQS`.
pub const PCI_NUM_IRQS: u32 = 5;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`: the reply carries a descriptor to mmap.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`: the reply has a capability chain.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`: the data is `count` bytes of booleans.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`: `count` eventfds ride as ancillary data.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// `VFIO_IRQ_SET_DATA_TYPE_MASK`.
pub const IRQ_SET_DATA_TYPE_MASK: u32 =
    IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
/// `VFIO_IRQ_SET_ACTION_TYPE_MASK`.
pub const IRQ_SET_ACTION_TYPE_MASK: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// `VFIO_USER_IO_FD_TYPE_IOEVENTFD`.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// `VFIO_USER_IO_FD_TYPE_IOREGIONFD`.
pub const IO_FD_TYPE_IOREGIONFD: u32 = 1;
/// `KVM_IOEVENTFD_FLAG_DATAMATCH`.
pub const KVM_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 0;
/// `KVM_IOEVENTFD_FLAG_PIO`.
pub const KVM_IOEVENTFD_FLAG_PIO: u32 = 1 << 1;

fn argsz_at_least(what: &'static str, argsz: u32, min: usize) -> Result<(), WireError> {
    if (argsz as usize) < min {
        Err(WireError::invalid(what, "argsz", argsz))
    } else {
        Ok(())
    }
}

/// Body of `DEVICE_GET_INFO` request and reply (16 bytes).
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 num_regions u32 | 12 num_irqs u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    /// Request: largest reply body accepted; reply: size of the reply (16).
    pub argsz: u32,
    /// `DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of interrupt types.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.num_regions)
            .u32(self.num_irqs);
        w.into_vec()
    }

    /// Decodes a body: exactly 16 bytes, `argsz` at least 16.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_GET_INFO";
        let mut r = Reader::new(WHAT, body);
        let i = Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        };
        r.finish()?;
        argsz_at_least(WHAT, i.argsz, Self::SIZE)?;
        Ok(i)
    }
}

/// `struct vfio_region_info` (32 bytes): the body of a
/// `DEVICE_GET_REGION_INFO` request and the fixed part of its reply.
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 index u32 | 12 cap_offset u32
/// 16 size u64 | 24 offset u64
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// Request: largest reply body accepted; reply: size of the full reply.
    pub argsz: u32,
    /// `REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this structure, 0
    /// if none is included.
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset to give `mmap()` (base of the sparse areas).
    pub offset: u64,
}

impl RegionInfo {
    /// Encoded size.
    pub const SIZE: usize = 32;

    fn write(&self, w: &mut Writer) {
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.cap_offset)
            .u64(self.size)
            .u64(self.offset);
    }

    /// Encodes a request body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        self.write(&mut w);
        w.into_vec()
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
        })
    }

    /// Decodes a request body: exactly 32 bytes, `argsz` at least 32.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_GET_REGION_INFO";
        let mut r = Reader::new(WHAT, body);
        let i = Self::read(&mut r)?;
        r.finish()?;
        argsz_at_least(WHAT, i.argsz, Self::SIZE)?;
        Ok(i)
    }
}

/// `struct vfio_region_sparse_mmap_area`: one mappable part of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseMmapArea {
    /// Offset of the area in the region (added to the region's mmap offset).
    pub offset: u64,
    /// Size of the area.
    pub size: u64,
}

/// Reply body of `DEVICE_GET_REGION_INFO`: the region info and its
/// capability chain.
///
/// ```text
/// 0   vfio_region_info (32 bytes), cap_offset = 32 when caps follow
/// 32  vfio_info_cap_header: id u16 = 1 (SPARSE_MMAP) | version u16 = 1 |
///     next u32 (offset from the start of the region info, 0 = last)
/// 40  nr_areas u32 | reserved u32
/// 48  areas: { offset u64, size u64 } x nr_areas
/// ```
///
/// If the request's `argsz` is too small for the capabilities, the reply is
/// the 32-byte structure with `argsz` set to the size needed and
/// `cap_offset` 0 (as Linux does), so the client can ask again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionInfoReply {
    /// The fixed part (`argsz` and `cap_offset` are set by [`Self::encode`]).
    pub info: RegionInfo,
    /// The sparse mmap areas (empty: no capability).
    pub sparse_areas: Vec<SparseMmapArea>,
}

impl RegionInfoReply {
    const CAP_HEADER: usize = 8;
    const SPARSE_FIXED: usize = Self::CAP_HEADER + 8;
    /// Most capabilities followed in one reply.
    const MAX_CAPS: usize = 64;

    /// Size of the complete reply.
    pub fn full_size(&self) -> usize {
        if self.sparse_areas.is_empty() {
            RegionInfo::SIZE
        } else {
            RegionInfo::SIZE + Self::SPARSE_FIXED + 16 * self.sparse_areas.len()
        }
    }

    /// Encodes the reply for a request whose `argsz` was `max_argsz`.
    pub fn encode(&self, max_argsz: u32) -> Vec<u8> {
        let full = self.full_size();
        let mut info = self.info;
        info.argsz = len_u32(full);
        info.cap_offset = 0;
        if !self.sparse_areas.is_empty() {
            info.flags |= REGION_INFO_FLAG_CAPS;
        }
        let fits = full <= max_argsz as usize;
        if fits && !self.sparse_areas.is_empty() {
            info.cap_offset = RegionInfo::SIZE as u32;
        }
        let mut w = Writer::with_capacity(full);
        info.write(&mut w);
        if fits && !self.sparse_areas.is_empty() {
            w.u16(REGION_INFO_CAP_SPARSE_MMAP)
                .u16(1)
                .u32(0)
                .u32(len_u32(self.sparse_areas.len()))
                .u32(0);
            for a in &self.sparse_areas {
                w.u64(a.offset).u64(a.size);
            }
        }
        w.into_vec()
    }

    /// Decodes a reply, following the capability chain. Unknown
    /// capabilities are skipped; a chain that loops, points backwards or
    /// outside the body is an error.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_GET_REGION_INFO reply";
        let mut r = Reader::new(WHAT, body);
        let info = RegionInfo::read(&mut r)?;
        if info.cap_offset == 0 {
            // No capability included: the fixed part alone; `argsz` may ask
            // for more (a truncated reply).
            r.finish()?;
            if (info.argsz as usize) < RegionInfo::SIZE {
                return Err(WireError::invalid(WHAT, "argsz", info.argsz));
            }
            return Ok(Self {
                info,
                sparse_areas: Vec::new(),
            });
        }
        if info.argsz as usize != body.len() {
            return Err(WireError::invalid(WHAT, "argsz", info.argsz));
        }
        let mut sparse_areas = Vec::new();
        let mut next = info.cap_offset as usize;
        let mut seen = 0;
        let mut min_offset = RegionInfo::SIZE;
        while next != 0 {
            seen += 1;
            if next < min_offset || seen > Self::MAX_CAPS {
                return Err(WireError::invalid(WHAT, "cap offset", next as u64));
            }
            let cap =
                body.get(next..)
                    .ok_or(WireError::invalid(WHAT, "cap offset", next as u64))?;
            let mut c = Reader::new(WHAT, cap);
            let id = c.u16()?;
            let version = c.u16()?;
            let cap_next = c.u32()? as usize;
            if id == REGION_INFO_CAP_SPARSE_MMAP {
                if version != 1 {
                    return Err(WireError::invalid(WHAT, "sparse mmap version", version));
                }
                let nr = c.u32()?;
                let _reserved = c.u32()?;
                let need = (nr as usize)
                    .checked_mul(16)
                    .ok_or(WireError::invalid(WHAT, "nr_areas", nr))?;
                let mut areas = Reader::new(WHAT, c.bytes(need)?);
                for _ in 0..nr {
                    sparse_areas.push(SparseMmapArea {
                        offset: areas.u64()?,
                        size: areas.u64()?,
                    });
                }
            }
            min_offset = next
                .checked_add(Self::CAP_HEADER)
                .ok_or(WireError::invalid(WHAT, "cap offset", next as u64))?;
            next = cap_next;
        }
        Ok(Self { info, sparse_areas })
    }
}

/// Body of a `DEVICE_GET_REGION_IO_FDS` request (16 bytes), and the fixed
/// part of its reply.
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 index u32 | 12 count u32 | 16 sub-regions
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionIoFds {
    /// Request: largest reply body accepted; reply: size of the full reply.
    pub argsz: u32,
    /// Must be 0.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Request: 0; reply: number of sub-regions.
    pub count: u32,
}

impl RegionIoFds {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    fn write(&self, w: &mut Writer) {
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count);
    }

    /// Encodes a request body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        self.write(&mut w);
        w.into_vec()
    }

    /// Decodes a request body: exactly 16 bytes, flags and count 0.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_GET_REGION_IO_FDS";
        let mut r = Reader::new(WHAT, body);
        let i = Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        };
        r.finish()?;
        argsz_at_least(WHAT, i.argsz, Self::SIZE)?;
        if i.flags != 0 {
            return Err(WireError::invalid(WHAT, "flags", i.flags));
        }
        if i.count != 0 {
            return Err(WireError::invalid(WHAT, "count", i.count));
        }
        Ok(i)
    }
}

/// One sub-region of a `DEVICE_GET_REGION_IO_FDS` reply (40 bytes, same
/// layout for both types).
///
/// ```text
/// 0 offset u64 | 8 size u64 | 16 fd_index u32 | 20 type u32 | 24 flags u32
/// 28 padding u32 | 32 datamatch (ioeventfd) / user_data (ioregionfd) u64
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRegionIoFd {
    /// Start of the sub-region in the region.
    pub offset: u64,
    /// Length of the sub-region (0: any access size).
    pub size: u64,
    /// Index of the descriptor in the reply's ancillary data.
    pub fd_index: u32,
    /// `IO_FD_TYPE_*`.
    pub kind: u32,
    /// `KVM_IOEVENTFD_FLAG_*` or `KVM_IOREGION_*` bits.
    pub flags: u32,
    /// `datamatch` or `user_data`.
    pub data: u64,
}

impl SubRegionIoFd {
    /// Encoded size.
    pub const SIZE: usize = 40;
}

/// Reply body of `DEVICE_GET_REGION_IO_FDS`.
///
/// The spec says entry `i` is at `i * ((argsz - 32) / count)`; the reply's
/// fixed part is 16 bytes (libvfio-user `vfio_user_region_io_fds_reply`), so
/// this crate lays entries out every 40 bytes after those 16. If `argsz` was
/// too small, the reply is the fixed part alone with the size needed and
/// the count, and carries no descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionIoFdsReply {
    /// The fixed part (`argsz` and `count` are set by [`Self::encode`]).
    pub head: RegionIoFds,
    /// The sub-regions.
    pub sub_regions: Vec<SubRegionIoFd>,
}

impl RegionIoFdsReply {
    /// Size of the complete reply.
    pub fn full_size(&self) -> usize {
        RegionIoFds::SIZE + SubRegionIoFd::SIZE * self.sub_regions.len()
    }

    /// Encodes the reply for a request whose `argsz` was `max_argsz`;
    /// returns the body and whether the sub-regions (and so the
    /// descriptors) are included.
    pub fn encode(&self, max_argsz: u32) -> (Vec<u8>, bool) {
        let full = self.full_size();
        let mut head = self.head;
        head.argsz = len_u32(full);
        head.count = len_u32(self.sub_regions.len());
        let fits = full <= max_argsz as usize;
        let mut w = Writer::with_capacity(full);
        head.write(&mut w);
        if fits {
            for s in &self.sub_regions {
                w.u64(s.offset)
                    .u64(s.size)
                    .u32(s.fd_index)
                    .u32(s.kind)
                    .u32(s.flags)
                    .u32(0)
                    .u64(s.data);
            }
        }
        (w.into_vec(), fits)
    }

    /// Decodes a reply. A reply whose `argsz` exceeds the body is a
    /// truncated reply: the sub-regions are absent.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_GET_REGION_IO_FDS reply";
        let mut r = Reader::new(WHAT, body);
        let head = RegionIoFds {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        };
        let need = (head.count as usize)
            .checked_mul(SubRegionIoFd::SIZE)
            .and_then(|n| n.checked_add(RegionIoFds::SIZE))
            .ok_or(WireError::invalid(WHAT, "count", head.count))?;
        if head.argsz as usize != need {
            return Err(WireError::invalid(WHAT, "argsz", head.argsz));
        }
        let mut sub_regions = Vec::new();
        if r.remaining() != 0 {
            for _ in 0..head.count {
                let offset = r.u64()?;
                let size = r.u64()?;
                let fd_index = r.u32()?;
                let kind = r.u32()?;
                let flags = r.u32()?;
                let _padding = r.u32()?;
                let data = r.u64()?;
                if kind != IO_FD_TYPE_IOEVENTFD && kind != IO_FD_TYPE_IOREGIONFD {
                    return Err(WireError::invalid(WHAT, "type", kind));
                }
                sub_regions.push(SubRegionIoFd {
                    offset,
                    size,
                    fd_index,
                    kind,
                    flags,
                    data,
                });
            }
        }
        r.finish()?;
        Ok(Self { head, sub_regions })
    }
}

/// Body of `DEVICE_GET_IRQ_INFO` request and reply (16 bytes).
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 index u32 | 12 count u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// Request: largest reply body accepted; reply: 16.
    pub argsz: u32,
    /// `IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ type index.
    pub index: u32,
    /// Number of interrupts of this type.
    pub count: u32,
}

impl IrqInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count);
        w.into_vec()
    }

    /// Decodes a body: exactly 16 bytes, `argsz` at least 16.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_GET_IRQ_INFO";
        let mut r = Reader::new(WHAT, body);
        let i = Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        };
        r.finish()?;
        argsz_at_least(WHAT, i.argsz, Self::SIZE)?;
        Ok(i)
    }
}

/// Body of a `DEVICE_SET_IRQS` request: `struct vfio_irq_set` (20 bytes)
/// plus its data. There is no reply body.
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 index u32 | 12 start u32 | 16 count u32
/// 20 data: count bool bytes with IRQ_SET_DATA_BOOL, nothing otherwise
/// ```
///
/// `argsz` is the size of the request body, data included. Exactly one
/// `DATA` flag and one `ACTION` flag are set, and no other bit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IrqSet {
    /// Size of the body, data included.
    pub argsz: u32,
    /// One `IRQ_SET_DATA_*` and one `IRQ_SET_ACTION_*` flag.
    pub flags: u32,
    /// IRQ type index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// Booleans, one byte each (`IRQ_SET_DATA_BOOL` only).
    pub data: Vec<u8>,
}

impl IrqSet {
    /// Size of the fixed part.
    pub const SIZE: usize = 20;

    /// Encodes the body (computing `argsz`).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + self.data.len());
        w.u32(len_u32(Self::SIZE + self.data.len()))
            .u32(self.flags)
            .u32(self.index)
            .u32(self.start)
            .u32(self.count)
            .bytes(&self.data);
        w.into_vec()
    }

    /// Decodes and checks a body (flags, `argsz`, data length).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DEVICE_SET_IRQS";
        let mut r = Reader::new(WHAT, body);
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let start = r.u32()?;
        let count = r.u32()?;
        let data = r.rest().to_vec();
        if argsz as usize != body.len() {
            return Err(WireError::invalid(WHAT, "argsz", argsz));
        }
        let data_type = flags & IRQ_SET_DATA_TYPE_MASK;
        let action = flags & IRQ_SET_ACTION_TYPE_MASK;
        if flags & !(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK) != 0
            || data_type.count_ones() != 1
            || action.count_ones() != 1
        {
            return Err(WireError::invalid(WHAT, "flags", flags));
        }
        let want = if data_type == IRQ_SET_DATA_BOOL {
            count as usize
        } else {
            0
        };
        if data.len() != want {
            return Err(WireError::invalid(WHAT, "data length", data.len() as u64));
        }
        if data_type == IRQ_SET_DATA_BOOL && data.iter().any(|&b| b > 1) {
            return Err(WireError::invalid(WHAT, "bool", 2u64));
        }
        Ok(Self {
            argsz,
            flags,
            index,
            start,
            count,
            data,
        })
    }
}

/// The fixed part of `REGION_READ` / `REGION_WRITE` messages (16 bytes),
/// followed by `count` data bytes in a read reply and a write request.
///
/// ```text
/// 0 offset u64 | 8 region u32 | 12 count u32 | 16 data[count]
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes to transfer.
    pub count: u32,
}

impl RegionAccess {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    /// Encodes the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + data.len());
        w.u64(self.offset)
            .u32(self.region)
            .u32(self.count)
            .bytes(data);
        w.into_vec()
    }

    /// Decodes a message without data (read request, write reply).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("region access", body);
        let a = Self {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        r.finish()?;
        Ok(a)
    }

    /// Decodes a message with `count` data bytes (read reply, write
    /// request).
    pub fn decode_with_data(body: &[u8]) -> Result<(Self, &[u8]), WireError> {
        const WHAT: &str = "region access";
        let mut r = Reader::new(WHAT, body);
        let a = Self {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        let data = r.rest();
        if a.count as usize != data.len() {
            return Err(WireError::invalid(WHAT, "count", a.count));
        }
        Ok((a, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_info_bytes() {
        let i = DeviceInfo {
            argsz: 16,
            flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
            num_regions: 9,
            num_irqs: 5,
        };
        let expect = [16, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 5, 0, 0, 0];
        assert_eq!(i.encode(), expect);
        assert_eq!(DeviceInfo::decode(&expect).unwrap(), i);
        assert!(DeviceInfo::decode(&expect[..12]).is_err());
        let mut small = expect;
        small[0] = 15;
        assert!(DeviceInfo::decode(&small).is_err());
    }

    #[test]
    fn region_info_request_bytes() {
        let i = RegionInfo {
            argsz: 32,
            index: 7,
            ..Default::default()
        };
        let mut expect = [0u8; 32];
        expect[0] = 32;
        expect[8] = 7;
        assert_eq!(i.encode(), expect);
        assert_eq!(RegionInfo::decode(&expect).unwrap(), i);
    }

    #[test]
    fn region_info_reply_with_sparse_mmap_bytes() {
        let r = RegionInfoReply {
            info: RegionInfo {
                flags: REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP,
                index: 0,
                size: 0x4000,
                offset: 0x1000,
                ..Default::default()
            },
            sparse_areas: vec![SparseMmapArea {
                offset: 0x2000,
                size: 0x1000,
            }],
        };
        #[rustfmt::skip]
        let expect: Vec<u8> = vec![
            64, 0, 0, 0,            // argsz: 32 + 8 + 8 + 16
            0x0f, 0, 0, 0,          // flags: read|write|mmap|caps
            0, 0, 0, 0,             // index
            32, 0, 0, 0,            // cap_offset
            0, 0x40, 0, 0, 0, 0, 0, 0, // size
            0, 0x10, 0, 0, 0, 0, 0, 0, // offset
            1, 0,                   // cap id SPARSE_MMAP
            1, 0,                   // cap version
            0, 0, 0, 0,             // next
            1, 0, 0, 0,             // nr_areas
            0, 0, 0, 0,             // reserved
            0, 0x20, 0, 0, 0, 0, 0, 0, // area offset
            0, 0x10, 0, 0, 0, 0, 0, 0, // area size
        ];
        assert_eq!(r.encode(64), expect);
        let d = RegionInfoReply::decode(&expect).unwrap();
        assert_eq!(d.sparse_areas, r.sparse_areas);
        assert_eq!(d.info.size, 0x4000);

        // argsz too small: the fixed part with the size needed, no caps.
        let short = r.encode(32);
        assert_eq!(&short[..4], &[64, 0, 0, 0]);
        assert_eq!(&short[12..16], &[0, 0, 0, 0]);
        assert_eq!(short.len(), 32);
        assert_eq!(
            RegionInfoReply::decode(&short).unwrap().sparse_areas,
            vec![]
        );
    }

    #[test]
    fn region_info_reply_bad_chains() {
        let r = RegionInfoReply {
            info: RegionInfo::default(),
            sparse_areas: vec![SparseMmapArea { offset: 0, size: 1 }],
        };
        let good = r.encode(1000);
        // next points back at itself
        let mut looped = good.clone();
        looped[36] = 32;
        assert!(RegionInfoReply::decode(&looped).is_err());
        // cap_offset inside the fixed part
        let mut inside = good.clone();
        inside[12] = 8;
        assert!(RegionInfoReply::decode(&inside).is_err());
        // nr_areas larger than the body
        let mut many = good.clone();
        many[40] = 2;
        assert!(RegionInfoReply::decode(&many).is_err());
        let mut huge = good.clone();
        huge[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RegionInfoReply::decode(&huge).is_err());
        // cap_offset beyond the body
        let mut beyond = good;
        beyond[12] = 200;
        assert!(RegionInfoReply::decode(&beyond).is_err());
    }

    #[test]
    fn region_io_fds_bytes() {
        let req = RegionIoFds {
            argsz: 56,
            flags: 0,
            index: 1,
            count: 0,
        };
        let expect_req = [56, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(req.encode(), expect_req);
        assert_eq!(RegionIoFds::decode(&expect_req).unwrap(), req);
        let mut bad = expect_req;
        bad[4] = 1;
        assert!(RegionIoFds::decode(&bad).is_err());

        let reply = RegionIoFdsReply {
            head: RegionIoFds {
                index: 1,
                ..Default::default()
            },
            sub_regions: vec![SubRegionIoFd {
                offset: 0x10,
                size: 4,
                fd_index: 0,
                kind: IO_FD_TYPE_IOEVENTFD,
                flags: KVM_IOEVENTFD_FLAG_DATAMATCH,
                data: 0xdead,
            }],
        };
        #[rustfmt::skip]
        let expect: Vec<u8> = vec![
            56, 0, 0, 0,   // argsz 16 + 40
            0, 0, 0, 0,    // flags
            1, 0, 0, 0,    // index
            1, 0, 0, 0,    // count
            0x10, 0, 0, 0, 0, 0, 0, 0, // offset
            4, 0, 0, 0, 0, 0, 0, 0,    // size
            0, 0, 0, 0,    // fd_index
            0, 0, 0, 0,    // type ioeventfd
            1, 0, 0, 0,    // flags datamatch
            0, 0, 0, 0,    // padding
            0xad, 0xde, 0, 0, 0, 0, 0, 0, // datamatch
        ];
        assert_eq!(reply.encode(56), (expect.clone(), true));
        assert_eq!(RegionIoFdsReply::decode(&expect).unwrap(), {
            let mut r = reply.clone();
            r.head.argsz = 56;
            r.head.count = 1;
            r
        });
        let (short, fits) = reply.encode(16);
        assert!(!fits);
        assert_eq!(short, expect[..16]);
        assert!(RegionIoFdsReply::decode(&short)
            .unwrap()
            .sub_regions
            .is_empty());
        assert!(RegionIoFdsReply::decode(&expect[..50]).is_err());
    }

    #[test]
    fn irq_info_bytes() {
        let i = IrqInfo {
            argsz: 16,
            flags: IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            index: PCI_MSIX_IRQ_INDEX,
            count: 32,
        };
        let expect = [16, 0, 0, 0, 9, 0, 0, 0, 2, 0, 0, 0, 32, 0, 0, 0];
        assert_eq!(i.encode(), expect);
        assert_eq!(IrqInfo::decode(&expect).unwrap(), i);
    }

    #[test]
    fn irq_set_bytes() {
        let s = IrqSet {
            argsz: 0,
            flags: IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
            index: 2,
            start: 1,
            count: 2,
            data: vec![1, 0],
        };
        #[rustfmt::skip]
        let expect = [
            22, 0, 0, 0,   // argsz
            0x22, 0, 0, 0, // flags bool|trigger
            2, 0, 0, 0,    // index
            1, 0, 0, 0,    // start
            2, 0, 0, 0,    // count
            1, 0,          // data
        ];
        assert_eq!(s.encode(), expect);
        let d = IrqSet::decode(&expect).unwrap();
        assert_eq!(d.argsz, 22);
        assert_eq!(d.data, vec![1, 0]);

        let eventfd = IrqSet {
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            count: 4,
            ..Default::default()
        };
        assert_eq!(
            eventfd.encode(),
            [20, 0, 0, 0, 0x24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0]
        );
        // two data types, no action, unknown bit, argsz mismatch, short data
        for (i, v) in [(4, 0x26u8), (4, 0x04), (5, 0x01)] {
            let mut b = expect;
            b[i] = v;
            assert!(IrqSet::decode(&b).is_err(), "{i} {v:#x}");
        }
        let mut b = expect;
        b[0] = 21;
        assert!(IrqSet::decode(&b).is_err());
        let mut b = expect.to_vec();
        b[0] = 21;
        b.pop();
        assert!(IrqSet::decode(&b).is_err());
        let mut b = expect;
        b[20] = 7;
        assert!(IrqSet::decode(&b).is_err());
    }

    #[test]
    fn region_access_bytes() {
        let a = RegionAccess {
            offset: 0x40,
            region: 7,
            count: 4,
        };
        #[rustfmt::skip]
        let expect = [
            0x40, 0, 0, 0, 0, 0, 0, 0, // offset
            7, 0, 0, 0,                // region
            4, 0, 0, 0,                // count
            0xde, 0xad, 0xbe, 0xef,    // data
        ];
        assert_eq!(a.encode(&[0xde, 0xad, 0xbe, 0xef]), expect);
        assert_eq!(
            RegionAccess::decode_with_data(&expect).unwrap(),
            (a, &expect[16..])
        );
        assert_eq!(RegionAccess::decode(&expect[..16]).unwrap(), a);
        assert!(RegionAccess::decode(&expect).is_err());
        assert!(RegionAccess::decode_with_data(&expect[..19]).is_err());
        assert!(RegionAccess::decode(&expect[..15]).is_err());
    }
}
