//! `VFIO_USER_DMA_MAP`, `VFIO_USER_DMA_UNMAP`, `VFIO_USER_DMA_READ` and
//! `VFIO_USER_DMA_WRITE` (libvfio-user `struct vfio_user_dma_map`,
//! `vfio_user_dma_unmap`, `vfio_user_dma_region_access`).

use super::{Reader, WireError, Writer};

/// DMA map flag: the server may read the region (`VFIO_USER_F_DMA_REGION_READ`).
pub const DMA_FLAG_READ: u32 = 1 << 0;
/// DMA map flag: the server may write the region (`VFIO_USER_F_DMA_REGION_WRITE`).
pub const DMA_FLAG_WRITE: u32 = 1 << 1;
/// DMA unmap flag: unmap every region (`VFIO_DMA_UNMAP_FLAG_ALL` of
/// `<linux/vfio.h>`; address and size must be zero). An extension the spec
/// does not list; QEMU's client sends it.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// Body of a `VFIO_USER_DMA_MAP` request (32 bytes; the reply has no body).
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 offset u64 | 16 address u64 | 24 size u64
/// ```
///
/// The mappable variant carries one file descriptor; `offset` is the file
/// offset of the region in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    /// Size of this structure (32).
    pub argsz: u32,
    /// `DMA_FLAG_*`.
    pub flags: u32,
    /// File offset of the region in the accompanying descriptor.
    pub offset: u64,
    /// DMA (IOVA) base address.
    pub address: u64,
    /// Size of the region.
    pub size: u64,
}

impl DmaMap {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u64(self.offset)
            .u64(self.address)
            .u64(self.size);
        w.into_vec()
    }

    /// Decodes a body: exactly 32 bytes, `argsz` 32.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DMA_MAP";
        let mut r = Reader::new(WHAT, body);
        let m = Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            offset: r.u64()?,
            address: r.u64()?,
            size: r.u64()?,
        };
        r.finish()?;
        if m.argsz as usize != Self::SIZE {
            return Err(WireError::invalid(WHAT, "argsz", m.argsz));
        }
        Ok(m)
    }
}

/// Body of a `VFIO_USER_DMA_UNMAP` request, and of its reply (the server
/// echoes the entry).
///
/// ```text
/// 0 argsz u32 | 4 flags u32 | 8 address u64 | 16 size u64
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Request: largest reply body accepted (at least 24).
    pub argsz: u32,
    /// 0, or [`DMA_UNMAP_FLAG_ALL`].
    pub flags: u32,
    /// DMA base address; must match a mapping exactly.
    pub address: u64,
    /// Size; must match a mapping exactly.
    pub size: u64,
}

impl DmaUnmap {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u64(self.address)
            .u64(self.size);
        w.into_vec()
    }

    /// Decodes a body: exactly 24 bytes, `argsz` at least 24.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "DMA_UNMAP";
        let mut r = Reader::new(WHAT, body);
        let m = Self {
            argsz: r.u32()?,
            flags: r.u32()?,
            address: r.u64()?,
            size: r.u64()?,
        };
        r.finish()?;
        if (m.argsz as usize) < Self::SIZE {
            return Err(WireError::invalid(WHAT, "argsz", m.argsz));
        }
        Ok(m)
    }
}

/// The fixed part of `VFIO_USER_DMA_READ` / `VFIO_USER_DMA_WRITE` messages
/// (16 bytes), followed by `count` data bytes in a read reply and a write
/// request.
///
/// ```text
/// 0 address u64 | 8 count u64 | 16 data[count]
/// ```
///
/// The spec's table gives the `DMA_WRITE` reply's count 4 bytes; libvfio-user
/// sends the same 16-byte structure as everywhere else. This crate sends 16
/// bytes and accepts 12 or 16 in a `DMA_WRITE` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess {
    /// Client DMA address.
    pub address: u64,
    /// Bytes transferred.
    pub count: u64,
}

impl DmaAccess {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    /// Encodes the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + data.len());
        w.u64(self.address).u64(self.count).bytes(data);
        w.into_vec()
    }

    /// Decodes a message without data (`DMA_READ` request).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DMA access", body);
        let a = Self {
            address: r.u64()?,
            count: r.u64()?,
        };
        r.finish()?;
        Ok(a)
    }

    /// Decodes a message with `count` data bytes (`DMA_READ` reply,
    /// `DMA_WRITE` request).
    pub fn decode_with_data(body: &[u8]) -> Result<(Self, &[u8]), WireError> {
        const WHAT: &str = "DMA access";
        let mut r = Reader::new(WHAT, body);
        let a = Self {
            address: r.u64()?,
            count: r.u64()?,
        };
        let data = r.rest();
        if a.count != data.len() as u64 {
            return Err(WireError::invalid(WHAT, "count", a.count));
        }
        Ok((a, data))
    }

    /// Decodes a `DMA_WRITE` reply: 16 bytes, or 12 with a 4-byte count as in
    /// the spec's table.
    pub fn decode_write_reply(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DMA_WRITE reply", body);
        let address = r.u64()?;
        let count = match r.remaining() {
            4 => u64::from(r.u32()?),
            _ => r.u64()?,
        };
        r.finish()?;
        Ok(Self { address, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_map_bytes() {
        let m = DmaMap {
            argsz: 32,
            flags: DMA_FLAG_READ | DMA_FLAG_WRITE,
            offset: 0x1000,
            address: 0x8000_0000,
            size: 0x20_0000,
        };
        let expect = [
            0x20, 0, 0, 0, // argsz
            0x03, 0, 0, 0, // flags
            0x00, 0x10, 0, 0, 0, 0, 0, 0, // offset
            0x00, 0, 0, 0x80, 0, 0, 0, 0, // address
            0x00, 0, 0x20, 0, 0, 0, 0, 0, // size
        ];
        assert_eq!(m.encode(), expect);
        assert_eq!(DmaMap::decode(&expect).unwrap(), m);
        assert!(DmaMap::decode(&expect[..31]).is_err());
        let mut long = expect.to_vec();
        long.push(0);
        assert!(DmaMap::decode(&long).is_err());
        let mut bad_argsz = expect;
        bad_argsz[0] = 0x21;
        assert!(DmaMap::decode(&bad_argsz).is_err());
    }

    #[test]
    fn dma_unmap_bytes() {
        let m = DmaUnmap {
            argsz: 24,
            flags: 0,
            address: 0x1_0000_0000,
            size: 0x1000,
        };
        let expect = [
            0x18, 0, 0, 0, // argsz
            0, 0, 0, 0, // flags
            0, 0, 0, 0, 1, 0, 0, 0, // address
            0, 0x10, 0, 0, 0, 0, 0, 0, // size
        ];
        assert_eq!(m.encode(), expect);
        assert_eq!(DmaUnmap::decode(&expect).unwrap(), m);
        let mut small = expect;
        small[0] = 8;
        assert!(DmaUnmap::decode(&small).is_err());
    }

    #[test]
    fn dma_access_bytes() {
        let a = DmaAccess {
            address: 0x1234,
            count: 3,
        };
        let expect = [
            0x34, 0x12, 0, 0, 0, 0, 0, 0, // address
            3, 0, 0, 0, 0, 0, 0, 0, // count
            0xaa, 0xbb, 0xcc, // data
        ];
        assert_eq!(a.encode(&[0xaa, 0xbb, 0xcc]), expect);
        let (d, data) = DmaAccess::decode_with_data(&expect).unwrap();
        assert_eq!((d, data), (a, &[0xaa, 0xbb, 0xcc][..]));
        // count larger or smaller than the data
        assert!(DmaAccess::decode_with_data(&expect[..18]).is_err());
        assert!(DmaAccess::decode(&expect).is_err());
        assert_eq!(DmaAccess::decode(&expect[..16]).unwrap(), a);
        // write replies: 16 bytes, or 12 as the spec's table has it
        assert_eq!(DmaAccess::decode_write_reply(&expect[..16]).unwrap(), a);
        assert_eq!(DmaAccess::decode_write_reply(&expect[..12]).unwrap(), a);
        assert!(DmaAccess::decode_write_reply(&expect[..10]).is_err());
    }
}
